"""From a ``meta_events.jsonl`` row to a facebook-business ``Event``: local checks, then build.

Why: one bad event makes Meta reject a whole Conversions API request (issue #4,
``shared/reference/ad-platforms.md`` section B), so ``MetaEvents`` (``etl.destinations.meta``)
checks every row's shape, hashes, click-id formats, value, Limited Data Use options and age
before batching. The row format is ``meta_events.jsonl`` of SPEC section 5 (``shared/SPEC.md``);
the decisions are in ``docs/meta.md``. No value ever leaves these functions: a failed check is
only ``"invalid_format"`` or ``"stale_event"``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from facebook_business.adobjects.serverside.action_source import ActionSource
from facebook_business.adobjects.serverside.custom_data import CustomData
from facebook_business.adobjects.serverside.event import Event
from facebook_business.adobjects.serverside.user_data import UserData

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# what Meta reads as fbc/fbp (looser than the PHI gate's etl.identifiers.FBC/FBP, which every row
# here has passed): the parameter builder's appendix included, so no row the gate let out is refused
_FBC = re.compile(r"^fb\.\d\.\d{10,13}\.\S+$")
_FBP = re.compile(r"^fb\.\d\.\d{10,13}\.\d+(?:\.[A-Za-z0-9_\-]+)?$")
_CURRENCY = re.compile(r"^[A-Za-z]{3}$")
_EVENT_KEYS = frozenset(
    {
        "event_name",
        "event_time",
        "event_id",
        "action_source",
        "user_data",
        "custom_data",
        "data_processing_options",
        "data_processing_options_country",
        "data_processing_options_state",
    }
)
_HASHED_KEYS = ("em", "ph", "fn", "ln", "ct", "st", "zp", "country", "external_id")
_FUTURE_LEEWAY_SECONDS = 60


def precheck_event(row: Any, *, names: set[str], action_source: str, now: float, max_age: int) -> str | None:
    """``"stale_event"``, ``"invalid_format"`` or None; values never leave this function."""
    if not isinstance(row, Mapping) or not set(row) <= _EVENT_KEYS:
        return "invalid_format"
    event_time = row.get("event_time")
    if (
        not isinstance(row.get("event_id"), str)
        or not _HEX64.match(row["event_id"])
        or not isinstance(row.get("event_name"), str)
        or row["event_name"] not in names
        or row.get("action_source") != action_source
        or not isinstance(event_time, int)
        or isinstance(event_time, bool)
        or event_time > now + _FUTURE_LEEWAY_SECONDS
        or not _valid_user_data(row.get("user_data"))
        or not _valid_custom_data(row.get("custom_data"), row.get("event_name") == "Purchase")
        or not _valid_ldu(row)
    ):
        return "invalid_format"
    if now - event_time > max_age:
        return "stale_event"
    return None


def build_event(row: Mapping[str, Any], ldu: tuple[int, int] | None) -> Event | None:
    """The SDK ``Event`` of a row that passed ``precheck_event``; None if the SDK refuses it.

    ``ldu`` (country, state) applies Limited Data Use to rows that carry no options of their own.
    """
    user = row["user_data"]
    custom = row.get("custom_data")
    options = row.get("data_processing_options")
    country = row.get("data_processing_options_country")
    state = row.get("data_processing_options_state")
    if options is None and ldu is not None:
        options, (country, state) = ["LDU"], ldu
    event = Event(
        event_name=row["event_name"],
        event_time=row["event_time"],
        event_id=row["event_id"],
        action_source=ActionSource(row["action_source"]),
        user_data=UserData(
            emails=user.get("em"),
            phones=user.get("ph"),
            first_names=user.get("fn"),
            last_names=user.get("ln"),
            cities=user.get("ct"),
            states=user.get("st"),
            zip_codes=user.get("zp"),
            country_codes=user.get("country"),
            external_ids=user.get("external_id"),
            fbc=user.get("fbc"),
            fbp=user.get("fbp"),
        ),
        custom_data=(
            CustomData(value=float(custom["value"]), currency=custom["currency"]) if custom else None
        ),
        data_processing_options=options,
        data_processing_options_country=country,
        data_processing_options_state=state,
    )
    try:
        event.normalize()
    except (TypeError, ValueError):
        # the SDK's messages quote the value; only the fact that it failed is kept
        return None
    return event


def _valid_user_data(user: Any) -> bool:
    if not isinstance(user, Mapping) or not user:
        return False
    for key, value in user.items():
        if key in _HASHED_KEYS:
            if not isinstance(value, list) or not value:
                return False
            if not all(isinstance(v, str) and _HEX64.match(v) for v in value):
                return False
        elif key == "fbc":
            if not isinstance(value, str) or not _FBC.match(value):
                return False
        elif key == "fbp":
            if not isinstance(value, str) or not _FBP.match(value):
                return False
        else:
            return False
    return True


def _valid_custom_data(custom: Any, required: bool) -> bool:
    if custom is None:
        return not required
    if not isinstance(custom, Mapping) or set(custom) != {"value", "currency"}:
        return False
    value = custom["value"]
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and isinstance(custom["currency"], str)
        and bool(_CURRENCY.match(custom["currency"]))
    )


def _valid_ldu(row: Mapping[str, Any]) -> bool:
    options = row.get("data_processing_options")
    if options is None:
        return "data_processing_options_country" not in row and "data_processing_options_state" not in row
    if not isinstance(options, list) or any(o != "LDU" for o in options):
        return False
    if not options:
        return True
    return row.get("data_processing_options_country") in (0, 1) and row.get(
        "data_processing_options_state"
    ) in (0, 1000)
