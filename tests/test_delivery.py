"""Exactly-once delivery through the real SDKs against the sandboxes: kills, reruns, backfills.

Every assertion about "once" is made on the sandbox's own record of what it received and
accepted, not on our ledger alone.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from etl import deliver, ledger, store, switches, tasks
from etl.config import ClinicConfig, load_config
from etl.errors import ConfigError, LegalBasisRefused, QuotaExhausted, SendingStopped
from etl.targets import open_destinations, started_sandboxes
from tests.conftest import APPT_HEADER, BASE_CONFIG, DATA, ONE_LEAD, SECRET, make_config, visit


class Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so nothing of ours can catch and tidy up."""


@pytest.fixture(scope="module")
def clinic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from etl.synth import write_synthetic_clinic

    out = tmp_path_factory.mktemp("deliver")
    write_synthetic_clinic(out, appointments=4000, leads=1600, seed=5)
    return out


def config_for(clinic_dir: Path, api: str) -> ClinicConfig:
    cfg = load_config(clinic_dir / "clinic.yaml")
    assert cfg.google_ads is not None
    return cfg.model_copy(update={"google_ads": cfg.google_ads.model_copy(update={"api": api})})


def build(
    cfg: ClinicConfig,
    start: str,
    end: str,
    db: str,
    tmp: Path,
    *,
    full_resync: bool = False,
    publish: bool = True,
    target: str = "sandbox",
) -> tasks.RunSpec:
    spec = tasks.spec_for(
        cfg,
        datetime.fromisoformat(start).replace(tzinfo=cfg.tz),
        datetime.fromisoformat(end).replace(tzinfo=cfg.tz),
        database=db,
        outbox=tmp / f"outbox-{start}-{end}",
    )
    sources = spec.config.sources.model_copy(
        update={
            kind: getattr(spec.config.sources, kind).model_copy(
                update={"path": spec.config.resolve(getattr(spec.config.sources, kind).path)}
            )
            for kind in ("appointments", "leads")
        }
    )
    spec = tasks.RunSpec(
        config=spec.config.model_copy(update={"base_dir": tmp, "sources": sources}),
        window=spec.window,
        database=db,
        outbox=spec.outbox,
    )
    tasks.extract(spec)
    tasks.stage(spec)
    tasks.build_conversions(spec, secret=SECRET, dry_run=False, target=target, full_resync=full_resync)
    if publish:
        tasks.validate_outbound(spec)
    return spec


@pytest.fixture
def sandboxes(clinic_dir: Path) -> Iterator[dict[str, Any]]:
    cfg = load_config(clinic_dir / "clinic.yaml")
    with started_sandboxes(cfg, now=datetime(2026, 11, 23, tzinfo=cfg.tz)) as started:
        yield started


def upload(spec: tasks.RunSpec, family: str, sandboxes: dict[str, Any], *, batch: int,
           kill_after: int | None = None, quota_after: int | None = None,
           after_batch: Callable[[int], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """One platform's upload with small batches; optionally 'killed' after ``kill_after`` batches,
    or stopped by the platform's daily quota after ``quota_after`` requests; ``after_batch`` is
    called with each batch's number once it is recorded."""

    def on_batch(number: int, total: int) -> None:
        if kill_after is not None and number == kill_after:
            raise Killed
        if after_batch is not None:
            after_batch(number)

    with (
        store.engine_for(spec.config.resolved_database_url(spec.database)) as engine,
        open_destinations(spec.config, "sandbox", now=spec.window.end, sandboxes=sandboxes,
                          only=family, retry_wait=0) as dests,  # type: ignore[arg-type]
    ):  # fmt: skip
        (destination,) = dests.conversions.values()
        destination.max_batch = batch  # type: ignore[misc]
        if quota_after is not None:
            send, requests = destination.send, []

            def send_until_the_quota_runs_out(rows: Any, *, validate_only: bool = False) -> Any:
                requests.append(len(rows))
                if len(requests) > quota_after:
                    raise QuotaExhausted("daily quota")
                return send(rows, validate_only=validate_only)

            destination.send = send_until_the_quota_runs_out  # type: ignore[method-assign]
        return deliver.upload_conversions(
            spec.config, engine, spec.paths.outbox, destination, run_id=spec.run_id,
            clock=lambda: spec.window.end, on_batch=on_batch,
            siblings=deliver.read_siblings(spec.paths.outbox),  # as tasks.upload
        )  # fmt: skip


def sent_once(sandboxes: dict[str, Any], family: str) -> Any:
    if family == "meta":
        return sandboxes["meta"].event_ids_received()
    return sandboxes["google"].accepted_order_ids()


FAMILIES = [("google", "data_manager"), ("google", "google_ads"), ("meta", "data_manager")]
IDS = ["google-data-manager", "google-ads-api", "meta"]


@pytest.mark.parametrize(("family", "api"), FAMILIES, ids=IDS)
def test_killed_between_batches_then_rerun_sends_each_once(
    family: str, api: str, clinic_dir: Path, sandboxes: dict[str, Any], tmp_path: Path
) -> None:
    cfg = config_for(clinic_dir, api)
    spec = build(cfg, "2026-09-01", "2026-11-23", f"sqlite:///{tmp_path / 's.sqlite'}", tmp_path)
    name = "meta_events" if family == "meta" else "google_conversions"
    planned = [r["event_id" if family == "meta" else "order_id"] for r in _rows(spec, name)]
    assert len(planned) > 60, "the fixture must need several batches"
    with pytest.raises(Killed):
        upload(spec, family, sandboxes, batch=25, kill_after=2)
    assert sum(sent_once(sandboxes, family).values()) == 50
    counts = upload(spec, family, sandboxes, batch=25)
    received = sent_once(sandboxes, family)
    assert set(received) == set(planned)
    assert max(received.values()) == 1
    # the first attempt's 50 are this run's own, not "already sent" by someone else: the
    # summary says what this run sent (the retry's own requests are the rest)
    assert counts["already_sent"] == 0 and counts["finished_by_an_earlier_attempt"] == 50
    assert counts["sent"] == counts["accepted"] == len(planned)


def test_killed_then_the_whole_interval_run_again_reports_the_first_attempts_sends_as_its_own(
    clinic_dir: Path, sandboxes: dict[str, Any], tmp_path: Path
) -> None:
    # the rerun re-plans from extract: its plan left out what the killed attempt had sent under
    # this same run id as "already sent", so the run's summary counted only the rerun's own sends
    cfg = config_for(clinic_dir, "data_manager")
    db = f"sqlite:///{tmp_path / 's.sqlite'}"
    spec = build(cfg, "2026-09-01", "2026-11-23", db, tmp_path)
    planned = _rows(spec, "meta_events")
    with pytest.raises(Killed):
        upload(spec, "meta", sandboxes, batch=25, kill_after=2)
    again = build(cfg, "2026-09-01", "2026-11-23", db, tmp_path)  # the same run, from extract
    assert again.run_id == spec.run_id and _rows(again, "meta_events") == planned
    tasks.upload(again, "meta", target="sandbox", sandboxes=sandboxes, retry_wait=0)
    assert max(sent_once(sandboxes, "meta").values()) == 1  # nothing sent twice
    summary = tasks.report(again)["summary"]["destinations"]["meta_events"]
    assert (summary["planned"], summary["sent"], summary["accepted"]) == (
        len(planned),
        len(planned),
        len(planned),
    )
    assert summary["finished_by_an_earlier_attempt"] == 50 and summary["already_sent"] == 0


@pytest.mark.parametrize(("family", "api"), FAMILIES, ids=IDS)
def test_rerun_and_overlapping_backfill_send_only_what_is_missing(
    family: str, api: str, clinic_dir: Path, sandboxes: dict[str, Any], tmp_path: Path
) -> None:
    cfg = config_for(clinic_dir, api)
    db = f"sqlite:///{tmp_path / 's.sqlite'}"
    name = "meta_events" if family == "meta" else "google_conversions"
    first = build(cfg, "2026-08-15", "2026-10-15", db, tmp_path)
    upload(first, family, sandboxes, batch=500)
    sent_first = dict(sent_once(sandboxes, family))
    again = build(cfg, "2026-08-15", "2026-10-15", db, tmp_path / "again")
    # the same run (clinic and interval): its plan holds its own conversions, all final in the
    # ledger under its id, so the upload sends nothing and counts them as the run's own
    assert again.run_id == first.run_id and _rows(again, name) == _rows(first, name)
    counts = upload(again, family, sandboxes, batch=500)
    assert dict(sent_once(sandboxes, family)) == sent_first  # nothing went again
    assert counts["requests"] == 0 and counts["already_sent"] == 0
    assert counts["finished_by_an_earlier_attempt"] == len(_rows(first, name))
    overlap = build(cfg, "2026-10-01", "2026-11-23", db, tmp_path / "overlap")
    new_ids = {r["event_id" if family == "meta" else "order_id"] for r in _rows(overlap, name)}
    before = set(sent_once(sandboxes, family))
    assert new_ids and not (new_ids & before)
    upload(overlap, family, sandboxes, batch=500)
    received = sent_once(sandboxes, family)
    assert max(received.values()) == 1
    assert set(received) == before | new_ids


def _rows(spec: tasks.RunSpec, name: str) -> list[dict[str, Any]]:
    from etl.outbox import read_rows

    return list(read_rows(spec.paths.outbox, name))


def test_a_run_killed_mid_upload_and_never_rerun_loses_nothing_to_the_next_nights(
    clinic_dir: Path, sandboxes: dict[str, Any], tmp_path: Path
) -> None:
    # a ten-night catch-up run dies after Google's first batch, before Meta's upload began,
    # and nobody reruns it; the next night's interval no longer covers most of its ready times
    cfg = config_for(clinic_dir, "data_manager")
    db = f"sqlite:///{tmp_path / 's.sqlite'}"
    first = build(cfg, "2026-11-10", "2026-11-20", db, tmp_path)
    google = {r["order_id"] for r in _rows(first, "google_conversions")}
    meta = {r["event_id"] for r in _rows(first, "meta_events")}
    assert len(google) > 20 and len(meta) > 20
    with pytest.raises(Killed):
        upload(first, "google", sandboxes, batch=5, kill_after=1)
    following = build(cfg, "2026-11-20", "2026-11-21", db, tmp_path)
    assert {r["order_id"] for r in _rows(following, "google_conversions")} >= google - set(
        sent_once(sandboxes, "google")
    )
    upload(following, "google", sandboxes, batch=2000)
    upload(following, "meta", sandboxes, batch=1000)
    assert google <= set(sent_once(sandboxes, "google")) and meta <= set(sent_once(sandboxes, "meta"))


def test_ledger_records_outcomes_with_codes(
    clinic_dir: Path, sandboxes: dict[str, Any], tmp_path: Path
) -> None:
    cfg = config_for(clinic_dir, "google_ads")
    spec = build(cfg, "2026-09-01", "2026-11-23", f"sqlite:///{tmp_path / 's.sqlite'}", tmp_path)

    def click(row: dict[str, Any]) -> str | None:
        return row.get("gclid") or row.get("gbraid") or row.get("wbraid")

    with_click = [r for r in _rows(spec, "google_conversions") if click(r)]
    known = set(sorted({click(r) for r in with_click})[::2])  # Google knows every other click
    sandboxes["google"].register_clicks(sorted(known))
    unknown = [r for r in with_click if click(r) not in known]
    counts = upload(spec, "google", sandboxes, batch=2000)
    with sa.create_engine(spec.config.resolved_database_url(spec.database)).connect() as conn:
        everything = conn.execute(sa.select(store.send_ledger)).mappings().all()
    rows = [r for r in everything if r["destination"] == "google_conversions"]
    # published, not uploaded yet: planned since the outbox was published
    assert {r["status"] for r in everything if r["destination"] == "meta_events"} == {"planned"}
    statuses = {r["status"] for r in rows}
    assert statuses <= {"accepted", "rejected", "deferred", "already_sent"}
    assert len(rows) == counts["planned"]
    assert all(r["sent_at"] is not None for r in rows if r["status"] == "accepted")
    rejected = [r for r in rows if r["status"] == "rejected"]
    assert len(rejected) == counts["rejected"] == len(unknown) > 0
    assert {r["code"] for r in rejected} == {"CLICK_NOT_FOUND"}
    assert all(r["request_id"] for r in rejected)


def test_invalid_meta_token_stops_with_one_clear_message_and_nothing_recorded_as_sent(
    clinic_dir: Path, sandboxes: dict[str, Any], tmp_path: Path
) -> None:
    from etl.destinations.meta import make_meta_destinations
    from etl.errors import DestinationConfigError

    cfg = config_for(clinic_dir, "data_manager")
    spec = build(cfg, "2026-09-01", "2026-11-23", f"sqlite:///{tmp_path / 's.sqlite'}", tmp_path)
    environ = {"META_SANDBOX_URL": sandboxes["meta"].url, "META_SANDBOX_TOKEN": "bad-token-CNRY"}
    events, _ = make_meta_destinations(
        spec.config, target="sandbox", now=spec.window.end, environ=environ, retry_wait=0
    )
    with store.engine_for(spec.config.resolved_database_url(spec.database)) as engine:
        with pytest.raises(DestinationConfigError) as info:
            deliver.upload_conversions(spec.config, engine, spec.paths.outbox, events, run_id=spec.run_id,
                                       clock=lambda: spec.window.end)  # fmt: skip
        statuses = {
            e.status for e in ledger.read_ledger(engine, spec.config.clinic_id, "meta_events").values()
        }
    assert "190" in str(info.value) and "CNRY" not in str(info.value)
    assert statuses <= {"planned"}  # planned before the request; never sent, accepted or rejected
    assert sum(sandboxes["meta"].event_ids_received().values()) == 0


@pytest.mark.parametrize(
    ("killed_at", "api"),
    [("google_customer_match", "data_manager"), ("google_customer_match", "google_ads"),
     ("meta_audience", "data_manager")],
    ids=["google-data-manager", "google-ads-api", "meta"],
)  # fmt: skip
def test_a_sync_killed_after_the_platform_applied_its_adds_still_removes_who_revoked(
    killed_at: str, api: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # consent_revoked: the patient is granted on 05-01 and revoked on 05-25. The first sync (the
    # night of 05-20, before the revocation was exported) lists them and is killed before
    # recording it; the next run, whose export holds the revocation, must still take them off
    cfg = make_config(DATA / "rules" / "consent_revoked", google_ads__api=api)
    not_yet = tmp_path / "export-05-20"
    not_yet.mkdir()
    shutil.copy(DATA / "rules" / "consent_revoked" / "appointments.csv", not_yet / "appointments.csv")
    leads = (DATA / "rules" / "consent_revoked" / "leads.csv").read_text(encoding="utf-8")
    assert ",2026-05-25 12:00," in leads
    (not_yet / "leads.csv").write_text(leads.replace(",2026-05-25 12:00,", ",,"), encoding="utf-8")
    cfg_then = make_config(not_yet, google_ads__api=api)
    assert cfg.google_ads is not None and cfg.meta is not None
    lists = {"google_customer_match": cfg.google_ads.suppression_user_list,
             "meta_audience": cfg.meta.suppression_audience_id}  # fmt: skip
    db = f"sqlite:///{tmp_path / 's.sqlite'}"
    recorded = ledger.apply_audience_delta

    def killed_before_recording(*args: Any, **kwargs: Any) -> None:
        if args[2] == killed_at:
            raise Killed
        recorded(*args, **kwargs)

    with started_sandboxes(cfg, now=datetime(2026, 7, 1, tzinfo=cfg.tz)) as sandboxes:

        def members() -> set[str]:
            if killed_at == "meta_audience":
                return set(sandboxes["meta"].audience_members(lists[killed_at]))
            return sandboxes["google"].list_members(lists[killed_at])

        before = build(cfg_then, "2026-05-01", "2026-05-20", db, tmp_path)
        monkeypatch.setattr(ledger, "apply_audience_delta", killed_before_recording)
        with pytest.raises(Killed):
            tasks.sync_suppression(before, target="sandbox", sandboxes=sandboxes, retry_wait=0)
        monkeypatch.setattr(ledger, "apply_audience_delta", recorded)
        assert len(members()) == 1  # the platform applied the add; our state never heard of it
        with store.engine_for(db) as engine:
            assert ledger.read_audience_state(engine, cfg.clinic_id, killed_at) == {}

        after = build(cfg, "2026-05-01", "2026-06-30", db, tmp_path)
        tasks.sync_suppression(after, target="sandbox", sandboxes=sandboxes, retry_wait=0)
        assert members() == set()
        with store.engine_for(db) as engine:
            assert ledger.read_pending_adds(engine, cfg.clinic_id, killed_at) == {}


def test_a_full_resync_killed_after_the_list_was_emptied_is_refilled_by_the_next_sync(
    clinic_dir: Path, sandboxes: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Data Manager empties the list in its own call (RemoveAllAudienceMembers) before the adds;
    # a process killed in between left the list empty and a state saying everyone was on it
    from google.ads import datamanager_v1

    cfg = config_for(clinic_dir, "data_manager")
    assert cfg.google_ads is not None and cfg.google_ads.suppression_user_list
    user_list = cfg.google_ads.suppression_user_list
    db = f"sqlite:///{tmp_path / 's.sqlite'}"
    first = build(cfg, "2026-10-01", "2026-11-20", db, tmp_path)
    tasks.sync_suppression(first, target="sandbox", sandboxes=sandboxes, retry_wait=0)
    assert len(sandboxes["google"].list_members(user_list)) > 100

    emptied = datamanager_v1.IngestionServiceClient.remove_all_audience_members

    def killed_once_emptied(self: Any, *args: Any, **kwargs: Any) -> Any:
        emptied(self, *args, **kwargs)
        raise Killed

    resync = build(cfg, "2026-11-20", "2026-11-21", db, tmp_path, full_resync=True)
    monkeypatch.setattr(
        datamanager_v1.IngestionServiceClient, "remove_all_audience_members", killed_once_emptied
    )
    with pytest.raises(Killed):
        tasks.sync_suppression(resync, target="sandbox", sandboxes=sandboxes, retry_wait=0)
    monkeypatch.setattr(datamanager_v1.IngestionServiceClient, "remove_all_audience_members", emptied)
    assert sandboxes["google"].list_members(user_list) == set()

    rerun = build(cfg, "2026-11-20", "2026-11-21", db, tmp_path)  # the same night, without --full-resync
    tasks.sync_suppression(rerun, target="sandbox", sandboxes=sandboxes, retry_wait=0)
    summary = json.loads((rerun.paths.outbox / "summary.json").read_text(encoding="utf-8"))
    members = summary["destinations"]["google_customer_match"]["members"]
    assert len(sandboxes["google"].list_members(user_list)) == members > 100
    with store.engine_for(db) as engine:
        assert len(ledger.read_audience_state(engine, cfg.clinic_id, "google_customer_match")) == members
        assert ledger.read_pending_adds(engine, cfg.clinic_id, "google_customer_match") == {}


def test_one_list_refused_does_not_hold_back_the_other(
    clinic_dir: Path, sandboxes: dict[str, Any], tmp_path: Path
) -> None:

    cfg = config_for(clinic_dir, "data_manager")
    assert cfg.meta is not None and cfg.meta.suppression_audience_id
    spec = build(cfg, "2026-09-01", "2026-11-23", f"sqlite:///{tmp_path / 's.sqlite'}", tmp_path)
    sandboxes["google"].fail_next("IngestAudienceMembers", "daily_quota")
    with pytest.raises(QuotaExhausted):
        tasks.sync_suppression(spec, target="sandbox", sandboxes=sandboxes, retry_wait=0)
    # Google stopped; Meta's list was still mirrored (its removals matter as much as its adds)
    members = sandboxes["meta"].audience_members(cfg.meta.suppression_audience_id)
    result = json.loads((spec.paths.results / "meta_audience.json").read_text(encoding="utf-8"))
    assert len(members) == result["adds"] > 0
    # every request's fbtrace_id is on record for support, in the results file only
    assert result["requests"] == len(result["request_ids"]) > 0
    assert all(isinstance(i, str) and i for i in result["request_ids"])
    assert not (spec.paths.results / "google_customer_match.json").exists()


def test_validate_outbound_retried_after_it_published_records_the_same_plan(
    clinic_dir: Path, tmp_path: Path
) -> None:
    # every Airflow step now retries: a retry after the publish (the ledger write failed, say)
    # found no pending plan and raised FileNotFoundError on every try
    from etl.errors import NotPlanned

    cfg = config_for(clinic_dir, "data_manager")
    spec = build(cfg, "2026-09-01", "2026-11-23", f"sqlite:///{tmp_path / 's.sqlite'}", tmp_path)
    published = {
        name: (spec.paths.outbox / name).read_bytes() for name in ("summary.json", "meta_events.jsonl")
    }
    with store.engine_for(spec.config.resolved_database_url(spec.database)) as engine:
        first = ledger.read_ledger(engine, cfg.clinic_id, "meta_events")
        with engine.begin() as conn:
            conn.execute(sa.delete(store.send_ledger))  # as if the plan's ledger write had failed
    assert tasks.validate_outbound(spec)["outbox"] == str(spec.paths.outbox)
    assert {name: (spec.paths.outbox / name).read_bytes() for name in published} == published
    with store.engine_for(spec.config.resolved_database_url(spec.database)) as engine:
        again = ledger.read_ledger(engine, cfg.clinic_id, "meta_events")
    assert len(first) > 60 and set(again) == set(first)
    assert {r.status for r in again.values()} == {"planned"}

    # a step run out of order says so instead of a traceback
    shutil.rmtree(spec.paths.outbox)
    with pytest.raises(NotPlanned, match="no plan to publish"):
        tasks.validate_outbound(spec)
    with pytest.raises(NotPlanned, match="no published outbox"):
        tasks.upload(spec, "meta", target="sandbox")
    shutil.rmtree(spec.paths.extracts)  # as a report leaves them: a cleared task after it
    for step in (tasks.stage, tasks.validate_inputs):
        with pytest.raises(NotPlanned, match="clear the run from extract"):
            step(spec)


def test_a_plan_is_in_the_ledger_before_its_outbox_appears(
    clinic_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the outbox was published, then its rows recorded planned: a run killed between the two,
    # and never rerun, left conversions nothing would carry over (a backfill's older nights)
    from etl import outbox as outbox_module
    from etl.outbox import read_rows

    cfg = config_for(clinic_dir, "data_manager")
    db = f"sqlite:///{tmp_path / 's.sqlite'}"
    spec = build(cfg, "2026-09-01", "2026-11-23", db, tmp_path, publish=False)

    def killed(folder: Path) -> None:  # the last check before the rename
        raise SystemExit("killed")

    monkeypatch.setattr(outbox_module, "check_outbox_folder", killed)
    with pytest.raises(SystemExit):
        tasks.validate_outbound(spec)
    assert not spec.paths.outbox.exists()
    with store.engine_for(db) as engine:
        for name, key in (("google_conversions", "order_id"), ("meta_events", "event_id")):
            planned = {r[key] for r in read_rows(spec.paths.pending, name)}
            recorded = ledger.read_ledger(engine, cfg.clinic_id, name)
            assert planned and {k for k, e in recorded.items() if e.status == "planned"} == planned


def test_validate_outbound_failing_for_a_locked_database_is_retried_on_the_same_plan(
    clinic_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the pending plan was deleted on any error: a try that failed while storing its check
    # results left every retry with "no plan to publish", and the night was lost
    from etl import quality

    cfg = config_for(clinic_dir, "data_manager")
    spec = build(cfg, "2026-09-01", "2026-11-23", f"sqlite:///{tmp_path / 'ref.sqlite'}", tmp_path / "ref")
    reference = (spec.paths.outbox / "google_conversions.jsonl").read_bytes()

    real_store = quality.store_results
    calls = {"n": 0}

    def locked_once(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise sa.exc.OperationalError("INSERT", {}, Exception("database is locked"))
        return real_store(*args, **kwargs)

    spec = build(
        cfg, "2026-09-01", "2026-11-23", f"sqlite:///{tmp_path / 's.sqlite'}", tmp_path, publish=False
    )
    monkeypatch.setattr(quality, "store_results", locked_once)
    with pytest.raises(sa.exc.OperationalError):
        tasks.validate_outbound(spec)
    assert (spec.paths.pending / "summary.json").exists() and not spec.paths.outbox.exists()
    tasks.validate_outbound(spec)  # Airflow's retry
    assert (spec.paths.outbox / "google_conversions.jsonl").read_bytes() == reference


def test_a_busy_database_while_recording_a_sent_batch_does_not_send_it_again(
    clinic_dir: Path, sandboxes: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the batch's outcome failed to record, the step failed, and its retry sent the batch again:
    # Data Manager counted those conversions twice
    import sqlite3

    from tenacity import wait_none

    cfg = config_for(clinic_dir, "data_manager")
    spec = build(cfg, "2026-09-01", "2026-11-23", f"sqlite:///{tmp_path / 's.sqlite'}", tmp_path)
    planned = [r["order_id"] for r in _rows(spec, "google_conversions")]
    locked = tmp_path / "locked.sqlite"
    holder = sqlite3.connect(locked)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    with pytest.raises(sqlite3.OperationalError) as busy:
        sqlite3.connect(locked, timeout=0).execute("SELECT * FROM t")
    holder.rollback()
    assert busy.value.sqlite_errorname == "SQLITE_BUSY"

    real_write = ledger.write_ledger
    calls = {"n": 0}

    def busy_after_the_first_batch(*args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # call 1 plans the rows; call 2 records batch 1, which went out
            raise sa.exc.OperationalError("INSERT INTO send_ledger", {}, busy.value)
        real_write(*args, **kwargs)

    monkeypatch.setattr(ledger, "write_ledger", busy_after_the_first_batch)
    monkeypatch.setattr(deliver, "RECORD_WAIT", wait_none(), raising=False)
    counts = upload(spec, "google", sandboxes, batch=25)
    received = sent_once(sandboxes, "google")
    assert set(received) == set(planned) and max(received.values()) == 1
    assert counts["accepted"] == len(planned) and calls["n"] > 2


@pytest.mark.parametrize(
    "night_one",
    [
        [visit("A1", "booked", "05"), visit("A2", "completed", "07", "200")],  # A1 known, not attended
        [visit("A2", "completed", "07", "200")],  # A1 not in the first export at all
    ],
    ids=["earlier_visit_attended_late", "earlier_visit_entered_late"],
)
@pytest.mark.parametrize("older_first", [False, True], ids=["older_upload_rerun_after", "older_upload_first"])
@pytest.mark.parametrize(("family", "api"), [FAMILIES[0], FAMILIES[2]], ids=[IDS[0], IDS[2]])
def test_a_journey_re_attributed_between_two_runs_is_sent_once_whichever_upload_runs_first(
    family: str, api: str, older_first: bool, night_one: list[str], sandboxes: dict[str, Any], tmp_path: Path
) -> None:
    # night one plans the journey under A2 and its upload fails; by night two the PMS shows A1
    # attended, so night two plans it under A1 and sends. Someone then reruns night one's
    # failed upload (or it runs late, before night two's): the platform must get the journey
    # once (SPEC rules 4 and 11), though the two rows' opaque IDs differ
    cfg = make_config(tmp_path, google_ads__api=api)
    db = f"sqlite:///{tmp_path / 's.sqlite'}"
    name, field = ("meta_events", "event_id") if family == "meta" else ("google_conversions", "order_id")
    (tmp_path / "leads.csv").write_text(ONE_LEAD, encoding="utf-8")
    (tmp_path / "appointments.csv").write_text(APPT_HEADER + "".join(night_one), encoding="utf-8")
    one = build(cfg, "2026-11-07", "2026-11-08", db, tmp_path / "one")
    (tmp_path / "appointments.csv").write_text(
        APPT_HEADER + visit("A1", "completed", "05", "300") + visit("A2", "completed", "07", "200"),
        encoding="utf-8",
    )
    two = build(cfg, "2026-11-10", "2026-11-11", db, tmp_path / "two")
    (old_id,) = [r[field] for r in _rows(one, name)]
    (new_id,) = [r[field] for r in _rows(two, name)]
    assert old_id != new_id  # the conversion moved to A1
    first, second = (one, two) if older_first else (two, one)
    upload(first, family, sandboxes, batch=100)
    counts = upload(second, family, sandboxes, batch=100)
    received = sent_once(sandboxes, family)
    assert dict(received) == {(old_id if older_first else new_id): 1}
    assert counts["sent"] == 0 and counts["already_sent"] == 1 and counts["held_under_another_id"] == 1
    skipped, kept = (new_id, old_id) if older_first else (old_id, new_id)
    with store.engine_for(db) as engine:
        recorded = ledger.read_ledger(engine, cfg.clinic_id, name)
        unfinished = ledger.unfinished_ids(engine, cfg.clinic_id, [name])
    assert recorded[kept].status == "accepted" and recorded[skipped].status == "superseded"
    assert skipped not in unfinished  # not carried over night after night as an unfinished upload


def _split_by_a_late_lead(folder: Path) -> None:
    """The exports once A1's "attended" and a lead created between A1 and A2 arrived: two journeys."""
    second_lead = (
        "L2,2026-11-06 10:00,Ann,Lee,ann.lee@gmail.com,4155550134,94103,Cj0KCQ-L2_testclickid0000,,,,,,yes,"
    )
    (folder / "leads.csv").write_text(ONE_LEAD + second_lead + "2026-11-06 10:00,,,,,\n", encoding="utf-8")
    (folder / "appointments.csv").write_text(
        APPT_HEADER + visit("A1", "completed", "05", "300") + visit("A2", "completed", "07", "200"),
        encoding="utf-8",
    )


@pytest.mark.parametrize(("family", "api"), [FAMILIES[0], FAMILIES[2]], ids=[IDS[0], IDS[2]])
def test_a_journey_a_late_lead_split_in_two_sends_its_new_conversion(
    family: str, api: str, sandboxes: dict[str, Any], tmp_path: Path
) -> None:
    # night one sends the journey under A2 (A1 still booked), and its plan relates A1 and A2 as
    # one journey. By night two a lead created between the visits and A1's late "attended"
    # split it in two: the first journey converts at A1, the next at A2 (already sent). Night
    # one's view is stale; A1's conversion goes, as one backfill over both nights would plan both
    cfg = make_config(tmp_path, rules__existing_patient_lookback_days=0, google_ads__api=api)
    db = f"sqlite:///{tmp_path / 's.sqlite'}"
    name, field = ("meta_events", "event_id") if family == "meta" else ("google_conversions", "order_id")
    (tmp_path / "leads.csv").write_text(ONE_LEAD, encoding="utf-8")
    (tmp_path / "appointments.csv").write_text(
        APPT_HEADER + visit("A1", "booked", "05") + visit("A2", "completed", "07", "200"), encoding="utf-8"
    )
    one = build(cfg, "2026-11-07", "2026-11-08", db, tmp_path / "one")
    upload(one, family, sandboxes, batch=100)
    (sent,) = [r[field] for r in _rows(one, name)]
    seen = deliver.read_siblings(one.paths.outbox).siblings
    assert seen[sent]  # A1's ID, as night one saw it
    _split_by_a_late_lead(tmp_path)
    two = build(cfg, "2026-11-10", "2026-11-11", db, tmp_path / "two")
    (new,) = [r[field] for r in _rows(two, name)]
    counts = tasks.upload(two, family, target="sandbox", sandboxes=sandboxes, retry_wait=0)[name]  # type: ignore[arg-type]
    assert counts["sent"] == 1 and counts["already_sent"] == 0, counts
    assert dict(sent_once(sandboxes, family)) == {sent: 1, new: 1}


def test_an_older_runs_view_of_a_journey_since_split_in_two_holds_nothing_back(
    sandboxes: dict[str, Any], tmp_path: Path
) -> None:
    # night one relates A1 and A2 as one journey (planned under A2) and its uploads fail. Night
    # two, after a late lead split the journey, plans A1 for the first journey and carries A2
    # for the second; the daily quota stops its uploads after A1. Night one's uploads are then
    # rerun: A2 is the second journey's own conversion by the newest view, so it goes
    cfg = make_config(tmp_path, rules__existing_patient_lookback_days=0)
    db = f"sqlite:///{tmp_path / 's.sqlite'}"
    (tmp_path / "leads.csv").write_text(ONE_LEAD, encoding="utf-8")
    (tmp_path / "appointments.csv").write_text(
        APPT_HEADER + visit("A1", "booked", "05") + visit("A2", "completed", "07", "200"), encoding="utf-8"
    )
    one = build(cfg, "2026-11-07", "2026-11-08", db, tmp_path / "one")
    (a2,) = [r["event_id"] for r in _rows(one, "meta_events")]
    _split_by_a_late_lead(tmp_path)
    two = build(cfg, "2026-11-10", "2026-11-11", db, tmp_path / "two")
    (a1,) = {r["event_id"] for r in _rows(two, "meta_events")} - {a2}
    assert [r["event_id"] for r in _rows(two, "meta_events")] == [a1, a2]
    assert upload(two, "meta", sandboxes, batch=1, quota_after=1)["stopped"] == "daily_quota"
    counts = upload(one, "meta", sandboxes, batch=100)
    assert counts["sent"] == 1 and counts.get("held_under_another_id", 0) == 0, counts
    assert dict(sent_once(sandboxes, "meta")) == {a1: 1, a2: 1}


def test_a_run_that_sends_cannot_end_after_now(tmp_path: Path) -> None:
    # its end is when ready times and purchase values are judged, and its view of a journey
    # would claim visits after now: refused before anything is extracted; a dry run previews it
    from typer.testing import CliRunner

    from etl.cli import app

    cfg = make_config(tmp_path)
    (tmp_path / "leads.csv").write_text(ONE_LEAD, encoding="utf-8")
    (tmp_path / "appointments.csv").write_text(
        APPT_HEADER + visit("A2", "completed", "07", "200"), encoding="utf-8"
    )
    with pytest.raises(ConfigError, match="after now"):
        build(cfg, "2026-11-07", "2099-12-31", f"sqlite:///{tmp_path / 's.sqlite'}", tmp_path / "task")
    (tmp_path / "clinic.yaml").write_text(json.dumps(BASE_CONFIG), encoding="utf-8")
    args = ["run", "--config", str(tmp_path / "clinic.yaml"), "--start", "2026-11-07", "--end", "2099-12-31"]
    refused = CliRunner().invoke(app, [*args, "--target", "sandbox"])
    assert refused.exit_code == 2 and "after now" in refused.stderr
    assert not (tmp_path / "var" / "runs").exists() or not any((tmp_path / "var" / "runs").rglob("*.parquet"))
    assert CliRunner().invoke(app, [*args, "--dry-run"]).exit_code == 0


def test_a_backfill_of_an_earlier_interval_planned_later_does_not_send_the_journey_again(
    sandboxes: dict[str, Any], tmp_path: Path
) -> None:
    # the night sends the journey under A2 (A1 booked); A1's "attended" arrives late and an
    # analyst backfills the interval holding A1, which ends before A2: that plan, newer but
    # blind to A2, must not cancel the night's view of the journey
    cfg = make_config(tmp_path)
    db = f"sqlite:///{tmp_path / 's.sqlite'}"
    (tmp_path / "leads.csv").write_text(ONE_LEAD, encoding="utf-8")
    (tmp_path / "appointments.csv").write_text(
        APPT_HEADER + visit("A1", "booked", "05") + visit("A2", "completed", "07", "200"), encoding="utf-8"
    )
    night = build(cfg, "2026-11-07", "2026-11-08", db, tmp_path / "night")
    upload(night, "meta", sandboxes, batch=100)
    (tmp_path / "appointments.csv").write_text(
        APPT_HEADER + visit("A1", "completed", "05", "300") + visit("A2", "completed", "07", "200"),
        encoding="utf-8",
    )
    back = build(cfg, "2026-11-05", "2026-11-06", db, tmp_path / "back")
    assert (back.paths.outbox / "siblings.json").exists()  # the view travels with its outbox
    counts = upload(back, "meta", sandboxes, batch=100)
    assert counts["sent"] == 0 and counts["held_under_another_id"] == 1, counts
    assert len(sent_once(sandboxes, "meta")) == 1


def test_a_live_send_goes_only_to_platforms_with_a_current_legal_basis(
    clinic_dir: Path,
    sandboxes: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # compliance.legal_basis: Google's review covers today (its last day), Meta's ended
    # yesterday. A live send to Meta sends nothing and touches no state; Google's goes, and its
    # list still syncs. The live adapters are swapped for the sandboxes' (same SDKs, local
    # servers): what is checked is which platform is opened at all.
    from etl import targets

    cfg = config_for(clinic_dir, "data_manager")
    registry = {
        "google_ads": {"basis": "marketing_authorization", "baa": False, "valid_until": "2026-11-24"},
        "meta": {"basis": "marketing_authorization", "baa": False, "valid_until": "2026-11-23"},
    }
    cfg = ClinicConfig.model_validate(
        {**cfg.model_dump(), "compliance": {"legal_basis": registry}, "base_dir": cfg.base_dir}
    )
    db = f"sqlite:///{tmp_path / 's.sqlite'}"
    spec = build(cfg, "2026-09-01", "2026-11-23", db, tmp_path, target="live")
    monkeypatch.setattr(tasks, "_clock", lambda: datetime.fromisoformat("2026-11-24T23:30:00-08:00"))
    opened: list[Any] = []
    real_open = targets.open_destinations

    def sandboxed(config: ClinicConfig, target: str, **kwargs: Any) -> Any:
        opened.append((target, kwargs.get("only")))
        return real_open(config, "sandbox", **{**kwargs, "sandboxes": sandboxes, "environ": None})

    monkeypatch.setattr(targets, "open_destinations", sandboxed)
    with store.engine_for(db) as engine:
        planned = ledger.read_ledger(engine, cfg.clinic_id, "meta_events")
        claims = engine.connect().execute(sa.select(store.ledger_targets)).all()
    assert len(planned) > 20

    with pytest.raises(LegalBasisRefused, match=r"compliance\.legal_basis\.meta expired after 2026-11-23"):
        tasks.upload(spec, "meta", target="live")
    assert opened == []  # refused before any adapter (or credential) was built
    refused = json.loads((spec.paths.results / "meta_events.json").read_text(encoding="utf-8"))
    assert refused["stopped"] == "legal_basis" and refused["sent"] == 0  # what summary.json will say
    assert sum(sandboxes["meta"].event_ids_received().values()) == 0
    with store.engine_for(db) as engine:
        assert ledger.read_ledger(engine, cfg.clinic_id, "meta_events") == planned  # untouched
        assert engine.connect().execute(sa.select(store.ledger_targets)).all() == claims

    with caplog.at_level(logging.WARNING, logger="etl.tasks"):
        sent = tasks.upload(spec, "google", target="live")["google_conversions"]
    assert sent["sent"] > 20 and len(sandboxes["google"].accepted_order_ids()) == sent["sent"]
    # its last day: the task log says the review is due before live sends stop
    assert "compliance.legal_basis.google_ads: review due, 0 day(s) left after today" in caplog.text

    with (
        caplog.at_level(logging.WARNING, logger="etl.tasks"),
        pytest.raises(LegalBasisRefused, match=r"compliance\.legal_basis\.meta"),
    ):
        tasks.sync_suppression(spec, target="live")
    assert opened[-1] == ("live", "google")  # Meta's adapters never built
    assert caplog.text.count("compliance.legal_basis.google_ads: review due") == 2  # upload, then list
    assert cfg.google_ads is not None and cfg.google_ads.suppression_user_list
    assert cfg.meta is not None and cfg.meta.suppression_audience_id
    assert len(sandboxes["google"].list_members(cfg.google_ads.suppression_user_list)) > 20
    assert sandboxes["meta"].audience_members(cfg.meta.suppression_audience_id) == frozenset()
    with store.engine_for(db) as engine:
        assert ledger.read_audience_state(engine, cfg.clinic_id, "meta_audience") == {}

    # the run's summary records which regime and bases it ran under
    summary = json.loads((spec.paths.outbox / "summary.json").read_text(encoding="utf-8"))
    assert summary["legal_basis"] == {"hipaa_status": "undetermined", **registry}


def test_a_platform_sending_conversions_only_needs_no_legal_basis_for_the_other_platforms_list(
    clinic_dir: Path, sandboxes: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Meta has no audience configured and no registry entry: the live list sync mirrors
    # Google's list and is not failed for a Meta sync it would not make
    from etl import targets

    cfg = config_for(clinic_dir, "data_manager")
    assert cfg.meta is not None and cfg.google_ads is not None and cfg.google_ads.suppression_user_list
    raw = cfg.model_dump()
    raw["meta"]["suppression_audience_id"] = None
    google = {"basis": "marketing_authorization", "baa": False, "valid_until": "2026-11-24"}
    cfg = ClinicConfig.model_validate(
        {**raw, "compliance": {"legal_basis": {"google_ads": google}}, "base_dir": cfg.base_dir}
    )
    db = f"sqlite:///{tmp_path / 's.sqlite'}"
    spec = build(cfg, "2026-09-01", "2026-11-23", db, tmp_path, target="live")
    monkeypatch.setattr(tasks, "_clock", lambda: datetime.fromisoformat("2026-11-24T23:30:00-08:00"))
    real_open = targets.open_destinations
    monkeypatch.setattr(targets, "open_destinations", lambda config, target, **kw: real_open(
        config, "sandbox", **{**kw, "sandboxes": sandboxes, "environ": None}))  # fmt: skip
    out = tasks.sync_suppression(spec, target="live")
    assert out["google_customer_match"]["adds"] > 20
    assert len(sandboxes["google"].list_members(cfg.google_ads.suppression_user_list)) > 20


@pytest.mark.parametrize(("family", "api"), FAMILIES, ids=IDS)
def test_the_kill_switch_thrown_mid_upload_stops_it_before_the_next_batch_and_a_resume_sends_the_rest_once(
    family: str, api: str, clinic_dir: Path, sandboxes: dict[str, Any], tmp_path: Path
) -> None:
    cfg = config_for(clinic_dir, api)
    db = f"sqlite:///{tmp_path / 's.sqlite'}"
    spec = build(cfg, "2026-09-01", "2026-11-23", db, tmp_path)
    name, platform = ("meta_events", "meta") if family == "meta" else ("google_conversions", "google_ads")
    planned = [r["event_id" if family == "meta" else "order_id"] for r in _rows(spec, name)]
    assert len(planned) > 60, "the fixture must need several batches"
    at = datetime.fromisoformat("2026-11-23T01:00:00+00:00")

    def thrown_from_elsewhere(number: int) -> None:  # as `stop-sending` on another machine would
        if number == 2:
            with store.engine_for(db) as other:
                switches.stop(other, cfg.clinic_id, [platform], reason="incident", by="oncall", at=at)

    with pytest.raises(
        SendingStopped, match=rf"{platform}: sending is stopped since .* reason incident"
    ) as stop:
        upload(spec, family, sandboxes, batch=25, after_batch=thrown_from_elsewhere)
    assert sum(sent_once(sandboxes, family).values()) == 50  # two batches, not a third
    assert stop.value.counts is not None
    assert stop.value.counts["stopped"] == "kill_switch" and stop.value.counts["sent"] == 50
    with store.engine_for(db) as engine:
        states = Counter(e.status for e in ledger.read_ledger(engine, cfg.clinic_id, name).values())
    assert states["planned"] == len(planned) - 50  # the rest waits, recorded as not sent

    # while it stands the step is refused before the platform is opened (no adapter built)
    from etl import targets

    def never_opened(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the stopped platform was opened")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(targets, "open_destinations", never_opened)
        with pytest.raises(SendingStopped):
            tasks.upload(spec, family, target="sandbox", sandboxes=sandboxes, retry_wait=0)  # type: ignore[arg-type]
    assert sum(sent_once(sandboxes, family).values()) == 50

    with store.engine_for(db) as engine:
        switches.resume(engine, cfg.clinic_id, [platform], by="oncall", at=at)
    counts = upload(spec, family, sandboxes, batch=25)
    received = sent_once(sandboxes, family)
    assert set(received) == set(planned) and max(received.values()) == 1
    assert counts["sent"] == len(planned)  # this run's, the 50 before the stop included


def stop_platform(db: str, clinic_id: str, platform: str) -> None:
    with store.engine_for(db) as engine:
        switches.stop(engine, clinic_id, [platform], reason="incident", by="oncall",
                      at=datetime.fromisoformat("2026-11-23T01:00:00+00:00"))  # fmt: skip


def recording_opens(patch: pytest.MonkeyPatch) -> list[Any]:
    """Which platform each ``open_destinations`` call opened (``only``; None: both)."""
    from etl import targets

    opened: list[Any] = []
    real_open = targets.open_destinations

    def recorded(config: ClinicConfig, target: str, **kwargs: Any) -> Any:
        opened.append(kwargs.get("only"))
        return real_open(config, target, **kwargs)

    patch.setattr(targets, "open_destinations", recorded)
    return opened


def test_a_stopped_platforms_list_is_left_alone_and_the_other_list_still_syncs(
    clinic_dir: Path, sandboxes: dict[str, Any], tmp_path: Path
) -> None:
    cfg = config_for(clinic_dir, "data_manager")
    assert cfg.meta is not None and cfg.meta.suppression_audience_id
    assert cfg.google_ads is not None and cfg.google_ads.suppression_user_list
    db = f"sqlite:///{tmp_path / 's.sqlite'}"
    spec = build(cfg, "2026-09-01", "2026-11-23", db, tmp_path)
    stop_platform(db, cfg.clinic_id, "meta")
    with pytest.MonkeyPatch.context() as patch:
        opened = recording_opens(patch)
        with pytest.raises(SendingStopped, match="meta: sending is stopped"):
            tasks.sync_suppression(spec, target="sandbox", sandboxes=sandboxes, retry_wait=0)
    assert opened == ["google"]  # Meta's adapters never built
    assert sandboxes["meta"].audience_members(cfg.meta.suppression_audience_id) == frozenset()
    assert len(sandboxes["google"].list_members(cfg.google_ads.suppression_user_list)) > 20
    # a sync that opened the platform before the stop (the other list went first) checks again
    with (
        store.engine_for(db) as engine,
        open_destinations(cfg, "sandbox", now=spec.window.end, sandboxes=sandboxes, only="meta",
                          retry_wait=0) as dests,
        pytest.raises(SendingStopped),
    ):  # fmt: skip
        deliver.sync_audience(cfg, engine, spec.paths.outbox, dests.audiences["meta_audience"],
                              full_resync=False, clock=lambda: spec.window.end, run_id=spec.run_id,
                              run_end=spec.window.end)  # fmt: skip
    assert sandboxes["meta"].audience_members(cfg.meta.suppression_audience_id) == frozenset()
    with store.engine_for(db) as engine:
        assert ledger.read_audience_state(engine, cfg.clinic_id, "meta_audience") == {}
        assert ledger.read_pending_adds(engine, cfg.clinic_id, "meta_audience") == {}  # nothing written ahead
    refused = json.loads((spec.paths.results / "meta_audience.json").read_text(encoding="utf-8"))
    assert refused == {"adds": 0, "removes": 0, "rejected": 0, "requests": 0, "stopped": "kill_switch"}


def test_a_stopped_platform_without_a_list_does_not_hold_back_the_other_platforms_list(
    clinic_dir: Path, sandboxes: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Google sends conversions only and is stopped; Meta mirrors a list: the sync opens Meta
    # alone (Google's adapters, and so its credentials, are never needed) and mirrors it
    cfg = config_for(clinic_dir, "data_manager")
    assert cfg.google_ads is not None and cfg.meta is not None and cfg.meta.suppression_audience_id
    cfg = cfg.model_copy(
        update={"google_ads": cfg.google_ads.model_copy(update={"suppression_user_list": None})}
    )
    db = f"sqlite:///{tmp_path / 's.sqlite'}"
    spec = build(cfg, "2026-09-01", "2026-11-23", db, tmp_path)
    stop_platform(db, cfg.clinic_id, "google_ads")
    opened = recording_opens(monkeypatch)
    out = tasks.sync_suppression(spec, target="sandbox", sandboxes=sandboxes, retry_wait=0)
    assert opened == ["meta"]
    assert out["meta_audience"]["adds"] > 20
    assert len(sandboxes["meta"].audience_members(cfg.meta.suppression_audience_id)) > 20


@pytest.mark.parametrize("started", [True, False], ids=["upload-stopped", "upload-never-started"])
@pytest.mark.parametrize("family", ["google", "meta"])
def test_an_older_runs_upload_does_not_send_a_person_who_revoked_since(
    family: str, started: bool, sandboxes: dict[str, Any], tmp_path: Path
) -> None:
    # night one plans Ann's conversion, but its upload is stopped by the kill switch (or its
    # task never ran: publishing the outbox already planned it in the ledger); Ann revokes on
    # Nov 9, and night two's real plan drops the conversion as consent_revoked. Night one's
    # upload, retried after the resume, sent it anyway
    from etl import audit

    cfg = make_config(tmp_path)
    db = f"sqlite:///{tmp_path / 's.sqlite'}"
    (tmp_path / "leads.csv").write_text(ONE_LEAD, encoding="utf-8")
    (tmp_path / "appointments.csv").write_text(
        APPT_HEADER + visit("A2", "completed", "07", "200"), encoding="utf-8"
    )
    one = build(cfg, "2026-11-07", "2026-11-08", db, tmp_path / "one")
    name = "meta_events" if family == "meta" else "google_conversions"
    (old_id,) = [r["event_id" if family == "meta" else "order_id"] for r in _rows(one, name)]
    engine = store.open_engine(db)
    platform = "meta" if family == "meta" else "google_ads"
    if started:
        switches.stop(
            engine, cfg.clinic_id, [platform], reason="incident", by="test", at=datetime(2026, 11, 8)
        )
        with pytest.raises(SendingStopped):
            upload(one, family, sandboxes, batch=100)
        switches.resume(engine, cfg.clinic_id, [platform], by="test", at=datetime(2026, 11, 9))
    assert ledger.read_ledger(engine, cfg.clinic_id, name)[old_id].status == "planned"
    revoked = ONE_LEAD.replace("yes,2026-11-01 10:00,,", "yes,2026-11-01 10:00,2026-11-09 09:00,")
    assert revoked != ONE_LEAD
    (tmp_path / "leads.csv").write_text(revoked, encoding="utf-8")
    two = build(cfg, "2026-11-10", "2026-11-11", db, tmp_path / "two")
    assert _rows(two, name) == []
    assert json.loads((two.paths.outbox / "summary.json").read_text())["destinations"][name]["withdrawn"] == 1
    entry = ledger.read_ledger(engine, cfg.clinic_id, name)[old_id]
    assert (entry.status, entry.code) == ("withdrawn", "consent_revoked")
    row = store.send_ledger.c
    with engine.connect() as conn:
        sent_at = conn.execute(
            sa.select(row.sent_at).where(row.opaque_id == old_id, row.destination == name)
        ).scalar_one()
    assert sent_at is None  # never carried by a request: `disclosures` does not count it as left

    counts = upload(one, family, sandboxes, batch=100)
    assert old_id not in sent_once(sandboxes, family)
    assert counts["withdrawn"] == 1 and counts["already_sent"] == 0 and counts["sent"] == 0
    assert ledger.read_ledger(engine, cfg.clinic_id, name)[old_id].status == "withdrawn"
    with engine.connect() as conn:
        verdict = audit.verify(audit.snapshot(conn), cfg.clinic_id)
    engine.dispose()
    assert verdict.problems == [] and verdict.states_checked >= 1


@pytest.mark.parametrize("full_resync", [False, True], ids=["delta", "full-resync"])
def test_a_validate_only_list_sync_records_every_member_it_handed_over(
    full_resync: bool, clinic_dir: Path, sandboxes: dict[str, Any], tmp_path: Path
) -> None:
    # recorded from what Google applied: members it left unsettled (an error naming no
    # operation) were missing from the disclosure record though their hashes left; Meta's
    # checks are local, so nothing is recorded for it
    import sqlalchemy as sa

    cfg = config_for(clinic_dir, "google_ads")
    db = f"sqlite:///{tmp_path / 's.sqlite'}"
    spec = build(cfg, "2026-09-01", "2026-11-23", db, tmp_path, full_resync=full_resync)
    adds = len([r for r in _rows(spec, "google_customer_match") if r["operation"] == "create"])
    assert adds > 20
    sandboxes["google"].unlocated_error_next(100)
    tasks.sync_suppression(spec, target="sandbox", validate_only=True, sandboxes=sandboxes, retry_wait=0)
    with store.engine_for(db) as engine, engine.connect() as conn:
        rows = conn.execute(sa.select(store.validation_sends)).mappings().all()
    assert [(r["destination"], r["target"], r["adds"], r["removes"], r["opaque_id"]) for r in rows] == [
        ("google_customer_match", "sandbox", adds, 0, None)
    ]
