"""Conversions and suppression members -> the exact platform-shaped rows of SPEC section 5.

Rows use the platforms' own field names (Google Ads API protos, Meta Graph API). They are plain
dicts so that the outbox, the PHI gate and both adapters of each platform read the same object.
Every value here is already a hash, an opaque ID, a click ID, a time, an amount or a configured
generic name: raw identifiers never reach this module.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from datetime import datetime
from itertools import chain
from typing import Any

import pandas as pd

from etl.config import ClinicConfig
from etl.outbox import collector_paused, encode_canonical, encode_canonical_all, encode_canonical_text

META_AUDIENCE_SCHEMA = ["EMAIL", "PHONE", "FN", "LN", "ZIP", "CT", "ST", "COUNTRY"]
META_AUDIENCE_BATCH = 10_000
Row = dict[str, Any]


def canonical_json(value: Any) -> str:
    """Sorted keys, no spaces, UTF-8 kept: the form audience state is stored and keyed in."""
    return encode_canonical(value).decode("utf-8")


def google_member_key(row: Row) -> str:
    """Stable key of one Customer Match member: the hash of its identifier set."""
    return hashlib.sha256(encode_canonical(row["user_identifiers"])).hexdigest()


def meta_member_key(data_row: list[str]) -> str:
    return hashlib.sha256(encode_canonical(data_row)).hexdigest()


def _member_keys(values: list[Any], *, text_only: bool = False) -> list[str]:
    """``google_member_key`` / ``meta_member_key`` of many members: one type check for all, or
    none when the caller built them from text alone (``text_only``)."""
    encoded = encode_canonical_text(values) if text_only else encode_canonical_all(values)
    return [hashlib.sha256(text).hexdigest() for text in encoded]


def google_date_time(ts: pd.Timestamp, tz: Any) -> str:
    """``yyyy-mm-dd hh:mm:ss+hh:mm`` in the clinic's zone (the offset keeps its colon)."""
    local: datetime = ts.tz_convert(tz).to_pydatetime()
    return local.isoformat(sep=" ", timespec="seconds")


def _records(frame: pd.DataFrame) -> Iterator[Any]:
    """Rows as named tuples typed ``Any``: the columns are ours, the stubs cannot know them."""
    return iter(frame.itertuples(index=False))


def _interleave(emails: list[str], phones: list[str], cap: int = 5) -> list[Row]:
    out: list[Row] = []
    for i in range(max(len(emails), len(phones))):
        if i < len(emails):
            out.append({"hashed_email": emails[i]})
        if i < len(phones):
            out.append({"hashed_phone_number": phones[i]})
    return out[:cap]


def google_conversion_rows(conv: pd.DataFrame, config: ClinicConfig) -> list[Row]:
    """ClickConversion rows for conversions routed "send" to Google, sorted by time then order ID."""
    google = config.google_ads
    if google is None:
        return []
    sel = conv[conv["google"] == "send"].sort_values(["event_time", "opaque_id"])
    actions = google.conversion_actions.model_dump()
    rows: list[Row] = []
    for rec in _records(sel):
        row: Row = {
            "conversion_action": actions[rec.stage],
            "conversion_date_time": google_date_time(rec.event_time, config.tz),
        }
        if pd.notna(rec.value):
            row["conversion_value"] = round(float(rec.value), 2)
        row["currency_code"] = rec.currency
        row["order_id"] = rec.opaque_id
        for click in ("gclid", "gbraid", "wbraid"):
            value = getattr(rec, click)
            if isinstance(value, str) and value:
                row[click] = value
                break
        identifiers = _interleave(rec.em_g, rec.ph_g)
        if identifiers and (google.enhanced_conversions_for_leads or "gclid" not in row):
            row["user_identifiers"] = identifiers
        row["consent"] = {"ad_user_data": "GRANTED"}
        rows.append(row)
    return rows


def meta_event_rows(conv: pd.DataFrame, config: ClinicConfig) -> list[Row]:
    """Conversions API events for conversions routed "send" to Meta, sorted by time then event ID."""
    meta = config.meta
    if meta is None:
        return []
    sel = conv[conv["meta"] == "send"].sort_values(["event_time", "opaque_id"])
    names = meta.event_names.model_dump()
    rows: list[Row] = []
    for rec in _records(sel):
        user: Row = {}
        if rec.em_m:
            user["em"] = list(rec.em_m)
        if rec.ph_m:
            user["ph"] = list(rec.ph_m)
        for key, col in (
            ("fn", "fn_m"),
            ("ln", "ln_m"),
            ("ct", "ct_m"),
            ("st", "st_m"),
            ("zp", "zp_m"),
            ("country", "country_m"),
            ("external_id", "external_id"),
        ):
            value = getattr(rec, col)
            if isinstance(value, str) and value:
                user[key] = [value]
        for key in ("fbc", "fbp"):
            value = getattr(rec, key)
            if isinstance(value, str) and value:
                user[key] = value
        row: Row = {
            "event_name": names[rec.stage],
            "event_time": int(rec.event_time.timestamp()),
            "event_id": rec.opaque_id,
            "action_source": meta.action_source,
            "user_data": user,
        }
        if pd.notna(rec.value):
            row["custom_data"] = {"value": round(float(rec.value), 2), "currency": rec.currency}
        if meta.limited_data_use:
            row["data_processing_options"] = ["LDU"]
            row["data_processing_options_country"] = meta.ldu_country
            row["data_processing_options_state"] = meta.ldu_state
        rows.append(row)
    return rows


def google_member_rows(members: pd.DataFrame) -> dict[str, Row]:
    """member_key -> ``{"operation": "create", "user_identifiers": [...]}`` for each usable member."""
    rows: list[Row] = []
    with collector_paused():  # a few hundred thousand small dicts (etl.outbox.collector_paused)
        for rec in _records(members):
            identifiers: list[Row] = [{"hashed_email": e} for e in rec.em_g]
            identifiers += [{"hashed_phone_number": p} for p in rec.ph_g]
            address = {
                "hashed_first_name": rec.fn_g,
                "hashed_last_name": rec.ln_g,
                "country_code": rec.country_code,
                "postal_code": rec.postal_code,
            }
            if all(isinstance(v, str) and v for v in address.values()):
                identifiers.append({"address_info": address})
            if identifiers:
                rows.append({"operation": "create", "user_identifiers": identifiers})
        # hashes as staged are text; the address parts were checked above: then no type walk
        hashes = chain.from_iterable(chain(members["em_g"].tolist(), members["ph_g"].tolist()))
        text_only = set(map(type, hashes)) <= {str}
        keys = _member_keys([row["user_identifiers"] for row in rows], text_only=text_only)
        return dict(zip(keys, rows, strict=True))


def meta_member_rows(members: pd.DataFrame) -> dict[str, list[str]]:
    """member_key -> one multi-key data row (``""`` where a key is unknown); needs email or phone."""
    cols = ("em_m", "ph_m", "fn_m", "ln_m", "zp_m", "ct_m", "st_m", "country_m")
    with collector_paused():  # a few hundred thousand small lists (etl.outbox.collector_paused)
        cells = [[v if isinstance(v, str) else "" for v in members[c].tolist()] for c in cols]
        rows = [list(data) for data in zip(*cells, strict=True) if data[0] or data[1]]
        return dict(zip(_member_keys(rows, text_only=True), rows, strict=True))  # cells are str only


def google_audience_lines(adds: Iterable[Row], removes: Iterable[Row]) -> list[Row]:
    lines = [{"operation": "create", "user_identifiers": r["user_identifiers"]} for r in adds]
    lines += [{"operation": "remove", "user_identifiers": r["user_identifiers"]} for r in removes]
    return lines


def meta_audience_lines(adds: list[list[str]], removes: list[list[str]]) -> list[Row]:
    """Batches of at most 10,000 rows per line, adds first (the upload API's request unit)."""
    lines: list[Row] = []
    for operation, data in (("add", adds), ("remove", removes)):
        for lo in range(0, len(data), META_AUDIENCE_BATCH):
            lines.append(
                {
                    "operation": operation,
                    "schema": list(META_AUDIENCE_SCHEMA),
                    "data": data[lo : lo + META_AUDIENCE_BATCH],
                }
            )
    return lines
