"""The audit chain: real runs leave a chain that verifies, and each kind of tampering is named.

The runs go through the CLI to the sandboxes (real SDKs, local servers); each tampering is made
on a copy of the staging database with plain SQL, as someone with write access to it would.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from etl import audit, ledger, store
from etl.cli import app
from tests.conftest import record_batches_at_once

RUNNER = CliRunner()
CLINIC = "sunrise-medspa"
FINAL_ROW = (
    "(SELECT opaque_id FROM send_ledger WHERE status IN ('sent', 'accepted') ORDER BY opaque_id LIMIT 1)"
)


@pytest.fixture(scope="module")
def sent(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, tuple[int, str]]:
    """A clinic that ran twice (overlapping intervals) against the sandboxes: (config, db, head)."""
    from etl.synth import write_synthetic_clinic

    out = tmp_path_factory.mktemp("audit")
    write_synthetic_clinic(out, appointments=2000, leads=800, seed=3)
    config = out / "clinic.yaml"
    for end in ("2026-11-20", "2026-11-23"):
        argv = ["run", "--config", str(config), "--start", "2026-10-01", "--end", end, "--target", "sandbox"]
        result = RUNNER.invoke(app, argv)
        assert result.exit_code == 0, result.output
    database = out / "var" / f"{CLINIC}.sqlite"
    with store.engine_for(f"sqlite:///{database}") as engine:
        head = audit.head(engine, CLINIC)
    assert head is not None
    return config, database, head


def verify(config: Path, database: Path, *extra: str) -> Any:
    return RUNNER.invoke(
        app,
        ["verify-audit", "--config", str(config), "--database", f"sqlite:///{database}", *extra],
        env={"COLUMNS": "250"},
    )


def test_the_chain_real_runs_leave_verifies(sent: tuple[Path, Path, tuple[int, str]]) -> None:
    config, database, (seq, sha) = sent
    result = verify(config, database, "--head", sha)
    assert result.exit_code == 0, result.output
    assert f"intact; {seq} records, head seq {seq} sha256 {sha}" in result.stdout
    with sqlite3.connect(database) as conn:
        kinds = dict(conn.execute("SELECT kind, count(*) FROM audit_chain GROUP BY kind").fetchall())
        states = conn.execute("SELECT count(*) FROM send_ledger WHERE status != 'planned'").fetchone()[0]
    # two runs: each upload's outcomes, both lists' syncs and each run's summary
    assert kinds["run_summary"] == 2 and kinds["audience_sync"] >= 2 and kinds["outcomes"] >= 2
    assert states > 50 and f"ledger states checked against it: {states}" in result.stdout


@pytest.mark.parametrize(
    ("tamper", "named"),
    [
        (f"UPDATE send_ledger SET status = 'planned' WHERE opaque_id = {FINAL_ROW}", "differs from audit record"),
        (f"UPDATE send_ledger SET request_id = 'other' WHERE opaque_id = {FINAL_ROW}", "differs from audit record"),
        (f"UPDATE send_ledger SET consent_at = '2020-01-01 00:00:00.000000' WHERE opaque_id = {FINAL_ROW}",
         "in consent_at"),
        (f"UPDATE send_ledger SET sent_at = '2020-01-01 00:00:00.000000' WHERE opaque_id = {FINAL_ROW}",
         "in sent_at"),
        (f"DELETE FROM send_ledger WHERE opaque_id = {FINAL_ROW}", "is gone (audit record"),
        ("INSERT INTO send_ledger (clinic_id, destination, opaque_id, stage, status, run_id, updated_at) "
         f"VALUES ('{CLINIC}', 'meta_events', '{'f' * 64}', 'purchase', 'accepted', 'forged', "
         "'2999-01-01 00:00:00.000000')", "is accepted with no audit record"),
        ("UPDATE run_summaries SET summary = replace(summary, '\"dry_run\": false', '\"dry_run\": true')",
         "run_summaries: a summary of run"),
        ("UPDATE run_summaries SET target = 'live', dry_run = 1", "run_summaries: a summary of run"),
        ("DELETE FROM audience_sync_log WHERE destination = 'meta_audience'", "audience_sync_log: the meta_audience sync"),
        ("DELETE FROM audit_chain WHERE seq = 2", "audit_chain: record 2 is missing"),
        ("DELETE FROM audit_chain", "audit_chain: holds no record of this clinic"),
        ("UPDATE audit_chain SET record = '{' WHERE seq = 1", "record 1 was changed after it was written"),
        ("UPDATE audit_chain SET record = replace(record, 'accepted', 'rejected') WHERE seq = ("
         "SELECT min(seq) FROM audit_chain WHERE kind = 'outcomes' AND record LIKE '%accepted%')",
         "was changed after it was written"),
    ],
    ids=["final-state-taken-back", "request-id-edited", "consent-time-edited", "send-time-edited",
         "row-deleted", "row-forged", "summary-edited", "summary-columns-edited", "sync-deleted", "record-deleted", "chain-deleted",
         "record-garbled", "record-edited"],
)  # fmt: skip
def test_each_tampering_is_named(
    sent: tuple[Path, Path, tuple[int, str]], tmp_path: Path, tamper: str, named: str
) -> None:
    config, database, _head = sent
    copy = tmp_path / "copy.sqlite"
    shutil.copy(database, copy)
    with sqlite3.connect(copy) as conn:
        assert conn.execute(tamper).rowcount >= 1
    result = verify(config, copy)
    assert result.exit_code == 1, result.output
    assert "NOT intact" in result.stdout and named in result.stdout


def test_a_rewritten_tail_is_found_only_against_a_logged_head(
    sent: tuple[Path, Path, tuple[int, str]], tmp_path: Path
) -> None:
    # the last record (the second run's summary) and its row removed together: the chain and
    # the tables agree again, which only a head kept elsewhere can contradict
    config, database, (seq, sha) = sent
    copy = tmp_path / "copy.sqlite"
    shutil.copy(database, copy)
    with sqlite3.connect(copy) as conn:
        (run_id,) = conn.execute("SELECT run_id FROM audit_chain WHERE seq = ?", (seq,)).fetchone()
        conn.execute("DELETE FROM audit_chain WHERE seq = ?", (seq,))
        conn.execute("DELETE FROM run_summaries WHERE run_id = ? AND recorded_at = "
                     "(SELECT max(recorded_at) FROM run_summaries WHERE run_id = ?)", (run_id, run_id))  # fmt: skip
    assert verify(config, copy).exit_code == 0
    anchored = verify(config, copy, "--head", sha)
    assert anchored.exit_code == 1 and "no longer holds the given head" in anchored.stdout
    assert verify(config, copy, "--head", "not-a-hash").exit_code == 2


def test_each_report_logs_the_chain_head(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from etl.synth import write_synthetic_clinic

    write_synthetic_clinic(tmp_path, appointments=300, leads=120, seed=4)
    argv = ["run", "--config", str(tmp_path / "clinic.yaml"), "--end", "2026-11-23", "--dry-run"]
    with caplog.at_level(logging.INFO, logger="etl.tasks"):
        assert RUNNER.invoke(app, argv).exit_code == 0
    with store.engine_for(f"sqlite:///{tmp_path / 'var' / f'{CLINIC}.sqlite'}") as engine:
        seq, sha = audit.head(engine, CLINIC) or (0, "")
    assert seq == 1  # a dry run records its summary, nothing else
    assert f"audit chain head: seq 1 sha256 {sha}" in caplog.text


def test_writers_at_once_each_get_their_own_place_in_the_chain(tmp_path: Path) -> None:
    # two uploads of one clinic record their batches at the same time (the DAG runs Google and
    # Meta in parallel): no two records may share a sequence number or a predecessor
    verdict = record_batches_at_once(f"sqlite:///{tmp_path / 's.sqlite'}", CLINIC)
    assert verdict.intact, verdict.problems
    assert verdict.records == 50 and verdict.states_checked == 150


def test_a_database_from_before_the_chain_is_told_apart_from_a_broken_chain(tmp_path: Path) -> None:
    import yaml

    from tests.conftest import BASE_CONFIG

    (tmp_path / "clinic.yaml").write_text(yaml.safe_dump(BASE_CONFIG))
    database = tmp_path / "old.sqlite"
    with store.engine_for(f"sqlite:///{database}"):
        pass
    with sqlite3.connect(database) as conn:  # as an earlier version made it: no chain, and none
        for table in ("audit_chain", "send_stops", "validation_sends"):  # of the tables added after
            conn.execute(f"DROP TABLE {table}")
    result = verify(tmp_path / "clinic.yaml", database)
    assert result.exit_code == 2 and "holds no audit chain yet" in result.stderr.replace("\n", " ")


def test_a_dropped_chain_is_reported_and_not_restarted_from_the_edited_tables(
    sent: tuple[Path, Path, tuple[int, str]], tmp_path: Path
) -> None:
    # a ledger row edited, then the chain dropped: read as an earlier version's database, the
    # next command that opened it started a new chain from the edited tables, "intact"
    config, database, _head = sent
    copy = tmp_path / "copy.sqlite"
    shutil.copy(database, copy)
    with sqlite3.connect(copy) as conn:
        conn.execute(f"UPDATE send_ledger SET status = 'planned' WHERE opaque_id = {FINAL_ROW}")
        conn.execute("DROP TABLE audit_chain")
    result = verify(config, copy)
    assert result.exit_code == 1 and "audit_chain: the table is gone" in result.stdout
    with store.engine_for(f"sqlite:///{copy}"):  # any command that opens it to write
        pass
    again = verify(config, copy)
    assert again.exit_code == 1 and "NOT intact" in again.stdout


def test_a_batch_committed_while_verifying_is_not_taken_for_tampering(
    sent: tuple[Path, Path, tuple[int, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # verify-audit reads the chain, then the ledger: an upload that commits a batch in between
    # must be invisible to both reads, not in the ledger alone
    config, database, _head = sent
    copy = tmp_path / "copy.sqlite"
    shutil.copy(database, copy)
    check_ledger = audit._check_ledger

    def upload_meanwhile(*args: Any) -> None:
        with store.engine_for(f"sqlite:///{copy}") as engine:
            rows = [{"opaque_id": "e" * 64, "status": "accepted", "stage": "purchase"}]
            ledger.write_ledger(engine, CLINIC, "meta_events", rows, run_id="meanwhile", at=datetime.now(UTC))
        check_ledger(*args)

    monkeypatch.setattr(audit, "_check_ledger", upload_meanwhile)
    result = verify(config, copy)
    assert result.exit_code == 0, result.output
    monkeypatch.setattr(audit, "_check_ledger", check_ledger)
    assert verify(config, copy).exit_code == 0  # and the next check sees it, chained


def test_ledger_writes_replay_as_the_ledger_applied_them(tmp_path: Path) -> None:
    # times with another offset (SQLite keeps wall times), one ID twice in a batch (the last
    # wins), a final state a late non-final write leaves alone, syncs with the same counts
    from datetime import timedelta, timezone

    tokyo = timezone(timedelta(hours=9))
    at = datetime(2026, 11, 23, 10, tzinfo=tokyo)
    with store.engine_for(f"sqlite:///{tmp_path / 's.sqlite'}") as engine:
        ledger.write_ledger(engine, CLINIC, "meta_events", [
            {"opaque_id": "a", "status": "planned", "stage": "purchase", "consent_at": at - timedelta(days=3),
             "consent_stated": True},
            {"opaque_id": "b", "status": "planned", "stage": "consultation"},
        ], run_id="r1", at=at)  # fmt: skip
        ledger.write_ledger(engine, CLINIC, "meta_events", [
            {"opaque_id": "a", "status": "rejected", "code": None},
            {"opaque_id": "a", "status": "accepted", "code": "X", "request_id": "q1"},
            {"opaque_id": "b", "status": "deferred", "code": "429", "transmitted": False},
        ], run_id="r1", at=at + timedelta(minutes=1))  # fmt: skip
        ledger.write_ledger(engine, CLINIC, "meta_events", [{"opaque_id": "a", "status": "deferred"}],
                            run_id="r2", at=at + timedelta(minutes=2))  # fmt: skip
        for minute in (3, 4):  # a list sync repeated with the same counts
            ledger.apply_audience_delta(engine, CLINIC, "meta_audience", added={"m": "{}"}, removed=[],
                                        at=at + timedelta(minutes=minute), run_id="r2")  # fmt: skip
        with engine.connect() as conn:
            verdict = audit.verify(audit.snapshot(conn), CLINIC)
        assert verdict.intact, verdict.problems
        assert verdict.states_checked == 2
        with engine.begin() as conn:  # one of the two syncs removed
            conn.execute(store.audience_sync_log.delete().where(
                store.audience_sync_log.c.synced_at == (at + timedelta(minutes=4)).astimezone(UTC)))  # fmt: skip
        with engine.connect() as conn:
            problems = audit.verify(audit.snapshot(conn), CLINIC).problems
    assert problems == [
        "audience_sync_log: the meta_audience sync of run r2 in audit record 5 is gone or changed"
    ]


def test_a_database_an_earlier_version_filled_starts_its_chain_from_what_it_held(tmp_path: Path) -> None:
    # rows an earlier version left (planned, deferred after a request, accepted), then the next
    # night on this version carries two over and sends them, and re-plans the accepted one
    # (refused: a final state stays): all of it verifies; a row forged later with an old time
    # does not pass as written before the chain
    old, now = datetime(2026, 10, 1, tzinfo=UTC), datetime(2026, 11, 23, tzinfo=UTC)
    url = f"sqlite:///{tmp_path / 's.sqlite'}"
    with store.engine_for(url):
        pass
    earlier = sa.create_engine(url)  # the earlier version's database: no chain, nor what came after it
    with earlier.begin() as conn:
        for table in ("audit_chain", "send_stops", "validation_sends"):
            conn.execute(sa.text(f"DROP TABLE {table}"))
        for opaque_id, status, sent in (
            ("a", "accepted", old),
            ("b", "planned", None),
            ("c", "deferred", old),
        ):
            conn.execute(store.send_ledger.insert(), {
                "clinic_id": CLINIC, "destination": "meta_events", "opaque_id": opaque_id, "stage": "purchase",
                "status": status, "run_id": "r0", "planned_at": old, "sent_at": sent, "updated_at": old,
                "consent_at": old, "consent_stated": True})  # fmt: skip
        conn.execute(store.run_summaries.insert(), {"run_id": "r0", "recorded_at": old, "clinic_id": CLINIC,
                     "start": "s", "end": "e", "dry_run": False, "target": "sandbox",
                     "summary": '{"dry_run": false, "end": "e", "start": "s", "target": "sandbox"}'})  # fmt: skip
    earlier.dispose()
    with store.engine_for(url) as engine:  # this version opens it: the chain begins
        ledger.write_ledger(engine, CLINIC, "meta_events", [
            {"opaque_id": "a", "status": "planned"}, {"opaque_id": "b", "status": "planned"},
            {"opaque_id": "c", "status": "planned"}], run_id="r1", at=now)  # fmt: skip
        ledger.write_ledger(engine, CLINIC, "meta_events", [
            {"opaque_id": "b", "status": "accepted", "request_id": "q"},
            {"opaque_id": "c", "status": "accepted", "request_id": "q"}], run_id="r1", at=now)  # fmt: skip
        summary = {"clinic_id": CLINIC, "start": "s", "end": "e", "dry_run": False, "target": "sandbox"}
        ledger.record_summary(engine, summary, run_id="r1", at=now)
        with engine.connect() as conn:
            after = audit.verify(audit.snapshot(conn), CLINIC)
        assert after.intact, after.problems
        assert (after.records, after.states_checked) == (4, 3)  # the baseline, two writes, a summary
        with engine.begin() as conn:
            conn.execute(store.send_ledger.insert(), {"clinic_id": CLINIC, "destination": "meta_events",
                         "opaque_id": "d", "status": "accepted", "run_id": "r0", "updated_at": old})  # fmt: skip
        with engine.connect() as conn:
            forged = audit.verify(audit.snapshot(conn), CLINIC)
    assert forged.problems == ["send_ledger: meta_events d is accepted with no audit record"]
