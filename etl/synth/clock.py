"""Clinic-local wall times for the synthetic clinic: epoch arithmetic, the zone's UTC offsets as
arrays, and ISO 8601 text (naive local, with an offset, or in UTC).

Why: every time in the files is anchored on ``end`` (no clock reads) and a million of them must
convert at once. The rules for naive local times, the spring-forward gap and the repeated hour
are SPEC section 3 (``shared/SPEC.md``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import date, datetime, time
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from etl.synth.text import _blank, _compose, _digits, _pick, _text, _where
from etl.synth.vocab import _DAY, Bools, Chars, Ints, Strings


def _epoch(moment: datetime | date) -> int:
    """Wall-clock seconds since 1970-01-01 of a naive local date or time (no zone involved)."""
    if not isinstance(moment, datetime):
        moment = datetime.combine(moment, time())
    return int((moment - datetime(1970, 1, 1)).total_seconds())


class _Clock:
    """The clinic zone's UTC offsets as arrays, so a million wall times convert at once.

    pandas ``tz_localize`` with an ``ambiguous`` array takes seconds per million values; this
    takes milliseconds and follows SPEC section 3: a wall time in the spring-forward gap shifts
    forward to the transition, an ambiguous one takes the first occurrence.
    """

    def __init__(self, tz: ZoneInfo, lo: int, hi: int) -> None:
        def offset(instant: int) -> int:
            delta = datetime.fromtimestamp(instant, tz).utcoffset()
            return int(delta.total_seconds()) if delta is not None else 0

        self.initial = current = offset(lo)
        changes: list[tuple[int, int, int]] = []
        for day in range(lo, hi, _DAY):
            if offset(day + _DAY) != current:
                a, b = day, day + _DAY  # bisect to the second of the change
                while b - a > 1:
                    mid = (a + b) // 2
                    a, b = (mid, b) if offset(mid) == current else (a, mid)
                changes.append((b, current, offset(b)))
                current = offset(b)
        self.instants = np.array([c[0] for c in changes], dtype=np.int64)
        self.before = np.array([c[1] for c in changes], dtype=np.int64)
        self.after = np.array([c[2] for c in changes], dtype=np.int64)

    def to_utc(self, local: Ints) -> Ints:
        if not len(self.instants):
            return local - self.initial
        i = np.searchsorted(self.instants + self.before, local, side="right") - 1
        at = np.maximum(i, 0)
        utc = np.maximum(local - self.after[at], self.instants[at])
        return np.where(i < 0, local - self.initial, utc)

    def wall(self, utc: Ints) -> Ints:
        if not len(self.instants):
            return utc + self.initial
        i = np.searchsorted(self.instants, utc, side="right") - 1
        return utc + np.where(i < 0, self.initial, self.after[np.maximum(i, 0)])

    def odd_days(self, lo: int, hi: int) -> list[tuple[int, list[int]]]:
        """Clock-change days in ``[lo, hi)`` (wall seconds) with the times of day to use there:
        01:30, every half hour of the gap or the repeated hour, and two ordinary times."""
        days = []
        for instant, before, after in zip(self.instants, self.before, self.after, strict=True):
            first, last = sorted((int(instant + before), int(instant + after)))
            if lo <= first < hi:
                day = first // _DAY * _DAY
                odd = range(first - day, last - day, 1800)
                days.append((day, sorted({5400, 36000, 52200, *odd})))
        return days


@functools.cache
def _time_table() -> Chars:
    sod = np.arange(_DAY)
    hms = (_digits(sod // 3600, 2), ":", _digits(sod // 60 % 60, 2), ":", _digits(sod % 60, 2))
    return _compose(_DAY, *hms)


def _stamp(seconds: Ints, sep: str, width: int = 19) -> Chars:
    """``YYYY-MM-DD HH:MM:SS`` (``sep`` between date and time) of epoch seconds, in the first 19
    columns of an ``(n, width)`` matrix."""
    days = seconds // _DAY
    first = int(days.min()) if len(days) else 0
    last = int(days.max()) if len(days) else 0
    dates = np.datetime_as_string(np.arange(first, last + 1).astype("datetime64[D]"))
    chars = np.empty((len(seconds), width), dtype=np.uint8)
    chars[:, :10] = np.frombuffer(dates.astype("S10").tobytes(), np.uint8).reshape(-1, 10)[days - first]
    chars[:, 10] = ord(sep)
    chars[:, 11:19] = _time_table()[seconds % _DAY]
    return chars


def _times(
    rng: np.random.Generator,
    clock: _Clock,
    local: Ints,
    p: Sequence[float],
    *,
    naive: Bools | None = None,
    blank: Bools | None = None,
) -> Strings:
    """ISO 8601 text: naive local (mostly, to the minute or second), with an offset, or in UTC.

    Naive values are clinic-local wall times (SPEC section 3); rows in ``naive`` (the DST edge
    cases) are always naive, so the gap and the repeated hour reach the parser unresolved.
    """
    style = _pick(rng, len(local), p)
    if naive is not None:
        style[naive] = 0
    if blank is not None:
        local = np.where(blank, 0, local)  # blank cells may hold the _NEVER sentinel
    plain = _stamp(local, " ")
    out = _where(style == 1, _text(plain), _text(plain[:, :16]))
    aware = style >= 2
    utc = clock.to_utc(local[aware])
    wall = clock.wall(utc)
    with_offset = _stamp(wall, "T", 25)
    minutes = (wall - utc) // 60
    with_offset[:, 19] = np.where(minutes < 0, ord("-"), ord("+"))
    with_offset[:, 20:22] = _digits(np.abs(minutes) // 60, 2)
    with_offset[:, 22] = ord(":")
    with_offset[:, 23:25] = _digits(np.abs(minutes) % 60, 2)
    zulu = _stamp(utc, "T", 20)
    zulu[:, 19] = ord("Z")
    shown = pc.choose(pa.array(style[aware] - 2), _text(with_offset), _text(zulu))
    out = pc.replace_with_mask(out, pa.array(aware), shown)
    return out if blank is None else _blank(out, blank)
