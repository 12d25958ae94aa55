"""``scripts/airflow_smoke`` on a real deployment: api-server, scheduler, dag-processor (issue #6).

Runs in CI by default (marked ``slow`` only so it can be deselected locally with ``-m "not slow"``):
a triggered nightly run and a one-interval ``airflow backfill create``, both read back through the
REST API, then the staging ledger; afterwards no process the script started is left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from tests.dags.conftest import REPO

pytestmark = pytest.mark.slow


def test_smoke_script_triggers_and_backfills_the_demo_dag_then_cleans_up() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MEDSPA_"))}
    done = subprocess.run(
        [
            str(REPO / "scripts" / "airflow_smoke"),
            "--timeout",
            "420",
            "--backfill",
            "2026-11-20",
            "2026-11-21",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=480,
        check=False,
    )
    assert done.stdout.strip(), done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert done.returncode == 0, json.dumps({k: v for k, v in result.items() if k != "report"})[:3000]

    assert result["run"]["state"] == "success"
    assert result["run"]["data_interval_start"].startswith("2026-11-22T11:00:00")
    assert result["tasks"].pop("sends_failed") == "skipped"  # the watcher: no send failed
    assert set(result["tasks"].values()) == {"success"} and len(result["tasks"]) == 9
    assert result["report"]["counts"]["destinations"]["google_conversions"]["sent"] > 0
    [backfill] = result["backfill"].values()
    assert backfill["state"] == "success"
    assert backfill["data_interval_start"].startswith("2026-11-20T11:00:00")

    staging = result["staging"]
    assert len(staging["runs"]) == 2
    for dest in ("google_conversions", "meta_events"):
        assert staging["ledger"][dest] == sum(run["sent"][dest] for run in staging["runs"])

    # every process the script started (and its children) is gone
    for name, pgid in result["pids"].items():
        with pytest.raises(ProcessLookupError):
            os.killpg(pgid, 0)
        assert result["exit_codes"][name] is not None


def _fake_cli(tmp_path: Any, failures: list[str]) -> list[str]:
    """A stand-in for `airflow backfill create` that fails with each given stderr in turn, then
    succeeds; what the smoke script's retry is judged on without a deployment."""
    state = tmp_path / "calls"
    script = tmp_path / "fake_airflow.py"
    script.write_text(
        "import json, sys, pathlib\n"
        f"state = pathlib.Path({str(state)!r})\n"
        "n = int(state.read_text()) if state.exists() else 0\n"
        "state.write_text(str(n + 1))\n"
        f"failures = {json.dumps(failures)}\n"
        "if n < len(failures):\n"
        "    sys.stderr.write(failures[n]); sys.exit(1)\n"
    )
    return [sys.executable, str(script)]


def test_a_backfill_create_that_hit_a_locked_metadata_database_is_tried_again_and_others_are_not(
    tmp_path: Any,
) -> None:
    from tests.dags import airflow_smoke as smoke

    locked = "Traceback ...\nsqlalchemy.exc.OperationalError: (sqlite3.OperationalError) database is locked\n[SQL: ...]"
    (tmp_path / "a").mkdir()
    argv = _fake_cli(tmp_path / "a", [locked])
    assert smoke.create_backfill(argv, dict(os.environ), smoke.Deadline(60), pause=0) == 2

    (tmp_path / "b").mkdir()
    refused = _fake_cli(tmp_path / "b", ["ValueError: Another backfill is running for this DAG\n"])
    with pytest.raises(smoke.SmokeFailed, match=r"attempt 1\): ValueError: Another backfill is running"):
        smoke.create_backfill(refused, dict(os.environ), smoke.Deadline(60), pause=0)

    (tmp_path / "c").mkdir()
    always = _fake_cli(tmp_path / "c", [locked] * smoke.BACKFILL_ATTEMPTS)
    with pytest.raises(
        smoke.SmokeFailed, match=rf"attempt {smoke.BACKFILL_ATTEMPTS}\): sqlalchemy\.exc\.OperationalError"
    ):
        smoke.create_backfill(always, dict(os.environ), smoke.Deadline(60), pause=0)
