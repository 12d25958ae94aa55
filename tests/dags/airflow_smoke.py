"""Smoke test of a real Airflow deployment on this machine (issue #6, ``docs/airflow.md``).

Starts ``airflow api-server``, ``scheduler`` (LocalExecutor, ``AIRFLOW__CORE__PARALLELISM=4``)
and ``dag-processor`` as separate processes on loopback, in a throwaway AIRFLOW_HOME with SQLite
metadata and a copy of the demo clinic; then, through the REST API v2 (SimpleAuthManager token
from ``POST /auth/token``), unpauses the demo DAG, triggers one nightly run, waits for it and
reads the run's and every task's state back. With ``--backfill FROM TO`` it also runs
``airflow backfill create`` over those dates and waits for the backfill's runs.

Bounded: one deadline for the whole script (``--timeout``). Every process it starts is ended
by its PID (its own process group, SIGTERM then SIGKILL), on success, failure, or a signal.
Prints one JSON document (states and counts, never PHI) and exits 0 only if every run succeeded.
``scripts/airflow_smoke`` runs this file with the project's virtualenv.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any
from urllib.parse import quote

REPO = Path(__file__).resolve().parents[2]
DEMO_CLINIC = REPO / "clinics" / "demo"
DAG_ID = "medspa_conversions__sunrise-medspa"
LOGICAL_DATE = "2026-11-23T12:00:00+00:00"  # the interval [2026-11-22 03:00, 2026-11-23 03:00) PT
TERMINAL = {"success", "failed"}


class SmokeFailed(Exception):
    """The deployment did not do what the smoke test expects (message says what)."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.until = time.monotonic() + seconds

    def left(self) -> float:
        return self.until - time.monotonic()

    def check(self, what: str) -> None:
        if self.left() <= 0:
            raise SmokeFailed(f"timed out waiting for {what}")


class Processes:
    """The processes this script started, each in its own session, ended by PID."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("wb")
        proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
        log.close()
        self.started.append((name, proc))
        return proc

    def check_alive(self) -> None:
        for name, proc in self.started:
            if proc.poll() is not None:
                raise SmokeFailed(f"{name} exited early with code {proc.returncode}")

    def stop_all(self, grace: float = 20.0) -> dict[str, int | None]:
        for _, proc in self.started:
            _signal_group(proc.pid, signal.SIGTERM)
        until = time.monotonic() + grace
        for _, proc in self.started:
            with suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, until - time.monotonic()))
        codes: dict[str, int | None] = {}
        for name, proc in self.started:
            # children of a process (uvicorn, executor workers) are in its group: end them too
            _signal_group(proc.pid, signal.SIGKILL)
            if proc.poll() is None:
                proc.wait(timeout=10)
            codes[name] = proc.returncode
        return codes


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError):
        os.killpg(pgid, sig)


class Api:
    """A tiny REST API v2 client with a bearer token (loopback only)."""

    def __init__(self, base: str) -> None:
        assert base.startswith("http://127.0.0.1:"), "the smoke test talks to loopback only"
        self.base = base
        self.token: str | None = None

    def call(self, method: str, path: str, body: Any = None, *, ok: tuple[int, ...] = (200,)) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=15) as response:
                status, text = response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            status, text = exc.code, exc.read().decode(errors="replace")
        if status not in ok:
            raise SmokeFailed(f"{method} {path}: HTTP {status}: {text[:300]}")
        return json.loads(text) if text else None

    def wait_until_up(self, deadline: Deadline, procs: Processes) -> None:
        while True:
            deadline.check("the api-server")
            procs.check_alive()
            try:
                self.call("GET", "/api/v2/monitor/health")
                return
            except (SmokeFailed, OSError):
                time.sleep(1)

    def login(self, username: str, password: str) -> None:
        answer = self.call("POST", "/auth/token", {"username": username, "password": password}, ok=(200, 201))
        self.token = answer["access_token"]


def _environment(home: Path, clinics: Path, port: int, password_file: Path) -> dict[str, str]:
    env = dict(os.environ)
    venv_bin = str(Path(sys.executable).parent)
    env.update({
        "PATH": venv_bin + os.pathsep + env.get("PATH", ""),
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "smoke:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(password_file),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
        # the only runs are the ones this script asks for (no nightly run appears on unpause)
        "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(_free_port()),
        "MEDSPA_CLINICS_DIR": str(clinics),
        "MEDSPA_DEFAULT_TARGET": "sandbox",
    })  # fmt: skip
    for name in ("MEDSPA_ID_SECRET", "MEDSPA_DATABASE_URL", "MEDSPA_ALERT_WEBHOOK", "MEDSPA_ALERT_EMAIL"):
        env.pop(name, None)
    return env


def _wait_for_run(api: Api, run_id: str, deadline: Deadline, procs: Processes) -> dict[str, Any]:
    path = f"/api/v2/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}"
    while True:
        deadline.check(f"run {run_id}")
        procs.check_alive()
        run = api.call("GET", path)
        if run["state"] in TERMINAL:
            return dict(run)
        time.sleep(2)


def _task_states(api: Api, run_id: str) -> dict[str, str | None]:
    path = f"/api/v2/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}/taskInstances"
    answer = api.call("GET", path)
    return {ti["task_id"]: ti["state"] for ti in answer["task_instances"]}


def _report_xcom(api: Api, run_id: str) -> Any:
    path = (f"/api/v2/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}"
            "/taskInstances/report/xcomEntries/return_value")  # fmt: skip
    return api.call("GET", path)["value"]


def _staging_counts(clinics: Path) -> dict[str, Any]:
    """Send-ledger rows per destination and what each recorded run sent (nothing if none ran)."""
    database = clinics / "demo" / "var" / "sunrise-medspa.sqlite"
    if not database.exists():
        return {"ledger": {}, "runs": []}
    with sqlite3.connect(database) as conn:
        ledger = conn.execute("SELECT destination, COUNT(*) FROM send_ledger GROUP BY destination").fetchall()
        summaries = conn.execute("SELECT summary FROM run_summaries ORDER BY recorded_at").fetchall()
    runs = []
    for (text,) in summaries:
        summary = json.loads(text)
        runs.append({"run_id": summary["run_id"], "dry_run": summary["dry_run"],
                     "sent": {d: c.get("sent") for d, c in summary["destinations"].items() if "sent" in c},
                     "already_sent": {d: c.get("already_sent") for d, c in summary["destinations"].items()
                                      if "already_sent" in c}})  # fmt: skip
    return {"ledger": {dest: int(n) for dest, n in ledger}, "runs": runs}


@contextmanager
def _ended_on_signals(procs: Processes) -> Iterator[None]:
    def handler(signum: int, _frame: Any) -> None:
        raise SmokeFailed(f"stopped by signal {signum}")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_smoke(timeout: float, backfill: tuple[str, str] | None, keep: bool) -> dict[str, Any]:
    deadline = Deadline(timeout)
    work = Path(tempfile.mkdtemp(prefix="medspa-airflow-smoke-"))
    home, clinics, logs = work / "airflow", work / "clinics", work / "logs"
    for folder in (home, clinics, logs):
        folder.mkdir()
    shutil.copytree(DEMO_CLINIC, clinics / "demo", ignore=shutil.ignore_patterns("var"))
    password = secrets.token_urlsafe(16)
    password_file = work / "passwords.json"
    password_file.write_text(json.dumps({"smoke": password}))
    port = _free_port()
    env = _environment(home, clinics, port, password_file)
    airflow = str(Path(sys.executable).parent / "airflow")
    procs = Processes(logs)
    result: dict[str, Any] = {"work_dir": str(work), "dag_id": DAG_ID}
    began = time.monotonic()
    try:
        with _ended_on_signals(procs):
            migrate = subprocess.run([airflow, "db", "migrate"], env=env, cwd=REPO, capture_output=True,
                                     timeout=max(10.0, deadline.left()), check=False)  # fmt: skip
            if migrate.returncode != 0:
                raise SmokeFailed("airflow db migrate failed: " + migrate.stderr.decode()[-500:])
            procs.start("api-server", [airflow, "api-server", "--host", "127.0.0.1", "--port", str(port),
                                       "--workers", "1"], env)  # fmt: skip
            procs.start("scheduler", [airflow, "scheduler", "--skip-serve-logs"], env)
            procs.start("dag-processor", [airflow, "dag-processor"], env)
            result["pids"] = {name: proc.pid for name, proc in procs.started}
            api = Api(f"http://127.0.0.1:{port}")
            api.wait_until_up(deadline, procs)
            api.login("smoke", password)
            while api.call("GET", f"/api/v2/dags/{DAG_ID}", ok=(200, 404)).get("dag_id") != DAG_ID:
                deadline.check("the dag-processor to register the demo DAG")
                procs.check_alive()
                time.sleep(2)
            api.call("PATCH", f"/api/v2/dags/{DAG_ID}", {"is_paused": False})
            run_id = f"smoke__{int(time.time())}"
            api.call("POST", f"/api/v2/dags/{DAG_ID}/dagRuns",
                     {"dag_run_id": run_id, "logical_date": LOGICAL_DATE, "conf": {"target": "sandbox"}})  # fmt: skip
            run = _wait_for_run(api, run_id, deadline, procs)
            result["run"] = {k: run.get(k) for k in ("dag_run_id", "state", "run_type", "logical_date",
                                                      "data_interval_start", "data_interval_end")}  # fmt: skip
            result["tasks"] = _task_states(api, run_id)
            result["report"] = _report_xcom(api, run_id) if run["state"] == "success" else None
            if backfill is not None:
                result["backfill"] = _run_backfill(api, airflow, env, backfill, deadline, procs)
            result["staging"] = _staging_counts(clinics)
    except SmokeFailed as exc:
        result["error"] = str(exc)
    except Exception as exc:  # report it like a failed check; the processes still get ended
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        result["exit_codes"] = procs.stop_all()
        result["seconds"] = round(time.monotonic() - began, 1)
        if keep or "error" in result:
            result["logs"] = str(logs)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return result


BACKFILL_ATTEMPTS = 3


def _error_lines(stderr: str) -> str:
    """The exception lines of a CLI's stderr and its tail: the tail alone can be the middle of a
    long SQL statement, without the error's name."""
    named = [line.strip() for line in stderr.splitlines() if "Error" in line.split(":", 1)[0]]
    return " | ".join([*named[-3:], stderr[-300:]])


def create_backfill(argv: list[str], env: dict[str, str], deadline: Deadline, pause: float = 3.0) -> int:
    """Run ``airflow backfill create``; returns the attempts it took.

    The CLI writes Airflow's SQLite metadata database while the scheduler and the api-server do
    too: on a loaded machine its insert can outwait SQLite's busy timeout (an OperationalError,
    rolled back whole). That, and only that, is tried again.
    """
    for attempt in range(1, BACKFILL_ATTEMPTS + 1):
        created = subprocess.run(argv, env=env, cwd=REPO, capture_output=True,
                                 timeout=max(10.0, deadline.left()), check=False)  # fmt: skip
        if created.returncode == 0:
            return attempt
        stderr = created.stderr.decode()
        if "OperationalError" not in stderr or attempt == BACKFILL_ATTEMPTS:
            raise SmokeFailed(f"airflow backfill create failed (attempt {attempt}): {_error_lines(stderr)}")
        time.sleep(pause)
    raise AssertionError("unreachable")


def _run_backfill(api: Api, airflow: str, env: dict[str, str], dates: tuple[str, str],
                  deadline: Deadline, procs: Processes) -> dict[str, Any]:  # fmt: skip
    """``airflow backfill create`` for [from, to]; wait for its runs through the REST API."""
    argv = [airflow, "backfill", "create", "--dag-id", DAG_ID, "--from-date", dates[0], "--to-date", dates[1],
            "--max-active-runs", "1", "--reprocess-behavior", "completed", "--dag-run-conf", json.dumps({"target": "sandbox"})]  # fmt: skip
    create_backfill(argv, env, deadline)
    while True:
        deadline.check("the backfill runs")
        procs.check_alive()
        runs = api.call("GET", f"/api/v2/dags/{DAG_ID}/dagRuns?run_type=backfill&limit=100")["dag_runs"]
        if runs and all(r["state"] in TERMINAL for r in runs):
            break
        time.sleep(3)
    return {r["dag_run_id"]: {"state": r["state"], "data_interval_start": r["data_interval_start"],
                              "data_interval_end": r["data_interval_end"]} for r in runs}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timeout", type=float, default=480.0, help="Seconds for the whole smoke test.")
    parser.add_argument("--backfill", nargs=2, metavar=("FROM", "TO"),
                        help="Also run `airflow backfill create` over these dates (YYYY-MM-DD).")  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="Keep the work folder (logs, staging DB).")
    args = parser.parse_args()
    result = run_smoke(args.timeout, tuple(args.backfill) if args.backfill else None, args.keep)
    print(json.dumps(result, indent=2, sort_keys=True))
    runs = [result.get("run", {}), *result.get("backfill", {}).values()]
    ok = "error" not in result and all(r.get("state") == "success" for r in runs)
    # every task succeeded, except the watcher, which is skipped when no send failed
    tasks = dict(result.get("tasks", {}))
    ok = ok and tasks.pop("sends_failed", "skipped") == "skipped"
    ok = ok and all(state == "success" for state in tasks.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
