"""Rules 6-11: conversions per stage with values, consent, click IDs, identifiers, destinations.

Input is the journeys walk (``etl.rules.journeys``); output is one row per conversion candidate
whose ready time falls in the run's window, with a ``drop`` reason (empty when kept) and, per
destination, whether it goes there or why not. Conversion-level reasons count conversions
(journey x stage); appointment-level reasons are counted by ``etl.pipeline._row_drops``.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pandas as pd

from etl.config import ClinicConfig
from etl.rules.consent import consent_state, granted_since, revoked_on_record
from etl.rules.frames import ordered_lists

log = logging.getLogger(__name__)

STAGES = ("consultation", "purchase")
_MAX_EMAILS, _MAX_PHONES = 3, 2  # Google allows 5 identifiers per conversion in all


@dataclass(frozen=True)
class RunWindow:
    """The run's ``[start, end)``; ``end`` is "now" for every age and consent decision."""

    start: datetime
    end: datetime

    @property
    def end_ts(self) -> pd.Timestamp:
        return pd.Timestamp(self.end).tz_convert("UTC")

    @property
    def start_ts(self) -> pd.Timestamp:
        return pd.Timestamp(self.start).tz_convert("UTC")


def opaque_id(secret: bytes, clinic_id: str, stage: str, record_id: str) -> str:
    """HMAC-SHA256 over clinic, stage and the converting record: stable across reruns, reveals nothing."""
    message = f"{clinic_id}\x1f{stage}\x1f{record_id}".encode()
    return hmac.digest(secret, message, "sha256").hex()  # one-shot C path: a million IDs per run


def _candidates(journeys: pd.DataFrame, appts: pd.DataFrame, config: ClinicConfig) -> pd.DataFrame:
    converted = journeys[journeys["conv_appt"] >= 0].reset_index(names="journey")
    rows = converted["conv_appt"].to_numpy()
    base = pd.DataFrame(
        {
            "journey": converted["journey"].to_numpy(),
            "person": converted["person"].to_numpy(),
            "existing": converted["existing"].to_numpy(),
            "appt_row": rows,
            "appointment_id": appts["appointment_id"].to_numpy()[rows],
            "patient_id": appts["patient_id"].to_numpy()[rows],
            "event_time": appts["start_at"].to_numpy(dtype="datetime64[ns]")[rows],
            "currency": appts["currency"].fillna(config.currency).to_numpy()[rows],
        }
    )
    value_window = pd.Timedelta(days=config.rules.value_window_days)
    consult = base.assign(stage="consultation", ready_at=base["event_time"])
    purchase = base.assign(stage="purchase", ready_at=base["event_time"] + value_window)
    out = pd.concat([consult, purchase], ignore_index=True)
    out["event_time"] = pd.to_datetime(out["event_time"], utc=True)
    out["ready_at"] = pd.to_datetime(out["ready_at"], utc=True)
    return out


def _purchase_values(
    conv: pd.DataFrame,
    appts: pd.DataFrame,
    appt_person: np.ndarray,
    attended: np.ndarray,
    days: int,
    default_currency: str,
) -> pd.Series:
    """Sum of attended revenue in ``[event, event + value_window)`` for each purchase row.

    Only revenue in the conversion's own currency (the converting visit's) is summed: the value
    goes out with that one currency code, and 100 USD plus 50 EUR is not 150 of either. Visits
    in another currency are left out of the value, and counted in a warning.
    """
    purchases = conv.loc[conv["stage"] == "purchase", ["person", "event_time", "currency"]].reset_index()
    visits = pd.DataFrame(
        {
            "person": appt_person[attended],
            "visit_at": appts["start_at"].to_numpy(dtype="datetime64[ns]")[attended],
            "revenue": appts["revenue"].to_numpy()[attended],
            "visit_currency": appts["currency"].fillna(default_currency).to_numpy()[attended],
        }
    )
    pairs = purchases.merge(visits, on="person", how="inner")
    pairs["visit_at"] = pd.to_datetime(pairs["visit_at"], utc=True)
    inside = (pairs["visit_at"] >= pairs["event_time"]) & (
        pairs["visit_at"] < pairs["event_time"] + pd.Timedelta(days=days)
    )
    currencies = {*pd.unique(visits["visit_currency"]), *pd.unique(purchases["currency"])}
    if len(currencies) <= 1:  # one currency throughout (nearly every clinic): nothing to compare
        same = np.ones(len(pairs), dtype=bool)
    else:
        same = (pairs["visit_currency"] == pairs["currency"]).to_numpy()
    if other := int((inside.to_numpy() & ~same).sum()):
        log.warning(
            "purchase values: %d attended visits in another currency than their conversion's left out", other
        )
    sums = pairs[inside.to_numpy() & same].groupby("index")["revenue"].sum()
    return sums.reindex(purchases["index"]).fillna(0.0).set_axis(purchases["index"])


def _journey_leads(conv: pd.DataFrame, leads: pd.DataFrame, lead_journey: np.ndarray) -> pd.DataFrame:
    """Leads of each conversion's journey created at or before the event (rule 8)."""
    usable = lead_journey >= 0
    lead_rows = pd.DataFrame({"journey": lead_journey[usable], "lead_row": np.flatnonzero(usable)})
    pairs = conv[["journey", "event_time"]].reset_index(names="conv").merge(lead_rows, on="journey")
    created = pd.to_datetime(
        leads["created_at"].to_numpy(dtype="datetime64[ns]")[pairs["lead_row"].to_numpy()], utc=True
    )
    pairs["created_at"] = created
    pairs = pairs[pairs["created_at"] <= pairs["event_time"]]
    return pairs.drop(columns=["journey", "event_time"])


def _most_recent(pairs: pd.DataFrame, values: pd.Series, name: str) -> pd.DataFrame:
    """Per conversion: the most recent non-empty value and its lead's created_at."""
    picked = pairs.assign(_v=values.to_numpy()[pairs["lead_row"].to_numpy()])
    picked = picked[picked["_v"].notna() & (picked["_v"].astype(str) != "")]
    picked = picked.sort_values(["conv", "created_at", "lead_row"]).drop_duplicates("conv", keep="last")
    return picked.set_index("conv")[["_v", "created_at"]].rename(
        columns={"_v": name, "created_at": f"{name}_at"}
    )


def _effective_fbc(leads: pd.DataFrame) -> pd.Series:
    """``fbc`` as captured, else built from ``fbclid`` as the Pixel would: fb.1.<ms>.<fbclid>."""
    ms = (leads["created_at"].to_numpy(dtype="datetime64[ns]").astype("int64") // 1_000_000).astype(str)
    built = "fb.1." + pd.Series(ms, index=leads.index) + "." + leads["fbclid"].astype("string")
    has_fbc = leads["fbc"].notna() & (leads["fbc"].astype("string") != "")
    fallback = built.astype(object).mask(leads["fbclid"].isna().to_numpy())
    return leads["fbc"].astype(object).where(has_fbc.to_numpy(dtype=bool), fallback)


def _identifiers(
    conv: pd.DataFrame, appts: pd.DataFrame, leads: pd.DataFrame, pairs: pd.DataFrame
) -> pd.DataFrame:
    """Identifier hashes per conversion: the converting visit first, then the journey's leads by recency."""
    hash_cols = [
        "em_g",
        "ph_g",
        "em_m",
        "ph_m",
        "fn_m",
        "ln_m",
        "ct_m",
        "st_m",
        "zp_m",
        "country_m",
    ]
    from_appt = appts.iloc[conv["appt_row"].to_numpy()][hash_cols].reset_index(drop=True)
    from_appt["conv"] = np.arange(len(conv))
    from_appt["prio"] = 0
    lead_part = leads.iloc[pairs["lead_row"].to_numpy()][[c for c in hash_cols if c in leads]]
    lead_part = lead_part.reset_index(drop=True)
    lead_part["conv"] = pairs["conv"].to_numpy()
    # most recent lead first: priority 1, 2, ... by descending created_at
    lead_part["prio"] = 1 + (
        pairs.reset_index(drop=True).groupby("conv")["created_at"].rank(method="first", ascending=False)
    ).to_numpy(dtype="int64")
    cand = pd.concat([from_appt, lead_part], ignore_index=True).sort_values(["conv", "prio"], kind="stable")
    out = pd.DataFrame(index=pd.RangeIndex(len(conv)))
    for col, cap in (("em_g", _MAX_EMAILS), ("ph_g", _MAX_PHONES), ("em_m", 5), ("ph_m", 5)):
        out[col] = ordered_lists(cand, "conv", col, cap, out.index)
    firsts = cand.groupby("conv")[["fn_m", "ln_m", "ct_m", "st_m", "zp_m", "country_m"]].first()
    return out.join(firsts)


def build_conversions(
    *,
    config: ClinicConfig,
    window: RunWindow,
    secret: bytes,
    journeys: pd.DataFrame,
    lead_journey: np.ndarray,
    appts: pd.DataFrame,
    appt_person: np.ndarray,
    attended: np.ndarray,
    leads: pd.DataFrame,
    consent: pd.DataFrame,
    carry: frozenset[str] = frozenset(),
    consent_as_of: pd.Timestamp | None = None,
) -> pd.DataFrame:
    """Conversion candidates ready in ``[start - late_arrival, end)`` with drops and destinations.

    ``consent_as_of``: when the upload happens (passed in: the rules read no clock); a person
    revoked then is dropped (``consent_revoked``) even when granted at ``end`` (default: ``end``).

    ``carry`` holds the opaque IDs of conversions a real run planned and whose upload never
    finished (``ledger.unfinished_ids``): they are candidates again whatever their ready time
    (flagged ``carried``), so a batch deferred on the last night of its interval is not lost
    once its ready time falls out of the run interval; the platform age limits still apply.

    Returns:
        one row per candidate: ``stage``, ``opaque_id``, ``event_time``, ``ready_at``, ``value``,
        ``currency``, click IDs, identifier lists, ``drop`` ("" when kept), and for each
        destination ``google``/``meta`` either "send" or the drop reason or "" (not configured).
    """
    rules = config.rules
    conv = _candidates(journeys, appts, config)
    lower = window.start_ts - pd.Timedelta(days=rules.late_arrival_days)
    in_interval = (conv["ready_at"] >= lower) & (conv["ready_at"] < window.end_ts)
    carried = np.zeros(len(conv), dtype=bool)
    if carry:
        # IDs computed only for the older candidates, and only when something is unfinished
        older = np.flatnonzero((conv["ready_at"] < lower).to_numpy())
        keys = zip(conv["stage"].to_numpy()[older], conv["appointment_id"].to_numpy()[older], strict=True)
        carried[older] = [
            opaque_id(secret, config.clinic_id, stage, str(aid)) in carry for stage, aid in keys
        ]
    conv = conv.assign(carried=carried)[in_interval.to_numpy() | carried]
    conv = conv.sort_values(["event_time", "appt_row", "stage"], kind="stable").reset_index(drop=True)

    values = pd.Series(np.nan, index=conv.index)
    if rules.consultation_value is not None:
        values[conv["stage"] == "consultation"] = float(rules.consultation_value)
    purchase_values = _purchase_values(
        conv, appts, appt_person, attended, rules.value_window_days, config.currency
    )
    values.loc[purchase_values.index] = purchase_values.to_numpy()
    conv["value"] = values

    pairs = _journey_leads(conv, leads, lead_journey)
    clicks = [_most_recent(pairs, leads[col], col) for col in ("gclid", "gbraid", "wbraid", "fbp")] + [
        _most_recent(pairs, _effective_fbc(leads), "fbc")
    ]
    for frame in clicks:
        conv = conv.join(frame)
    # only one Google click ID is sent: gclid, else gbraid, else wbraid
    conv.loc[conv["gclid"].notna(), ["gbraid", "wbraid"]] = None
    conv.loc[conv["gbraid"].notna(), "wbraid"] = None
    conv["click_at"] = conv["gclid_at"].where(
        conv["gclid"].notna(), conv["gbraid_at"].where(conv["gbraid"].notna(), conv["wbraid_at"])
    )
    conv = conv.join(_identifiers(conv, appts, leads, pairs))

    as_of = window.end_ts if consent_as_of is None else max(consent_as_of, window.end_ts)
    state_at_event = consent_state(consent, conv["person"].to_numpy(), conv["event_time"])
    state_at_end = consent_state(consent, conv["person"].to_numpy(), window.end_ts)
    # the authorization an upload at the run's end is made under (SPEC rule 6), for the ledger
    conv["consent_at"], conv["consent_stated"] = granted_since(
        consent, conv["person"].to_numpy(), window.end_ts
    )
    has_google_click = conv[["gclid", "gbraid", "wbraid"]].notna().any(axis=1)
    has_any_click = has_google_click | conv["fbc"].notna()
    has_ids = (conv["em_g"].map(len) > 0) | (conv["ph_g"].map(len) > 0)

    drop = pd.Series("", index=conv.index, dtype=object)
    rules_in_order = [
        ("existing_patient", conv["existing"].to_numpy(dtype=bool)),
        ("no_revenue", ((conv["stage"] == "purchase") & ~(conv["value"] > 0)).to_numpy()),
        (
            "consent_revoked",
            (state_at_end == 0) | revoked_on_record(consent, conv["person"].to_numpy(), as_of),
        ),
        ("no_consent", (state_at_event != 1) | (state_at_end != 1)),
        ("no_identifiers", (~has_ids & ~has_any_click).to_numpy()),
    ]
    for reason, mask in rules_in_order:
        drop[(drop == "") & mask] = reason
    conv["drop"] = drop
    conv["opaque_id"] = [
        opaque_id(secret, config.clinic_id, stage, str(aid))
        for stage, aid in zip(conv["stage"], conv["appointment_id"], strict=True)
    ]
    conv["external_id"] = [
        opaque_id(secret, config.clinic_id, "person", str(pid)) if isinstance(pid, str) and pid else None
        for pid in conv["patient_id"]
    ]
    conv["google"] = _google_route(conv, config, window, has_google_click, has_ids)
    conv["meta"] = _meta_route(conv, config, window)
    if config.google_ads is not None or config.meta is not None:
        # an identifier no configured destination can use is no identifier (rule 9): a Meta-only
        # clinic's conversion known only by a gclid would otherwise vanish from every count
        nowhere = (conv["drop"] == "") & (conv["google"] == "") & (conv["meta"] == "")
        conv.loc[nowhere, "drop"] = "no_identifiers"
    return conv.drop(columns=["patient_id", "existing"])


def journey_sibling_ids(
    conv: pd.DataFrame,
    positions: np.ndarray,
    journeys: pd.DataFrame,
    appts: pd.DataFrame,
    appt_person: np.ndarray,
    leads: pd.DataFrame,
    lead_journey: np.ndarray,
    *,
    attribution_window_days: int,
    secret: bytes,
    clinic_id: str,
) -> dict[int, list[str]]:
    """For the candidates at ``positions`` of ``conv``: the opaque IDs their journey's stage
    carried, or would have carried, had it converted at another of the visits it owns (any
    status: one since cancelled included).

    Rule 4 allows one conversion per journey and stage, and rule 11 sends a conversion once,
    ever. The opaque ID names the converting appointment, so when a late export moves a
    journey's conversion onto another visit (an earlier visit's "attended" entered days late, a
    sent visit since cancelled, a late earlier lead that moved the window), the new ID alone
    would send the journey a second time. The ledger step looks these IDs up: a journey already
    sent under one of them is not sent again.

    A visit belongs to the latest of the person's journeys whose window holds it, else (outside
    every window) to the journey of the latest lead whose own window holds it: the journey
    that lead started before a late earlier lead absorbed it. So a visit converting the
    person's next journey is never counted as a sibling of this one.

    Returns:
        position -> sibling opaque IDs, for candidates that have any.
    """
    if len(positions) == 0:
        return {}
    cand = conv.iloc[positions]
    wanted = np.unique(cand["person"].to_numpy())

    def ns(values: pd.Series) -> np.ndarray:
        return values.to_numpy(dtype="datetime64[ns]").astype("int64")

    theirs = np.flatnonzero(np.isin(appt_person, wanted))
    visits = pd.DataFrame(
        {"person": appt_person[theirs], "row": theirs, "t": ns(appts["start_at"])[theirs]}
    ).sort_values("t", kind="stable")
    windows = pd.DataFrame(
        {
            "person": journeys["person"].to_numpy(),
            "journey": np.arange(len(journeys)),
            "from": ns(journeys["start"]),
            "until": ns(journeys["window_end"]),
        }
    )
    windows = windows[np.isin(windows["person"].to_numpy(), wanted)].sort_values("from", kind="stable")
    owned = pd.merge_asof(visits, windows, left_on="t", right_on="from", by="person", direction="backward")
    inside = owned["t"].to_numpy() < owned["until"].to_numpy()  # NaN (no journey yet) compares False
    lead_rows = np.flatnonzero(lead_journey >= 0)
    of_lead = lead_journey[lead_rows]
    started = pd.DataFrame(
        {
            "person": journeys["person"].to_numpy()[of_lead],
            "journey": of_lead,
            "from": ns(leads["created_at"])[lead_rows],
        }
    )
    started = started[np.isin(started["person"].to_numpy(), wanted)].sort_values("from", kind="stable")
    by_lead = pd.merge_asof(visits, started, left_on="t", right_on="from", by="person", direction="backward")
    window = attribution_window_days * 86_400 * 10**9
    lead_holds = by_lead["t"].to_numpy() < by_lead["from"].to_numpy() + window
    owner = np.where(
        inside, owned["journey"].to_numpy(), np.where(lead_holds, by_lead["journey"].to_numpy(), np.nan)
    )
    visits = visits.assign(journey=owner)
    mine = pd.DataFrame(
        {
            "position": positions,
            "journey": cand["journey"].to_numpy().astype("float64"),
            "own_row": cand["appt_row"].to_numpy(),
            "stage": cand["stage"].to_numpy(),
        }
    )
    pairs = mine.merge(visits[["journey", "row"]], on="journey")
    pairs = pairs[pairs["row"] != pairs["own_row"]]
    ids = appts["appointment_id"].to_numpy()[pairs["row"].to_numpy()]
    out: dict[int, list[str]] = {}
    for position, stage, aid in zip(pairs["position"].tolist(), pairs["stage"].tolist(), ids, strict=True):
        out.setdefault(position, []).append(opaque_id(secret, clinic_id, stage, str(aid)))
    return out


def _google_route(
    conv: pd.DataFrame,
    config: ClinicConfig,
    window: RunWindow,
    has_click: pd.Series,
    has_ids: pd.Series,
) -> pd.Series:
    route = pd.Series("", index=conv.index, dtype=object)
    google = config.google_ads
    if google is None:
        return route
    kept = conv["drop"] == ""
    eligible = has_click | (has_ids & google.enhanced_conversions_for_leads)
    click_limit = window.end_ts - pd.Timedelta(days=google.click_window_days)
    conv_limit = window.end_ts - pd.Timedelta(days=90)
    too_old = (has_click & (conv["click_at"] < click_limit)) | (
        ~has_click & (conv["event_time"] < conv_limit)
    )
    route[kept & eligible] = "send"
    route[kept & eligible & too_old] = "too_old_for_google"
    return route


def _meta_route(conv: pd.DataFrame, config: ClinicConfig, window: RunWindow) -> pd.Series:
    route = pd.Series("", index=conv.index, dtype=object)
    meta = config.meta
    if meta is None:
        return route
    kept = (conv["drop"] == "") & (
        (conv["em_m"].map(len) > 0) | (conv["ph_m"].map(len) > 0) | conv["fbc"].notna() | conv["fbp"].notna()
    )
    limit = window.end_ts - pd.Timedelta(days=meta.event_age_limit_days)
    route[kept] = "send"
    route[kept & (conv["event_time"] < limit)] = "too_old_for_meta"
    return route
