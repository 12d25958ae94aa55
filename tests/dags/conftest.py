"""Airflow fixtures: one throwaway AIRFLOW_HOME per session, set before anything imports Airflow.

Airflow reads its configuration once, at import, so the environment is set when this file is
collected: SQLite metadata in a temporary folder, no example DAGs, ``dags/`` of this repository.
``airflow db migrate`` (about 7 s) runs once per session, only for the tests that need it.
Every run works on a copy of the demo clinic (its staging database and runs live beside the YAML).
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEMO_CLINIC = REPO / "clinics" / "demo"
DAG_ID = "medspa_conversions__sunrise-medspa"
AIRFLOW = str(Path(sys.executable).parent / "airflow")

_HOME = Path(tempfile.mkdtemp(prefix="medspa-airflow-tests-"))
atexit.register(shutil.rmtree, _HOME, True)
AIRFLOW_ENV = {
    "AIRFLOW_HOME": str(_HOME),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
}
os.environ.update(AIRFLOW_ENV)


def airflow_env(clinics: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment of an Airflow subprocess: this session's home, the given clinics folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEDSPA_", "PYTEST_"))}
    env.update(AIRFLOW_ENV)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    if clinics is not None:
        env["MEDSPA_CLINICS_DIR"] = str(clinics)
    env.update(extra)
    return env


def run(argv: list[str], env: Mapping[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, env=dict(env), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, check=False)  # fmt: skip


@pytest.fixture(scope="session")
def migrated_home() -> Path:
    """This session's AIRFLOW_HOME with the metadata database migrated."""
    done = run([AIRFLOW, "db", "migrate"], airflow_env(), timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return _HOME


@pytest.fixture
def demo_clinics(tmp_path: Path) -> Path:
    """A clinics folder holding a fresh copy of the demo clinic (no staging DB, no runs yet)."""
    root = tmp_path / "clinics"
    shutil.copytree(DEMO_CLINIC, root / "demo", ignore=shutil.ignore_patterns("var"))
    return root
