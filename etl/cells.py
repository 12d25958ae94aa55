"""Vectorised parsing of export cells (trimmed strings) into canonical column values.

The accepted forms are SPEC section 3: ISO 8601 timestamps, where a value without an offset is
clinic-local (a time in the spring-forward gap is read with the offset before the gap, i.e.
shifted forward by the gap's length; an ambiguous one takes its first occurrence, which is what
``zoneinfo`` does with ``fold=0``); decimal revenue with blank = 0; booleans true/false, yes/no,
y/n, 1/0 with blank = false. The dtypes are those of docs/architecture.md "Canonical frames".
Parsers return the values and a mask of the non-blank cells that could not be read; they never
raise and never show a value, so ``etl.extract`` can report every bad cell by line.

Timestamps and amounts are parsed once per distinct cell when a column repeats (appointment
slots, prices, consent dates): each parse is cell by cell, so spreading the answers for the
distinct cells back to the rows gives the same result several times faster.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, tzinfo

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

STRING = pd.StringDtype("pyarrow")
UNKNOWN_STATUS = "unknown"

_ISO = r"^\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?(?:Z|[+-]\d{2}:?\d{2})?)?$"
# an offset of hours alone (``-07``, ISO 8601's short form and PostgreSQL's text for a
# timestamptz): given its minutes, the one form Arrow and the pattern above read
_HOURS_ONLY = r"([T ]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?[+-]\d{2})$"
# "$1,200.00", "-45.50", "$-45", "1200"; accounting "(45.50)" is unwrapped before this
_AMOUNT = r"^(?:[-+]?\$?|\$[-+]?)\s*(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?$"
_TRUE = pa.array(["true", "yes", "y", "1"])
_FALSE = pa.array(["false", "no", "n", "0"])
_NULL = pa.scalar(None, pa.string())
_REPEAT_SAMPLE = 1 << 16  # leading cells that show whether a column repeats

Parsed = tuple[np.ndarray, np.ndarray]  # values, and the mask of cells that could not be read


def as_bool(mask: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A null-free arrow boolean array as a numpy bool array."""
    return np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool)


def _only(values: pa.Array, mask: np.ndarray) -> pa.Array:
    return pc.if_else(pa.array(mask), values, _NULL)


def _strings(values: pa.Array) -> pd.Series:
    return values.to_pandas(types_mapper={pa.string(): STRING}.get)


def text(values: pa.Array) -> pd.Series:
    """Trimmed strings; blank -> <NA>."""
    return _strings(pc.if_else(pc.equal(values, ""), _NULL, values))


def absent(how: str, n: int) -> object:
    """The column for a canonical field the export does not have."""
    if how == "time":
        return pd.Series(pd.NaT, index=pd.RangeIndex(n), dtype="datetime64[ns, UTC]")
    if how == "money":
        return np.zeros(n, dtype=np.float64)
    if how == "flag":
        return np.zeros(n, dtype=bool)
    return _strings(pa.nulls(n, pa.string()))


def _cast_times(values: pa.Array, *, utc: bool) -> np.ndarray:
    """ISO-shaped strings (others null) -> naive datetime64[ns]; NaT where not a real time."""
    try:
        cast = pc.cast(values, pa.timestamp("ns", "UTC" if utc else None))
    except pa.ArrowException:
        # a well-formed value that is no time (February 30, year 0001): pandas finds which
        parsed = pd.to_datetime(
            pd.Series(values.to_pandas(), dtype=object), format="ISO8601", errors="coerce", utc=utc
        )
        naive = parsed.dt.tz_localize(None) if utc else parsed
        return np.array(naive.to_numpy(dtype="datetime64[ns]"), copy=True)
    return np.array(cast.cast(pa.timestamp("ns")).to_numpy(zero_copy_only=False), copy=True)


_EARLIEST, _LATEST = np.datetime64("1900-01-01", "ns"), np.datetime64("2200-01-01", "ns")


def _localize(local: np.ndarray, tz: tzinfo) -> np.ndarray:
    """Clinic-local wall times -> naive UTC (ambiguous: first occurrence; gap: shift forward)."""
    index = pd.DatetimeIndex(local)
    # pandas localizes ~100x faster by zone name (its own tz database) than through a ZoneInfo
    zone = getattr(tz, "key", None) or tz
    aware = index.tz_localize(zone, ambiguous=np.ones(len(index), dtype=bool), nonexistent="NaT")
    out = np.array(aware.tz_convert(UTC).tz_localize(None).to_numpy(), copy=True)
    for i in np.flatnonzero(np.isnat(out) & ~np.isnat(local)).tolist():
        # in the gap, zoneinfo's fold=0 applies the offset from before the transition
        wall = pd.Timestamp(local[i]).to_pydatetime(warn=False).replace(tzinfo=tz)
        out[i] = np.datetime64(wall.astimezone(UTC).replace(tzinfo=None), "ns")
    return out


def _by_distinct(values: pa.Array | pa.ChunkedArray, parse: Callable[[pa.Array], Parsed]) -> Parsed:
    """``parse(values)``, run on the distinct cells only when the column repeats.

    Whether it repeats is judged on its leading cells (at most half of them distinct): the
    dictionary of a mostly distinct column (``updated_at``) costs more than it saves.
    """
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    head = values.slice(0, _REPEAT_SAMPLE)
    if values.null_count or 2 * len(head.unique()) > len(head):
        return parse(values)
    encoded = values.dictionary_encode()
    parsed, bad = parse(encoded.dictionary)
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    return parsed[codes], bad[codes]


def timestamps(values: pa.Array, tz: tzinfo | None) -> tuple[pd.Series, np.ndarray]:
    """ISO 8601 strings -> datetime64[ns, UTC]; offset-less values are in ``tz`` (None: UTC)."""
    result, bad = _by_distinct(values, lambda distinct: _timestamps(distinct, tz))
    return pd.Series(pd.DatetimeIndex(result).tz_localize(UTC)), bad


def _timestamps(values: pa.Array, tz: tzinfo | None) -> Parsed:
    values = pc.replace_substring_regex(values, _HOURS_ONLY, r"\1:00")
    valid = as_bool(pc.match_substring_regex(values, _ISO))
    # past the date, only an offset has a sign or a Z (plain substring tests beat a regex)
    clock = pc.utf8_slice_codeunits(values, 10)
    offset = as_bool(pc.or_(pc.ends_with(values, "Z"), pc.match_substring(clock, "+")))
    offset = valid & (offset | as_bool(pc.match_substring(clock, "-")))
    naive = valid & ~offset
    result = np.full(len(values), np.datetime64("NaT", "ns"))
    if naive.any():
        local = _cast_times(_only(values, naive), utc=False)
        result[naive] = (local if tz is None else _localize(local, tz))[naive]
    if offset.any():
        result[offset] = _cast_times(_only(values, offset), utc=True)[offset]
    # outside 1900..2199 is a typo, not a visit; near nanoseconds' end (2262) a time zone's
    # offset would also wrap around to 1677 without a word
    result[(result < _EARLIEST) | (result >= _LATEST)] = np.datetime64("NaT", "ns")
    bad = np.isnat(result) & ~as_bool(pc.equal(values, ""))
    return result, bad


def money(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Amounts like ``$1,200.00``, ``-45.50``, ``(45.50)`` -> float64; blank -> 0.0."""
    return _by_distinct(values, _money)


def _money(values: pa.Array) -> Parsed:
    blank = as_bool(pc.equal(values, ""))
    paren = as_bool(pc.and_(pc.starts_with(values, "("), pc.ends_with(values, ")")))
    inner = values
    if paren.any():
        unwrapped = pc.utf8_trim_whitespace(pc.utf8_slice_codeunits(values, 1, -1))
        inner = pc.if_else(pa.array(paren), unwrapped, values)
    ok = as_bool(pc.match_substring_regex(inner, _AMOUNT))
    ok &= as_bool(pc.match_substring_regex(inner, r"\d"))
    ok &= ~(paren & as_bool(pc.match_substring_regex(inner, r"[-+]")))
    digits = _only(pc.replace_substring_regex(inner, r"[$,\s]", ""), ok)
    try:
        numbers = pc.cast(digits, pa.float64()).to_numpy(zero_copy_only=False)
    except pa.ArrowException:
        numbers = pd.to_numeric(pd.Series(digits.to_pandas(), dtype=object), errors="coerce")
    amounts = np.where(paren, -1.0, 1.0) * np.asarray(numbers, dtype=np.float64)
    amounts[blank] = 0.0
    return amounts, ~np.isfinite(amounts)  # a 400-digit "amount" is infinite: no amount


def flag(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """true/false, yes/no, y/n, 1/0 (any case) -> bool; blank -> False."""
    lower = pc.utf8_lower(values)
    true = as_bool(pc.is_in(lower, value_set=_TRUE))
    false = as_bool(pc.is_in(lower, value_set=_FALSE)) | as_bool(pc.equal(values, ""))
    return true, ~(true | false)


def status(values: pa.Array, mapping: dict[str, str]) -> tuple[pd.Series, np.ndarray]:
    """Vendor statuses (``mapping`` keys are trimmed and casefolded) -> canonical, known mask.

    A status outside the mapping becomes ``unknown`` with ``known`` False: the caller reports it
    and the rules treat it as not attended.
    """
    keys = pa.array(list(mapping), type=pa.string())
    canonical = pa.array(list(mapping.values()), type=pa.string())
    positions = pc.index_in(pc.utf8_lower(values), value_set=keys)
    mapped = pc.fill_null(pc.take(canonical, positions), UNKNOWN_STATUS)
    return _strings(mapped), as_bool(pc.is_valid(positions))
