"""The PHI egress gate: allowlisted keys and value checks per destination, fail closed."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from etl.errors import GateViolation
from etl.gate import check_outbound
from tests.conftest import make_config

H = "a" * 64
CONFIG = make_config(Path("."))

GOOD = {
    "google_conversions": {
        "conversion_action": "customers/1234567890/conversionActions/111",
        "conversion_date_time": "2026-05-05 10:00:00-07:00",
        "conversion_value": 450.0,
        "currency_code": "USD",
        "order_id": H,
        "gclid": "Cj0KCQiA-abc_123",
        "user_identifiers": [{"hashed_email": H}, {"hashed_phone_number": H}],
        "consent": {"ad_user_data": "GRANTED"},
    },
    "meta_events": {
        "event_name": "Purchase",
        "event_time": 1778000000,
        "event_id": H,
        "action_source": "physical_store",
        "user_data": {
            "em": [H],
            "ph": [H],
            "fn": [H],
            "country": [H],
            "external_id": [H],
            "fbc": "fb.1.1777100000000.IwAR-x",
            "fbp": "fb.1.1777100000000.123",
        },
        "custom_data": {"value": 450.0, "currency": "USD"},
    },
    "google_customer_match": {
        "operation": "create",
        "user_identifiers": [
            {"hashed_email": H},
            {
                "address_info": {
                    "hashed_first_name": H,
                    "hashed_last_name": H,
                    "country_code": "US",
                    "postal_code": "94110",
                }
            },
        ],
    },
    "meta_audience": {
        "operation": "add",
        "schema": ["EMAIL", "PHONE", "FN", "LN", "ZIP", "CT", "ST", "COUNTRY"],
        "data": [[H, "", H, H, H, H, H, H]],
    },
}


def test_good_rows_pass() -> None:
    check_outbound(CONFIG, {dest: [row] for dest, row in GOOD.items()})


@pytest.mark.parametrize(
    ("dest", "path", "value", "reason"),
    [
        (
            "google_conversions",
            ("user_identifiers", 0, "hashed_email"),
            "Jane.Doe@gmail.com",
            "not a 64-hex SHA-256",
        ),
        ("google_conversions", ("order_id",), "APPT-12345", "not an opaque ID"),
        (
            "google_conversions",
            ("conversion_action",),
            "customers/1/conversionActions/9",
            "not a configured conversion action",
        ),
        (
            "google_conversions",
            ("conversion_date_time",),
            "2026-05-05 10:00:00-0700",
            "not yyyy-mm-dd hh:mm:ss+hh:mm",
        ),
        ("google_conversions", ("currency_code",), "usd", "not an ISO 4217 code"),
        ("google_conversions", ("conversion_value",), "450", "not a finite number"),
        (
            "google_conversions",
            ("gclid",),
            "https://spa.example/botox?x=1",
            "not a click-ID charset",
        ),
        ("meta_events", ("event_name",), "Botox", "not a configured event name"),
        ("meta_events", ("user_data", "em", 0), "jane@gmail.com", "not a 64-hex SHA-256"),
        ("meta_events", ("custom_data", "currency"), "XXX", "not an ISO 4217 code"),
        ("meta_events", ("event_time",), 1778000000.5, "not Unix seconds"),
        ("meta_events", ("action_source",), "website", "not the configured action_source"),
        (
            "google_customer_match",
            ("user_identifiers", 1, "address_info", "postal_code"),
            "94110 San Francisco",
            "not a postal code",
        ),
        ("meta_audience", ("data", 0, 1), "4155550123", "not a 64-hex SHA-256 or empty"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 30 and " " not in v else None,
)
def test_bad_values_stop_the_run_naming_the_path_not_the_value(dest, path, value, reason) -> None:
    row = copy.deepcopy(GOOD[dest])
    node = row
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(GateViolation) as info:
        check_outbound(CONFIG, {dest: [GOOD[dest], row]})
    message = str(info.value)
    dotted = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)
    assert f"{dest}[1]{dotted}: {reason}" in message
    assert str(value) not in message


@pytest.mark.parametrize(
    ("dest", "extra"),
    [
        ("google_conversions", {"service": "Botox for hyperhidrosis"}),
        ("meta_events", {"event_source_url": "https://spa.example/botox"}),
        (
            "meta_events",
            {"custom_data": {"value": 1.0, "currency": "USD", "content_name": "Botox"}},
        ),
        ("google_customer_match", {"notes": "sweaty palms"}),
    ],
)
def test_keys_outside_the_allowlist_stop_the_run(dest, extra) -> None:
    row = {**copy.deepcopy(GOOD[dest]), **extra}
    with pytest.raises(GateViolation) as info:
        check_outbound(CONFIG, {dest: [row]})
    assert "field not in the allowlist" in str(info.value)
    assert "Botox" not in str(info.value) and "sweaty" not in str(info.value)


def test_identifier_oneof_and_limits() -> None:
    row = copy.deepcopy(GOOD["google_conversions"])
    row["user_identifiers"] = [{"hashed_email": H, "hashed_phone_number": H}]
    with pytest.raises(GateViolation, match="exactly one identifier"):
        check_outbound(CONFIG, {"google_conversions": [row]})
    row["user_identifiers"] = [{"hashed_email": H}] * 6
    with pytest.raises(GateViolation, match="list length"):
        check_outbound(CONFIG, {"google_conversions": [row]})


def test_unconfigured_destination_is_refused() -> None:
    config = make_config(Path("."), meta=None)
    with pytest.raises(GateViolation, match="not configured"):
        check_outbound(config, {"meta_events": [GOOD["meta_events"]]})
