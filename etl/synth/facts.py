"""What happened at each synthetic visit (status, service, revenue, re-exports) and when each
person granted or revoked marketing consent.

Why: the status vocabulary, fees, refunds, re-exported rows and consent timing are the SPEC
section 3 and 4 cases (``shared/SPEC.md``, rule 6 for consent) that the pipeline must get right;
``etl.synth.write_synthetic_clinic`` lists them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from etl.synth.events import _AFTER, _CONV, _EXISTING, _FOLLOW, _Plan, _slot
from etl.synth.people import _People, _Sizes
from etl.synth.text import _pick
from etl.synth.vocab import (
    _ATT,
    _CANC,
    _DAY,
    _GRANTED,
    _LATE,
    _LATE_GRANT,
    _NOSHOW,
    _RESCHED,
    _REVOKED,
    _SCHED,
    _SERVICE_PRICE,
    _SERVICES,
    _STATUS_GROUP,
    _STATUS_LEN,
    _STATUS_OFFSET,
    _STATUS_P,
    _STATUS_VOCAB,
    _UNKNOWN,
    Bools,
    Ints,
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
