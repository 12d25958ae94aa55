"""The demo clinic's DAG run end to end against the sandboxes (issue #6 acceptance).

``airflow dags test`` runs the nightly interval and we read the outcome where it is recorded:
the staging database's send ledger and run summaries, the run's summary.json and HTML report,
Airflow's metadata database (task states, XComs). The backfill test runs overlapping intervals
through the DAG (``dag.test()`` per logical date, in one process) and shows nothing is sent twice:
each task process starts its own in-memory sandbox, so "sent" is counted by our ledger and the
per-run summaries, which is also what proves it against the real platforms.
"""

from __future__ import annotations

import csv
import json
import re
import sqlite3
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from tests.dags.conftest import AIRFLOW, DAG_ID, airflow_env, run

pytestmark = pytest.mark.slow
RUNNER = Path(__file__).with_name("run_dag.py")
CONVERSIONS = ("google_conversions", "meta_events")
NIGHTLY = "2026-11-23T12:00:00+00:00"  # interval [2026-11-22 03:00, 2026-11-23 03:00) Los Angeles
NIGHT_BEFORE = "2026-11-22T12:00:00+00:00"  # [2026-11-21 03:00, 2026-11-22 03:00): late arrivals overlap


def staging(clinics: Path) -> sqlite3.Connection:
    return sqlite3.connect(clinics / "demo" / "var" / "sunrise-medspa.sqlite")


def ledger_counts(clinics: Path) -> dict[tuple[str, str], int]:
    with staging(clinics) as conn:
        rows = conn.execute("SELECT destination, status, COUNT(*) FROM send_ledger GROUP BY 1, 2").fetchall()
    return {(dest, status): n for dest, status, n in rows}


def recorded_summaries(clinics: Path) -> list[dict[str, Any]]:
    with staging(clinics) as conn:
        rows = conn.execute("SELECT summary FROM run_summaries ORDER BY recorded_at").fetchall()
    return [json.loads(text) for (text,) in rows]


def raw_identifiers(clinics: Path) -> set[str]:
    """Emails and phone numbers of the synthetic exports: none may appear in a log or an XCom."""
    found: set[str] = set()
    for name in ("leads.csv", "appointments.csv"):
        with (clinics / "demo" / "exports" / name).open(encoding="utf-8", newline="") as handle:
            for row in csv.DictReader(handle):
                found.update(v for k, v in row.items() if k in ("email", "phone") and v and len(v) >= 7)
    return found


def string_leaves(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for item in value.values():
            yield from string_leaves(item)
    elif isinstance(value, list):
        for item in value:
            yield from string_leaves(item)
    elif isinstance(value, str):
        yield value


def leaked(identifiers: set[str], texts: list[str]) -> list[str]:
    """The identifiers found in the texts; a digits-only phone counts as a whole number only
    (so a timestamp or a port that happens to contain its digits is no false alarm)."""
    numbers = {n for text in texts for n in re.findall(r"\d+", text)}
    found = [v for v in identifiers if v.isdigit() and v in numbers]
    return found + [v for v in identifiers if not v.isdigit() and any(v in text for text in texts)]


def test_dags_test_runs_the_nightly_interval_against_the_sandboxes(
    migrated_home: Path, demo_clinics: Path
) -> None:
    done = run([AIRFLOW, "dags", "test", DAG_ID, NIGHTLY], airflow_env(demo_clinics), timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    with sqlite3.connect(migrated_home / "airflow.db") as meta:
        run_id, start, end = meta.execute(
            "SELECT run_id, data_interval_start, data_interval_end FROM dag_run WHERE dag_id = ? "
            "ORDER BY id DESC LIMIT 1",
            (DAG_ID,),
        ).fetchone()
        states = dict(meta.execute("SELECT task_id, state FROM task_instance WHERE run_id = ?", (run_id,)))
        xcoms = dict(meta.execute("SELECT task_id, value FROM xcom WHERE run_id = ?", (run_id,)))
    assert (start[:19], end[:19]) == ("2026-11-22 11:00:00", "2026-11-23 11:00:00")
    assert states.pop("sends_failed") == "skipped"  # the watcher: no send failed
    assert states == {task: "success" for task in states} and len(states) == 9

    summaries = recorded_summaries(demo_clinics)
    assert len(summaries) == 1
    summary = summaries[0]
    assert (summary["start"], summary["end"]) == ("2026-11-22T03:00:00-08:00", "2026-11-23T03:00:00-08:00")
    assert (summary["dry_run"], summary["target"]) == (False, "sandbox")
    outbox = demo_clinics / "demo" / "var" / "runs" / summary["run_id"] / "outbox"
    assert json.loads((outbox / "summary.json").read_text(encoding="utf-8")) == summary

    ledger = ledger_counts(demo_clinics)
    for dest in CONVERSIONS:
        counts = summary["destinations"][dest]
        assert counts["sent"] > 0
        assert counts["sent"] == counts["accepted"] == ledger[(dest, "accepted")]
        assert sum(n for (d, _), n in ledger.items() if d == dest) == counts["sent"]
    for dest in ("google_customer_match", "meta_audience"):
        assert summary["destinations"][dest]["sent_adds"] > 0

    report = json.loads(xcoms["report"])
    # the audit chain's head, kept apart from the database for `verify-audit --head`
    head = report["audit_head"]
    assert head["seq"] >= 1 and re.fullmatch(r"[0-9a-f]{64}", head["sha256"])
    # XComs carry counts and paths only: every string in them is the run id, a path, the target,
    # the name of a data-quality check ("suite.check") or that head
    for task, raw in xcoms.items():
        for text in string_leaves(json.loads(raw)):
            assert (
                text in (summary["run_id"], "sandbox", head["sha256"])
                or text.startswith(str(demo_clinics))
                or re.fullmatch(r"[a-z0-9_]+\.[a-z0-9_]+", text)
            ), (task, text)
    assert report["counts"]["destinations"] == summary["destinations"]
    assert Path(report["outbox"]) == outbox
    if "report" in report:
        assert Path(report["report"]).is_file()
    # counts and paths only: no raw identifier in any XCom, the task logs or the command's output
    leaks = raw_identifiers(demo_clinics)
    texts = [*xcoms.values(), done.stdout, done.stderr]
    texts += [p.read_text(errors="replace") for p in (migrated_home / "logs").rglob("*") if p.is_file()]
    assert leaked(leaks, texts) == []


class Webhook(BaseHTTPRequestHandler):
    received: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Webhook.received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def webhook() -> Iterator[str]:
    server = HTTPServer(("127.0.0.1", 0), Webhook)
    Webhook.received = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/alerts"
    finally:
        server.shutdown()
        server.server_close()


def test_backfill_of_overlapping_intervals_sends_nothing_twice(
    migrated_home: Path, demo_clinics: Path, tmp_path: Path, webhook: str
) -> None:
    """Dry run, two consecutive nights (their late-arrival windows overlap), the first night again
    (a backfill with --reprocess-behavior completed), then a live run without a secret, which must
    refuse and alert."""
    requests = [
        {"logical_date": NIGHT_BEFORE, "conf": {"dry_run": True}},
        {"logical_date": NIGHT_BEFORE},
        {"logical_date": NIGHTLY},
        {"logical_date": NIGHT_BEFORE},
        {"logical_date": "2026-11-21T12:00:00+00:00", "conf": {"target": "live"}},
    ]
    (tmp_path / "requests.json").write_text(json.dumps(requests), encoding="utf-8")
    out = tmp_path / "runs.json"
    env = airflow_env(demo_clinics, MEDSPA_ALERT_WEBHOOK=webhook)
    done = run(
        [sys.executable, str(RUNNER), str(tmp_path / "requests.json"), str(out), DAG_ID], env, timeout=420
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    runs = json.loads(out.read_text(encoding="utf-8"))

    assert [r["state"] for r in runs] == ["success"] * 4 + ["failed"]
    dry = runs[0]["tasks"]
    assert {t: dry[t] for t in ("upload_google", "upload_meta", "sync_suppression")} == dict.fromkeys(
        ("upload_google", "upload_meta", "sync_suppression"), "skipped"
    )
    assert dry["report"] == "success"

    summaries = recorded_summaries(demo_clinics)
    assert [s["dry_run"] for s in summaries] == [True, False, False, False]
    # the dry run works under a run id and folder of its own: the real run of that night then
    # owns its files (a dry run after it no longer replaces what says what was sent)
    assert summaries[0]["run_id"] == summaries[1]["run_id"] + "__dry-run"
    assert summaries[1]["run_id"] == summaries[3]["run_id"] != summaries[2]["run_id"]
    ledger = ledger_counts(demo_clinics)
    for dest in CONVERSIONS:
        sent = [s["destinations"][dest]["sent"] for s in summaries]
        already = [s["destinations"][dest]["already_sent"] for s in summaries]
        assert sent[0] == 0 and sent[1] > 0
        assert already[2] > 0, "the second night must see conversions the first one sent"
        # the first night again is the same run: its first attempt's sends are its own, and no
        # request went (a rerun's summary still says what the run sent)
        again = summaries[3]["destinations"][dest]
        assert again["requests"] == 0 and again.get("finished_by_an_earlier_attempt") == sent[3] == sent[1]
        assert already[3] + sent[3] == summaries[1]["destinations"][dest]["planned"]
        # every send is one ledger row, and every ledger row is one send: nothing went twice
        # (the latest summary of each run counts its sends once)
        latest = {s["run_id"]: s["destinations"][dest]["sent"] for s in summaries}
        assert sum(latest.values()) == sum(n for (d, _), n in ledger.items() if d == dest)
        assert ledger[(dest, "accepted")] == sum(latest.values())

    # the live run refused the public development key before planning anything, and alerted
    live = runs[4]["tasks"]
    assert live["build_conversions"] == "failed" and live["upload_google"] == "upstream_failed"
    [alert] = Webhook.received
    assert alert["task_id"] == "build_conversions" and alert["dag_id"] == DAG_ID
    assert alert["error"]["type"] == "ConfigError" and "MEDSPA_ID_SECRET" in alert["error"]["message"]
    assert alert["counts"]["extract"]["appointments_rows"] > 0 and "stage" in alert["counts"]
    assert alert["run_url"].startswith("http") and "/dags/" + DAG_ID + "/runs/" in alert["run_url"]
    text = json.dumps(alert)
    assert leaked(raw_identifiers(demo_clinics), [text]) == []


def test_one_platform_refusing_holds_back_neither_the_other_nor_the_lists(
    migrated_home: Path, demo_clinics: Path, tmp_path: Path, webhook: str
) -> None:
    """Google refuses the account (a conversion action of another customer, Google Ads API):
    Meta's conversions still go, both lists still sync (a revoked patient leaves at the next
    sync, SPEC rule 6), and the run still gets its summary and report; the run fails and alerts."""
    yaml_path = demo_clinics / "demo" / "clinic.yaml"
    text = yaml_path.read_text(encoding="utf-8")
    text = text.replace("customers/1234567890/conversionActions/", "customers/9999999999/conversionActions/")
    yaml_path.write_text(text.replace("click_window_days: 90", "click_window_days: 90\n  api: google_ads"))
    requests = [{"logical_date": NIGHTLY}]
    (tmp_path / "requests.json").write_text(json.dumps(requests), encoding="utf-8")
    out = tmp_path / "runs.json"
    env = airflow_env(demo_clinics, MEDSPA_ALERT_WEBHOOK=webhook)
    done = run(
        [sys.executable, str(RUNNER), str(tmp_path / "requests.json"), str(out), DAG_ID], env, timeout=300
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    (only,) = json.loads(out.read_text(encoding="utf-8"))

    assert only["state"] == "failed"
    tasks = only["tasks"]
    assert tasks["upload_google"] == "failed" and tasks["sends_failed"] == "failed"  # the run fails
    assert {t: tasks[t] for t in ("upload_meta", "sync_suppression", "report")} == dict.fromkeys(
        ("upload_meta", "sync_suppression", "report"), "success"
    )
    (summary,) = recorded_summaries(demo_clinics)
    destinations = summary["destinations"]
    assert destinations["meta_events"]["accepted"] > 0
    assert destinations["google_customer_match"].get("sent_adds", 0) > 0
    assert destinations["meta_audience"].get("sent_adds", 0) > 0
    [alert] = Webhook.received
    assert alert["task_id"] == "upload_google" and alert["error"]["type"] == "DestinationConfigError"
