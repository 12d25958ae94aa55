"""``medspa-conversions validate`` and ``report``: the data-quality gates alone, and the run report.

``validate`` runs what a run runs up to the outbox (extract, stage, input suites, build the plan
into the pending folder, PHI gate, outbound suites), then deletes the pending plan: nothing is
published, sent or written to the ledger. It exits 4 (``QualityGateFailed``) when a critical
check fails, 3 when the PHI gate refuses a row. ``report`` re-renders ``<run_dir>/report.html``
from what a run recorded. Contract: issue #5 and docs/quality.md. Output is names and counts only.
"""

from __future__ import annotations

import re
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from etl.quality import CheckResult

_RUN_ID = re.compile(r"^[A-Za-z0-9_+\-]{1,200}$")


def _results_table(results: list[CheckResult]) -> Any:
    from rich.table import Table

    table = Table(title="data-quality checks")
    for name, justify in (("suite", "left"), ("check", "left"), ("severity", "left"), ("result", "left"),
                          ("failing rows", "right"), ("rows", "right")):  # fmt: skip
        # names fold rather than end in "…": in a log or a pipe the check's name is the point
        table.add_column(name, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for r in results:
        word = (
            "passed"
            if r.success
            else ("[red]FAILED[/]" if r.severity == "critical" else "[yellow]warning[/]")
        )
        if r.success and r.element_count == 0:
            word = "passed (0 rows)"  # nothing was there to check
        if r.error:
            word += " (not evaluated)"
        table.add_row(r.suite, r.check, r.severity, word,
                      "" if r.unexpected_count is None else f"{r.unexpected_count:,}",
                      "" if r.element_count is None else f"{r.element_count:,}")  # fmt: skip
    return table


def validate(
    config: Annotated[Path, typer.Option("--config", "-c", help="Clinic YAML file.")],
    start: Annotated[
        str,
        typer.Option(
            help="Interval start: a clinic-local date (2026-10-01) or ISO datetime (an offset, or none for clinic-local time)."
        ),
    ],
    end: Annotated[
        str, typer.Option(help="Interval end (exclusive), the run's 'now'; same forms as --start.")
    ],
    database: Annotated[
        str | None, typer.Option("--database", help="SQLAlchemy URL of the staging database.")
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", metavar="", help="Debug logging (still counts only).")
    ] = False,
) -> None:
    """Run the data-quality checks of [start, end) alone; publish nothing, send nothing.

    Extracts and stages the exports, runs the input suites, plans the conversions into the
    pending folder, runs the PHI gate and the outbound suites on it, then deletes it. Results are
    stored in quality_results under the run id with "__validate" appended: a run of the same
    interval keeps its own files, outbox and recorded checks (what was checked before it sent). Exit
    codes: 4 a critical check failed, 3 the PHI gate refused a row, 2 bad config or input,
    7 the staging database refused a write or cannot be opened, 9 the machine refused a file
    (a full disk, a folder it may not write).

        medspa-conversions validate --config clinic.yaml --start 2026-11-01 --end 2026-11-23
    """
    import sqlalchemy as sa

    from etl import cli, pipeline, quality, store, tasks
    from etl.config import load_config, resolve_id_secret
    from etl.errors import ConfigError, MachineError, MedspaError
    from etl.gate import check_outbound
    from etl.outbox import OUTBOX_FILES, read_rows
    from etl.rules.stages import RunWindow

    cli._setup_logging(verbose)
    results: list[CheckResult] = []
    spec: tasks.RunSpec | None = None
    current = {"name": "start"}  # the step running, for an error the machine raises in it

    def on_step(name: str) -> None:
        current["name"] = name
        cli.err.print(f"[dim]… {name}[/]")

    try:
        cfg = load_config(config)
        start_at, end_at = cli.parse_boundary(start, cfg), cli.parse_boundary(end, cfg)
        if start_at >= end_at:
            raise ConfigError("--start must be before --end")
        secret, _ = resolve_id_secret(real_send=False)
        spec = tasks.RunSpec(
            config=cfg, window=RunWindow(start=start_at, end=end_at), database=database, label="validate"
        )
        with spec.engine():  # a wrong or unreachable database fails now, not after the extract
            pass
        timings = pipeline.Timings(on_step=on_step)
        inputs = tasks.extract(spec, timings)
        inputs.pop("run_id")
        now = datetime.now(UTC)  # audit stamp of the stored results only
        # the extract suites gate staging, as in a run; the volume suite needs staged history
        results = quality.check_inputs(spec, at=now, suites=quality.EXTRACT_SUITES)
        step = "stage"
        if not quality.has_critical(results):
            with spec.engine() as engine:
                pipeline.stage_extracts(cfg, engine, spec.paths, timings)
            results += quality.check_inputs(spec, at=now, suites=["appointment_volume"])
            step = "validate_inputs"
        if not quality.has_critical(results):
            step = "validate_outbound"
            tasks.build_conversions(
                spec, secret=secret, dry_run=True, target="none", inputs=inputs, timings=timings
            )
            pending = spec.paths.pending
            try:
                check_outbound(cfg, {d: list(read_rows(pending, d)) for d in OUTBOX_FILES})
                results += quality.check_pending(spec, pending, at=now)
            finally:
                shutil.rmtree(pending, ignore_errors=True)
        cli.out.print(_results_table(results))
        quality.raise_on_critical(results, step)
    except MedspaError as exc:
        raise cli._fail(exc) from None
    except OSError as exc:  # a full disk, a folder it may not write: as `run` says it (exit 9)
        raise cli._fail(MachineError.of(exc, current["name"], sends=False)) from None
    except sa.exc.DBAPIError as exc:  # a read-only or full database (exit 7)
        raise cli._fail(store.refused(exc, f"{current['name']}: the staging database refused a write",
                                      "rerun once it is fixed")) from None  # fmt: skip
    finally:  # the checks' results are stored; the hashed extracts they read are not needed
        if spec is not None:
            shutil.rmtree(spec.paths.run_dir, ignore_errors=True)
    warned = sum(1 for r in results if not r.success)
    cli.err.print(f"all critical checks passed ({len(results)} checks, {warned} warnings)")


def report(
    run_id: Annotated[str, typer.Option("--run-id", help="The run's ID (its folder name under var/runs/).")],
    config: Annotated[Path, typer.Option("--config", "-c", help="Clinic YAML file of the run.")],
    database: Annotated[
        str | None, typer.Option("--database", help="SQLAlchemy URL of the staging database.")
    ] = None,
    outbox: Annotated[
        Path | None, typer.Option(help="The run's outbox, if it was not the default folder.")
    ] = None,
) -> None:
    """Re-render a run's HTML report (<run_dir>/report.html) from its summary, outbox and stored checks."""
    from etl import cli, leases, store
    from etl.config import load_config
    from etl.errors import ConfigError, MedspaError
    from etl.report import paths_for_run_id, render_run_report
    from etl.retention import pruned_at

    try:
        if not _RUN_ID.match(run_id):
            raise ConfigError("--run-id must be a run folder name (letters, digits, '_', '-', '+')")
        cfg = load_config(config)
        paths = paths_for_run_id(cfg, run_id, outbox)
        if not paths.run_dir.is_dir():
            raise ConfigError(
                f"no run {run_id} in {paths.run_dir.parent} (the run folders there are its run ids)"
            )
        pruned = pruned_at(paths.run_dir)
        if pruned is not None:
            raise ConfigError(
                f"run {run_id}: its outbox rows were pruned at {pruned}; its report.html is kept as "
                "rendered (rerun the interval to render it from new files)"
            )
        # the run's own database (a mistyped one rendered an empty page over the real one), and
        # the run's folder held as its report step holds it: not under a running attempt
        with (
            leases.hold_run_folder(paths.run_dir),
            store.engine_for_existing(cfg.resolved_database_url(database)) as engine,
        ):
            path = render_run_report(cfg, paths, engine, run_id=run_id)
    except MedspaError as exc:
        raise cli._fail(exc) from None
    typer.echo(str(path))


def register(app: typer.Typer) -> None:
    """Add ``validate`` and ``report`` to the main CLI."""
    app.command()(validate)
    app.command()(report)
