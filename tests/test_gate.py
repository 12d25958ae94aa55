"""The PHI egress gate: allowlisted keys and value checks per destination, fail closed."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from etl import gate
from etl.errors import GateViolation
from etl.gate import check_outbound
from etl.identifiers import normalize_postal_code_google
from etl.quality_suites import POSTAL
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
        "gclid": "Cj0KCQiA-abc_123def456ghi_BwE",
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
            "fbc": "fb.1.1777100000000.IwAR-x_0123456789abcdef",
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
            "not a click ID",
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
        (
            "google_customer_match",
            ("user_identifiers", 1, "address_info", "postal_code"),
            "JANE DOE",
            "not a postal code",
        ),
        (
            "google_customer_match",
            ("user_identifiers", 1, "address_info", "postal_code"),
            "94110 SF CA",
            "not a postal code",
        ),
        ("meta_audience", ("data", 0, 1), "4155550123", "not a 64-hex SHA-256 or empty"),
        # a trailing newline is not part of a hash (``$`` alone would let it through)
        ("meta_events", ("user_data", "em", 0), "a" * 64 + "\n", "not a 64-hex SHA-256"),
        ("meta_audience", ("data", 0, 1), "b" * 64 + "\n", "not a 64-hex SHA-256 or empty"),
        ("google_conversions", ("order_id",), "c" * 64 + "\n", "not an opaque ID"),
        ("google_conversions", ("gclid",), "Cj0KCQ\n", "not a click ID"),
        # identifiers filed in a click-ID column: none has a click ID's shape
        ("google_conversions", ("gclid",), "jane.doe134", "not a click ID"),
        ("google_conversions", ("gbraid",), "4155550135", "not a click ID"),
        ("google_conversions", ("wbraid",), "PT-000261", "not a click ID"),
        ("meta_events", ("user_data", "fbc"), "fb.1.1792702786000.4155550135", "not an fbc value"),
        # words filed in a click-ID column: the right characters and length, but a slug
        ("google_conversions", ("gclid",), "CANARY_SERVICE_Botox_hyperhidrosis", "not a click ID"),
        ("google_conversions", ("wbraid",), "semaglutide_weight_loss_nov", "not a click ID"),
        ("meta_events", ("user_data", "fbc"), "fb.1.1793552400000.Jane-Doe-sweaty-palms", "not an fbc value"),
        # a creation time in microseconds: the gate let it out, Meta's sandbox refused the request
        (
            "meta_events",
            ("user_data", "fbc"),
            "fb.1.1793552400000000.IwAR2F4-dbP0l7Mn1IawQQ",
            "not an fbc value",
        ),
        ("meta_events", ("user_data", "fbp"), "fb.1.17935524000001.1116446470", "not an fbp value"),
        (
            "meta_events",
            ("user_data", "fbp"),
            "fb.1.1754670832319.4717288100.Jane_Doe_Botox",
            "not an fbp value",
        ),
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


def test_an_unlisted_key_that_is_data_is_not_named() -> None:
    # a builder bug that turns values into keys: the key itself is the PHI
    row = copy.deepcopy(GOOD["meta_events"])
    row["user_data"]["jane.doe@gmail.com"] = "x"
    row["custom_data"] = {"value": 1.0, "currency": "USD", "Botox - Forehead Lines": 1}
    with pytest.raises(GateViolation) as info:
        check_outbound(CONFIG, {"meta_events": [row]})
    message = str(info.value)
    assert "<unlisted key>" in message and "field not in the allowlist" in message
    assert "jane" not in message and "Botox" not in message


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
    assert f".{next(iter(extra))}" in str(info.value)  # a field name helps whoever debugs it


def test_identifier_oneof_and_limits() -> None:
    row = copy.deepcopy(GOOD["google_conversions"])
    row["user_identifiers"] = [{"hashed_email": H, "hashed_phone_number": H}]
    with pytest.raises(GateViolation, match="exactly one identifier"):
        check_outbound(CONFIG, {"google_conversions": [row]})
    row["user_identifiers"] = [{"hashed_email": H}] * 6
    with pytest.raises(GateViolation, match="list length"):
        check_outbound(CONFIG, {"google_conversions": [row]})


REQUIRED = {
    "google_conversions": ("conversion_action", "conversion_date_time", "order_id"),
    "meta_events": ("event_name", "event_time", "event_id", "action_source", "user_data"),
    "google_customer_match": ("operation", "user_identifiers"),
    "meta_audience": ("operation", "schema", "data"),
}


@pytest.mark.parametrize(("dest", "key"), [(d, k) for d, keys in REQUIRED.items() for k in keys])
def test_a_row_without_a_required_field_stops_the_run(dest: str, key: str) -> None:
    # the later checks read these fields by name; a row missing one is refused here, named
    row = copy.deepcopy(GOOD[dest])
    del row[key]
    with pytest.raises(GateViolation) as info:
        check_outbound(CONFIG, {dest: [GOOD[dest], row]})
    assert f"{dest}[1].{key}: required field missing" in str(info.value)


def test_only_the_required_fields_are_required() -> None:
    optional = {d: set(GOOD[d]) - set(keys) for d, keys in REQUIRED.items()}
    assert optional["google_conversions"] >= {"gclid", "user_identifiers", "conversion_value"}
    for dest, keys in optional.items():
        row = {k: v for k, v in GOOD[dest].items() if k not in keys}
        check_outbound(CONFIG, {dest: [row]})


def test_unconfigured_destination_is_refused() -> None:
    config = make_config(Path("."), meta=None)
    with pytest.raises(GateViolation, match="not configured"):
        check_outbound(config, {"meta_events": [GOOD["meta_events"]]})


# the bulk acceptance (gate._accepts) never lets through what the row-by-row walk refuses ---------


class _Text(str):
    """A str subclass: allowed by the allowlist, outside the bulk check's exact types."""


ODD_VALUES = [None, 0, 1778000000, 1.5, float("nan"), True, "", "US", "create", "add", "USD", "A" * 64, "a" * 63,
              "a" * 65, "a" * 64 + "\n", "g" * 64, H + " ", _Text(H), (H,), [H], [], {}, {"x": H}, [[H] * 8],
              [H, ""] * 4]  # fmt: skip


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, child in items:
        out += _paths(child, (*prefix, key))
    return out


def _mutations(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The row with every node replaced by every odd value, deleted, or given an extra key."""
    out = []
    for path in _paths(row):
        for value in [*ODD_VALUES, "__delete__"]:
            changed = copy.deepcopy(row)
            node = changed
            for key in path[:-1]:
                node = node[key]
            if value == "__delete__":
                del node[path[-1]]
            else:
                node[path[-1]] = value
            out.append(changed)
    for path in [(), *_paths(row)]:
        changed = copy.deepcopy(row)
        node = changed
        for key in path:
            node = node[key]
        if isinstance(node, dict):
            node["extra"] = H
            out.append(changed)
    return out


def _walked(destination: str, rows: list[Any], spec: Any) -> list[tuple[str, str]]:
    """The gate's definition: every row walked, no shortcut."""
    out: list[tuple[str, str]] = []
    for i, row in enumerate(rows):
        gate._walk(row, spec, f"{destination}[{i}]", out)
    return out


@pytest.mark.parametrize("dest", list(GOOD))
def test_bulk_check_agrees_with_the_walk_on_every_mutation(dest: str) -> None:
    spec = gate.specs_for(CONFIG)[dest]
    mutations = _mutations(GOOD[dest])
    assert len(mutations) > 100
    refused = 0
    for changed in mutations:
        rows = [GOOD[dest]] * 3 + [changed] + [GOOD[dest]] * 2
        expected = _walked(dest, rows, spec)
        if expected:
            refused += 1
            assert not gate._accepts(spec, rows), changed
        assert gate.find_violations(dest, rows, spec) == expected
    assert refused > len(mutations) // 2  # the mutations do hit the allowlist


@pytest.mark.parametrize("dest", list(GOOD))
def test_clean_rows_are_accepted_in_bulk(dest: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The common case never reaches the row-by-row path (which stays for naming violations)."""
    spec = gate.specs_for(CONFIG)[dest]
    assert gate._accepts(spec, [GOOD[dest]] * 500)
    monkeypatch.setattr(gate, "_walk", lambda *a: pytest.fail("walked a clean row"))
    monkeypatch.setattr(gate, "_compile", lambda *a: pytest.fail("compiled for clean rows"))
    check_outbound(CONFIG, {dest: [copy.deepcopy(GOOD[dest]) for _ in range(500)]})


def test_an_audience_batch_with_one_bad_cell_names_it() -> None:
    row = copy.deepcopy(GOOD["meta_audience"])
    row["data"] = [[H, "", H, H, H, H, H, H] for _ in range(10_000)]
    row["data"][9_876][3] = "415-555-0123"
    with pytest.raises(GateViolation) as info:
        check_outbound(CONFIG, {"meta_audience": [GOOD["meta_audience"], row]})
    assert "meta_audience[1].data[9876][3]: not a 64-hex SHA-256 or empty" in str(info.value)
    assert "555" not in str(info.value)


@pytest.mark.parametrize(
    ("raw", "country"),
    [("M1 1AE", "GB"), ("k1a 0b1", "CA"), ("1234-567", "PT"), ("75008", "FR"), ("100-0001", "JP"),
     ("2000", "AU"), ("94110-1234", "US"), ("d02 x285", "IE")],
)  # fmt: skip
def test_every_postal_code_the_normalizer_sends_passes_the_gate(raw: str, country: str) -> None:
    # a patient from abroad is a Customer Match member like any other, not a reason to stop the run
    code = normalize_postal_code_google(raw, country)
    assert code is not None
    row = copy.deepcopy(GOOD["google_customer_match"])
    row["user_identifiers"][1]["address_info"].update(postal_code=code, country_code=country)
    check_outbound(CONFIG, {"google_customer_match": [row]})
    assert re.search(POSTAL, code)  # and the outbound GX suite's postal_code_format agrees


@settings(max_examples=300, deadline=None)
@given(st.text(), st.sampled_from(["GB", "CA", "PT", "US", "JP"]))
def test_the_gate_accepts_whatever_the_postal_normalizer_returns(text: str, country: str) -> None:
    code = normalize_postal_code_google(text, country)
    assert code is None or gate.GOOGLE_POSTAL_CODE.fullmatch(code)
