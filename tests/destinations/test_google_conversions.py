"""Google conversion uploads through the real google-ads and Data Manager clients.

Every call crosses a real TLS socket to ``etl.sandbox.google.GoogleSandbox`` (STYLE.md item 15);
nothing mocks the SDKs. Backoff waits are 0 so retries cost nothing.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from etl.destinations.base import Outcome
from etl.destinations.google_common import make_google_destinations
from etl.errors import DestinationConfigError, QuotaExhausted

BOTH = ["google_ads", "data_manager"]
UPLOAD = {"google_ads": "UploadClickConversions", "data_manager": "IngestEvents"}


def destinations(google_config: Any, sandbox: Any, api: str) -> Any:
    return make_google_destinations(google_config(api), target="sandbox", sandbox=sandbox, retry_wait=0)


def by_key(results: list[Any]) -> dict[str, Any]:
    return {r.key: r for r in results}


@pytest.mark.parametrize("api", BOTH)
def test_conversions_are_accepted_once(api, google_sandbox, google_config, google_conversion):
    conversions, _ = destinations(google_config, google_sandbox, api)
    rows = [google_conversion(f"a{i}") for i in range(3)]
    rows.append(google_conversion("nogclid", gclid=None))  # enhanced conversions for leads
    rows.append(google_conversion("braid", gclid=None, gbraid="GBRAID-1"))

    results = conversions.send(rows)

    assert conversions.name == "google_conversions" and conversions.max_batch == 2000
    assert [r.outcome for r in results] == [Outcome.ACCEPTED] * 5
    assert sorted(r.key for r in results) == sorted(r["order_id"] for r in rows)
    assert google_sandbox.accepted_order_ids() == {r["order_id"]: 1 for r in rows}
    assert len(google_sandbox.requests(UPLOAD[api])) == 1


def test_google_ads_request_carries_the_outbox_fields(google_sandbox, google_config, google_conversion):
    conversions, _ = destinations(google_config, google_sandbox, "google_ads")
    row = google_conversion("fields")
    conversions.send([row])
    (request,) = google_sandbox.requests("UploadClickConversions")
    sent = request.conversions[0]
    assert request.partial_failure is True and request.customer_id == "1234567890"
    assert (sent.order_id, sent.gclid, sent.conversion_value) == (
        row["order_id"],
        row["gclid"],
        450.0,
    )
    assert sent.conversion_date_time == "2026-10-05 14:30:00-07:00"
    assert [ui.hashed_email or ui.hashed_phone_number for ui in sent.user_identifiers] == [
        i.get("hashed_email") or i.get("hashed_phone_number") for i in row["user_identifiers"]
    ]
    assert sent.consent.ad_user_data.name == "GRANTED"


def test_data_manager_request_maps_the_outbox_fields(google_sandbox, google_config, google_conversion):
    conversions, _ = destinations(google_config, google_sandbox, "data_manager")
    row = google_conversion("fields")
    conversions.send([row])
    (request,) = google_sandbox.requests("IngestEvents")
    (destination,) = request.destinations
    event = request.events[0]
    assert destination.operating_account.account_id == "1234567890"
    assert destination.operating_account.account_type.name == "GOOGLE_ADS"
    assert destination.product_destination_id == "111"
    assert request.encoding.name == "HEX" and request.consent.ad_user_data.name == "CONSENT_GRANTED"
    assert event.transaction_id == row["order_id"] and event.ad_identifiers.gclid == row["gclid"]
    assert event.event_timestamp.isoformat() == "2026-10-05T21:30:00+00:00"
    assert (event.conversion_value, event.currency) == (450.0, "USD")
    assert [i.email_address or i.phone_number for i in event.user_data.user_identifiers] == [
        i.get("hashed_email") or i.get("hashed_phone_number") for i in row["user_identifiers"]
    ]


def test_google_ads_partial_failures_land_per_row(google_sandbox, google_config, google_conversion):
    conversions, _ = destinations(google_config, google_sandbox, "google_ads")
    good = google_conversion("good")
    rows = {
        "good": good,
        "CLICK_NOT_FOUND": google_conversion("nf", gclid="unknown-click-1"),
        "DUPLICATE_ORDER_ID": google_conversion("dup", order_id=good["order_id"]),
        "INVALID_USER_IDENTIFIER": google_conversion("bad", user_identifiers=[{"hashed_email": "x" * 64}]),
        "INVALID_STRING_DATE_TIME_SECONDS_WITH_OFFSET": google_conversion(
            "date", conversion_date_time="2026-10-05 14:30:00-0700"
        ),
        "TOO_MANY": google_conversion("many", user_identifiers=[{"hashed_email": "a" * 64}] * 6),
        "GBRAID_WBRAID_BOTH_SET": google_conversion("braids", gclid=None, gbraid="g", wbraid="w"),
    }
    results = conversions.send(list(rows.values()))

    assert len(results) == len(rows)
    assert results[0].outcome is Outcome.ACCEPTED and results[0].key == good["order_id"]
    for expected, result in zip(list(rows)[1:], results[1:], strict=True):
        assert (result.outcome, result.code) == (Outcome.REJECTED, expected)
        assert result.request_id and result.request_id.startswith("sandbox-")
    assert google_sandbox.accepted_order_ids() == {good["order_id"]: 1}


def test_google_ads_a_transient_error_naming_one_row_defers_that_row(
    google_sandbox, google_config, google_conversion
):
    # INTERNAL_ERROR located at one row was recorded REJECTED (final): a conversion Google could
    # not take for a moment was never sent again
    conversions, _ = destinations(google_config, google_sandbox, "google_ads")
    rows = [google_conversion("one"), google_conversion("hiccup", gclid="transient-click-1")]
    results = conversions.send(rows)
    assert [(r.outcome, r.code) for r in results] == [
        (Outcome.ACCEPTED, None),
        (Outcome.DEFERRED, "INTERNAL_ERROR"),
    ]
    assert google_sandbox.accepted_order_ids() == {rows[0]["order_id"]: 1}
    assert len(google_sandbox.requests("UploadClickConversions")) == 1  # not retried in the run


def test_google_ads_an_error_naming_no_row_defers_the_rows_without_their_own(
    google_sandbox, google_config, google_conversion
):
    # an error without a field path was skipped, so every row without its own error read as
    # ACCEPTED (final): whatever it concerned was never sent again
    conversions, _ = destinations(google_config, google_sandbox, "google_ads")
    rows = [
        google_conversion("one"),
        google_conversion("two"),
        google_conversion("nf", gclid="unknown-click-1"),
    ]
    google_sandbox.unlocated_error_next()

    first = conversions.send(rows)

    assert [(r.outcome, r.code) for r in first] == [
        (Outcome.DEFERRED, "unlocated/INTERNAL_ERROR"),
        (Outcome.DEFERRED, "unlocated/INTERNAL_ERROR"),
        (Outcome.REJECTED, "CLICK_NOT_FOUND"),  # its own error still decides it
    ]
    # sent again next run: Google answers the applied order IDs as already there, never twice
    again = conversions.send(rows[:2])
    assert {r.outcome for r in again} == {Outcome.ALREADY_SENT}
    assert google_sandbox.accepted_order_ids() == {r["order_id"]: 1 for r in rows[:2]}


def test_google_ads_too_recent_is_deferred(google_sandbox, google_config, google_conversion):
    conversions, _ = destinations(google_config, google_sandbox, "google_ads")
    google_sandbox.register_clicks(["click-old"])
    google_sandbox.register_clicks(["click-new"], recent=True)
    rows = [
        google_conversion("old", gclid="click-old"),
        google_conversion("new", gclid="click-new"),
        google_conversion("stranger", gclid="click-stranger"),  # not registered: not found
        google_conversion(
            "action",
            gclid="click-old",
            conversion_action="customers/1234567890/conversionActions/222",
        ),
    ]
    google_sandbox.mark_conversion_action_recent("222")
    results = conversions.send(rows)
    assert [(r.outcome, r.code) for r in results] == [
        (Outcome.ACCEPTED, None),
        (Outcome.DEFERRED, "TOO_RECENT_EVENT"),
        (Outcome.REJECTED, "CLICK_NOT_FOUND"),
        (Outcome.DEFERRED, "TOO_RECENT_CONVERSION_ACTION"),
    ]


def test_data_manager_recent_conversion_action_defers_the_request(
    google_sandbox, google_config, google_conversion
):
    conversions, _ = destinations(google_config, google_sandbox, "data_manager")
    google_sandbox.mark_conversion_action_recent("customers/1234567890/conversionActions/111")
    results = conversions.send([google_conversion("r1"), google_conversion("r2")])
    assert {(r.outcome, r.code) for r in results} == {
        (Outcome.DEFERRED, "CONVERSION_ACTION_TOO_RECENTLY_CREATED")
    }
    assert google_sandbox.accepted_order_ids() == {}


def test_google_ads_already_sent_maps_to_already_sent(google_sandbox, google_config, google_conversion):
    conversions, _ = destinations(google_config, google_sandbox, "google_ads")
    first = google_conversion("once")
    assert conversions.send([first])[0].outcome is Outcome.ACCEPTED

    same_click_new_order = google_conversion("other", gclid=first["gclid"])
    again = conversions.send([first, same_click_new_order])

    assert [(r.outcome, r.code) for r in again] == [
        (Outcome.ALREADY_SENT, "ORDER_ID_ALREADY_IN_USE"),
        (Outcome.ALREADY_SENT, "CLICK_CONVERSION_ALREADY_EXISTS"),
    ]
    assert google_sandbox.accepted_order_ids() == {first["order_id"]: 1}


def test_data_manager_resend_is_accepted_and_deduplicated_by_google(
    google_sandbox, google_config, google_conversion
):
    # no per-row dedup answer exists: Google drops a repeated transaction_id server-side
    conversions, _ = destinations(google_config, google_sandbox, "data_manager")
    row = google_conversion("again")
    assert conversions.send([row])[0].outcome is Outcome.ACCEPTED
    assert conversions.send([row])[0].outcome is Outcome.ACCEPTED
    assert google_sandbox.accepted_order_ids()[row["order_id"]] == 2


@pytest.mark.parametrize("api", BOTH)
@pytest.mark.parametrize(
    "kind", ["transient", "internal", "unavailable", "deadline", "rate_limit", "concurrent"]
)
def test_transient_error_is_retried_and_succeeds(api, kind, google_sandbox, google_config, google_conversion):
    conversions, _ = destinations(google_config, google_sandbox, api)
    google_sandbox.fail_next(UPLOAD[api], kind, times=2)
    results = conversions.send([google_conversion("retry")])
    assert results[0].outcome is Outcome.ACCEPTED
    assert len(google_sandbox.requests(UPLOAD[api])) == 3
    assert sum(google_sandbox.accepted_order_ids().values()) == 1


@pytest.mark.parametrize("api", BOTH)
def test_transient_error_that_persists_defers_the_rows(api, google_sandbox, google_config, google_conversion):
    conversions, _ = destinations(google_config, google_sandbox, api)
    google_sandbox.fail_next(UPLOAD[api], "transient", times=5)
    results = conversions.send([google_conversion("p1"), google_conversion("p2")])
    assert {r.outcome for r in results} == {Outcome.DEFERRED}
    assert {r.code for r in results} == {"TRANSIENT_ERROR" if api == "google_ads" else "INTERNAL_ERROR"}
    assert len(google_sandbox.requests(UPLOAD[api])) == 5


@pytest.mark.parametrize("api", BOTH)
def test_rate_limit_that_never_clears_stops_the_run(api, google_sandbox, google_config, google_conversion):
    conversions, _ = destinations(google_config, google_sandbox, api)
    google_sandbox.fail_next(UPLOAD[api], "rate_limit", times=5)
    with pytest.raises(QuotaExhausted):
        conversions.send([google_conversion("rl")])


@pytest.mark.parametrize("api", BOTH)
def test_daily_quota_raises_quota_exhausted_without_retrying(
    api, google_sandbox, google_config, google_conversion
):
    conversions, _ = destinations(google_config, google_sandbox, api)
    google_sandbox.fail_next(UPLOAD[api], "daily_quota")
    row = google_conversion("quota")
    with pytest.raises(QuotaExhausted) as caught:
        conversions.send([row])
    assert "RESOURCE_EXHAUSTED" in str(caught.value) and "1234567890" in str(caught.value)
    assert row["order_id"] not in str(caught.value)
    assert len(google_sandbox.requests(UPLOAD[api])) == 1


CONFIG_CASES = {
    "google_ads": {
        "unauthorized": "UNAUTHORIZED_CUSTOMER",
        "terms": "CUSTOMER_NOT_ACCEPTED_CUSTOMER_DATA_TERMS",
        "no_action": "NO_CONVERSION_ACTION_FOUND",
        "permission_denied": "USER_PERMISSION_DENIED",
        "unauthenticated": "AUTHENTICATION_ERROR",
        # refused as a whole, for no row's fault: once every row was recorded rejected for good
        "account_refused": "INVALID_LOGIN_CUSTOMER_ID",
    },
    "data_manager": {
        "unauthorized": "PERMISSION_DENIED",
        "terms": "TERMS_AND_CONDITIONS_NOT_SIGNED",
        "no_action": "INVALID_CONVERSION_ACTION_ID",
        "unauthenticated": "UNAUTHENTICATED",
        # an account reason under INVALID_ARGUMENT: once bisected down to every row, each rejected
        "account_refused": "DESTINATION_ACCOUNT_TYPE_MISMATCH",
    },
}


@pytest.mark.parametrize(
    ("api", "kind", "code"),
    [(api, kind, code) for api, cases in CONFIG_CASES.items() for kind, code in cases.items()],
)
def test_configuration_error_stops_with_one_clear_message(
    api, kind, code, google_sandbox, google_config, google_conversion
):
    conversions, _ = destinations(google_config, google_sandbox, api)
    google_sandbox.fail_next(UPLOAD[api], kind)
    row = google_conversion("cfg")
    with pytest.raises(DestinationConfigError) as caught:
        conversions.send([row])
    message = str(caught.value)
    assert code in message and "customer 1234567890" in message
    assert row["order_id"] not in message and row["gclid"] not in message
    assert len(google_sandbox.requests(UPLOAD[api])) == 1  # never retried


def test_data_manager_bisects_a_request_refused_for_one_item(
    google_sandbox, google_config, google_conversion
):
    conversions, _ = destinations(google_config, google_sandbox, "data_manager")
    rows = [google_conversion(f"b{i}") for i in range(16)]
    # passes local checks (format is fine) but Google refuses an event time in the future
    rows[11]["conversion_date_time"] = "2099-01-01 00:00:00+00:00"
    results = by_key(conversions.send(rows))

    bad = results[rows[11]["order_id"]]
    assert (bad.outcome, bad.code) == (Outcome.REJECTED, "EVENT_TIME_INVALID")
    good = [r for k, r in results.items() if k != rows[11]["order_id"]]
    assert {r.outcome for r in good} == {Outcome.ACCEPTED} and len(good) == 15
    assert google_sandbox.accepted_order_ids() == {r["order_id"]: 1 for i, r in enumerate(rows) if i != 11}
    assert len(google_sandbox.requests("IngestEvents")) <= 1 + 2 * math.ceil(math.log2(16))


def test_data_manager_checks_rows_before_batching(google_sandbox, google_config, google_conversion):
    conversions, _ = destinations(google_config, google_sandbox, "data_manager")
    rows = [
        google_conversion("ok"),
        google_conversion("hash", user_identifiers=[{"hashed_email": "NOT-A-HASH"}]),
        google_conversion("many", user_identifiers=[{"hashed_email": "a" * 64}] * 11),
        google_conversion("key", landing_page_url="https://x"),
        google_conversion("two", gbraid="g"),
        google_conversion("date", conversion_date_time="2026-10-05T14:30:00-07:00"),
        # the format, but no such day: building the request from it failed the whole batch
        google_conversion("feb30", conversion_date_time="2026-02-30 14:30:00-08:00"),
    ]
    results = conversions.send(rows)
    assert [(r.outcome, r.code) for r in results] == [
        (Outcome.REJECTED, "INVALID_SHA256_FORMAT"),
        (Outcome.REJECTED, "TOO_MANY_USER_IDENTIFIERS"),
        (Outcome.REJECTED, "INVALID_EVENT"),
        (Outcome.REJECTED, "INVALID_EVENT"),
        (Outcome.REJECTED, "EVENT_TIME_INVALID"),
        (Outcome.REJECTED, "EVENT_TIME_INVALID"),
        (Outcome.ACCEPTED, None),
    ]
    assert [r.transmitted for r in results] == [False] * 6 + [True]  # refused here: never left
    (request,) = google_sandbox.requests("IngestEvents")
    assert len(request.events) == 1


@pytest.mark.parametrize("api", BOTH)
def test_batches_split_at_the_maximum(api, google_sandbox, google_config, google_conversion):
    conversions, _ = destinations(google_config, google_sandbox, api)
    rows = [google_conversion(f"n{i}", user_identifiers=None) for i in range(4500)]
    results = conversions.send(rows)
    requests = google_sandbox.requests(UPLOAD[api])
    assert len(requests) == math.ceil(4500 / 2000) == 3
    sizes = [len(r.conversions if api == "google_ads" else r.events) for r in requests]
    assert sizes == [2000, 2000, 500]
    assert {r.outcome for r in results} == {Outcome.ACCEPTED} and len(results) == 4500


@pytest.mark.parametrize("api", BOTH)
def test_validate_only_is_passed_through(api, google_sandbox, google_config, google_conversion):
    conversions, _ = destinations(google_config, google_sandbox, api)
    row = google_conversion("dry")
    assert conversions.send([row], validate_only=True)[0].outcome is Outcome.ACCEPTED
    assert google_sandbox.requests(UPLOAD[api])[0].validate_only is True
    assert google_sandbox.accepted_order_ids() == {}
    assert conversions.send([row])[0].outcome is Outcome.ACCEPTED  # nothing was recorded before


def test_rows_for_two_conversion_actions_share_one_data_manager_request(
    google_sandbox, google_config, google_conversion
):
    conversions, _ = destinations(google_config, google_sandbox, "data_manager")
    rows = [
        google_conversion("c1"),
        google_conversion("p1", conversion_action="customers/1234567890/conversionActions/222"),
    ]
    conversions.send(rows)
    (request,) = google_sandbox.requests("IngestEvents")
    assert sorted(d.product_destination_id for d in request.destinations) == ["111", "222"]
    assert [list(e.destination_references) for e in request.events] == [
        ["action-111"],
        ["action-222"],
    ]


class _FailingFrom:
    """The real Data Manager client, with a sandbox failure armed before its ``n``-th IngestEvents."""

    def __init__(self, real: Any, sandbox: Any, n: int, kind: str) -> None:
        self._real, self._sandbox, self._n, self._kind, self.calls = real, sandbox, n, kind, 0

    def ingest_events(self, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == self._n:
            self._sandbox.fail_next("IngestEvents", self._kind)
        return self._real.ingest_events(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@pytest.mark.parametrize(
    ("kind", "stop"), [("daily_quota", QuotaExhausted), ("unauthorized", DestinationConfigError)]
)
def test_a_stop_during_bisection_carries_the_rows_google_already_accepted(
    kind, stop, google_sandbox, google_config, google_conversion
):
    # Data Manager has no "already there" answer: rows accepted before the stop must be
    # recorded by the caller, or the next run sends (and Google counts) them twice
    conversions, _ = destinations(google_config, google_sandbox, "data_manager")
    conversions._client = _FailingFrom(conversions._client, google_sandbox, 3, kind)
    rows = [google_conversion(f"q{i}") for i in range(8)]
    rows[7]["conversion_date_time"] = "2099-01-01 00:00:00+00:00"  # refused: the request is bisected
    with pytest.raises(stop) as caught:
        conversions.send(rows)  # 8 refused, first half of 4 accepted, then the stop

    accepted = google_sandbox.accepted_order_ids()
    assert sum(accepted.values()) == 4
    carried = {r.key: r.outcome for r in caught.value.partial_results}
    assert carried == dict.fromkeys(accepted, Outcome.ACCEPTED)


def test_google_ads_account_error_on_one_row_carries_the_rows_it_applied(
    google_sandbox, google_config, google_conversion
):
    # partial failure: Google applied the other rows of the request before we stop the run
    conversions, _ = destinations(google_config, google_sandbox, "google_ads")
    good = [google_conversion("g1"), google_conversion("g2")]
    foreign = google_conversion("f1", conversion_action="customers/999/conversionActions/1")
    with pytest.raises(DestinationConfigError, match="NO_CONVERSION_ACTION_FOUND") as caught:
        conversions.send([good[0], foreign, good[1]])
    assert {r.key: r.outcome for r in caught.value.partial_results} == {
        row["order_id"]: Outcome.ACCEPTED for row in good
    }
    assert google_sandbox.accepted_order_ids() == {row["order_id"]: 1 for row in good}


def test_google_ads_rows_with_a_second_account_error_stay_planned_too(
    google_sandbox, google_config, google_conversion
):
    # two account problems in one partial failure: the stop names one, and the other's rows
    # were recorded rejected for good (lost once the account is fixed)
    conversions, _ = destinations(google_config, google_sandbox, "google_ads")
    google_sandbox.disable_enhanced_conversions_for_leads()
    good = google_conversion("g1")
    foreign = google_conversion("f1", conversion_action="customers/999/conversionActions/1")
    leads_only = google_conversion("l1", gclid=None)
    with pytest.raises(DestinationConfigError, match="NO_CONVERSION_ACTION_FOUND") as caught:
        conversions.send([good, foreign, leads_only])
    # only the applied row is recorded; both refused rows stay planned for the next run
    assert {r.key: r.outcome for r in caught.value.partial_results} == {good["order_id"]: Outcome.ACCEPTED}
    assert google_sandbox.accepted_order_ids() == {good["order_id"]: 1}


@pytest.mark.parametrize("api", BOTH)
def test_an_unexplained_failure_defers_the_rows_never_rejects_them(
    api, google_sandbox, google_config, google_conversion
):
    # a dropped stream (gRPC UNKNOWN, no Google reason) says nothing about the rows: retried,
    # then deferred to the next run; "rejected" is final and would lose them for good
    from google.api_core import exceptions as core_exceptions

    class DroppedStream:
        calls = 0

        def _fail(self, **kwargs: Any) -> Any:
            DroppedStream.calls += 1
            raise core_exceptions.Unknown("Stream removed")

        ingest_events = upload_click_conversions = _fail

    conversions, _ = destinations(google_config, google_sandbox, api)
    if api == "google_ads":
        conversions._service = DroppedStream()
    else:
        conversions._client = DroppedStream()
    results = conversions.send([google_conversion("u1"), google_conversion("u2")])

    assert {(r.outcome, r.code) for r in results} == {(Outcome.DEFERRED, "UNKNOWN")}
    assert DroppedStream.calls == 5  # the retry policy's attempts


def test_an_unexplained_refusal_with_no_reason_defers_rather_than_rejects():
    from google.api_core import exceptions as core_exceptions

    from etl.destinations.google_ads import classify_ads_error
    from etl.destinations.google_common import Kind
    from etl.destinations.google_datamanager import classify_dm_error

    for classify in (classify_ads_error, classify_dm_error):
        failure = classify(core_exceptions.NotFound("gone"))
        assert failure is not None and failure.kind is Kind.DEFER_ALL
        cancelled = classify(core_exceptions.Cancelled("client went away"))
        assert cancelled is not None and cancelled.kind is Kind.RETRY
