"""``medspa-conversions stop-sending`` / ``resume-sending``: the kill switch (``etl.switches``).

For the person on call when something looks wrong: one command stops every send of the clinic
to a platform, on every machine that sends from its database, within one batch; another lets
them go again. Both print every stop standing afterwards and are recorded in the audit chain.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from etl.switches import PLATFORMS, REASONS, Stop

Platform = StrEnum("Platform", [(p, p) for p in (*PLATFORMS, "all")])  # type: ignore[misc]
Reason = StrEnum("Reason", [(r, r) for r in REASONS])  # type: ignore[misc]

_CONFIG = typer.Option("--config", "-c", help="Clinic YAML file.")
_DATABASE = typer.Option(
    "--database", help="SQLAlchemy URL of the staging database (overrides database_url)."
)
_PLATFORM = typer.Option(
    "--platform", "-p", help="The platform to stop or resume (repeat it for both), or 'all'."
)


def _chosen(platforms: list[Platform]) -> list[str]:
    names = [str(p.value) for p in platforms]
    return list(PLATFORMS) if "all" in names else names


@contextmanager
def _switch_database(config: Path, database: str | None, what: str) -> Iterator[tuple[Any, Any]]:
    """The clinic's config and its staging database, which must exist already: a stop written to
    a new database (a typo in --database, a machine without MEDSPA_DATABASE_URL) would print
    "stopped" while every sender reads another one. A write the database refuses (locked past
    its busy timeout, unreachable) is a ``StagingError`` (exit 7) saying nothing was changed."""
    import sqlalchemy as sa

    from etl import cli, store
    from etl.config import load_config
    from etl.errors import MedspaError

    try:
        cfg = load_config(config)
        url = cfg.resolved_database_url(database)
        # exists, and is a staging database: not made here
        with store.engine_for_existing(url, say=lambda text: cli.err.print(text, highlight=False)) as engine:
            try:
                yield cfg, engine
            except sa.exc.DBAPIError as exc:
                raise store.refused(exc, f"{what}: the staging database refused it",
                                    "nothing was changed; run the command again") from None  # fmt: skip
    except MedspaError as exc:
        raise cli._fail(exc) from None


def _print_stops(clinic_id: str, stops: dict[str, Stop]) -> None:
    from etl import cli

    table = Table(title=f"sending of {clinic_id}")
    for column in ("platform", "state", "reason", "by", "since (UTC)"):
        table.add_column(column, overflow="fold")
    for platform in PLATFORMS:
        found = stops.get(platform)
        if found is None:
            table.add_row(platform, "[green]sending[/]", "", "", "")
        else:
            table.add_row(platform, "[bold red]stopped[/]", found.reason, found.stopped_by, found.stopped_at)
    cli.out.print(table)


def stop_sending(
    config: Annotated[Path, _CONFIG],
    platform: Annotated[list[Platform], _PLATFORM],
    reason: Annotated[Reason, typer.Option("--reason", help="Why, as a code (never free text).")],
    database: Annotated[str | None, _DATABASE] = None,
) -> None:
    """Stop every send of this clinic to a platform, now, from every machine (the kill switch).

    Writes a stop to the staging database, which every sender reads: uploads and list syncs of
    the platform are refused before they read its credentials (Airflow tasks fail without a
    retry, the CLI exits 10), and an upload already sending stops before its next batch. What
    was not sent stays planned in the send ledger, so a run after `resume-sending` sends it,
    once. A list sync already applying its list finishes that list. Dry runs still run. The
    stop, its reason code, your OS account and the time go into the audit chain. A platform
    already stopped keeps its first stop. The staging database must exist (the one the sends
    read: --database or the YAML's database_url); it is named on stderr.

        medspa-conversions stop-sending --config clinic.yaml --platform meta --reason incident

        medspa-conversions stop-sending --config clinic.yaml --platform all --reason legal_review
    """
    from etl import cli, switches

    chosen = _chosen(platform)
    with _switch_database(config, database, "stop-sending") as (cfg, engine):
        stops, added = switches.stop(engine, cfg.clinic_id, chosen, reason=str(reason.value),
                                     by=switches.operator(), at=datetime.now(UTC))  # fmt: skip
    for kept in (p for p in chosen if p not in added):
        cli.err.print(f"{kept}: already {stops[kept].describe()}; that stop is kept", highlight=False)
    _print_stops(cfg.clinic_id, stops)


def resume_sending(
    config: Annotated[Path, _CONFIG],
    platform: Annotated[list[Platform], _PLATFORM],
    database: Annotated[str | None, _DATABASE] = None,
) -> None:
    """Let this clinic's sends to a platform go again, after `stop-sending`.

    The next upload or list sync of the platform goes as usual: rerun a stopped run's interval
    (or wait for the next night's run, which carries what is still planned) to send what the stop
    held back. The resume, your OS account and the time go into the audit chain.

        medspa-conversions resume-sending --config clinic.yaml --platform meta
    """
    from etl import cli, switches

    with _switch_database(config, database, "resume-sending") as (cfg, engine):
        lifted = switches.resume(engine, cfg.clinic_id, _chosen(platform), by=switches.operator(),
                                 at=datetime.now(UTC))  # fmt: skip
        stops = switches.stopped(engine, cfg.clinic_id)
    for lift in lifted:
        cli.err.print(f"{lift.platform}: resumed (was {lift.describe()})", highlight=False)
    if not lifted:
        cli.err.print("nothing to resume: none of these platforms was stopped")
    _print_stops(cfg.clinic_id, stops)


def register(app: typer.Typer) -> None:
    app.command("stop-sending")(stop_sending)
    app.command("resume-sending")(resume_sending)
