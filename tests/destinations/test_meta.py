"""Meta adapters driven through the real facebook-business SDK against the local sandbox.

Nothing here mocks the SDK: every call crosses a real socket to ``etl.sandbox.meta.MetaSandbox``
(STYLE.md item 15). Waits are scaled down with ``retry_wait`` so the module stays fast.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import traceback
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from etl.config import ClinicConfig
from etl.destinations.base import Outcome
from etl.destinations.meta import (
    MetaDestinationConfigError,
    MetaEvents,
    MetaGraphClient,
    MetaUnavailable,
    doctor_meta,
    make_meta_destinations,
    member_key,
)
from etl.destinations.meta_audience import MetaAudience
from etl.errors import ConfigError, DestinationConfigError
from etl.identifiers import FBC, FBP
from etl.sandbox import meta as sandbox_module
from etl.sandbox.meta import MetaSandbox

NOW = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)
PIXEL = "1234567890"
AUDIENCE = "23850000000000001"
SCHEMA = ["EMAIL", "PHONE", "FN", "LN", "ZIP", "CT", "ST", "COUNTRY"]
WAIT = 0.001  # one throttling "minute" lasts 0.06 s


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def make_config(**meta: Any) -> ClinicConfig:
    return ClinicConfig.model_validate(
        {
            "clinic_id": "demo-clinic",
            "timezone": "America/Los_Angeles",
            "sources": {"appointments": {"path": "a.csv"}, "leads": {"path": "l.csv"}},
            "meta": {"pixel_id": PIXEL, "suppression_audience_id": AUDIENCE, **meta},
        }
    )


def event_row(tag: str, *, age_days: float = 1, **overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "event_name": "Purchase",
        "event_time": int((NOW - timedelta(days=age_days)).timestamp()),
        "event_id": sha(f"event-{tag}"),
        "action_source": "physical_store",
        "user_data": {
            "em": [sha(f"{tag}@mail.test")],
            "ph": [sha(f"1555{tag}")],
            "country": [sha("us")],
            "external_id": [sha(f"person-{tag}")],
            "fbc": f"fb.1.1763600000000.IwAR{tag}",
        },
        "custom_data": {"value": 450.0, "currency": "USD"},
    }
    row.update(overrides)
    return row


def member(tag: str) -> list[str]:
    return [
        sha(f"{tag}@mail.test"),
        sha(f"1555{tag}"),
        sha("jane"),
        "",
        sha("94107"),
        "",
        "",
        sha("us"),
    ]


def audience_row(operation: str, tags: list[str]) -> dict[str, Any]:
    return {"operation": operation, "schema": SCHEMA, "data": [member(t) for t in tags]}


@pytest.fixture
def sandbox():
    with MetaSandbox(now=NOW, pixel_ids={PIXEL}, audience_ids={AUDIENCE}) as sb:
        yield sb


def destinations(sb: MetaSandbox, **kwargs: Any) -> tuple[MetaEvents, MetaAudience]:
    config = kwargs.pop("config", None) or make_config()
    events, audience = make_meta_destinations(
        config, target="sandbox", now=NOW, sandbox=sb, retry_wait=WAIT, **kwargs
    )
    assert isinstance(events, MetaEvents) and isinstance(audience, MetaAudience)
    return events, audience


def client_for(sb: MetaSandbox, token: str, **kwargs: Any) -> MetaGraphClient:
    return MetaGraphClient(
        access_token=token,
        graph_url=sb.url,
        retry_wait=WAIT,
        throttle_unit=60 * WAIT,
        max_throttle_wait=900 * WAIT,
        **kwargs,
    )


def by_key(results):
    return {r.key: r for r in results}


# events


def test_events_accepted_with_hashes_passed_through_unchanged(sandbox):
    events, _ = destinations(sandbox)
    rows = [event_row(str(i)) for i in range(3)]

    results = events.send(rows)

    assert [r.outcome for r in results] == [Outcome.ACCEPTED] * 3
    (request,) = sandbox.requests_to("events")
    assert {r.request_id for r in results} == {request.fbtrace_id}
    assert request.auth == "header" and "access_token" not in request.query
    assert "test_event_code" not in request.form
    sent = [json.loads(item) for item in json.loads(request.form["data"][0])]
    assert [e["event_id"] for e in sent] == [r["event_id"] for r in rows]
    first = sent[0]
    assert first["user_data"]["em"] == rows[0]["user_data"]["em"]  # 64-hex passes unhashed
    assert first["user_data"]["fbc"] == rows[0]["user_data"]["fbc"]
    assert first["custom_data"] == {"value": 450.0, "currency": "usd"}
    assert first["action_source"] == "physical_store"
    assert "data_processing_options" not in first
    assert sandbox.event_ids_received() == {r["event_id"]: 1 for r in rows}


def test_test_event_code_and_limited_data_use_from_config(sandbox):
    events, _ = destinations(sandbox, config=make_config(limited_data_use=True), test_event_code="TEST123")
    passthrough = event_row(
        "b",
        data_processing_options=["LDU"],
        data_processing_options_country=0,
        data_processing_options_state=0,
    )

    results = events.send([event_row("a"), passthrough])

    assert all(r.outcome == Outcome.ACCEPTED for r in results)
    accepted = {a.event["event_id"]: a for a in sandbox.accepted_events()}
    added = accepted[sha("event-a")]
    assert added.test_event_code == "TEST123"
    assert added.event["data_processing_options"] == ["LDU"]
    assert added.event["data_processing_options_country"] == 1
    assert added.event["data_processing_options_state"] == 1000
    assert accepted[sha("event-b")].event["data_processing_options_country"] == 0


def test_stale_and_malformed_events_are_rejected_before_batching(sandbox):
    events, _ = destinations(sandbox)
    good = [event_row(str(i)) for i in range(4)]
    stale = event_row("stale", age_days=63)  # physical_store limit: 62 days
    bad_hash = event_row("hash", user_data={"em": ["Jane@Example.com"]})
    bad_fbc = event_row("fbc", user_data={"fbc": "IwAR-raw-fbclid"})
    unvalued_purchase = event_row("cd", custom_data=None)
    unknown_name = event_row("name", event_name="BotoxBooked")
    extra_field = event_row("extra", event_source_url="https://clinic.test/botox")

    results = by_key(
        events.send([*good[:2], stale, bad_hash, bad_fbc, *good[2:], unvalued_purchase])
        + events.send([unknown_name, extra_field])
    )

    assert results[stale["event_id"]].code == "stale_event"
    for row in (bad_hash, bad_fbc, unvalued_purchase, unknown_name, extra_field):
        assert (results[row["event_id"]].outcome, results[row["event_id"]].code) == (
            Outcome.REJECTED,
            "invalid_format",
        )
    (request,) = sandbox.requests_to("events")  # the second send had nothing to send
    assert len(json.loads(request.form["data"][0])) == 4
    assert set(sandbox.event_ids_received()) == {r["event_id"] for r in good}


def test_browser_ids_with_the_parameter_builder_appendix_are_sent(sandbox):
    """Meta's parameter builder appends a language token or its 8-character appendix to fbc and
    fbp; the PHI gate lets them out, so the adapter must not refuse them as malformed."""
    events, _ = destinations(sandbox)
    fbc, fbp = "fb.1.1763600000000.IwAR2F4-dbP0l7Mn1IawQQGCINEz7PYX", "fb.1.1763600000000.4717288100"
    rows = [
        event_row("a", user_data={"fbc": f"{fbc}.AQ", "fbp": f"{fbp}.Bg"}),
        event_row("b", user_data={"fbc": f"{fbc}.AQEBAQ8Y", "fbp": f"{fbp}.AQEAAQAB"}),
    ]
    assert all(FBC.fullmatch(r["user_data"]["fbc"]) and FBP.fullmatch(r["user_data"]["fbp"]) for r in rows)
    results = events.send(rows)
    assert [r.outcome for r in results] == [Outcome.ACCEPTED, Outcome.ACCEPTED]


def test_whole_request_rejection_is_bisected_and_the_rest_accepted(sandbox):
    events, _ = destinations(sandbox)
    rows = [event_row(str(i)) for i in range(8)]
    # passes our 62-day check against the run's end, but Meta's clock is 5 days later
    server_stale = event_row("late", age_days=60)
    sandbox.now = NOW + timedelta(days=5)
    sandbox.reject_event(rows[5]["event_id"], subcode=9000001)  # the sandbox's invalid event
    # a subcode not known to describe one event: isolated the same way, but not rejected for good
    sandbox.reject_event(rows[1]["event_id"], subcode=2804019)

    results = by_key(events.send([*rows[:3], server_stale, *rows[3:]]))

    assert results[server_stale["event_id"]].code == "100/2804003"
    assert results[server_stale["event_id"]].outcome == Outcome.REJECTED
    assert results[rows[5]["event_id"]].outcome == Outcome.REJECTED
    assert results[rows[5]["event_id"]].code == "100/9000001"
    assert results[rows[5]["event_id"]].request_id
    assert (results[rows[1]["event_id"]].outcome, results[rows[1]["event_id"]].code) == (
        Outcome.DEFERRED, "100/2804019")  # fmt: skip
    assert results[rows[1]["event_id"]].transmitted
    accepted = [r for r in results.values() if r.outcome == Outcome.ACCEPTED]
    assert len(accepted) == 6 and all(r.request_id for r in accepted)
    received = sandbox.event_ids_received()
    assert received == {r["event_id"]: 1 for i, r in enumerate(rows) if i not in (1, 5)}
    assert len(sandbox.requests_to("events")) <= 17


def test_every_event_refused_alone_with_one_unknown_subcode_stops_the_run_and_rejects_none(sandbox):
    # a request-level refusal that carries a subcode (a stale Test Events code, say) was bisected
    # down to single events, and each was recorded rejected for good
    events, _ = destinations(sandbox)
    rows = [event_row(str(i)) for i in range(4)]
    for _ in range(7):  # the batch, two halves, four singles
        sandbox.refuse_next(100, subcode=2804019)

    with pytest.raises(MetaDestinationConfigError, match="refused each of 4 events") as stopped:
        events.send(rows)

    decided = stopped.value.partial_results
    assert decided is not None and len(decided) == 4
    assert {(r.outcome, r.code, r.transmitted) for r in decided} == {(Outcome.DEFERRED, "100/2804019", True)}
    assert len(sandbox.requests_to("events")) == 7 and not sandbox.event_ids_received()
    assert not any(r.key in str(stopped.value) for r in decided)  # counts and codes, no event ID


def test_throttling_backs_off_for_the_header_estimate_then_retries(sandbox):
    events, _ = destinations(sandbox)
    sandbox.throttle_next(1, code=80003, regain_minutes=3)
    started = time.monotonic()

    results = events.send([event_row("t")])

    assert results[0].outcome == Outcome.ACCEPTED
    assert events.client.waits == [("throttle", pytest.approx(3 * 60 * WAIT))]
    assert time.monotonic() - started >= 3 * 60 * WAIT
    first, second = sandbox.requests_to("events")
    assert first.status == 400 and first.response["error"]["code"] == 80003
    assert second.status == 200
    assert sandbox.event_ids_received()[sha("event-t")] == 1


def test_persistent_throttling_defers_and_stops_calling(sandbox):
    events, _ = destinations(sandbox)
    sandbox.throttle_next(10, code=17, regain_minutes=1)

    first = events.send([event_row("1"), event_row("2")])
    second = events.send([event_row("3")])

    assert {(r.outcome, r.code) for r in first + second} == {(Outcome.DEFERRED, "throttled/17")}
    assert len(sandbox.requests_to("events")) == 4  # 1 + 3 retries, nothing for the 2nd send
    assert [r.transmitted for r in first + second] == [True, True, False]  # the 2nd send never left
    assert [kind for kind, _ in events.client.waits] == ["throttle"] * 3
    assert not sandbox.event_ids_received()


@pytest.mark.parametrize("html", [False, True], ids=["code-2", "html-502"])
def test_transient_errors_are_retried(sandbox, html):
    events, _ = destinations(sandbox)
    sandbox.fail_next(2, code=2, http_status=502 if html else 503, html=html)

    results = events.send([event_row("x")])

    assert results[0].outcome == Outcome.ACCEPTED
    assert [r.status for r in sandbox.requests_to("events")] == [502 if html else 503] * 2 + [200]
    assert [kind for kind, _ in events.client.waits] == ["transient", "transient"]


def test_transient_errors_that_persist_defer_the_batch(sandbox):
    events, _ = destinations(sandbox)
    sandbox.fail_next(10, code=1, http_status=500)

    results = events.send([event_row("x")])

    assert (results[0].outcome, results[0].code) == (Outcome.DEFERRED, "transient/1")
    assert len(sandbox.requests_to("events")) == 4


def test_invalid_token_stops_with_one_clear_message(sandbox):
    events = MetaEvents(make_config(), client_for(sandbox, "bad-token"), now=NOW)

    with pytest.raises(DestinationConfigError) as caught:
        events.send([event_row("x")])

    message = str(caught.value)
    assert "code 190" in message and f"pixel {PIXEL}" in message and "fbtrace_id" in message
    assert "META_ACCESS_TOKEN" in message and "bad-token" not in message
    assert caught.value.__cause__ is None and caught.value.__context__ is None
    assert not sandbox.event_ids_received()


def test_permission_and_unknown_pixel_stop_the_run(sandbox):
    sandbox.deny(PIXEL)
    events, _ = destinations(sandbox)
    with pytest.raises(DestinationConfigError, match=r"permission \(code 200\)"):
        events.send([event_row("x")])

    other = MetaEvents(make_config(pixel_id="999999"), client_for(sandbox, "sandbox-token"), now=NOW)
    with pytest.raises(DestinationConfigError, match=r"pixel 999999 does not exist.*100/33"):
        other.send([event_row("x")])


def test_an_unknown_audience_stops_the_sync(sandbox):
    # the sandbox took members for any audience id, so a mistyped suppression_audience_id
    # synced "fine" in every test
    _, audience = destinations(sandbox, config=make_config(suppression_audience_id="99999999999"))
    with pytest.raises(DestinationConfigError, match=r"audience 99999999999 does not exist.*100/33"):
        audience.sync([audience_row("add", ["a"])], [])
    assert not sandbox.audience_members("99999999999")


def test_app_secret_proof_is_sent_and_checked():
    with MetaSandbox(now=NOW, app_secret="s3cret") as sb:
        good = MetaEvents(make_config(), client_for(sb, "sandbox-token", app_secret="s3cret"), now=NOW)
        assert good.send([event_row("x")])[0].outcome == Outcome.ACCEPTED
        assert "appsecret_proof" in sb.received[0].query

        wrong = MetaEvents(make_config(), client_for(sb, "sandbox-token", app_secret="nope"), now=NOW)
        with pytest.raises(DestinationConfigError, match="without a subcode"):
            wrong.send([event_row("y")])


def test_2500_events_go_out_in_three_requests(sandbox):
    events, _ = destinations(sandbox)
    rows = [event_row(f"bulk{i}") for i in range(2500)]

    results = events.send(rows)

    assert len(results) == 2500 and all(r.outcome == Outcome.ACCEPTED for r in results)
    sizes = [len(json.loads(r.form["data"][0])) for r in sandbox.requests_to("events")]
    assert sizes == [1000, 1000, 500]
    assert set(sandbox.event_ids_received().values()) == {1}


def test_validate_only_and_duplicates_send_nothing_twice(sandbox):
    events, _ = destinations(sandbox)
    results = events.send([event_row("v")], validate_only=True)
    assert (results[0].outcome, results[0].code) == (Outcome.DEFERRED, "validate_only")
    assert not sandbox.received

    twice = events.send([event_row("d"), event_row("d")])
    assert [r.outcome for r in twice] == [Outcome.REJECTED, Outcome.ACCEPTED]
    assert twice[0].code == "duplicate_event_id"
    assert sandbox.event_ids_received()[sha("event-d")] == 1


# audiences


def test_audience_adds_and_removes_in_sessions_with_removal_in_the_body(sandbox):
    _, audience = destinations(sandbox)
    audience._max_rows = 10
    tags = [str(i) for i in range(25)]

    added = audience.sync([audience_row("add", tags[:12]), audience_row("add", tags[12:])], [])

    assert (added.adds, added.removes, added.rejected) == (25, 0, 0)
    posts = sandbox.requests_to("users")
    sessions = [json.loads(r.form["session"][0]) for r in posts]
    assert [s["batch_seq"] for s in sessions] == [1, 2, 3]
    assert [s["last_batch_flag"] for s in sessions] == [False, False, True]
    assert len({s["session_id"] for s in sessions}) == 1
    assert {s["estimated_num_total"] for s in sessions} == {25}
    payload = json.loads(posts[0].form["payload"][0])
    assert payload["schema"] == SCHEMA and payload["is_raw"] is True
    assert payload["data"][0] == member("0")
    assert sandbox.audience_members(AUDIENCE) == {member_key(member(t)) for t in tags}
    assert len(added.request_ids) == 4  # status read + 3 batches

    removed = audience.sync([], [audience_row("remove", tags[:5])])

    assert (removed.adds, removed.removes) == (0, 5)
    (delete,) = [r for r in sandbox.received if r.method == "DELETE"]
    assert "payload" in delete.form and "session" in delete.form
    assert "payload" not in delete.query and not any(sha("0@mail.test") in v for v in delete.query)
    assert sandbox.audience_members(AUDIENCE) == {member_key(member(t)) for t in tags[5:]}


def test_audience_batches_stop_at_ten_thousand_rows(sandbox):
    _, audience = destinations(sandbox)
    rows = [[sha(f"m{i}"), "", "", "", "", "", "", ""] for i in range(10_001)]

    result = audience.sync([{"operation": "add", "schema": SCHEMA, "data": rows}], [])

    assert result.adds == 10_001
    sizes = [len(json.loads(r.form["payload"][0])["data"]) for r in sandbox.requests_to("users")]
    assert sizes == [10_000, 1]


def test_full_resync_replaces_membership(sandbox):
    _, audience = destinations(sandbox)
    audience.sync([audience_row("add", ["a", "b", "c"])], [])

    result = audience.sync(
        [audience_row("add", ["c", "d"])], [audience_row("remove", ["a"])], full_resync=True
    )

    assert result.adds == 2 and result.removes == 0 and result.replaced and not result.unapplied
    (replace,) = sandbox.requests_to("usersreplace")
    assert json.loads(replace.form["session"][0])["last_batch_flag"] is True
    assert sandbox.audience_members(AUDIENCE) == {member_key(member("c")), member_key(member("d"))}


def test_invalid_audience_rows_are_counted_not_sent(sandbox):
    _, audience = destinations(sandbox)
    raw_email = member("x")
    raw_email[0] = "jane@example.com"

    result = audience.sync(
        [
            {"operation": "add", "schema": SCHEMA, "data": [raw_email, [""] * 8, member("ok")]},
            {"operation": "add", "schema": ["EMAIL", "DOB"], "data": [["", ""]]},
        ],
        [],
    )

    assert (result.adds, result.rejected, result.codes) == (1, 3, {"invalid_format": 3})
    payload = json.loads(sandbox.requests_to("users")[0].form["payload"][0])
    assert payload["data"] == [member("ok")]
    # the refused rows are not recorded as synced; the sent one is
    assert member_key(raw_email) in result.unapplied and member_key(member("ok")) not in result.unapplied


def test_a_refused_audience_batch_leaves_its_members_unapplied(sandbox):
    _, audience = destinations(sandbox)
    audience._max_rows = 2
    tags = ["a", "b", "c", "d", "e"]
    audience.sync([audience_row("add", tags)], [])
    # the status read goes through, the first remove batch is refused (no retry helps, not a stop)
    sandbox.refuse_next(2650, message="Invalid Custom Audience data", after=1)

    result = audience.sync([], [audience_row("remove", tags[:3])])

    assert result.removes == 0 and result.codes == {"2650": 3}
    assert result.unapplied == {member_key(member(t)) for t in tags[:3]}
    assert sandbox.audience_members(AUDIENCE) == {member_key(member(t)) for t in tags}


@pytest.mark.parametrize("status_471", [True, False], ids=["status-471", "subcode-1713230"])
def test_health_flagged_audience_is_reported_clearly(sandbox, status_471):
    sandbox.flag_audience(AUDIENCE, status_471=status_471)
    _, audience = destinations(sandbox)

    with pytest.raises(DestinationConfigError) as caught:
        audience.sync([audience_row("add", ["a"])], [])

    message = str(caught.value)
    assert f"audience {AUDIENCE}" in message and "health condition" in message
    assert "471" in message and "1713230" in message
    # the SDK's error (its text holds the batch's hashes) was the stop's __context__
    assert caught.value.__cause__ is None and caught.value.__context__ is None
    assert not sandbox.audience_members(AUDIENCE)


def test_audience_throttled_past_back_off_raises_unavailable(sandbox):
    _, audience = destinations(sandbox)
    sandbox.throttle_next(10, code=80003, regain_minutes=1)

    with pytest.raises(MetaUnavailable, match="80003") as caught:
        audience.sync([audience_row("add", ["a"])], [])
    assert caught.value.__cause__ is None and caught.value.__context__ is None


def test_audience_disabled_or_validate_only_sends_nothing(sandbox):
    _, disabled = destinations(sandbox, config=make_config(suppression_enabled=False))
    assert disabled.sync([audience_row("add", ["a"])], []).adds == 0

    _, audience = destinations(sandbox)
    checked = audience.sync(
        [audience_row("add", ["a", "b"])], [audience_row("remove", ["c"])], validate_only=True
    )
    assert checked.codes == {"would_add": 2, "would_remove": 1}
    assert not sandbox.received


def test_session_ids_are_deterministic_per_seed():
    config = make_config()
    client = MetaGraphClient(access_token="unused", graph_url="http://127.0.0.1:9")
    one = MetaAudience(config, client, now=NOW, session_seed="run-1")
    same = MetaAudience(config, client, now=NOW, session_seed="run-1")
    other = MetaAudience(config, client, now=NOW, session_seed="run-2")
    ids = [a._session_id("add", tuple(SCHEMA)) for a in (one, same, other)]
    assert ids[0] == ids[1] != ids[2] and 0 < ids[0] < 2**63


def test_member_key_matches_the_sandbox():
    row = member("k")
    assert member_key(row) == sandbox_module.member_key(row)
    assert member_key(row) == sha(json.dumps(row, separators=(",", ":")))


# configuration


def test_doctor_reports_without_secrets():
    env = {"META_ACCESS_TOKEN": "tok-very-secret", "META_APP_SECRET": "app-secret-value"}
    checks = dict(doctor_meta(make_config(), env))
    assert checks["META_ACCESS_TOKEN"] == "ok" and checks["META_APP_SECRET"] == "ok"
    assert checks["META_APP_ID"].startswith("missing META_APP_ID")
    assert checks["meta.event_age_limit_days"] == "ok (62 days for physical_store)"
    assert "tok-very-secret" not in repr(checks) and "app-secret-value" not in repr(checks)
    assert dict(doctor_meta(make_config(), {}))["META_ACCESS_TOKEN"] == "missing META_ACCESS_TOKEN"


def test_live_target_needs_a_token_and_keeps_it_out_of_urls():
    with pytest.raises(ConfigError, match="META_ACCESS_TOKEN is not set"):
        make_meta_destinations(make_config(), target="live", now=NOW, environ={})

    events, _ = make_meta_destinations(
        make_config(), target="live", now=NOW, environ={"META_ACCESS_TOKEN": "live-token"}
    )
    assert isinstance(events, MetaEvents)
    session = events.client.api._session
    assert session.GRAPH == "https://graph.facebook.com"
    assert "access_token" not in session.requests.params
    assert session.requests.headers["Authorization"] == "Bearer live-token"


def test_factory_starts_a_sandbox_when_none_is_given():
    events, audience = make_meta_destinations(make_config(), target="sandbox", now=NOW)
    sb = events.client.sandbox
    assert sb is not None
    try:
        assert events.send([event_row("auto")])[0].outcome == Outcome.ACCEPTED
        assert audience.sync([audience_row("add", ["a"])], []).adds == 1
    finally:
        sb.stop()


def test_factory_reaches_a_sandbox_in_another_process_by_url(sandbox):
    env = {"META_SANDBOX_URL": sandbox.url}
    events, _ = make_meta_destinations(make_config(), target="sandbox", now=NOW, environ=env)

    assert events.send([event_row("url")])[0].outcome == Outcome.ACCEPTED
    assert sandbox.event_ids_received() == {sha("event-url"): 1}


# canary: no token, no event value in any log line or exception we raise


def test_canary_token_and_values_never_logged_or_raised(caplog):
    token = f"canary-token-{uuid.uuid4().hex}"
    bad_token = f"canary-bad-{uuid.uuid4().hex}"
    caplog.set_level(logging.DEBUG)
    # a run earlier in this process holds these at WARNING (etl.settings); the worst case is DEBUG
    for name in ("urllib3", "facebook_business"):
        caplog.set_level(logging.DEBUG, logger=name)
    rows = [
        event_row(f"c{i}", event_id=sha(f"canary-{uuid.uuid4()}"))
        | {
            "user_data": {
                "em": [sha(f"c{i}")],
                "fbc": f"fb.1.1763600000000.CANARY{uuid.uuid4().hex}",
            }
        }
        for i in range(6)
    ]
    planted = [token, bad_token] + [r["event_id"] for r in rows]
    planted += [r["user_data"]["fbc"] for r in rows] + [r["user_data"]["em"][0] for r in rows]
    raised: list[BaseException] = []

    with MetaSandbox(access_token=token, now=NOW) as sb:
        client = client_for(sb, token)
        events = MetaEvents(make_config(), client, now=NOW)
        audience = MetaAudience(make_config(), client, now=NOW)
        sb.reject_event(rows[2]["event_id"])
        sb.throttle_next(1, code=17, regain_minutes=1)
        sb.fail_next(1, code=2)
        results = events.send(rows)
        assert sum(r.outcome == Outcome.ACCEPTED for r in results) == 5
        audience.sync([audience_row("add", ["a", "b"])], [audience_row("remove", ["c"])])
        sb.flag_audience(AUDIENCE)
        for action in (
            lambda: audience.sync([audience_row("add", ["d"])], []),
            lambda: MetaEvents(make_config(), client_for(sb, bad_token), now=NOW).send(rows[:1]),
        ):
            with pytest.raises(DestinationConfigError) as caught:
                action()
            raised.append(caught.value)

    assert any(r.name.startswith("urllib3") for r in caplog.records)  # DEBUG really captured
    logged = "\n".join(r.getMessage() for r in caplog.records)
    shown = "\n".join("".join(traceback.format_exception(exc)) for exc in raised)
    for value in planted:
        assert value not in logged
        assert value not in shown


def test_a_second_sync_never_reuses_a_session_id(sandbox):
    # Meta: session_id is unique per ad account; an Airflow retry of the same run builds a new
    # destination with the same run end, and must not reopen the first attempt's sessions
    first, second = (destinations(sandbox)[1] for _ in range(2))
    assert first.sync([audience_row("add", ["a"])], []).adds == 1
    assert second.sync([audience_row("add", ["b"])], []).adds == 1
    ids = [json.loads(r.form["session"][0])["session_id"] for r in sandbox.requests_to("users")]
    assert len(ids) == len(set(ids)) == 2
    assert sandbox.audience_members(AUDIENCE) == {member_key(member(t)) for t in "ab"}


def test_a_live_backfill_judges_event_age_when_meta_receives_it(sandbox, monkeypatch):
    # a backfill whose run ended 30 days ago: an event 40 days before that end is inside the
    # 62-day limit at the end, but 70 days old when Meta receives it, and one such event makes
    # Meta refuse the whole request; judged at upload time it is refused here, alone
    from etl import tasks
    from etl.rules.stages import RunWindow

    end = NOW - timedelta(days=30)
    spec = tasks.RunSpec(config=make_config(), window=RunWindow(start=end - timedelta(days=1), end=end))
    monkeypatch.setattr(tasks, "_clock", lambda: NOW)
    assert tasks.upload_time(spec, "sandbox") == end  # the sandbox's clock is the run's end
    assert tasks.upload_time(spec, "live") == NOW
    events, _ = make_meta_destinations(make_config(), target="sandbox", now=tasks.upload_time(spec, "live"),
                                       sandbox=sandbox, retry_wait=WAIT)  # fmt: skip
    stale, fresh = event_row("old", age_days=70), event_row("new", age_days=10)
    results = {r.key: r for r in events.send([stale, fresh])}
    assert results[stale["event_id"]].outcome is Outcome.REJECTED
    assert not results[stale["event_id"]].transmitted
    assert results[fresh["event_id"]].outcome is Outcome.ACCEPTED
    assert len(sandbox.requests_to("events")) == 1


def test_a_full_resync_with_two_schemas_is_refused_before_anything_is_sent(sandbox):
    # each usersreplace session swaps the whole audience: a second schema would wipe the first
    _, audience = destinations(sandbox)
    other = {"operation": "add", "schema": ["EMAIL"], "data": [[sha("x@mail.test")]]}
    with pytest.raises(ValueError, match="one schema"):
        audience.sync([audience_row("add", ["a"]), other], [], full_resync=True)
    assert sandbox.requests_to("usersreplace") == [] and sandbox.requests_to("users") == []


def test_rows_a_refused_request_carried_count_as_sent_even_when_the_budget_defers_them(sandbox):
    # one request of 4 events is refused for one of them; with a budget of one request the
    # halves are deferred, but all four left this process inside that request
    events, _ = destinations(sandbox)
    events._bisect_budget = 1
    rows = [event_row(str(i)) for i in range(4)]
    sandbox.reject_event(rows[1]["event_id"], subcode=2804019)
    results = events.send(rows)
    assert {(r.outcome, r.code) for r in results} == {(Outcome.DEFERRED, "bisect_budget")}
    assert all(r.transmitted for r in results) and len(sandbox.requests_to("events")) == 1
    # with no budget at all nothing is sent, and nothing counts as sent
    events._bisect_budget = 0
    assert not any(r.transmitted for r in events.send(rows))
