"""``medspa-conversions disclosures``: what left for the platforms, and under which consent.

A compliance officer's question, answered from the send ledger without a SQL client: counts by
destination, stage and outcome on stdout (never PHI), and with ``--csv`` one line per
conversion that left, keyed by opaque ID, with the time of the authorization it left under.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

if TYPE_CHECKING:
    from etl.disclosures import Accounting, Recall


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
    person: Annotated[
        Path | None,
        typer.Option(
            "--person",
            help="Account for one person instead: a file of 'email: ...', 'phone: ...' or "
            "'patient_id: ...' lines (a file, so no identifier lands in shell history).",
        ),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", metavar="", help="Print the counts as JSON.")] = False,
) -> None:
    """Account for what this clinic's database sent to Google and Meta, and under which consent.

    Counts every conversion a request carried in [since, until) (by the time one first did)
    per destination, stage and outcome (sent, accepted, rejected, already_sent, deferred after
    a request; a row our own checks refused never left), how many of
    them have the time of the marketing authorization they left under recorded (conversions
    planned by a version before this record existed have none), and the suppression-list
    syncs applied in the period with their adds and removes. Read-only; prints counts, never
    an identifier. The --csv file names conversions by opaque ID, the ID the platform holds:
    going back from it to a patient needs MEDSPA_ID_SECRET and the staging database.

    With --person FILE it answers for one person (an access or deletion request, a breach
    review): the identifiers are hashed as a run hashes them, widened to everyone linked to
    them (SPEC rule 2), and every conversion of theirs that left is counted (and listed with
    --csv), with the suppression-list entries holding their hashes now. It needs the
    MEDSPA_ID_SECRET the sends used. The identifiers are never printed. Examples:

        medspa-conversions disclosures --config clinic.yaml --since 2026-01-01 --until 2026-07-01

        medspa-conversions disclosures --config clinic.yaml --csv disclosures-2026H1.csv

        medspa-conversions disclosures --config clinic.yaml --person request-0042.txt --csv request-0042.csv
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
        url = cfg.resolved_database_url(database)
        if person is not None:
            identities = disclosures.read_person_file(person)
            with store.existing_for_reading(url) as (engine, columns):
                secret = _secret_for(engine, cfg.clinic_id)
                found = disclosures.recall(engine, cfg, secret, identities, since=start, until=end,
                                           columns=columns)  # fmt: skip
            _print_recall(found, json_out)
            if csv_out is not None:
                count = _write_csv(csv_out, iter(found.lines))
                cli.err.print(f"{count} conversion line(s) written to {csv_out}")
            return
        with store.existing_for_reading(url) as (engine, columns):
            accounting = disclosures.account(engine, cfg.clinic_id, since=start, until=end, columns=columns)
            lines = None
            if csv_out is not None:
                rows = disclosures.conversion_lines(
                    engine, cfg.clinic_id, since=start, until=end, columns=columns
                )
                lines = _write_csv(csv_out, rows)
    except MedspaError as exc:
        raise cli._fail(exc) from None
    if json_out:
        cli.out.print_json(json.dumps(accounting.as_json()))
    else:
        cli.out.print(_table(accounting))
    if lines is not None:
        cli.err.print(f"{lines} conversion line(s) written to {csv_out}")


def _write_csv(path: Path, lines: Iterator[tuple[str, ...]]) -> int:
    from etl import disclosures
    from etl.errors import ConfigError

    try:
        return disclosures.write_csv(path, lines)
    except OSError as exc:
        raise ConfigError(f"--csv: cannot write {path} ({exc.strerror or type(exc).__name__})") from None


def _secret_for(engine: Any, clinic_id: str) -> bytes:
    """The ID secret the sends used: a database that sent live needs the real one; a sandbox
    or dry-run database may use the development key (a warning says so)."""
    from etl import cli
    from etl.config import resolve_id_secret
    from etl.disclosures import sent_live

    secret, development = resolve_id_secret(real_send=sent_live(engine, clinic_id))
    if development:
        cli.err.print("[bold yellow]WARNING: MEDSPA_ID_SECRET is not set; matching with the DEVELOPMENT key "
                      "(right only for sends made with it)[/]")  # fmt: skip
    return secret


def _print_recall(found: Recall, json_out: bool) -> None:
    from collections import Counter

    from etl import cli

    left = Counter((line[0], line[1], line[3]) for line in found.lines)
    counts = {
        "persons": found.persons,
        "appointments": found.appointments,
        "leads": found.leads,
        "conversions": [
            {"destination": d, "stage": s, "status": st, "rows": n} for (d, s, st), n in sorted(left.items())
        ],
        "lists_now": found.lists,
    }
    if json_out:
        cli.out.print_json(json.dumps(counts))
        return
    table = Table(title=f"disclosures for one person: {found.persons} linked person(s), "
                  f"{found.appointments} appointment(s), {found.leads} lead(s)")  # fmt: skip
    table.add_column("destination", overflow="fold")
    table.add_column("stage", overflow="fold")
    table.add_column("outcome", overflow="fold")
    table.add_column("rows", justify="right")
    for (destination, stage, status), n in sorted(left.items()):
        table.add_row(destination, stage, status, str(n))
    for destination, n in sorted(found.lists.items()):
        table.add_row(destination, "list", "entries holding their hashes now", str(n))
    if found.persons == 0:
        table.caption = "no staged row matches these identifiers"
    cli.out.print(table)


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
    for (destination, target), counts in sorted(accounting.validated.items()):
        # validate-only requests: the platform checked and kept nothing, but the hashes left
        what = (
            f"{counts['conversions']} row(s)"
            if counts["conversions"]
            else f"+{counts['list_adds']} / -{counts['list_removes']}"
        )
        table.add_row(destination, "validate only", f"{what} carried ({target})", "", "")
    if (
        not accounting.conversions
        and not accounting.validated
        and not any(counts["syncs"] for counts in accounting.lists.values())
    ):
        table.caption = "nothing sent in this period"
    return table


def prune(
    config: Annotated[Path, typer.Option("--config", "-c", help="Clinic YAML file.")],
    older_than: Annotated[
        int | None,
        typer.Option(
            min=1, help="Days a run folder has not changed. Default: retention.run_files_days from the YAML."
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", metavar="", help="List what would be deleted; delete nothing.")
    ] = False,
    database: Annotated[
        str | None,
        typer.Option(
            "--database", help="SQLAlchemy URL of the staging database, whose audit chain records each prune."
        ),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", metavar="", help="Print the result as JSON.")] = False,
) -> None:
    """Delete the working files of this clinic's old run folders; keep each run's record.

    In every folder of this clinic under <yaml folder>/var/runs/ that has not changed for
    --older-than days: the outbox rows (hashed identifiers, click IDs, opaque IDs), the
    candidate file, and any hashed extracts or plan folders a stopped or killed run left are
    deleted; outbox/summary.json, results/*.json and
    report.html (counts only) stay, with pruned.json recording what was deleted and when. A
    folder a run is working in is left alone. What was sent stays in the send ledger; a pruned
    interval can be run again from its exports. An --outbox folder outside the run folder is
    not touched. Each folder pruned is also appended to the audit chain (run, files, bytes): a
    staging database that is not there stops the prune before anything is deleted (exit 2), as
    one that cannot be opened does (exit 7); --dry-run does not open it.
    With retention.run_files_days in the YAML every run's report step prunes too. Example:

        medspa-conversions prune --config clinic.yaml --older-than 90 --dry-run
    """
    from datetime import UTC, datetime, timedelta

    from etl import cli, store
    from etl.config import load_config
    from etl.errors import ConfigError, MachineError, MedspaError
    from etl.retention import audit_recorder, prune_runs, runs_dir

    try:
        cfg = load_config(config)
        days = older_than if older_than is not None else cfg.retention.run_files_days
        if days is None:
            raise ConfigError("say how old: --older-than DAYS, or retention.run_files_days in the YAML")
        now, older = datetime.now(UTC), timedelta(days=days)
        if dry_run:  # deletes nothing, so records nothing: the database is not opened
            results = list(prune_runs(cfg, older_than=older, now=now, dry_run=True))
        else:  # a database that cannot be opened (or is not there) stops the prune before anything is deleted
            say = lambda text: cli.err.print(text, highlight=False)  # noqa: E731
            with store.engine_for_existing(cfg.resolved_database_url(database), say=say) as engine:
                results = list(prune_runs(cfg, older_than=older, now=now,
                                          on_pruned=audit_recorder(engine, cfg.clinic_id, now)))  # fmt: skip
    except MedspaError as exc:
        raise cli._fail(exc) from None
    except OSError as exc:
        raise cli._fail(MachineError.of(exc, "prune")) from None
    done = [r for r in results if r.skipped is None]
    if json_out:
        cli.out.print_json(json.dumps({"dry_run": dry_run, "older_than_days": days,
                                       "runs": [vars(r) for r in results]}))  # fmt: skip
    else:
        verb = "would delete" if dry_run else "deleted"
        table = Table(title=f"prune: {runs_dir(cfg)}, unchanged for {days} days ({verb})")
        table.add_column("run", overflow="fold")
        table.add_column("files", justify="right")
        table.add_column("bytes", justify="right")
        for r in results:
            table.add_row(r.run_id, r.skipped or str(r.files), "" if r.skipped else f"{r.bytes:,}")
        if not results:
            table.caption = "nothing to prune"
        cli.out.print(table)
    total = sum(r.bytes for r in done)
    cli.err.print(f"{len(done)} run folder(s), {total:,} bytes {'to delete' if dry_run else 'deleted'}")


def verify_audit(
    config: Annotated[Path, typer.Option("--config", "-c", help="Clinic YAML file.")],
    database: Annotated[
        str | None, typer.Option("--database", help="SQLAlchemy URL of the staging database.")
    ] = None,
    head: Annotated[
        str | None,
        typer.Option(
            "--head",
            help="A chain head (sha256) a report logged, kept apart from the database: the chain "
            "must still hold it.",
        ),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", metavar="", help="Print the result as JSON.")] = False,
) -> None:
    """Check that the record of what was sent has not been changed since it was written.

    Every state a send recorded, every list sync, every run summary, every kill-switch stop and
    resume and every prune is appended to a hash-chained audit record (audit_chain) in the same
    transaction. This walks the chain link by link, then compares the send ledger,
    run_summaries, audience_sync_log and send_stops with it: an
    edited or deleted row in any of them is named by table and sequence number, destination or
    opaque ID, never by value. Read-only. Exits 0 when everything agrees, 1 when anything does
    not, 2 when the config is wrong or the database is not there (or is no staging database),
    7 when the database cannot be opened. A chain rewritten from some point on, with the tables, is found only against a head
    logged before (each report logs "audit chain head: seq N sha256 ..."): pass it with --head.

        medspa-conversions verify-audit --config clinic.yaml

        medspa-conversions verify-audit --config clinic.yaml --head 3f9c...e1
    """
    import sqlalchemy as sa

    from etl import audit, cli, store
    from etl.config import load_config
    from etl.errors import ConfigError, MedspaError

    try:
        if head is not None and (len(head) != 64 or any(c not in "0123456789abcdef" for c in head)):
            raise ConfigError("--head must be a sha256: 64 lowercase hex digits")
        cfg = load_config(config)
        with (
            store.existing_for_reading(cfg.resolved_database_url(database)) as (engine, _columns),
            engine.connect() as connection,
        ):
            conn = audit.snapshot(connection)  # an upload committing meanwhile is not tampering
            if audit.chain_dropped(conn):
                verdict = audit.Verdict()
                verdict.problem("audit_chain: the table is gone from a database made with one (dropped)")
            elif not sa.inspect(conn).has_table("audit_chain"):
                raise ConfigError(
                    "staging database: it holds no audit chain yet (made by an earlier version; "
                    "the next run, which opens it with this version, starts it)"
                )
            else:
                verdict = audit.verify(conn, cfg.clinic_id, anchor=head)
    except MedspaError as exc:
        raise cli._fail(exc) from None
    result = {
        "intact": verdict.intact,
        "records": verdict.records,
        "head": {"seq": verdict.head_seq, "sha256": verdict.head_sha256},
        "states_checked": verdict.states_checked,
        "problems": verdict.problems,
        "more_problems": verdict.more_problems,
    }
    if json_out:
        cli.out.print_json(json.dumps(result))
    else:
        verdict_line = "intact" if verdict.intact else "[bold red]NOT intact[/]"
        cli.out.print(f"audit chain of {cfg.clinic_id}: {verdict_line}; {verdict.records} records, "
                      f"head seq {verdict.head_seq} sha256 {verdict.head_sha256}")  # fmt: skip
        cli.out.print(f"ledger states checked against it: {verdict.states_checked}")
        for problem in verdict.problems:
            cli.out.print(f"  {problem}", markup=False, highlight=False)
        if verdict.more_problems:
            cli.out.print(f"  ... and {verdict.more_problems} more")
    if not verdict.intact:
        raise typer.Exit(code=1)


def register(app: typer.Typer) -> None:
    app.command()(disclosures)
    app.command()(prune)
    app.command("verify-audit")(verify_audit)
