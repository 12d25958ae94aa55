"""Rule 12: existing-patient suppression list membership at the run's ``end``.

Members are people with an attended appointment in ``[end - suppression_lookback, end)`` whose
authorization is granted at ``end`` (when ``suppression_requires_consent``; without it, not
revoked at ``end``). Identifiers come
from all of the person's rows, most recent first. The mirror (adds/removes against the last
synced state) is computed in ``etl.pipeline`` from the payloads, because the platforms hold
identifier sets, not our person numbers.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from etl.rules.consent import consent_state, revoked_on_record
from etl.rules.frames import ordered_lists

_LIST_CAP = 3
_FIRSTS = (
    "fn_g",
    "ln_g",
    "country_code",
    "postal_code",
    "em_m",
    "ph_m",
    "fn_m",
    "ln_m",
    "zp_m",
    "ct_m",
    "st_m",
    "country_m",
)
# one address: taken together from a single row (``_one_address``)
_ADDRESS = ("country_code", "postal_code", "zp_m", "ct_m", "st_m", "country_m")


def suppression_members(
    *,
    appts: pd.DataFrame,
    appt_person: np.ndarray,
    attended: np.ndarray,
    leads: pd.DataFrame,
    lead_person: np.ndarray,
    lead_usable: np.ndarray,
    consent: pd.DataFrame,
    end: pd.Timestamp,
    lookback_days: int,
    requires_consent: bool,
    consent_as_of: pd.Timestamp | None = None,
) -> pd.DataFrame:
    """One row per member: ``person``, ``em_g``/``ph_g`` lists and the first non-null of each other hash."""
    start_at = pd.to_datetime(appts["start_at"], utc=True)
    recent = (
        attended
        & (start_at >= end - pd.Timedelta(days=lookback_days)).to_numpy()
        & (start_at < end).to_numpy()
    )
    people = np.unique(appt_person[recent])
    if len(people):
        # without the consent requirement, people with no authorization event are members;
        # a revoked person never is (rule 6: removed from suppression lists at the next sync)
        state = consent_state(consent, people, end)
        # a backfill's end predates a revocation recorded since, in force when the sync happens
        as_of = end if consent_as_of is None else max(consent_as_of, end)
        state[revoked_on_record(consent, people, as_of)] = 0
        people = people[state == 1] if requires_consent else people[state != 0]
    member = np.zeros(int(max(appt_person.max(initial=-1), lead_person.max(initial=-1))) + 2, dtype=bool)
    member[people] = True
    cols = ["em_g", "ph_g", *_FIRSTS]
    # members' rows from both frames, most recent first per person (ties: appointments, then
    # leads, each in frame order), built from numpy columns rather than frame slices
    picks, persons, times, sources = [], [], [], []
    for frame, person, when, usable in (
        (appts, appt_person, start_at, ~appts["is_test"].to_numpy(dtype=bool)),
        (leads, lead_person, pd.to_datetime(leads["created_at"], utc=True), lead_usable),
    ):
        # person -1 (test rows) maps to the last, unset slot
        rows_of = np.flatnonzero(usable & member[person])
        picks.append(rows_of)
        persons.append(person[rows_of])
        times.append(when.to_numpy(dtype="datetime64[ns]").astype(np.int64)[rows_of])
        sources.append(frame)
    person_all, time_all = np.concatenate(persons), np.concatenate(times)
    order = np.lexsort((np.arange(len(person_all)), -time_all, person_all))
    data: dict[str, np.ndarray] = {"person": person_all[order]}
    for col in cols:
        values = [
            np.asarray(frame[col].to_numpy(), dtype=object)[rows_of]
            if col in frame
            else np.full(len(rows_of), None, dtype=object)
            for frame, rows_of in zip(sources, picks, strict=True)
        ]
        data[col] = np.concatenate(values)[order]
    rows = pd.DataFrame(data)
    out = pd.DataFrame({"person": people}).set_index("person")
    for col in ("em_g", "ph_g"):
        out[col] = ordered_lists(rows, "person", col, _LIST_CAP, out.index)
    names = [c for c in _FIRSTS if c not in _ADDRESS]
    out = out.join(rows.groupby("person")[names].first())
    out = out.join(_one_address(rows))
    return out.reset_index()[["person", "em_g", "ph_g", *_FIRSTS]]


def _one_address(rows: pd.DataFrame) -> pd.DataFrame:
    """Each person's address columns all from one row: the most recent with a postal code,
    else the most recent with any address field.

    Taken column by column, a newer lead (no country column: the clinic's region) would pair
    its country with an older visit's foreign postal code: ``M1 1AE`` sent as a US address.
    """
    address = rows[list(_ADDRESS)]
    with_code = address[["postal_code", "zp_m"]].notna().any(axis=1).to_numpy()
    with_any = address.notna().any(axis=1).to_numpy()
    # per person, the first row (most recent) of the best kind: 2 = a postal code, 1 = any field
    rank = np.where(with_code, 2, np.where(with_any, 1, 0))
    person = rows["person"].to_numpy()
    order = np.lexsort((np.arange(len(rows)), -rank, person))
    first = order[np.r_[True, person[order][1:] != person[order][:-1]]] if len(order) else order
    return address.iloc[first].set_axis(person[first]).rename_axis("person")
