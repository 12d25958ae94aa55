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

import functools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, tzinfo

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
_DAY_NS = 86_400 * 10**9
# the days (since 1970, UTC) a zone's offsets are read over: the years kept, and two days beyond
_FIRST_DAY = int(_EARLIEST.astype("datetime64[D]").astype(np.int64)) - 2
_LAST_DAY = int(_LATEST.astype("datetime64[D]").astype(np.int64)) + 2


def _offset(tz: tzinfo, instant: int) -> int:
    """``tz``'s UTC offset at ``instant`` (seconds since 1970, UTC), in nanoseconds."""
    delta = datetime.fromtimestamp(instant, tz).utcoffset()
    return 0 if delta is None else delta // timedelta(microseconds=1) * 1000


@functools.lru_cache(maxsize=64)
def _steps(tz: tzinfo, first_day: int, last_day: int) -> tuple[np.ndarray, np.ndarray]:
    """The wall times (ns) at which ``tz``'s offset changes for a time read as ``zoneinfo`` does
    with ``fold=0``, over UTC days ``first_day..last_day``, and the offsets (ns), one more.

    Each change is found from the zone's own ``utcoffset`` (once a day, then a bisection to its
    second), so the rules are those of ``zoneinfo`` and the config, not pandas' copy (pytz):
    a local time before the change's later wall time keeps the earlier offset, so a time in the
    spring-forward gap shifts forward by the gap and an ambiguous one is its first occurrence.
    Offsets change at most once a day in every zone (days apart at the least since 1900).
    """
    grid = np.arange(first_day, last_day + 1, dtype=np.int64) * _DAY_NS
    # pandas calls the zone's own utcoffset for each day (and UTC -> local is the quick way)
    daily = pd.DatetimeIndex(grid.view("datetime64[ns]")).tz_localize(UTC).tz_convert(tz)
    by_day = daily.tz_localize(None).to_numpy(dtype="datetime64[ns]").view(np.int64) - grid
    walls, offsets = [], [int(by_day[0])]
    for i in np.flatnonzero(np.diff(by_day)).tolist():
        before, after = int(by_day[i]), int(by_day[i + 1])
        lo, hi = int(grid[i]) // 10**9, int(grid[i + 1]) // 10**9  # bisect to the second
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if _offset(tz, mid) == before else (lo, mid)
        walls.append(hi * 10**9 + max(before, after))
        offsets.append(after)
    return np.array(walls, dtype=np.int64), np.array(offsets, dtype=np.int64)


def _localize(local: np.ndarray, tz: tzinfo) -> np.ndarray:
    """Clinic-local wall times -> naive UTC (ambiguous: first occurrence; gap: shift forward).

    Same rules as ``zoneinfo`` (config validation, payload times): passing pandas the zone's name
    would use its own copy of the rules (pytz), which can disagree for a zone in the news; with a
    ``ZoneInfo`` object it takes seconds per million values, this takes milliseconds.
    """
    known = ~np.isnat(local)
    if not known.any():
        return np.array(local, copy=True)
    ns = local.view(np.int64)
    days = ns[known] // _DAY_NS
    first = min(max(int(days.min()) - 2, _FIRST_DAY), _LAST_DAY)
    last = max(min(int(days.max()) + 2, _LAST_DAY), first)
    walls, offsets = _steps(tz, first, last)
    # outside first..last only times _timestamps turns to NaT (the edge offset then is fine)
    out = ns - offsets[np.searchsorted(walls, ns, side="right")]
    return np.where(known, out, ns).view("datetime64[ns]")


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
