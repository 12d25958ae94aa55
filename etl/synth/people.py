"""The synthetic clinic's population: how many people of each kind, and who they are.

Why: the shares (lead people, walk-ins, re-exports, test records, consent states) and the
identities (names, mail domains, a distinct phone number each) are what the edge cases of SPEC
sections 3 and 4 (``shared/SPEC.md``) hang on; ``etl.synth.write_synthetic_clinic`` lists them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from etl.synth.text import _pick
from etl.synth.vocab import (
    _AREAS,
    _DOMAINS,
    _FIRST,
    _GMAIL,
    _LAST,
    _LOCATIONS,
    _ZIPS,
    Bools,
    Ints,
)


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
