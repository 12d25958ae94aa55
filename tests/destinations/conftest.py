"""Google destination fixtures: one sandbox Google per test module, rows and configs.

Only Google fixtures live here (all prefixed ``google_``); Meta keeps its own in its module.
The sandbox is module-scoped because gRPC reads its TLS roots once per process: it must start
before the first secure channel, and every module reuses the process's one certificate.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from etl.config import ClinicConfig
from etl.sandbox.google import GoogleSandbox
from etl.sandbox.tls import sandbox_tls

# gRPC loads its TLS roots at the first secure channel of the process (a live client built in a
# test makes one): point them at the sandbox certificate before any test can do that
sandbox_tls()

GOOGLE_CUSTOMER = "1234567890"
GOOGLE_ACTION = f"customers/{GOOGLE_CUSTOMER}/conversionActions/111"
GOOGLE_ACTION_2 = f"customers/{GOOGLE_CUSTOMER}/conversionActions/222"
GOOGLE_LIST = f"customers/{GOOGLE_CUSTOMER}/userLists/555"


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@pytest.fixture(scope="module")
def google_sandbox_module() -> Iterator[GoogleSandbox]:
    with GoogleSandbox() as sandbox:
        yield sandbox


@pytest.fixture
def google_sandbox(google_sandbox_module: GoogleSandbox) -> GoogleSandbox:
    """The module's sandbox, emptied (record, state and knobs) for this test."""
    google_sandbox_module.reset()
    return google_sandbox_module


@pytest.fixture
def google_config() -> Callable[..., ClinicConfig]:
    def make(api: str = "data_manager", **google: Any) -> ClinicConfig:
        return ClinicConfig.model_validate(
            {
                "clinic_id": "demo-clinic",
                "timezone": "America/Los_Angeles",
                "sources": {"appointments": {"path": "a.csv"}, "leads": {"path": "l.csv"}},
                "google_ads": {
                    "customer_id": GOOGLE_CUSTOMER,
                    "conversion_actions": {
                        "consultation": GOOGLE_ACTION,
                        "purchase": GOOGLE_ACTION_2,
                    },
                    "suppression_user_list": GOOGLE_LIST,
                    "api": api,
                    **google,
                },
            }
        )

    return make


@pytest.fixture
def google_conversion() -> Callable[..., dict[str, Any]]:
    """``google_conversion(tag, **overrides)``: one outbox conversion row (SPEC section 5)."""

    def make(tag: str, **overrides: Any) -> dict[str, Any]:
        row: dict[str, Any] = {
            "conversion_action": GOOGLE_ACTION,
            "conversion_date_time": "2026-10-05 14:30:00-07:00",
            "conversion_value": 450.0,
            "currency_code": "USD",
            "order_id": _sha(f"order-{tag}"),
            "gclid": f"Cj0KCQ-{tag}",
            "user_identifiers": [
                {"hashed_email": _sha(f"{tag}@example.org")},
                {"hashed_phone_number": _sha(f"+1415555{tag}")},
            ],
            "consent": {"ad_user_data": "GRANTED"},
        }
        row.update(overrides)
        return {k: v for k, v in row.items() if v is not None}

    return make


@pytest.fixture
def google_member() -> Callable[..., dict[str, Any]]:
    """``google_member(tag, operation="create", address=True)``: one Customer Match row."""

    def make(tag: str, operation: str = "create", *, address: bool = True, **extra: Any) -> dict[str, Any]:
        identifiers: list[dict[str, Any]] = [{"hashed_email": _sha(f"{tag}@example.org")}]
        if address:
            identifiers.append(
                {
                    "address_info": {
                        "hashed_first_name": _sha(f"first-{tag}"),
                        "hashed_last_name": _sha(f"last-{tag}"),
                        "country_code": "US",
                        "postal_code": extra.pop("postal_code", "94045"),
                    }
                }
            )
        return {"operation": operation, "user_identifiers": identifiers, **extra}

    return make
