"""Staging on a real PostgreSQL server (the deployment backend) gives what SQLite gives.

A throwaway cluster is made with the machine's ``initdb`` on a loopback port and removed after;
the test is skipped only where no PostgreSQL server binaries exist.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa

from etl import staging, store
from etl.config import load_config
from etl.outbox import OUTBOX_FILES
from tests.conftest import record_batches_at_once, run_dry


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_postgres(args: list[str]) -> list[str]:
    # initdb and postgres refuse to run as root
    if os.geteuid() == 0 and shutil.which("runuser"):
        return ["runuser", "-u", "postgres", "--", *args]
    return args


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on this machine")
    # not under pytest's tmp folder: that one is private to root, and the server runs as postgres
    base = Path(tempfile.mkdtemp(prefix="medspa-pg-"))
    data = base / "data"
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
    port = _free_port()
    subprocess.run(_as_postgres([initdb, "-D", str(data), "-A", "trust", "-U", "postgres"]),
                   check=True, capture_output=True)  # fmt: skip
    log = base / "server.log"
    subprocess.run(
        _as_postgres([pg_ctl, "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
                      f"-h 127.0.0.1 -p {port} -k {base}", "start"]),
        check=True, capture_output=True,
    )  # fmt: skip
    try:
        url = f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
        deadline = time.monotonic() + 30
        while True:
            try:
                with sa.create_engine(url).connect() as conn:
                    conn.execute(sa.text("select 1"))
                break
            except sa.exc.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        yield url
    finally:
        subprocess.run(
            _as_postgres([pg_ctl, "-D", str(data), "-m", "immediate", "stop"]), capture_output=True
        )
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from etl.synth import write_synthetic_clinic

    out = tmp_path_factory.mktemp("pg-synth")
    write_synthetic_clinic(out, appointments=2500, leads=1000, seed=3)
    return out


def test_postgres_staging_gives_the_same_outbox_as_sqlite(
    postgres_url: str, synthetic: Path, tmp_path: Path
) -> None:
    config = load_config(synthetic / "clinic.yaml")
    on_sqlite = run_dry(config, "2026-09-01", "2026-11-23", tmp_path / "sqlite")
    on_postgres = run_dry(config, "2026-09-01", "2026-11-23", tmp_path / "pg", db_url=postgres_url)
    names = [*OUTBOX_FILES.values(), "summary.json"]
    _, mismatch, errors = filecmp.cmpfiles(on_sqlite.outbox, on_postgres.outbox, names, shallow=False)
    assert mismatch == [] and errors == []
    assert on_postgres.rows["google_conversions"]
    # a second load of the same exports upserts in place
    again = run_dry(config, "2026-09-01", "2026-11-23", tmp_path / "pg2", db_url=postgres_url)
    assert again.summary == on_postgres.summary
    with store.engine_for(postgres_url) as engine, engine.connect() as conn:
        staged = conn.execute(sa.select(sa.func.count()).select_from(store.appointments)).scalar()
    assert staged == on_postgres.summary["inputs"]["appointments_rows"]


def test_postgres_ledger_keeps_a_final_state(postgres_url: str) -> None:
    from etl import ledger

    at = datetime(2026, 6, 1, tzinfo=UTC)
    with store.engine_for(postgres_url) as engine:
        for status in ("accepted", "planned", "deferred"):
            ledger.write_ledger(engine, "pg-clinic", "meta_events", [{"opaque_id": "x" * 64, "status": status}],
                                run_id=status, at=at)  # fmt: skip
        assert ledger.read_ledger(engine, "pg-clinic", "meta_events")["x" * 64].status == "accepted"
        assert ledger.final_among(engine, "pg-clinic", "meta_events", ["x" * 64]) == {"x" * 64}


def test_postgres_journey_relations_are_recorded_once_and_the_newest_view_wins(postgres_url: str) -> None:
    from datetime import timedelta

    from etl import ledger

    at = datetime(2026, 6, 1, tzinfo=UTC)
    a, b, c = ("a" * 64, "b" * 64, "c" * 64)
    with store.engine_for(postgres_url) as engine:
        for _ in range(2):  # an upload retried records the same view again
            ledger.record_siblings(
                engine, "pg-clinic", {a: [b, b], c: [b]}, run_id="r", planned_at=at, horizon=at
            )
        assert ledger.journey_relatives(engine, "pg-clinic", [a, b]) == {a: {b}, b: {a, c}}
        later = at + timedelta(microseconds=1)
        ledger.record_siblings(engine, "pg-clinic", {c: []}, run_id="later", planned_at=later, horizon=at)
        assert ledger.journey_relatives(engine, "pg-clinic", [b]) == {b: {a}}
        ledger.write_ledger(engine, "pg-clinic", "meta_events", [{"opaque_id": c, "status": "accepted"}],
                            run_id="r", at=at)  # fmt: skip
        assert ledger.held_among(engine, "pg-clinic", "meta_events", [a, b, c]) == {c}


def test_postgres_ledger_records_a_long_platform_code_and_widens_an_older_table(postgres_url: str) -> None:
    from etl import ledger

    # a real Google Ads code is 66 characters: VARCHAR(64) refused the record of a sent batch
    code = "ConversionUploadError.ORDER_ID_NOT_PERMITTED_FOR_EXTERNALLY_ATTRIBUTED_CONVERSION_ACTION"
    at = datetime(2026, 6, 1, tzinfo=UTC)
    with store.engine_for(postgres_url) as engine, engine.begin() as conn:  # as an earlier version made it
        conn.execute(sa.text("ALTER TABLE send_ledger ALTER COLUMN code TYPE VARCHAR(64)"))
    with store.engine_for(postgres_url) as engine:  # opening it brings the table up to date
        rows = [{"opaque_id": "c" * 64, "status": "rejected", "code": code},
                {"opaque_id": "d" * 64, "status": "rejected", "code": "X" * 400}]  # fmt: skip
        ledger.write_ledger(engine, "pg-codes", "google_conversions", rows, run_id="r", at=at)
        recorded = ledger.read_ledger(engine, "pg-codes", "google_conversions")
    assert recorded["c" * 64].code == code
    assert recorded["d" * 64].code == "X" * store.CODE_WIDTH  # cut, not refused: the batch went out


def test_postgres_an_older_ledger_gains_the_consent_record_and_keeps_it(postgres_url: str) -> None:
    from etl import ledger

    at = datetime(2026, 6, 1, tzinfo=UTC)
    granted = datetime(2026, 5, 2, 16, 0, tzinfo=UTC)
    with store.engine_for(postgres_url) as engine, engine.begin() as conn:  # as an earlier version made it
        for table in ("send_ledger", "conversions"):
            conn.execute(sa.text(f"ALTER TABLE {table} DROP COLUMN consent_at, DROP COLUMN consent_stated"))
    with store.engine_for(postgres_url) as engine:  # opening it brings the tables up to date
        planned = [
            {"opaque_id": "e" * 64, "status": "planned", "consent_at": granted, "consent_stated": True}
        ]
        ledger.write_ledger(engine, "pg-consent", "meta_events", planned, run_id="r", at=at)
        answered = [{"opaque_id": "e" * 64, "status": "accepted"}]  # an outcome carries no consent
        ledger.write_ledger(engine, "pg-consent", "meta_events", answered, run_id="r", at=at)
        with engine.connect() as conn:
            row = conn.execute(sa.select(store.send_ledger.c.status, store.send_ledger.c.consent_at,
                                         store.send_ledger.c.consent_stated)
                               .where(store.send_ledger.c.clinic_id == "pg-consent")).one()  # fmt: skip
            columns = {c["name"] for c in sa.inspect(conn).get_columns("conversions")}
    assert row.status == "accepted" and row.consent_at == granted and row.consent_stated is True
    assert {"consent_at", "consent_stated"} <= columns


@pytest.mark.parametrize("rewrite", ["derived", "quality_results"])
def test_postgres_rewrites_by_two_runs_at_once_wait_for_each_other(rewrite: str, postgres_url: str) -> None:
    # "delete, then insert": the second writer's delete cannot see the first's uncommitted rows,
    # so its insert hit the primary key (two intervals of one clinic planned at once; one
    # interval's checks stored from two machines)
    import threading

    from etl import quality
    from etl.quality_gx import CheckResult

    at = datetime(2026, 6, 1, tzinfo=UTC)
    if rewrite == "derived":
        persons = pd.DataFrame({"person_key": [f"p{i}" for i in range(50)], "appointments": 1, "leads": 1})
        convs = pd.DataFrame(
            columns=["opaque_id", "stage", "person_key", "event_time", "ready_at", "value", "outcome"]
        )
        table, key = store.persons, ("derived", "pg-race")
        rows = persons.assign(clinic_id="pg-race", run_id="run-1")

        def write(engine: sa.Engine) -> None:
            store.replace_derived(engine, "pg-race", "run-2", persons, convs)
    else:
        checks = [CheckResult("s", f"c{i}", "critical", True, 0, 1) for i in range(3)]
        table, key = store.quality_results, ("quality_results", "r")
        rows = pd.DataFrame([{"run_id": "r", "clinic_id": "pg-race", "suite": "s", "expectation": c.check,
                              "severity": "critical", "success": True, "unexpected_count": 0, "element_count": 1,
                              "recorded_at": at} for c in checks])  # fmt: skip

        def write(engine: sa.Engine) -> None:
            quality.store_results(engine, "pg-race", "r", checks, at)

    holding, outcome = threading.Event(), {}
    with store.engine_for(postgres_url) as engine:

        def first() -> None:
            try:
                with engine.begin() as conn:  # the other run, between its insert and its commit
                    store.exclusive(conn, *key)
                    conn.execute(table.delete().where(table.c.clinic_id == "pg-race"))
                    store.bulk_insert(conn, table, rows[[c.name for c in table.columns]])
                    holding.set()
                    time.sleep(1)
            finally:
                holding.set()

        def second() -> None:
            holding.wait(timeout=60)
            try:
                write(engine)
                outcome["second"] = "ok"
            except sa.exc.DBAPIError as exc:
                outcome["second"] = type(exc.orig).__name__

        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert outcome == {"second": "ok"}


def test_postgres_load_keeps_a_literal_null_marker_and_refusals_name_no_value(
    postgres_url: str, synthetic: Path, tmp_path: Path
) -> None:
    from etl import pipeline
    from etl.errors import StagingError
    from etl.rules.stages import RunWindow

    config = load_config(synthetic / "clinic.yaml").model_copy(update={"clinic_id": "pg-nulls"})
    paths = pipeline.RunPaths(run_dir=tmp_path / "run", outbox=tmp_path / "outbox")
    window = RunWindow(start=datetime(2026, 9, 1, tzinfo=UTC), end=datetime(2026, 11, 23, tzinfo=UTC))
    pipeline.extract_sources(config, window, paths, pipeline.Timings())
    path = paths.extracts / "appointments.parquet"
    frame = pd.read_parquet(path)
    frame.loc[0, "location_id"] = "\\N"  # COPY's default null marker, as a real cell
    frame.to_parquet(path, index=False)
    with store.engine_for(postgres_url) as engine:
        staging.load_extract(engine, "appointments", config.clinic_id, path)
        staged = staging.load_staged(
            engine, "appointments", config.clinic_id, before=datetime(2100, 1, 1, tzinfo=UTC)
        )
        first = staged.set_index("appointment_id").loc[frame.loc[0, "appointment_id"]]
        assert first["location_id"] == "\\N"
        # a row the database refuses (wider than its column: extract stops these, a file edited
        # after extract does not): one clear error, no cell of the row in it
        frame.loc[1, "appointment_id"] = "CNRY-APPT-" + "x" * 200
        frame.to_parquet(path, index=False)
        with pytest.raises(StagingError) as info:
            staging.load_extract(engine, "appointments", config.clinic_id, path)
    message = str(info.value)
    assert "StringDataRightTruncation" in message and "22001" in message
    assert "CNRY" not in message and frame.loc[2, "appointment_id"] not in message


def _fresh_database(postgres_url: str, name: str) -> str:
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name}"))
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    admin.dispose()
    return postgres_url.rsplit("/", 1)[0] + f"/{name}"


def test_several_processes_opening_an_empty_database_at_once_all_get_the_tables(postgres_url: str) -> None:
    # the first night of a deployment: every clinic's DAG opens the empty database at 03:00
    import sys

    for attempt in range(3):
        url = _fresh_database(postgres_url, f"medspa_race_{attempt}")
        go = time.time() + 3  # all start within the same millisecond or so
        opener = f"import time; time.sleep(max(0, {go} - time.time())); from etl import store; store.open_engine({url!r}).dispose()"
        procs = [subprocess.Popen([sys.executable, "-c", opener], cwd=Path(__file__).parents[1],
                                  stderr=subprocess.PIPE, text=True) for _ in range(4)]  # fmt: skip
        failures = [p.communicate()[1][-300:] for p in procs if p.wait() != 0]
        assert failures == [], failures
        with store.engine_for(url) as engine:
            assert set(sa.inspect(engine).get_table_names()) == set(store.metadata.tables)


def test_the_history_read_streams_rows_from_the_server(postgres_url: str) -> None:
    # a client-side cursor holds the whole staged history in memory on execute (1.3 KiB a row)
    with store.engine_for(postgres_url) as engine, engine.connect() as conn:
        cur = staging._streaming_cursor(conn)
        cur.execute("SELECT generate_series(1, 100000)")
        assert len(cur.fetchmany(10)) == 10
        raw = conn.connection.dbapi_connection
        assert raw is not None
        probe = raw.cursor()
        probe.execute("SELECT count(*) FROM pg_cursors WHERE NOT is_holdable")
        assert probe.fetchone()[0] == 1  # the rows wait on the server
        cur.close()


def test_postgres_ledger_upserts_go_as_multi_row_statements(postgres_url: str) -> None:
    # psycopg2 runs an executemany of an upsert as one statement per row (8x SQLite's time)
    from etl import ledger

    at = datetime(2026, 6, 1, tzinfo=UTC)
    ids = [f"{i:064x}" for i in range(5000)]
    calls: list[tuple[bool, int]] = []
    with store.engine_for(postgres_url) as engine:

        def count(
            conn: object, cursor: object, statement: str, params: object, context: object, many: bool
        ) -> None:
            if "send_ledger" in statement and statement.startswith("INSERT"):
                calls.append((many, statement.count("VALUES")))

        sa.event.listen(engine, "before_cursor_execute", count)
        ledger.write_ledger(engine, "pg-batch", "meta_events",
                            [{"opaque_id": k, "status": "accepted"} for k in ids[:10]], run_id="a", at=at)  # fmt: skip
        calls.clear()
        ledger.write_ledger(engine, "pg-batch", "meta_events",
                            [{"opaque_id": k, "status": "planned"} for k in ids], run_id="b", at=at)  # fmt: skip
        assert calls and not any(many for many, _ in calls) and len(calls) <= 3
        recorded = ledger.read_ledger(engine, "pg-batch", "meta_events")
    assert len(recorded) == 5000
    assert {recorded[k].status for k in ids[:10]} == {"accepted"}  # a final state kept
    assert {recorded[k].status for k in ids[10:]} == {"planned"}


def test_stored_check_results_read_back_in_the_same_order_as_on_sqlite(postgres_url: str) -> None:
    from etl import quality
    from etl.quality_gx import CheckResult

    names = ["zeta_share", "alpha_not_null", "mid_unique"]
    results = [CheckResult("appointments_extract", n, "critical", True, 0, 10) for n in names]
    at = datetime(2026, 6, 1, tzinfo=UTC)
    with store.engine_for(postgres_url) as engine:

        def heap_order(dbapi_conn: Any, _record: object) -> None:  # as a big, churned table reads
            with dbapi_conn.cursor() as cur:
                cur.execute("SET enable_indexscan = off; SET enable_bitmapscan = off")

        sa.event.listen(engine, "connect", heap_order)
        engine.dispose()
        quality.store_results(engine, "pg-order", "pg-order-run", results, at)
        read = quality.read_results(engine, "pg-order-run")
    assert [r.check for r in read] == sorted(names)


def test_postgres_send_lease_refuses_a_second_sender_and_frees_on_release(postgres_url: str) -> None:
    from etl import leases
    from etl.errors import SendInProgress

    with store.engine_for(postgres_url) as engine:
        with (
            leases.hold(engine, "pg-lease", "meta_events", run_id="first"),
            pytest.raises(SendInProgress),
            leases.hold(engine, "pg-lease", "meta_events", run_id="second"),
        ):
            pass
        with leases.hold(engine, "pg-lease", "meta_events", run_id="second") as lease:
            lease.renew()
            lease.check()


def test_a_sql_source_with_clinic_local_timestamps_selects_the_clinics_window(
    postgres_url: str, tmp_path: Path
) -> None:
    # a PMS table with `timestamp` (no zone) columns holding clinic-local times; the window is
    # the clinic's local day, and PostgreSQL compares in the session's zone
    from etl import extract
    from tests.conftest import make_config

    url = _fresh_database(postgres_url, "medspa_pms")
    with sa.create_engine(url).begin() as conn:
        conn.execute(sa.text("CREATE TABLE pms_appts (appointment_id text, status text, start_at timestamp)"))
        conn.execute(sa.text("INSERT INTO pms_appts VALUES ('A-early', 'completed', '2026-03-02 03:00'),"
                             " ('A-late', 'completed', '2026-03-02 23:30'), ('A-next', 'completed', '2026-03-03 03:00'),"
                             " ('A-before', 'completed', '2026-03-01 23:30')"))  # fmt: skip
    (tmp_path / "appts.sql").write_text(
        "SELECT appointment_id, status, start_at FROM pms_appts WHERE start_at >= :start AND start_at < :end"
    )
    os.environ["MEDSPA_TEST_PMS_URL"] = url
    try:
        config = make_config(
            tmp_path, sources__appointments={"sql_url_env": "MEDSPA_TEST_PMS_URL", "query": "appts.sql"}
        )
        day = datetime(2026, 3, 2, tzinfo=config.tz)
        frame = extract.read_appointments(config.sources.appointments, config, start=day,
                                          end=datetime(2026, 3, 3, tzinfo=config.tz))  # fmt: skip
    finally:
        del os.environ["MEDSPA_TEST_PMS_URL"]
    assert config.timezone == "America/Los_Angeles"
    assert sorted(frame["appointment_id"]) == ["A-early", "A-late"]


def test_a_sql_source_float4_revenue_reads_as_its_digits(postgres_url: str, tmp_path: Path) -> None:
    # a query that widens a `real` (arithmetic with a double, a cast) hands the driver
    # 760.0999755859375 for 760.1, and so does a binary-protocol driver
    from etl import extract
    from tests.conftest import make_config

    url = _fresh_database(postgres_url, "medspa_pms_real")
    with sa.create_engine(url).begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE pms_appts (appointment_id text, status text, start_at timestamptz,"
                " revenue real, tip double precision)"
            )
        )
        conn.execute(sa.text("INSERT INTO pms_appts VALUES ('A1', 'completed', '2026-03-02 18:00Z', 760.1, 0),"
                             " ('A2', 'completed', '2026-03-02 19:00Z', 12.5, 1500000.25)"))  # fmt: skip
    queries = {
        "real.sql": "SELECT appointment_id, status, start_at, revenue FROM pms_appts",
        "widened.sql": "SELECT appointment_id, status, start_at, revenue + 0 * tip AS revenue FROM pms_appts",
        "double.sql": "SELECT appointment_id, status, start_at, tip AS revenue FROM pms_appts",
    }
    read = {}
    for name, sql in queries.items():
        (tmp_path / name).write_text(sql)
        config = make_config(tmp_path, sources__appointments={"sql_url": url, "query": name})
        read[name] = extract.read_appointments(config.sources.appointments, config)["revenue"].tolist()
    assert read == {"real.sql": [760.1, 12.5], "widened.sql": [760.1, 12.5], "double.sql": [0.0, 1500000.25]}


def test_a_sql_source_that_cannot_connect_or_convert_says_which_without_values(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from etl import extract
    from etl.errors import InputError
    from tests.conftest import make_config

    url = _fresh_database(postgres_url, "medspa_pms_bc")
    with sa.create_engine(url).begin() as conn:
        conn.execute(sa.text("CREATE TABLE pms (appointment_id text, status text, start_at timestamptz)"))
        conn.execute(sa.text("INSERT INTO pms VALUES ('A1', 'completed', '0099-01-01 10:00Z BC')"))
    (tmp_path / "q.sql").write_text("SELECT appointment_id, status, start_at FROM pms")
    base = postgres_url.rsplit("/", 1)[0]
    port = _free_port()
    cases = {
        url: "the driver could not convert a value of the result (ValueError)",  # a BC year
        f"{base}/no_such_db": "cannot connect to the source database at 127.0.0.1:",
        f"postgresql+psycopg2://postgres:s3cret@127.0.0.1:{port}/pms": f"database at 127.0.0.1:{port}/pms (",
    }
    for source, expected in cases.items():
        monkeypatch.setenv("PMS_URL", source)  # a URL with a password comes from the environment
        config = make_config(tmp_path, sources__appointments={"sql_url_env": "PMS_URL", "query": "q.sql"})
        with pytest.raises(InputError) as info:
            extract.read_appointments(config.sources.appointments, config)
        message = str(info.value)
        assert expected in message, message
        assert "s3cret" not in message and "0099" not in message and "-99" not in message


def test_postgres_a_full_resync_moves_the_synced_state_into_the_pending_adds(postgres_url: str) -> None:
    from etl import ledger

    at = datetime(2026, 6, 1, tzinfo=UTC)
    with store.engine_for(postgres_url) as engine:
        ledger.apply_audience_delta(engine, "pg-resync", "meta_audience", added={"a": "{}", "b": "{}"},
                                    removed=[], at=at)  # fmt: skip
        ledger.record_pending_adds(engine, "pg-resync", "meta_audience", {"c": "{}"}, at=at, run_id="r",
                                   replacing=True)  # fmt: skip
        assert ledger.read_audience_state(engine, "pg-resync", "meta_audience") == {}
        assert set(ledger.read_pending_adds(engine, "pg-resync", "meta_audience")) == {"a", "b", "c"}


def test_postgres_a_lease_released_between_the_insert_and_the_read_is_taken(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # read committed: the holder may commit its release between our conflicting insert and
    # our read of it; the read found no row and raised NoResultFound
    from etl import leases

    with store.engine_for(postgres_url) as engine, store.engine_for(postgres_url) as other:
        with other.begin() as conn:
            conn.execute(store.send_leases.insert(), {
                "clinic_id": "pg-race", "destination": "meta_events", "holder": "h:1:x", "run_id": "first",
                "host": "h", "pid": 1, "acquired_at": datetime.now(UTC), "renewed_at": datetime.now(UTC)})  # fmt: skip
        real_insert = leases._insert_if_absent
        calls: list[bool] = []

        def released_meanwhile(conn: Any, row: dict[str, object]) -> bool:
            inserted = real_insert(conn, row)
            if not calls:
                with other.begin() as o:
                    o.execute(store.send_leases.delete().where(store.send_leases.c.clinic_id == "pg-race"))
            calls.append(inserted)
            return inserted

        monkeypatch.setattr(leases, "_insert_if_absent", released_meanwhile)
        with leases.hold(engine, "pg-race", "meta_events", run_id="second") as lease:
            lease.check()
    assert calls == [False, True]


def test_postgres_refusals_a_retry_can_pass_are_told_from_refused_data(postgres_url: str) -> None:
    # real psycopg2 errors: a connection the server ended passes (the stage step retries it);
    # a statement the server refuses for its data does not
    import psycopg2

    url = sa.make_url(postgres_url)
    connect = {"host": url.host, "port": url.port, "user": url.username, "dbname": url.database}
    victim, killer = psycopg2.connect(**connect), psycopg2.connect(**connect)
    killer.autocommit = True
    with killer.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(%s)", (victim.get_backend_pid(),))
    with pytest.raises(psycopg2.OperationalError) as ended:
        victim.cursor().execute("SELECT 1")
    with pytest.raises(psycopg2.DataError) as refused:
        killer.cursor().execute("SELECT 1 / 0")
    killer.close()
    assert store.passes_on_retry(ended.value)
    assert not store.passes_on_retry(refused.value)


def test_postgres_audit_records_written_at_once_each_get_their_own_place(postgres_url: str) -> None:
    # PostgreSQL does not serialize writers by itself: without the clinic's advisory lock two
    # uploads recording batches at once read the same last record and collide on its successor
    verdict = record_batches_at_once(postgres_url, "pg-audit")
    assert verdict.intact, verdict.problems
    assert verdict.records == 50 and verdict.states_checked == 150


def test_postgres_one_platform_stopped_by_two_people_at_once_keeps_one_stop(postgres_url: str) -> None:
    # two on-call engineers throw the kill switch within the same second: without the clinic's
    # lock both read "not stopped" and the second insert fails on the primary key
    import threading

    from etl import audit, switches

    url = _fresh_database(postgres_url, "medspa_switch")
    at = datetime(2026, 11, 24, tzinfo=UTC)
    failures: list[str] = []
    with store.engine_for(url) as engine:
        go = threading.Barrier(4)

        def stop(reason: str) -> None:
            go.wait()
            try:
                switches.stop(engine, "pg-switch", ["meta"], reason=reason, by="oncall", at=at)
            except Exception as exc:  # collected for the assertion below
                failures.append(type(exc).__name__)

        threads = [threading.Thread(target=stop, args=(r,)) for r in switches.REASONS[:4]]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == []
        assert list(switches.stopped(engine, "pg-switch")) == ["meta"]
        with engine.connect() as conn:
            verdict = audit.verify(conn, "pg-switch")
    assert verdict.intact, verdict.problems
    assert verdict.records == 1


def test_postgres_a_complete_export_deletes_the_records_it_no_longer_holds(
    postgres_url: str, tmp_path: Path
) -> None:
    from tests.test_pipeline import complete_export_case

    complete_export_case(tmp_path, _fresh_database(postgres_url, "complete_export"), complete=True)


def test_postgres_disclosures_list_validate_only_rows_beside_the_ledgers(postgres_url: str) -> None:
    # the disclosure lines are one UNION of the ledger and validation_sends, sorted by send time
    from etl import disclosures, ledger

    sent, checked = datetime(2026, 6, 2, tzinfo=UTC), datetime(2026, 6, 1, tzinfo=UTC)
    with store.engine_for(postgres_url) as engine:
        ledger.write_ledger(engine, "pg-disclose", "google_conversions",
                            [{"opaque_id": "a" * 64, "status": "accepted", "stage": "purchase"}], run_id="r2", at=sent)  # fmt: skip
        ledger.record_validation(engine, "pg-disclose", "google_conversions", target="live", run_id="r1", at=checked,
                                 conversions=[("b" * 64, "purchase", None, "req-1")])  # fmt: skip
        ledger.record_validation(engine, "pg-disclose", "google_customer_match", target="live", run_id="r1",
                                 at=checked, adds=3)  # fmt: skip
        lines = list(disclosures.conversion_lines(engine, "pg-disclose", since=None, until=None))
        counted = disclosures.account(engine, "pg-disclose", since=None, until=None)
    assert [(line[2], line[3], line[7]) for line in lines] == [
        ("b" * 64, "validate_only", checked.isoformat()),
        ("a" * 64, "accepted", sent.isoformat()),
    ]
    assert counted.validated == {
        ("google_conversions", "live"): {"conversions": 1, "list_adds": 0, "list_removes": 0},
        ("google_customer_match", "live"): {"conversions": 0, "list_adds": 3, "list_removes": 0},
    }


def test_postgres_the_report_banner_gives_the_recorded_time_in_utc(postgres_url: str, tmp_path: Path) -> None:
    # PostgreSQL hands back the session's time zone: the local clock time was labelled Z
    from etl import ledger
    from etl.pipeline import RunPaths
    from etl.report import load_summary

    summary = {"clinic_id": "pg-tz", "start": "a", "end": "b", "dry_run": False, "target": "sandbox"}
    eastern = postgres_url + ("&" if "?" in postgres_url else "?") + "options=-ctimezone%3DAmerica/New_York"
    with store.engine_for(eastern) as engine:
        ledger.record_summary(engine, summary, run_id="pg-tz-1", at=datetime(2026, 11, 23, 12, 0, tzinfo=UTC))
        loaded, recorded = load_summary(
            RunPaths(run_dir=tmp_path, outbox=tmp_path / "outbox"), engine, "pg-tz-1"
        )
    assert loaded == summary and recorded == "2026-11-23T12:00:00Z"
