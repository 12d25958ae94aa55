"""The synthetic clinic's timeline: when each lead arrives and each visit is booked.

Why: attribution (SPEC sections 3 and 4, ``shared/SPEC.md``) depends on the order of leads and
visits: conversions inside and after the window, existing patients, leads after a visit,
follow-ups, duplicate form fills, and rows on the clock-change days. All of it is drawn from the
one seeded generator, in a fixed order, so the files are byte-identical for the same arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from etl.synth.people import _Sizes
from etl.synth.text import _pick
from etl.synth.vocab import _DAY, _SPAN_DAYS, Bools, Ints

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
