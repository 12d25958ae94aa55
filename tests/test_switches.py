"""The kill switch (``etl.switches``): stop and resume, through the CLI, and what the audit chain
makes of a stop changed behind its back. What a stop does to uploads in flight and to list
syncs is in tests/test_delivery.py, to Airflow tasks in tests/dags/test_airflow_support.py."""

from __future__ import annotations

import shutil
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml
from typer.testing import CliRunner

from etl import audit, store, switches
from etl.cli import app
from etl.errors import ConfigError
from tests.conftest import BASE_CONFIG, DATA

RUNNER = CliRunner()
CLINIC = BASE_CONFIG["clinic_id"]
AT = datetime(2026, 11, 24, 9, 30, tzinfo=UTC)


@pytest.fixture
def clinic(tmp_path: Path) -> Path:
    for name in ("appointments.csv", "leads.csv"):
        shutil.copy(DATA / "rules" / "reschedule" / name, tmp_path / name)
    (tmp_path / "clinic.yaml").write_text(yaml.safe_dump(BASE_CONFIG))
    with store.engine_for(db_url(tmp_path / "clinic.yaml")):  # the switch needs the database made
        pass
    return tmp_path / "clinic.yaml"


def invoke(*argv: str) -> Any:
    return RUNNER.invoke(app, list(argv), env={"COLUMNS": "250"})


def db_url(config: Path) -> str:
    return f"sqlite:///{config.parent / 'switch.sqlite'}"


def verdict(url: str) -> audit.Verdict:
    with store.engine_for(url) as engine, engine.connect() as conn:
        return audit.verify(audit.snapshot(conn), CLINIC)


def test_a_stop_stands_until_resumed_and_a_second_stop_keeps_the_first(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 's.sqlite'}"
    with store.engine_for(url) as engine:
        first, added = switches.stop(engine, CLINIC, ["meta"], reason="incident", by="oncall", at=AT)
        assert list(first) == added == ["meta"]
        assert first["meta"] == switches.Stop(
            "meta", "incident", "oncall", "2026-11-24T09:30:00.000000+00:00"
        )
        again, added = switches.stop(engine, CLINIC, ["meta", "google_ads"], reason="other", by="b", at=AT)
        assert again["meta"] == first["meta"] and added == ["google_ads"]  # the first stop's record is kept
        assert again["google_ads"].reason == "other"
        refusal = switches.refusal(engine, CLINIC, "meta")
        assert refusal is not None and refusal.exit_code == 10
        assert "reason incident" in str(refusal) and "resume-sending --platform meta" in str(refusal)
        assert switches.refusal(engine, "another-clinic", "meta") is None  # per clinic
        lifted = switches.resume(engine, CLINIC, ["meta"], by="oncall", at=AT)
        assert [s.platform for s in lifted] == ["meta"]
        assert switches.refusal(engine, CLINIC, "meta") is None
        assert switches.resume(engine, CLINIC, ["meta"], by="oncall", at=AT) == []  # nothing to lift
        assert list(switches.stopped(engine, CLINIC)) == ["google_ads"]
        with engine.connect() as conn:
            kinds = conn.execute(
                sa.select(store.audit_chain.c.kind, store.audit_chain.c.record).order_by(
                    store.audit_chain.c.seq
                )
            ).all()
    # three changes, three records (the kept stop wrote none)
    assert [k for k, _ in kinds] == ["send_stop"] * 3
    assert verdict(url).intact


@pytest.mark.parametrize(
    ("platforms", "reason", "wanted"),
    [
        ([], "incident", "--platform"),
        (["tiktok"], "incident", "--platform"),
        (["meta"], "a note", "--reason"),
    ],
)
def test_an_unknown_platform_or_a_reason_outside_the_codes_is_refused(
    tmp_path: Path, platforms: list[str], reason: str, wanted: str
) -> None:
    with store.engine_for(f"sqlite:///{tmp_path / 's.sqlite'}") as engine:
        with pytest.raises(ConfigError, match=wanted):
            switches.stop(engine, CLINIC, platforms, reason=reason, by="x", at=AT)
        assert switches.stopped(engine, CLINIC) == {}


@pytest.mark.parametrize(
    ("tamper", "problem"),
    [
        # sending resumed by deleting the row: no record of who or when
        (
            "DELETE FROM send_stops WHERE platform = 'meta'",
            "send_stops: the stop of meta in audit record 1 is gone",
        ),
        ("UPDATE send_stops SET reason = 'other'", "send_stops: a stop of meta has no audit record"),
        (
            "INSERT INTO send_stops VALUES ('sunrise-medspa', 'google_ads', 'incident', 'x', '2026-01-01')",
            "send_stops: a stop of google_ads has no audit record",
        ),
    ],
    ids=["deleted", "edited", "added"],
)
def test_a_stop_changed_outside_the_switch_is_named_by_verify_audit(
    clinic: Path, tamper: str, problem: str
) -> None:
    url = db_url(clinic)
    with store.engine_for(url) as engine:
        switches.stop(engine, CLINIC, ["meta"], reason="incident", by="oncall", at=AT)
    assert verdict(url).intact
    with sqlite3.connect(clinic.parent / "switch.sqlite") as conn:
        conn.execute(tamper)
    result = invoke("verify-audit", "--config", str(clinic), "--database", url)
    assert result.exit_code == 1
    assert problem in result.output


def test_stop_and_resume_through_the_cli_and_doctor_shows_the_stop(clinic: Path) -> None:
    url = db_url(clinic)
    result = invoke(
        "stop-sending", "-c", str(clinic), "--database", url, "-p", "meta", "--reason", "incident"
    )
    assert result.exit_code == 0, result.output
    assert "meta" in result.output and "stopped" in result.output and "incident" in result.output
    assert switches.operator() in result.output  # who, as the OS names them

    doctor = invoke("doctor", "-c", str(clinic), "--database", url)
    assert doctor.exit_code == 1
    assert "kill switch.meta" in doctor.output and "reason incident" in doctor.output
    assert "kill switch.google_ads" in doctor.output and "ok (sending)" in doctor.output

    refused = invoke("stop-sending", "-c", str(clinic), "--database", url, "-p", "meta", "--reason", "oops")
    assert refused.exit_code == 2  # not a reason code

    result = invoke("resume-sending", "-c", str(clinic), "--database", url, "-p", "all")
    assert result.exit_code == 0, result.output
    assert "meta: resumed (was stopped since" in result.output
    with store.engine_for(url) as engine:
        assert switches.stopped(engine, CLINIC) == {}
    assert verdict(url).intact


def test_a_run_with_every_platform_stopped_stops_before_the_extract_and_a_dry_run_still_runs(
    clinic: Path,
) -> None:
    url = db_url(clinic)
    base = ["run", "--config", str(clinic), "--database", url, "--start", "2026-05-01", "--end", "2026-06-30"]
    stopped = invoke(
        "stop-sending", "-c", str(clinic), "--database", url, "-p", "all", "--reason", "legal_review"
    )
    assert stopped.exit_code == 0, stopped.output
    result = invoke(*base, "--target", "sandbox")
    assert result.exit_code == 10, result.output
    assert "sending is stopped since" in result.output and "kill switch" in result.output
    told = " ".join(result.stderr.split())
    assert "google_ads" in told and "meta" in told  # each stopped platform named, not the first alone
    assert not list((clinic.parent / "var" / "runs").glob("*/extract"))  # nothing extracted
    with store.engine_for(url) as engine, engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(store.send_ledger)).scalar() == 0

    dry = invoke(*base, "--dry-run")
    assert dry.exit_code == 0, dry.output  # a dry run sends nothing: never stopped
    assert list((clinic.parent / "var" / "runs").glob("*/outbox/summary.json"))


def test_a_live_run_is_not_refused_whole_for_one_stopped_platform(
    clinic: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `doctor` flags the stop, but a live run goes on: the stopped platform's sends are refused
    # on their own (exit 10 after the others went); any other check still refuses the run
    from etl import cli, doctor
    from etl.config import load_config

    cfg = load_config(clinic)
    stop = ("kill switch.meta", "stopped since 2026-11-24T09:30:00+00:00 by oncall, reason incident")
    monkeypatch.setattr(doctor, "run_checks", lambda *a, **k: [("config", "ok"), stop])
    cli._ready_for_live(cfg, None)
    monkeypatch.setattr(doctor, "run_checks", lambda *a, **k: [stop, ("MEDSPA_ID_SECRET", "missing")])
    with pytest.raises(ConfigError, match="not ready for a live run: MEDSPA_ID_SECRET;"):
        cli._ready_for_live(cfg, None)


def test_one_stopped_platform_holds_back_only_its_own_sends_and_the_report_says_so(clinic: Path) -> None:
    import json

    url = db_url(clinic)
    base = ["run", "--config", str(clinic), "--database", url, "--start", "2026-05-01", "--end", "2026-06-30"]
    assert (
        invoke(
            "stop-sending", "-c", str(clinic), "--database", url, "-p", "meta", "--reason", "incident"
        ).exit_code
        == 0
    )
    result = invoke(*base, "--target", "sandbox", "--json")
    assert result.exit_code == 10, result.output  # after Google's sends and the report
    (run_dir,) = (clinic.parent / "var" / "runs").iterdir()
    results = run_dir / "results"
    google_sent = json.loads((results / "google_conversions.json").read_text())["accepted"]
    assert google_sent > 0
    # stdout still carries the summary (a `--json | jq` pipeline), and stderr where things are
    assert json.loads(result.stdout) == json.loads((run_dir / "outbox" / "summary.json").read_text())
    assert "report: " in result.stderr
    # the summary (and so run_summaries) says Meta's sends were stopped, not just planned
    summary = json.loads((run_dir / "outbox" / "summary.json").read_text())["destinations"]
    assert summary["meta_events"]["stopped"] == "kill_switch" and summary["meta_events"]["sent"] == 0
    assert summary["meta_audience"]["stopped"] == "kill_switch" and summary["meta_audience"]["sent_adds"] == 0
    assert (
        "stopped" not in summary["google_conversions"] and "stopped" not in summary["google_customer_match"]
    )
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert 'id="send-stop-meta"' in page and "reason incident" in page
    assert 'id="send-stop-google_ads"' not in page
    with store.engine_for(url) as engine, engine.connect() as conn:
        statuses = dict(
            conn.execute(
                sa.select(store.send_ledger.c.destination, sa.func.count())
                .where(store.send_ledger.c.status == "planned")
                .group_by(store.send_ledger.c.destination)
            ).all()
        )
    assert statuses.get("meta_events", 0) > 0 and "google_conversions" not in statuses  # Meta's wait

    # resumed, a rerun of the interval sends Meta's, and nothing of Google's again
    assert invoke("resume-sending", "-c", str(clinic), "--database", url, "-p", "meta").exit_code == 0
    again = invoke(*base, "--target", "sandbox", "--json")
    assert again.exit_code == 0, again.output
    summary = json.loads(again.stdout)
    assert summary["destinations"]["meta_events"]["accepted"] > 0
    assert "stopped" not in summary["destinations"]["meta_events"]  # the sending attempt replaced it
    # Google's: no request went again; the first attempt's sends are counted as the run's own
    google = summary["destinations"]["google_conversions"]
    assert google["requests"] == 0 and google["already_sent"] == 0
    assert google["finished_by_an_earlier_attempt"] == google["sent"] == google_sent
    assert 'id="send-stop-meta"' not in (run_dir / "report.html").read_text(encoding="utf-8")


def test_the_operator_is_the_accounts_name_not_what_the_environment_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import os
    import pwd

    for variable in ("LOGNAME", "USER", "LNAME", "USERNAME"):
        monkeypatch.setenv(variable, "Jane Patient DOB 1980-01-02")
    assert switches.operator() == pwd.getpwuid(os.geteuid()).pw_name


@pytest.mark.parametrize(
    ("steps", "problem"),
    [
        # a stop deleted by SQL, then the platform stopped again through the switch
        (
            ["stop", "DELETE FROM send_stops", "stop"],
            "the stop of meta in audit record 1 was removed without a resume",
        ),
        # a stop inserted by SQL, then resumed through the switch: the table agrees again
        (
            [
                "INSERT INTO send_stops VALUES ('sunrise-medspa', 'meta', 'other', 'x', '2020-01-01')",
                "resume",
            ],
            "audit record 1 resumes a stop of meta that no audit record made",
        ),
    ],
    ids=["deleted-then-stopped", "inserted-then-resumed"],
)
def test_a_stop_changed_behind_the_switch_stays_visible_after_the_switch_is_used_again(
    clinic: Path, steps: list[str], problem: str
) -> None:
    url = db_url(clinic)
    for step in steps:
        if step in ("stop", "resume"):
            with store.engine_for(url) as engine:
                if step == "stop":
                    switches.stop(engine, CLINIC, ["meta"], reason="incident", by="oncall", at=AT)
                else:
                    switches.resume(engine, CLINIC, ["meta"], by="oncall", at=AT)
        else:
            with sqlite3.connect(clinic.parent / "switch.sqlite") as conn:
                conn.execute(step)
    found = verdict(url)
    assert not found.intact
    assert any(problem in p for p in found.problems), found.problems


def test_the_switch_refuses_a_database_that_does_not_exist_and_names_the_one_it_writes(clinic: Path) -> None:
    typo = clinic.parent / "stagign.sqlite"
    result = invoke("stop-sending", "-c", str(clinic), "--database", f"sqlite:///{typo}", "-p", "all",
                    "--reason", "incident")  # fmt: skip
    assert result.exit_code == 2 and "no SQLite file" in result.output
    assert not typo.exists()  # not made: a stop there would stop nothing
    result = invoke("stop-sending", "-c", str(clinic), "--database", db_url(clinic), "-p", "meta",
                    "--reason", "incident")  # fmt: skip
    assert result.exit_code == 0 and f"staging database: {db_url(clinic)}" in result.output
    again = invoke("stop-sending", "-c", str(clinic), "--database", db_url(clinic), "-p", "meta",
                   "--reason", "other")  # fmt: skip
    assert (
        again.exit_code == 0
        and "meta: already stopped since" in again.output
        and "that stop is kept" in again.output
    )


def test_a_locked_database_is_one_clear_error_and_changes_nothing(
    clinic: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def short_wait(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.execute("PRAGMA journal_mode=WAL")
        dbapi_conn.execute("PRAGMA busy_timeout=200")

    monkeypatch.setattr(store, "_sqlite_pragmas", short_wait)
    holder = sqlite3.connect(clinic.parent / "switch.sqlite", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # a staging load holding the write lock
    try:
        for argv in (["stop-sending", "--reason", "incident"], ["resume-sending"]):
            result = invoke(argv[0], "-c", str(clinic), "--database", db_url(clinic), "-p", "meta", *argv[1:])
            assert result.exit_code == 7, result.output
            assert (
                "the staging database refused it" in result.output and "nothing was changed" in result.output
            )
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    with store.engine_for(db_url(clinic)) as engine:
        assert switches.stopped(engine, CLINIC) == {}


def test_the_switch_never_prints_a_password_given_in_the_database_urls_query(clinic: Path) -> None:
    # SQLAlchemy hides only a URL's user:password part; a --database or MEDSPA_DATABASE_URL may
    # carry ?password= (psycopg2 honours it), and the switch printed it in clear
    url = f"{db_url(clinic)}?password=qzvxSECRET"
    result = invoke(
        "stop-sending", "-c", str(clinic), "--database", url, "-p", "meta", "--reason", "incident"
    )
    assert result.exit_code == 0 and "staging database: " in result.output
    assert "qzvxSECRET" not in result.output
