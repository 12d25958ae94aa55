"""``medspa-conversions disclosures``: what left for the platforms, and under which consent.

A compliance officer's question, answered from the send ledger without a SQL client: counts by
destination, stage and outcome on stdout (never PHI), and with ``--csv`` one line per
conversion that left, keyed by opaque ID, with the time of the authorization it left under.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

if TYPE_CHECKING:
    from etl.disclosures import Accounting


def disclosures(
    config: Annotated[Path, typer.Option("--config", "-c", help="Clinic YAML file.")],
    since: Annotated[
        str | None,
        typer.Option(
            help="First day (clinic-local date or ISO datetime) of sends to count. Default: the first."
        ),
    ] = None,
    until: Annotated[
        str | None,
        typer.Option(help="Day after the last (exclusive), same forms. Default: now."),
    ] = None,
    database: Annotated[
        str | None, typer.Option("--database", help="SQLAlchemy URL of the staging database.")
    ] = None,
    csv_out: Annotated[
        Path | None,
        typer.Option(
            "--csv",
            help="Also write one line per conversion that left (opaque ID, outcome, request and run, "
            "send time, consent time) to this file, readable by its owner only.",
        ),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", metavar="", help="Print the counts as JSON.")] = False,
) -> None:
    """Account for what this clinic's database sent to Google and Meta, and under which consent.

    Counts every conversion a request carried in [since, until) (by send time) per
    destination, stage and outcome (sent, accepted, rejected, already_sent), how many of
    them have the time of the marketing authorization they left under recorded (conversions
    planned by a version before this record existed have none), and the suppression-list
    syncs applied in the period with their adds and removes. Read-only; prints counts, never
    an identifier. The --csv file names conversions by opaque ID, the ID the platform holds:
    going back from it to a patient needs MEDSPA_ID_SECRET and the staging database. Examples:

        medspa-conversions disclosures --config clinic.yaml --since 2026-01-01 --until 2026-07-01

        medspa-conversions disclosures --config clinic.yaml --csv disclosures-2026H1.csv
    """
    from etl import cli, disclosures, store
    from etl.config import load_config
    from etl.errors import ConfigError, MedspaError

    try:
        cfg = load_config(config)
        start = cli.parse_boundary(since, cfg) if since else None
        end = cli.parse_boundary(until, cfg) if until else None
        if start is not None and end is not None and start >= end:
            raise ConfigError("--since must be before --until")
        with store.engine_for(cfg.resolved_database_url(database)) as engine:
            accounting = disclosures.account(engine, cfg.clinic_id, since=start, until=end)
            lines = None
            if csv_out is not None:
                lines = disclosures.write_csv(
                    csv_out, disclosures.conversion_lines(engine, cfg.clinic_id, since=start, until=end)
                )
    except MedspaError as exc:
        raise cli._fail(exc) from None
    except OSError as exc:
        raise cli._fail(
            ConfigError(f"--csv: cannot write {csv_out} ({exc.strerror or type(exc).__name__})")
        ) from None
    if json_out:
        cli.out.print_json(json.dumps(accounting.as_json()))
    else:
        cli.out.print(_table(accounting))
    if lines is not None:
        cli.err.print(f"{lines} conversion line(s) written to {csv_out}")


def _table(accounting: Accounting) -> Table:
    period = f"{accounting.since.isoformat() if accounting.since else 'first send'} to " + (
        accounting.until.isoformat() if accounting.until else "now"
    )
    table = Table(
        title=f"disclosures: {accounting.clinic_id}, {period}, target {accounting.target or 'none yet'}"
    )
    table.add_column("destination", overflow="fold")
    table.add_column("stage", overflow="fold")
    table.add_column("outcome", overflow="fold")
    table.add_column("rows", justify="right")
    table.add_column("consent recorded", justify="right")
    for (destination, stage, status), n in sorted(accounting.conversions.items()):
        table.add_row(
            destination, stage, status, str(n), str(accounting.consent_recorded[(destination, stage, status)])
        )
    for destination, counts in sorted(accounting.lists.items()):
        table.add_row(
            destination,
            "list",
            f"{counts['syncs']} sync(s): +{counts['adds']} / -{counts['removes']}",
            f"{counts['members_now']} now",
            "",
        )
    if not accounting.conversions and not any(counts["syncs"] for counts in accounting.lists.values()):
        table.caption = "nothing sent in this period"
    return table


def register(app: typer.Typer) -> None:
    app.command()(disclosures)
