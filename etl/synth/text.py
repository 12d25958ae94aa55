"""String building for the synthetic clinic: numpy index arrays and ASCII matrices in, pyarrow
string arrays out, plus the typed-by-people shapes built from them (phones, money, noisy emails).

Why: pyarrow's string kernels and strftime cost seconds per million rows on a slow machine;
gathers and byte matrices do not, so the benchmark size (a million appointments) takes seconds.
The shapes imitate the exports of SPEC sections 3 and 4 (``shared/SPEC.md``), e.g. the unusable
addresses of rule 9; ``etl.synth.write_synthetic_clinic`` lists them.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc

from etl.synth.vocab import _B64URL, Bools, Chars, Ints, Strings

# string building: numpy index arrays and ASCII matrices in, pyarrow string arrays out (pyarrow's
# string kernels and strftime cost seconds per million rows on a slow machine; gathers do not)


def _join(*parts: Any) -> Strings:
    return pc.binary_join_element_wise(*parts, "")


def _take(vocab: Sequence[str], idx: npt.NDArray[Any], blank: Bools | None = None) -> Strings:
    return pa.array(vocab, pa.string()).take(pa.array(idx, mask=blank))


def _where(mask: Bools, yes: Any, no: Any) -> Strings:
    return pc.if_else(pa.array(mask), yes, no)


def _blank(values: Strings, mask: Bools) -> Strings:
    return pc.if_else(pa.array(mask), pa.scalar(None, pa.string()), values)


def _patch(values: Strings, mask: Bools, change: Any) -> Strings:
    """Apply a string kernel to the masked rows only."""
    if not mask.any():
        return values
    return pc.replace_with_mask(values, pa.array(mask), change(values.filter(pa.array(mask))))


def _text(chars: Chars) -> Strings:
    """A string array over the rows of an ``(n, width)`` ASCII matrix, without per-row work."""
    n, width = chars.shape
    offsets = np.arange(0, (n + 1) * width, width, dtype=np.int32)
    data = pa.py_buffer(np.ascontiguousarray(chars).tobytes())
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), data])


def _compose(n: int, *parts: str | Chars) -> Chars:
    """Concatenate constant strings and ASCII matrices column-wise into an ``(n, width)`` matrix."""
    return np.concatenate(
        [
            np.broadcast_to(np.frombuffer(part.encode(), np.uint8), (n, len(part)))
            if isinstance(part, str)
            else part
            for part in parts
        ],
        axis=1,
    )


@functools.cache
def _digit_table() -> Chars:
    values = np.arange(10_000)
    return np.stack([values // 10**k % 10 + 48 for k in (3, 2, 1, 0)], axis=1).astype(np.uint8)


def _digits(values: Ints, width: int) -> Chars:
    """Zero-padded decimal digits of ``0 <= values < 10**width`` as an ASCII matrix."""
    chunks = [_digit_table()[values // 10 ** (4 * k) % 10_000] for k in range((width + 3) // 4)]
    return np.concatenate(chunks[::-1], axis=1)[:, -width:]


def _ids(prefix: str, values: Ints, width: int) -> Strings:
    width = max(width, len(str(int(values.max())))) if len(values) else width
    return _text(_compose(len(values), prefix, _digits(values, width)))


def _num(values: Ints) -> Strings:
    return pc.cast(pa.array(values), pa.string())


def _tokens(rng: np.random.Generator, n: int, length: int) -> Chars:
    """Random URL-safe base64 characters (click IDs), ``(n, length)``."""
    return _B64URL[np.frombuffer(rng.bytes(n * length), np.uint8).reshape(n, length) & 63]


def _pick(rng: np.random.Generator, n: int, p: Sequence[float]) -> Ints:
    return rng.choice(len(p), size=n, p=np.asarray(p) / np.sum(p)).astype(np.int64)


def _email_local(name: str) -> str:
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z]", "", ascii_name.lower())


def _cased(rng: np.random.Generator, values: Strings, upper: float, lower: float) -> Strings:
    u = rng.random(len(values))
    values = _patch(values, u < upper, pc.utf8_upper)
    return _patch(values, (u >= upper) & (u < upper + lower), pc.utf8_lower)


def _garbled(rng: np.random.Generator, emails: Strings, rate: float) -> Strings:
    """Unusable addresses (SPEC rule 9) as typed: no top-level domain, an inner space, a filler."""
    mask = rng.random(len(emails)) < rate
    kind = rng.integers(0, 3, int(mask.sum()))
    chosen = emails.filter(pa.array(mask))
    broken = pc.choose(
        pa.array(kind),
        pc.replace_substring_regex(chosen, r"\.[a-z]+$", ""),
        pc.replace_substring(chosen, "@", " @"),
        _take(("n/a", "none", "no email"), rng.integers(0, 3, len(kind))),
    )
    return pc.replace_with_mask(emails, pa.array(mask), broken)


def _phones(rng: np.random.Generator, digits: Ints, invalid: Bools, blank: Bools) -> Strings:
    """US numbers in the formats people type, a few unparseable ones and blanks."""
    n, d = len(digits), _digits(digits, 10)
    area, exch, line = d[:, :3], d[:, 3:6], d[:, 6:]
    formats = (
        _compose(n, "(", area, ") ", exch, "-", line), _compose(n, area, ".", exch, ".", line),
        _compose(n, "+1 ", area, " ", exch, " ", line), d, _compose(n, area, "-", exch, "-", line),
        _compose(n, "1", d), _compose(n, "+1", d),
    )  # fmt: skip
    style = pa.array(_pick(rng, n, (30, 12, 10, 25, 15, 4, 4)))
    values = pc.choose(style, *(_text(f) for f in formats))
    bad, k = d[invalid], int(invalid.sum())
    unusable = pc.choose(
        pa.array(rng.integers(0, 5, k)), _text(_compose(k, "555-", bad[:, 6:])),
        _text(_compose(k, "(", bad[:, :3], ") ", bad[:, 3:6], "-", bad[:, 6:8])),
        *(pa.array([text] * k, pa.string()) for text in ("000-000-0000", "123-456-7890", "n/a")),
    )  # fmt: skip
    return _blank(pc.replace_with_mask(values, pa.array(invalid), unusable), blank)


def _money_text(cents: int, style: int) -> str:
    sign, whole, part = "-" if cents < 0 else "", abs(cents) // 100, abs(cents) % 100
    if style == 1:
        return f"{sign}${whole:,}.{part:02d}"
    return f"{sign}{whole}" if style == 2 else f"{sign}{whole}.{part:02d}"


def _money(rng: np.random.Generator, cents: Ints, blank: Bools) -> Strings:
    """Revenue as exported: ``450.00`` mostly, ``$1,200.00`` and ``450`` sometimes, blanks."""
    style = _pick(rng, len(cents), (70, 18, 12))
    style[(style == 2) & (cents % 100 != 0)] = 0
    style[cents < 0] = 0  # refunds are plain "-150.00"
    # amounts repeat (price list, fees), so format each distinct one once
    keys, where = np.unique(cents * 3 + style, return_inverse=True)
    labels = [_money_text(int(key) // 3, int(key) % 3) for key in keys]
    return _take(labels, where.reshape(-1).astype(np.int64), blank)
