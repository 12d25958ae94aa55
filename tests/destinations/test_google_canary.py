"""Canary: planted click ids and order ids never reach a log record or an exception message.

Runs every path that logs or raises (success, partial failure, retries, retries exhausted,
bisection, account error, quota) through both real clients with the root logger at DEBUG, so
the SDKs' own request/response logging is exercised too (``quiet_sdk_loggers``).
"""

from __future__ import annotations

import logging
import traceback
import uuid
from typing import Any

import pytest

from etl.destinations.google_common import make_google_destinations
from etl.errors import MedspaError

UPLOAD = {"google_ads": "UploadClickConversions", "data_manager": "IngestEvents"}
MEMBERS = {"google_ads": "AddOfflineUserDataJobOperations", "data_manager": "IngestAudienceMembers"}


@pytest.mark.parametrize("api", ["google_ads", "data_manager"])
def test_no_click_id_or_order_id_in_logs_or_exceptions(
    api, google_sandbox, google_config, google_conversion, google_member, caplog, request
):
    caplog.set_level(logging.DEBUG)
    # a run earlier in this process holds these at WARNING (etl.settings); the worst case is DEBUG
    for name in ("google.ads", "grpc", "urllib3"):
        caplog.set_level(logging.DEBUG, logger=name)
    # google.api_core stops the "google" logger tree from propagating to the root: listen there too
    google_logger = logging.getLogger("google")
    google_logger.addHandler(caplog.handler)
    request.addfinalizer(lambda: google_logger.removeHandler(caplog.handler))
    canaries: list[str] = []

    def planted(tag: str, **overrides: Any) -> dict[str, Any]:
        click, order = f"CANARYCLICK{uuid.uuid4().hex}", f"CANARYORDER{uuid.uuid4().hex}"
        canaries.extend([click, order])
        return google_conversion(tag, gclid=overrides.pop("gclid", click), order_id=order, **overrides)

    conversions, audience = make_google_destinations(
        google_config(api), target="sandbox", sandbox=google_sandbox, retry_wait=0
    )
    unknown = f"unknownCANARY{uuid.uuid4().hex}"
    canaries.append(unknown)
    conversions.send([planted("ok"), planted("nf", gclid=unknown), planted("dup")])
    google_sandbox.fail_next(UPLOAD[api], "transient", times=2)
    conversions.send([planted("retry")])
    google_sandbox.fail_next(UPLOAD[api], "internal", times=5)
    conversions.send([planted("deferred")])
    bad_time = planted("future", conversion_date_time="2099-01-01 00:00:00+00:00")
    conversions.send([planted("b1"), bad_time, planted("b2")])
    member = google_member("canary")
    member["user_identifiers"][0] = {"hashed_email": "0" * 63 + "Z"}
    audience.sync([member, google_member("fine")], [])

    errors: list[BaseException] = []
    for kind in ("unauthorized", "daily_quota", "rate_limit"):
        google_sandbox.fail_next(UPLOAD[api], kind, times=5)
        with pytest.raises(MedspaError) as caught:
            conversions.send([planted(kind)])
        errors.append(caught.value)
    google_sandbox.fail_next(MEMBERS[api], "daily_quota")
    with pytest.raises(MedspaError) as caught:
        audience.sync([google_member("q")], [])
    errors.append(caught.value)

    logged = "\n".join(
        f"{r.getMessage()} {r.__dict__}" + (str(r.exc_info) if r.exc_info else "") for r in caplog.records
    )
    raised = "\n".join("".join(traceback.format_exception(e)) + repr(e) for e in errors)
    assert caplog.records, "expected some log lines to check"
    for canary in canaries:
        assert canary not in logged
        assert canary not in raised
    assert "0" * 63 + "Z" not in logged + raised
