"""Data-quality gates (etl.quality, issue #5): every critical check stops the run before the outbox
and sends nothing; a broken export is caught (and by which layer); warnings let the run go on; no
planted value reaches GX results or stored results. The contract is docs/quality.md.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa
import yaml
from typer.testing import CliRunner

from etl import pipeline, quality, quality_frames, store, tasks
from etl.cli import app, execute_run
from etl.config import load_config
from etl.errors import GateViolation, InputError, QualityGateFailed
from etl.outbox import OUTBOX_FILES, SUMMARY_FILE, read_rows, write_summary
from etl.quality_suites import CRITICAL, EXPECTATIONS_DIR, build_suites, render_suite
from etl.rules.stages import RunWindow
from tests.conftest import SECRET
from tests.test_canary import CANARIES, DERIVED, assert_no_canary, write_clinic

NOW = datetime(2026, 11, 23, tzinfo=UTC)
DRY = pipeline.run_label(dry_run=True)  # a dry run's run id and folder (its own, beside the real run's)


# the committed suites are what the code builds ------------------------------------------------


def test_committed_suites_equal_what_the_code_builds() -> None:
    suites = build_suites()
    committed = sorted(p.name for p in EXPECTATIONS_DIR.glob("*.json"))
    assert committed == sorted(f"{name}.json" for name in suites), "run: python -m etl.quality_suites"
    for name, suite in suites.items():
        assert (EXPECTATIONS_DIR / f"{name}.json").read_text() == render_suite(suite), name


def test_committed_suites_load_in_great_expectations() -> None:
    import great_expectations as gx

    for path in EXPECTATIONS_DIR.glob("*.json"):
        raw = json.loads(path.read_text())
        suite = gx.ExpectationSuite(name=raw["name"], expectations=raw["expectations"], meta=raw["meta"])
        assert len(suite.expectations) == len(raw["expectations"]) > 0
        assert all(e.severity.value in ("critical", "warning") for e in suite.expectations)


def test_etl_imports_do_not_import_great_expectations() -> None:
    code = ("import sys, etl.cli, etl.tasks, etl.quality, etl.quality_frames, etl.quality_suites, etl.report; "
            "print('great_expectations' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# one run of the canary clinic, with a fault planted at one layer --------------------------------

START, END = "2026-05-01", "2026-06-30"
Rows = dict[str, list[dict[str, Any]]]


@dataclass
class Fault:
    """Where to plant a fault, and which layer must stop the run."""

    extract: tuple[str, Callable[[pd.DataFrame], pd.DataFrame]] | None = None  # kind, change
    conversions: Callable[[pd.DataFrame], pd.DataFrame] | None = None  # the run's planned candidates
    pending: Callable[[Rows], None] | None = None  # change the pending outbox rows
    frame: tuple[str, Callable[[pd.DataFrame], pd.DataFrame]] | None = None  # quality_frames function
    layer: str = "quality"  # or "gate": the PHI gate stops it first (GX is then checked directly)


@dataclass
class Outcome:
    error: Exception
    spec: tasks.RunSpec
    copy: Path | None  # the faulty pending plan, kept for the direct GX check


def _window(config: Any) -> RunWindow:
    return RunWindow(start=datetime.fromisoformat(START).replace(tzinfo=config.tz),
                     end=datetime.fromisoformat(END).replace(tzinfo=config.tz))  # fmt: skip


def _write_pending(pending: Path, rows: Rows) -> None:
    summary = json.loads((pending / SUMMARY_FILE).read_text())
    for dest, name in OUTBOX_FILES.items():
        (pending / name).write_text("".join(json.dumps(r) + "\n" for r in rows[dest]))
    write_summary(pending, summary)


def run_with_fault(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: Fault) -> Outcome:
    """Run every step of a real (sandbox-target) run with the fault; nothing may be written or sent."""
    config = load_config(write_clinic(tmp_path))
    window = _window(config)
    spec = tasks.RunSpec(config=config, window=window)
    sent: list[str] = []
    monkeypatch.setattr(tasks, "upload", lambda *a, **k: sent.append("upload"))
    monkeypatch.setattr(tasks, "sync_suppression", lambda *a, **k: sent.append("sync"))
    real_stage, real_build = tasks.stage, tasks.build_conversions
    copy = tmp_path / "faulty-pending"

    def stage(spec_: tasks.RunSpec, timings: Any = None) -> dict[str, Any]:
        out = real_stage(spec_, timings)
        if fault.extract:  # the hashed extract on disk goes wrong after staging
            kind, change = fault.extract
            path = spec_.paths.extracts / f"{kind}.parquet"
            change(pd.read_parquet(path)).to_parquet(path, index=False)
        return out

    def build(spec_: tasks.RunSpec, **kwargs: Any) -> dict[str, Any]:
        out = real_build(spec_, **kwargs)
        if fault.conversions:  # where the staged-conversion checks read them
            path = spec_.paths.conversions
            fault.conversions(pd.read_parquet(path)).to_parquet(path, index=False)
        if fault.pending:
            rows = {d: list(read_rows(spec_.paths.pending, d)) for d in OUTBOX_FILES}
            fault.pending(rows)
            _write_pending(spec_.paths.pending, rows)
        shutil.copytree(spec_.paths.pending, copy)
        return out

    monkeypatch.setattr(tasks, "stage", stage)
    monkeypatch.setattr(tasks, "build_conversions", build)
    if fault.frame:
        name, change = fault.frame
        real = getattr(quality_frames, name)
        monkeypatch.setattr(quality_frames, name, lambda *a, **k: change(real(*a, **k)))
    with pytest.raises((QualityGateFailed, GateViolation)) as info:
        execute_run(config, window, secret=SECRET, dry_run=False, target="sandbox", sandboxes={})
    assert not spec.paths.outbox.exists(), "an outbox was published"
    assert not spec.paths.pending.exists(), "the refused plan was left behind"
    assert sent == [], "something was sent"
    with spec.engine() as engine, engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(store.send_ledger)).scalar() == 0
    assert_no_canary(str(info.value), "the gate's message")
    return Outcome(info.value, spec, copy if copy.exists() else None)


def _set(column: str, value: Any) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def change(frame: pd.DataFrame) -> pd.DataFrame:
        frame = frame.astype({column: object}) if value is None else frame
        frame[column] = value
        return frame

    return change


def _twice(frame: pd.DataFrame) -> pd.DataFrame:
    return pd.concat([frame, frame], ignore_index=True)


def _edit(dest: str, change: Callable[[dict[str, Any]], None]) -> Callable[[Rows], None]:
    def apply(rows: Rows) -> None:
        change(rows[dest][0])

    return apply


def _valued(dest: str, change: Callable[[dict[str, Any]], None]) -> Callable[[Rows], None]:
    """Change the row that carries a value (the purchase)."""

    def apply(rows: Rows) -> None:
        change(next(r for r in rows[dest] if "conversion_value" in r or "custom_data" in r))

    return apply


def _dup(dest: str) -> Callable[[Rows], None]:
    return lambda rows: rows[dest].append(dict(rows[dest][0]))


def _pop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda row: row.pop(key)


def _put(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda row: row.__setitem__(key, value)


def _user(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda row: row["user_data"].__setitem__(key, value)


def _custom(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda row: row["custom_data"].__setitem__(key, value)


def _address(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(row: dict[str, Any]) -> None:
        next(i for i in row["user_identifiers"] if "address_info" in i)["address_info"][key] = value

    return change


def _no_match_keys(row: dict[str, Any]) -> None:
    row.pop("user_identifiers", None)
    row.pop("gclid", None)


HASH = "a" * 64
A, L = "appointments", "leads"
MIN_US = 86_400 * 1_000_000


def _where(
    column: str, value: Any, target: str, change: Callable[[Any], Any]
) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def apply(frame: pd.DataFrame) -> pd.DataFrame:
        rows = frame[column] == value
        frame[target] = frame[target].astype(object)
        frame.loc[rows, target] = [change(v) for v in frame.loc[rows, target]]
        return frame

    return apply


def _shift_times(by: int, *columns: str) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def apply(frame: pd.DataFrame) -> pd.DataFrame:
        for column in columns:
            frame[column] = frame[column] - by
        return frame

    return apply


def _second_consultation(frame: pd.DataFrame) -> pd.DataFrame:
    """A second kept consultation of the same person at the same visit, under another opaque ID."""
    copy = frame[frame["stage"] == "consultation"].copy()
    copy["opaque_id"] = "ffff" + copy["opaque_id"].str.slice(4)
    return pd.concat([frame, copy], ignore_index=True)


CASES: dict[str, Fault] = {
    "appointments_schema.columns_as_contracted": Fault(extract=(A, _set("email", CANARIES["email"]))),
    "appointments_extract.appointment_id_not_null": Fault(extract=(A, _set("appointment_id", None))),
    "appointments_extract.appointment_id_unique": Fault(extract=(A, _twice)),
    "appointments_extract.start_at_not_null": Fault(extract=(A, _set("start_at", pd.NaT))),
    "appointments_extract.status_not_null": Fault(extract=(A, _set("status", None))),
    "appointments_extract.status_in_vocabulary": Fault(extract=(A, _set("status", "Completed"))),
    "appointments_extract.status_known_share": Fault(extract=(A, _set("status_known", False))),
    "appointments_extract.revenue_numeric": Fault(extract=(A, _set("revenue", "$1,250.00"))),
    "appointments_extract.revenue_not_null": Fault(extract=(A, _set("revenue", float("nan")))),
    "appointments_extract.revenue_plausible": Fault(extract=(A, _set("revenue", 4155550177.0))),
    "appointments_extract.currency_iso_4217": Fault(extract=(A, _set("currency", CANARIES["location_id"]))),
    "appointments_extract.is_test_not_null": Fault(extract=(A, _set("is_test", None))),
    "leads_schema.columns_as_contracted": Fault(extract=(L, _set("notes", CANARIES["notes"]))),
    "leads_extract.lead_id_not_null": Fault(extract=(L, _set("lead_id", None))),
    "leads_extract.lead_id_unique": Fault(extract=(L, _twice)),
    "leads_extract.created_at_not_null": Fault(extract=(L, _set("created_at", pd.NaT))),
    "leads_extract.is_test_not_null": Fault(extract=(L, _set("is_test", None))),
    # the staging table's primary key forbids a null or repeated opaque ID: planted in the frame
    "conversions_staged.opaque_id_not_null": Fault(frame=("conversions_frame", _set("opaque_id", None))),
    "conversions_staged.opaque_id_unique": Fault(frame=("conversions_frame", _twice)),
    "conversions_staged.opaque_id_hex64": Fault(
        conversions=_where("stage", "consultation", "opaque_id", lambda _: CANARIES["appointment_id"])),
    "conversions_staged.stage_known": Fault(conversions=_where("stage", "purchase", "stage", lambda _: "lead")),
    "conversions_staged.ready_in_run_window": Fault(conversions=_shift_times(200 * MIN_US, "ready_at", "event_time")),
    "conversions_staged.ready_follows_stage_rule": Fault(
        conversions=_where("stage", "purchase", "event_time", lambda t: t - MIN_US)),
    "conversions_staged.purchase_value_positive": Fault(conversions=_where("stage", "purchase", "value", lambda _: 0.0)),
    "conversions_staged.one_per_journey_and_stage": Fault(conversions=_second_consultation),
    "conversions_staged.currency_iso_4217": Fault(pending=_edit("google_conversions", _put("currency_code", "US$")),
                                                  layer="gate"),
    "google_conversions_outbound.order_id_not_null": Fault(pending=_edit("google_conversions", _pop("order_id")),
                                                           layer="gate"),
    "google_conversions_outbound.order_id_opaque": Fault(
        pending=_edit("google_conversions", _put("order_id", CANARIES["appointment_id"])), layer="gate"),
    "google_conversions_outbound.order_id_unique": Fault(pending=_dup("google_conversions")),
    "google_conversions_outbound.conversion_date_time_format": Fault(
        pending=_edit("google_conversions", _put("conversion_date_time", "2026-05-05T10:00:00-07:00")), layer="gate"),
    "google_conversions_outbound.conversion_time_within_age_limit": Fault(
        pending=_edit("google_conversions", _put("conversion_date_time", "2026-01-05 10:00:00-08:00"))),
    "google_conversions_outbound.currency_code_iso_4217": Fault(
        pending=_edit("google_conversions", _put("currency_code", "US$")), layer="gate"),
    "google_conversions_outbound.conversion_value_not_negative": Fault(
        pending=_valued("google_conversions", _put("conversion_value", -1250.0))),
    "google_conversions_outbound.click_id_charset": Fault(
        pending=_edit("google_conversions", _put("gclid", "botox_lip_filler_for-JaneDoe")), layer="gate"),
    "google_conversions_outbound.one_click_id": Fault(pending=_edit("google_conversions", _put("gbraid", "Cj0abc_testclickid0000"))),
    "google_conversions_outbound.user_identifiers_batch": Fault(
        pending=_edit("google_conversions", _put("user_identifiers", [{"hashed_email": HASH}] * 6)), layer="gate"),
    "google_conversions_outbound.has_match_key": Fault(pending=_edit("google_conversions", _no_match_keys)),
    "meta_events_outbound.event_id_not_null": Fault(pending=_edit("meta_events", _pop("event_id")), layer="gate"),
    "meta_events_outbound.event_id_opaque": Fault(
        pending=_edit("meta_events", _put("event_id", CANARIES["patient_id"])), layer="gate"),
    "meta_events_outbound.event_id_unique": Fault(pending=_dup("meta_events")),
    "meta_events_outbound.event_time_within_age_limit": Fault(
        pending=lambda rows: rows["meta_events"][0].__setitem__("event_time", 1767225600)),  # 2026-01-01
    "meta_events_outbound.currency_iso_4217": Fault(pending=_valued("meta_events", _custom("currency", "US$")),
                                                    layer="gate"),
    "meta_events_outbound.value_not_negative": Fault(pending=_valued("meta_events", _custom("value", -5.0))),
    "meta_events_outbound.fbc_format": Fault(
        pending=_edit("meta_events", _user("fbc", "fb.1.1792702786000.sweaty-palms-jane-doe.AQ")), layer="gate"),
    "meta_events_outbound.fbp_format": Fault(pending=_edit("meta_events", _user("fbp", "fb.1.x.y")), layer="gate"),
    "meta_events_outbound.has_match_key": Fault(pending=_edit("meta_events", _put("user_data", {}))),
    "google_customer_match_outbound.operation_known": Fault(
        pending=_edit("google_customer_match", _put("operation", "delete")), layer="gate"),
    "google_customer_match_outbound.identifiers_per_member": Fault(
        pending=_edit("google_customer_match", _put("user_identifiers", [])), layer="gate"),
    "google_customer_match_outbound.member_key_unique": Fault(pending=_dup("google_customer_match")),
    "google_customer_match_outbound.country_code_format": Fault(
        pending=_edit("google_customer_match", _address("country_code", "usa")), layer="gate"),
    "google_customer_match_outbound.postal_code_format": Fault(
        pending=_edit("google_customer_match", _address("postal_code", "94110, CA")), layer="gate"),
    "meta_audience_outbound.operation_known": Fault(pending=_edit("meta_audience", _put("operation", "delete")),
                                                    layer="gate"),
    "meta_audience_outbound.batch_size": Fault(pending=_edit("meta_audience", _put("data", [])), layer="gate"),
    "meta_audience_outbound.row_width_min": Fault(
        pending=_edit("meta_audience", lambda row: row["data"][0].pop()), layer="gate"),
    "meta_audience_outbound.row_width_max": Fault(
        pending=_edit("meta_audience", lambda row: row["data"][0].append("")), layer="gate"),
    "outbound_hashes.hash_hex64": Fault(
        pending=_edit("google_conversions", _put("user_identifiers", [{"hashed_email": CANARIES["email"]}])),
        layer="gate"),
}  # fmt: skip


def test_every_critical_check_has_a_fault_case() -> None:
    critical = {f"{s.name}.{e.meta['check']}" for s in build_suites().values() for e in s.expectations
                if e.severity.value == CRITICAL}  # fmt: skip
    assert critical == set(CASES)


@pytest.mark.parametrize("check", sorted(CASES))
def test_critical_check_stops_the_run_before_the_outbox(check: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    fault = CASES[check]
    outcome = run_with_fault(tmp_path, monkeypatch, fault)
    if fault.layer == "gate":
        # the PHI gate runs first on the pending plan; GX would have refused the same plan
        assert isinstance(outcome.error, GateViolation)
        assert outcome.copy is not None
        results = quality.check_pending(outcome.spec, outcome.copy, at=NOW)
        failed = {r.label for r in results if not r.success}
        assert check in failed
    else:
        assert isinstance(outcome.error, QualityGateFailed)
        assert outcome.error.exit_code == 4
        message = str(outcome.error)
        assert check in message and "nothing written to the outbox or sent" in message
        with outcome.spec.engine() as engine:
            stored = {r.label: r for r in quality.read_results(engine, outcome.spec.run_id)}
        assert stored[check].success is False and stored[check].severity == CRITICAL
        assert (outcome.spec.paths.run_dir / "report.html").exists()  # a stopped run still gets its page


# a broken export: half the rows with a column shifted by one -----------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from etl.synth import write_synthetic_clinic

    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic_clinic(out, appointments=12_000, leads=4_000, seed=5)
    return out


def _clinic_copy(synthetic: Path, tmp_path: Path) -> Path:
    shutil.copytree(synthetic, tmp_path / "clinic")
    return tmp_path / "clinic"


def _rewrite(
    path: Path, change: Callable[[list[str], list[list[str]]], tuple[list[str], list[list[str]]]]
) -> None:
    with path.open(newline="", encoding="utf-8") as fh:
        header, *rows = list(csv.reader(fh))
    header, rows = change(header, rows)
    with path.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh, lineterminator="\n").writerows([header, *rows])


def _shift(variant: str) -> Callable[[list[str], list[list[str]]], tuple[list[str], list[list[str]]]]:
    """Every other row gets its cells from ``status`` on shifted by one, the way a dropped or an
    extra delimiter shifts an export."""

    def change(header: list[str], rows: list[list[str]]) -> tuple[list[str], list[list[str]]]:
        if variant == "parseable":
            # this vendor's column order ends in status, currency, revenue
            order = [c for c in header if c not in ("status", "currency", "revenue")] + [
                "status",
                "currency",
                "revenue",
            ]
            rows = [[row[header.index(c)] for c in order] for row in rows]
            header = order
        s = header.index("status")
        out = []
        for i, row in enumerate(rows):
            if i % 2 == 0:
                if variant == "ragged":  # an extra cell: the row is longer than the header
                    row = [*row[:s], "", *row[s:]]
                elif variant == "into_time":  # shifted right, last cell lost: status blank, time gets text
                    row = [*row[:s], "", *row[s:-1]]
                elif row[s + 1]:  # parseable: status cell lost; status <- currency, currency <- revenue
                    row = [*row[:s], *row[s + 1 :], ""]
            out.append(row)
        return header, out

    return change


@pytest.mark.parametrize(
    ("variant", "layer"),
    [("ragged", "extract"), ("into_time", "extract"), ("parseable", "quality")],
)
def test_broken_export_with_a_shifted_column_is_critical(variant: str, layer: str, synthetic: Path,
                                                         tmp_path: Path) -> None:  # fmt: skip
    clinic = _clinic_copy(synthetic, tmp_path)
    _rewrite(clinic / "exports" / "appointments.csv", _shift(variant))
    result = CliRunner().invoke(app, ["run", "--config", str(clinic / "clinic.yaml"), "--start", "2026-10-01",
                                      "--end", "2026-11-23", "--dry-run"])  # fmt: skip
    assert result.exit_code == (InputError.exit_code if layer == "extract" else QualityGateFailed.exit_code)
    assert not list((clinic / "var").rglob("outbox"))
    if layer == "extract":
        assert "appointments.csv" in result.stderr and "line 2" in result.stderr
    else:
        # every cell parsed: the statuses became unknown and currencies numbers; GX caught both
        assert "appointments_extract.status_known_share" in result.stderr
        assert "appointments_extract.currency_iso_4217" in result.stderr
        # where to open the export (rich wraps the message at the console width)
        # a stopped run keeps its hashed extracts for the diagnosis, until its rerun
        assert list((clinic / "var" / "runs").glob("*/extract/appointments.parquet"))
        flat = " ".join(result.stderr.split())
        assert "currency_iso_4217: 3,326 of 11,880 rows (export lines 2, 4, 6, ...)" in flat
        assert "report:" in result.stderr
    for leaked in ("Arrived", "Completed", "USD", "@"):
        assert leaked not in result.stderr


def test_a_volume_drop_is_a_warning_and_the_run_goes_on(
    synthetic: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clinic = _clinic_copy(synthetic, tmp_path)
    dropped = ("2026-11-18", "2026-11-19", "2026-11-20", "2026-11-21")

    def truncate(header: list[str], rows: list[list[str]]) -> tuple[list[str], list[list[str]]]:
        s = header.index("start_at")
        return header, [r for i, r in enumerate(rows) if r[s][:10] not in dropped or i % 10 == 0]

    _rewrite(clinic / "exports" / "appointments.csv", truncate)
    result = CliRunner().invoke(app, ["run", "--config", str(clinic / "clinic.yaml"), "--start", "2026-10-01",
                                      "--end", "2026-11-23", "--dry-run", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    # the first three of the four thin days, so the analyst knows which days to look at
    assert ("data-quality warning appointment_volume.daily_volume_vs_trailing_median: 4 of 53 rows "
            "(days 2026-11-18, 2026-11-19, 2026-11-20, ...)") in warned  # fmt: skip
    config = load_config(clinic / "clinic.yaml")
    spec = tasks.RunSpec(config=config, window=RunWindow(datetime(2026, 10, 1, tzinfo=config.tz),
                                                         datetime(2026, 11, 23, tzinfo=config.tz)), label=DRY)  # fmt: skip
    assert spec.paths.outbox.exists()
    with spec.engine() as engine:
        stored = {r.label: r for r in quality.read_results(engine, spec.run_id)}
        volume = quality_frames.volume_frame(engine, config, spec.window, quality.DEFAULT_THRESHOLDS)
    check = stored["appointment_volume.daily_volume_vs_trailing_median"]
    assert (check.severity, check.success, check.unexpected_count) == ("warning", False, 4)
    assert sorted(volume.loc[volume["ratio_to_median"] < 1 / 3, "day"]) == list(dropped)
    assert not any(r.severity == CRITICAL and not r.success for r in stored.values())
    # the nightly run (03:00 -> 03:00, no whole day inside) judges the day that ended within it
    with spec.engine() as engine:
        nightly = RunWindow(
            datetime(2026, 11, 19, 3, tzinfo=config.tz), datetime(2026, 11, 20, 3, tzinfo=config.tz)
        )
        night = quality_frames.volume_frame(engine, config, nightly, quality.DEFAULT_THRESHOLDS)
    assert night["day"].tolist() == ["2026-11-19"] and night["ratio_to_median"].iloc[0] < 1 / 3


@pytest.mark.parametrize("trailing", [28, 7], ids=["four-weeks", "one-week"])
def test_a_weekday_the_clinic_is_closed_is_not_a_volume_drop(
    synthetic: Path, tmp_path: Path, trailing: int
) -> None:
    # the closed-weekday check looks four weeks back: a shorter trailing window (7 to 365 days
    # allowed) left it without history, and every closed Sunday was judged a drop
    import dataclasses

    clinic = _clinic_copy(synthetic, tmp_path)

    def closed_on_sundays(header: list[str], rows: list[list[str]]) -> tuple[list[str], list[list[str]]]:
        s = header.index("start_at")
        return header, [r for r in rows if datetime.fromisoformat(r[s][:10]).weekday() != 6]

    _rewrite(clinic / "exports" / "appointments.csv", closed_on_sundays)
    config = load_config(clinic / "clinic.yaml")
    spec = tasks.RunSpec(config=config, window=RunWindow(datetime(2026, 10, 1, tzinfo=config.tz),
                                                         datetime(2026, 11, 23, tzinfo=config.tz)))  # fmt: skip
    tasks.extract(spec)
    tasks.stage(spec)
    with spec.engine() as engine:
        thresholds = dataclasses.replace(quality.DEFAULT_THRESHOLDS, volume_trailing_days=trailing)
        volume = quality_frames.volume_frame(engine, config, spec.window, thresholds)
    sundays = volume[pd.to_datetime(volume["day"]).dt.weekday == 6]
    assert len(sundays) == 8 and (sundays["appointments"] <= 1).all()
    assert sundays["ratio_to_median"].isna().all()  # not judged: closed, not a truncated export
    assert volume["ratio_to_median"].notna().sum() > 40  # the open days still are


def test_warnings_are_reported_and_the_run_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unusable emails and phones, a few unknown statuses, visits without leads: warnings only."""

    def degrade(frame: pd.DataFrame) -> pd.DataFrame:
        frame = pd.concat([frame] * 10, ignore_index=True)
        frame["appointment_id"] = [f"A{i}" for i in range(len(frame))]
        frame["status_known"] = [i != 0 for i in range(len(frame))]  # 10% unknown: under the critical share
        frame["em_g"], frame["ph_g"] = None, None
        return frame

    def no_leads(pending: Path) -> None:
        summary = json.loads((pending / SUMMARY_FILE).read_text())
        summary["drops"]["no_lead"] = 1
        write_summary(pending, summary)

    config = load_config(write_clinic(tmp_path))
    window = _window(config)
    real_stage, real_build = tasks.stage, tasks.build_conversions

    def stage(spec: tasks.RunSpec, timings: Any = None) -> dict[str, Any]:
        out = real_stage(spec, timings)
        path = spec.paths.extracts / "appointments.parquet"
        degrade(pd.read_parquet(path)).to_parquet(path, index=False)
        return out

    def build(spec: tasks.RunSpec, **kwargs: Any) -> dict[str, Any]:
        out = real_build(spec, **kwargs)
        no_leads(spec.paths.pending)
        return out

    monkeypatch.setattr(tasks, "stage", stage)
    monkeypatch.setattr(tasks, "build_conversions", build)
    summary, outbox, _ = execute_run(config, window, secret=SECRET, dry_run=True, target="none")
    assert outbox.exists() and summary["stages"] == {"consultation": 1, "purchase": 1}
    spec = tasks.RunSpec(config=config, window=window, label=DRY)
    with spec.engine() as engine:
        failed = {r.label: r for r in quality.read_results(engine, spec.run_id) if not r.success}
    assert set(failed) == {
        "appointments_extract.unknown_statuses_present",
        "appointments_extract.em_g_usable_share",
        "appointments_extract.ph_g_usable_share",
        "run_metrics.attended_without_lead_share",
    }
    assert all(r.severity == "warning" for r in failed.values())
    assert failed["appointments_extract.unknown_statuses_present"].unexpected_count == 1
    page = (spec.paths.run_dir / "report.html").read_text()
    assert page.count('class="warn">warning<') == 4


# canary: GX results and stored results carry no planted value ---------------------------------


def _collect(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    seen: list[str] = []
    real = quality.run_suites

    def spy(*args: Any, **kwargs: Any) -> list[quality.CheckResult]:
        kwargs["on_result"] = lambda name, result: seen.append(json.dumps(result, default=str))
        return real(*args, **kwargs)

    monkeypatch.setattr(quality, "run_suites", spy)
    return seen


def _stored_text(spec: tasks.RunSpec) -> str:
    with spec.engine() as engine, engine.connect() as conn:
        rows = conn.execute(sa.select(store.quality_results)).fetchall()
    assert rows
    return "\n".join(repr(tuple(r)) for r in rows)


def test_canary_clean_run_gx_and_stored_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _collect(monkeypatch)
    records: list[str] = []  # the stage gate's record, read while it exists (the report deletes it)
    gate = quality.gate_extracts

    def gate_and_read(spec: tasks.RunSpec, **kwargs: Any) -> Any:
        results = gate(spec, **kwargs)
        records.append((spec.paths.extracts / quality.CHECKED_FILE).read_text())
        return results

    monkeypatch.setattr(quality, "gate_extracts", gate_and_read)
    config_path = write_clinic(tmp_path)
    result = CliRunner().invoke(app, ["run", "--config", str(config_path), "--start", START, "--end", END,
                                      "--dry-run", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    # all 12 suites once: validate_inputs reuses the stage gate's results for the unchanged extracts
    assert len(seen) == 12
    for text in seen:
        assert_no_canary(text, "a GX validation result")
    config = load_config(config_path)
    spec = tasks.RunSpec(config=config, window=_window(config))
    assert_no_canary(_stored_text(spec), "quality_results")
    assert len(records) == 1
    assert_no_canary(records[0], "the stage gate's record")


def test_canary_in_failing_rows_stays_out_of_gx_and_stored_results(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Planted values sit in the very cells that fail, where GX would otherwise quote them."""
    seen = _collect(monkeypatch)

    def plant(frame: pd.DataFrame) -> pd.DataFrame:
        frame = _twice(frame)  # a repeated raw appointment ID
        frame["status"] = CANARIES["service"]
        frame["currency"] = CANARIES["location_id"]
        frame["em_g"] = CANARIES["email"]
        frame["ph_g"] = None
        return frame

    outcome = run_with_fault(tmp_path, monkeypatch, Fault(extract=(A, plant)))
    failed = str(outcome.error)
    for check in ("appointment_id_unique", "status_in_vocabulary", "currency_iso_4217"):
        assert f"appointments_extract.{check}" in failed
    # and on the outbound side: a raw email where a hash belongs, a raw ID as the order ID, twice
    pending = tmp_path / "planted-pending"
    pending.mkdir()
    google = {"order_id": CANARIES["appointment_id"], "conversion_date_time": "CNRY",
              "user_identifiers": [{"hashed_email": CANARIES["email"]}, {"hashed_phone_number": DERIVED[2]}],
              "gclid": CANARIES["notes"], "currency_code": CANARIES["city"]}  # fmt: skip
    member = {"operation": "create", "user_identifiers": [{"address_info": {
        "hashed_first_name": CANARIES["first_name"], "country_code": CANARIES["last_name"],
        "postal_code": CANARIES["lead_id"]}}]}  # fmt: skip
    rows = {d: [] for d in OUTBOX_FILES} | {
        "google_conversions": [google, google],
        "google_customer_match": [member],
    }
    write_summary(pending, {"drops": {"no_lead": 1}})
    _write_pending(pending, rows)
    # the run stopped before planning: its plan holds no conversion candidates
    columns = ["opaque_id", "stage", "person_key", "event_time", "ready_at", "value", "outcome", "carried"]
    pd.DataFrame(
        {c: pd.Series(dtype="int64" if c in ("event_time", "ready_at") else object) for c in columns}
    ).astype({"carried": bool, "value": "float64"}).to_parquet(outcome.spec.paths.conversions, index=False)
    results = quality.check_pending(outcome.spec, pending, at=NOW)
    assert {"google_conversions_outbound.order_id_unique", "outbound_hashes.hash_hex64",
            "google_conversions_outbound.click_id_charset"} <= {r.label for r in results if not r.success}  # fmt: skip
    for text in seen:
        assert_no_canary(text, "a GX validation result")
    assert_no_canary(_stored_text(outcome.spec), "quality_results")
    assert_no_canary((outcome.spec.paths.run_dir / "report.html").read_text(), "report.html")


# the validate command ---------------------------------------------------------------------------


def test_validate_runs_the_checks_alone_and_publishes_nothing(tmp_path: Path) -> None:
    config_path = write_clinic(tmp_path)
    result = CliRunner().invoke(
        app, ["validate", "--config", str(config_path), "--start", START, "--end", END]
    )
    assert result.exit_code == 0, result.output
    assert "outbound_hashes" in result.stdout and "all critical checks passed" in result.stderr
    assert "…" not in result.stdout  # names fold in an 80-column log, never cut short
    config = load_config(config_path)
    spec = tasks.RunSpec(config=config, window=_window(config), label="validate")
    assert spec.run_id.endswith("__validate")
    assert not spec.paths.run_dir.exists() and not list((config.base_dir / "var" / "runs").glob("*/outbox"))
    with spec.engine() as engine:
        stored = quality.read_results(engine, spec.run_id)
    assert len(stored) == sum(len(s.expectations) for s in build_suites().values())
    assert_no_canary(result.stdout + result.stderr, "validate output")


def test_validate_on_a_database_that_cannot_be_opened_stops_before_the_extract(tmp_path: Path) -> None:
    config_path = write_clinic(tmp_path)
    result = CliRunner().invoke(app, ["validate", "--config", str(config_path), "--start", START, "--end", END,
                                      "--database", "postgresql+psycopg2://medspa@127.0.0.1:9/medspa"])  # fmt: skip
    assert result.exit_code == 7 and "cannot open it" in result.stderr, result.output
    assert "… extract" not in result.stderr


def test_validate_says_what_the_machine_or_database_refused_without_a_traceback(tmp_path: Path) -> None:
    # only our own errors were caught: a read-only database or a run folder it may not write
    # ended in a traceback and exit 1
    import shutil

    config_path = write_clinic(tmp_path)
    args = ["validate", "--config", str(config_path), "--start", START, "--end", END]
    assert CliRunner().invoke(app, args).exit_code == 0
    database = tmp_path / "var" / "sunrise-medspa.sqlite"
    copy = tmp_path / "copy.sqlite"
    shutil.copy(database, copy)
    read_only = CliRunner().invoke(app, [*args, "--database", f"sqlite:///file:{copy}?mode=ro&uri=true"])
    said = " ".join(read_only.stderr.split())
    assert read_only.exit_code == 7 and "the staging database refused a write" in said, read_only.output
    assert "Traceback" not in read_only.output
    shutil.rmtree(tmp_path / "var" / "runs", ignore_errors=True)
    (tmp_path / "var" / "runs").write_text("not a folder", encoding="utf-8")
    blocked = CliRunner().invoke(app, args)
    said = " ".join(blocked.stderr.split())
    assert blocked.exit_code == 9 and "Not a directory" in said and "Traceback" not in blocked.output, (
        blocked.output
    )


def test_validate_exits_non_zero_on_a_critical_failure(synthetic: Path, tmp_path: Path) -> None:
    clinic = _clinic_copy(synthetic, tmp_path)
    _rewrite(clinic / "exports" / "appointments.csv", _shift("parseable"))
    result = CliRunner().invoke(app, ["validate", "--config", str(clinic / "clinic.yaml"), "--start", "2026-10-01",
                                      "--end", "2026-11-23"])  # fmt: skip
    assert result.exit_code == QualityGateFailed.exit_code
    assert "FAILED" in result.stdout and "status_known_share" in result.stderr
    assert not list((clinic / "var").rglob("outbox")) and not list((clinic / "var").rglob("*.pending"))


def test_a_rerun_replaces_its_stored_results(tmp_path: Path) -> None:
    config_path = write_clinic(tmp_path)
    for _ in range(2):
        result = CliRunner().invoke(app, ["run", "--config", str(config_path), "--start", START, "--end", END,
                                          "--dry-run"])  # fmt: skip
        assert result.exit_code == 0, result.output
    config = load_config(config_path)
    spec = tasks.RunSpec(config=config, window=_window(config))
    with spec.engine() as engine, engine.connect() as conn:
        per_check = conn.execute(sa.select(store.quality_results.c.suite, store.quality_results.c.expectation,
                                           sa.func.count()).group_by("suite", "expectation")).fetchall()  # fmt: skip
    assert per_check and all(n == 1 for *_, n in per_check)


def test_broken_extract_is_refused_before_staging(tmp_path: Path) -> None:
    """Staging is latest-wins across exports: a broken export's rows must never get there."""
    config = load_config(write_clinic(tmp_path))
    spec = tasks.RunSpec(config=config, window=_window(config))
    tasks.extract(spec)
    path = spec.paths.extracts / "appointments.parquet"
    broken = _set("appointment_id", None)(pd.read_parquet(path))
    broken.to_parquet(path, index=False)
    with pytest.raises(QualityGateFailed, match="appointment_id"):
        tasks.stage(spec)
    with spec.engine() as engine, engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(store.appointments)).scalar() == 0
        assert conn.execute(sa.select(sa.func.count()).select_from(store.leads)).scalar() == 0


# validate_inputs reuses the stage gate's extract results only for the very files it checked ------


def _staged(tmp_path: Path, *, unknown_status: bool = False) -> tasks.RunSpec:
    path = write_clinic(tmp_path)
    if unknown_status:  # one visit of 50 in a status no profile knows: a standing warning
        export = tmp_path / "appointments.csv"
        header, row = export.read_text().splitlines()[:2]
        more = [row.replace(CANARIES["appointment_id"], f"CNRY-APPT-{i}", 1) for i in range(49)]
        more[0] = more[0].replace("Completed", "Mystery", 1)
        export.write_text("\n".join([header, row, *more]) + "\n")
    config = load_config(path)
    spec = tasks.RunSpec(config=config, window=_window(config))
    tasks.extract(spec)
    tasks.stage(spec)
    return spec


def _suites_run(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    ran: list[str] = []
    real = quality.run_suites

    def spy(data: Any, names: Any, *args: Any, **kwargs: Any) -> list[quality.CheckResult]:
        ran.extend(names)
        return real(data, names, *args, **kwargs)

    monkeypatch.setattr(quality, "run_suites", spy)
    return ran


def _stored_rows(spec: tasks.RunSpec) -> list[tuple[Any, ...]]:
    table = store.quality_results
    with spec.engine() as engine, engine.connect() as conn:
        rows = conn.execute(sa.select(table).where(table.c.run_id == spec.run_id)).fetchall()
    return sorted((r.suite, r.expectation, r.severity, r.success, r.unexpected_count, r.element_count, r.clinic_id)
                  for r in rows)  # fmt: skip


def test_validate_inputs_reuses_the_stage_gate_results_for_unchanged_extracts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    spec = _staged(tmp_path, unknown_status=True)
    gated = _stored_rows(spec)
    ran = _suites_run(monkeypatch)
    caplog.clear()  # the stage gate's own lines
    with caplog.at_level("INFO", logger="etl.quality"):
        reused = tasks.validate_inputs(spec)
    assert ran == ["appointment_volume"]
    # the stage gate described its warnings; they are named once here, not described again
    warned = [r for r in gated if r[2] == "warning" and not r[3] and r[0] != "appointment_volume"]
    messages = [r.getMessage() for r in caplog.records if r.name == "etl.quality"]
    assert not [m for m in messages if m.startswith("data-quality warning ") and "_extract." in m]
    assert [r[:2] for r in warned] == [("appointments_extract", "unknown_statuses_present")]
    (named,) = [m for m in messages if m.startswith("data-quality warnings standing")]
    assert all(f"{suite}.{name}" in named for suite, name, *_ in warned)
    stored = _stored_rows(spec)
    assert [r for r in stored if r[0] != "appointment_volume"] == gated
    # the same outcome, stored the same way, as running every input suite again
    (spec.paths.extracts / quality.CHECKED_FILE).unlink()
    again = tasks.validate_inputs(spec)
    assert ran == ["appointment_volume", *quality.INPUT_SUITES]
    assert again == reused and _stored_rows(spec) == stored


def test_a_clinic_sets_its_own_thresholds_in_its_yaml(tmp_path: Path) -> None:
    spec = _staged(tmp_path)
    raw = yaml.safe_load((tmp_path / "clinic.yaml").read_text())  # what _staged ran
    raw["quality"] = {"max_abs_revenue": 1}  # the canary visits cost hundreds: now implausible
    (tmp_path / "strict.yaml").write_text(yaml.safe_dump(raw))
    strict = replace(spec, config=load_config(tmp_path / "strict.yaml"))
    assert strict.config.quality.max_abs_revenue == 1.0 and strict.run_id == spec.run_id

    def revenue_check(run: tasks.RunSpec) -> bool:
        results = quality.check_inputs(run, at=NOW, suites=["appointments_extract"])
        return next(r.success for r in results if r.label == "appointments_extract.revenue_plausible")

    assert revenue_check(spec) is True
    assert revenue_check(strict) is False
    # the stage gate's record was made under other thresholds: validate_inputs checks again, and stops
    with pytest.raises(QualityGateFailed, match="revenue_plausible"):
        tasks.validate_inputs(strict)


def _rewrite_same_bytes(path: Path) -> None:
    path.write_bytes(path.read_bytes())
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


@pytest.mark.parametrize("change", ["no_record", "rewritten", "other_thresholds", "other_run_record"])
def test_validate_inputs_checks_the_extracts_again_unless_provably_unchanged(
    change: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = _staged(tmp_path)
    record = spec.paths.extracts / quality.CHECKED_FILE
    thresholds = quality.DEFAULT_THRESHOLDS
    if change == "no_record":
        record.unlink()
    elif change == "rewritten":
        _rewrite_same_bytes(spec.paths.extracts / "leads.parquet")
    elif change == "other_thresholds":
        thresholds = replace(thresholds, max_unusable_email_share=0.4)
    else:
        checked = json.loads(record.read_text())
        checked["key"]["run_id"] = "another-run"
        record.write_text(json.dumps(checked))
    ran = _suites_run(monkeypatch)
    quality.validate_inputs(spec, at=NOW, thresholds=thresholds)
    assert ran == list(quality.INPUT_SUITES)


def test_a_changed_extract_of_the_same_size_and_mtime_is_not_taken_for_the_checked_one(
    tmp_path: Path,
) -> None:
    spec = _staged(tmp_path)
    assert quality._checked_extract_results(spec, quality.DEFAULT_THRESHOLDS) is not None
    path = spec.paths.extracts / "appointments.parquet"
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert quality._checked_extract_results(spec, quality.DEFAULT_THRESHOLDS) is None


def test_a_failed_stage_gate_leaves_no_record(tmp_path: Path) -> None:
    config = load_config(write_clinic(tmp_path))
    spec = tasks.RunSpec(config=config, window=_window(config))
    tasks.extract(spec)
    path = spec.paths.extracts / "appointments.parquet"
    _set("appointment_id", None)(pd.read_parquet(path)).to_parquet(path, index=False)
    with pytest.raises(QualityGateFailed):
        tasks.stage(spec)
    assert not (spec.paths.extracts / quality.CHECKED_FILE).exists()


# the frames and GX calls are built for speed, with the same content ------------------------------


H64 = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(12)]
MEMBERS: list[Any] = [
    {"operation": "create", "user_identifiers": [{"hashed_email": H64[0]}, {"hashed_phone_number": H64[1]},
     {"address_info": {"hashed_first_name": H64[2], "hashed_last_name": H64[3], "country_code": "US",
                       "postal_code": "94110"}}]},
    {"operation": "remove", "user_identifiers": [{"hashed_email": H64[4]}]},
    {"operation": "create", "user_identifiers": [{"address_info": {"hashed_first_name": H64[5],
     "country_code": "CA"}}, {"address_info": {"hashed_last_name": "", "postal_code": "10001"}}]},
    {"operation": "create", "user_identifiers": []},
    {"operation": "create", "user_identifiers": [{"hashed_email": ""}, {"hashed_phone_number": H64[6]}]},
]  # fmt: skip
ODD_MEMBERS: list[Any] = [
    {"operation": "create", "user_identifiers": [{"hashed_email": H64[7], "hashed_phone_number": H64[8]}]},
    {"operation": "create", "user_identifiers": [{"hashed_email": 12345}]},
    {"operation": "create", "user_identifiers": [{"address_info": {"hashed_first_name": H64[9], "note": "x"}}]},
    {"operation": "create", "user_identifiers": [{"address_info": "a text"}]},
    {"operation": "create", "user_identifiers": [{"hashed_email": {"nested": H64[10]}}]},
    {"operation": 7, "user_identifiers": [{"hashed_email": H64[11]}]},
    {"operation": "create", "user_identifiers": [{"address_info": {"hashed_first_name": 1.5}}]},
    {"operation": "create"},  # no identifiers at all: counted as 0, not a crash
]  # fmt: skip
AUDIENCE: list[Any] = [
    {"operation": "add", "data": [[H64[0], "", H64[1], "", "", "", "", H64[2]], [H64[3]] * 8]},
    {"operation": "remove", "data": [[H64[4], "", "", "", "", "", "", ""]]},
    {"operation": "add", "data": [[H64[5], 17, None, ""], "not a row", [H64[6]]]},
    {"operation": "add", "data": []},
]


def _flattened(pending: Path) -> dict[str, pd.DataFrame]:
    frames = quality_frames.outbound_frames(pending)
    hashes = frames["hashes"].astype({"destination": str, "field": str})
    frames["hashes"] = hashes.sort_values(["ref", "field", "value"]).reset_index(drop=True)
    return frames


@pytest.mark.parametrize("odd", [[], ODD_MEMBERS], ids=["gate-shaped", "odd"])
def test_column_wise_frames_equal_row_by_row_frames(odd: list[Any], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    from etl import quality_outbound
    from etl.outbox import write_outbox

    rows = {"google_customer_match": MEMBERS + odd, "meta_audience": AUDIENCE}
    pending = write_outbox(tmp_path / "pending", rows, {})
    built = _flattened(pending)
    columns = quality_outbound._member_columns(MEMBERS + odd, quality_outbound._Hashes())
    assert (columns is None) == bool(odd)  # gate-shaped rows take the column-wise path
    monkeypatch.setattr(quality_outbound, "_types", lambda values: {object})  # every shortcut refused
    by_row = _flattened(pending)
    for name, frame in by_row.items():
        pd.testing.assert_frame_equal(built[name], frame, obj=name)
    assert len(by_row["hashes"]) == (30 if odd else 22)


def test_gx_gets_the_columns_its_checks_read_and_no_batch_fingerprint() -> None:
    from great_expectations.execution_engine import pandas_execution_engine

    from etl import quality_gx

    suites = build_suites()
    assert quality_gx.needed_columns(suites["appointments_schema"]) is None  # table-level: every column
    assert quality_gx.needed_columns(suites["outbound_hashes"]) == ["value"]
    assert set(quality_gx.needed_columns(suites["conversions_staged"]) or []) >= {"stage", "outcome", "person_key",
                                                                                    "event_time", "value"}  # fmt: skip
    frame = pd.DataFrame(
        {"ref": [7, 9], "destination": ["a", "b"], "field": ["em", "ph"], "value": [HASH, "x"]}
    )
    keyed = quality_gx.suite_frame(frame, suites["outbound_hashes"])
    assert list(keyed.columns) == ["value"] and list(keyed.index) == [7, 9] and keyed.index.name == "row_key"
    threshold = pandas_execution_engine.HASH_THRESHOLD  # the constant the fingerprint skip relies on
    seen: list[dict[str, Any]] = []
    results = quality.run_suites(
        {"hashes": frame}, ["outbound_hashes"], {}, on_result=lambda n, r: seen.append(r)
    )
    assert [(r.success, r.unexpected_count, r.element_count) for r in results] == [(False, 1, 2)]
    assert "pandas_data_fingerprint" not in json.dumps(seen, default=str)
    assert threshold == pandas_execution_engine.HASH_THRESHOLD
    # an empty frame's key is float64 by default: GX would slice a float index by label
    empty = pd.DataFrame({"ref": pd.Series([], dtype=float), "value": pd.Series([], dtype=object)})
    assert quality_gx.suite_frame(empty, suites["outbound_hashes"]).index.dtype == object


def test_gx_holds_no_validated_frame_once_the_suites_ran() -> None:
    # GX keeps its last context process-wide; with it, every frame it validated stayed alive
    # until the next run replaced it (half a gigabyte of extracts at a million appointments)
    import gc

    frame = pd.DataFrame(
        {"ref": [7, 9], "destination": ["a", "b"], "field": ["em", "ph"], "value": [HASH, HASH]}
    )
    results = quality.run_suites({"hashes": frame}, ["outbound_hashes"], {})
    assert [r.success for r in results] == [True]
    gc.collect()
    keyed = [o for o in gc.get_objects() if isinstance(o, pd.DataFrame) and o.index.name == "row_key"]
    assert keyed == []


def test_conversions_carried_over_from_an_unfinished_upload_pass_the_gates(tmp_path: Path) -> None:
    # the journeys case converts on 2026-01-20; Meta deferred both stages in the first run, and
    # a later night's interval no longer reaches their ready times: the rules carry them over,
    # and the run-window check must not stop every later run because of it
    from etl import ledger
    from tests.conftest import DATA, make_config

    shutil.copytree(DATA / "rules" / "journeys", tmp_path / "clinic")
    config = make_config(tmp_path / "clinic")
    url = f"sqlite:///{tmp_path / 's.sqlite'}"

    def gated(start: str, end: str) -> tasks.RunSpec:
        spec = tasks.spec_for(config, datetime.fromisoformat(start).replace(tzinfo=config.tz),
                              datetime.fromisoformat(end).replace(tzinfo=config.tz), database=url)  # fmt: skip
        tasks.extract(spec)
        tasks.stage(spec)
        tasks.build_conversions(spec, secret=SECRET, dry_run=False, target="sandbox")
        tasks.validate_outbound(spec)
        return spec

    first = gated("2026-01-15", "2026-03-01")
    meta = {r["event_id"] for r in read_rows(first.paths.outbox, "meta_events")}
    assert len(meta) == 2
    with first.engine() as engine:
        ledger.write_ledger(engine, config.clinic_id, "meta_events",
                            [{"opaque_id": i, "status": "deferred"} for i in meta], run_id="first",
                            at=NOW)  # fmt: skip
    later = gated("2026-03-05", "2026-03-06")
    assert {r["event_id"] for r in read_rows(later.paths.outbox, "meta_events")} == meta
    outbound = quality_frames.outbound_frames(later.paths.outbox)
    window = quality_frames.conversions_frame(config, later.window, later.paths, outbound)
    assert set(window["interval"]) == {"carried"}  # as the rules carried them, not re-derived later
    # two runs planned side by side (backfill runs) each check their own candidates
    earlier = tasks.spec_for(config, datetime(2026, 1, 15, tzinfo=config.tz), datetime(2026, 3, 1, tzinfo=config.tz),
                             database=url)  # fmt: skip
    tasks.extract(earlier)
    tasks.stage(earlier)
    tasks.build_conversions(earlier, secret=SECRET, dry_run=False, target="sandbox")
    other = gated("2026-03-01", "2026-03-03")  # plans (and replaces the inspection table) in between
    assert other.run_id != earlier.run_id
    tasks.validate_outbound(earlier)
    own = quality_frames.conversions_frame(config, earlier.window, earlier.paths,
                                           quality_frames.outbound_frames(earlier.paths.outbox))  # fmt: skip
    assert len(own) == len(meta) and set(own["interval"]) == {"own"}


def test_a_rerun_stopped_at_the_first_gate_keeps_no_results_of_the_earlier_attempt(
    synthetic: Path, tmp_path: Path
) -> None:
    # the run id is the clinic and interval: a second attempt that stops at stage must not show
    # the first attempt's outbound checks as "passed" next to its own failure
    clinic = _clinic_copy(synthetic, tmp_path)
    argv = ["run", "--config", str(clinic / "clinic.yaml"), "--start", "2026-10-01", "--end", "2026-11-23",
            "--dry-run"]  # fmt: skip
    assert CliRunner().invoke(app, argv).exit_code == 0
    config = load_config(clinic / "clinic.yaml")
    spec = tasks.RunSpec(config=config, window=RunWindow(datetime(2026, 10, 1, tzinfo=config.tz),
                                                         datetime(2026, 11, 23, tzinfo=config.tz)), label=DRY)  # fmt: skip
    with spec.engine() as engine:
        assert "conversions_staged" in {r.suite for r in quality.read_results(engine, spec.run_id)}
    _rewrite(clinic / "exports" / "appointments.csv", _shift("parseable"))
    assert CliRunner().invoke(app, argv).exit_code == QualityGateFailed.exit_code
    with spec.engine() as engine:
        suites = {r.suite for r in quality.read_results(engine, spec.run_id)}
    assert suites and suites <= {
        "appointments_schema",
        "appointments_extract",
        "leads_schema",
        "leads_extract",
    }
    # the earlier attempt's outbox and results are gone: nothing later folds them as this one's
    assert not spec.paths.outbox.exists() and not spec.paths.results.exists()
    # re-rendered later, the page still says where this attempt stopped
    report = spec.paths.run_dir / "report.html"
    report.unlink()
    again = CliRunner().invoke(
        app, ["report", "--run-id", spec.run_id, "--config", str(clinic / "clinic.yaml")]
    )
    assert again.exit_code == 0 and 'id="stopped"' in report.read_text(encoding="utf-8")
    # and once an attempt publishes, the page is the full one again
    shutil.copy(synthetic / "exports" / "appointments.csv", clinic / "exports" / "appointments.csv")
    assert CliRunner().invoke(app, argv).exit_code == 0
    assert not spec.paths.stopped.exists()
    assert 'id="stopped"' not in report.read_text(encoding="utf-8")


def test_validate_leaves_a_published_run_in_place(tmp_path: Path) -> None:
    # validate publishes nothing; it must not clear a run's outbox as a new attempt would
    config_path = write_clinic(tmp_path)
    argv = ["--config", str(config_path), "--start", START, "--end", END]
    assert CliRunner().invoke(app, ["run", *argv, "--dry-run"]).exit_code == 0
    config = load_config(config_path)
    spec = tasks.RunSpec(config=config, window=_window(config), label=DRY)
    before = (spec.paths.outbox / SUMMARY_FILE).read_bytes()
    files = {p: p.read_bytes() for p in spec.paths.run_dir.rglob("*") if p.is_file()}
    with spec.engine() as engine:
        checked = quality.read_results(engine, spec.run_id)
    # validate of the same interval over changed exports: the run keeps the record of what it
    # checked before it published (a compliance question), and its files
    _rewrite(
        config.resolve(config.sources.appointments.path),
        lambda header, rows: (header, rows[: len(rows) // 2]),
    )
    assert CliRunner().invoke(app, ["validate", *argv]).exit_code == 0
    assert (spec.paths.outbox / SUMMARY_FILE).read_bytes() == before
    assert {p: p.read_bytes() for p in spec.paths.run_dir.rglob("*") if p.is_file()} == files
    with spec.engine() as engine:
        assert quality.read_results(engine, spec.run_id) == checked
