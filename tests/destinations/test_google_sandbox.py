"""The sandbox Google itself: it validates like Google, fails on request, and records everything.

Driven with the real clients built exactly as ``make_google_destinations`` builds them, but
sending hand-made requests the adapters would never send.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from google.ads import datamanager_v1 as dm
from google.ads.googleads.errors import GoogleAdsException
from google.ads.googleads.v26.common.types import offline_user_data as oud
from google.ads.googleads.v26.services.types import conversion_upload_service as cus
from google.ads.googleads.v26.services.types import offline_user_data_job_service as ouds
from google.api_core import exceptions as core_exceptions

from etl.destinations.google_ads import build_sandbox_ads_client
from etl.destinations.google_datamanager import build_sandbox_dm_client

HEX = "ab" * 32
ACTION = "customers/1234567890/conversionActions/111"
LIST = "customers/1234567890/userLists/555"


def ads_codes(exc: GoogleAdsException) -> list[str]:
    names = []
    for error in exc.failure.errors:
        pb = type(error.error_code).pb(error.error_code)
        which = pb.WhichOneof("error_code")
        names.append(getattr(error.error_code, which).name)
    return names


def click(order: str, **fields: Any) -> Any:
    conversion = cus.ClickConversion(
        conversion_action=ACTION,
        conversion_date_time="2026-10-05 14:30:00-07:00",
        order_id=order,
        gclid="Cj0-sandbox",
    )
    conversion.consent.ad_user_data = "GRANTED"
    for name, value in fields.items():
        setattr(conversion, name, value)
    return conversion


@pytest.fixture
def ads(google_sandbox: Any) -> Any:
    return build_sandbox_ads_client(google_sandbox, None)


@pytest.fixture
def ingestion(google_sandbox: Any) -> Any:
    return build_sandbox_dm_client(google_sandbox)


def test_too_many_conversions_and_partial_failure_off_fail_the_request(google_sandbox, ads):
    service = ads.get_service("ConversionUploadService")
    with pytest.raises(GoogleAdsException) as caught:
        service.upload_click_conversions(
            customer_id="1234567890",
            conversions=[click(f"o{i}") for i in range(2001)],
            partial_failure=True,
        )
    assert ads_codes(caught.value) == ["TOO_MANY_CONVERSIONS_IN_REQUEST"]
    assert caught.value.request_id.startswith("sandbox-")
    with pytest.raises(GoogleAdsException) as caught:
        service.upload_click_conversions(customer_id="1234567890", conversions=[click("x")])
    assert ads_codes(caught.value) == ["PARTIAL_FAILURE_MODE_REQUIRED"]
    assert google_sandbox.accepted_order_ids() == {}


def test_conversion_rows_are_validated_like_google(google_sandbox, ads):
    service = ads.get_service("ConversionUploadService")
    no_consent = click("c1")
    no_consent.consent.ad_user_data = "UNSPECIFIED"
    rows = [
        no_consent,
        click("c2", gbraid="GB"),
        click("c3", order_id="someone@example.com"),
        click("c4", conversion_action="customers/999/conversionActions/1"),
        click("c5", gclid="expired-1"),
        click("c6"),
    ]
    response = service.upload_click_conversions(
        customer_id="1234567890", conversions=rows, partial_failure=True
    )
    detail = response.partial_failure_error.details[0]
    from google.ads.googleads.v26.errors.types.errors import GoogleAdsFailure

    failure = GoogleAdsFailure.deserialize(detail.value)
    found = {}
    for error in failure.errors:
        pb = type(error.error_code).pb(error.error_code)
        found[error.location.field_path_elements[0].index] = getattr(
            error.error_code, pb.WhichOneof("error_code")
        ).name
    assert found == {
        0: "REQUIRED",
        1: "VALUE_MUST_BE_UNSET",
        2: "ORDER_ID_CONTAINS_PII",
        3: "NO_CONVERSION_ACTION_FOUND",
        4: "EXPIRED_EVENT",
    }
    assert response.results[5].gclid == "Cj0-sandbox" and not response.results[0].gclid
    assert google_sandbox.accepted_order_ids() == {"c6": 1}


def _job(ads: Any, consent: bool = True) -> tuple[Any, str]:
    service = ads.get_service("OfflineUserDataJobService")
    job = ads.get_type("OfflineUserDataJob")
    job.type_ = ads.enums.OfflineUserDataJobTypeEnum.CUSTOMER_MATCH_USER_LIST
    job.customer_match_user_list_metadata.user_list = LIST
    if consent:
        job.customer_match_user_list_metadata.consent.ad_user_data = "GRANTED"
    return service, service.create_offline_user_data_job(customer_id="1234567890", job=job).resource_name


def _op(kind: str, identifiers: int = 1, **data: Any) -> Any:
    if kind == "remove_all":
        return ouds.OfflineUserDataJobOperation(remove_all=True)
    user = oud.UserData(user_identifiers=[oud.UserIdentifier(hashed_email=HEX)] * identifiers, **data)
    return ouds.OfflineUserDataJobOperation(**{kind: user})


def test_customer_match_job_rules(google_sandbox, ads):
    service, job = _job(ads)
    operations = [
        _op("create"),
        _op("remove"),
        _op("remove_all"),
        _op("create", identifiers=21),
        _op("create", consent={"ad_user_data": "GRANTED"}),
    ]
    response = service.add_offline_user_data_job_operations(
        request=ouds.AddOfflineUserDataJobOperationsRequest(
            resource_name=job, enable_partial_failure=True, operations=operations
        )
    )
    from google.ads.googleads.v26.errors.types.errors import GoogleAdsFailure

    failure = GoogleAdsFailure.deserialize(response.partial_failure_error.details[0].value)
    codes = {
        e.location.field_path_elements[0].index: e.error_code.offline_user_data_job_error.name
        for e in failure.errors
    }
    assert codes == {
        1: "CONFLICTING_OPERATION",
        2: "INVALID_OPERATION_ORDER",
        3: "TOO_MANY_USER_IDENTIFIERS",
        4: "OPERATION_LEVEL_CONSENT_PROVIDED",
    }
    with pytest.raises(GoogleAdsException) as caught:
        service.add_offline_user_data_job_operations(
            resource_name=job, operations=[_op("create", identifiers=20)] * 5001
        )
    assert ads_codes(caught.value) == ["TOO_MANY"]
    service.run_offline_user_data_job(resource_name=job)
    with pytest.raises(GoogleAdsException) as caught:
        service.add_offline_user_data_job_operations(resource_name=job, operations=[_op("create")])
    assert ads_codes(caught.value) == ["JOB_ALREADY_STARTED"]
    assert len(google_sandbox.list_members(LIST)) == 1


def _destination(product_id: str = "111") -> Any:
    return dm.Destination(
        operating_account=dm.ProductAccount(
            account_id="1234567890", account_type=dm.ProductAccount.AccountType.GOOGLE_ADS
        ),
        product_destination_id=product_id,
    )


def _event(transaction: str, **fields: Any) -> Any:
    fields.setdefault("ad_identifiers", dm.AdIdentifiers(gclid="Cj0"))
    return dm.Event(transaction_id=transaction, event_timestamp={"seconds": 1_790_000_000}, **fields)


def _reason(exc: core_exceptions.GoogleAPICallError) -> tuple[str | None, list[str]]:
    fields = [v.field for d in exc.details if hasattr(d, "field_violations") for v in d.field_violations]
    return exc.reason, fields


def test_data_manager_fails_the_whole_request_for_one_bad_event(google_sandbox, ingestion):
    events = [
        _event("t1"),
        _event("t2", user_data={"user_identifiers": [{"email_address": "XYZ"}]}),
    ]
    with pytest.raises(core_exceptions.InvalidArgument) as caught:
        ingestion.ingest_events(
            request=dm.IngestEventsRequest(
                destinations=[_destination()],
                events=events,
                encoding=dm.Encoding.HEX,
                consent=dm.Consent(ad_user_data=dm.ConsentStatus.CONSENT_GRANTED),
            ),
            retry=None,
        )
    assert _reason(caught.value) == (
        "INVALID_HEX_ENCODING",
        ["events[1].user_data.user_identifiers[0]"],
    )
    assert google_sandbox.accepted_order_ids() == {}


@pytest.mark.parametrize(
    ("request_fields", "reason"),
    [
        ({"events": [_event(f"e{i}") for i in range(2001)]}, "TOO_MANY_EVENTS"),
        ({"events": [_event("e1")], "consent": None}, "REQUIRED_FIELD_MISSING"),
        (
            {"events": [_event("e1", ad_identifiers=dm.AdIdentifiers(gclid="a", gbraid="b"))]},
            "INVALID_EVENT",
        ),
        ({"events": [_event("e1")], "destinations": [_destination("abc")]}, "INVALID_DESTINATION"),
    ],
    ids=["too-many", "no-consent", "two-click-ids", "bad-destination"],
)
def test_data_manager_event_rules(request_fields, reason, google_sandbox, ingestion):
    fields = {
        "destinations": [_destination()],
        "encoding": dm.Encoding.HEX,
        "consent": dm.Consent(ad_user_data=dm.ConsentStatus.CONSENT_GRANTED),
        **request_fields,
    }
    with pytest.raises(core_exceptions.InvalidArgument) as caught:
        ingestion.ingest_events(
            request=dm.IngestEventsRequest(**{k: v for k, v in fields.items() if v is not None}),
            retry=None,
        )
    assert caught.value.reason == reason


def test_data_manager_member_rules(google_sandbox, ingestion):
    member = dm.AudienceMember(user_data={"user_identifiers": [{"email_address": HEX}]})
    base = {"destinations": [_destination("555")], "encoding": dm.Encoding.HEX}
    with pytest.raises(core_exceptions.InvalidArgument) as caught:
        ingestion.ingest_audience_members(
            request=dm.IngestAudienceMembersRequest(audience_members=[member], **base), retry=None
        )
    assert caught.value.reason == "TERMS_AND_CONDITIONS_NOT_SIGNED"
    terms = dm.TermsOfService(customer_match_terms_of_service_status=dm.TermsOfServiceStatus.ACCEPTED)
    with pytest.raises(core_exceptions.InvalidArgument) as caught:
        ingestion.ingest_audience_members(
            request=dm.IngestAudienceMembersRequest(
                audience_members=[member] * 10_001, terms_of_service=terms, **base
            ),
            retry=None,
        )
    assert caught.value.reason == "TOO_MANY_AUDIENCE_MEMBERS"
    eleven = dm.AudienceMember(user_data={"user_identifiers": [{"email_address": HEX}] * 11})
    with pytest.raises(core_exceptions.InvalidArgument) as caught:
        ingestion.ingest_audience_members(
            request=dm.IngestAudienceMembersRequest(
                audience_members=[eleven], terms_of_service=terms, **base
            ),
            retry=None,
        )
    assert caught.value.reason == "TOO_MANY_USER_IDENTIFIERS"


def test_knobs_are_checked_and_reset_forgets(google_sandbox):
    with pytest.raises(ValueError, match="unknown method"):
        google_sandbox.fail_next("Nope", "transient")
    with pytest.raises(ValueError, match="unknown failure kind"):
        google_sandbox.fail_next("IngestEvents", "flaky")
    google_sandbox.fail_next("IngestEvents", "transient")
    google_sandbox.register_clicks(["a"])
    polls = google_sandbox.job_polls
    google_sandbox.job_polls, google_sandbox.leads_enabled = 1_000, False
    google_sandbox.status_polls = 1_000
    google_sandbox.fail_processing_next("IngestEvents")
    google_sandbox.unlocated_error_next()
    google_sandbox.reset()
    assert google_sandbox.take_failure("IngestEvents") is None
    assert google_sandbox.click_problem("b") is None
    assert google_sandbox.received == []
    # a test that made jobs run for ever slowed every later test of the module by minutes
    assert google_sandbox.job_polls == polls and google_sandbox.leads_enabled
    assert google_sandbox.status_polls == 0 and google_sandbox.take_processing("IngestEvents") == (
        "SUCCESS",
        None,
    )
    assert not google_sandbox.take_unlocated_error()


def test_sandbox_serves_a_plain_process_like_the_cli(tmp_path: Path):
    """The demo target runs in the CLI process, outside pytest: start, send, read the record."""
    script = textwrap.dedent(
        """
        from etl.config import ClinicConfig
        from etl.destinations.google_common import make_google_destinations
        from etl.sandbox.google import GoogleSandbox

        config = ClinicConfig.model_validate({
            "clinic_id": "demo", "timezone": "America/Los_Angeles",
            "sources": {"appointments": {"path": "a.csv"}, "leads": {"path": "l.csv"}},
            "google_ads": {"customer_id": "1234567890",
                "conversion_actions": {"consultation": "customers/1234567890/conversionActions/1",
                                       "purchase": "customers/1234567890/conversionActions/2"}}})
        row = {"conversion_action": "customers/1234567890/conversionActions/1",
               "conversion_date_time": "2026-10-05 14:30:00-07:00", "currency_code": "USD",
               "order_id": "a" * 64, "gclid": "Cj0demo", "consent": {"ad_user_data": "GRANTED"}}
        with GoogleSandbox() as sandbox:
            for api in ("google_ads", "data_manager"):
                google = config.google_ads.model_copy(update={"api": api})
                clinic = config.model_copy(update={"google_ads": google})
                conversions, _ = make_google_destinations(clinic, target="sandbox", sandbox=sandbox)
                outcome = conversions.send([row])[0].outcome.value
                print(outcome, sum(sandbox.accepted_order_ids().values()))
                sandbox.reset()
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["accepted", "1", "accepted", "1"]


def _status(ingestion: Any, request_id: str) -> list[tuple[str, dict[str, int]]]:
    response = ingestion.retrieve_request_status(
        request=dm.RetrieveRequestStatusRequest(request_id=request_id), retry=None
    )
    return [
        (d.request_status.name, {c.reason.name: c.record_count for c in d.error_info.error_counts})
        for d in response.request_status_per_destination
    ]


def _ingest(ingestion: Any, *transactions: str) -> str:
    return ingestion.ingest_events(
        request=dm.IngestEventsRequest(
            destinations=[_destination()],
            events=[_event(t) for t in transactions],
            encoding=dm.Encoding.HEX,
            consent=dm.Consent(ad_user_data=dm.ConsentStatus.CONSENT_GRANTED),
        ),
        retry=None,
    ).request_id


def test_data_manager_processes_a_request_after_taking_it(google_sandbox, ingestion):
    # Google answers an ingest with a request id and processes it afterwards: the status reads
    # PROCESSING first, then the outcome, and a failed request applies none of its records
    google_sandbox.status_polls = 2
    ok = _ingest(ingestion, "ok1", "ok2")
    assert [_status(ingestion, ok) for _ in range(3)] == [
        [("PROCESSING", {})],
        [("PROCESSING", {})],
        [("SUCCESS", {})],
    ]
    google_sandbox.status_polls = 0
    google_sandbox.fail_processing_next("IngestEvents", "PROCESSING_ERROR_REASON_EVENT_TOO_OLD")
    failed = _ingest(ingestion, "f1", "f2", "f3")
    assert _status(ingestion, failed) == [("FAILED", {"PROCESSING_ERROR_REASON_EVENT_TOO_OLD": 3})]
    google_sandbox.fail_processing_next("IngestEvents", partial=True)
    partial = _ingest(ingestion, "p1", "p2")
    assert _status(ingestion, partial) == [("PARTIAL_SUCCESS", {"PROCESSING_ERROR_REASON_INTERNAL_ERROR": 1})]
    assert google_sandbox.accepted_order_ids() == {"ok1": 1, "ok2": 1, "p1": 1}
    with pytest.raises(core_exceptions.NotFound):
        _status(ingestion, "no-such-request")
    with pytest.raises(ValueError, match="unknown ingest method"):
        google_sandbox.fail_processing_next("RetrieveRequestStatus")


def test_request_ids_are_unique_across_sandboxes():
    # the CLI starts a sandbox per run: ids from a counter alone repeated the night before's, so
    # a tracked request's status read the wrong request's (or NOT_FOUND)
    from etl.sandbox.google import GoogleSandbox

    ids = {GoogleSandbox().record("IngestEvents", None) for _ in range(3)}
    assert len(ids) == 3
