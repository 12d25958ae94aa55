"""The synthetic clinic's CSV columns: people, visits and consent rendered as exported text.

Why: the exports must carry the column names of the generic profile (SPEC section 3,
``shared/SPEC.md``) and, at scale, the identifier and text noise of SPEC sections 3 and 4 (case,
Gmail variants, ZIP+4, consent-flag spellings, click IDs, PHI-looking free text);
``etl.synth.write_synthetic_clinic`` lists them.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from etl.synth.clock import _Clock, _times
from etl.synth.events import _Plan
from etl.synth.facts import _NEVER, _Appts, _Consent
from etl.synth.people import _People, _Sizes
from etl.synth.text import (
    _blank,
    _cased,
    _compose,
    _digits,
    _email_local,
    _garbled,
    _ids,
    _join,
    _money,
    _num,
    _phones,
    _pick,
    _take,
    _text,
    _tokens,
    _where,
)
from etl.synth.vocab import (
    _DAY,
    _DENIED,
    _DOMAIN_ALL,
    _FALSE,
    _FIRST_ALL,
    _GMAIL,
    _GOOGLE_SOURCES,
    _GRANTED,
    _INTERESTS,
    _LAST_ALL,
    _LATE_GRANT,
    _LOCATIONS,
    _META_SOURCES,
    _MISSING,
    _NOTES,
    _OTHER_SOURCES,
    _PAGES,
    _PLUS_TAGS,
    _REVOKED,
    _SEPS,
    _SERVICE_NAMES,
    _STATUS_VOCAB,
    _TRUE,
    _ZIPS,
    Bools,
    Chars,
    Ints,
    Strings,
)


def _flags(rng: np.random.Generator, truthy: Bools, blank: Bools) -> Strings:
    """consent_marketing as people export it: yes/Y/1/true/... and no/N/0/false/..., or blank."""
    idx = np.where(
        truthy,
        rng.integers(0, len(_TRUE), len(truthy)),
        len(_TRUE) + rng.integers(0, len(_FALSE), len(truthy)),
    )
    return _take(_TRUE + _FALSE, idx, blank)


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
