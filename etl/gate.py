"""PHI egress gate (SPEC section 2): the one check every outbound row passes, fail closed.

Each destination has an allowlist written as a small schema tree: a key either maps to a value
check or to a nested tree; any key not in the tree, any value failing its check, any container
of the wrong shape and any row without a ``Required`` field (an operation, an opaque ID) is a
violation. The gate runs on the final rows, before the outbox is written and before anything is
sent, and raises ``GateViolation`` naming field paths and reasons, never values: a violation
message may reach a log, a task summary or a pager.

``_walk`` is the definition. Checking a million appointments' rows (twice a run: the plan in
memory, then as read back) goes through two shortcuts that may only say "clean": ``_accepts``
checks a whole destination a tree node at a time, and when it says no, ``_compile`` checks each
row so that only refused rows are walked. ``tests/test_gate.py`` holds both to the walk.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import chain
from typing import Any

from etl.config import ClinicConfig
from etl.errors import GateViolation
from etl.identifier_tables import ISO_4217
from etl.identifiers import CLICK_ID, FBC, FBP, GOOGLE_POSTAL_CODE
from etl.outbox import collector_paused
from etl.payloads import META_AUDIENCE_BATCH, META_AUDIENCE_SCHEMA

Check = Callable[[Any], str | None]  # returns a reason, or None when the value may leave

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CLICK, _FBC, _FBP = CLICK_ID, FBC, FBP  # the shapes extract keeps (etl.identifiers)
_GOOGLE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}[+-]\d{2}:\d{2}$")
_COUNTRY = re.compile(r"^[A-Z]{2}$")


class _Pattern:
    """A text value matching ``regex`` (a class, not a closure, so the bulk check can see it)."""

    def __init__(self, regex: re.Pattern[str], reason: str):
        self.regex, self.reason = regex, reason

    def __call__(self, v: Any) -> str | None:
        return None if isinstance(v, str) and self.regex.fullmatch(v) else self.reason


class _OneOf:
    """A text value from a fixed set."""

    def __init__(self, allowed: Iterable[Any], reason: str):
        self.allowed, self.reason = frozenset(allowed), reason

    def __call__(self, v: Any) -> str | None:
        return None if isinstance(v, str) and v in self.allowed else self.reason


def _number(v: Any) -> str | None:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    return None if ok else "not a finite number"


def _epoch_seconds(v: Any) -> str | None:
    ok = isinstance(v, int) and not isinstance(v, bool) and 10**9 <= v < 10**10
    return None if ok else "not Unix seconds"


def _small_int(v: Any) -> str | None:
    return None if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 100_000 else "not a code"


# Keys named in a violation when they are not allowlisted: our input columns (SPEC section 3) and
# platform fields we never send. Any other key is shown as "<unlisted key>": when a builder bug
# turns a value into a key, the key is the PHI.
_NAMEABLE_KEYS = frozenset({
    "appointment_id", "patient_id", "lead_id", "first_name", "last_name", "email", "phone", "zip",
    "city", "state", "country", "service", "status", "start_at", "revenue", "currency",
    "location_id", "updated_at", "consent_marketing", "consent_at", "consent_revoked_at",
    "created_at", "gclid", "gbraid", "wbraid", "fbclid", "fbc", "fbp", "source",
    "treatment_interest", "notes", "landing_page_url", "event_source_url", "client_ip_address",
    "client_user_agent", "content_name", "content_category", "content_ids", "content_type",
    "contents", "external_id", "page_url", "referrer_url", "name", "address", "dob", "db", "ge",
    "fn", "ln", "ct", "st", "zp", "em", "ph", "value", "order_id", "event_id", "event_name",
    "event_time", "user_data", "custom_data", "user_identifiers", "consent", "data", "schema",
})  # fmt: skip

HASH = _Pattern(_HEX64, "not a 64-hex SHA-256")
CURRENCY: Check = _OneOf(ISO_4217, "not an ISO 4217 code")


class ListOf:
    """A list whose items all pass ``item`` (a check or a tree), with a maximum length."""

    def __init__(self, item: Spec, *, max_len: int, min_len: int = 1):
        self.item, self.max_len, self.min_len = item, max_len, min_len


class Exactly:
    """A value that must equal a fixed constant (e.g. the audience schema)."""

    def __init__(self, value: Any, reason: str):
        self.value, self.reason = value, reason


class Required:
    """A field every row must carry: a row without it is malformed, and the gate fails closed."""

    def __init__(self, spec: Spec):
        self.spec = spec


def _unwrap(spec: Any) -> Any:
    return spec.spec if isinstance(spec, Required) else spec


def _required(tree: Mapping[str, Any]) -> frozenset[str]:
    return frozenset(key for key, sub in tree.items() if isinstance(sub, Required))


class OneKey:
    """A dict with exactly one key of the tree (protobuf ``oneof`` as in ``UserIdentifier``)."""

    def __init__(self, tree: Mapping[str, Any]):
        self.tree = tree


Spec = Check | Mapping[str, Any] | ListOf | Exactly | OneKey  # a Mapping value may be Required(Spec)


def _walk(value: Any, spec: Spec, path: str, out: list[tuple[str, str]]) -> None:
    if isinstance(spec, Exactly):
        if value != spec.value:
            out.append((path, spec.reason))
    elif isinstance(spec, ListOf):
        if not isinstance(value, list):
            out.append((path, "not a list"))
            return
        if not spec.min_len <= len(value) <= spec.max_len:
            out.append((path, f"list length outside {spec.min_len}..{spec.max_len}"))
        for i, item in enumerate(value):
            _walk(item, spec.item, f"{path}[{i}]", out)
    elif isinstance(spec, OneKey):
        if not isinstance(value, dict) or len(value) != 1:
            out.append((path, "must hold exactly one identifier"))
            return
        _walk(value, spec.tree, path, out)
    elif isinstance(spec, Mapping):
        if not isinstance(value, dict):
            out.append((path, "not an object"))
            return
        for key in value:
            if key not in spec:
                shown = key if key in _NAMEABLE_KEYS else "<unlisted key>"
                out.append((f"{path}.{shown}", "field not in the allowlist"))
        for key, sub in spec.items():
            if key in value:
                _walk(value[key], _unwrap(sub), f"{path}.{key}", out)
            elif isinstance(sub, Required):
                out.append((f"{path}.{key}", "required field missing"))
    else:
        reason = spec(value)
        if reason:
            out.append((path, reason))


def _google_conversion_spec(config: ClinicConfig) -> Mapping[str, Any]:
    assert config.google_ads is not None
    actions = config.google_ads.conversion_actions.model_dump().values()
    consent = _OneOf(("GRANTED", "DENIED"), "not GRANTED/DENIED")
    return {
        "conversion_action": Required(_OneOf(actions, "not a configured conversion action")),
        "conversion_date_time": Required(_Pattern(_GOOGLE_TIME, "not yyyy-mm-dd hh:mm:ss+hh:mm")),
        "conversion_value": _number,
        "currency_code": CURRENCY,
        "order_id": Required(_Pattern(_HEX64, "not an opaque ID")),
        "gclid": _Pattern(_CLICK, "not a click ID"),
        "gbraid": _Pattern(_CLICK, "not a click ID"),
        "wbraid": _Pattern(_CLICK, "not a click ID"),
        "user_identifiers": ListOf(OneKey({"hashed_email": HASH, "hashed_phone_number": HASH}), max_len=5),
        "consent": {"ad_user_data": consent, "ad_personalization": consent},
    }


def _meta_event_spec(config: ClinicConfig) -> Mapping[str, Any]:
    assert config.meta is not None
    hashes = ListOf(HASH, max_len=10)
    return {
        "event_name": Required(
            _OneOf(config.meta.event_names.model_dump().values(), "not a configured event name")
        ),
        "event_time": Required(_epoch_seconds),
        "event_id": Required(_Pattern(_HEX64, "not an opaque ID")),
        "action_source": Required(_OneOf((config.meta.action_source,), "not the configured action_source")),
        "user_data": Required(
            {
                **{
                    key: hashes
                    for key in ("em", "ph", "fn", "ln", "ct", "st", "zp", "country", "external_id")
                },
                "fbc": _Pattern(_FBC, "not an fbc value"),
                "fbp": _Pattern(_FBP, "not an fbp value"),
            }
        ),
        "custom_data": {"value": _number, "currency": CURRENCY},
        "data_processing_options": ListOf(_OneOf(("LDU",), "not LDU"), max_len=1, min_len=0),
        "data_processing_options_country": _small_int,
        "data_processing_options_state": _small_int,
    }


_GOOGLE_MEMBER = {
    "operation": Required(_OneOf(("create", "remove"), "not create/remove")),
    "user_identifiers": Required(
        ListOf(
            OneKey(
                {
                    "hashed_email": HASH,
                    "hashed_phone_number": HASH,
                    "address_info": {
                        "hashed_first_name": HASH,
                        "hashed_last_name": HASH,
                        "country_code": _Pattern(_COUNTRY, "not an ISO 3166 alpha-2 code"),
                        "postal_code": _Pattern(GOOGLE_POSTAL_CODE, "not a postal code"),
                    },
                }
            ),
            max_len=20,
        )
    ),
}


def _audience_cell(v: Any) -> str | None:
    ok = v == "" or (isinstance(v, str) and _HEX64.fullmatch(v))
    return None if ok else "not a 64-hex SHA-256 or empty"


_META_AUDIENCE = {
    "operation": Required(_OneOf(("add", "remove"), "not add/remove")),
    "schema": Required(Exactly(META_AUDIENCE_SCHEMA, "not the configured multi-key schema")),
    "data": Required(ListOf(ListOf(_audience_cell, max_len=8, min_len=8), max_len=META_AUDIENCE_BATCH)),
}


def specs_for(config: ClinicConfig) -> dict[str, Spec]:
    specs: dict[str, Spec] = {
        "google_customer_match": _GOOGLE_MEMBER,
        "meta_audience": _META_AUDIENCE,
    }
    if config.google_ads is not None:
        specs["google_conversions"] = _google_conversion_spec(config)
    if config.meta is not None:
        specs["meta_events"] = _meta_event_spec(config)
    return specs


_HEX_DIGITS = b"0123456789abcdef"
_WIDTH_64, _WIDTH_0_OR_64 = frozenset({64}), frozenset({0, 64})


def _all_hex(values: list[Any], widths: frozenset[int]) -> bool:
    """Every value an exact ``str`` of 0-9a-f only, of a length in ``widths``.

    Three C-level passes over all values (types, lengths, the characters of all values joined)
    instead of one regex call per value: 2.7 million hashes per run at a million appointments.
    """
    if set(map(type, values)) != {str} or not set(map(len, values)) <= widths:
        return False
    joined = "".join(values)
    return joined.isascii() and not joined.encode("ascii").translate(None, _HEX_DIGITS)


def _accepts(spec: Spec, values: list[Any]) -> bool:
    """True only if every one of ``values`` passes ``spec``: one tree node for a whole column.

    A row-by-row check pays a Python call per field of every row; here each node of the spec
    costs a few C-level passes over all rows' values at that node (lists are flattened, fields
    gathered), and hashes are checked in bulk. It is deliberately narrower than the allowlist
    (exact types only, e.g. no ``str`` subclass) and names no path: when it says no, the rows
    are checked one by one, so a violation is always found and named by ``_walk``.
    """
    if not values:
        return True
    if isinstance(spec, Exactly):
        expected = spec.value
        return not any(v != expected for v in values)
    if isinstance(spec, ListOf):
        if set(map(type, values)) != {list}:
            return False
        lengths = set(map(len, values))
        if min(lengths) < spec.min_len or max(lengths) > spec.max_len:
            return False
        return _accepts(spec.item, list(chain.from_iterable(values)))
    if isinstance(spec, OneKey):
        if set(map(type, values)) != {dict} or set(map(len, values)) != {1}:
            return False
        return _accepts(spec.tree, values)
    if isinstance(spec, Mapping):
        if set(map(type, values)) != {dict}:
            return False
        by_key: defaultdict[Any, list[Any]] = defaultdict(list)
        for value in values:
            for key, item in value.items():
                by_key[key].append(item)
        if not all(type(key) is str and key in spec for key in by_key):
            return False
        # a dict holds a key once, so a key every row carries has as many values as there are rows
        if any(len(by_key.get(key, ())) != len(values) for key in _required(spec)):
            return False
        return all(_accepts(_unwrap(spec[key]), items) for key, items in by_key.items())
    if isinstance(spec, _Pattern) and spec.regex is _HEX64:
        return _all_hex(values, _WIDTH_64)
    if spec is _audience_cell:
        return _all_hex(values, _WIDTH_0_OR_64)
    if isinstance(spec, _Pattern | _OneOf):
        # few distinct values (operations, names, currencies, dates): each checked once
        return set(map(type, values)) == {str} and all(spec(v) is None for v in set(values))
    return all(spec(v) is None for v in values)


def _compile(spec: Spec) -> Callable[[Any], bool]:
    """A yes/no checker for one row that builds no paths.

    Used once ``_accepts`` has refused a destination's rows: only rows it refuses are walked
    again with ``_walk`` to name the field paths, so a violation costs string formatting for
    its own row only.
    """
    if isinstance(spec, Exactly):
        expected = spec.value
        return lambda v: bool(v == expected)
    if isinstance(spec, ListOf):
        item, lo, hi = _compile(spec.item), spec.min_len, spec.max_len
        return lambda v: isinstance(v, list) and lo <= len(v) <= hi and all(item(x) for x in v)
    if isinstance(spec, OneKey):
        tree = _compile(spec.tree)
        return lambda v: isinstance(v, dict) and len(v) == 1 and tree(v)
    if isinstance(spec, Mapping):
        fields = {key: _compile(_unwrap(sub)) for key, sub in spec.items()}
        required = _required(spec)
        return lambda v: (
            isinstance(v, dict)
            and required <= v.keys()
            and all(k in fields and fields[k](x) for k, x in v.items())
        )
    check = spec
    return lambda v: check(v) is None


def find_violations(destination: str, rows: Sequence[Any], spec: Spec) -> list[tuple[str, str]]:
    """Every (field path, reason) of ``rows``; clean rows cost one bulk pass (``_accepts``)."""
    try:
        with collector_paused():
            clean = _accepts(spec, list(rows))
    except Exception:  # an odd value (say, one that cannot be compared): check row by row
        clean = False
    if clean:
        return []
    fast = _compile(spec)
    out: list[tuple[str, str]] = []
    for i, row in enumerate(rows):
        if not fast(row):
            _walk(row, spec, f"{destination}[{i}]", out)
    return out


def check_outbound(config: ClinicConfig, outbound: Mapping[str, Sequence[Any]]) -> None:
    """Stop the run if any row of any destination carries anything outside the allowlist.

    Raises:
        GateViolation: for the first destination with violations, listing field paths and
            reasons (never values); nothing has been written or sent at that point.
    """
    specs = specs_for(config)
    for destination, rows in outbound.items():
        if not rows:
            continue
        spec = specs.get(destination)
        if spec is None:
            raise GateViolation(destination, [(destination, "destination not configured for this clinic")])
        violations = find_violations(destination, rows, spec)
        if violations:
            raise GateViolation(destination, violations)
