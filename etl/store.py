"""Staging database: tables, bulk latest-wins upserts, the send ledger and audience sync state.

SQLite (a file beside the clinic YAML) is the embedded default; any SQLAlchemy URL works, and
PostgreSQL is the deployment target (issue #2, item 4). The DDL is kept in ``sql/schema.sql``
for readers and DBAs; these Core tables are the source of truth and create it.

Staged rows hold **hashed identifiers only**: raw emails, phones, names and addresses are hashed
in ``etl.identifiers`` before anything is written, and PHI-only columns are dropped at extract,
so the staging database holds pseudonymous data plus the clinic's own record IDs. Timestamps in
the bulk tables are UTC epoch microseconds (``BigInteger``): portable across SQLite and
PostgreSQL and several times faster to load and read back than text dates.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

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
)

send_ledger = sa.Table(
    "send_ledger",
    metadata,
    sa.Column("clinic_id", sa.String(64), primary_key=True),
    sa.Column("destination", sa.String(32), primary_key=True),
    sa.Column("opaque_id", sa.String(64), primary_key=True),
    sa.Column("stage", sa.String(16)),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("code", sa.String(64)),
    sa.Column("request_id", sa.String(128)),
    sa.Column("run_id", sa.String(200), nullable=False),
    sa.Column("planned_at", sa.DateTime(timezone=True)),
    sa.Column("sent_at", sa.DateTime(timezone=True)),
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
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


_BULK_TIMES = {
    "appointments": ("start_at", "updated_at", "consent_at", "consent_revoked_at"),
    "leads": ("created_at", "consent_at", "consent_revoked_at"),
}
_CHUNK = 50_000


def open_engine(url: str) -> Engine:
    """Create the engine and the tables (idempotent), creating a SQLite file's folder if needed."""
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        from pathlib import Path

        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, future=True)
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    metadata.create_all(engine)
    return engine


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def to_epoch_us(series: pd.Series) -> pd.Series:
    """UTC datetimes -> nullable Int64 microseconds since the epoch."""
    values = pd.to_datetime(series, utc=True)
    micros = values.to_numpy(dtype="datetime64[ns]").astype("int64") // 1000
    return pd.Series(pd.array(micros, dtype="Int64"), index=series.index).mask(values.isna().to_numpy())


def from_epoch_us(series: pd.Series) -> pd.Series:
    return pd.to_datetime(series.astype("float64"), unit="us", utc=True).astype("datetime64[ns, UTC]")


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

        buffer = io.StringIO()
        frame.to_csv(buffer, index=False, header=False, na_rep="\\N")
        buffer.seek(0)
        pg_cursor: Any = raw.cursor()
        pg_cursor.copy_expert(
            f"COPY {table.name} ({', '.join(cols)}) FROM STDIN WITH (FORMAT csv, NULL '\\N')", buffer
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


def _next_load_seq(conn: Connection, table: sa.Table, clinic_id: str) -> int:
    current = conn.execute(
        sa.select(sa.func.max(table.c.load_seq)).where(table.c.clinic_id == clinic_id)
    ).scalar()
    return int(current or 0) + 1


def _staged_batch(frame: pd.DataFrame, kind: str, clinic_id: str, seq: int, cols: list[str]) -> pd.DataFrame:
    staged = frame.assign(clinic_id=clinic_id, load_seq=seq)
    for col in _BULK_TIMES[kind]:
        staged[col] = to_epoch_us(staged[col])
    return staged[cols]


def upsert_staged(engine: Engine, kind: str, clinic_id: str, batches: Iterable[pd.DataFrame]) -> int:
    """Bulk-load one export into staging, latest wins, batch by batch in one transaction.

    Appointments replace a stored row when their ``updated_at`` is at least as new (a row with
    no ``updated_at`` counts as newest, since a later export is the best evidence we have);
    leads always replace (SPEC section 3: position in a later export is newer). On SQLite the
    driver's ``executemany`` upserts directly in one pass; elsewhere rows go to a temporary table
    (COPY on PostgreSQL) and one ``INSERT ... SELECT ... ON CONFLICT`` merges them set-wise.
    Batches keep memory flat: only one batch is ever held as Python objects.

    Returns:
        the number of rows in the export.
    """
    table = appointments if kind == "appointments" else leads
    key = "appointment_id" if kind == "appointments" else "lead_id"
    cols = [c.name for c in table.columns]
    updates = ", ".join(f"{c} = excluded.{c}" for c in cols if c not in ("clinic_id", key))
    newer = ""
    if kind == "appointments":
        newer = (
            " WHERE excluded.updated_at IS NULL OR appointments.updated_at IS NULL"
            " OR excluded.updated_at >= appointments.updated_at"
        )
    conflict = f"ON CONFLICT (clinic_id, {key}) DO UPDATE SET {updates}{newer}"
    col_list = ", ".join(cols)
    rows = 0
    with engine.begin() as conn:
        seq = _next_load_seq(conn, table, clinic_id)
        if conn.dialect.name == "sqlite":
            raw = conn.connection.dbapi_connection
            assert raw is not None
            sql = f"INSERT INTO {table.name} ({col_list}) VALUES ({', '.join('?' for _ in cols)}) {conflict}"
            cur = raw.cursor()
            for batch in batches:
                rows += len(batch)
                for chunk in _tuples(_staged_batch(batch, kind, clinic_id, seq, cols)):
                    cur.executemany(sql, chunk)
            cur.close()
            return rows
        tmp = sa.Table(
            f"tmp_{kind}",
            sa.MetaData(),
            *[sa.Column(c.name, c.type) for c in table.columns],
            prefixes=["TEMPORARY"],
        )
        tmp.drop(conn, checkfirst=True)
        tmp.create(conn)
        for batch in batches:
            rows += len(batch)
            bulk_insert(conn, tmp, _staged_batch(batch, kind, clinic_id, seq, cols))
        conn.execute(
            sa.text(
                f"INSERT INTO {table.name} ({col_list}) SELECT {col_list} FROM tmp_{kind} WHERE true {conflict}"
            )
        )
        tmp.drop(conn)
    return rows


def parquet_batches(path: Any, batch_rows: int = _CHUNK) -> Iterator[pd.DataFrame]:
    """A hashed extract read back in batches of plain columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
        # decode dictionaries here: a batch carries the whole file's dictionary, and turning that
        # into pandas categories per batch costs more than the batch itself
        columns = [c.dictionary_decode() if isinstance(c, pa.DictionaryArray) else c for c in batch.columns]
        yield pa.RecordBatch.from_arrays(columns, names=batch.schema.names).to_pandas()


# text columns that repeat a lot (a person's hashes on each of their rows, a handful of statuses)
_INTERNED = (*HASH_COLUMNS, "status", "currency", "location_id", "patient_id")


def read_staged(engine: Engine, kind: str, clinic_id: str, *, before: datetime) -> pd.DataFrame:
    """All staged rows of a clinic whose event time is before the run's ``end``, in key order.

    Rows from the future of ``end`` are invisible, so a backfill sees what a nightly run at that
    time would have seen of the event history (statuses are today's, latest wins). Rows are
    fetched in chunks and repeated text is interned (one string object per distinct value, as
    a person's hashes repeat on each of their rows), so the driver's row objects never exist for
    the whole table at once and the frame holds each distinct hash once.
    """
    table = appointments if kind == "appointments" else leads
    time_col, key = ("start_at", "appointment_id") if kind == "appointments" else ("created_at", "lead_id")
    before_us = int(before.timestamp() * 1_000_000)
    wanted = [c for c in table.columns if c.name not in ("clinic_id", "load_seq")]
    query = (
        sa.select(*wanted)
        .where(table.c.clinic_id == clinic_id, table.c[time_col] < before_us)
        .order_by(table.c[key])
    )
    names = [c.name for c in wanted]
    interned: dict[int, dict[str, str]] = {i: {} for i, name in enumerate(names) if name in _INTERNED}
    columns: list[list[Any]] = [[] for _ in names]
    with engine.connect() as conn:
        result = conn.execute(query)
        while chunk := result.fetchmany(_CHUNK):
            for i, values in enumerate(zip(*chunk, strict=True)):
                seen = interned.get(i)
                if seen is None:
                    columns[i].extend(values)
                else:
                    columns[i].extend(v if v is None else seen.setdefault(v, v) for v in values)
    frame = pd.DataFrame(
        {name: np.asarray(values, dtype=object) for name, values in zip(names, columns, strict=True)}
    )
    for col in _BULK_TIMES[kind]:
        frame[col] = from_epoch_us(frame[col])
    for col in ("is_test", "consent_marketing", *(("status_known",) if kind == "appointments" else ())):
        frame[col] = frame[col].astype(bool)
    if kind == "appointments":
        frame["revenue"] = frame["revenue"].astype(float)
    return frame


def replace_derived(
    engine: Engine,
    clinic_id: str,
    run_id: str,
    person_frame: pd.DataFrame,
    conv_frame: pd.DataFrame,
) -> None:
    """Replace the clinic's derived persons and conversions with this run's view (for inspection)."""
    with engine.begin() as conn:
        conn.execute(persons.delete().where(persons.c.clinic_id == clinic_id))
        conn.execute(conversions.delete().where(conversions.c.clinic_id == clinic_id))
        for table, frame in ((persons, person_frame), (conversions, conv_frame)):
            if frame.empty:
                continue
            staged = frame.assign(clinic_id=clinic_id, run_id=run_id)[[c.name for c in table.columns]]
            bulk_insert(conn, table, staged)


@contextmanager
def engine_for(url: str) -> Iterator[Engine]:
    engine = open_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()
