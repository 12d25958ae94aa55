"""Shared fixtures: a clean environment per test and a small-clinic runner over committed CSVs."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from etl import pipeline, store
from etl.config import ClinicConfig
from etl.outbox import OUTBOX_FILES, read_rows
from etl.rules.stages import RunWindow

# pytest-xdist exports COLUMNS=80 to its workers, and rich freezes a width found in the
# environment when the CLI's consoles are built at import; without it they read the width (and a
# test's COLUMNS) when they print, as under a serial run.
os.environ.pop("COLUMNS", None)

DATA = Path(__file__).parent / "data"
SECRET = b"test-secret-0123456789abcdef"

BASE_CONFIG: dict[str, Any] = {
    "clinic_id": "sunrise-medspa",
    "timezone": "America/Los_Angeles",
    "currency": "USD",
    "default_region": "US",
    "sources": {
        "appointments": {"path": "appointments.csv", "profile": "generic"},
        "leads": {"path": "leads.csv", "profile": "generic"},
    },
    "google_ads": {
        "customer_id": "1234567890",
        "conversion_actions": {
            "consultation": "customers/1234567890/conversionActions/111",
            "purchase": "customers/1234567890/conversionActions/222",
        },
        "suppression_user_list": "customers/1234567890/userLists/333",
    },
    "meta": {
        "pixel_id": "123456789012345",
        "suppression_audience_id": "23850000000000000",
        "event_names": {"consultation": "ConsultationAttended", "purchase": "Purchase"},
        "action_source": "physical_store",
        "max_event_age_days": 62,
    },
}


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test starts without our secrets in the environment and restores what it changes."""
    saved = dict(os.environ)
    for name in (
        "MEDSPA_ID_SECRET",
        "META_ACCESS_TOKEN",
        "META_APP_SECRET",
        "GOOGLE_ADS_DEVELOPER_TOKEN",
    ):
        monkeypatch.delenv(name, raising=False)
    yield
    os.environ.clear()
    os.environ.update(saved)


def make_config(base_dir: Path, **overrides: Any) -> ClinicConfig:
    raw = json.loads(json.dumps(BASE_CONFIG))
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return ClinicConfig.model_validate({**raw, "base_dir": base_dir})


def local(text: str, config: ClinicConfig) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=config.tz)


# one person's lead and visits, for tests that rewrite a clinic's exports night by night
APPT_HEADER = (
    "appointment_id,patient_id,first_name,last_name,email,phone,zip,city,state,country,service,status,"
    "start_at,revenue,currency,location_id,updated_at,consent_marketing,consent_at,consent_revoked_at\n"
)
ONE_LEAD = (
    "lead_id,created_at,first_name,last_name,email,phone,zip,gclid,gbraid,wbraid,fbclid,fbc,fbp,"
    "consent_marketing,consent_at,consent_revoked_at,source,treatment_interest,notes,landing_page_url\n"
    "L1,2026-11-01 10:00,Ann,Lee,ann.lee@gmail.com,4155550134,94103,Cj0KCQ-L1_testclickid0000,,,,,,yes,2026-11-01 10:00,,,,,\n"
)


def visit(aid: str, status: str, day: str, revenue: str = "") -> str:
    """An appointment of ONE_LEAD's person on 2026-11-<day>, consent granted."""
    return (f"{aid},P1,Ann,Lee,ann.lee@gmail.com,4155550134,94103,San Francisco,CA,US,Botox,{status},"
            f"2026-11-{day} 10:00,{revenue},USD,L1,2026-11-{day} 12:00,yes,2026-11-01 10:00,\n")  # fmt: skip


@dataclass
class CaseRun:
    summary: dict[str, Any]
    rows: dict[str, list[dict[str, Any]]]
    outbox: Path

    @property
    def drops(self) -> dict[str, int]:
        return {k: v for k, v in self.summary["drops"].items() if v}


def run_dry(
    config: ClinicConfig,
    start: str,
    end: str,
    tmp_path: Path,
    *,
    db_url: str | None = None,
    appointments: str | None = None,
) -> CaseRun:
    """Stage the clinic's exports and write a dry-run outbox for ``[start, end)`` (local dates)."""
    if appointments is not None:
        sources = config.sources.model_copy(
            update={
                "appointments": config.sources.appointments.model_copy(update={"path": Path(appointments)})
            }
        )
        config = config.model_copy(update={"sources": sources})
    window = RunWindow(start=local(start, config), end=local(end, config))
    url = db_url or f"sqlite:///{tmp_path / 'stage.sqlite'}"
    paths = pipeline.RunPaths(
        run_dir=tmp_path / "run", outbox=tmp_path / "outbox" / pipeline.run_id_for(config, window)
    )
    with store.engine_for(url) as engine:
        inputs = pipeline.stage_sources(config, engine, window, pipeline.Timings(), paths)
        plan = pipeline.plan_run(
            config,
            engine,
            window,
            secret=SECRET,
            target="none",
            dry_run=True,
            inputs=inputs,
            extracts=paths.extracts,
            consent_as_of=datetime.now(UTC),  # as tasks.build_conversions plans
        )
    pipeline.build_pending(plan, paths)
    outbox = pipeline.publish_outbox(config, paths)
    rows = {dest: list(read_rows(outbox, dest)) for dest in OUTBOX_FILES}
    return CaseRun(summary=plan.summary, rows=rows, outbox=outbox)


def record_batches_at_once(url: str, clinic_id: str) -> Any:
    """Two uploads of one clinic recording 25 batches each at the same time (the DAG runs Google
    and Meta in parallel); returns the chain's verdict afterwards."""
    import threading

    from etl import audit, ledger, store

    at = datetime(2026, 11, 23, tzinfo=UTC)
    with store.engine_for(url) as engine:

        def upload(destination: str) -> None:
            for batch in range(25):
                rows = [{"opaque_id": f"{destination}-{batch}-{i}", "status": "accepted", "stage": "purchase"}
                        for i in range(3)]  # fmt: skip
                ledger.write_ledger(engine, clinic_id, destination, rows, run_id="r", at=at)

        threads = [threading.Thread(target=upload, args=(d,)) for d in ("google_conversions", "meta_events")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        with engine.connect() as conn:
            return audit.verify(conn, clinic_id)
