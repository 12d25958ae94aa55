"""Parse-time contract of ``dags/`` (STYLE items 1, 5 and 9; issue #6 acceptance).

Each parse runs in a fresh interpreter (``parse_probe.py``) so the counts are honest: every DAG
file imports without errors, with zero SQL statements on any engine, zero connection or variable
lookups, no file opened but clinic YAMLs and time-zone data, and no pandas/GX/etl.tasks import.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from etl import airflow_support as support
from tests.dags.conftest import DAG_ID, DEMO_CLINIC, REPO, airflow_env, run

PROBE = Path(__file__).with_name("parse_probe.py")
TIMETABLE = "airflow.sdk.definitions.timetables.interval.CronDataIntervalTimetable"
EDGES = [
    ["build_conversions", "validate_outbound"],
    ["extract", "build_conversions"],  # the extract counts travel to summary.json via XCom
    ["extract", "stage"],
    ["stage", "validate_inputs"],
    ["sync_suppression", "report"],
    ["sync_suppression", "sends_failed"],
    ["upload_google", "report"],
    ["upload_google", "sends_failed"],
    ["upload_meta", "report"],
    ["upload_meta", "sends_failed"],
    ["validate_inputs", "build_conversions"],
    ["validate_outbound", "report"],
    ["validate_outbound", "sync_suppression"],
    ["validate_outbound", "upload_google"],
    ["validate_outbound", "upload_meta"],
]


def probe(tmp_path: Path, dags: Path, *clinics: Path) -> list[dict[str, Any]]:
    out = tmp_path / "probe.json"
    done = run(
        [sys.executable, str(PROBE), str(out), str(dags), *map(str, clinics)], airflow_env(), timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return list(json.loads(out.read_text(encoding="utf-8")))


@pytest.fixture(scope="module")
def parses(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Two parses of dags/: the repository's clinics/, then three YAMLs (two clinics, one broken)."""
    tmp = tmp_path_factory.mktemp("parse")
    many = tmp / "clinics"
    shutil.copytree(DEMO_CLINIC, many / "demo", ignore=shutil.ignore_patterns("var"))
    text = (DEMO_CLINIC / "clinic.yaml").read_text(encoding="utf-8")
    (many / "east.yaml").write_text(
        text.replace("clinic_id: sunrise-medspa", "clinic_id: east-side")
        .replace("timezone: America/Los_Angeles", "timezone: America/New_York")
        .replace("sources:", 'schedule: "30 4 * * 1-5"\nsources:', 1),
        encoding="utf-8",
    )
    (many / "broken.yaml").write_text(text.replace("timezone: America/Los_Angeles", "timezone: Mars/Olympus"))
    return probe(tmp, REPO / "dags", REPO / "clinics", many)


def test_every_dag_file_imports_without_errors_or_warnings(parses: list[dict[str, Any]]) -> None:
    repo = parses[0]
    assert repo["import_errors"] == {}
    assert repo["warnings"] == []
    assert list(repo["dags"]) == [DAG_ID]


def test_parsing_does_no_database_query_no_lookup_and_no_heavy_import(parses: list[dict[str, Any]]) -> None:
    for parse in parses:
        assert parse["sql_statements"] == []
        assert parse["lookups"] == []
        assert parse["heavy_modules"] == []
        for path in parse["opened"]:
            assert path.endswith((".yaml", ".yml")) or "zoneinfo" in path or "tzdata" in path, path


def test_nightly_dag_shape(parses: list[dict[str, Any]]) -> None:
    dag = parses[0]["dags"][DAG_ID]
    assert dag["timetable"] == TIMETABLE
    assert (dag["expression"], dag["timezone"]) == ("0 3 * * *", "America/Los_Angeles")
    assert dag["max_active_runs"] == 1
    assert dag["catchup"] is False
    assert dag["params"] == {"dry_run": False, "target": "sandbox", "new_database": False}
    assert sorted(dag["params"]) == sorted(support.PARAM_NAMES)  # what the tasks accept
    assert dag["edges"] == EDGES
    assert dag["has_failure_callback"] is True and dag["watcher_alerts"] is False
    # every step retries (our own errors fail at once, see _fail_without_retry); the watcher not
    assert {t for t, n in dag["retries"].items() if not n} == {"sends_failed"}
    assert dag["retries"]["extract"] == dag["retries"]["upload_google"] == 3
    # a backfill's runs are not bound by max_active_runs: the sending tasks never overlap
    assert dag["one_at_a_time"] == ["sync_suppression", "upload_google", "upload_meta"]
    assert dag["trigger_rules"]["report"] == "TriggerRule.ALL_DONE"
    assert dag["trigger_rules"]["sync_suppression"] == "TriggerRule.ALL_SUCCESS"
    assert dag["trigger_rules"]["sends_failed"] == "TriggerRule.ONE_FAILED"


def test_one_dag_per_clinic_yaml_and_a_broken_yaml_is_skipped_with_a_warning(
    parses: list[dict[str, Any]],
) -> None:
    many = parses[1]
    assert many["import_errors"] == {}
    assert sorted(many["dags"]) == ["medspa_conversions__east-side", DAG_ID]
    east = many["dags"]["medspa_conversions__east-side"]
    assert (east["timetable"], east["expression"], east["timezone"]) == (
        TIMETABLE,
        "30 4 * * 1-5",
        "America/New_York",
    )
    assert len(many["warnings"]) == 1
    assert "broken.yaml" in many["warnings"][0] and "timezone" in many["warnings"][0]
    assert "Mars" not in many["warnings"][0]  # key paths, never values


def test_the_probe_sees_a_dag_file_that_works_at_parse_time(tmp_path: Path) -> None:
    """The counters are not vacuous: a DAG file that queries, looks up and imports pandas is caught."""
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "bad_dag.py").write_text(
        "import pandas\n"
        "from sqlalchemy import text\n"
        "from airflow import settings\n"
        "from airflow.sdk import DAG, Variable\n"
        "with settings.engine.connect() as conn:\n"
        "    conn.execute(text('SELECT 1'))\n"
        "try:\n"
        "    Variable.get('medspa_id_secret')\n"
        "except RuntimeError:\n"
        "    pass\n"
        "open(__file__.replace('bad_dag.py', 'notes.txt')).read()\n"
        "with DAG('bad_dag', schedule=None):\n"
        "    pass\n",
        encoding="utf-8",
    )
    (dags / "notes.txt").write_text("x", encoding="utf-8")
    [parse] = probe(tmp_path, dags, REPO / "clinics")
    assert parse["sql_statements"] == ["SELECT 1"]
    assert parse["lookups"] == ["sdk.Variable.get"]
    assert "pandas" in parse["heavy_modules"]
    assert str(dags / "notes.txt") in parse["opened"]
