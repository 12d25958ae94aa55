"""What the Meta sandbox refuses, and how: Graph error bodies, limits and request validation.

Why: the sandbox (``etl.sandbox.meta``) must refuse what Meta refuses, with Meta's codes, so the
adapters' error handling is proven against it. The fields, limits and error codes are
``shared/reference/ad-platforms.md`` section B; what the SDK sends on the wire (form bodies, CAPI
``data`` as a JSON array of JSON-encoded events) is ``shared/reference/stack.md`` section 5; the
behaviour worth knowing is in ``docs/meta.md`` ("The sandbox"). Subcodes 2804003 (event too old;
RudderStack's mapping), 1713230 (audience upload blocked; Meta) and 33 (unknown object; Graph)
are real; subcodes 90000xx are the sandbox's own.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_EVENTS_PER_REQUEST = 1_000
MAX_AUDIENCE_ROWS = 10_000
SUBCODE_UNKNOWN_OBJECT = 33
SUBCODE_EVENT_TOO_OLD = 2804003
SUBCODE_AUDIENCE_BLOCKED = 1713230
SUBCODE_INVALID_EVENT = 9000001
SUBCODE_TOO_MANY = 9000002
SUBCODE_SESSION = 9000003
SUBCODE_FUTURE_EVENT = 9000004
SUBCODE_BAD_PAYLOAD = 9000005

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_FBC = re.compile(r"^fb\.\d\.\d{10,13}\.\S+$")
_FBP = re.compile(r"^fb\.\d\.\d{10,13}\.\d+(?:\.[A-Za-z0-9_\-]+)?$")  # with the parameter builder's appendix
_HASHED_USER_KEYS = ("em", "ph", "fn", "ln", "ct", "st", "zp", "country", "ge", "db")
_CLEAR_USER_KEYS = ("external_id", "fbc", "fbp", "client_ip_address", "client_user_agent")
_ACTION_SOURCES = frozenset(
    {
        "email",
        "website",
        "app",
        "phone_call",
        "chat",
        "physical_store",
        "system_generated",
        "business_messaging",
        "other",
    }
)
_AUDIENCE_KEYS = frozenset(
    {
        "EMAIL",
        "PHONE",
        "FN",
        "LN",
        "FI",
        "GEN",
        "DOBY",
        "DOBM",
        "DOBD",
        "CT",
        "ST",
        "ZIP",
        "COUNTRY",
        "MADID",
        "EXTERN_ID",
        "LOOKALIKE_VALUE",
    }
)
_UNHASHED_AUDIENCE_KEYS = frozenset({"MADID", "EXTERN_ID", "LOOKALIKE_VALUE"})
_SINGLE_KEY_SCHEMAS = {"EMAIL_SHA256": "EMAIL", "PHONE_SHA256": "PHONE"}


class GraphError(Exception):
    """A Graph API error answer: HTTP status, ``error`` body fields and extra headers."""

    def __init__(
        self,
        status: int,
        code: int,
        message: str,
        subcode: int | None = None,
        *,
        transient: bool = False,
        title: str | None = None,
        error_type: str = "OAuthException",
        headers: dict[str, str] | None = None,
        html: bool = False,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.subcode = status, code, message, subcode
        self.transient, self.title, self.error_type = transient, title, error_type
        self.headers = headers or {}
        self.html = html

    def body(self, fbtrace_id: str) -> dict[str, Any]:
        error: dict[str, Any] = {
            "message": self.message,
            "type": self.error_type,
            "code": self.code,
        }
        if self.subcode is not None:
            error["error_subcode"] = self.subcode
        if self.transient:
            error["is_transient"] = True
        if self.title:
            error["error_user_title"] = self.title
            error["error_user_msg"] = self.title
        error["fbtrace_id"] = fbtrace_id
        return {"error": error}


def invalid(message: str, subcode: int = SUBCODE_INVALID_EVENT, title: str | None = None) -> GraphError:
    """Code 100 (invalid parameter) with a subcode, as Meta rejects a bad request."""
    return GraphError(400, 100, f"Invalid parameter: {message}", subcode, title=title or message)


def unknown_object(method: str, object_id: str) -> GraphError:
    """Code 100/33: the object does not exist, cannot be reached, or lacks the edge."""
    return GraphError(
        400,
        100,
        f"Unsupported {method.lower()} request. Object with ID '{object_id}' does not exist, "
        "cannot be loaded due to missing permissions, or does not support this operation.",
        SUBCODE_UNKNOWN_OBJECT,
        error_type="GraphMethodException",
    )


def check_event(event: Any, now: float, poisoned: dict[str, int]) -> None:
    """Raise the Graph error Meta would answer for one CAPI event (``poisoned``: see
    ``MetaSandbox.reject_event``)."""
    if not isinstance(event, dict):
        raise invalid("each event must be an object")
    if not isinstance(event.get("event_name"), str) or not event["event_name"]:
        raise invalid("event_name is required")
    event_time = event.get("event_time")
    if not isinstance(event_time, int) or isinstance(event_time, bool):
        raise invalid("event_time must be a Unix timestamp in seconds")
    source = event.get("action_source")
    if source not in _ACTION_SOURCES:
        raise invalid("action_source is missing or not supported")
    if event.get("event_id") in poisoned:
        raise invalid("the event was rejected", poisoned[str(event["event_id"])])
    limit_days = 62 if source == "physical_store" else 7
    if now - event_time > limit_days * 86_400:
        raise invalid(
            "event_time is too far in the past",
            SUBCODE_EVENT_TOO_OLD,
            "Event Timestamp Too Old",
        )
    if event_time > now + 60:
        raise invalid("event_time is in the future", SUBCODE_FUTURE_EVENT)
    check_user_data(event.get("user_data"))
    custom = event.get("custom_data")
    if custom is not None:
        value, currency = custom.get("value"), custom.get("currency")
        if value is not None and (
            not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value)
        ):
            raise invalid("custom_data.value must be a number")
        if currency is not None and not re.fullmatch(r"[A-Za-z]{3}", str(currency)):
            raise invalid("custom_data.currency must be an ISO 4217 code")
    if event["event_name"] == "Purchase" and (
        not isinstance(custom, dict) or custom.get("value") is None or not custom.get("currency")
    ):
        raise invalid("Purchase events require custom_data.value and custom_data.currency")
    check_ldu(event)


def check_user_data(user_data: Any) -> None:
    """Raise unless ``user_data`` holds only known keys, hashed where Meta expects hashes."""
    if not isinstance(user_data, dict) or not user_data:
        raise invalid("user_data needs at least one customer information parameter")
    for key, value in user_data.items():
        if key in _HASHED_USER_KEYS:
            values = value if isinstance(value, list) else [value]
            if not values or not all(isinstance(v, str) and _HEX64.match(v) for v in values):
                raise invalid(f"user_data.{key} must be SHA-256 hex")
        elif key == "fbc":
            if not isinstance(value, str) or not _FBC.match(value):
                raise invalid("user_data.fbc is not fb.<n>.<ms>.<fbclid>")
        elif key == "fbp":
            if not isinstance(value, str) or not _FBP.match(value):
                raise invalid("user_data.fbp is not fb.<n>.<ms>.<random>")
        elif key not in _CLEAR_USER_KEYS:
            raise invalid(f"user_data.{key} is not a customer information parameter")


def check_ldu(event: dict[str, Any]) -> None:
    """Raise unless the Limited Data Use options are absent, ``[]``, or ``["LDU"]`` with both codes."""
    options = event.get("data_processing_options")
    if options is None:
        return
    if not isinstance(options, list) or any(o != "LDU" for o in options):
        raise invalid('data_processing_options must be [] or ["LDU"]')
    if options:
        if event.get("data_processing_options_country") not in (0, 1):
            raise invalid("data_processing_options_country must be 0 or 1")
        if event.get("data_processing_options_state") not in (0, 1000):
            raise invalid("data_processing_options_state is required (0 or 1000) without an IP")


def parse_payload(params: dict[str, list[str]]) -> tuple[list[str], list[list[str]]]:
    """The schema and data rows of an audience ``payload``; raises for a malformed one."""
    try:
        payload = json.loads(params["payload"][0])
        schema = payload["schema"]
        data = payload["data"]
    except (KeyError, IndexError, TypeError, ValueError):
        raise invalid("payload needs schema and data", SUBCODE_BAD_PAYLOAD) from None
    if isinstance(schema, str):
        if schema not in _SINGLE_KEY_SCHEMAS or not isinstance(data, list):
            raise invalid("unsupported schema", SUBCODE_BAD_PAYLOAD)
        schema = [_SINGLE_KEY_SCHEMAS[schema]]
        data = [[value] for value in data]
    if (
        not isinstance(schema, list)
        or not schema
        or len(set(schema)) != len(schema)
        or not all(key in _AUDIENCE_KEYS for key in schema)
    ):
        raise invalid("schema must list supported keys once each", SUBCODE_BAD_PAYLOAD)
    if not isinstance(data, list) or not data:
        raise invalid("data must be a non-empty list", SUBCODE_BAD_PAYLOAD)
    if len(data) > MAX_AUDIENCE_ROWS:
        raise invalid("at most 10000 rows per request", SUBCODE_TOO_MANY)
    return schema, data


def valid_row(schema: list[str], row: Any) -> bool:
    """Whether an audience row matches the schema, with at least one value and hashes where due."""
    if not isinstance(row, list) or len(row) != len(schema):
        return False
    filled = 0
    for key, value in zip(schema, row, strict=True):
        if not isinstance(value, str):
            return False
        if value:
            if key not in _UNHASHED_AUDIENCE_KEYS and not _HEX64.match(value):
                return False
            filled += 1
    return filled > 0
