"""Rule 6: a person's marketing authorization state at any time, from leads and appointments.

A grant is an event at ``consent_at`` on a row whose ``consent_marketing`` is true (falling back
to the lead's ``created_at`` or the appointment's ``start_at`` when the export has no consent
time: the authorization was on the form that created the row). A revocation is an event at
``consent_revoked_at``. The state at T is the latest event at or before T; at equal times the
revocation wins. No event at all means no authorization.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

_GRANT, _REVOKE = 0, 1


def utc_ns(values: pd.Series) -> pd.Series:
    """One time resolution everywhere: pandas refuses to merge us- and ns-resolution keys."""
    return pd.to_datetime(values, utc=True).astype("datetime64[ns, UTC]")


# sort order: at equal times the revocation comes last, so it wins


def consent_events(
    appts: pd.DataFrame, appt_person: np.ndarray, leads: pd.DataFrame, lead_person: np.ndarray
) -> pd.DataFrame:
    """One row per consent event: ``person``, ``time`` (UTC), ``kind`` (0 grant, 1 revoke),
    ``stated`` (the export gave the time; False when the row's own time stands in)."""
    parts = []
    for frame, person, fallback in (
        (appts, appt_person, "start_at"),
        (leads, lead_person, "created_at"),
    ):
        granted = frame["consent_marketing"].to_numpy(dtype=bool)
        stated = frame["consent_at"].notna().to_numpy()
        grant_time = frame["consent_at"].where(frame["consent_at"].notna(), frame[fallback])
        parts.append(
            pd.DataFrame(
                {
                    "person": person[granted],
                    "time": grant_time[granted].to_numpy(dtype="datetime64[ns]"),
                    "kind": _GRANT,
                    "stated": stated[granted],  # False: the row's own time stands in
                }
            )
        )
        revoked = frame["consent_revoked_at"].notna().to_numpy()
        parts.append(
            pd.DataFrame(
                {
                    "person": person[revoked],
                    "time": frame["consent_revoked_at"][revoked].to_numpy(dtype="datetime64[ns]"),
                    "kind": _REVOKE,
                    "stated": True,
                }
            )
        )
    parts = [p for p in parts if len(p)]
    if not parts:
        return pd.DataFrame(
            {
                "person": pd.Series(dtype="int64"),
                "time": pd.Series(dtype="datetime64[ns, UTC]"),
                "kind": pd.Series(dtype="int64"),
                "stated": pd.Series(dtype=bool),
            }
        )
    events = pd.concat(parts, ignore_index=True)
    events["time"] = utc_ns(events["time"])
    return events.sort_values(["time", "kind", "person"], kind="stable", ignore_index=True)


def revoked_on_record(events: pd.DataFrame, person: np.ndarray, as_of: pd.Timestamp) -> np.ndarray:
    """Per person: their consent state at ``as_of``, when the upload happens, is a revocation.

    Rule 6 judges consent at the event and at the run's end, and says a revoked person is never
    uploaded again. A backfill's end lies in the past: a revocation staged since (dated after
    that end) is invisible to the state at ``end``, yet the upload happens after it. Such a
    person is not uploaded and leaves the lists (164.508(b)(5): a revocation stops every later
    disclosure). A grant after the revocation restores them; a revocation dated after
    ``as_of`` (an expiry entered ahead) is not in force yet. The rules read no clock: the
    caller passes ``as_of`` (``tasks.build_conversions``: the time it plans).
    """
    return consent_state(events, person, as_of) == 0


def consent_state(events: pd.DataFrame, person: np.ndarray, at: pd.Series | pd.Timestamp) -> np.ndarray:
    """Per query row: 1 granted, 0 revoked, -1 no authorization event yet, at time ``at``."""
    kind, _, _ = _latest(events, person, at)
    out = np.where(np.isnan(kind), -1, np.where(kind == _GRANT, 1, 0))
    return out.astype(np.int8)


def granted_since(
    events: pd.DataFrame, person: np.ndarray, at: pd.Series | pd.Timestamp
) -> tuple[np.ndarray, np.ndarray]:
    """Per query row: the time of the grant in force at ``at`` (UTC ``datetime64[ns]``, NaT
    when the state at ``at`` is not granted), and whether the export stated that time (an
    object array of True / False / None; False: the lead's or appointment's own time stands in).

    This names the authorization a disclosure was made under: the ledger keeps it with each
    conversion a real run plans, so "under which consent?" still has an answer after the
    person revokes or the PMS rewrites the row.
    """
    kind, time, stated = _latest(events, person, at)
    granted = kind == _GRANT
    times = np.where(granted, time, np.datetime64("NaT", "ns")).astype("datetime64[ns]")
    flags = np.full(len(granted), None, dtype=object)
    flags[granted] = stated[granted]
    return times, flags


def _latest(
    events: pd.DataFrame, person: np.ndarray, at: pd.Series | pd.Timestamp
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per query row: the kind (float, NaN when none), UTC time and ``stated`` flag of the
    person's latest consent event at or before ``at``."""
    query = pd.DataFrame({"person": person, "time": at, "_q": np.arange(len(person))})
    query["time"] = utc_ns(query["time"])
    if query.empty or events.empty:
        none = np.full(len(query), None, dtype=object)
        return np.full(len(query), np.nan), np.full(len(query), np.datetime64("NaT", "ns")), none
    merged = pd.merge_asof(
        query.sort_values("time", kind="stable"),
        events[["person", "time", "kind", "stated"]].assign(event_time=events["time"]),
        on="time",
        by="person",
        direction="backward",
        allow_exact_matches=True,
    ).sort_values("_q")
    kind = merged["kind"].to_numpy(dtype="float64")
    time = merged["event_time"].dt.tz_convert(None).to_numpy(dtype="datetime64[ns]")
    return kind, time, merged["stated"].to_numpy(dtype=object)
