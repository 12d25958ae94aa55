"""Staging database: the tables, the engine, bulk inserts (loading and reading staged exports is etl.staging).

SQLite (``<yaml folder>/var/<clinic_id>.sqlite``) is the embedded default; any SQLAlchemy URL
works, and PostgreSQL is the deployment target (issue #2, item 4). These Core tables are the source of
truth and create themselves; ``sql/schema.sql`` is their DDL generated for readers and DBAs
(``make schema``; a test keeps it current).

Staged rows hold **hashed identifiers only**: raw emails, phones, names and addresses are hashed
in ``etl.identifiers`` before anything is written, and PHI-only columns are dropped at extract,
so the staging database holds pseudonymous data plus the clinic's own record IDs. Timestamps in
the bulk tables are UTC epoch microseconds (``BigInteger``): portable across SQLite and
PostgreSQL and several times faster to load and read back than text dates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

if TYPE_CHECKING:
    from etl.errors import StagingError

metadata = sa.MetaData()

HASH_COLUMNS = (
    "em_g",
    "em_m",
    "ph_g",
    "ph_m",
    "fn_g",
    "ln_g",
    "fn_m",
    "ln_m",
    "ct_m",
    "st_m",
    "zp_m",
    "country_m",
    "postal_code",
    "country_code",
)
_CONSENT = ("consent_marketing", "consent_at", "consent_revoked_at")


def _hash_columns() -> list[sa.Column[Any]]:
    return [sa.Column(name, sa.String(64)) for name in HASH_COLUMNS]


appointments = sa.Table(
    "appointments",
    metadata,
    sa.Column("clinic_id", sa.String(64), primary_key=True),
    sa.Column("appointment_id", sa.String(128), primary_key=True),
    sa.Column("patient_id", sa.String(128)),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("status_known", sa.Boolean, nullable=False),
    sa.Column("start_at", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.BigInteger),
    sa.Column("revenue", sa.Float, nullable=False),
    sa.Column("currency", sa.String(3)),
    sa.Column("location_id", sa.String(128)),
    sa.Column("consent_marketing", sa.Boolean, nullable=False),
    sa.Column("consent_at", sa.BigInteger),
    sa.Column("consent_revoked_at", sa.BigInteger),
    sa.Column("is_test", sa.Boolean, nullable=False),
    *_hash_columns(),
    sa.Column("load_seq", sa.BigInteger, nullable=False),
)

leads = sa.Table(
    "leads",
    metadata,
    sa.Column("clinic_id", sa.String(64), primary_key=True),
    sa.Column("lead_id", sa.String(128), primary_key=True),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("gclid", sa.String(256)),
    sa.Column("gbraid", sa.String(256)),
    sa.Column("wbraid", sa.String(256)),
    sa.Column("fbclid", sa.String(512)),
    sa.Column("fbc", sa.String(512)),
    sa.Column("fbp", sa.String(256)),
    sa.Column("consent_marketing", sa.Boolean, nullable=False),
    sa.Column("consent_at", sa.BigInteger),
    sa.Column("consent_revoked_at", sa.BigInteger),
    sa.Column("is_test", sa.Boolean, nullable=False),
    *_hash_columns(),
    sa.Column("load_seq", sa.BigInteger, nullable=False),
)

persons = sa.Table(
    "persons",
    metadata,
    sa.Column("clinic_id", sa.String(64), primary_key=True),
    sa.Column("person_key", sa.String(64), primary_key=True),
    sa.Column("appointments", sa.Integer, nullable=False),
    sa.Column("leads", sa.Integer, nullable=False),
    sa.Column("run_id", sa.String(200), nullable=False),
)

conversions = sa.Table(
    "conversions",
    metadata,
    sa.Column("clinic_id", sa.String(64), primary_key=True),
    sa.Column("opaque_id", sa.String(64), primary_key=True),
    sa.Column("stage", sa.String(16), nullable=False),
    sa.Column("person_key", sa.String(64), nullable=False),
    sa.Column("event_time", sa.BigInteger, nullable=False),
    sa.Column("ready_at", sa.BigInteger, nullable=False),
    sa.Column("value", sa.Float),
    sa.Column("outcome", sa.String(32), nullable=False),
    sa.Column("run_id", sa.String(200), nullable=False),
    # the time of the marketing authorization in force at the run's end (SPEC rule 6), null
    # when none is: what a kept conversion is uploaded under
    sa.Column("consent_at", sa.BigInteger),
    sa.Column("consent_stated", sa.Boolean),  # False: the row's own time stood in for consent_at
)

# A platform's error code as recorded: Google Ads enum names run past 64 characters
# (ConversionUploadError.ORDER_ID_NOT_PERMITTED_FOR_EXTERNALLY_ATTRIBUTED_CONVERSION_ACTION)
CODE_WIDTH = 255

send_ledger = sa.Table(
    "send_ledger",
    metadata,
    sa.Column("clinic_id", sa.String(64), primary_key=True),
    sa.Column("destination", sa.String(32), primary_key=True),
    sa.Column("opaque_id", sa.String(64), primary_key=True),
    sa.Column("stage", sa.String(16)),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("code", sa.String(CODE_WIDTH)),
    sa.Column("request_id", sa.String(128)),
    sa.Column("run_id", sa.String(200), nullable=False),
    sa.Column("planned_at", sa.DateTime(timezone=True)),
    sa.Column("sent_at", sa.DateTime(timezone=True)),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    # the authorization the conversion left under: the time of the consent grant in force when
    # it was last planned (SPEC rule 6); kept when the person later revokes or the PMS
    # rewrites the row, so "under which consent?" still has an answer
    sa.Column("consent_at", sa.DateTime(timezone=True)),
    # whether the export stated that time; False: a consent flag without a time, the lead's
    # created_at or the appointment's start_at standing in (docs/decisions.md)
    sa.Column("consent_stated", sa.Boolean),
)

# Which opaque IDs name the same journey and stage (SPEC rules 4 and 11): before it sends, each
# real run's upload records, for every conversion its plan planned, the IDs the journey would
# carry at its other visits as the plan saw them (``recorded_at``: the latest plan time that
# saw the pair; ``horizon``: the furthest run end), and when plans looked at that conversion
# (``journey_views``, per run end, even when they saw no sibling). A pair holds until a look
# at either ID that saw at least as much left it out: planned later, over an interval reaching
# at least as far (a backfill of an earlier interval cannot see the later visit). Uploads skip a row whose journey the platform holds under a related
# ID (a late export moved the conversion to another visit, and an older run's upload is rerun
# after a newer run sent the journey). Opaque IDs only.
journey_siblings = sa.Table(
    "journey_siblings",
    metadata,
    sa.Column("clinic_id", sa.String(64), primary_key=True),
    sa.Column("opaque_id", sa.String(64), primary_key=True),
    sa.Column("sibling_id", sa.String(64), primary_key=True),
    sa.Column("run_id", sa.String(200), nullable=False),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("horizon", sa.DateTime(timezone=True), nullable=False),
    # the reverse lookup: with the primary key, each direction is one index search per ID
    # (SQLite reads every row of the clinic for an OR over the two columns)
    sa.Index("ix_journey_siblings_reverse", "clinic_id", "sibling_id", "opaque_id"),
)

journey_views = sa.Table(
    "journey_views",
    metadata,
    sa.Column("clinic_id", sa.String(64), primary_key=True),
    sa.Column("opaque_id", sa.String(64), primary_key=True),
    sa.Column("horizon", sa.DateTime(timezone=True), primary_key=True),
    sa.Column("viewed_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("run_id", sa.String(200), nullable=False),
)

audience_state = sa.Table(
    "audience_state",
    metadata,
    sa.Column("clinic_id", sa.String(64), primary_key=True),
    sa.Column("destination", sa.String(32), primary_key=True),
    sa.Column("member_key", sa.String(64), primary_key=True),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("synced_at", sa.DateTime(timezone=True), nullable=False),
)

# One row per applied suppression sync: the run's end it mirrored. A run whose end is older than
# the newest synced one (a backfill) leaves the lists alone: they mirror the present, and a
# past membership would re-add people who have revoked since.
audience_syncs = sa.Table(
    "audience_syncs",
    metadata,
    sa.Column("clinic_id", sa.String(64), primary_key=True),
    sa.Column("destination", sa.String(32), primary_key=True),
    sa.Column("run_id", sa.String(200), primary_key=True),
    sa.Column("run_end", sa.DateTime(timezone=True), nullable=False),
    sa.Column("synced_at", sa.DateTime(timezone=True), nullable=False),
)

# One row per list sync the platform confirmed (append-only): what it applied and when. The
# disclosure record for lists: ``audience_syncs`` holds only each run's latest sync, and run
# summaries only the latest attempt's counts.
audience_sync_log = sa.Table(
    "audience_sync_log",
    metadata,
    sa.Column("clinic_id", sa.String(64), primary_key=True),
    sa.Column("destination", sa.String(32), primary_key=True),
    sa.Column("run_id", sa.String(200), primary_key=True),
    sa.Column("synced_at", sa.DateTime(timezone=True), primary_key=True),
    sa.Column("adds", sa.Integer, nullable=False),
    sa.Column("removes", sa.Integer, nullable=False),
    sa.Column("full_resync", sa.Boolean, nullable=False),
)

# What validate-only requests carried (append-only): the platform checked these rows and kept
# nothing, but hashed identifiers left all the same, so the disclosure record counts them. One
# row per conversion a request carried (``opaque_id``), or per list sync's request (``adds`` and
# ``removes``: the members handed to it). Nothing here is read by a send: the ledger is not
# touched by a validate-only run.
validation_sends = sa.Table(
    "validation_sends",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("clinic_id", sa.String(64), nullable=False),
    sa.Column("destination", sa.String(32), nullable=False),
    sa.Column("target", sa.String(16), nullable=False),
    sa.Column("run_id", sa.String(200), nullable=False),
    sa.Column("sent_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("opaque_id", sa.String(64)),
    sa.Column("stage", sa.String(16)),
    sa.Column("code", sa.String(CODE_WIDTH)),
    sa.Column("request_id", sa.String(128)),
    sa.Column("adds", sa.Integer),
    sa.Column("removes", sa.Integer),
    sa.Index("ix_validation_sends_clinic_time", "clinic_id", "sent_at"),
)

# Adds handed to a platform whose outcome is not recorded yet: written before the request,
# cleared when the sync's result is recorded. A crash in between (or a failed batch the
# platform may have applied) leaves them here, and the next plan removes every one of them no
# longer wanted (removing a non-member is harmless on both platforms): a person who revoked
# meanwhile cannot stay on a list the synced state never knew they had joined.
audience_pending = sa.Table(
    "audience_pending",
    metadata,
    sa.Column("clinic_id", sa.String(64), primary_key=True),
    sa.Column("destination", sa.String(32), primary_key=True),
    sa.Column("member_key", sa.String(64), primary_key=True),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("run_id", sa.String(200)),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
)

# Which target (sandbox or live) a clinic's sends in this database go to. The ledger and the
# list state are not keyed by target, so a sandbox run on a live database would mark
# conversions as sent that never reached Google or Meta: the first target to send claims it.
ledger_targets = sa.Table(
    "ledger_targets",
    metadata,
    sa.Column("clinic_id", sa.String(64), primary_key=True),
    sa.Column("target", sa.String(16), nullable=False),
    sa.Column("run_id", sa.String(200), nullable=False),
    sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
)

# Who is sending to a clinic's destination right now (etl.leases): one sender at a time, across
# Airflow workers and CLI runs alike, so two processes never send the same batch.
send_leases = sa.Table(
    "send_leases",
    metadata,
    sa.Column("clinic_id", sa.String(64), primary_key=True),
    sa.Column("destination", sa.String(32), primary_key=True),
    sa.Column("holder", sa.String(300), nullable=False),
    sa.Column("run_id", sa.String(200), nullable=False),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("renewed_at", sa.DateTime(timezone=True), nullable=False),
)

# Data Manager requests whose processing is checked later (``etl.confirm``): the API answers an
# ingest with a request ID only, and processes it asynchronously (Google: retrieve the status
# 30 minutes on, with backoff, until SUCCESS, PARTIAL_SUCCESS or FAILED). Written in the same
# transaction as the outcomes the request carried, so no answered request goes unchecked.
# ``errors`` is the status's error counts as JSON (reason -> records): counts, never values.
request_checks = sa.Table(
    "request_checks",
    metadata,
    sa.Column("clinic_id", sa.String(64), primary_key=True),
    sa.Column("destination", sa.String(32), primary_key=True),
    sa.Column("request_id", sa.String(128), primary_key=True),
    sa.Column("method", sa.String(40), nullable=False),
    sa.Column("run_id", sa.String(200), nullable=False),
    sa.Column("records", sa.Integer, nullable=False),
    sa.Column("sent_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("errors", sa.Text),
    sa.Column("checks", sa.Integer, nullable=False),
    sa.Column("checked_at", sa.DateTime(timezone=True)),
    sa.Index("ix_request_checks_open", "clinic_id", "destination", "status"),
)

# The kill switch (etl.switches): a row stops every send of the clinic to the platform, from
# this database and so from every machine that sends from it; its removal resumes them. Both
# go into the audit chain, so a row removed or edited outside the switch shows.
send_stops = sa.Table(
    "send_stops",
    metadata,
    sa.Column("clinic_id", sa.String(64), primary_key=True),
    sa.Column("platform", sa.String(16), primary_key=True),
    sa.Column("reason", sa.String(32), nullable=False),
    sa.Column("stopped_by", sa.String(64), nullable=False),
    sa.Column("stopped_at", sa.String(40), nullable=False),  # ISO UTC text, as the chain holds it
)

run_summaries = sa.Table(
    "run_summaries",
    metadata,
    sa.Column("run_id", sa.String(200), primary_key=True),
    sa.Column("recorded_at", sa.DateTime(timezone=True), primary_key=True),
    sa.Column("clinic_id", sa.String(64), nullable=False),
    sa.Column("start", sa.String(40), nullable=False),
    sa.Column("end", sa.String(40), nullable=False),
    sa.Column("dry_run", sa.Boolean, nullable=False),
    sa.Column("target", sa.String(16), nullable=False),
    sa.Column("summary", sa.Text, nullable=False),
)

# Append-only and hash-chained (etl.audit): every send-ledger write, every list sync applied and
# every run summary, in the order they were written; opaque IDs, codes, request IDs, times and
# counts only. Each row's sha256 covers the one before, so an edit or removal
# here, or in the tables it mirrors, shows (``medspa-conversions verify-audit``).
audit_chain = sa.Table(
    "audit_chain",
    metadata,
    sa.Column("clinic_id", sa.String(64), primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("recorded_at", sa.String(40), nullable=False),  # ISO UTC text: hashed as stored
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("run_id", sa.String(200), nullable=False),
    sa.Column("record", sa.Text, nullable=False),
    sa.Column("prev_sha256", sa.String(64), nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
)

# One row per expectation per run (etl.quality): names and counts only, never a value.
quality_results = sa.Table(
    "quality_results",
    metadata,
    sa.Column("run_id", sa.String(200), primary_key=True),
    sa.Column("suite", sa.String(64), primary_key=True),
    sa.Column("expectation", sa.String(64), primary_key=True),
    sa.Column("clinic_id", sa.String(64), nullable=False),
    sa.Column("severity", sa.String(16), nullable=False),
    sa.Column("success", sa.Boolean, nullable=False),
    sa.Column("unexpected_count", sa.BigInteger),
    sa.Column("element_count", sa.BigInteger),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
)


_CHUNK = 50_000
_SCHEMA_LOCK = 0x6D6564737061  # "medspa": the advisory lock key creating the tables takes


def open_engine(url: str) -> Engine:
    """Create the engine and the tables (idempotent), creating a SQLite file's folder if needed.

    Raises:
        ConfigError: the URL is not one SQLAlchemy can use, or a SQLite file's folder cannot
            be made.
        StagingError: the database cannot be opened or reached (error class and SQLSTATE only:
            a driver's message can carry the URL with its password).
    """
    from etl.errors import ConfigError

    # a URI filename (sqlite:///file:...?mode=ro&uri=true) names no folder to make
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:" and not url.startswith("sqlite:///file:"):
        folder = Path(url[len("sqlite:///") :]).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"staging database: cannot create the folder {folder} ({type(exc).__name__})"
            ) from None
    engine = _create(url)
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    try:
        with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                # the first night of a deployment opens an empty database from several task
                # processes at once; without the lock all but one lose the CREATE TABLE race
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK})
            from etl.audit import chain_dropped, write_baselines

            chained = sa.inspect(conn).has_table("audit_chain")
            # a dropped chain is not restarted from the tables as they are now: that would
            # certify whatever was edited before the drop (verify-audit reports it instead)
            dropped = chain_dropped(conn)
            metadata.create_all(conn)
            _upgrade(conn)
            if not chained and not dropped:  # the chain starts from what an earlier version left
                write_baselines(conn)
    except sa.exc.DBAPIError as exc:
        engine.dispose()
        raise _cannot_open(exc) from None
    return engine


def _create(url: str) -> Engine:
    from etl.errors import ConfigError

    try:
        # hide_parameters: a failing statement's error text then carries no row values
        return sa.create_engine(url, future=True, hide_parameters=True)
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError, ImportError) as exc:
        raise ConfigError(
            f"staging database: not a database URL SQLAlchemy can use ({type(exc).__name__}); "
            "expected e.g. sqlite:///var/clinic.sqlite or postgresql+psycopg2://user@host/db"
        ) from None


def _cannot_open(exc: sa.exc.DBAPIError) -> Exception:
    from etl.errors import StagingError

    code = getattr(exc.orig, "pgcode", None) or getattr(exc.orig, "sqlite_errorname", None)
    # a full disk or a read-only file is not a wrong URL: say which to look at
    storage = str(code or "").startswith(("SQLITE_FULL", "SQLITE_IOERR", "SQLITE_READONLY", "53"))
    hint = (
        "check that its disk has space and its file and folder are writable"
        if storage
        else "check --database / database_url / MEDSPA_DATABASE_URL and that it is reachable"
    )
    error = StagingError(
        f"staging database: cannot open it ({type(exc.orig).__name__}"
        + (f", {code}" if code else "")
        + f"); {hint}"
    )
    # a server restarting or a file another night holds locked lets a later try pass (a DAG
    # task's retries take it up); a full disk, a read-only file or a wrong schema does not
    error.retryable = exc.orig is not None and not storage and passes_on_retry(exc.orig)
    return error


_AUDIT_TABLES = ("ledger_targets", "audience_state", "audience_sync_log")


def sqlite_path(url: str) -> Path | None:
    """The file a SQLite URL names, plain (``sqlite:///var/x.sqlite``) or as a URI filename
    (``sqlite:///file:/copy.sqlite?mode=ro&uri=true``); None for other databases, an in-memory
    one, or a URL that is not one."""
    from urllib.parse import unquote, urlsplit

    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        return None
    database = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or database in ("", ":memory:"):
        return None
    if database.startswith("file:"):
        path = unquote(urlsplit(database).path)
        return None if not path or parsed.query.get("mode") == "memory" else Path(path)
    return Path(database)


def sqlite_file_missing(url: str) -> bool:
    """A SQLite URL naming a file that is not there (or an in-memory database): opening it makes
    a new, empty one (a read-only URI filename fails instead). False for other databases."""
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        return False  # opening it says what is wrong
    if parsed.get_backend_name() != "sqlite":
        return False
    path = sqlite_path(url)
    return path is None or not path.is_file()


@contextmanager
def existing_for_reading(url: str) -> Iterator[tuple[Engine, set[str]]]:
    """Open a staging database that must already exist, for reading only: nothing is created
    or upgraded (an audit of a copy, or of a read-only file, must not change it), and a wrong
    URL is an error rather than a new, empty database that reads as "nothing sent".

    Yields:
        the engine and the columns ``send_ledger`` has (an earlier version's lacks some).

    Raises:
        ConfigError: no such SQLite file, or the database holds no send ledger.
        StagingError: it cannot be opened or reached.
    """
    from etl.errors import ConfigError

    engine = _create(url)
    try:
        if engine.dialect.name == "sqlite":
            if sqlite_file_missing(url):
                raise ConfigError(f"staging database: no SQLite file at {engine.url.database or '(memory)'}")

            def read_only(dbapi_conn: Any, _record: Any) -> None:
                dbapi_conn.execute("PRAGMA query_only=ON")

            sa.event.listen(engine, "connect", read_only)
        try:
            with engine.connect() as conn:
                inspector = sa.inspect(conn)
                if not inspector.has_table("send_ledger"):
                    raise ConfigError(
                        "staging database: it holds no send ledger (not this tool's staging database, "
                        "or nothing was ever sent from it); check --database / database_url"
                    )
                missing = [t for t in _AUDIT_TABLES if not inspector.has_table(t)]
                if missing:
                    raise ConfigError(
                        f"staging database: made by an earlier version (no {', '.join(missing)}); "
                        "open it once with this version (`doctor` or a run) to bring it up to date"
                    )
                columns = {c["name"] for c in inspector.get_columns("send_ledger")}
        except sa.exc.DBAPIError as exc:
            raise _cannot_open(exc) from None
        yield engine, columns
    finally:
        engine.dispose()


# Columns added after their table was first released: a database an earlier version created
# gains them (nullable, so its existing rows stay valid and read as "not recorded").
_ADDED_COLUMNS = (
    ("conversions", "consent_at"),
    ("conversions", "consent_stated"),
    ("send_ledger", "consent_at"),
    ("send_ledger", "consent_stated"),
)


def _upgrade(conn: Connection) -> None:
    """Bring tables an earlier version created up to this one's (``create_all`` only adds
    missing tables). PostgreSQL enforces text widths; SQLite does not."""
    inspector = sa.inspect(conn)
    for table_name, column_name in _ADDED_COLUMNS:
        if column_name not in {c["name"] for c in inspector.get_columns(table_name)}:
            column = metadata.tables[table_name].c[column_name]
            kind = column.type.compile(dialect=conn.dialect)
            try:
                conn.execute(sa.text(f"ALTER TABLE {table_name} ADD COLUMN {column_name} {kind}"))
            except sa.exc.OperationalError:
                # another process opening the same SQLite file added it first (PostgreSQL
                # serializes this behind the schema lock)
                if column_name not in {c["name"] for c in sa.inspect(conn).get_columns(table_name)}:
                    raise
    if conn.dialect.name != "postgresql":
        return
    width = conn.execute(
        sa.text(
            "SELECT character_maximum_length FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = 'send_ledger' AND column_name = 'code'"
        )
    ).scalar()
    if width is not None and width < CODE_WIDTH:
        conn.execute(sa.text(f"ALTER TABLE send_ledger ALTER COLUMN code TYPE VARCHAR({CODE_WIDTH})"))


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    # 64 MiB of page cache instead of 2: staging and the derived tables insert hundreds of
    # thousands of rows into primary-key indexes, which thrash a small cache
    cur.execute("PRAGMA cache_size=-65536")
    cur.close()


def to_epoch_us(series: pd.Series) -> pd.Series:
    """UTC datetimes -> nullable Int64 microseconds since the epoch."""
    values = pd.to_datetime(series, utc=True)
    micros = values.to_numpy(dtype="datetime64[ns]").astype("int64") // 1000
    return pd.Series(pd.array(micros, dtype="Int64"), index=series.index).mask(values.isna().to_numpy())


def _records(frame: pd.DataFrame) -> Iterator[list[dict[str, Any]]]:
    """Chunks of row dicts with pandas nulls turned into None for the DB driver."""
    for lo in range(0, len(frame), _CHUNK):
        chunk = frame.iloc[lo : lo + _CHUNK].astype(object)
        yield [
            {str(k): (None if pd.isna(v) else v) for k, v in row.items()} for row in chunk.to_dict("records")
        ]


def _tuples(frame: pd.DataFrame) -> Iterator[list[tuple[Any, ...]]]:
    """Chunks of plain tuples (None for nulls, Python scalars) for a DB-API ``executemany``."""
    for lo in range(0, len(frame), _CHUNK):
        chunk = frame.iloc[lo : lo + _CHUNK]
        columns = []
        for name in chunk.columns:
            col = chunk[name]
            values = col.to_numpy(dtype=object)
            if col.hasnans:
                values[col.isna().to_numpy()] = None
            columns.append(values.tolist())
        yield list(zip(*columns, strict=True))


def bulk_insert(conn: Connection, table: sa.Table, frame: pd.DataFrame) -> None:
    """Insert a frame fast: the driver's ``executemany`` on tuples, or COPY on PostgreSQL.

    SQLAlchemy's dict-per-row path costs about ten times more per row at a million rows, and
    staging is the one place where the pipeline writes every input row.
    """
    if frame.empty:
        return
    cols = list(frame.columns)
    raw = conn.connection.dbapi_connection
    assert raw is not None
    if conn.dialect.name == "postgresql":
        import io
        import uuid

        buffer = io.StringIO()
        # a null marker no cell can hold: a literal "\N" in an export would otherwise turn into NULL
        null = f"NULL-{uuid.uuid4().hex[:16]}"  # short: pandas cuts a long na_rep in float columns
        frame.to_csv(buffer, index=False, header=False, na_rep=null)
        buffer.seek(0)
        pg_cursor: Any = raw.cursor()
        pg_cursor.copy_expert(
            f"COPY {table.name} ({', '.join(cols)}) FROM STDIN WITH (FORMAT csv, NULL '{null}')", buffer
        )
        pg_cursor.close()
        return
    if conn.dialect.name == "sqlite":
        sql = f"INSERT INTO {table.name} ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})"
        cur = raw.cursor()
        for chunk in _tuples(frame):
            cur.executemany(sql, chunk)
        cur.close()
        return
    for records in _records(frame):
        conn.execute(table.insert(), records)


def exclusive(conn: Connection, *key: str) -> None:
    """Serialize this transaction with any other taking the same ``key``, until it ends.

    For "delete, then insert" rewrites: on PostgreSQL a second writer's delete cannot see the
    first's uncommitted rows, so its insert then hits the primary key (two runs of one clinic
    at once). SQLite serializes writers by itself; PostgreSQL takes a transaction-scoped
    advisory lock on a 64-bit key derived from ``key``.
    """
    if conn.dialect.name == "postgresql":
        import hashlib

        digest = hashlib.blake2b("\x1f".join(key).encode(), digest_size=8).digest()
        lock = int.from_bytes(digest, "big", signed=True)
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": lock})


def replace_derived(
    engine: Engine,
    clinic_id: str,
    run_id: str,
    person_frame: pd.DataFrame,
    conv_frame: pd.DataFrame,
) -> None:
    """Replace the clinic's derived persons and conversions with this run's view (for inspection)."""
    with engine.begin() as conn:
        exclusive(conn, "derived", clinic_id)
        conn.execute(persons.delete().where(persons.c.clinic_id == clinic_id))
        conn.execute(conversions.delete().where(conversions.c.clinic_id == clinic_id))
        for table, frame in ((persons, person_frame), (conversions, conv_frame)):
            if frame.empty:
                continue
            staged = frame.assign(clinic_id=clinic_id, run_id=run_id)[[c.name for c in table.columns]]
            # in primary-key order, so index pages fill one after another
            key = "person_key" if table is persons else "opaque_id"
            bulk_insert(conn, table, staged.sort_values(key, kind="stable"))


@contextmanager
def engine_for(url: str) -> Iterator[Engine]:
    engine = open_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


def shown_url(url: str) -> str:
    """A database URL fit to print: its password hidden, in the ``user:password@`` part and in
    a query parameter a driver takes as the password (``?password=``: SQLAlchemy hides only
    the first). A URL from ``--database`` or ``MEDSPA_DATABASE_URL`` may carry either."""
    from etl.config import PASSWORD_PARAMETERS

    parsed = sa.engine.make_url(url)
    hidden = {k: "***" for k in parsed.query if k.strip().lower() in PASSWORD_PARAMETERS}
    return parsed.update_query_dict(hidden).render_as_string(hide_password=True)


@contextmanager
def engine_for_existing(url: str, *, say: Callable[[str], None] | None = None) -> Iterator[Engine]:
    """``engine_for`` a staging database that must exist already: a command that records
    something in it (a stop, a prune) or renders from it must not make a new, empty one at a
    mistyped URL and report success. ``say`` is given which database it is (no password).

    Raises:
        ConfigError: no such SQLite file, or not a staging database (``existing_for_reading``).
    """
    with existing_for_reading(url):
        pass
    if say is not None:
        say(f"staging database: {shown_url(url)}")
    with engine_for(url) as engine:
        yield engine


def schema_ddl(dialect: str = "postgresql") -> str:
    """The tables' DDL for one dialect, as ``sql/schema.sql`` holds it."""
    from sqlalchemy.dialects import postgresql, sqlite
    from sqlalchemy.schema import CreateIndex, CreateTable

    target = {"postgresql": postgresql.dialect(), "sqlite": sqlite.dialect()}[dialect]
    header = (
        "-- Generated from etl/store.py (the source of truth) by `make schema`; do not edit.\n"
        f"-- Dialect: {dialect}. The pipeline creates these tables itself on first use.\n"
    )
    statements: list[Any] = [CreateTable(t) for t in metadata.sorted_tables]
    statements += [
        CreateIndex(i) for t in metadata.sorted_tables for i in sorted(t.indexes, key=lambda i: str(i.name))
    ]
    body = ";\n".join(str(s.compile(dialect=target)).strip() for s in statements)
    return header + "\n" + "\n".join(line.rstrip() for line in f"{body};".splitlines()) + "\n"


def refused(exc: BaseException, what: str, consequence: str) -> StagingError:
    """A ``StagingError`` for a database refusal: ``what`` failed, with the error class and
    SQLSTATE (or SQLite's error name) only, never the driver's message, which quotes the
    offending row, then what it means; ``retryable`` when a later attempt can pass."""
    from etl.errors import StagingError

    cause = getattr(exc, "orig", None) or exc
    code = getattr(cause, "pgcode", None) or getattr(cause, "sqlite_errorname", None) or "unknown"
    error = StagingError(f"{what} ({type(cause).__name__}, code {code}); {consequence}")
    error.retryable = passes_on_retry(cause)
    return error


def passes_on_retry(cause: BaseException) -> bool:
    """A refusal that a later try can get past: a locked SQLite file (another night of a
    backfill staging beyond the busy timeout), a lost PostgreSQL connection, a deadlock or a
    server shutting down. Refused data (integrity, type, a missing table) does not pass."""
    sqlite_name = getattr(cause, "sqlite_errorname", None)
    if sqlite_name is not None:
        return str(sqlite_name).startswith(("SQLITE_BUSY", "SQLITE_LOCKED"))
    if type(cause).__name__ != "OperationalError":
        return False
    pgcode = getattr(cause, "pgcode", None)
    return pgcode is None or str(pgcode).startswith(("08", "40", "53", "57P"))
