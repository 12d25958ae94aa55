"""Customer Match (suppression list) sync through both real Google clients against the sandbox.

Google Ads API: offline user data jobs (one per direction, ``remove_all`` first in its own job,
about 10,000 identifiers per add call, run and polled). Data Manager API: audience members
ingest/remove in requests of at most 10,000, bisected when one member is refused.
"""

from __future__ import annotations

from typing import Any

import pytest

from etl.destinations.google_common import make_google_destinations, member_key
from etl.errors import DestinationConfigError, QuotaExhausted

BOTH = ["google_ads", "data_manager"]
LIST = "customers/1234567890/userLists/555"


def audience(google_config: Any, sandbox: Any, api: str, **google: Any) -> Any:
    _, destination = make_google_destinations(
        google_config(api, **google), target="sandbox", sandbox=sandbox, retry_wait=0
    )
    return destination


def jobs_sent(sandbox: Any) -> list[list[str]]:
    """Per created job, the kinds of operations added to it, in order."""
    kinds: dict[str, list[str]] = {}
    for request in sandbox.requests("AddOfflineUserDataJobOperations"):
        for op in request.operations:
            kinds.setdefault(request.resource_name, []).append(type(op).pb(op).WhichOneof("operation"))
    return list(kinds.values())


def test_google_ads_a_job_still_running_when_polling_ends_settles_none_of_its_members(
    google_sandbox, google_config, google_member
):
    # jobs "may take 6 hours or more" and can still fail; counted applied, a remove that then
    # failed left a revoked person on the list, and no later sync tried it again
    destination = audience(google_config, google_sandbox, "google_ads")
    destination._poll_timeout = 0.0  # polling gives up at once ...
    google_sandbox.job_polls = 1_000  # ... while Google still says RUNNING
    joining, leaving = google_member("a1"), google_member("r1", "remove")
    result = destination.sync([joining], [leaving])
    assert result.codes["JOB_PENDING"] == 2 and (result.adds, result.removes) == (0, 0)
    assert {member_key(joining), member_key(leaving)} <= result.unapplied  # sent again next sync


def test_google_ads_a_full_resync_whose_job_is_still_running_has_not_replaced_the_list(
    google_sandbox, google_config, google_member
):
    # counted replaced while Google still ran (and could fail) the remove_all job: the sync
    # settled everyone who left, so a revoked person stayed on the list when the job failed
    destination = audience(google_config, google_sandbox, "google_ads")
    destination._poll_timeout, google_sandbox.job_polls = 0.0, 1_000
    result = destination.sync([google_member("a1")], [], full_resync=True)
    assert result.codes["JOB_PENDING"] == 1 and not result.replaced  # the next sync redoes it
    google_sandbox.job_polls = 1
    finished = audience(google_config, google_sandbox, "google_ads").sync(
        [google_member("a1")], [], full_resync=True
    )
    assert finished.replaced and "JOB_PENDING" not in finished.codes


@pytest.mark.parametrize("api", BOTH)
def test_adds_then_removes_mirror_the_list(api, google_sandbox, google_config, google_member):
    destination = audience(google_config, google_sandbox, api)
    members = [google_member(f"m{i}") for i in range(5)]

    added = destination.sync(members, [])
    assert (added.adds, added.removes, added.rejected) == (5, 0, 0)
    assert google_sandbox.list_members(LIST) == {member_key(m) for m in members}

    leaving = [google_member(f"m{i}", "remove") for i in range(2)]
    removed = destination.sync([google_member("m9")], leaving)
    assert (removed.adds, removed.removes, removed.rejected) == (1, 2, 0)
    expected = {member_key(m) for m in members[2:]} | {member_key(google_member("m9"))}
    assert google_sandbox.list_members(LIST) == expected
    assert destination.name == "google_customer_match"


def test_google_ads_uses_separate_jobs_and_consent_on_create_only(
    google_sandbox, google_config, google_member
):
    destination = audience(google_config, google_sandbox, "google_ads")
    destination.sync([google_member("a1"), google_member("a2")], [google_member("r1", "remove")])

    creates = google_sandbox.requests("CreateOfflineUserDataJob")
    assert len(creates) == 2 and len(google_sandbox.requests("RunOfflineUserDataJob")) == 2
    remove_job, create_job = (c.job for c in creates)
    assert remove_job.type_.name == create_job.type_.name == "CUSTOMER_MATCH_USER_LIST"
    assert create_job.customer_match_user_list_metadata.user_list == LIST
    assert create_job.customer_match_user_list_metadata.consent.ad_user_data.name == "GRANTED"
    assert remove_job.customer_match_user_list_metadata.consent.ad_user_data.name == "UNSPECIFIED"
    assert jobs_sent(google_sandbox) == [["remove"], ["create", "create"]]
    assert all(r.enable_partial_failure for r in google_sandbox.requests("AddOfflineUserDataJobOperations"))
    assert google_sandbox.requests("Search")  # polled to a terminal state
    assert all(job.status == "SUCCESS" for job in google_sandbox.jobs.values())


@pytest.mark.parametrize("api", BOTH)
def test_remove_all_only_with_full_resync(api, google_sandbox, google_config, google_member):
    destination = audience(google_config, google_sandbox, api)
    destination.sync([google_member(f"old{i}") for i in range(3)], [])
    remove_all = "AddOfflineUserDataJobOperations" if api == "google_ads" else "RemoveAllAudienceMembers"
    before = len(google_sandbox.requests(remove_all))
    if api == "data_manager":
        assert before == 0

    fresh = [google_member("new1"), google_member("new2")]
    result = destination.sync(fresh, [], full_resync=True)

    assert result.adds == 2 and result.codes.get("REMOVE_ALL", 1) == 1
    assert result.replaced and not result.unapplied
    assert google_sandbox.list_members(LIST) == {member_key(m) for m in fresh}
    if api == "google_ads":
        assert jobs_sent(google_sandbox) == [["create"] * 3, ["remove_all", "create", "create"]]
    else:
        assert len(google_sandbox.requests("RemoveAllAudienceMembers")) == 1
        order = [m for m, _ in google_sandbox.received]
        assert order.index("RemoveAllAudienceMembers") < len(order) - 1
        assert order[-1] == "IngestAudienceMembers"
    assert not destination.sync(fresh, []).replaced  # a delta sync replaces nothing


def test_data_manager_a_remove_all_refused_without_a_reason_replaces_nothing_and_adds_nothing(
    google_sandbox, google_config, google_member
):
    # the refusal was raised for bisecting, which remove-all never does: an internal error left
    # the sync instead of its answer
    destination = audience(google_config, google_sandbox, "data_manager")
    destination.sync([google_member("old")], [])
    google_sandbox.fail_next("RemoveAllAudienceMembers", "malformed")
    result = destination.sync([google_member("new")], [], full_resync=True)
    assert result.codes == {"INVALID_ARGUMENT": 1} and not result.replaced and result.adds == 0
    assert google_sandbox.list_members(LIST) == {member_key(google_member("old"))}


def test_data_manager_a_member_google_refuses_as_not_sha256_is_rejected_not_a_stop(
    google_sandbox, google_config, google_member, monkeypatch
):
    # INVALID_SHA256_FORMAT was not a row reason: one member our own checks let through stopped
    # the whole sync as an account problem instead of being found (bisected) and rejected
    from etl.destinations import google_datamanager_audience

    monkeypatch.setattr(google_datamanager_audience, "check_member_row", lambda *a, **k: None)
    destination = audience(google_config, google_sandbox, "data_manager")
    short = google_member("short")
    short["user_identifiers"] = [{"hashed_email": "a" * 63}]
    result = destination.sync([google_member("a1"), short, google_member("a2")], [])
    assert (result.adds, result.rejected) == (2, 1) and result.codes == {"INVALID_SHA256_FORMAT": 1}
    assert google_sandbox.list_members(LIST) == {member_key(google_member(t)) for t in ("a1", "a2")}


def test_google_ads_add_calls_hold_about_ten_thousand_identifiers(
    google_sandbox, google_config, google_member
):
    destination = audience(google_config, google_sandbox, "google_ads")
    members = [google_member(f"big{i}") for i in range(6000)]  # 2 identifiers each
    result = destination.sync(members, [])
    calls = google_sandbox.requests("AddOfflineUserDataJobOperations")
    assert [len(c.operations) for c in calls] == [5000, 1000]
    assert result.adds == 6000 and len(google_sandbox.list_members(LIST)) == 6000


def test_data_manager_requests_hold_at_most_ten_thousand_members(
    google_sandbox, google_config, google_member
):
    destination = audience(google_config, google_sandbox, "data_manager")
    members = [google_member(f"big{i}", address=False) for i in range(12_000)]
    result = destination.sync(members, [])
    sizes = [len(r.audience_members) for r in google_sandbox.requests("IngestAudienceMembers")]
    assert sizes == [10_000, 2_000] and result.adds == 12_000


def test_google_ads_rejected_members_are_reported_by_key(google_sandbox, google_config, google_member):
    destination = audience(google_config, google_sandbox, "google_ads")
    bad = google_member("bad")
    bad["user_identifiers"][0] = {"hashed_email": "not-a-sha256"}
    good = google_member("good")
    result = destination.sync([good, bad], [])
    assert (result.adds, result.rejected) == (1, 1)
    assert result.codes == {"INVALID_SHA256_FORMAT": 1}
    assert [(r.key, r.code) for r in result.rejected_members] == [(member_key(bad), "INVALID_SHA256_FORMAT")]
    assert result.unapplied == {member_key(bad)}
    assert google_sandbox.list_members(LIST) == {member_key(good)}


def test_google_ads_an_error_naming_no_operation_settles_none_without_their_own(
    google_sandbox, google_config, google_member
):
    # an error with no field path was skipped: the members it may concern counted as applied,
    # so a remove it concerned would never be sent again
    destination = audience(google_config, google_sandbox, "google_ads")
    google_sandbox.unlocated_error_next()
    joining = [google_member("u1"), google_member("u2")]
    result = destination.sync(joining, [])
    assert result.adds == 0 and result.rejected == 0
    assert result.codes["unlocated/INTERNAL_ERROR"] == 2
    assert result.unapplied == {member_key(m) for m in joining}  # sent again next sync
    again = destination.sync(joining, [])
    assert again.adds == 2 and not again.unapplied
    assert google_sandbox.list_members(LIST) == {member_key(m) for m in joining}


def test_data_manager_bisects_a_refused_member(google_sandbox, google_config, google_member):
    destination = audience(google_config, google_sandbox, "data_manager")
    members = [google_member(f"z{i}") for i in range(10)]
    # passes the local check, but Google wants a 5-digit US ZIP
    members[3] = google_member("z3", postal_code="9404")
    result = destination.sync(members, [])
    assert (result.adds, result.rejected) == (9, 1)
    assert [(r.key, r.code) for r in result.rejected_members] == [
        (member_key(members[3]), "INVALID_POSTAL_CODE")
    ]
    assert result.unapplied == {member_key(members[3])}
    assert google_sandbox.list_members(LIST) == {member_key(m) for i, m in enumerate(members) if i != 3}


@pytest.mark.parametrize("api", BOTH)
def test_members_are_checked_before_sending(api, google_sandbox, google_config, google_member):
    destination = audience(google_config, google_sandbox, api)
    extra_key = google_member("x", note="PHI")
    result = destination.sync([extra_key, google_member("ok")], [])
    assert result.adds == 1 and result.codes == {"INVALID_AUDIENCE_MEMBER": 1}


@pytest.mark.parametrize("api", BOTH)
def test_validate_only_changes_nothing(api, google_sandbox, google_config, google_member):
    destination = audience(google_config, google_sandbox, api)
    destination.sync([google_member("v1")], [], validate_only=True)
    assert google_sandbox.list_members(LIST) == set()
    method = "AddOfflineUserDataJobOperations" if api == "google_ads" else "IngestAudienceMembers"
    assert all(r.validate_only for r in google_sandbox.requests(method))
    assert not google_sandbox.requests("RunOfflineUserDataJob")


@pytest.mark.parametrize("api", BOTH)
def test_transient_error_is_retried(api, google_sandbox, google_config, google_member):
    destination = audience(google_config, google_sandbox, api)
    method = "AddOfflineUserDataJobOperations" if api == "google_ads" else "IngestAudienceMembers"
    google_sandbox.fail_next(method, "unavailable", times=2)
    result = destination.sync([google_member("t1")], [])
    assert result.adds == 1 and len(google_sandbox.requests(method)) == 3


@pytest.mark.parametrize("api", BOTH)
def test_account_problems_and_quota_stop_the_sync(api, google_sandbox, google_config, google_member):
    destination = audience(google_config, google_sandbox, api)
    method = "CreateOfflineUserDataJob" if api == "google_ads" else "IngestAudienceMembers"
    google_sandbox.fail_next(method, "terms")
    with pytest.raises(DestinationConfigError, match="1234567890"):
        destination.sync([google_member("c1")], [])
    google_sandbox.fail_next(method, "daily_quota")
    with pytest.raises(QuotaExhausted):
        destination.sync([google_member("c2")], [])


@pytest.mark.parametrize("api", BOTH)
def test_suppression_disabled_or_unset(api, google_sandbox, google_config, google_member):
    disabled = audience(google_config, google_sandbox, api, suppression_enabled=False)
    assert disabled.sync([google_member("d1")], []).adds == 0
    assert google_sandbox.received == []
    unset = audience(google_config, google_sandbox, api, suppression_user_list=None)
    with pytest.raises(DestinationConfigError, match="suppression_user_list"):
        unset.sync([google_member("d2")], [])


def test_google_ads_full_resync_whose_remove_all_failed_replaces_nothing(
    google_sandbox, google_config, google_member
):
    # the call carrying remove_all failed after its retries: running the job would only add,
    # and a state recorded as replaced would forget the old members still on the list
    destination = audience(google_config, google_sandbox, "google_ads")
    old = [google_member(f"old{i}") for i in range(3)]
    destination.sync(old, [])
    google_sandbox.fail_next("AddOfflineUserDataJobOperations", "transient", times=5)
    fresh = [google_member("new1"), google_member("new2")]

    result = destination.sync(fresh, [], full_resync=True)

    assert not result.replaced and result.adds == 0
    assert result.unapplied == {member_key(m) for m in fresh}
    assert google_sandbox.list_members(LIST) == {member_key(m) for m in old}
    assert len(google_sandbox.requests("RunOfflineUserDataJob")) == 1  # the first sync's job only


def test_data_manager_full_resync_stopped_after_emptying_the_list_records_the_empty_list(
    tmp_path, google_sandbox, google_config, google_member
):
    import json
    from datetime import UTC, datetime

    from etl import deliver, ledger, store

    config = google_config("data_manager")
    destination = audience(google_config, google_sandbox, "data_manager")
    members = [google_member(f"o{i}") for i in range(3)]

    def outbox(name: str) -> Any:
        path = tmp_path / name
        path.mkdir()
        lines = [
            json.dumps({"operation": "create", "user_identifiers": m["user_identifiers"]}) for m in members
        ]
        (path / "google_customer_match.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    at = datetime(2026, 11, 1, tzinfo=UTC)
    with store.engine_for(f"sqlite:///{tmp_path / 's.sqlite'}") as engine:
        deliver.sync_audience(config, engine, outbox("1"), destination, full_resync=False, clock=lambda: at)
        state = lambda: set(ledger.read_audience_state(engine, config.clinic_id, destination.name))  # noqa: E731
        assert len(state()) == 3 == len(google_sandbox.list_members(LIST))
        google_sandbox.fail_next("IngestAudienceMembers", "daily_quota")
        with pytest.raises(QuotaExhausted):
            deliver.sync_audience(
                config, engine, outbox("2"), destination, full_resync=True, clock=lambda: at
            )
        assert google_sandbox.list_members(LIST) == set()  # emptied, nothing added back yet
        assert state() == set()  # so the next nightly sync adds everyone again
        deliver.sync_audience(config, engine, outbox("3"), destination, full_resync=False, clock=lambda: at)
    assert google_sandbox.list_members(LIST) == {member_key(m) for m in members}


@pytest.mark.parametrize("api", BOTH)
def test_consent_is_claimed_only_when_the_plan_required_it(api, google_sandbox, google_config, google_member):
    # suppression_requires_consent: false lists people with no authorization on record; Google
    # is then told nothing about consent rather than told it was granted
    base = google_config(api)
    config = base.model_copy(
        update={"rules": base.rules.model_copy(update={"suppression_requires_consent": False})}
    )
    _, destination = make_google_destinations(config, target="sandbox", sandbox=google_sandbox, retry_wait=0)
    destination.sync([google_member("u1")], [])
    if api == "google_ads":
        (job,) = (c.job for c in google_sandbox.requests("CreateOfflineUserDataJob"))
        consent = job.customer_match_user_list_metadata.consent
        assert (consent.ad_user_data.name, consent.ad_personalization.name) == ("UNSPECIFIED", "UNSPECIFIED")
    else:
        (request,) = google_sandbox.requests("IngestAudienceMembers")
        assert "consent" not in request
    assert len(google_sandbox.list_members(LIST)) == 1
