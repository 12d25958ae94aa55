"""The outbox: exactly what would be (or will be) sent, one JSON object per line (SPEC section 5).

Files are written into a temporary sibling folder and renamed into place, so a run that fails
leaves either the previous complete outbox or none, never half of one. Lines are sorted by the
payload builders and serialised with sorted keys, so the same inputs and secret give
byte-identical files.

The canonical form is ``json.dumps(value, sort_keys=True, separators=(",", ":"),
ensure_ascii=False)``; msgspec writes and reads it several times faster, and is used only
where it provably gives the same bytes and the same objects (``encode_canonical``,
``decode_line``): anything else goes through the standard library, so the format never depends
on which codec ran.
"""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from itertools import chain
from pathlib import Path
from typing import Any

import msgspec

OUTBOX_FILES = {
    "google_conversions": "google_conversions.jsonl",
    "meta_events": "meta_events.jsonl",
    "google_customer_match": "google_customer_match.jsonl",
    "meta_audience": "meta_audience.jsonl",
}
SUMMARY_FILE = "summary.json"
# not sent: the plan's view of its conversions' journeys (opaque IDs), read by its uploads
SIBLINGS_FILE = "siblings.json"
_OUTBOX_ENTRIES = frozenset({*OUTBOX_FILES.values(), SUMMARY_FILE, SUMMARY_FILE + ".tmp", SIBLINGS_FILE})

_ENCODER = msgspec.json.Encoder(order="sorted")
_DECODER = msgspec.json.Decoder()
_JSON_SCALARS = frozenset({str, bool, type(None)})
_NUMBER_AS_JSON = {  # numbers msgspec writes as the standard library does
    int: range(-(2**63), 2**64).__contains__,
    float: lambda v: v == 0.0 or 1e-4 <= abs(v) < 1e16,
}
_CHUNK = 10_000  # rows encoded and written at a time
_READ_BATCH = 8 << 20  # bytes of lines read at a time


def _msgspec_safe(values: list[Any]) -> bool:
    """True when msgspec writes every one of ``values`` byte for byte as ``json.dumps`` would.

    They differ on floats Python prints in exponent form (below 1e-4 or from 1e16 on: ``1e+16``
    against ``1e16``) or not at all (NaN, infinities), and msgspec also accepts types
    ``json.dumps`` refuses (sets, dates, enums): only exact JSON types pass. Amounts are rounded
    to cents and far from both limits, so in practice every row passes. Checked a nesting level
    at a time over all values (a few C-level passes each), not value by value.
    """
    while values:
        kinds = set(map(type, values))
        if kinds <= _JSON_SCALARS:
            return True
        if not kinds <= _JSON_SCALARS | {dict, list, tuple, int, float}:
            return False
        nested: list[Any] = []
        for kind in kinds - _JSON_SCALARS:
            group: list[Any] = values if len(kinds) == 1 else [v for v in values if type(v) is kind]
            if kind is dict:
                if not set(map(type, chain.from_iterable(group))) <= {str}:
                    return False  # a key that is not text: json.dumps converts or refuses it
                nested.extend(chain.from_iterable(map(dict.values, group)))
            elif kind is list or kind is tuple:
                nested.extend(chain.from_iterable(group))
            elif not all(map(_NUMBER_AS_JSON[kind], group)):
                return False
        values = nested
    return True


def encode_canonical(value: Any) -> bytes:
    """The canonical JSON of ``value`` as UTF-8 bytes (what the outbox and the member keys use).

    Raises:
        TypeError, ValueError, UnicodeEncodeError: as ``json.dumps`` (and UTF-8) would.
    """
    return encode_canonical_all([value])[0]


def encode_canonical_all(values: Sequence[Any]) -> list[bytes]:
    """``encode_canonical`` of each value, with one type check for all of them."""
    values = list(values)
    if _msgspec_safe(values):
        try:
            return list(map(_ENCODER.encode, values))
        except (TypeError, ValueError, OverflowError):
            pass  # e.g. a lone surrogate: value by value below, to raise the standard library's error
    return [
        json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        for v in values
    ]


def encode_canonical_text(values: Sequence[Any]) -> list[bytes]:
    """``encode_canonical_all`` for values the caller has already proven to be text trees.

    That is: made of ``str``, ``None``, lists and dicts with ``str`` keys only, where msgspec and
    ``json.dumps`` agree by construction (no number, no other type), so no second type check.
    """
    return list(map(_ENCODER.encode, values))


def decode_line(line: str) -> Any:
    """One JSON value, as ``json.loads`` returns it.

    msgspec refuses what ``json.loads`` accepts beyond strict JSON (``NaN``, ``1e400`` as
    infinity, lone surrogate escapes); such a line is decoded, or refused, by ``json.loads``.
    """
    try:
        return _DECODER.decode(line)
    except msgspec.MsgspecError:
        return json.loads(line)


def check_outbox_folder(directory: Path) -> None:
    """Refuse an outbox folder that holds anything but an outbox: publishing replaces the folder.

    ``--outbox`` pointed at a clinic's folder would otherwise take its YAML, exports and staging
    database with it when the new outbox replaces it.

    Raises:
        ConfigError: ``directory`` is a file, a folder with other entries (counted, not named),
            or cannot be created (under a file, or a folder this user may not write).
    """
    import os

    from etl.errors import ConfigError

    if not directory.exists():
        # found now, not when the plan is published minutes later: the folder must be creatable
        existing = next((p for p in directory.parents if p.exists()), None)
        if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(
                f"outbox {directory} cannot be created: {existing} is not a folder this user may write; "
                "give a new or empty folder under one it may"
            )
        return
    if not directory.is_dir():
        raise ConfigError(f"outbox {directory} exists and is not a folder; give a new or empty folder")
    foreign = [p for p in directory.iterdir() if p.name not in _OUTBOX_ENTRIES]
    if foreign:
        raise ConfigError(
            f"outbox folder {directory} holds {len(foreign)} other entr{'y' if len(foreign) == 1 else 'ies'}; "
            "the outbox replaces its whole folder, so give a new or empty one"
        )


def write_outbox(
    directory: Path,
    outbound: Mapping[str, Sequence[Mapping[str, Any]]],
    summary: Mapping[str, Any],
    siblings: Mapping[str, Any] | None = None,
) -> Path:
    """Atomically (re)place ``directory`` with the four JSONL files and ``summary.json`` (and
    ``siblings.json``, the plan's view of its journeys, which moves with the plan it belongs to)."""
    directory = Path(directory)
    check_outbox_folder(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.with_name(f".{directory.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    digests: dict[str, str] = {}
    for destination, name in OUTBOX_FILES.items():
        rows = list(outbound.get(destination, ()))
        digest = hashlib.sha256()
        with (staging / name).open("wb") as fh, collector_paused():
            for lo in range(0, len(rows), _CHUNK):
                chunk = b"".join(line + b"\n" for line in encode_canonical_all(rows[lo : lo + _CHUNK]))
                digest.update(chunk)
                fh.write(chunk)
        digests[name] = digest.hexdigest()
    # the files' digests in their summary: what the run planned to send, provably unchanged since
    write_summary(staging, {**summary, "outbox_sha256": digests})
    if siblings is not None:
        (staging / SIBLINGS_FILE).write_text(json.dumps(siblings, sort_keys=True) + "\n", encoding="utf-8")
    old = directory.with_name(f".{directory.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        directory.rename(old)
    staging.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def write_summary(directory: Path, summary: Mapping[str, Any]) -> None:
    text = json.dumps(summary, sort_keys=True, indent=2) + "\n"
    tmp = directory / (SUMMARY_FILE + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(directory / SUMMARY_FILE)


@contextmanager
def collector_paused() -> Iterator[None]:
    """Pause CPython's cycle collector while many acyclic containers are built at once.

    Decoding, gating or flattening a quarter of a million JSON rows allocates millions of dicts
    and lists, and each burst of allocations makes the collector walk the whole live heap again,
    looking for reference cycles such rows cannot form: that walk was half the time of reading a
    million-appointment plan back. The previous state is restored on exit. Not for code that
    yields inside the block.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def read_rows(directory: Path, destination: str) -> Iterator[dict[str, Any]]:
    """The rows of one destination's file, in file order (each file decoded whole, then yielded)."""
    path = Path(directory) / OUTBOX_FILES[destination]
    if not path.exists():
        return
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as fh, collector_paused():
        while batch := fh.readlines(_READ_BATCH):
            rows.extend(decode_line(line) for line in batch if line.strip())
    yield from rows


def verify_published(directory: Path, destination: str) -> None:
    """Refuse a destination's file whose bytes are not the ones published: ``summary.json``
    names each file's SHA-256 (``outbox_sha256``), and what leaves must be what the gates
    checked (an edited value, a file swapped in). An outbox without digests (an earlier
    version's) is not checked.

    Raises:
        GateViolation: the file changed since it was published; nothing was sent.
    """
    import hashlib

    from etl.errors import GateViolation

    if not (Path(directory) / SUMMARY_FILE).exists():
        return
    name = OUTBOX_FILES[destination]
    expected = (read_summary(directory).get("outbox_sha256") or {}).get(name)
    if expected is None:
        return
    path = Path(directory) / name
    actual = hashlib.sha256(b"").hexdigest()  # a missing file is an empty one that was published
    if path.exists():
        with path.open("rb") as fh:
            actual = hashlib.file_digest(fh, "sha256").hexdigest()
    if actual != expected:
        raise GateViolation(destination, [(name, "changed since the outbox was published (its SHA-256 is not "
                                                 "summary.json's outbox_sha256); rerun the interval")])  # fmt: skip


def read_summary(directory: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((Path(directory) / SUMMARY_FILE).read_text(encoding="utf-8"))
    return result
