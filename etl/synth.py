"""Synthetic clinic exports for the demo, the tests and the benchmarks.

``write_synthetic_clinic`` writes one clinic folder: ``exports/appointments.csv`` and
``exports/leads.csv`` in the generic profile (the exact column names of SPEC section 3) and a
``clinic.yaml`` with exactly the keys of the issue #2 example. The people are fake (fixed lists
of common names, numbered addresses at common mail domains, generated phone numbers), but the
files are shaped like real CRM and PMS exports and carry every edge case of SPEC sections 3 and 4
at scale; ``write_synthetic_clinic`` lists them.

Same arguments, byte-identical files: one ``numpy.random.default_rng(seed)``, no clock reads,
every time anchored on ``end``. Columns are built with vectorized numpy and pyarrow compute (no
per-row Python) and written by a small RFC 4180 writer with minimal quoting, so the benchmark size
(a million appointments) takes seconds, not minutes.
"""

from __future__ import annotations

import functools
import json
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import yaml

Ints = npt.NDArray[np.int64]
Bools = npt.NDArray[np.bool_]
Strings = Any  # a pyarrow string array (pyarrow ships no type stubs)

TIMEZONE = "America/Los_Angeles"
APPOINTMENT_COLUMNS = (
    "appointment_id", "patient_id", "first_name", "last_name", "email", "phone", "zip", "city",
    "state", "country", "service", "status", "start_at", "revenue", "currency", "location_id",
    "updated_at", "consent_marketing", "consent_at", "consent_revoked_at",
)  # fmt: skip
LEAD_COLUMNS = (
    "lead_id", "created_at", "first_name", "last_name", "email", "phone", "zip", "gclid", "gbraid",
    "wbraid", "fbclid", "fbc", "fbp", "consent_marketing", "consent_at", "consent_revoked_at",
    "source", "treatment_interest", "notes", "landing_page_url",
)  # fmt: skip

_DAY = 86_400
_SPAN_DAYS = 456  # about 15 months before `end`
_CLINIC_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")

_FIRST = (
    "Sarah", "Jessica", "Emily", "Ashley", "Jennifer", "Amanda", "Melissa", "Michelle", "Nicole",
    "Stephanie", "Elizabeth", "Lauren", "Megan", "Rachel", "Samantha", "Maria", "Laura", "Heather",
    "Rebecca", "Christina", "Kimberly", "Amy", "Angela", "Lisa", "Karen", "Linda", "Susan",
    "Olivia", "Emma", "Sophia", "Isabella", "Chloe", "Grace", "Hannah", "Natalie", "Victoria",
    "Priya", "Mei", "Ana", "Camila", "Valentina", "Fatima", "Aisha", "Yuki", "Michael", "David",
    "James", "Daniel", "Kevin", "Brian", "Jason", "Ryan", "Mary Ann", "José", "Zoë", "Anne-Marie",
    "Renée", "Tess",
)  # fmt: skip
_LAST = (
    "Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Rodriguez",
    "Martinez", "Hernandez", "Lopez", "Gonzalez", "Wilson", "Anderson", "Thomas", "Taylor", "Moore",
    "Jackson", "Martin", "Lee", "Perez", "Thompson", "White", "Harris", "Sanchez", "Clark",
    "Ramirez", "Lewis", "Robinson", "Walker", "Young", "Allen", "King", "Wright", "Scott", "Torres",
    "Nguyen", "Hill", "Flores", "Green", "Adams", "Nelson", "Baker", "Rivera", "Campbell", "Kim",
    "Patel", "Chen", "Wang", "Singh", "O'Brien", "Smith-Jones", "De La Cruz", "Núñez", "Testa",
)  # fmt: skip
# test-record names sit after the real ones so a person's kind picks them by index
_TEST_FIRST = ("Test", "TEST", "Do Not Use")
_TEST_LAST = ("Patient", "Do Not Use", "test")
_DOMAINS = (
    ("gmail.com", 0.42), ("yahoo.com", 0.16), ("icloud.com", 0.12), ("outlook.com", 0.1),
    ("hotmail.com", 0.08), ("aol.com", 0.04), ("comcast.net", 0.04), ("sbcglobal.net", 0.04),
)  # fmt: skip
_TEST_DOMAINS = ("example.com", "test.com")
_GMAIL = 0
_PLUS_TAGS = ("spa", "botox", "promo", "2025", "deals")
_AREAS = (
    209, 213, 310, 323, 408, 415, 424, 510, 530, 559, 562, 619, 626, 650, 657, 661, 669, 707, 714,
    747, 760, 805, 818, 831, 858, 909, 916, 925, 949, 951,
)  # fmt: skip
_ZIPS = (
    ("94103", "San Francisco"), ("94110", "San Francisco"), ("94117", "San Francisco"),
    ("94607", "Oakland"), ("94610", "Oakland"), ("94704", "Berkeley"), ("95112", "San Jose"),
    ("94301", "Palo Alto"), ("90026", "Los Angeles"), ("90401", "Santa Monica"),
    ("91101", "Pasadena"), ("92618", "Irvine"), ("92101", "San Diego"), ("94941", "Mill Valley"),
)  # fmt: skip
_LOCATIONS = ("SR-SF-01", "SR-OAK-02", "SR-SJ-03")
# name, price in cents, weight; the names are PHI on purpose (conditions, body areas, drugs)
_SERVICES = (
    ("Botox - Forehead & Glabella", 45000, 12), ("Botox for hyperhidrosis (underarms)", 120000, 3),
    ("Dysport - Crow's Feet", 38000, 5), ("Lip Filler (Juvederm Ultra, 1 syringe)", 75000, 7),
    ("Cheek Filler - Voluma", 85000, 4), ("Sculptra", 90000, 2), ("Hydrafacial", 22500, 10),
    ("Chemical Peel - melasma", 17500, 4), ("Microneedling with PRP", 60000, 5),
    ("Laser Hair Removal - Bikini", 25000, 6), ("IPL Photofacial - rosacea", 35000, 4),
    ("CoolSculpting - Abdomen", 150000, 3), ("Morpheus8 - acne scars", 110000, 3),
    ("Kybella - Chin", 65000, 2), ("Semaglutide weight loss - monthly", 39900, 5),
    ("PRP Hair Restoration - alopecia", 80000, 2), ("Tattoo Removal", 30000, 2),
    ("Consultation", 0, 10), ("Weight loss consultation (semaglutide, BMI 32)", 0, 3),
    ("Botox touch-up", 0, 3), ('"VIP" Glow Package', 95000, 1),
)  # fmt: skip
_SERVICE_NAMES = tuple(s[0] for s in _SERVICES) + tuple(f"Refund - {s[0]}" for s in _SERVICES)
_SERVICE_PRICE = np.array([s[1] for s in _SERVICES], dtype=np.int64)

_ATT, _CANC, _LATE, _NOSHOW, _RESCHED, _SCHED, _UNKNOWN = range(7)
_STATUSES = (
    ("completed", "Completed", "COMPLETED", "Checked Out", "checked out", "Checked-Out",
     "attended", "Attended", "arrived", "Arrived", "closed", "Closed"),
    ("cancelled", "Cancelled", "CANCELLED", "canceled", "Canceled"),
    ("late cancel", "Late Cancel", "Late Cancellation", "late cancellation"),
    ("no-show", "No-Show", "no show", "No Show", "noshow", "NoShow", "missed", "Missed"),
    ("rescheduled", "Rescheduled"),
    ("booked", "Booked", "confirmed", "Confirmed", "pending", "Pending", "scheduled", "Scheduled"),
    ("In Progress", "Waitlisted", "On Hold"),
)  # fmt: skip
_STATUS_VOCAB = tuple(s for group in _STATUSES for s in group)
_STATUS_GROUP = np.array([g for g, group in enumerate(_STATUSES) for _ in group], dtype=np.int64)
_STATUS_LEN = np.array([len(group) for group in _STATUSES], dtype=np.int64)
_STATUS_OFFSET = np.concatenate([[0], np.cumsum(_STATUS_LEN)[:-1]])
_STATUS_P = (0.70, 0.09, 0.03, 0.06, 0.04, 0.05, 0.03)

_TRUE = ("yes", "Yes", "Y", "y", "1", "true", "TRUE", "True")
_FALSE = ("no", "No", "N", "n", "0", "false", "FALSE")
_GRANTED, _MISSING, _DENIED, _REVOKED, _LATE_GRANT = range(5)
_INTERESTS = (
    "Botox", "Botox for hyperhidrosis", "Lip filler", "Weight loss (semaglutide)", "Acne scars",
    "Melasma / dark spots", "Laser hair removal", "Rosacea", "Hair loss (PRP)", "CoolSculpting",
    "Not sure - wants a consult",
)  # fmt: skip
_NOTES = (
    "Has hyperhidrosis, asked about Botox pricing", "Pregnant - wants to wait until after delivery",
    "On Accutane until March; advised to wait", "Allergic to lidocaine",
    'Asked for "Dr. Patel" specifically', "Called twice.\nPrefers evenings, text only",
    "Referred by an existing patient", "Diabetic - semaglutide questions",
    "Interested in financing, payment plan?",
)  # fmt: skip
_PAGES = (
    ("botox", "hyperhidrosis"), ("botox", "forehead-lines"), ("fillers", "lips"),
    ("weight-loss", "semaglutide"), ("laser", "hair-removal"), ("skin", "acne-scars"),
    ("skin", "melasma"),
)  # fmt: skip
_GOOGLE_SOURCES = ("Google Ads", "google / cpc")
_META_SOURCES = ("Facebook", "Instagram", "facebook / paid")
_OTHER_SOURCES = ("Organic Search", "Referral", "Phone Call", "Website", "Yelp")
_B64URL = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", dtype=np.uint8)


@dataclass(frozen=True)
class SynthResult:
    """Where the synthetic clinic was written and how big it is."""

    config_path: Path
    appointments_path: Path
    leads_path: Path
    appointment_rows: int
    lead_rows: int
    appointment_ids: int  # distinct ids; the rest of the rows are re-exports
    lead_ids: int
    people: int


@dataclass(frozen=True)
class _Sizes:
    lead_people: int
    extra_leads: int
    lead_reexports: int
    conv: int  # lead people whose journey has an appointment after the lead
    existing: int  # lead people with an attended visit 30-330 days before their first lead
    after: int  # lead people whose lead came 0-5 days after their (only) visit
    walkin: int
    follow: int
    reexports: int


def _sizes(appointments: int, leads: int) -> _Sizes:
    lead_re = round(leads * 0.005) if leads >= 200 else 0
    unique_leads = leads - lead_re
    lead_people = min(unique_leads, max(1, round(leads * 0.9)))
    dups = round(appointments * 0.01) if appointments >= 200 else 0
    base = appointments - dups
    conv = min(round(lead_people * 0.5), base)
    existing = min(round(lead_people * 0.07), base - conv)
    after = min(round(lead_people * 0.03), base - conv - existing, lead_people - conv)
    remaining = base - conv - existing - after
    target = round(base / 2.8) - (conv + existing + after)
    walkin = min(remaining, max(target, (remaining + 9) // 10))
    return _Sizes(
        lead_people, unique_leads - lead_people, lead_re, conv, existing, after, walkin,
        remaining - walkin, dups,
    )  # fmt: skip


# string building: numpy index arrays and ASCII matrices in, pyarrow string arrays out (pyarrow's
# string kernels and strftime cost seconds per million rows on a slow machine; gathers do not)

Chars = npt.NDArray[np.uint8]


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


# CSV writing


# columns whose values can hold a comma, a quote or a line break; the others are built from
# digits, letters and URL characters only (tests read every file back with the csv module)
_FREE_TEXT = frozenset(
    ("first_name", "last_name", "city", "service", "status", "revenue", "source",
     "treatment_interest", "notes", "landing_page_url")
)  # fmt: skip


def _csv_field(values: Strings) -> Strings:
    special = pc.fill_null(pc.match_substring_regex(values, '[",\r\n]'), False)
    if not pc.any(special).as_py():
        return values
    return pc.if_else(special, _join('"', pc.replace_substring(values, '"', '""'), '"'), values)


def _write_csv(path: Path, columns: dict[str, Strings], chunk: int = 200_000) -> None:
    """RFC 4180 with minimal quoting (like ``csv.QUOTE_MINIMAL``), UTF-8, ``\\n`` line ends."""
    rows = len(next(iter(columns.values())))
    with path.open("wb") as out:
        out.write((",".join(columns) + "\n").encode("utf-8"))
        for lo in range(0, rows, chunk):
            fields = [
                _csv_field(col.slice(lo, chunk)) if name in _FREE_TEXT else col.slice(lo, chunk)
                for name, col in columns.items()
            ]
            blank_is_empty = {"null_handling": "replace", "null_replacement": ""}
            fields[-1] = pc.binary_join_element_wise(fields[-1], "\n", "", **blank_is_empty)
            lines = pc.binary_join_element_wise(*fields, ",", **blank_is_empty)
            # the value buffer of the joined array is exactly the text of these lines
            offsets = np.frombuffer(lines.buffers()[1], dtype=np.int32)
            first, last = offsets[lines.offset], offsets[lines.offset + len(lines)]
            out.write(memoryview(lines.buffers()[2])[first:last])


# the population and its events


@dataclass(frozen=True)
class _People:
    first: Ints  # index into _FIRST + _TEST_FIRST
    last: Ints  # index into _LAST + _TEST_LAST
    domain: Ints  # index into _DOMAINS + _TEST_DOMAINS
    sep: Ints  # index into _SEPS: how the canonical address joins first and last name
    phone: Ints  # ten digits
    alt_phone: Ints  # ten digits, distinct from every ``phone``
    zip: Ints  # index into _ZIPS
    location: Ints
    consent: Ints  # _GRANTED, _MISSING, _DENIED, _REVOKED or _LATE_GRANT
    alt_email: Bools  # the lead gives another address than the PMS: linked by phone only
    other_phone: Bools  # the PMS has another number than the lead: linked by email only
    crm_revoke: Bools  # a revocation is also written onto the person's leads


_SEPS = ("", ".", "_")


def _make_people(rng: np.random.Generator, n: int, lead_people: int) -> _People:
    first = rng.integers(0, len(_FIRST), n)
    last = rng.integers(0, len(_LAST), n)
    domain = _pick(rng, n, [w for _, w in _DOMAINS])
    sep = np.where(domain == _GMAIL, rng.integers(0, 2, n), _pick(rng, n, (3, 5, 2)))
    # test records of SPEC rule 1, one kind after the other, among lead people and walk-ins
    picked = [
        lo + rng.choice(hi - lo, max(12, round((hi - lo) * 0.002)), replace=False)
        for lo, hi in ((0, lead_people), (lead_people, n))
        if hi - lo >= 50
    ]
    tests = np.concatenate([np.zeros(0, np.int64), *picked])
    kind = np.concatenate([np.zeros(0, np.int64), *(np.arange(len(p)) % 6 for p in picked)])
    domain[tests[kind == 0]] = len(_DOMAINS)
    domain[tests[kind == 1]] = len(_DOMAINS) + 1
    first[tests[kind == 2]] = len(_FIRST)
    first[tests[kind == 3]] = len(_FIRST) + 2
    last[tests[kind == 4]] = len(_LAST) + 1
    first[tests[kind == 5]], last[tests[kind == 5]] = len(_FIRST) + 1, len(_LAST) + 2
    # an affine bijection over (area code, exchange, line) gives everyone their own number
    space = len(_AREAS) * 800 * 10_000
    k = (np.arange(2 * n, dtype=np.int64) * 2_654_435_761 + int(rng.integers(0, space))) % space
    digits = np.array(_AREAS)[k // 8_000_000] * 10**7 + (200 + k // 10_000 % 800) * 10**4 + k % 10_000
    alt_email = (np.arange(n) < lead_people) & (rng.random(n) < 0.06)
    alt_email[tests] = False  # keep the test addresses in the leads
    return _People(
        first, last, domain, sep, digits[:n], digits[n:], rng.integers(0, len(_ZIPS), n),
        rng.integers(0, len(_LOCATIONS), n), _pick(rng, n, (68, 14, 6, 6, 6)), alt_email,
        ~alt_email & (rng.random(n) < 0.05), rng.random(n) < 0.3,
    )  # fmt: skip


_CONV, _EXISTING, _AFTER, _WALKIN, _FOLLOW = range(5)


@dataclass(frozen=True)
class _Plan:
    first_lead: Ints  # per lead person
    lead_person: Ints
    lead_created: Ints
    lead_clicks_from: Ints  # a duplicate form fill repeats the click IDs of this lead
    lead_naive: Bools
    appt_person: Ints
    appt_start: Ints
    appt_kind: Ints
    appt_anchor: Ints  # the visit a follow-up (or refund) comes after
    appt_naive: Bools


def _slot(rng: np.random.Generator, moments: Ints) -> Ints:
    """A 15-minute booking slot between 09:00 and 18:45 on the local day of each moment."""
    return moments // _DAY * _DAY + 9 * 3600 + rng.integers(0, 40, len(moments)) * 900


def _lead_tod(rng: np.random.Generator, n: int) -> Ints:
    """Forms arrive day and night, most in the afternoon and evening."""
    tod = np.where(rng.random(n) < 0.8, rng.normal(14.5 * 3600, 3.5 * 3600, n), rng.uniform(0, _DAY, n))
    return np.clip(tod, 0, _DAY - 1).astype(np.int64)


def _plan(rng: np.random.Generator, s: _Sizes, end_s: int, dst: list[tuple[int, list[int]]]) -> _Plan:
    span = end_s - _SPAN_DAYS * _DAY
    n_lp = s.lead_people
    t0 = span + rng.integers(0, _SPAN_DAYS, n_lp) * _DAY + _lead_tod(rng, n_lp)
    perm = rng.permutation(n_lp)
    conv, after, others = perm[: s.conv], perm[s.conv : s.conv + s.after], perm[s.conv + s.after :]
    # days from lead to visit: mostly soon, some late in the window, some after it (90-200)
    kind = _pick(rng, s.conv, (65, 25, 10))
    delay = np.select(
        [kind == 0, kind == 1],
        [1 + np.minimum(rng.exponential(9, s.conv), 88), rng.uniform(10, 89, s.conv)],
        rng.uniform(90, 200, s.conv),
    )
    conv_start = _slot(rng, t0[conv] + (delay * _DAY).astype(np.int64))
    conv_start = np.where(conv_start <= t0[conv], conv_start + _DAY, conv_start)
    far = conv_start > end_s + 60 * _DAY
    conv_start[far] = _slot(rng, t0[conv[far]] + rng.integers(1, 30, int(far.sum())) * _DAY)
    conv_naive, lead_naive = np.zeros(s.conv, dtype=bool), np.zeros(n_lp, dtype=bool)
    # conversions and night-time form fills at every odd time of the clock-change days
    k_conv, k_lead = max(1, round(s.conv * 0.0004)), max(1, round(n_lp * 0.0004))
    c = f = 0
    for day, tods in dst:
        for tod in tods:
            if c + k_conv <= s.conv:
                conv_start[c : c + k_conv] = day + tod
                before = day - rng.integers(1, 20, k_conv) * _DAY + _lead_tod(rng, k_conv)
                t0[conv[c : c + k_conv]] = np.maximum(before, span)
                conv_naive[c : c + k_conv], c = True, c + k_conv
            if f + k_lead <= len(others):
                t0[others[f : f + k_lead]], lead_naive[others[f : f + k_lead]] = day + tod, True
                f += k_lead
    eligible = np.flatnonzero(t0 >= span + 60 * _DAY)
    pool = eligible if len(eligible) >= s.existing else np.arange(n_lp)
    existing = rng.choice(pool, s.existing, replace=False)
    room = np.clip((t0[existing] - span) // _DAY, 31, 330)
    ex_start = _slot(rng, t0[existing] - rng.integers(30, room) * _DAY)
    af_start = _slot(rng, t0[after] - rng.integers(0, 6, s.after) * _DAY)
    af_start = np.where(af_start >= t0[after], af_start - _DAY, af_start)
    walkin = n_lp + np.arange(s.walkin)
    wk_start = _slot(rng, span + rng.integers(0, _SPAN_DAYS + 21, s.walkin) * _DAY)
    wk_naive = np.zeros(s.walkin, dtype=bool)
    k_walk = max(2, round(s.walkin * 0.001))
    for i, (day, tods) in enumerate(dst):
        if (i + 1) * k_walk <= s.walkin:
            rows = slice(i * k_walk, (i + 1) * k_walk)
            wk_start[rows] = day + np.array(tods)[np.arange(k_walk) % len(tods)]
            wk_naive[rows] = True
    a_person = np.concatenate([conv, existing, after, walkin]).astype(np.int64)
    a_start = np.concatenate([conv_start, ex_start, af_start, wk_start])
    a_kind = np.repeat([_CONV, _EXISTING, _AFTER, _WALKIN], [s.conv, s.existing, s.after, s.walkin])
    n_a = len(a_person)
    pick = rng.integers(0, max(n_a, 1), s.follow)
    gap = 1 + np.minimum(rng.exponential(70, s.follow), 400).astype(np.int64)
    f_start = _slot(rng, a_start[pick] + gap * _DAY)
    limit = end_s + 30 * _DAY
    late = np.flatnonzero(f_start >= limit)
    room = np.maximum((limit - a_start[pick[late]]) // _DAY, 2)
    f_start[late] = _slot(rng, a_start[pick[late]] + rng.integers(1, room) * _DAY)
    # more leads of the same people: duplicate fills, later leads inside and after the window
    n_x = s.extra_leads
    p = rng.integers(0, max(n_lp, 1), n_x)
    x_kind = _pick(rng, n_x, (30, 40, 30))
    offset = np.select(
        [x_kind == 0, x_kind == 1],
        [rng.integers(30, 2700, n_x), rng.integers(1, 90, n_x) * _DAY + rng.integers(0, _DAY, n_x)],
        rng.integers(90, 300, n_x) * _DAY + rng.integers(0, _DAY, n_x),
    )
    created = t0[p] + offset
    late = np.flatnonzero(created >= end_s)
    created[late] = np.minimum(t0[p[late]] + rng.integers(30, 2700, len(late)), end_s - 1)
    x_kind[late] = 0
    return _Plan(
        first_lead=t0,
        lead_person=np.concatenate([np.arange(n_lp), p]).astype(np.int64),
        lead_created=np.concatenate([t0, created]),
        lead_clicks_from=np.concatenate([np.arange(n_lp), np.where(x_kind == 0, p, n_lp + np.arange(n_x))]),
        lead_naive=np.concatenate([lead_naive, np.zeros(n_x, dtype=bool)]),
        appt_person=np.concatenate([a_person, a_person[pick]]),
        appt_start=np.concatenate([a_start, f_start]),
        appt_kind=np.concatenate([a_kind, np.full(s.follow, _FOLLOW)]).astype(np.int64),
        appt_anchor=np.concatenate([np.arange(n_a), pick]).astype(np.int64),
        appt_naive=np.concatenate(
            [conv_naive, np.zeros(s.existing + s.after, bool), wk_naive, np.zeros(s.follow, bool)]
        ),
    )


@dataclass(frozen=True)
class _Appts:
    """Final appointment rows: base rows by ``start_at``, then the re-exported copies."""

    person: Ints
    start: Ints
    updated: Ints
    status: Ints  # index into _STATUS_VOCAB
    service: Ints  # index into _SERVICE_NAMES
    cents: Ints
    blank_revenue: Bools
    naive: Bools
    source_row: Ints  # the base row a row copies (itself for base rows)
    base_rows: int


def _statuses(rng: np.random.Generator, group: Ints) -> Ints:
    return _STATUS_OFFSET[group] + (rng.random(len(group)) * _STATUS_LEN[group]).astype(np.int64)


def _appointment_facts(rng: np.random.Generator, plan: _Plan, s: _Sizes, end_s: int) -> _Appts:
    person, start, kind, anchor = (
        plan.appt_person,
        plan.appt_start.copy(),
        plan.appt_kind,
        plan.appt_anchor,
    )
    n = len(person)
    past = start < end_s
    group = _pick(rng, n, _STATUS_P)
    group[np.isin(kind, (_EXISTING, _AFTER)) | (plan.appt_naive & (kind == _CONV))] = _ATT
    group[~past] = _SCHED
    status = _statuses(rng, group)
    # every spelling of the vocabulary (and the unknown ones) at least once
    free = np.flatnonzero((kind == _FOLLOW) & past)
    forced = np.zeros(n, dtype=bool)
    if len(free) >= 3 * len(_STATUS_VOCAB):
        rows = rng.choice(free, len(_STATUS_VOCAB), replace=False)
        status[rows], group[rows], forced[rows] = np.arange(len(_STATUS_VOCAB)), _STATUS_GROUP, True
    service = _pick(rng, n, [w for *_, w in _SERVICES])
    price = _SERVICE_PRICE[service]
    fee, charged = rng.random(n), np.array([1.0, 1.0, 1.0, 1.5, 2.0])[rng.integers(0, 5, n)]
    cents = np.select(
        [group == _ATT, group == _LATE, group == _NOSHOW, group == _UNKNOWN],
        [
            np.round(price * charged / 500).astype(np.int64) * 500,
            np.where((fee < 0.65) | forced, rng.choice([5000, 7500, 10000], n), 0),
            np.where(fee < 0.15, 5000, 0),
            np.where(fee < 0.3, price, 0),
        ],
        0,
    ).astype(np.int64)
    blank = np.where(cents == 0, rng.random(n) < 0.85, (group == _ATT) & (rng.random(n) < 0.04))
    # refunds: a separate row 1-21 days after a paid visit, and a few netted into a later visit
    paid = (group[anchor] == _ATT) & (cents[anchor] > 0) & (start[anchor] < end_s - 25 * _DAY)
    cand = np.flatnonzero((kind == _FOLLOW) & ~forced & paid)
    refund = rng.choice(cand, min(len(cand), max(2, round(n * 0.004))), replace=False)
    src = anchor[refund]
    start[refund] = _slot(rng, start[src] + rng.integers(1, 22, len(refund)) * _DAY)
    group[refund], status[refund] = _ATT, _statuses(rng, np.full(len(refund), _ATT))
    service[refund] = len(_SERVICES) + service[src]
    cents[refund] = -np.where(rng.random(len(refund)) < 0.6, cents[src], cents[src] // 200 * 100)
    blank[refund] = False
    netted = np.zeros(n, dtype=bool)
    netted[refund] = True
    cand = np.flatnonzero((kind == _FOLLOW) & ~forced & ~netted & (group == _ATT) & past)
    net = rng.choice(cand, min(len(cand), max(2, round(n * 0.002))), replace=False)
    cents[net], blank[net] = -rng.integers(50, 300, len(net)) * 100, False
    updated = np.select(
        [np.isin(group, (_CANC, _RESCHED)), group == _SCHED],
        [
            start - rng.integers(3600, 3 * _DAY, n),
            start - rng.integers(1, 30, n) * _DAY - rng.integers(0, _DAY, n),
        ],
        start + rng.integers(1800, 6 * 3600, n),
    )
    updated = np.minimum(updated, end_s - rng.integers(60, 3600, n))
    order = np.argsort(start, kind="stable")
    person, start, updated, group = person[order], start[order], updated[order], group[order]
    status, service, cents, blank = status[order], service[order], cents[order], blank[order]
    naive = plan.appt_naive[order]
    # re-exports: booked -> completed (the older copy comes later in the file) and
    # completed -> cancelled (the newer copy comes later)
    ok = np.flatnonzero((group == _ATT) & (cents > 0) & (start < end_s - 2 * _DAY))
    pool = ok if len(ok) else np.arange(n)
    again = rng.choice(pool, s.reexports, replace=len(pool) < s.reexports)
    up = rng.random(len(again)) < 0.5
    x_updated = np.where(
        up,
        start[again] - rng.integers(1, 20, len(again)) * _DAY,
        np.minimum(updated[again] + rng.integers(3600, 10 * _DAY, len(again)), end_s - 60),
    )
    rows = np.concatenate([np.arange(n), again])
    return _Appts(
        person=person[rows],
        start=start[rows],
        updated=np.concatenate([updated, x_updated]),
        status=np.concatenate([status, _statuses(rng, np.where(up, _SCHED, _CANC))]),
        service=service[rows],
        cents=np.concatenate([cents, np.zeros(len(again), dtype=np.int64)]),
        blank_revenue=np.concatenate([blank, rng.random(len(again)) < 0.7]),
        naive=naive[rows],
        source_row=rows,
        base_rows=n,
    )


_NEVER = np.iinfo(np.int64).max // 4


@dataclass(frozen=True)
class _Consent:
    grant: Ints  # per person: the PMS intake authorization, or _NEVER
    revoke: Ints  # per person, or _NEVER


def _consent(rng: np.random.Generator, people: _People, plan: _Plan, a: _Appts, end_s: int) -> _Consent:
    """Person-level authorization times (SPEC rule 6): signed at intake, after the visit, or
    never; revoked 1 week to 8 months after the first grant for the revoking share."""
    n = len(people.consent)
    first_visit = np.full(n, _NEVER, dtype=np.int64)
    np.minimum.at(first_visit, a.person[: a.base_rows], a.start[: a.base_rows])
    state = people.consent
    grant = np.where(
        state == _LATE_GRANT,
        first_visit + rng.integers(1, 30, n) * _DAY,
        first_visit - rng.integers(5, 30, n) * 60,
    )
    ok = (first_visit < _NEVER) & (grant < end_s) & np.isin(state, (_GRANTED, _REVOKED, _LATE_GRANT))
    grant = np.where(ok, grant, _NEVER)
    first_lead = np.full(n, _NEVER, dtype=np.int64)
    first_lead[: len(plan.first_lead)] = plan.first_lead
    basis = np.minimum(first_lead, grant)
    revoke = basis + rng.integers(7, 240, n) * _DAY
    revoke = np.where((state == _REVOKED) & (basis < _NEVER) & (revoke < end_s), revoke, _NEVER)
    return _Consent(grant, revoke)


def _flags(rng: np.random.Generator, truthy: Bools, blank: Bools) -> Strings:
    """consent_marketing as people export it: yes/Y/1/true/... and no/N/0/false/..., or blank."""
    idx = np.where(
        truthy,
        rng.integers(0, len(_TRUE), len(truthy)),
        len(_TRUE) + rng.integers(0, len(_FALSE), len(truthy)),
    )
    return _take(_TRUE + _FALSE, idx, blank)


# columns


_FIRST_ALL, _LAST_ALL = _FIRST + _TEST_FIRST, _LAST + _TEST_LAST
_DOMAIN_ALL = tuple(d for d, _ in _DOMAINS) + _TEST_DOMAINS


def _emails(rng: np.random.Generator, people: _People, person: Ints, form: Ints) -> Strings:
    """Addresses of ``person`` in a form: 0 canonical, 1 no dot, 2 dotted, 3 plus tag, 4 dotted
    with plus tag (1-4 only for Gmail), 5 another address (initial + last name, other domain)."""
    first = _take(tuple(_email_local(name) for name in _FIRST_ALL), people.first[person])
    last = _take(tuple(_email_local(name) for name in _LAST_ALL), people.last[person])
    number = _num(person + 1)
    sep = np.select([form == 0, np.isin(form, (2, 4))], [people.sep[person], 1], 0)
    plus = _take(tuple("+" + tag for tag in _PLUS_TAGS), rng.integers(0, 5, len(form)))
    plus = pc.if_else(pa.array(np.isin(form, (3, 4))), plus, "")
    usual = _join(
        first, _take(_SEPS, sep), last, number, plus, "@", _take(_DOMAIN_ALL, people.domain[person])
    )
    other = _join(
        pc.utf8_slice_codeunits(first, 0, 1), last, number, "@",
        _take(("yahoo.com", "outlook.com", "icloud.com"), rng.integers(0, 3, len(form))),
    )  # fmt: skip
    return _where(form == 5, other, usual)


def _zips(rng: np.random.Generator, idx: Ints, plus4: float, blank: float) -> Strings:
    zips = _take(tuple(z for z, _ in _ZIPS), idx)
    u = rng.random(len(idx))
    plus = _text(_digits(rng.integers(0, 10_000, len(idx)), 4))
    zips = _where(u < plus4, _join(zips, "-", plus), zips)
    return _blank(zips, u > 1 - blank)


def _patient_numbers(rng: np.random.Generator, a: _Appts, people: int) -> Ints:
    """Patient numbers in order of first visit; 2% of patients have a second (duplicate) chart
    used on about half of their later visits (linked back by email or phone only)."""
    base = a.person[: a.base_rows]
    seen, first_row = np.unique(base, return_index=True)
    number = np.zeros(people, dtype=np.int64)
    number[seen[np.argsort(first_row)]] = np.arange(1, len(seen) + 1)
    twice = np.flatnonzero(np.bincount(base, minlength=people) >= 2)
    chart2 = np.zeros(people, dtype=np.int64)
    charts = rng.choice(twice, min(len(twice), max(1, round(len(seen) * 0.02))), replace=False)
    chart2[charts] = len(seen) + 1 + np.arange(len(charts))
    later = np.ones(a.base_rows, dtype=bool)
    later[first_row] = False
    second = (chart2[base] > 0) & later & (rng.random(a.base_rows) < 0.5)
    return np.where(second, chart2[base], number[base])[a.source_row]


def _appointment_columns(
    rng: np.random.Generator, people: _People, a: _Appts, consent: _Consent, clock: _Clock
) -> dict[str, Strings]:
    n, person = len(a.person), a.person
    u = rng.random((6, n))
    phone = np.where(people.other_phone[person], people.alt_phone[person], people.phone[person])
    email = _cased(rng, _emails(rng, people, person, np.zeros(n, np.int64)), 0.02, 0.0)
    email = _garbled(rng, email, 0.005)
    city = _cased(rng, _take(tuple(c for _, c in _ZIPS), people.zip[person]), 0.0, 0.03)
    location = np.where(u[2] < 0.1, rng.integers(0, 3, n), people.location[person])
    grant, revoke = consent.grant[person], consent.revoke[person]
    no_cells = u[5] < 0.03  # consent never captured on these rows
    has_grant = grant < _NEVER
    flag_blank = no_cells | (~has_grant & (people.consent[person] != _DENIED) & (u[4] < 0.8))
    # after a revocation some PMSs clear the flag, others keep it and add the revocation date
    truthy = has_grant & ~((revoke < _NEVER) & (u[4] < 0.5))
    return {
        "appointment_id": _ids("APT-", a.source_row + 1, 7),
        "patient_id": _ids("PT-", _patient_numbers(rng, a, len(people.consent)), 6),
        "first_name": _cased(rng, _take(_FIRST_ALL, people.first[person]), 0.03, 0.0),
        "last_name": _cased(rng, _take(_LAST_ALL, people.last[person]), 0.03, 0.0),
        "email": _blank(email, u[0] < 0.04),
        "phone": _phones(rng, phone, u[1] < 0.01, (u[1] >= 0.01) & (u[1] < 0.03)),
        "zip": _zips(rng, people.zip[person], 0.08, 0.03),
        "city": _blank(city, u[2] < 0.03),
        "state": _take(("CA", "ca", "California"), _pick(rng, n, (90, 4, 3)), u[2] > 0.97),
        "country": _take(("US", "us", "USA"), _pick(rng, n, (85, 3, 2)), u[3] < 0.1),
        "service": _take(_SERVICE_NAMES, a.service),
        "status": _take(_STATUS_VOCAB, a.status),
        "start_at": _times(rng, clock, a.start, (82, 6, 8, 4), naive=a.naive),
        "revenue": _money(rng, a.cents, a.blank_revenue),
        "currency": _take(("USD",), np.zeros(n, np.int64), u[3] > 0.92),
        "location_id": _take(_LOCATIONS, location),
        "updated_at": _times(rng, clock, a.updated, (15, 70, 10, 5)),
        "consent_marketing": _flags(rng, truthy, flag_blank),
        "consent_at": _times(rng, clock, grant, (20, 65, 10, 5), blank=~has_grant | no_cells),
        "consent_revoked_at": _times(
            rng, clock, revoke, (20, 65, 10, 5), blank=(revoke >= _NEVER) | no_cells
        ),
    }


def _landing_pages(clinic_id: str) -> tuple[str, ...]:
    pages = []
    for query in (
        "?utm_source=google&utm_medium=cpc&utm_campaign={0}&utm_content={1}",
        "?utm_source=facebook&utm_medium=paid_social&utm_campaign={0}&utm_content={1}",
        "",
    ):
        pages += [f"https://{clinic_id}.example/{slug}" + query.format(slug, c) for slug, c in _PAGES]
    return tuple(pages)


def _click_ids(rng: np.random.Generator, created_ms: Ints, same: Ints) -> dict[str, tuple[Chars, Bools]]:
    """gclid on half the leads, gbraid/wbraid on some others, fbclid on ~30%, ``fbc`` for 70% of
    those and ``fbp`` for many; a duplicate fill (``same`` points at its first lead) repeats them."""
    n = len(same)
    u = rng.random((5, n))[:, same]
    google = u[0] < 0.5
    gbraid, wbraid = ~google & (u[1] < 0.1), ~google & (u[1] >= 0.1) & (u[1] < 0.16)
    fbclid = ~google & (u[2] < 0.6)
    click_ms = (created_ms - rng.integers(1000, 600_000, n))[same]
    visit_ms = (created_ms - rng.integers(0, 30 * _DAY * 1000, n))[same]
    browser = _digits(rng.integers(10**9, 10**10, n)[same], 10)
    fbclid_chars = _compose(n, "IwAR", _tokens(rng, n, 57)[same])
    return {
        "gclid": (_compose(n, "Cj0KCQjw", _tokens(rng, n, 76)[same], "_BwE"), google),
        "gbraid": (_compose(n, "0AAAAADx", _tokens(rng, n, 40)[same]), gbraid),
        "wbraid": (_compose(n, "CjkKCQjw", _tokens(rng, n, 48)[same]), wbraid),
        "fbclid": (fbclid_chars, fbclid),
        "fbc": (_compose(n, "fb.1.", _digits(click_ms, 13), ".", fbclid_chars), fbclid & (u[3] < 0.7)),
        "fbp": (
            _compose(n, "fb.1.", _digits(visit_ms, 13), ".", browser),
            np.where(fbclid, u[4] < 0.85, u[4] < 0.25),
        ),
    }


def _lead_columns(
    rng: np.random.Generator,
    people: _People,
    plan: _Plan,
    consent: _Consent,
    s: _Sizes,
    clinic_id: str,
    clock: _Clock,
) -> dict[str, Strings]:
    order = np.argsort(plan.lead_created, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    person, created, n = plan.lead_person[order], plan.lead_created[order], len(order)
    clicks = _click_ids(rng, clock.to_utc(created) * 1000, rank[plan.lead_clicks_from[order]])
    u = rng.random((6, n))
    gmail = people.domain[person] == _GMAIL
    form = np.where(gmail, _pick(rng, n, (45, 20, 15, 12, 8)), 0)
    form[people.alt_email[person]] = 5
    email = _garbled(rng, _cased(rng, _emails(rng, people, person, form), 0.03, 0.0), 0.01)
    email = _blank(_where(u[0] < 0.02, _join(" ", email, " "), email), (u[0] > 0.97) & (form != 5))
    sure = people.alt_email[person]  # linked by phone only: keep that phone usable
    state, revoke = people.consent[person], consent.revoke[person]
    revoked_before = created >= revoke
    truthy = np.isin(state, (_GRANTED, _REVOKED)) & ~revoked_before
    blank_flag = (state == _LATE_GRANT) | ((state == _MISSING) & (u[1] < 0.8))
    show_revoke = people.crm_revoke[person] & (revoke < _NEVER) & ~revoked_before
    channel = np.where(clicks["fbclid"][1], 1, 2)
    channel[clicks["gclid"][1] | clicks["gbraid"][1] | clicks["wbraid"][1]] = 0
    source = np.choose(channel, [rng.integers(0, 2, n), rng.integers(2, 5, n), rng.integers(5, 10, n)])
    page = channel * len(_PAGES) + rng.integers(0, len(_PAGES), n)
    columns = {
        "lead_id": _ids("LD-", np.arange(1, n + 1), 7),
        "created_at": _times(rng, clock, created, (10, 75, 10, 5), naive=plan.lead_naive[order]),
        "first_name": _cased(rng, _take(_FIRST_ALL, people.first[person]), 0.02, 0.04),
        "last_name": _cased(rng, _take(_LAST_ALL, people.last[person]), 0.02, 0.04),
        "email": email,
        "phone": _phones(rng, people.phone[person], (u[2] < 0.03) & ~sure, (u[2] > 0.96) & ~sure),
        "zip": _zips(rng, people.zip[person], 0.05, 0.35),
        **{name: _blank(_text(chars), ~on) for name, (chars, on) in clicks.items()},
        "consent_marketing": _flags(rng, truthy, blank_flag),
        "consent_at": _times(rng, clock, created, (10, 75, 10, 5), blank=~truthy),
        "consent_revoked_at": _times(rng, clock, revoke, (10, 75, 10, 5), blank=~show_revoke),
        "source": _take(_GOOGLE_SOURCES + _META_SOURCES + _OTHER_SOURCES, source),
        "treatment_interest": _take(_INTERESTS, rng.integers(0, len(_INTERESTS), n), u[3] > 0.9),
        "notes": _take(_NOTES, rng.integers(0, len(_NOTES), n), u[4] < 0.75),
        "landing_page_url": _take(_landing_pages(clinic_id), page, u[5] > 0.92),
    }
    # re-exported leads (same lead_id, later in the file): the phone was confirmed on a callback
    again = rng.choice(n, min(n, s.lead_reexports), replace=False)
    copies = {name: values.take(pa.array(again)) for name, values in columns.items()}
    copies["phone"] = _text(_compose(len(again), "+1", _digits(people.phone[person[again]], 10)))
    copies["notes"] = pa.array(["Phone confirmed on callback"] * len(again), pa.string())
    return {name: pa.concat_arrays([columns[name], copies[name]]) for name in columns}


_CLINIC_YAML = """\
clinic_id: @CLINIC_ID@
timezone: America/Los_Angeles
currency: USD
default_region: US
sources:
  appointments: {path: exports/appointments.csv, profile: generic}
  leads: {path: exports/leads.csv, profile: generic}
rules:
  attribution_window_days: 90
  value_window_days: 30
  existing_patient_lookback_days: 365
  late_arrival_days: 7
  suppression_lookback_days: 365
  suppression_requires_consent: true
  consultation_value: null
exclude:
  email_domains: [example.com, test.com]
  name_patterns: ["^test$", "^do not use$"]
google_ads:
  customer_id: "1234567890"
  conversion_actions:
    consultation: customers/1234567890/conversionActions/111
    purchase: customers/1234567890/conversionActions/222
  suppression_user_list: customers/1234567890/userLists/333
  enhanced_conversions_for_leads: true
  click_window_days: 90
meta:
  pixel_id: "123456789012345"
  suppression_audience_id: "23850000000000000"
  event_names: {consultation: ConsultationAttended, purchase: Purchase}
  action_source: physical_store
  max_event_age_days: 62
"""


def write_synthetic_clinic(
    out_dir: Path,
    *,
    appointments: int,
    leads: int,
    seed: int,
    end: date = date(2026, 11, 23),
    clinic_id: str = "sunrise-medspa",
) -> SynthResult:
    """Write ``exports/appointments.csv``, ``exports/leads.csv`` and ``clinic.yaml`` of a fake clinic.

    About ``leads * 0.9`` people have leads, the rest of the leads are their duplicate form fills
    and later leads (inside and after the 90-day window); walk-in patients without a lead fill the
    appointments up to about 2.8 visits per patient. Events span the 456 days before ``end``
    (local midnight), plus bookings up to 60 days after it. Edge cases, all at scale:

    - people: half of the lead people book after their lead (some after the window, some on the
      clock-change days at 01:30, in the gap or the repeated hour); 7% attended 30-330 days
      before their first lead (existing patients); 3% filled the form 0-5 days after a visit;
      ``patient_id`` is shared by a patient's visits, 2% of patients have a second chart;
    - identifiers: Gmail dot and plus variants between lead and PMS, case and space noise, 6% of
      lead people give another address (linked by phone only), 5% another PMS phone (email only),
      phones as ``(415) 555-0123``, ``415.555.0123``, ``+1 415 555 0123``, ``4155550123`` ...,
      some invalid or blank; unusable addresses (``x@gmail``, ``n/a``); ZIP+4, ``California``/``USA``
      spellings;
    - test records (example.com, test.com, ``Test``, ``Do Not Use``) in both files;
    - statuses: every spelling of the generic vocabulary in mixed case plus unknown ones; late
      cancels and no-shows with a fee; refunds as separate negative rows and netted into a later
      visit; revenue as ``450.00``, ``$1,200.00``, ``450`` or blank; 1% of appointment rows are
      re-exports (booked -> completed, completed -> cancelled, ordered so that only
      ``updated_at`` tells which is newer); 0.5% of lead rows are re-exports;
    - consent: granted, missing, denied, revoked (in the PMS, some also in the CRM), granted after
      the visit; flags as yes/no/Y/N/1/0/true/false in mixed case or blank;
    - times: mostly naive local, some with an offset or in UTC (``Z``); the clock-change rows are
      always naive;
    - click IDs: gclid on half the leads, gbraid/wbraid on some of the others, fbclid on ~30% (70%
      of them with ``fbc`` = ``fb.1.<ms>.<fbclid>``), ``fbp``; duplicate fills repeat them;
    - PHI-looking text in ``service``, ``treatment_interest``, ``notes`` (with commas, quotes and
      line breaks) and ``landing_page_url``.

    Args:
        out_dir: created if missing; the three files are overwritten.
        appointments: appointment rows to write (re-exports included), >= 0.
        leads: lead rows to write (re-exports included), >= 0.
        seed: the only source of randomness: same arguments, byte-identical files.
        end: the anchor of all times, the day after the last lead (the run's ``end``).
        clinic_id: written into ``clinic.yaml`` and the landing-page URLs.

    Returns:
        The paths written and the counts.

    Raises:
        ValueError: for negative counts or a clinic ID ``etl.config`` would refuse.
    """
    if appointments < 0 or leads < 0:
        raise ValueError("appointments and leads must not be negative")
    if not _CLINIC_ID.fullmatch(clinic_id):
        raise ValueError("clinic_id must be lowercase letters, digits, '-' or '_' (max 63)")
    rng = np.random.default_rng(seed)
    end_s = _epoch(end)
    span = end_s - _SPAN_DAYS * _DAY
    clock = _Clock(ZoneInfo(TIMEZONE), span - 400 * _DAY, end_s + 400 * _DAY)
    sizes = _sizes(appointments, leads)
    people = _make_people(rng, sizes.lead_people + sizes.walkin, sizes.lead_people)
    plan = _plan(rng, sizes, end_s, clock.odd_days(span, end_s))
    appts = _appointment_facts(rng, plan, sizes, end_s)
    consent = _consent(rng, people, plan, appts, end_s)
    exports = out_dir / "exports"
    exports.mkdir(parents=True, exist_ok=True)
    appointments_path, leads_path = exports / "appointments.csv", exports / "leads.csv"
    _write_csv(appointments_path, _appointment_columns(rng, people, appts, consent, clock))
    _write_csv(leads_path, _lead_columns(rng, people, plan, consent, sizes, clinic_id, clock))
    plain = yaml.safe_load(clinic_id) == clinic_id
    config_path = out_dir / "clinic.yaml"
    config_path.write_text(
        _CLINIC_YAML.replace("@CLINIC_ID@", clinic_id if plain else json.dumps(clinic_id)),
        encoding="utf-8",
    )
    return SynthResult(
        config_path=config_path,
        appointments_path=appointments_path,
        leads_path=leads_path,
        appointment_rows=appointments,
        lead_rows=leads,
        appointment_ids=appts.base_rows,
        lead_ids=leads - sizes.lead_reexports,
        people=len(people.consent),
    )
