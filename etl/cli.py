"""``medspa-conversions``: the command-line door into ``etl.pipeline`` (the DAG is the other).

Progress and logs go to stderr; stdout carries only the run summary (counts, never PHI), so
``medspa-conversions run ... --json | jq`` works. The rules never read the wall clock (the
run's ``end`` is "now"); the CLI reads it for default dates, and the send steps for audit
timestamps and for Meta's age limit at a live upload (Meta judges age on receipt).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from datetime import date, datetime, timedelta
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

import rich.markup
import typer
from rich.console import Console
from rich.table import Table

from etl.cli_audit import register as register_audit
from etl.cli_quality import register as register_quality
from etl.cli_switch import register as register_switch
from etl.config import PLATFORM_DESTINATIONS, ClinicConfig, load_config, resolve_id_secret
from etl.errors import (
    ConfigError,
    DestinationConfigError,
    MachineError,
    MedspaError,
    QuotaExhausted,
    SendingStopped,
    SendInProgress,
    StagingError,
)
from etl.settings import private_files, quiet_third_party_loggers

app = typer.Typer(
    name="medspa-conversions",
    help=(
        "PHI-safe offline conversions for medical spas.\n\n"
        "Reads a clinic's CRM lead export and practice-management appointment export, keeps "
        "attended visits, links leads to patients, hashes identifiers per platform, checks every "
        "outbound row against the PHI allowlist, and writes (dry run) or sends the conversions "
        "and existing-patient suppression lists to Google Ads and Meta, once each."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console()


class Target(StrEnum):
    sandbox = "sandbox"
    live = "live"


def parse_boundary(text: str, config: ClinicConfig) -> datetime:
    """A date is the clinic-local midnight starting it; an ISO datetime without an offset is
    clinic-local time, one with an offset is the same instant in clinic time (the run id is the
    interval read locally: ``...T07:00Z`` and the date it is must name one run)."""
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            value = datetime(day.year, day.month, day.day, tzinfo=config.tz)
        else:
            value = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"'{text}' is not a date (2026-11-23) or ISO datetime (2026-11-23T03:00-08:00)"
        ) from None
    if not 1900 <= value.year <= 2199:
        # as for the exports' timestamps: a typo (0026 for 2026), and past what the run's
        # nanosecond times can hold; found now, not as a traceback after the extract
        raise ConfigError(f"'{text}': the year must be between 1900 and 2199")
    if value.tzinfo is None:
        return value.replace(tzinfo=config.tz)
    return value.astimezone(config.tz)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    quiet_third_party_loggers()


def _ready_for_live(cfg: Any, database: str | None, *, validate_only: bool = False) -> None:
    """``doctor``'s checks before a live run does any work: a missing credential found after
    the extract and the plan (minutes at a million rows) is found now, for both platforms. A
    validate-only run checks the legal-basis registry alone: it sends the rows too."""
    import os
    from datetime import UTC, datetime

    from etl.doctor import legal_basis_checks, needs_attention, run_checks

    checks = (
        legal_basis_checks(cfg, datetime.now(UTC))
        if validate_only
        else run_checks(cfg, os.environ, database=database)
    )
    # a stopped platform (the kill switch) holds back only its own sends: the run says so and
    # exits 10 after the others went
    # the send ledger check runs again before the extract, with the whole story and --new-database
    problems = [
        item
        for item, status in checks
        if needs_attention(status) and not item.startswith("kill switch.") and item != "send ledger"
    ]
    if problems:
        raise ConfigError(
            f"not ready for a live run: {', '.join(problems)}; `medspa-conversions doctor --config ...` "
            "says what is missing (secrets are never printed)"
        )


def _fail(exc: MedspaError) -> typer.Exit:
    # the message is text, not markup: a pattern like [a-z0-9] or a path with [..] must print as is
    err.print(f"[bold red]error:[/] {rich.markup.escape(str(exc))}", markup=True, highlight=False)
    return typer.Exit(code=exc.exit_code)


def _summary_table(summary: dict[str, Any]) -> Table:
    mode = " (validate only: nothing applied)" if summary.get("validate_only") else ""
    table = Table(title=f"run {summary['run_id']}{mode}", show_lines=False)
    table.add_column("what", overflow="fold")
    table.add_column("count", justify="right", overflow="fold")
    for stage, n in summary["stages"].items():
        table.add_row(f"conversions: {stage}", str(n))
    for reason, n in summary["drops"].items():
        if n:
            table.add_row(f"dropped: {reason}", str(n))
    for dest, counts in summary["destinations"].items():
        table.add_row(f"{dest}", ", ".join(f"{k} {v}" for k, v in counts.items()))
    return table


@app.command()
def run(
    config: Annotated[Path, typer.Option("--config", "-c", help="Clinic YAML file.")],
    start: Annotated[
        str | None,
        typer.Option(
            help="Interval start: a clinic-local date (2026-10-01) or ISO datetime (an offset, or none for clinic-local time). Default: the day before --end."
        ),
    ] = None,
    end: Annotated[
        str | None,
        typer.Option(
            help="Interval end (exclusive), the run's 'now'; only a --dry-run may end after now. "
            "Default: today's clinic-local midnight."
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            metavar="",
            help=(
                "Write the outbox only; send nothing and write nothing to the ledger. The exports"
                " are still staged (the clinic's history, which later real runs read): preview an"
                " edited export against its own --database."
            ),
        ),
    ] = False,
    target: Annotated[
        Target,
        typer.Option(
            help="Where a real run sends: 'sandbox' (local protocol-true fakes of Google and Meta) or 'live'."
        ),
    ] = Target.sandbox,
    outbox: Annotated[
        Path | None,
        typer.Option(help="Outbox folder. Default: <yaml folder>/var/runs/<run id>/outbox."),
    ] = None,
    database: Annotated[
        str | None,
        typer.Option("--database", help="SQLAlchemy URL of the staging database (overrides database_url)."),
    ] = None,
    full_resync: Annotated[
        bool,
        typer.Option(
            "--full-resync",
            metavar="",
            help="Replace whole suppression lists instead of sending adds/removes.",
        ),
    ] = False,
    validate_only: Annotated[
        bool,
        typer.Option(
            "--validate-only",
            metavar="",
            help="Ask the platforms to validate without storing anything; the ledger is not written.",
        ),
    ] = False,
    meta_test_event_code: Annotated[
        str | None,
        typer.Option(
            "--meta-test-event-code", help="Route Meta events to Events Manager's Test Events tool."
        ),
    ] = None,
    new_database: Annotated[
        bool,
        typer.Option(
            "--new-database",
            metavar="",
            help="Start a new send ledger in this database although the clinic's earlier sends are "
            "recorded in another (var/ledgers/ beside the YAML): every conversion not in this one's "
            "ledger is sent again. Only when the old database is lost.",
        ),
    ] = False,
    json_out: Annotated[
        bool, typer.Option("--json", metavar="", help="Print summary.json to stdout instead of a table.")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", metavar="", help="Debug logging (still counts only).")
    ] = False,
) -> None:
    """Run one interval [start, end) for one clinic: extract, stage, plan, gate, outbox, send.

    Conversions whose ready time falls in [start - late_arrival_days, end) are considered, plus
    any an earlier real run left unfinished (carried_over); anything final in the send ledger is
    left out (counted as already_sent). The two uploads and the list sync are independent: a
    platform that stops one of them (account, quota) does not hold back the others, and the
    summary and report are written before the exit code says what stopped. Exit codes: 2 bad
    config or input, 3 PHI egress gate, 4 data-quality gate, 5 platform account or setup, 6 a
    list sync hit a quota or the platform stayed unavailable (a conversion upload that runs out
    of quota plans the rest for the next run and exits 0, summary.json saying stopped:
    daily_quota), 7 the staging database refused the load or cannot be opened, 8 another
    process is sending to the same clinic's platform or working on the same run (nothing sent
    or changed; rerun after it ends), 9 the machine refused a file the run writes (a full disk,
    a file size limit, a folder it may not write; rerun once it is fixed), 10 sending to a
    platform is stopped (the kill switch: `stop-sending`; a run with every platform stopped
    stops before the extract). Examples:

        medspa-conversions run --config clinic.yaml --start 2026-10-01 --end 2026-11-23 --dry-run

        medspa-conversions run --config clinic.yaml --start 2026-11-22 --end 2026-11-23 --target live
    """
    import sqlalchemy as sa

    from etl import store
    from etl.pipeline import run_label
    from etl.rules.stages import RunWindow
    from etl.tasks import refuse_future_end

    _setup_logging(verbose)
    label = run_label(dry_run=dry_run, validate_only=validate_only)
    step = {"name": "start"}  # the step running, for an error the machine raises in it

    def on_step(name: str) -> None:
        step["name"] = name
        err.print(f"[dim]… {name}[/]")

    try:
        cfg = load_config(config)
        end_at = parse_boundary(end, cfg) if end else _today_midnight(cfg)
        start_at = parse_boundary(start, cfg) if start else end_at - timedelta(days=1)
        if start_at >= end_at:
            raise ConfigError("--start must be before --end")
        refuse_future_end(RunWindow(start=start_at, end=end_at), dry_run=dry_run)
        if dry_run:
            _refuse_with_dry_run(target=target, validate_only=validate_only,
                                 meta_test_event_code=meta_test_event_code, new_database=new_database)  # fmt: skip
        if target is Target.live and not dry_run:
            _ready_for_live(cfg, database, validate_only=validate_only)
        secret, development = resolve_id_secret(real_send=not dry_run and target is Target.live)
        if development:
            err.print(
                "[bold yellow]WARNING: MEDSPA_ID_SECRET is not set; using the public DEVELOPMENT key. "
                "Opaque IDs from this run are guessable; a live send refuses this key.[/]"
            )
        summary, directory, seconds = execute_run(
            cfg,
            RunWindow(start=start_at, end=end_at),
            secret=secret,
            dry_run=dry_run,
            target=str(target),
            outbox=outbox,
            database=database,
            full_resync=full_resync,
            validate_only=validate_only,
            meta_test_event_code=meta_test_event_code,
            new_database=new_database,
            on_step=on_step,
        )
    except MedspaError as exc:
        if (done := getattr(exc, "run_result", None)) is not None:
            # a send stopped, the others and the report ran: their summary still goes to stdout
            # (a `--json | jq` pipeline reads what was sent), then the exit code says what stopped
            _print_result(cfg, RunWindow(start=start_at, end=end_at), outbox, *done, json_out=json_out,
                          label=label)  # fmt: skip
        raise _fail(exc) from None
    except OSError as exc:  # a full disk, a file size limit, a folder it may not write
        raise _fail(MachineError.of(exc, step["name"], sends=not dry_run)) from None
    except sa.exc.DBAPIError as exc:  # a write the database refused outside the load and the sends
        after = "rerun the interval once it is fixed" + (
            "" if dry_run else " (what was sent is in the send ledger)"
        )
        raise _fail(
            store.refused(exc, f"{step['name']}: the staging database refused a write", after)
        ) from None
    _print_result(
        cfg, RunWindow(start=start_at, end=end_at), outbox, summary, directory, seconds, json_out=json_out,
        label=label,
    )  # fmt: skip


def _refuse_with_dry_run(*, target: Target, validate_only: bool, meta_test_event_code: str | None,
                         new_database: bool) -> None:  # fmt: skip
    """Options that only mean something when sending: with --dry-run they would be ignored, and
    a user who typed them expected something that did not happen."""
    ignored = [
        name
        for name, given in (
            ("--target live", target is Target.live),
            ("--validate-only", validate_only),
            ("--meta-test-event-code", meta_test_event_code is not None),
            ("--new-database", new_database),
        )
        if given
    ]
    if ignored:
        raise ConfigError(
            f"--dry-run sends nothing, so {', '.join(ignored)} would do nothing; drop "
            + ("it" if len(ignored) == 1 else "them")
            + " or --dry-run"
        )


def _print_result(
    cfg: ClinicConfig,
    window: Any,
    outbox: Path | None,
    summary: dict[str, Any],
    directory: Path,
    seconds: dict[str, float],
    *,
    json_out: bool,
    label: str | None,
) -> None:
    from etl.report import report_path

    if json_out:
        out.print_json(json.dumps(summary))
    else:
        out.print(_summary_table(summary))
    err.print(f"outbox: {directory}")
    err.print(f"report: {report_path(cfg, window, outbox, label)}", soft_wrap=True)
    err.print("stage seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in seconds.items()))


def _stopped(step: str, send: Callable[[], Any]) -> MedspaError | None:
    """Run one send; what stops it (the platform, the database, the machine) is returned, not
    raised, so the other sends and the report still run."""
    try:
        send()
    except OSError as exc:  # writing its results file: what it sent is recorded
        return MachineError.of(exc, step)
    except (DestinationConfigError, QuotaExhausted, SendInProgress, StagingError) as stop:
        return stop
    return None


def execute_run(
    cfg: ClinicConfig,
    window: Any,
    *,
    secret: bytes,
    dry_run: bool,
    target: str,
    outbox: Path | None = None,
    database: str | None = None,
    full_resync: bool = False,
    validate_only: bool = False,
    meta_test_event_code: str | None = None,
    new_database: bool = False,
    on_step: Any = None,
    sandboxes: dict[str, Any] | None = None,
    retry_wait: float | None = None,
) -> tuple[dict[str, Any], Path, dict[str, float]]:
    """Every step in one process, in the DAG's order; returns (summary, outbox, stage seconds)."""
    from contextlib import ExitStack

    from etl import leases, pipeline, tasks
    from etl.targets import started_sandboxes

    timings = pipeline.Timings(on_step=on_step)
    spec = tasks.RunSpec(
        config=cfg, window=window, database=database, outbox=outbox, new_database=new_database,
        label=pipeline.run_label(dry_run=dry_run, validate_only=validate_only),
    )  # fmt: skip
    if not dry_run and not validate_only:  # a mistyped database would send everything again
        tasks.check_ledger_record(spec, "live" if target == "live" else "sandbox")
    with spec.engine():  # a wrong or unreachable database fails now, not after the extract
        pass
    if not dry_run:  # the kill switch (etl.switches), before minutes of extract and plan
        halted = tasks.stop_refusals(spec)
        configured = [p for p in PLATFORM_DESTINATIONS if getattr(cfg, p) is not None]
        if halted and len(halted) == len(configured):  # nothing could be sent: say so for each
            raise SendingStopped("; ".join(str(halt) for halt in halted.values()))
        for halt in halted.values():
            err.print(f"[bold yellow]{rich.markup.escape(str(halt))}[/]", highlight=False)
    # the whole run holds its folder: a second run of this interval started meanwhile is refused
    # (exit 8) instead of clearing this one's outbox under it
    announce = on_step or (lambda _name: None)
    with leases.hold_run_folder(spec.paths.run_dir):
        announce("extract")  # clears the previous attempt's files before the timed steps begin
        inputs = tasks.extract(spec, timings)
        tasks.stage(spec, timings)
        with timings.step("validate_inputs"):
            tasks.validate_inputs(spec)
        inputs.pop("run_id")
        tasks.build_conversions(
            spec,
            secret=secret,
            dry_run=dry_run,
            target=target,
            full_resync=full_resync,
            inputs=inputs,
            timings=timings,
        )
        with timings.step("validate_outbound"):
            tasks.validate_outbound(spec, validate_only=validate_only)
        stops: list[MedspaError] = []
        if not dry_run:
            real: Literal["live", "sandbox"] = "live" if target == "live" else "sandbox"
            with ExitStack() as stack:
                if real == "sandbox" and sandboxes is None:
                    sandboxes = stack.enter_context(started_sandboxes(cfg, now=window.end))
                # as in the DAG, the three sends are independent: a platform that refuses (account,
                # quota) holds back neither the other's conversions nor either list's removals
                sends: list[tuple[str, Callable[[], Any]]] = [
                    (f"upload_{family}", partial(tasks.upload, spec, family, target=real, validate_only=validate_only,
                                                meta_test_event_code=meta_test_event_code, sandboxes=sandboxes,
                                                retry_wait=retry_wait))
                    for family in ("google", "meta")
                ]  # fmt: skip
                sends.append(("sync_suppression", partial(tasks.sync_suppression, spec, target=real,
                                                          validate_only=validate_only, sandboxes=sandboxes,
                                                          retry_wait=retry_wait)))  # fmt: skip
                for step, send in sends:
                    with timings.step(step):
                        if (stop := _stopped(step, send)) is not None:
                            err.print(
                                f"[bold red]{step} stopped:[/] {rich.markup.escape(str(stop))}",
                                highlight=False,
                            )
                            stops.append(stop)
        announce("report")
        result = tasks.report(spec)
        if stops:  # the summary and report hold what the other sends did; the exit code says what stopped
            stops[0].run_result = (result["summary"], spec.paths.outbox, timings.seconds)  # type: ignore[attr-defined]
            raise stops[0]
        return result["summary"], spec.paths.outbox, timings.seconds


def _today_midnight(cfg: ClinicConfig) -> datetime:
    now = datetime.now(cfg.tz)
    return datetime(now.year, now.month, now.day, tzinfo=cfg.tz)


@app.command()
def synth(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder to write exports/ and clinic.yaml into.")],
    appointments: Annotated[int, typer.Option(min=1, help="Number of appointment rows.")] = 5000,
    leads: Annotated[int, typer.Option(min=0, help="Number of lead rows.")] = 2000,
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same bytes.")] = 7,
    end: Annotated[
        str, typer.Option(help="Last day covered by the data (exclusive), YYYY-MM-DD.")
    ] = "2026-11-23",
) -> None:
    """Write a synthetic clinic (both CSV exports + clinic.yaml) with every SPEC edge case in it.

    All names, emails and phones are fake. Used by the demo, the tests and the benchmark. A
    folder synth wrote before is overwritten; one holding any other clinic is refused.
    """
    from etl.synth import write_synthetic_clinic

    try:
        last = date.fromisoformat(end)
    except ValueError:
        raise typer.BadParameter("expected a date, YYYY-MM-DD", param_hint="--end") from None
    try:
        result = write_synthetic_clinic(out_dir, appointments=appointments, leads=leads, seed=seed, end=last)
    except FileExistsError as exc:
        raise typer.BadParameter(str(exc), param_hint="--out") from None
    except OSError as exc:  # a file where the folder goes, a folder it may not write
        reason = exc.strerror or type(exc).__name__
        where = f" ({exc.filename})" if exc.filename else ""
        raise typer.BadParameter(
            f"cannot write the clinic there: {reason}{where}", param_hint="--out"
        ) from None
    err.print(f"wrote synthetic clinic to {out_dir}")
    counts = {k: v if isinstance(v, int) else str(v) for k, v in vars(result).items()}
    typer.echo(json.dumps(counts, indent=2))  # plain: Rich would wrap long paths inside the JSON


@app.command()
def doctor(
    config: Annotated[Path, typer.Option("--config", "-c", help="Clinic YAML file.")],
    database: Annotated[
        str | None, typer.Option("--database", help="SQLAlchemy URL of the staging database.")
    ] = None,
) -> None:
    """Check a clinic's readiness for a live run: config, exports, database, ID secret, credentials, legal basis, kill switch.

    CSV exports are opened as a run opens them (encoding, header, the profile's required
    columns); SQL sources are checked for their query file. Prints one line per check and
    never a secret value or a value from the data; exits 1 when anything is missing or
    invalid, 2 when the config itself cannot be read. Credentials are read from the
    environment (docs/google.md, docs/meta.md).
    """
    import os

    from etl.doctor import needs_attention, run_checks

    try:
        cfg = load_config(config)
    except MedspaError as exc:
        raise _fail(exc) from None
    checks = run_checks(cfg, dict(os.environ), database=database)
    table = Table(title=f"doctor: {cfg.clinic_id}")
    table.add_column("check", overflow="fold")
    table.add_column("status", overflow="fold")
    for name, status in checks:
        style = "red" if needs_attention(status) else "green"
        table.add_row(name, f"[{style}]{status}[/]")
    out.print(table)
    failed = [name for name, status in checks if needs_attention(status)]
    if failed:
        err.print(f"{len(failed)} check(s) need attention: {', '.join(failed)}")
        raise typer.Exit(code=1)


def main() -> None:
    private_files()
    app()


register_quality(app)
register_audit(app)
register_switch(app)


if __name__ == "__main__":
    main()
