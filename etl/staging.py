"""Staging in bulk: load a hashed extract latest-wins, and read the staged history back.

Staging is the one place that writes and reads every input row (a million appointments are
about a gigabyte of hashes), so the Python work per cell is kept to a minimum:

- Loading turns a dictionary column's distinct values into Python strings once per file (a
  person's hashes repeat, so each distinct value is one shared string) and everything else into
  Python objects one chunk at a time, and hands the driver plain tuples: ``executemany`` of one
  ``INSERT ... ON CONFLICT`` on SQLite; a temporary table filled
  by COPY and one set-wise ``INSERT ... SELECT ... ON CONFLICT`` elsewhere (PostgreSQL).
- When the database holds exactly the rows of this run's extract (a first load, or a full
  re-export that replaced every row), the history is read from the extract's Parquet file
  instead of the database: ``load_extract`` reports the load's sequence number and whether it
  was exact, ``write_marker`` records that beside the extract, and ``load_staged`` uses the file
  only if the database still shows that one load and nothing else. Otherwise the history is read
  from the database in chunks. Both paths return the same frame (a test compares them).

Only the standard ``sqlite3`` module touches SQLite files: a second SQLite library in the same
process (an ADBC driver, say) would not see this one's locks, which is how SQLite files get
corrupted.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from etl import store
from etl.store import HASH_COLUMNS, appointments, bulk_insert, leads, to_epoch_us

TABLES = {"appointments": appointments, "leads": leads}
KEYS = {"appointments": "appointment_id", "leads": "lead_id"}
TIME_COLUMN = {"appointments": "start_at", "leads": "created_at"}
TIMES = {
    "appointments": ("start_at", "updated_at", "consent_at", "consent_revoked_at"),
    "leads": ("created_at", "consent_at", "consent_revoked_at"),
}
BOOLS = {
    "appointments": ("status_known", "consent_marketing", "is_test"),
    "leads": ("consent_marketing", "is_test"),
}
# what a row dated at or after the run's end still tells: who the person is, and their consent
LATER_COLUMNS = {
    "appointments": ("appointment_id", "patient_id", "em_g", "ph_g", "is_test", "start_at",
                     "consent_marketing", "consent_at", "consent_revoked_at"),
    "leads": ("lead_id", "em_g", "ph_g", "is_test", "created_at", "consent_marketing", "consent_at",
              "consent_revoked_at"),
}  # fmt: skip
# a record's recency, for sparing records newer than a complete export (first non-null wins)
_RECENCY = {"appointments": ("updated_at", "start_at"), "leads": ("created_at",)}
MARKER = "staged.json"
_CHUNK = 50_000
_ALL_ROWS = str(2**31 - 1)  # one Arrow batch: the driver infers column types from the first batch


@dataclass(frozen=True)
class Loaded:
    """What one load did: rows in the export, its sequence number, and whether staging now holds
    exactly this export's rows (nothing older survived, nothing in the export lost to a newer row)."""

    rows: int
    load_seq: int
    exact: bool
    deleted: int = 0  # staged records a complete export no longer held


def _merge_sql(kind: str, source: str | None) -> str:
    """Latest wins: appointments by ``updated_at``, else (either lacks one, or they are equal)
    by the later export, as leads always are. The later export is the one with the higher
    ``load_seq``, its extraction time (``load_extract``): an older night's extract staged after a
    newer one's (a stage step retried, backfill nights staging out of order) must not put its
    older rows, a consent since revoked, back over the newer.

    With ``source`` None the statement takes one row of parameters (for ``executemany``, which
    applies rows in export order); otherwise it merges a whole table set-wise.
    """
    table, key = TABLES[kind], KEYS[kind]
    cols = [c.name for c in table.columns]
    col_list = ", ".join(cols)
    updates = ", ".join(f"{c} = excluded.{c}" for c in cols if c not in ("clinic_id", key))
    newer = f" WHERE excluded.load_seq >= {table.name}.load_seq"
    if kind == "appointments":
        newer = (
            " WHERE (excluded.updated_at > appointments.updated_at)"
            " OR ((excluded.updated_at IS NULL OR appointments.updated_at IS NULL"
            " OR excluded.updated_at = appointments.updated_at)"
            " AND excluded.load_seq >= appointments.load_seq)"
        )
    rows = (
        f"VALUES ({', '.join('?' for _ in cols)})"
        if source is None
        else f"SELECT {col_list} FROM {source} WHERE true"
    )
    return f"INSERT INTO {table.name} ({col_list}) {rows} ON CONFLICT (clinic_id, {key}) DO UPDATE SET {updates}{newer}"


def _staged_columns(
    source: pa.Table | pa.RecordBatch, kind: str, clinic_id: str, seq: int, *, decode: bool
) -> pa.Table:
    """Extract columns as the staged table's: UTC epoch microseconds, plain (or dictionary) strings."""
    n = source.num_rows
    arrays: list[Any] = []
    for column in TABLES[kind].columns:
        name = column.name
        if name == "clinic_id":
            arrays.append(pa.repeat(pa.scalar(clinic_id, pa.string()), n))
        elif name == "load_seq":
            arrays.append(pa.repeat(pa.scalar(seq, pa.int64()), n))
        elif name not in source.schema.names:
            arrays.append(pa.nulls(n, pa.string()))
        elif name in TIMES[kind]:
            arrays.append(_epoch_us(source.column(name)))
        else:
            arr = source.column(name)
            if pa.types.is_dictionary(arr.type) and decode:
                arr = arr.cast(arr.type.value_type)
            if pa.types.is_large_string(arr.type) or pa.types.is_null(arr.type):
                arr = arr.cast(pa.string())
            arrays.append(arr)
    return pa.table(arrays, names=[c.name for c in TABLES[kind].columns])


def _epoch_us(times: Any) -> pa.Array:
    """Timestamps -> int64 microseconds, flooring finer units (as ``store.to_epoch_us`` does)."""
    if isinstance(times, pa.ChunkedArray):
        times = times.combine_chunks()
    unit = times.type.unit if pa.types.is_timestamp(times.type) else "us"
    raw = pc.cast(times, pa.int64())
    if unit == "us":
        return raw
    if unit in ("s", "ms"):
        return pc.multiply(raw, {"s": 1_000_000, "ms": 1_000}[unit])
    floored = np.floor_divide(raw.fill_null(0).to_numpy(), 1000)
    return pa.array(floored, mask=raw.is_null().to_numpy(zero_copy_only=False))


def _batches(path: Path, kind: str, clinic_id: str, seq: int) -> Iterator[pd.DataFrame]:
    """The extract in batches of plain columns, for databases loaded through SQLAlchemy."""
    cols = [c.name for c in TABLES[kind].columns]
    for batch in pq.ParquetFile(path).iter_batches(batch_size=_CHUNK):
        columns = [c.dictionary_decode() if isinstance(c, pa.DictionaryArray) else c for c in batch.columns]
        frame = pa.RecordBatch.from_arrays(columns, names=batch.schema.names).to_pandas()
        frame = frame.assign(clinic_id=clinic_id, load_seq=seq)
        for col in TIMES[kind]:
            frame[col] = to_epoch_us(frame[col])
        for col in cols:
            if col not in frame.columns:
                frame[col] = None
        yield frame[cols]


def _state(conn: Connection, kind: str, clinic_id: str) -> tuple[int, int, int]:
    """(rows, lowest load_seq, highest load_seq) staged for the clinic."""
    table = TABLES[kind]
    query = sa.select(sa.func.count(), sa.func.min(table.c.load_seq), sa.func.max(table.c.load_seq))
    count, lo, hi = conn.execute(query.where(table.c.clinic_id == clinic_id)).one()
    return int(count), int(lo or 0), int(hi or 0)


def _row_chunks(path: Path, kind: str, clinic_id: str, seq: int) -> Iterator[list[tuple[Any, ...]]]:
    """The extract as chunks of plain tuples in the staged table's column order.

    A dictionary column's distinct values become Python strings once for the whole file
    (converting its dictionary batch by batch would convert the whole dictionary every time);
    everything else becomes Python objects one chunk at a time, so the load never holds the
    whole file as Python objects.
    """
    table = _staged_columns(pq.read_table(path), kind, clinic_id, seq, decode=False)
    columns: list[Any] = []
    for name in table.column_names:
        arr = table.column(name)
        if pa.types.is_dictionary(arr.type):
            codes = arr.combine_chunks()
            values = np.asarray([*codes.dictionary.to_pylist(), None], dtype=object)
            columns.append((values, codes.indices.cast(pa.int64()).fill_null(len(values) - 1).to_numpy()))
        else:
            columns.append(arr)
    for lo in range(0, table.num_rows, _CHUNK):
        parts = []
        for column in columns:
            if isinstance(column, tuple):
                values, indices = column
                parts.append(values.take(indices[lo : lo + _CHUNK]).tolist())
            else:
                parts.append(_python_values(column.slice(lo, _CHUNK)).tolist())
        yield list(zip(*parts, strict=True))


def _python_values(arr: pa.ChunkedArray) -> np.ndarray:
    if pa.types.is_string(arr.type):
        return _objects(arr)
    flat = arr.combine_chunks()
    out = flat.to_numpy(zero_copy_only=False).astype(object)
    if flat.null_count:
        out[flat.is_null().to_numpy(zero_copy_only=False)] = None
    return out


@dataclass(frozen=True)
class Deletions:
    """A complete export's deletions: staged records it no longer holds are deleted, unless more
    than ``max_share`` of the staged records would go (then the load is refused whole)."""

    source: str  # the export's file or query name, for the refusal
    max_share: float


def load_extract(
    engine: Engine,
    kind: str,
    clinic_id: str,
    path: Path,
    deletions: Deletions | None = None,
    *,
    extracted_at: datetime | None = None,
) -> Loaded:
    """Upsert one hashed extract into staging, latest wins, in one transaction; with
    ``deletions`` (a complete export), also delete the clinic's staged records it does not hold.

    The load's sequence number is ``extracted_at`` (when the extract read the export) in
    microseconds, so exports order by when they were read, whatever order their stage steps run
    in; without it (an extract made and staged at once), it follows every load staged so far.

    Raises:
        StagingError: the database refused the load (nothing of it was kept); the driver's
            message is not passed on, since it quotes the offending row.
        InputError: a complete export would delete more than ``deletions.max_share`` of the
            staged records (nothing of the load was kept).
    """
    try:
        return _load_extract(engine, kind, clinic_id, path, deletions, extracted_at)
    except _DRIVER_ERRORS as exc:
        raise store.refused(
            exc, f"staging {kind}: the database refused the load", "nothing of this load was kept"
        ) from None


def _driver_errors() -> tuple[type[BaseException], ...]:
    import sqlite3

    errors: list[type[BaseException]] = [sa.exc.SQLAlchemyError, sqlite3.Error]
    try:
        import psycopg2

        errors.append(psycopg2.Error)
    except ImportError:  # no PostgreSQL driver installed: nothing of it to catch
        pass
    return tuple(errors)


_DRIVER_ERRORS = _driver_errors()


def _load_extract(
    engine: Engine,
    kind: str,
    clinic_id: str,
    path: Path,
    deletions: Deletions | None,
    extracted_at: datetime | None,
) -> Loaded:
    rows = pq.ParquetFile(path).metadata.num_rows
    deleted = 0
    with engine.begin() as conn:
        store.exclusive(conn, "stage", kind, clinic_id)  # two loads at once: one after the other
        staged, _, highest = _state(conn, kind, clinic_id)
        seq = highest + 1 if extracted_at is None else int(extracted_at.timestamp() * 1_000_000)
        if conn.dialect.name == "sqlite":
            raw = conn.connection.dbapi_connection
            assert raw is not None
            cur = raw.cursor()
            for chunk in _row_chunks(path, kind, clinic_id, seq):
                cur.executemany(_merge_sql(kind, None), chunk)
            cur.close()
        else:
            _merge_via_temp(conn, kind, path, clinic_id, seq)
        if deletions is not None:
            deleted = _delete_missing(conn, kind, clinic_id, path, staged, deletions)
        count, lo, hi = _state(conn, kind, clinic_id)
    return Loaded(rows=rows, load_seq=seq, exact=count == rows and lo == hi == seq, deleted=deleted)


def _delete_missing(
    conn: Connection, kind: str, clinic_id: str, path: Path, staged: int, deletions: Deletions
) -> int:
    """Delete the clinic's staged records whose key the export does not hold; refuse (raising,
    so the load's transaction is rolled back) when more than the allowed share, or every staged
    record, would go.

    A staged record newer than everything in the export (its update, or its time, after the
    export's newest) is spared: the export was taken before it existed (an older night's stage
    step retried after a newer night's), so its absence says nothing.
    """
    from etl.errors import InputError, RowProblem

    table, key = TABLES[kind], KEYS[kind]
    keys = sa.Table(
        f"tmp_{kind}_keys",
        sa.MetaData(),
        sa.Column("record_key", sa.String, primary_key=True),
        prefixes=["TEMPORARY"],
    )
    keys.drop(conn, checkfirst=True)
    keys.create(conn)
    export = pq.read_table(path, columns=[key, *_RECENCY[kind]])
    exported = export.column(key).combine_chunks()
    if pa.types.is_dictionary(exported.type):
        exported = exported.dictionary_decode()
    bulk_insert(conn, keys, pd.DataFrame({"record_key": pc.unique(exported).to_pylist()}))
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text(f"ANALYZE {keys.name}"))  # a temporary table has no statistics
    # NOT EXISTS, not NOT IN: PostgreSQL runs it as an anti-join whatever work_mem allows
    missing = (table.c.clinic_id == clinic_id) & ~sa.exists().where(keys.c.record_key == table.c[key])
    recency = sa.func.coalesce(*(table.c[c] for c in _RECENCY[kind]))
    times = [_epoch_us(export.column(c)) for c in _RECENCY[kind]]
    newest = pc.max(pc.coalesce(*times)).as_py() if export.num_rows else None
    if newest is not None:
        missing &= sa.or_(recency.is_(None), recency <= newest)
    gone = int(conn.execute(sa.select(sa.func.count()).select_from(table).where(missing)).scalar_one())
    if staged and (gone > deletions.max_share * staged or gone == staged):
        reason = (
            f"a complete export that would delete {gone:,} of the {staged:,} staged {kind} "
            + ("(every one)" if gone == staged else f"(more than max_deleted_share {deletions.max_share:g})")
            + ": is the export whole? Nothing of it was kept; raise max_deleted_share for this run if "
            "the deletions are real"
        )
        raise InputError([RowProblem(deletions.source, None, None, reason)])
    if gone:
        conn.execute(table.delete().where(missing))
    keys.drop(conn)
    return gone


def _merge_via_temp(conn: Connection, kind: str, path: Path, clinic_id: str, seq: int) -> None:
    table = TABLES[kind]
    tmp = sa.Table(
        f"tmp_{kind}",
        sa.MetaData(),
        *[sa.Column(c.name, c.type) for c in table.columns],
        prefixes=["TEMPORARY"],
    )
    tmp.drop(conn, checkfirst=True)
    tmp.create(conn)
    for frame in _batches(path, kind, clinic_id, seq):
        bulk_insert(conn, tmp, frame)
    conn.execute(sa.text(_merge_sql(kind, f"tmp_{kind}")))
    tmp.drop(conn)


def write_marker(extracts: Path, loaded: dict[str, Loaded]) -> None:
    """Remember which load each extract became, with the file's identity, for ``load_staged``."""
    marker = {
        kind: {**asdict(done), "file": _fingerprint(extracts / f"{kind}.parquet")}
        for kind, done in loaded.items()
    }
    tmp = extracts / f".{MARKER}.tmp"  # written whole, then renamed: never half a marker
    tmp.write_text(json.dumps(marker, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(extracts / MARKER)


def _fingerprint(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def _extract_is_staging(engine: Engine, kind: str, clinic_id: str, extracts: Path | None) -> bool:
    """True when the staged rows are exactly this run's extract, loaded by this run's stage step."""
    if extracts is None or not (extracts / MARKER).exists():
        return False
    done = json.loads((extracts / MARKER).read_text(encoding="utf-8")).get(kind)
    path = extracts / f"{kind}.parquet"
    if not done or not done["exact"] or not path.exists() or done["file"] != _fingerprint(path):
        return False
    with engine.connect() as conn:
        count, lo, hi = _state(conn, kind, clinic_id)
    return count == done["rows"] and lo == hi == done["load_seq"]


def load_staged(
    engine: Engine, kind: str, clinic_id: str, *, before: datetime, extracts: Path | None = None
) -> pd.DataFrame:
    """All staged rows of a clinic whose event time is before the run's ``end``, in key order.

    Rows from the future of ``end`` are invisible, so a backfill sees what a nightly run at that
    time would have seen of the event history (statuses are today's, latest wins).
    """
    return _load(engine, kind, clinic_id, before=before, extracts=extracts, later=False)[0]


def load_staged_and_later(
    engine: Engine, kind: str, clinic_id: str, *, before: datetime, extracts: Path | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``load_staged``'s rows, plus the identity and consent columns (``LATER_COLUMNS``) of the rows
    dated at or after ``end`` (booked visits, mostly), in one read.

    A later row is no event of the run, but what it says about the person is: it links them
    (same email, phone or patient ID) and it carries consent times, and a revocation recorded
    before ``end`` at the intake of a visit booked for next month is in force at ``end``.
    """
    return _load(engine, kind, clinic_id, before=before, extracts=extracts, later=True)


def _load(
    engine: Engine, kind: str, clinic_id: str, *, before: datetime, extracts: Path | None, later: bool
) -> tuple[pd.DataFrame, pd.DataFrame]:
    before_us = int(before.timestamp() * 1_000_000)
    if _extract_is_staging(engine, kind, clinic_id, extracts):
        assert extracts is not None
        path = extracts / f"{kind}.parquet"
        wanted = [c.name for c in TABLES[kind].columns if c.name in pq.ParquetFile(path).schema_arrow.names]
        table = _staged_columns(pq.read_table(path, columns=wanted), kind, clinic_id, 0, decode=False)
    else:
        table = _read_chunked(engine, kind, clinic_id, None if later else before_us)
    table = table.drop_columns(["clinic_id", "load_seq"])
    # one take for both the time filter and the key order: one copy of the table, not two
    order = pc.sort_indices(table, sort_keys=[(KEYS[kind], "ascending")])
    visible = pc.less(table.column(TIME_COLUMN[kind]), before_us).take(order).combine_chunks()
    rest = table.select(list(LATER_COLUMNS[kind])).take(order.filter(pc.invert(visible))) if later else None
    table = table.take(order.filter(visible))  # the unsorted table is let go before the frame is built
    past = _to_frame(table, kind)
    return past, (past.iloc[0:0] if rest is None else _to_frame(rest, kind))


def _arrow_types(kind: str) -> dict[str, pa.DataType]:
    out: dict[str, pa.DataType] = {}
    for column in TABLES[kind].columns:
        if isinstance(column.type, (sa.BigInteger, sa.Integer)):
            out[column.name] = pa.int64()
        elif isinstance(column.type, sa.Float):
            out[column.name] = pa.float64()
        elif isinstance(column.type, sa.Boolean):
            out[column.name] = pa.bool_()
        else:
            out[column.name] = pa.string()
    return out


def _to_frame(table: pa.Table, kind: str) -> pd.DataFrame:
    """Arrow -> the frame the rules expect: object strings (one object per distinct value),
    UTC ``datetime64[ns]`` times, numpy bools."""
    columns: dict[str, Any] = {}
    for name in table.column_names:
        arr = table.column(name)
        if name in TIMES[kind]:
            # Arrow casts (no float round trip: pandas' float path trips over stale FP flags)
            micros = pc.cast(arr, pa.timestamp("us", tz="UTC"))
            columns[name] = micros.cast(pa.timestamp("ns", tz="UTC")).to_pandas()
        elif name in BOOLS[kind]:
            columns[name] = arr.cast(pa.bool_()).to_numpy(zero_copy_only=False)
        elif pa.types.is_floating(arr.type):
            columns[name] = arr.to_numpy(zero_copy_only=False).astype(float)
        else:
            columns[name] = _objects(arr, intern=name in HASH_COLUMNS)
    return pd.DataFrame(columns)


def _objects(arr: pa.ChunkedArray, *, intern: bool = False) -> np.ndarray:
    """Strings as a numpy object array holding one Python string per distinct value.

    A person's hashes repeat on each of their rows; sharing the objects keeps a million-row
    history in memory at the size of its distinct values. With ``intern`` the objects are also
    shared across columns and frames (the Google and Meta email hashes are mostly equal, and a
    patient's hashes appear in both exports).
    """
    codes = arr.combine_chunks()
    if not pa.types.is_dictionary(codes.type):
        codes = codes.dictionary_encode()
    values = codes.dictionary.to_pylist()
    if intern:
        values = [sys.intern(v) for v in values]
    categories = np.asarray([*values, None], dtype=object)
    return categories.take(codes.indices.cast(pa.int64()).fill_null(len(categories) - 1).to_numpy())


def _streaming_cursor(conn: Connection) -> Any:
    """A raw DB-API cursor that fetches rows as asked: PostgreSQL's default cursor holds the
    whole result in client memory on ``execute`` (about 1.3 KiB per staged row), a named one
    stays on the server and hands over ``fetchmany`` chunks. SQLite's steps through anyway."""
    raw = conn.connection.dbapi_connection
    assert raw is not None
    if conn.dialect.name == "postgresql":
        return raw.cursor(name="medspa_staged_rows")
    return raw.cursor()


def _read_chunked(engine: Engine, kind: str, clinic_id: str, before_us: int | None) -> pa.Table:
    """Staged rows dated before ``before_us`` (all with None) through the driver's cursor in
    chunks, each chunk turned into Arrow at once.

    The raw DB-API cursor skips SQLAlchemy's per-row objects; only one chunk of driver tuples
    exists at a time. Hash columns are dictionary-encoded chunk by chunk and unified at the end,
    as the Parquet read gives them: held as plain strings, a million rows' fourteen hashes were
    another gigabyte at the read's peak.
    """
    names = [c.name for c in TABLES[kind].columns]
    types = _arrow_types(kind)
    pieces: list[list[pa.Array]] = [[] for _ in names]
    with engine.connect() as conn:
        mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"
        sql = f"SELECT {', '.join(names)} FROM {kind} WHERE clinic_id = {mark}"
        params: tuple[Any, ...] = (clinic_id,)
        if before_us is not None:  # None: every row, whatever its date
            sql += f" AND {TIME_COLUMN[kind]} < {mark}"
            params += (before_us,)
        cur = _streaming_cursor(conn)
        cur.execute(sql, params)
        while chunk := cur.fetchmany(_CHUNK):
            for i, values in enumerate(zip(*chunk, strict=True)):
                wanted = types[names[i]]
                # SQLite hands booleans back as 0/1
                arr = pa.array(values) if wanted == pa.bool_() else pa.array(values, type=wanted)
                arr = arr.cast(wanted)
                if names[i] in HASH_COLUMNS:
                    # a person's hashes repeat on each of their rows: kept once per chunk, not per row
                    arr = arr.dictionary_encode()
                pieces[i].append(arr)
        cur.close()
    return pa.table(
        [
            _column(arrays, types[n], dictionary=n in HASH_COLUMNS)
            for n, arrays in zip(names, pieces, strict=True)
        ],
        names=names,
    )


def _column(arrays: list[pa.Array], wanted: pa.DataType, *, dictionary: bool) -> pa.ChunkedArray:
    if not dictionary:
        return pa.chunked_array(arrays, type=wanted)
    # one dictionary for the whole column (the chunks' dictionaries unified), as a Parquet read gives
    return pa.chunked_array(arrays, type=pa.dictionary(pa.int32(), wanted)).unify_dictionaries()
