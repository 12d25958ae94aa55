"""What Google made of Data Manager requests it took, read back by later uploads (etl.confirm).

Driven through the real Data Manager client against the sandbox, which processes a request after
answering it (``status_polls``, ``fail_processing_next``); every assertion about what Google
holds is made on the sandbox's own record.
"""

from __future__ import annotations

import itertools
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from etl import audit, confirm, ledger, store, tasks
from tests.test_delivery import build, clinic_dir, config_for, sandboxes, upload

__all__ = ["clinic_dir", "sandboxes"]  # fixtures, shared with test_delivery


def _checks(db: str) -> list[Any]:
    with store.engine_for(db) as engine, engine.connect() as conn:
        return conn.execute(
            sa.select(store.request_checks).order_by(
                store.request_checks.c.sent_at, store.request_checks.c.request_id
            )
        ).all()


def _ledger(db: str, clinic_id: str) -> dict[str, ledger.LedgerEntry]:
    with store.engine_for(db) as engine:
        return ledger.read_ledger(engine, clinic_id, "google_conversions")


def test_a_request_google_failed_in_processing_is_recorded_rejected_by_the_next_upload(
    clinic_dir: Path, sandboxes: dict[str, Any], tmp_path: Path
) -> None:
    cfg = config_for(clinic_dir, "data_manager")
    db = f"sqlite:///{tmp_path / 's.sqlite'}"
    google = sandboxes["google"]
    first = build(cfg, "2026-09-01", "2026-11-20", db, tmp_path)
    google.fail_processing_next("IngestEvents", "PROCESSING_ERROR_REASON_EVENT_TOO_OLD")
    google.fail_processing_next("IngestEvents", partial=True)
    counts = upload(first, "google", sandboxes, batch=20)
    assert counts["requests"] >= 3 and counts["accepted"] == counts["sent"] > 50
    assert "request_statuses" not in counts  # nothing was tracked before this upload
    checks = _checks(db)
    assert len(checks) == counts["requests"] and {c.status for c in checks} == {"processing"}
    assert sum(c.records for c in checks) == counts["accepted"]
    failed_rid, partial_rid = checks[0].request_id, checks[1].request_id
    before = _ledger(db, cfg.clinic_id)
    carried = {oid for oid, e in before.items() if e.request_id == failed_rid}
    assert len(carried) == checks[0].records and {before[o].status for o in carried} == {"accepted"}
    # Google applied none of the failed request's conversions (the sandbox's own record)
    assert not carried & set(google.accepted_order_ids())

    nxt = build(cfg, "2026-11-20", "2026-11-21", db, tmp_path)  # the next night: 24 h on
    counts = upload(nxt, "google", sandboxes, batch=50)
    assert counts["request_statuses"] == {
        "failed": 1,
        "partial_success": 1,
        "success": len(checks) - 2,
    }
    after = _ledger(db, cfg.clinic_id)
    for oid in carried:  # rejected with Google's reason, under the run that sent them
        assert (after[oid].status, after[oid].code, after[oid].run_id) == (
            "rejected",
            "EVENT_TOO_OLD",
            first.run_id,
        )
    others = {oid for oid, e in before.items() if e.status == "accepted"} - carried
    assert {after[o].status for o in others} == {"accepted"}  # partial: which failed is not known
    by_id = {c.request_id: c for c in _checks(db)}
    assert (by_id[failed_rid].status, json.loads(by_id[failed_rid].errors)) == (
        "failed", {"EVENT_TOO_OLD": len(carried)},
    )  # fmt: skip
    assert (by_id[partial_rid].status, json.loads(by_id[partial_rid].errors)) == (
        "partial_success", {"INTERNAL_ERROR": 1},
    )  # fmt: skip
    # the rejections went through the ledger, so the audit chain still matches it
    with store.engine_for(db) as engine, engine.connect() as conn:
        assert audit.verify(conn, cfg.clinic_id).intact
    # a request read to its end is not read again; one still open (the last night's) is
    reads = len(google.requests("RetrieveRequestStatus"))
    still_open = {rid for rid, c in by_id.items() if c.status == "processing"}
    upload(build(cfg, "2026-11-21", "2026-11-22", db, tmp_path), "google", sandboxes, batch=50)
    read = {r.request_id for r in google.requests("RetrieveRequestStatus")[reads:]}
    assert read == still_open


def test_a_request_is_read_only_after_half_an_hour_and_again_while_google_processes_it(
    clinic_dir: Path, sandboxes: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config_for(clinic_dir, "data_manager")
    db = f"sqlite:///{tmp_path / 's.sqlite'}"
    google = sandboxes["google"]
    google.status_polls = 1  # each status reads PROCESSING once before SUCCESS
    first = build(cfg, "2026-09-01", "2026-11-20", db, tmp_path)
    upload(first, "google", sandboxes, batch=20)
    tracked = [c.request_id for c in _checks(db)]
    assert len(tracked) >= 3
    # the same night's end again (a rerun minutes later): nothing is old enough to read
    counts = upload(build(cfg, "2026-09-01", "2026-11-20", db, tmp_path), "google", sandboxes, batch=20)
    assert "request_statuses" not in counts and google.requests("RetrieveRequestStatus") == []
    google.dm_requests[tracked[0]].polls_left = 1_000  # one Google never finishes
    # given up 60 hours on: still read on the nights 24 and 48 hours on, not 72
    monkeypatch.setattr(confirm, "GIVE_UP_AFTER", timedelta(hours=60))
    counts = upload(build(cfg, "2026-11-20", "2026-11-21", db, tmp_path), "google", sandboxes, batch=20)
    assert counts["request_statuses"] == {"processing": len(tracked)}
    counts = upload(build(cfg, "2026-11-21", "2026-11-22", db, tmp_path), "google", sandboxes, batch=20)
    assert counts["request_statuses"]["success"] == len(tracked) - 1
    assert counts["request_statuses"]["processing"] >= 1
    counts = upload(build(cfg, "2026-11-22", "2026-11-23", db, tmp_path), "google", sandboxes, batch=20)
    assert counts["request_statuses"]["unconfirmed"] == 1
    assert {c.request_id: c.status for c in _checks(db)}[tracked[0]] == "unconfirmed"


def test_a_list_request_google_failed_makes_the_next_plan_replace_the_list(
    clinic_dir: Path, sandboxes: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a failed add leaves people our state counts as listed off the list (their suppression does
    # not work); nothing says which, so the list is replaced as soon as the failure is known
    monkeypatch.setattr(confirm, "CHECK_AFTER", timedelta(0))  # the sync's clock is the wall clock
    cfg = config_for(clinic_dir, "data_manager")
    assert cfg.google_ads is not None and cfg.google_ads.suppression_user_list
    user_list = cfg.google_ads.suppression_user_list
    db = f"sqlite:///{tmp_path / 's.sqlite'}"
    google = sandboxes["google"]

    def sync(start: str, end: str) -> tuple[dict[str, Any], dict[str, Any]]:
        spec = build(cfg, start, end, db, tmp_path)
        tasks.sync_suppression(spec, target="sandbox", sandboxes=sandboxes, retry_wait=0)
        summary = json.loads((spec.paths.outbox / "summary.json").read_text(encoding="utf-8"))
        result = json.loads((spec.paths.results / "google_customer_match.json").read_text(encoding="utf-8"))
        return summary["destinations"]["google_customer_match"], result

    google.fail_processing_next("IngestAudienceMembers", "PROCESSING_ERROR_REASON_INTERNAL_ERROR")
    planned, result = sync("2026-09-01", "2026-11-20")
    members = planned["members"]
    assert members > 100 and result["adds"] == members
    assert google.list_members(user_list) == set()  # the one request failed in processing
    with store.engine_for(db) as engine:  # our state believes them listed
        assert len(ledger.read_audience_state(engine, cfg.clinic_id, "google_customer_match")) == members

    planned, result = sync("2026-11-20", "2026-11-21")  # reads the failure; its plan was made before
    assert "resync_due" not in planned and result["request_statuses"] == {"failed": 1}
    assert len(google.list_members(user_list)) == result["adds"] < 10  # only this night's new ones

    planned, result = sync("2026-11-21", "2026-11-22")
    assert planned["resync_due"] == 1 and planned["adds"] == planned["members"]
    assert result["codes"].get("REMOVE_ALL") == 1
    assert len(google.list_members(user_list)) == planned["members"] > 100

    planned, result = sync("2026-11-22", "2026-11-23")  # replaced since: a delta again
    assert "resync_due" not in planned and "REMOVE_ALL" not in result["codes"]
    assert len(google.list_members(user_list)) == planned["members"]


def _upload_whose_second_outcome_the_database_refuses(
    cfg: Any, db: str, sandboxes: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tasks.RunSpec:
    """A real run's Google upload in batches of 20 whose second batch left and was answered, but
    whose outcome the database refused (the step fails with ``StagingError``)."""
    import sqlite3

    from etl import deliver
    from etl.destinations.google_datamanager import DataManagerConversions
    from etl.errors import StagingError

    spec = build(cfg, "2026-09-01", "2026-11-20", db, tmp_path)
    monkeypatch.setattr(DataManagerConversions, "max_batch", 20)
    monkeypatch.setattr(deliver, "RECORD_ATTEMPTS", 1)
    written, outcomes = ledger.write_ledger, []

    def the_database_refuses_the_second_outcome(
        engine: Any, clinic: str, name: str, entries: Any, **kw: Any
    ) -> None:
        if entries and entries[0]["status"] != "planned":
            outcomes.append(name)
            if len(outcomes) == 2:
                raise sa.exc.OperationalError("UPDATE", {}, sqlite3.OperationalError("disk I/O error"))
        written(engine, clinic, name, entries, **kw)

    monkeypatch.setattr(ledger, "write_ledger", the_database_refuses_the_second_outcome)
    with pytest.raises(StagingError):
        tasks.upload(spec, "google", target="sandbox", sandboxes=sandboxes, retry_wait=0)
    monkeypatch.setattr(ledger, "write_ledger", written)
    return spec


def test_an_upload_failing_half_way_still_reports_what_the_platform_took(
    clinic_dir: Path, sandboxes: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the summary and report showed sent 0 against a ledger holding the first batch accepted:
    # only a platform stop (account, quota) carried its counts out of a failed upload
    cfg = config_for(clinic_dir, "data_manager")
    db = f"sqlite:///{tmp_path / 's.sqlite'}"
    spec = _upload_whose_second_outcome_the_database_refuses(cfg, db, sandboxes, tmp_path, monkeypatch)
    summary = tasks.report(spec)["summary"]["destinations"]["google_conversions"]
    held = _ledger(db, cfg.clinic_id)
    accepted = sum(1 for e in held.values() if e.status == "accepted")
    assert accepted == 20  # the first batch; the second left but its outcome was refused
    # what left, and what the platform answered, whatever the ledger could keep of it
    assert (summary["sent"], summary["accepted"], summary["requests"], summary["stopped"]) == (
        40,
        40,
        2,
        "failed",
    )


def test_a_record_google_cannot_process_does_not_replace_the_list_every_other_night(
    clinic_dir: Path, sandboxes: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    # every add request fails in part: the replacement's own adds fail again, and scheduling
    # another replacement for them emptied the suppression list every other night for ever
    monkeypatch.setattr(confirm, "CHECK_AFTER", timedelta(0))
    cfg = config_for(clinic_dir, "data_manager")
    db = f"sqlite:///{tmp_path / 's.sqlite'}"
    google = sandboxes["google"]
    nights = ["2026-09-01", *[f"2026-11-{d}" for d in range(12, 19)]]
    replaced = []
    for start, end in itertools.pairwise(nights):
        if end in ("2026-11-12", "2026-11-14"):  # the first sync, and the replacement it causes
            google.fail_processing_next(
                "IngestAudienceMembers", "PROCESSING_ERROR_REASON_INVALID_FORMAT", partial=True
            )
        spec = build(cfg, start, end, db, tmp_path)
        tasks.sync_suppression(spec, target="sandbox", sandboxes=sandboxes, retry_wait=0)
        result = json.loads((spec.paths.results / "google_customer_match.json").read_text(encoding="utf-8"))
        if "REMOVE_ALL" in result["codes"]:
            replaced.append(end)
    # the first night's partial failure is read on the second, and the third replaces the list;
    # the replacement's own failure, read on the fourth, is logged and not replaced again
    assert replaced == ["2026-11-14"]
    assert "not replaced again on its own" in caplog.text


def test_a_status_that_cannot_be_read_is_given_up_and_never_holds_back_newer_ones(
    clinic_dir: Path, sandboxes: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config_for(clinic_dir, "data_manager")
    db = f"sqlite:///{tmp_path / 's.sqlite'}"
    google = sandboxes["google"]
    monkeypatch.setattr(confirm, "MAX_CHECKS_PER_UPLOAD", 2)
    monkeypatch.setattr(confirm, "GIVE_UP_AFTER", timedelta(hours=60))
    google.fail_processing_next("IngestEvents", "PROCESSING_ERROR_REASON_EVENT_TOO_OLD", times=3)
    upload(build(cfg, "2026-09-01", "2026-11-20", db, tmp_path), "google", sandboxes, batch=20)
    first, second, third = [c.request_id for c in _checks(db)][:3]

    def night(start: str, end: str, *, refused: int) -> dict[str, int]:
        google.fail_next("RetrieveRequestStatus", "permission_denied", times=refused)  # not transient
        return upload(build(cfg, start, end, db, tmp_path), "google", sandboxes, batch=20)["request_statuses"]

    assert night("2026-11-20", "2026-11-21", refused=2) == {"unread": 2}  # the two oldest
    reads = len(google.requests("RetrieveRequestStatus"))
    # the next night the ones never read come first (before those read and refused), so the
    # third request's failure is found
    assert night("2026-11-21", "2026-11-22", refused=0)["failed"] == 1
    read = [r.request_id for r in google.requests("RetrieveRequestStatus")[reads:]]
    assert third in read and first not in read and second not in read
    # read again (every status refused now), 72 hours on, the two still unreadable are given up
    # rather than read for ever
    monkeypatch.setattr(confirm, "MAX_CHECKS_PER_UPLOAD", 200)
    assert night("2026-11-22", "2026-11-23", refused=100)["unconfirmed"] >= 2
    held = {c.request_id: c.status for c in _checks(db)}
    assert (held[first], held[second]) == ("unconfirmed", "unconfirmed")


def test_a_validate_only_upload_failing_half_way_says_it_only_validated(
    clinic_dir: Path, sandboxes: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the counts a failed attempt left lacked validate_only, so the report read them as applied
    from etl.destinations.google_datamanager import DataManagerConversions

    cfg = config_for(clinic_dir, "data_manager")
    spec = build(cfg, "2026-09-01", "2026-11-20", f"sqlite:///{tmp_path / 's.sqlite'}", tmp_path)
    monkeypatch.setattr(DataManagerConversions, "max_batch", 20)
    send, calls = DataManagerConversions.send, []

    def the_network_drops_at_the_second(self: Any, rows: Any, *, validate_only: bool = False) -> Any:
        calls.append(len(rows))
        if len(calls) == 2:
            raise ConnectionError("network dropped")
        return send(self, rows, validate_only=validate_only)

    monkeypatch.setattr(DataManagerConversions, "send", the_network_drops_at_the_second)
    with pytest.raises(ConnectionError):
        tasks.upload(spec, "google", target="sandbox", sandboxes=sandboxes, retry_wait=0, validate_only=True)
    result = json.loads((spec.paths.results / "google_conversions.json").read_text(encoding="utf-8"))
    assert (result["validate_only"], result["sent"], result["stopped"]) == (True, 20, "failed")
    assert tasks.report(spec)["summary"]["validate_only"] is True


def test_a_retry_failing_before_its_first_request_keeps_what_the_earlier_attempt_sent(
    clinic_dir: Path, sandboxes: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from etl import leases
    from etl.errors import SendInProgress

    cfg = config_for(clinic_dir, "data_manager")
    db = f"sqlite:///{tmp_path / 's.sqlite'}"
    spec = _upload_whose_second_outcome_the_database_refuses(cfg, db, sandboxes, tmp_path, monkeypatch)
    results = spec.paths.results / "google_conversions.json"
    first = json.loads(results.read_text(encoding="utf-8"))
    assert (first["sent"], first["requests"]) == (40, 2)

    def lost(self: Any) -> None:
        raise SendInProgress("lease lost")

    monkeypatch.setattr(leases.Lease, "check", lost)  # the retry loses its lease before sending
    with pytest.raises(SendInProgress):
        tasks.upload(spec, "google", target="sandbox", sandboxes=sandboxes, retry_wait=0)
    assert json.loads(results.read_text(encoding="utf-8")) == first
