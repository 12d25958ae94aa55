"""Old run folders lose their pseudonymous working files and keep their record (``prune``)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml
from typer.testing import CliRunner

from etl import pipeline, tasks
from etl.cli import app
from etl.errors import NotPlanned
from tests.conftest import BASE_CONFIG, DATA

RUNNER = CliRunner()
GOOD = DATA / "rules" / "reschedule"
# the hashed email of the fixture's person, as the outbox carries it (SPEC rule 9)
HASHED = hashlib.sha256(b"janedoe@gmail.com").hexdigest()
KEPT = {"outbox/summary.json", "report.html"}


def _clinic(tmp_path: Path, **extra: object) -> Path:
    shutil.copy(GOOD / "appointments.csv", tmp_path / "appointments.csv")
    shutil.copy(GOOD / "leads.csv", tmp_path / "leads.csv")
    (tmp_path / "clinic.yaml").write_text(yaml.safe_dump({**BASE_CONFIG, **extra}))
    return tmp_path / "clinic.yaml"


def _run(config: Path, start: str, end: str, *mode: str) -> Path:
    result = RUNNER.invoke(app, ["run", "--config", str(config), "--start", start, "--end", end, *mode])
    assert result.exit_code == 0, result.output
    (run_dir,) = [p for p in (config.parent / "var" / "runs").iterdir() if start.replace("-", "") in p.name]
    return run_dir


def _age(run_dir: Path, days: int) -> None:
    past = time.time() - days * 86_400
    for path in run_dir.rglob("*"):
        os.utime(path, (past, past))


def _files(run_dir: Path) -> set[str]:
    return {
        p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"
    }


def _holds_hashes(run_dir: Path) -> bool:
    return any(HASHED in p.read_bytes().decode("utf-8", "replace") for p in run_dir.rglob("*") if p.is_file())


def _prune_records(config: Path) -> list[tuple[str, dict[str, int]]]:
    """The audit chain's prune records (run, record), and the chain checked whole."""
    from etl import audit, store

    cfg = tasks.load_config(config)
    with store.engine_for(cfg.resolved_database_url(None)) as engine, engine.connect() as conn:
        rows = conn.execute(
            sa.select(store.audit_chain.c.run_id, store.audit_chain.c.record)
            .where(store.audit_chain.c.kind == "prune")
            .order_by(store.audit_chain.c.seq)
        ).all()
        assert audit.verify(audit.snapshot(conn), cfg.clinic_id).intact
    return [(run_id, json.loads(record)) for run_id, record in rows]


def test_prune_deletes_an_old_folders_rows_and_keeps_its_record(tmp_path: Path) -> None:
    config = _clinic(tmp_path)
    old = _run(config, "2026-05-01", "2026-06-30", "--dry-run")
    recent = _run(config, "2026-05-02", "2026-06-30", "--dry-run")
    assert _holds_hashes(old) and _holds_hashes(recent)  # the outbox rows carry the hashes
    _age(old, 40)
    before_recent = _files(recent)

    preview = RUNNER.invoke(
        app, ["prune", "--config", str(config), "--older-than", "30", "--dry-run", "--json"]
    )
    assert preview.exit_code == 0, preview.output
    (listed,) = json.loads(preview.stdout)["runs"]
    assert listed["run_id"] == old.name and listed["files"] >= 3 and _holds_hashes(old)  # nothing deleted
    assert _prune_records(config) == []  # a preview is not a purge

    result = RUNNER.invoke(app, ["prune", "--config", str(config), "--older-than", "30"])
    assert result.exit_code == 0, result.output
    assert not _holds_hashes(old) and _files(old) == KEPT | {"pruned.json"}
    record = json.loads((old / "pruned.json").read_text())
    assert (
        "outbox/google_conversions.jsonl" in record["deleted"] and "conversions.parquet" in record["deleted"]
    )
    assert record["files"] == listed["files"] and record["bytes"] == listed["bytes"]
    # the purge is audited: the chain holds which run lost how many files and bytes
    assert _prune_records(config) == [(old.name, {"files": listed["files"], "bytes": listed["bytes"]})]
    assert _files(recent) == before_recent and _holds_hashes(recent)  # changed 0 days ago: kept
    again = RUNNER.invoke(app, ["prune", "--config", str(config), "--older-than", "30", "--json"])
    assert json.loads(again.stdout)["runs"] == []  # nothing left to prune


def test_a_pruned_run_refuses_to_send_or_rerender_and_a_rerun_starts_afresh(tmp_path: Path) -> None:
    config = _clinic(tmp_path)
    run_dir = _run(config, "2026-05-01", "2026-06-30", "--dry-run")
    _age(run_dir, 40)
    assert RUNNER.invoke(app, ["prune", "--config", str(config), "--older-than", "30"]).exit_code == 0
    cfg_tz = tasks.load_config(config).tz
    spec = tasks.spec_for(config, datetime(2026, 5, 1, tzinfo=cfg_tz), datetime(2026, 6, 30, tzinfo=cfg_tz))
    spec = dataclasses.replace(spec, label=pipeline.run_label(dry_run=True))
    assert spec.paths.run_dir == run_dir
    with pytest.raises(NotPlanned, match="pruned"):  # sending "nothing" would read as done
        tasks.upload(spec, "meta", target="sandbox")
    rerender = RUNNER.invoke(app, ["report", "--config", str(config), "--run-id", run_dir.name])
    assert rerender.exit_code == 2 and "pruned" in rerender.stderr
    _run(config, "2026-05-01", "2026-06-30", "--dry-run")  # the interval again, from its exports
    assert not (run_dir / "pruned.json").exists() and _holds_hashes(run_dir)


def test_a_folder_a_run_is_working_in_is_left_alone(tmp_path: Path) -> None:
    config = _clinic(tmp_path)
    run_dir = _run(config, "2026-05-01", "2026-06-30", "--dry-run")
    _age(run_dir, 40)
    holder = subprocess.Popen(  # another process holds the run folder, as a running step does
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)", str(run_dir / ".lock")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        result = RUNNER.invoke(app, ["prune", "--config", str(config), "--older-than", "30", "--json"])
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 0, result.output
    (line,) = json.loads(result.stdout)["runs"]
    assert line["skipped"] == "in use" and _holds_hashes(run_dir)


def test_with_retention_configured_each_report_prunes_the_older_runs(tmp_path: Path) -> None:
    config = _clinic(tmp_path, retention={"run_files_days": 30})
    old = _run(config, "2026-05-01", "2026-06-30", "--dry-run")
    _age(old, 31)
    recent = _run(config, "2026-05-02", "2026-06-30", "--dry-run")  # its report step prunes
    assert (old / "pruned.json").exists() and not _holds_hashes(old)
    assert not (recent / "pruned.json").exists() and _holds_hashes(recent)
    assert [run_id for run_id, _ in _prune_records(config)] == [old.name]


def test_prune_needs_an_age(tmp_path: Path) -> None:
    result = RUNNER.invoke(app, ["prune", "--config", str(_clinic(tmp_path))])
    assert result.exit_code == 2 and "--older-than" in result.stderr


def test_prune_keeps_to_its_own_clinics_folders(tmp_path: Path) -> None:
    # clinic YAMLs may share one folder (the DAG reads <root>/*.yaml), and so var/runs
    config = _clinic(tmp_path, retention={"run_files_days": 1})
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**BASE_CONFIG, "clinic_id": "other-clinic"}))
    theirs = _run(other, "2026-05-01", "2026-06-30", "--dry-run")
    _age(theirs, 10)
    _run(config, "2026-05-02", "2026-06-30", "--dry-run")  # its report prunes its own clinic's folders
    result = RUNNER.invoke(app, ["prune", "--config", str(config), "--older-than", "1", "--json"])
    assert json.loads(result.stdout)["runs"] == []
    assert not (theirs / "pruned.json").exists() and _holds_hashes(theirs)


def test_a_folder_that_cannot_be_pruned_does_not_stop_the_others(tmp_path: Path) -> None:
    config = _clinic(tmp_path)
    first = _run(config, "2026-05-01", "2026-06-30", "--dry-run")
    second = _run(config, "2026-05-02", "2026-06-30", "--dry-run")
    (first / "pruned.json").write_text("")  # a damaged record (a disk filled while writing it)
    _age(first, 40)
    _age(second, 40)
    result = RUNNER.invoke(app, ["prune", "--config", str(config), "--older-than", "30", "--json"])
    assert result.exit_code == 0, result.output
    runs = {r["run_id"]: r for r in json.loads(result.stdout)["runs"]}
    assert runs[first.name]["skipped"].startswith("failed") and runs[second.name]["skipped"] is None
    assert _holds_hashes(first) and not _holds_hashes(second)


def test_prune_takes_what_a_killed_plan_write_left(tmp_path: Path) -> None:
    config = _clinic(tmp_path)
    run_dir = _run(config, "2026-05-01", "2026-06-30", "--dry-run")
    partial = run_dir / "..outbox.pending.partial"  # write_outbox's staging folder, killed mid-write
    shutil.copytree(run_dir / "outbox", partial)
    _age(run_dir, 40)
    assert RUNNER.invoke(app, ["prune", "--config", str(config), "--older-than", "30"]).exit_code == 0
    assert not partial.exists() and not _holds_hashes(run_dir)


def test_a_run_whose_outbox_is_elsewhere_stays_sendable(tmp_path: Path) -> None:
    # only its candidate file goes; its outbox (outside the folder) is intact, so it is no
    # "pruned" run that refuses to send or report
    config = _clinic(tmp_path)
    outbox = tmp_path / "elsewhere"
    result = RUNNER.invoke(app, ["run", "--config", str(config), "--start", "2026-05-01", "--end", "2026-06-30",
                                 "--dry-run", "--outbox", str(outbox)])  # fmt: skip
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / "var" / "runs").iterdir()
    assert (run_dir / "conversions.parquet").exists()
    _age(run_dir, 40)
    assert RUNNER.invoke(app, ["prune", "--config", str(config), "--older-than", "30"]).exit_code == 0
    assert not (run_dir / "conversions.parquet").exists() and not (run_dir / "pruned.json").exists()
    rerender = RUNNER.invoke(app, ["report", "--config", str(config), "--run-id", run_dir.name,
                                   "--outbox", str(outbox)])  # fmt: skip
    assert rerender.exit_code == 0, rerender.output


def test_a_prune_the_audit_chain_cannot_record_deletes_nothing_and_a_preview_opens_no_database(
    tmp_path: Path,
) -> None:
    config = _clinic(tmp_path)
    old = _run(config, "2026-05-01", "2026-06-30", "--dry-run")
    _age(old, 40)
    elsewhere = tmp_path / "elsewhere.sqlite"
    preview = RUNNER.invoke(app, ["prune", "--config", str(config), "--older-than", "30", "--dry-run",
                                  "--database", f"sqlite:///{elsewhere}"])  # fmt: skip
    assert preview.exit_code == 0, preview.output
    assert not elsewhere.exists()  # a preview records nothing, so opens nothing
    unreachable = "postgresql+psycopg2://medspa@127.0.0.1:1/medspa"  # nothing listens on port 1
    result = RUNNER.invoke(
        app, ["prune", "--config", str(config), "--older-than", "30", "--database", unreachable]
    )
    assert result.exit_code == 7, result.output
    assert _holds_hashes(old) and not (old / "pruned.json").exists()  # nothing deleted unrecorded


def test_prune_leaves_the_run_folders_of_a_clinic_whose_id_starts_the_same(tmp_path: Path) -> None:
    # run folders were matched by the prefix "<clinic_id>__": pruning sunrise-medspa deleted the
    # outbox rows of sunrise-medspa__west, whose YAML shares the folder, and chained it as its own
    config = _clinic(tmp_path)
    mine = _run(config, "2026-05-01", "2026-06-30", "--dry-run")
    west = mine.with_name(mine.name.replace("sunrise-medspa__", "sunrise-medspa__west__", 1))
    shutil.copytree(mine, west)
    _age(mine, 40)
    _age(west, 40)
    before = _files(west)
    result = RUNNER.invoke(app, ["prune", "--config", str(config), "--older-than", "30", "--json"])
    assert result.exit_code == 0, result.output
    assert [r["run_id"] for r in json.loads(result.stdout)["runs"]] == [mine.name]
    assert _files(west) == before and _holds_hashes(west)
