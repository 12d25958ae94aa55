"""Rules 3-5: journeys, the converting appointment of each, and existing patients.

A person's journey starts at their earliest lead not already inside an earlier journey and
spans ``[start, start + attribution_window)``. It converts at the person's first attended
appointment inside that window; later leads created at or before that conversion (or before the
window ends, if none) belong to the same journey. Further attended visits in a converted
window are ``duplicate_in_journey``. A journey whose person attended in
``[start - existing_patient_lookback, start)`` is an existing patient's, not a new client's.

The walk is a loop over each person's sorted leads with ``bisect`` on plain int lists: persons
have a handful of rows, so this beats vectorised tricks and stays obviously equal to the rule.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass

import numpy as np
import pandas as pd

NS_PER_DAY = 86_400 * 10**9

# classification of attended appointments
CONVERSION, DUPLICATE, OUTSIDE, NO_LEAD = (
    "conversion",
    "duplicate_in_journey",
    "outside_window",
    "no_lead",
)


@dataclass(frozen=True)
class Journeys:
    """``frame``: one row per journey (person, start, window_end, conv_appt row or -1, existing).

    ``lead_journey``: journey number of each lead row (-1 for leads left out, e.g. test rows).
    ``appt_class``: per appointment row, a class above for attended rows, "" otherwise.
    """

    frame: pd.DataFrame
    lead_journey: np.ndarray
    appt_class: np.ndarray


def _ns(series: pd.Series) -> np.ndarray:
    return series.to_numpy(dtype="datetime64[ns]").astype("int64")


def _groups(
    person: np.ndarray, times: np.ndarray, rows: np.ndarray
) -> dict[int, tuple[list[int], list[int]]]:
    t = times[rows]
    order = np.lexsort((rows, t, person[rows]))
    sorted_rows = rows[order]
    sorted_person = person[sorted_rows]
    out: dict[int, tuple[list[int], list[int]]] = {}
    if len(sorted_rows) == 0:
        return out
    cuts = np.flatnonzero(np.diff(sorted_person)) + 1
    starts = np.concatenate(([0], cuts))
    ends = np.concatenate((cuts, [len(sorted_rows)]))
    # whole columns to Python lists once, then list slices: a numpy slice and ``tolist`` per
    # person cost more than the walk itself at a few hundred thousand persons
    t_list, row_list = t[order].tolist(), sorted_rows.tolist()
    persons = sorted_person[starts].tolist()
    for p, lo, hi in zip(persons, starts.tolist(), ends.tolist(), strict=True):
        out[p] = (t_list[lo:hi], row_list[lo:hi])
    return out


def build_journeys(
    appts: pd.DataFrame,
    appt_person: np.ndarray,
    attended: np.ndarray,
    leads: pd.DataFrame,
    lead_person: np.ndarray,
    lead_usable: np.ndarray,
    *,
    attribution_window_days: int,
    existing_patient_lookback_days: int,
) -> Journeys:
    """Walk every person's leads into journeys.

    Args:
        attended: bool per appointment row: attended and not a test record.
        lead_usable: bool per lead row: not a test record.
    """
    window = attribution_window_days * NS_PER_DAY
    lookback = existing_patient_lookback_days * NS_PER_DAY
    a_ns = _ns(appts["start_at"])
    l_ns = _ns(leads["created_at"])
    a_groups = _groups(appt_person, a_ns, np.flatnonzero(attended))
    l_groups = _groups(lead_person, l_ns, np.flatnonzero(lead_usable))

    appt_class = np.full(len(appts), "", dtype=object)
    lead_journey = np.full(len(leads), -1, dtype=np.int64)
    j_person: list[int] = []
    j_start: list[int] = []
    j_end: list[int] = []
    j_conv: list[int] = []
    j_existing: list[bool] = []

    for person, (_times, a_rows) in a_groups.items():
        if person not in l_groups:
            for row in a_rows:
                appt_class[row] = NO_LEAD
    for person, (l_times, l_rows) in l_groups.items():
        a_times, a_rows = a_groups.get(person, ([], []))
        i, n = 0, len(l_times)
        while i < n:
            start = l_times[i]
            end = start + window
            k = bisect_left(a_times, start)
            converted = k < len(a_times) and a_times[k] < end
            j = i + 1
            if converted:
                cutoff = a_times[k]
                while j < n and l_times[j] <= cutoff:
                    j += 1
            else:
                while j < n and l_times[j] < end:
                    j += 1
            journey = len(j_person)
            for lead_row in l_rows[i:j]:
                lead_journey[lead_row] = journey
            existing = bisect_left(a_times, start - lookback) < bisect_left(a_times, start)
            j_person.append(person)
            j_start.append(start)
            j_end.append(end)
            j_existing.append(existing)
            if converted:
                j_conv.append(a_rows[k])
                appt_class[a_rows[k]] = CONVERSION
                m = k + 1
                while m < len(a_times) and a_times[m] < end:
                    if appt_class[a_rows[m]] != CONVERSION:
                        appt_class[a_rows[m]] = DUPLICATE
                    m += 1
            else:
                j_conv.append(-1)
            i = j
        for row in a_rows:
            if appt_class[row] == "":
                appt_class[row] = OUTSIDE

    frame = pd.DataFrame(
        {
            "person": np.asarray(j_person, dtype=np.int64),
            "start": pd.to_datetime(np.asarray(j_start, dtype="int64"), utc=True),
            "window_end": pd.to_datetime(np.asarray(j_end, dtype="int64"), utc=True),
            "conv_appt": np.asarray(j_conv, dtype=np.int64),
            "existing": np.asarray(j_existing, dtype=bool),
        }
    )
    return Journeys(frame=frame, lead_journey=lead_journey, appt_class=appt_class)
