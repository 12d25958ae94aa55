"""Data-quality gates: run the Great Expectations suites, store the counts, stop the run on critical.

The contract is issue #5 (``docs/quality.md`` explains each suite); suites are defined in
``etl.quality_suites`` and the frames they run on in ``etl.quality_frames``. Three gates, in the
task order of ``etl.tasks``: ``gate_extracts`` inside ``stage`` before the upsert (extract and
schema suites; it also starts the attempt's stored results afresh), ``validate_inputs`` after
staging (daily volume, the extract results reused) and ``outbound_checks`` inside
``publish_outbox`` (staged conversions, the pending outbox, run shares), so a critical failure
stops the run before the outbox exists and before anything is sent.

PHI-safe by construction (STYLE items 12 and 22): the frames hold hashes, opaque IDs and counts;
GX is asked for counts and opaque row keys only (``etl.quality_gx.RESULT_FORMAT``); GX runs in
an ephemeral context (nothing written to disk) with progress bars off and its logger at WARNING;
what is kept of a result is a ``CheckResult`` of names, counts and the first failing lines or days. GX is imported lazily: its
import costs seconds and must not be paid by ``import etl.*`` or a DAG parse.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from etl import quality_frames as frames
from etl import store
from etl.errors import QualityGateFailed
from etl.quality_gx import CheckResult, ResultHook, run_suites
from etl.quality_suites import (
    CRITICAL,
    DEFAULT_THRESHOLDS,
    INPUT_SUITES,
    OUTBOUND_SUITES,
    WARNING,
    Thresholds,
    thresholds_for,
)

if TYPE_CHECKING:
    from etl.tasks import RunSpec

log = logging.getLogger(__name__)
# re-exported: callers know them from here
__all__ = ["DEFAULT_THRESHOLDS", "CheckResult", "ResultHook", "run_suites"]


def store_results(engine: Engine, clinic_id: str, run_id: str, results: Sequence[CheckResult],
                  at: datetime) -> None:  # fmt: skip
    """Replace this run's rows for the suites in ``results`` (a rerun replaces its slice)."""
    table = store.quality_results
    suites = sorted({r.suite for r in results})
    rows = [
        {"run_id": run_id, "clinic_id": clinic_id, "suite": r.suite, "expectation": r.check,
         "severity": r.severity, "success": r.success, "unexpected_count": r.unexpected_count,
         "element_count": r.element_count, "recorded_at": at}
        for r in results
    ]  # fmt: skip
    with engine.begin() as conn:
        store.exclusive(conn, "quality_results", run_id)
        conn.execute(table.delete().where(table.c.run_id == run_id, table.c.suite.in_(suites)))
        if rows:
            conn.execute(table.insert(), rows)


def clear_results(engine: Engine, run_id: str) -> None:
    """Forget every stored result of ``run_id`` (a new attempt of the run starts)."""
    table = store.quality_results
    with engine.begin() as conn:
        conn.execute(table.delete().where(table.c.run_id == run_id))


def read_results(engine: Engine, run_id: str) -> list[CheckResult]:
    """A run's stored results, in suite order, then by check name (the same page on every
    database: PostgreSQL returns rows in heap order). ``error`` is not stored: a failure is a failure."""
    table = store.quality_results
    order = {name: i for i, name in enumerate((*INPUT_SUITES, *OUTBOUND_SUITES))}
    with engine.connect() as conn:
        rows = conn.execute(sa.select(table).where(table.c.run_id == run_id)).fetchall()
    results = [
        CheckResult(suite=r.suite, check=r.expectation, severity=r.severity, success=bool(r.success),
                    unexpected_count=r.unexpected_count, element_count=r.element_count)
        for r in rows
    ]  # fmt: skip
    return sorted(results, key=lambda r: (order.get(r.suite, len(order)), r.suite, r.check))


def has_critical(results: Sequence[CheckResult]) -> bool:
    return any(r.severity == CRITICAL and not r.success for r in results)


def raise_on_critical(results: Sequence[CheckResult], step: str, note: str = "") -> None:
    """Stop the run when a critical check failed; the message names checks and counts, no values.

    Raises:
        QualityGateFailed: listing every failed critical check (and the warnings, for context).
    """
    failed = [r for r in results if r.severity == CRITICAL and not r.success]
    if not failed:
        return
    warned = [r for r in results if r.severity == WARNING and not r.success]
    lines = "\n  ".join(r.describe() for r in failed)
    extra = ("\n warnings:\n  " + "\n  ".join(r.describe() for r in warned)) if warned else ""
    raise QualityGateFailed(
        f"data-quality gate stopped the run at {step} ({len(failed)} critical "
        f"{'check' if len(failed) == 1 else 'checks'} failed; nothing written to the outbox or sent):"
        f"\n  {lines}{extra}{note}"
    )


def _log_warnings(results: Sequence[CheckResult]) -> None:
    for r in results:
        if r.severity == WARNING and not r.success:
            log.warning("data-quality warning %s", r.describe())


EXTRACT_SUITES = tuple(name for name in INPUT_SUITES if name != "appointment_volume")


def _thresholds(spec: RunSpec, given: Thresholds | None) -> Thresholds:
    """The thresholds a run's checks use: given ones (tests), else the clinic's ``quality:``."""
    return given if given is not None else thresholds_for(spec.config.quality)


def check_inputs(spec: RunSpec, *, at: datetime, thresholds: Thresholds | None = None,
                 on_result: ResultHook | None = None,
                 suites: Sequence[str] = INPUT_SUITES) -> list[CheckResult]:  # fmt: skip
    """Run input suites on the hashed extracts and staged volume, store and return the results."""
    thresholds = _thresholds(spec, thresholds)
    paths = spec.paths
    with spec.engine() as engine:
        data: dict[str, pd.DataFrame] = {}
        if any(s != "appointment_volume" for s in suites):
            data.update({
                "appointments_schema": frames.schema_frame(paths.extracts, "appointments"),
                "appointments": frames.extract_frame(paths.extracts, "appointments"),
                "leads_schema": frames.schema_frame(paths.extracts, "leads"),
                "leads": frames.extract_frame(paths.extracts, "leads"),
            })  # fmt: skip
        if "appointment_volume" in suites:
            data["volume"] = frames.volume_frame(engine, spec.config, spec.window, thresholds)
        results = run_suites(data, suites, frames.suite_parameters(spec.config, spec.window),
                             thresholds, on_result=on_result)  # fmt: skip
        store_results(engine, spec.config.clinic_id, spec.run_id, results, at)
    _log_warnings(results)
    return results


def gate_extracts(spec: RunSpec, *, at: datetime, thresholds: Thresholds | None = None) -> list[CheckResult]:
    """The extract and schema suites, run by ``stage`` before anything is upserted.

    A broken export (a shifted column, a changed status vocabulary) must not reach staging:
    staging is latest-wins across exports, so its rows would outlive the failed run. When every
    critical check passed, the files' fingerprints and the results are recorded beside the
    extracts (``CHECKED_FILE``) for ``validate_inputs``.

    Raises:
        QualityGateFailed: a critical extract check failed; nothing was staged.
    """
    thresholds = _thresholds(spec, thresholds)
    record = spec.paths.extracts / CHECKED_FILE
    record.unlink(missing_ok=True)
    with spec.engine() as engine:
        # the first gate of an attempt: an earlier attempt's results of this run (the run id is
        # the clinic and interval) must not sit beside this one's in the report
        clear_results(engine, spec.run_id)
    spec.paths.stopped.unlink(missing_ok=True)
    before = _fingerprints(spec.paths.extracts)
    results = check_inputs(spec, at=at, thresholds=thresholds, suites=EXTRACT_SUITES)
    if has_critical(results):
        raise_on_critical(results, "stage", _report_stopped(spec, "stage", None))
    if before is not None and _unchanged_since(spec.paths.extracts, before):
        checked = {"key": _record_key(spec, thresholds, before), "results": [asdict(r) for r in results]}
        record.write_text(json.dumps(checked, sort_keys=True) + "\n", encoding="utf-8")
    return results


CHECKED_FILE = "checked.json"  # in the extract folder: what gate_extracts found, and for which bytes
_EXTRACT_KINDS = ("appointments", "leads")


def _fingerprints(extracts: Path) -> dict[str, list[Any]] | None:
    """Size, mtime_ns and SHA-256 of each hashed extract (``None`` if one is missing or changing).

    Equal fingerprints mean the same bytes: the digest covers every byte (about 0.3 s for both
    files at a million appointments, against about 6 s for the suites it lets ``validate_inputs``
    skip); size and mtime make a rewrite visible without reading.
    """
    out: dict[str, list[Any]] = {}
    for kind in _EXTRACT_KINDS:
        path = extracts / f"{kind}.parquet"
        try:
            stat = path.stat()
            with path.open("rb") as fh:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
            if path.stat().st_mtime_ns != stat.st_mtime_ns:
                return None
        except OSError:
            return None
        out[kind] = [stat.st_size, stat.st_mtime_ns, digest]
    return out


def _unchanged_since(extracts: Path, fingerprints: dict[str, list[Any]]) -> bool:
    """Neither file was rewritten since ``fingerprints`` were taken (size and mtime, no re-read)."""
    try:
        stats = {kind: (extracts / f"{kind}.parquet").stat() for kind in _EXTRACT_KINDS}
    except OSError:
        return False
    return all([s.st_size, s.st_mtime_ns] == fingerprints[k][:2] for k, s in stats.items())


def _record_key(spec: RunSpec, thresholds: Thresholds, fingerprints: dict[str, list[Any]]) -> dict[str, Any]:
    """Everything the extract suites' results depend on: the run, the suites as built, the files."""
    import great_expectations as gx

    from etl.quality_suites import build_suites, render_suite

    suites = build_suites(thresholds)
    rendered = "".join(render_suite(suites[name]) for name in EXTRACT_SUITES)
    return {"run_id": spec.run_id, "great_expectations": gx.__version__, "files": fingerprints,
            "suites": hashlib.sha256(rendered.encode("utf-8")).hexdigest()}  # fmt: skip


def _checked_extract_results(spec: RunSpec, thresholds: Thresholds) -> list[CheckResult] | None:
    """The stage gate's extract-suite results, if the extracts are provably the files it checked.

    ``None`` (run the suites again) when there is no record, or the run, the suites, the GX
    version or any file's size, mtime or content differ from what the record holds.
    """
    record = spec.paths.extracts / CHECKED_FILE
    try:
        checked = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    now = _fingerprints(spec.paths.extracts)
    if (
        now is None
        or not isinstance(checked, dict)
        or checked.get("key") != _record_key(spec, thresholds, now)
    ):
        return None
    results = [CheckResult(**r) for r in checked.get("results", [])]
    if sorted({r.suite for r in results}) != sorted(EXTRACT_SUITES):
        return None
    return results


def check_pending(spec: RunSpec, pending: Path, *, at: datetime, thresholds: Thresholds | None = None,
                  on_result: ResultHook | None = None) -> list[CheckResult]:  # fmt: skip
    """Run the staged-conversion, outbound and run-share suites on a pending plan; store and return."""
    thresholds = _thresholds(spec, thresholds)
    outbound = frames.outbound_frames(pending)
    with spec.engine() as engine:
        data = {
            **outbound,
            "conversions": frames.conversions_frame(spec.config, spec.window, spec.paths, outbound),
            "metrics": frames.metrics_frame(engine, spec.config, spec.window, pending),
        }
        results = run_suites(data, OUTBOUND_SUITES, frames.suite_parameters(spec.config, spec.window),
                             thresholds, on_result=on_result)  # fmt: skip
        store_results(engine, spec.config.clinic_id, spec.run_id, results, at)
    _log_warnings(results)
    return results


def summarize(results: Sequence[CheckResult]) -> dict[str, Any]:
    """Counts for an XCom or a task summary: how many checks ran, which failed (names only)."""
    return {
        "checks": len(results),
        "failed_critical": [r.label for r in results if r.severity == CRITICAL and not r.success],
        "warnings": [r.label for r in results if r.severity == WARNING and not r.success],
    }


def validate_inputs(spec: RunSpec, *, at: datetime, thresholds: Thresholds | None = None) -> dict[str, Any]:
    """The ``validate_inputs`` step: input suites as a gate.

    ``stage`` already refused extracts failing a critical check before upserting them; this
    step checks what is on disk now (so a step run on its own, or an extract changed after
    staging, is still checked) plus the volume suite, which needs the staged history. When the
    extracts are provably the files the stage gate checked in this run (same size, mtime and
    SHA-256, same suites), its stored results are reused instead of running the extract suites
    a second time; they are stored again exactly as a second run would, and the warnings among
    them are named in one line (their descriptions were logged by the stage gate).

    Raises:
        QualityGateFailed: a critical input check failed (results are stored first).
    """
    thresholds = _thresholds(spec, thresholds)
    reused = _checked_extract_results(spec, thresholds)
    if reused is None:
        results = check_inputs(spec, at=at, thresholds=thresholds)
    else:
        log.info("extract suites: the extracts are the files the stage gate checked; its results are reused")
        with spec.engine() as engine:
            store_results(engine, spec.config.clinic_id, spec.run_id, reused, at)
        if warned := [r.label for r in reused if r.severity == WARNING and not r.success]:
            # described where the stage gate found them (earlier in the CLI's output, or the
            # DAG's stage task log); named here so this step's log still says which stand
            log.info("data-quality warnings standing from the stage gate: %s", ", ".join(warned))
        results = reused + check_inputs(spec, at=at, thresholds=thresholds, suites=["appointment_volume"])
    if has_critical(results):
        raise_on_critical(results, "validate_inputs", _report_stopped(spec, "validate_inputs", None))
    return {"run_id": spec.run_id, **summarize(results)}


def outbound_checks(spec: RunSpec, *, at: datetime,
                    thresholds: Thresholds | None = None) -> Callable[[Path], None]:  # fmt: skip
    """The ``checks`` callable ``publish_outbox`` runs on the pending plan after the PHI gate."""

    def checks(pending: Path) -> None:
        results = check_pending(spec, pending, at=at, thresholds=thresholds)
        if has_critical(results):
            raise_on_critical(
                results, "validate_outbound", _report_stopped(spec, "validate_outbound", pending)
            )

    return checks


def _report_stopped(spec: RunSpec, step: str, pending: Path | None) -> str:
    """Render the report of a stopped run (the refused plan's counts, if any); never masks the gate."""
    from etl.outbox import SUMMARY_FILE
    from etl.report import render_run_report

    try:
        spec.paths.run_dir.mkdir(parents=True, exist_ok=True)
        spec.paths.stopped.write_text(step + "\n", encoding="utf-8")  # for `report --run-id` later
        summary_file = pending / SUMMARY_FILE if pending is not None else None
        summary = (
            json.loads(summary_file.read_text(encoding="utf-8"))
            if summary_file and summary_file.exists()
            else None
        )
        with spec.engine() as engine:
            path = render_run_report(spec.config, spec.paths, engine, run_id=spec.run_id, summary=summary,
                                     conversions_dir=pending, stopped=step, window=spec.window)  # fmt: skip
    except Exception as exc:  # the gate's own message matters more than its report
        log.warning("could not render the report of the stopped run (%s)", type(exc).__name__)
        return ""
    return f"\n report: {path}"
