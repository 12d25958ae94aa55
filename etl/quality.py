"""Data-quality gates: run the Great Expectations suites, store the counts, stop the run on critical.

The contract is issue #5 (``docs/quality.md`` explains each suite); suites are defined in
``etl.quality_suites`` and the frames they run on in ``etl.quality_frames``. Two gates, in the
task order of ``etl.tasks``: ``validate_inputs`` after staging (hashed extracts and daily volume)
and ``outbound_checks`` inside ``publish_outbox`` (staged conversions, the pending outbox, run
shares), so a critical failure stops the run before the outbox exists and before anything is sent.

PHI-safe by construction (STYLE items 12 and 22): the frames hold hashes, opaque IDs and counts;
GX is asked for counts only (``SUMMARY`` with ``partial_unexpected_count: 0``,
``exclude_unexpected_values: True`` and an opaque ``unexpected_index_column_names``); GX runs in
an ephemeral context (nothing written to disk) with progress bars off and its logger at WARNING;
what is kept of a result is a ``CheckResult`` of names and counts. GX is imported lazily: its
import costs seconds and must not be paid by ``import etl.*`` or a DAG parse.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from etl import quality_frames as frames
from etl import store
from etl.errors import QualityGateFailed
from etl.quality_suites import (
    CRITICAL,
    DEFAULT_THRESHOLDS,
    INPUT_SUITES,
    OUTBOUND_SUITES,
    ROW_KEY,
    WARNING,
    Suite,
    Thresholds,
    build_suites,
)

if TYPE_CHECKING:
    from etl.tasks import RunSpec

log = logging.getLogger(__name__)
ResultHook = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class CheckResult:
    """One expectation's outcome for one run: names and counts, never a value."""

    suite: str
    check: str
    severity: str
    success: bool
    unexpected_count: int | None
    element_count: int | None
    error: bool = False  # GX could not evaluate it (a missing column): counted as a failure

    @property
    def label(self) -> str:
        return f"{self.suite}.{self.check}"

    def describe(self) -> str:
        if self.error:
            return f"{self.label}: could not be evaluated (column missing or of the wrong type)"
        if self.unexpected_count is None:
            return f"{self.label}: failed (table-level check)"
        return f"{self.label}: {self.unexpected_count:,} of {self.element_count or 0:,} rows"


# counts plus an opaque row key, never values (STYLE item 22)
RESULT_FORMAT = {
    "result_format": "SUMMARY",
    "partial_unexpected_count": 0,
    "exclude_unexpected_values": True,
    "unexpected_index_column_names": [ROW_KEY],
    "return_unexpected_index_query": False,
}


def _keyed(frame: pd.DataFrame, key: str) -> pd.DataFrame:
    """The frame indexed by its opaque key, named ``ROW_KEY``.

    A named index is GX's fast path for ``unexpected_index_column_names`` (a plain list of keys;
    key columns are read row by row), and it cannot carry a value: only the key is in it.
    """
    values = frame[key].to_numpy() if key in frame.columns else np.arange(len(frame))
    keyed = frame.copy(deep=False)
    keyed.index = pd.Index(values, name=ROW_KEY)
    return keyed


def _context() -> Any:
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    # some GX modules pin their own logger to INFO; none of ours needs more than warnings
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("great_expectations")]:
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    return context


def _raised(info: Any) -> bool:
    if not isinstance(info, dict):
        return False
    if "raised_exception" in info:
        return bool(info["raised_exception"])
    return any(isinstance(v, dict) and v.get("raised_exception") for v in info.values())


def _collect(suite: Suite, result: Any) -> list[CheckResult]:
    order = {e.meta["check"]: i for i, e in enumerate(suite.expectations)}
    out = []
    for item in result.results:
        config = item.expectation_config
        counts = item.result or {}
        severity = getattr(config.severity, "value", config.severity)
        unexpected = counts.get("unexpected_count")
        elements = counts.get("element_count")
        out.append(
            CheckResult(
                suite=suite.name,
                check=config.meta["check"],
                severity=str(severity),
                success=bool(item.success),
                unexpected_count=None if unexpected is None else int(unexpected),
                element_count=None if elements is None else int(elements),
                error=_raised(item.exception_info),
            )
        )
    return sorted(out, key=lambda r: order[r.check])


def run_suites(
    data: Mapping[str, pd.DataFrame],
    names: Iterable[str],
    parameters: Mapping[str, Any],
    thresholds: Thresholds = DEFAULT_THRESHOLDS,
    on_result: ResultHook | None = None,
) -> list[CheckResult]:
    """Validate each named suite on its frame (``data[suite.frame]``) in one ephemeral GX context.

    Args:
        data: frames by name (``etl.quality_frames``); they must hold no raw identifier.
        parameters: values for the suites' ``$PARAMETER`` placeholders.
        on_result: called with (suite, GX result as a JSON dict) for inspection in tests; the
            dict is counts and configuration only, given the result format used here.
    """
    import great_expectations as gx

    suites = build_suites(thresholds)
    context = _context()
    source = context.data_sources.add_pandas("medspa")
    out: list[CheckResult] = []
    for name in names:
        suite = suites[name]
        frame = data[suite.frame]
        batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("whole")
        gx_suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=suite.expectations))
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch, suite=gx_suite)
        )
        result = definition.run(
            batch_parameters={"dataframe": _keyed(frame, suite.key)},
            result_format=RESULT_FORMAT,
            expectation_parameters=dict(parameters),
        )
        if on_result is not None:
            on_result(name, result.to_json_dict())
        out.extend(_collect(suite, result))
    return out


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
        conn.execute(table.delete().where(table.c.run_id == run_id, table.c.suite.in_(suites)))
        if rows:
            conn.execute(table.insert(), rows)


def read_results(engine: Engine, run_id: str) -> list[CheckResult]:
    """A run's stored results, in suite order (``error`` is not stored: a failure is a failure)."""
    table = store.quality_results
    order = {name: i for i, name in enumerate((*INPUT_SUITES, *OUTBOUND_SUITES))}
    with engine.connect() as conn:
        rows = conn.execute(sa.select(table).where(table.c.run_id == run_id)).fetchall()
    results = [
        CheckResult(suite=r.suite, check=r.expectation, severity=r.severity, success=bool(r.success),
                    unexpected_count=r.unexpected_count, element_count=r.element_count)
        for r in rows
    ]  # fmt: skip
    return sorted(results, key=lambda r: order.get(r.suite, len(order)))


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


def check_inputs(spec: RunSpec, *, at: datetime, thresholds: Thresholds = DEFAULT_THRESHOLDS,
                 on_result: ResultHook | None = None,
                 suites: Sequence[str] = INPUT_SUITES) -> list[CheckResult]:  # fmt: skip
    """Run input suites on the hashed extracts and staged volume, store and return the results."""
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


def gate_extracts(
    spec: RunSpec, *, at: datetime, thresholds: Thresholds = DEFAULT_THRESHOLDS
) -> list[CheckResult]:
    """The extract and schema suites, run by ``stage`` before anything is upserted.

    A broken export (a shifted column, a changed status vocabulary) must not reach staging:
    staging is latest-wins across exports, so its rows would outlive the failed run.

    Raises:
        QualityGateFailed: a critical extract check failed; nothing was staged.
    """
    results = check_inputs(spec, at=at, thresholds=thresholds, suites=EXTRACT_SUITES)
    if has_critical(results):
        raise_on_critical(results, "stage", _report_stopped(spec, "stage", None))
    return results


def check_pending(spec: RunSpec, pending: Path, *, at: datetime, thresholds: Thresholds = DEFAULT_THRESHOLDS,
                  on_result: ResultHook | None = None) -> list[CheckResult]:  # fmt: skip
    """Run the staged-conversion, outbound and run-share suites on a pending plan; store and return."""
    outbound = frames.outbound_frames(pending)
    with spec.engine() as engine:
        data = {
            **outbound,
            "conversions": frames.conversions_frame(engine, spec.config, spec.run_id, outbound),
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


def validate_inputs(
    spec: RunSpec, *, at: datetime, thresholds: Thresholds = DEFAULT_THRESHOLDS
) -> dict[str, Any]:
    """The ``validate_inputs`` step: input suites as a gate.

    ``stage`` already refused extracts failing a critical check before upserting them; this
    step runs every input suite again on what is on disk now (so a step run on its own, or an
    extract changed after staging, is still checked) plus the volume suite, which needs the
    staged history.

    Raises:
        QualityGateFailed: a critical input check failed (results are stored first).
    """
    results = check_inputs(spec, at=at, thresholds=thresholds)
    if has_critical(results):
        raise_on_critical(results, "validate_inputs", _report_stopped(spec, "validate_inputs", None))
    return {"run_id": spec.run_id, **summarize(results)}


def outbound_checks(spec: RunSpec, *, at: datetime,
                    thresholds: Thresholds = DEFAULT_THRESHOLDS) -> Callable[[Path], None]:  # fmt: skip
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
    import json

    from etl.outbox import SUMMARY_FILE
    from etl.report import render_run_report

    try:
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
