"""``medspa-conversions doctor``: say what is missing or wrong before a live run, without secrets.

Every check returns ``(name, status)`` where status starts with ``ok``, ``missing`` or
``invalid``; no status ever contains a secret or a value from the data, so the output can be
pasted into a ticket.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

from etl.config import ID_SECRET_ENV, PLATFORM_DESTINATIONS, ClinicConfig


def _source_checks(config: ClinicConfig) -> list[tuple[str, str]]:
    """The exports as a run would open them: file, encoding and the profile's required columns
    (a renamed column in a vendor's new export fails here, not at 3 a.m.). SQL sources are
    checked for their query file only: running the query is the run's job."""
    from etl.errors import InputError
    from etl.extract import Kind, check_csv_header

    checks = []
    kinds: tuple[Kind, ...] = ("appointments", "leads")
    for kind in kinds:
        source = getattr(config.sources, kind)
        if source.path is not None:
            path: Path = config.resolve(source.path)
            if not path.is_file():
                status = f"missing file {path.name}"
            else:
                try:
                    status = f"ok ({check_csv_header(kind, source, config)} columns mapped)"
                except InputError as exc:  # names file, line and column, never a value
                    first = exc.problems[0]
                    more = len(exc.problems) - 1
                    status = f"invalid: {first}" + (f" (and {more} more)" if more else "")
        else:
            query = config.resolve(source.query) if source.query else None
            status = "ok" if query is not None and query.is_file() else "missing query file"
        checks.append((f"sources.{kind}", status))
    return checks


def _database_check(config: ClinicConfig, database: str | None) -> tuple[str, str]:
    url = config.resolved_database_url(database)
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        return ("staging database", "invalid: not a database URL (e.g. sqlite:///var/clinic.sqlite)")
    from etl.store import sqlite_path

    file = sqlite_path(url)  # a URI filename (file:...?mode=ro&uri=true) too
    if file is not None and not file.exists():
        if parsed.query.get("mode") == "ro":
            return (
                "staging database",
                f"invalid: no SQLite file at {file} (a read-only URI opens only one that exists)",
            )
        folder = file.parent
        existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
        if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK):
            return ("staging database", f"invalid: the SQLite file's folder {folder} cannot be created")
        return ("staging database", "ok (SQLite file will be created on the first run)")
    try:
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        engine.dispose()
    except Exception as exc:  # the class name is enough to act on; the text may carry a password
        return ("staging database", f"invalid: cannot connect ({type(exc).__name__})")
    return ("staging database", f"ok ({sa.engine.make_url(url).get_backend_name()})")


def legal_basis_checks(config: ClinicConfig, now: datetime) -> list[tuple[str, str]]:
    """The legal-basis registry entry of every configured platform, judged on the clinic's
    today: a live send to a platform without a current entry is refused."""
    today = now.astimezone(config.tz).date()
    checks = []
    for platform in PLATFORM_DESTINATIONS:
        if getattr(config, platform) is None:
            continue
        entry = getattr(config.compliance.legal_basis, platform)
        problem = config.legal_basis_problem(platform, today)
        if entry is None:
            status = "missing (a live send needs the clinic's legal basis on record)"
        elif problem is not None:
            status = (
                f"invalid: expired after {entry.valid_until.isoformat()} (review it, then move valid_until)"
            )
        else:
            left = config.legal_basis_days_left(platform, today)
            due = "" if left is None else f"; review due: {left} day(s) left, then live sends stop"
            status = f"ok ({entry.basis} until {entry.valid_until.isoformat()}{due})"
        checks.append((f"compliance.legal_basis.{platform}", status))
    return checks


def kill_switch_checks(config: ClinicConfig, database: str | None) -> list[tuple[str, str]]:
    """Each configured platform's kill switch (``etl.switches``), read without creating or
    changing anything: a database not made yet (or one made before the switch) stops nothing."""
    from etl import store, switches
    from etl.errors import MedspaError

    try:
        with (
            store.existing_for_reading(config.resolved_database_url(database)) as (engine, _),
            engine.connect() as conn,
        ):
            made = sa.inspect(conn).has_table("send_stops")
            stops = switches.stopped(conn, config.clinic_id) if made else {}
    except (MedspaError, sa.exc.SQLAlchemyError):  # the staging database check says what is wrong
        return []
    return [
        (f"kill switch.{platform}", "ok (sending)" if platform not in stops
         else f"{stops[platform].describe()} (`medspa-conversions resume-sending` lifts it)")
        for platform in PLATFORM_DESTINATIONS
        if getattr(config, platform) is not None
    ]  # fmt: skip


def send_ledger_check(config: ClinicConfig, database: str | None) -> list[tuple[str, str]]:
    """Is this the database the clinic's earlier live sends are recorded in (``ledger.claim_target``)?
    Read without creating anything; a database that cannot be read is the staging database
    check's to report."""
    from etl import ledger, store
    from etl.errors import MedspaError

    record = ledger.record_path(config.base_dir, config.clinic_id, "live")
    url = config.resolved_database_url(database)
    try:
        ledger.read_record(record)
    except MedspaError as exc:  # a record run would refuse: say so here too
        return [("send ledger", f"invalid: {exc}")]
    try:
        if store.sqlite_file_missing(url):
            mismatch = ledger.ledger_mismatch(None, config.clinic_id, "live", record)
        else:
            with store.existing_for_reading(url) as (engine, _):
                mismatch = ledger.ledger_mismatch(engine, config.clinic_id, "live", record)
    except (MedspaError, sa.exc.SQLAlchemyError):
        if record.exists():
            return []
        mismatch = None
    if mismatch is None:
        return [
            (
                "send ledger",
                "ok" if record.exists() else "ok (no live send yet: the first records this database)",
            )
        ]
    recorded, claim = mismatch
    here = (
        "has never sent"
        if claim is None
        else f"first sent in run {claim['first_run_id']} at {claim['claimed_at']}"
    )
    return [("send ledger", f"invalid: the clinic's live sends are recorded in the database first sent from in "
                            f"run {recorded['first_run_id']} at {recorded['claimed_at']}; this one {here} "
                            "(`run --help`: --new-database)")]  # fmt: skip


def zone_rules_check(config: ClinicConfig, now: datetime) -> tuple[str, str]:
    """Whether the clinic's zone reads the same in the time-zone data Python uses (the
    system's, when it has one) and in the pinned ``tzdata`` package, from a year before ``now``
    to a year after. They part when one is older than a change of the rules (British Columbia's
    in 2026): every clinic-local time, the schedule's midnights included, would then be an hour
    off on this machine and right on another."""
    import zoneinfo
    from datetime import timedelta
    from importlib import resources

    try:
        import tzdata
    except ImportError:
        return ("time zone rules", "ok (the tzdata package is not installed; optional)")
    try:
        with resources.files("tzdata.zoneinfo").joinpath(*config.timezone.split("/")).open("rb") as fobj:
            pinned = zoneinfo.ZoneInfo.from_file(fobj, key=config.timezone)
    except OSError:
        return (
            "time zone rules",
            f"ok (tzdata {tzdata.IANA_VERSION} has no {config.timezone} to compare; optional)",
        )
    used = config.tz
    start = (now - timedelta(days=366)).replace(minute=0, second=0, microsecond=0)
    for step in range(0, 2 * 366 * 24, 6):
        at = start + timedelta(hours=step)
        if at.astimezone(used).utcoffset() != at.astimezone(pinned).utcoffset():
            return ("time zone rules", f"invalid: {config.timezone} reads differently from "
                    f"{at:%Y-%m-%d} in this machine's time-zone data than in the pinned tzdata "
                    f"{tzdata.IANA_VERSION}: update the system's tzdata, or set PYTHONTZPATH to an "
                    "empty value so Python uses the pinned package")  # fmt: skip
    return ("time zone rules", f"ok (the same as tzdata {tzdata.IANA_VERSION})")


def needs_attention(status: str) -> bool:
    """Missing or invalid, unless the check itself says the item is optional."""
    return not status.startswith("ok") and "optional" not in status


def run_checks(
    config: ClinicConfig,
    environ: Mapping[str, str],
    *,
    database: str | None = None,
    now: datetime | None = None,
) -> list[tuple[str, str]]:
    """All readiness checks for a live run of one clinic (``now`` judges the legal-basis
    registry; default the clock)."""
    from etl.destinations.google_setup import doctor_google
    from etl.destinations.meta import doctor_meta

    secret = environ.get(ID_SECRET_ENV, "")
    checks = [("config", "ok"), *_source_checks(config), _database_check(config, database)]
    if not secret:
        checks.append((ID_SECRET_ENV, f"missing {ID_SECRET_ENV} (a live send refuses the development key)"))
    elif len(secret) < 16:
        checks.append((ID_SECRET_ENV, "invalid: shorter than 16 characters"))
    else:
        checks.append((ID_SECRET_ENV, "ok"))
    if config.google_ads is not None:
        checks.extend(doctor_google(config, environ))
    if config.meta is not None:
        checks.extend(doctor_meta(config, environ))
    checks.append(zone_rules_check(config, now or datetime.now(UTC)))
    checks.extend(legal_basis_checks(config, now or datetime.now(UTC)))
    checks.extend(kill_switch_checks(config, database))
    checks.extend(send_ledger_check(config, database))
    return checks
