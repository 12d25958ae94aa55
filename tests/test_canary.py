"""Canary: unique strings planted in every PHI column and identifier never leave the building.

The planted values are valid (a real-looking email, a valid phone) so that they are used and
hashed, not dropped as unusable: the test proves that using them leaks nothing raw.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
from typer.testing import CliRunner

from etl.cli import app

A_COLS = [
    "appointment_id",
    "patient_id",
    "first_name",
    "last_name",
    "email",
    "phone",
    "zip",
    "city",
    "state",
    "country",
    "service",
    "status",
    "start_at",
    "revenue",
    "currency",
    "location_id",
    "updated_at",
    "consent_marketing",
    "consent_at",
    "consent_revoked_at",
]
L_COLS = [
    "lead_id",
    "created_at",
    "first_name",
    "last_name",
    "email",
    "phone",
    "zip",
    "gclid",
    "gbraid",
    "wbraid",
    "fbclid",
    "fbc",
    "fbp",
    "consent_marketing",
    "consent_at",
    "consent_revoked_at",
    "source",
    "treatment_interest",
    "notes",
    "landing_page_url",
]

# each canary is unique and would be recognisable anywhere it leaked, in any letter case
CANARIES = {
    "appointment_id": "CNRYAPPT7731",
    "patient_id": "CNRYPAT7732",
    "lead_id": "CNRYLEAD7733",
    "first_name": "Cnryfirstqz",
    "last_name": "Cnrylastqz",
    "email": "cnry.mailbox.q7x@gmail.com",
    "phone": "(415) 555-0177",
    "city": "Cnrycityville",
    "service": "CNRY Botox for hyperhidrosis",
    "location_id": "CNRYLOC7734",
    "source": "CNRYSOURCE",
    "treatment_interest": "CNRY hyperhidrosis",
    "notes": "CNRY sweaty palms note",
    "landing_page_url": "https://cnry.example/botox?utm_content=CNRYURL",
}
# forms in which a raw value could escape besides verbatim
DERIVED = [
    "cnrymailboxq7x",
    "cnry.mailbox.q7x",
    "4155550177",
    "cnryfirstqz",
    "cnrylastqz",
    "cnrycityville",
]


def write_clinic(folder: Path) -> Path:
    c = CANARIES
    appointment = {
        "appointment_id": c["appointment_id"],
        "patient_id": c["patient_id"],
        "first_name": c["first_name"],
        "last_name": c["last_name"],
        "email": c["email"],
        "phone": c["phone"],
        "zip": "94110",
        "city": c["city"],
        "state": "CA",
        "country": "US",
        "service": c["service"],
        "status": "Completed",
        "start_at": "2026-05-05 10:00",
        "revenue": "$1,250.00",
        "currency": "USD",
        "location_id": c["location_id"],
        "updated_at": "2026-05-05 12:00",
        "consent_marketing": "yes",
        "consent_at": "2026-05-01 09:00",
    }
    lead = {
        "lead_id": c["lead_id"],
        "created_at": "2026-05-01 09:00",
        "first_name": c["first_name"],
        "last_name": c["last_name"],
        "email": c["email"],
        "phone": c["phone"],
        "zip": "94110",
        "gclid": "Cj0KCQ-click-ok_0123456789",
        "fbclid": "IwAR-click-ok_0123456789",
        "consent_marketing": "yes",
        "consent_at": "2026-05-01 09:00",
        "source": c["source"],
        "treatment_interest": c["treatment_interest"],
        "notes": c["notes"],
        "landing_page_url": c["landing_page_url"],
    }
    for name, cols, row in (("appointments.csv", A_COLS, appointment), ("leads.csv", L_COLS, lead)):
        with (folder / name).open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=cols)
            writer.writeheader()
            writer.writerow({k: row.get(k, "") for k in cols})
    yaml = (Path(__file__).parent / "data" / "canary_clinic.yaml").read_text()
    (folder / "clinic.yaml").write_text(yaml)
    return folder / "clinic.yaml"


def assert_no_canary(text: str, where: str) -> None:
    lowered = text.lower()
    for value in [*CANARIES.values(), *DERIVED]:
        assert value.lower() not in lowered, f"a planted value reached {where}"


@pytest.mark.parametrize("mode", ["dry-run", "sandbox"])
def test_no_planted_value_escapes(mode: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    if mode == "sandbox":
        pytest.importorskip("etl.sandbox.google")
    config = write_clinic(tmp_path)
    caplog.set_level(logging.DEBUG)
    args = [
        "run",
        "--config",
        str(config),
        "--start",
        "2026-05-01",
        "--end",
        "2026-06-30",
        "--json",
    ]
    args += ["--dry-run"] if mode == "dry-run" else ["--target", "sandbox"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    # the canary person did convert: otherwise the test would prove nothing
    assert '"consultation": 1' in result.stdout and '"purchase": 1' in result.stdout
    assert_no_canary(result.stdout, "stdout")
    assert_no_canary(result.stderr, "stderr")
    for record in caplog.records:
        assert_no_canary(record.getMessage(), f"log record {record.name}")
    var = tmp_path / "var"
    files = [p for p in var.rglob("*") if p.is_file() and p.suffix in (".jsonl", ".json")]
    assert any(p.name == "google_conversions.jsonl" for p in files)
    for path in files:
        assert_no_canary(path.read_text(), str(path.relative_to(tmp_path)))


def test_bad_input_error_names_place_not_value(tmp_path: Path) -> None:
    config = write_clinic(tmp_path)
    text = (tmp_path / "appointments.csv").read_text().replace("2026-05-05 10:00", "CNRY-not-a-date")
    (tmp_path / "appointments.csv").write_text(text)
    result = CliRunner().invoke(
        app,
        [
            "run",
            "--config",
            str(config),
            "--start",
            "2026-05-01",
            "--end",
            "2026-06-30",
            "--dry-run",
        ],
    )
    assert result.exit_code != 0
    assert "appointments.csv" in result.stderr and "line 2" in result.stderr and "start_at" in result.stderr
    assert "CNRY" not in result.stderr and "CNRY" not in result.stdout


def test_uploads_carry_no_planted_value(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """What the sandboxes received and what the ledger holds: hashes and opaque IDs only."""
    from datetime import datetime

    import sqlalchemy as sa

    from etl import store, tasks
    from etl.config import load_config
    from etl.targets import started_sandboxes
    from tests.conftest import SECRET

    caplog.set_level(logging.DEBUG)
    config = load_config(write_clinic(tmp_path))
    start = datetime(2026, 5, 1, tzinfo=config.tz)
    end = datetime(2026, 6, 30, tzinfo=config.tz)
    spec = tasks.spec_for(config, start, end)
    tasks.extract(spec)
    tasks.stage(spec)
    tasks.build_conversions(spec, secret=SECRET, dry_run=False, target="sandbox")
    tasks.validate_outbound(spec)
    with started_sandboxes(config, now=end) as sandboxes:
        for family in ("google", "meta"):
            tasks.upload(spec, family, target="sandbox", sandboxes=sandboxes)
        tasks.sync_suppression(spec, target="sandbox", sandboxes=sandboxes)
        tasks.report(spec)
        google, meta = sandboxes["google"], sandboxes["meta"]
        assert sum(google.accepted_order_ids().values()) == 2
        assert sum(meta.event_ids_received().values()) == 2
        assert_no_canary(repr(google.received), "requests received by the Google sandbox")
        assert_no_canary(repr(meta.received), "requests received by the Meta sandbox")
    with store.engine_for(config.resolved_database_url()) as engine, engine.connect() as conn:
        # every table a send writes (staging itself holds hashes and record IDs, checked elsewhere)
        for table in (store.send_ledger, store.audience_state, store.audience_pending, store.audience_syncs,
                      store.audience_sync_log,
                      store.ledger_targets, store.run_summaries, store.conversions, store.quality_results):  # fmt: skip
            dump = repr(conn.execute(sa.select(table)).all())
            assert_no_canary(dump, f"table {table.name}")
        assert len(conn.execute(sa.select(store.send_ledger)).all()) == 4
    # every file the run wrote beside the outbox: upload results (request ids), the report, markers
    scanned = set()
    for path in spec.paths.run_dir.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".jsonl", ".txt", ".html"):
            assert_no_canary(path.read_text(encoding="utf-8", errors="replace"), f"file {path.name}")
            scanned.add(path.name)
    assert {"report.html", "summary.json", "meta_audience.json", "google_conversions.json"} <= scanned
    for record in caplog.records:
        assert_no_canary(record.getMessage(), f"log record {record.name}")
