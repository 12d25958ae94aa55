"""Staging: latest-wins loads, and the two ways the history is read back (extract file or database).

The plan step reads the staged history from this run's extract when the database holds exactly
that export; these tests prove both ways give the same frame, and that anything else staged
(older rows, a later load, a rewritten file, duplicates resolved by ``updated_at``) sends the
read to the database.
"""

from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from sqlalchemy.engine import Engine

from etl import pipeline, staging, store
from etl.config import ClinicConfig, load_config
from etl.rules.stages import RunWindow
from tests.conftest import make_config

END = datetime(2026, 11, 23, tzinfo=UTC)
KINDS = ("appointments", "leads")


@pytest.fixture(scope="module")
def clinic(tmp_path_factory: pytest.TempPathFactory) -> ClinicConfig:
    from etl.synth import write_synthetic_clinic

    out = tmp_path_factory.mktemp("clinic")
    write_synthetic_clinic(out, appointments=2000, leads=800, seed=5)
    return load_config(out / "clinic.yaml")


def _extract(config: ClinicConfig, folder: Path, read_at: datetime | None = None) -> pipeline.RunPaths:
    paths = pipeline.RunPaths(run_dir=folder, outbox=folder / "outbox")
    window = RunWindow(start=datetime(2026, 8, 1, tzinfo=UTC), end=END)
    pipeline.extract_sources(config, window, paths, pipeline.Timings(), read_at=read_at)
    return paths


def _stage(config: ClinicConfig, engine: Engine, paths: pipeline.RunPaths) -> None:
    pipeline.stage_extracts(config, engine, paths, pipeline.Timings())


def _both(
    engine: Engine, config: ClinicConfig, paths: pipeline.RunPaths, kind: str
) -> tuple[pd.DataFrame, ...]:
    via_file = staging.load_staged(engine, kind, config.clinic_id, before=END, extracts=paths.extracts)
    via_db = staging.load_staged(engine, kind, config.clinic_id, before=END)
    return via_file, via_db


def test_extract_and_database_give_the_same_history(clinic: ClinicConfig, tmp_path: Path) -> None:
    paths = _extract(clinic, tmp_path / "run")
    with store.engine_for(f"sqlite:///{tmp_path / 's.sqlite'}") as engine:
        _stage(clinic, engine, paths)
        for kind in KINDS:
            assert staging._extract_is_staging(engine, kind, clinic.clinic_id, paths.extracts)
            via_file, via_db = _both(engine, clinic, paths, kind)
            pd.testing.assert_frame_equal(via_file, via_db)
            key = staging.KEYS[kind]
            assert via_file[key].is_monotonic_increasing
            assert len(via_file) > 100
            assert (via_file[staging.TIME_COLUMN[kind]] < pd.Timestamp(END)).all()


def test_rows_dated_after_the_end_come_apart_the_same_both_ways(clinic: ClinicConfig, tmp_path: Path) -> None:
    paths = _extract(clinic, tmp_path / "run")
    with store.engine_for(f"sqlite:///{tmp_path / 's.sqlite'}") as engine:
        _stage(clinic, engine, paths)
        for kind in KINDS:
            end = END - pd.Timedelta(days=60)
            past, later = staging.load_staged_and_later(
                engine, kind, clinic.clinic_id, before=end, extracts=paths.extracts
            )
            db_past, db_later = staging.load_staged_and_later(engine, kind, clinic.clinic_id, before=end)
            pd.testing.assert_frame_equal(past, db_past)
            pd.testing.assert_frame_equal(later, db_later)
            pd.testing.assert_frame_equal(
                past, staging.load_staged(engine, kind, clinic.clinic_id, before=end)
            )
            assert list(later.columns) == list(staging.LATER_COLUMNS[kind]) and len(later) > 10
            time = staging.TIME_COLUMN[kind]
            assert (past[time] < pd.Timestamp(end)).all() and (later[time] >= pd.Timestamp(end)).all()
            ever = datetime(2100, 1, 1, tzinfo=UTC)
            assert len(past) + len(later) == len(
                staging.load_staged(engine, kind, clinic.clinic_id, before=ever)
            )
            assert later[staging.KEYS[kind]].is_monotonic_increasing


def test_the_database_read_in_many_chunks_keeps_hashes_once_per_value(
    clinic: ClinicConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # chunks of 300 rows: every chunk has its own dictionary, unified into one per column
    monkeypatch.setattr(staging, "_CHUNK", 300)
    paths = _extract(clinic, tmp_path / "run")
    with store.engine_for(f"sqlite:///{tmp_path / 's.sqlite'}") as engine:
        _stage(clinic, engine, paths)
        raw = staging._read_chunked(engine, "appointments", clinic.clinic_id, int(END.timestamp() * 1e6))
        email = raw.column("em_g")
        assert email.num_chunks > 3 and pa.types.is_dictionary(email.type)
        assert len(email.chunk(0).dictionary) == len(email.chunk(1).dictionary) < raw.num_rows
        assert email.chunk(0).dictionary.equals(email.chunk(1).dictionary)
        via_file, via_db = _both(engine, clinic, paths, "appointments")
        pd.testing.assert_frame_equal(via_file, via_db)


def test_an_export_missing_older_rows_is_read_from_the_database(clinic: ClinicConfig, tmp_path: Path) -> None:
    full = _extract(clinic, tmp_path / "full")
    partial = tmp_path / "partial"
    shutil.copytree(full.run_dir, partial)
    path = partial / "extract" / "appointments.parquet"
    frame = pd.read_parquet(path)
    frame.iloc[: len(frame) // 2].to_parquet(path, index=False)
    with store.engine_for(f"sqlite:///{tmp_path / 's.sqlite'}") as engine:
        _stage(clinic, engine, full)
        later = pipeline.RunPaths(run_dir=partial, outbox=partial / "outbox")
        _stage(clinic, engine, later)
        assert not staging._extract_is_staging(engine, "appointments", clinic.clinic_id, later.extracts)
        # leads were re-exported whole: still exactly this export
        assert staging._extract_is_staging(engine, "leads", clinic.clinic_id, later.extracts)
        history = staging.load_staged(
            engine, "appointments", clinic.clinic_id, before=END, extracts=later.extracts
        )
        first = staging.load_staged(engine, "appointments", clinic.clinic_id, before=END)
    assert len(history) == len(first) > len(frame) // 2


def test_a_later_load_or_a_rewritten_extract_sends_the_read_to_the_database(
    clinic: ClinicConfig, tmp_path: Path
) -> None:
    one = _extract(clinic, tmp_path / "one")
    two = _extract(clinic, tmp_path / "two")
    with store.engine_for(f"sqlite:///{tmp_path / 's.sqlite'}") as engine:
        _stage(clinic, engine, one)
        assert staging._extract_is_staging(engine, "leads", clinic.clinic_id, one.extracts)
        _stage(clinic, engine, two)  # same rows, a newer load
        assert not staging._extract_is_staging(engine, "leads", clinic.clinic_id, one.extracts)
        assert staging._extract_is_staging(engine, "leads", clinic.clinic_id, two.extracts)
        leads_file = two.extracts / "leads.parquet"
        stat = leads_file.stat()
        os.utime(leads_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
        assert not staging._extract_is_staging(engine, "leads", clinic.clinic_id, two.extracts)
        via_file, via_db = _both(engine, clinic, one, "leads")
        pd.testing.assert_frame_equal(via_file, via_db)


def test_an_older_export_staged_after_a_newer_one_does_not_replace_it(tmp_path: Path) -> None:
    # the later *stage step* won: night 1's stage retried after night 2 had staged put the lead's
    # consent back (its revocation came with night 2's export), and an appointment without an
    # updated_at back to its old status; exports now order by when they were read
    from tests.conftest import DATA

    source = DATA / "rules" / "consent_revoked"
    for version in ("before", "after"):
        (tmp_path / version).mkdir()
        leads = (source / "leads.csv").read_text(encoding="utf-8")
        appointments = (
            (source / "appointments.csv").read_text(encoding="utf-8").replace(",2026-05-05 10:00,,,", ",,,,")
        )
        if version == "before":
            leads = leads.replace(",2026-05-25 12:00,", ",,")
            appointments = appointments.replace(",Completed,", ",Booked,")
        (tmp_path / version / "leads.csv").write_text(leads, encoding="utf-8")
        (tmp_path / version / "appointments.csv").write_text(appointments, encoding="utf-8")
    night1 = _extract(
        make_config(tmp_path / "before"), tmp_path / "night1", read_at=datetime(2026, 5, 26, 11, tzinfo=UTC)
    )
    night2 = _extract(
        make_config(tmp_path / "after"), tmp_path / "night2", read_at=datetime(2026, 5, 27, 11, tzinfo=UTC)
    )
    config = make_config(tmp_path / "after")
    with store.engine_for(f"sqlite:///{tmp_path / 's.sqlite'}") as engine:
        _stage(config, engine, night2)
        _stage(config, engine, night1)  # night 1's stage step, retried late
        staged_leads = staging.load_staged(engine, "leads", config.clinic_id, before=END)
        staged_appointments = staging.load_staged(engine, "appointments", config.clinic_id, before=END)
        assert not staging._extract_is_staging(engine, "leads", config.clinic_id, night1.extracts)
    assert staged_leads["consent_revoked_at"].notna().tolist() == [True]
    assert staged_appointments["status"].tolist() == ["attended"]


def test_duplicates_in_one_export_resolve_by_updated_at(tmp_path: Path) -> None:
    from tests.conftest import DATA

    config = make_config(DATA / "rules" / "reexport_upgrade")
    paths = _extract(config, tmp_path / "run")
    path = paths.extracts / "appointments.parquet"
    frame = pd.read_parquet(path)
    newer = frame.iloc[[0]].assign(
        status="attended", updated_at=frame["updated_at"].iloc[0] + pd.Timedelta(hours=1)
    )
    older = frame.iloc[[0]].assign(
        status="cancelled", updated_at=frame["updated_at"].iloc[0] - pd.Timedelta(hours=1)
    )
    pd.concat([frame, newer, older], ignore_index=True).to_parquet(path, index=False)
    with store.engine_for(f"sqlite:///{tmp_path / 's.sqlite'}") as engine:
        loaded = staging.load_extract(engine, "appointments", config.clinic_id, path)
        assert loaded.rows == len(frame) + 2 and not loaded.exact
        staging.write_marker(paths.extracts, {"appointments": loaded})
        assert not staging._extract_is_staging(engine, "appointments", config.clinic_id, paths.extracts)
        history = staging.load_staged(
            engine, "appointments", config.clinic_id, before=END, extracts=paths.extracts
        )
    assert len(history) == len(frame)
    assert history.loc[history["appointment_id"] == frame["appointment_id"].iloc[0], "status"].tolist() == [
        "attended"
    ]


def test_a_locked_staging_database_is_a_refusal_a_retry_can_pass_and_refused_data_is_not(
    tmp_path: Path,
) -> None:
    # with retries on every Airflow step, a night of a backfill that finds the SQLite file
    # locked past the busy timeout is retried; a load the database refuses for its data is not
    import sqlite3

    import sqlalchemy as sa

    from etl.errors import StagingError
    from tests.conftest import DATA

    config = make_config(DATA / "rules" / "refund")
    path = _extract(config, tmp_path / "run").extracts / "appointments.parquet"
    database = tmp_path / "s.sqlite"
    with store.engine_for(f"sqlite:///{database}"):
        pass  # the tables
    impatient = sa.create_engine(f"sqlite:///{database}", connect_args={"timeout": 0.05})
    holder = sqlite3.connect(database)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StagingError, match="code SQLITE_BUSY") as locked:
            staging.load_extract(impatient, "appointments", config.clinic_id, path)
    finally:
        holder.rollback()
        holder.close()
    assert locked.value.retryable
    assert staging.load_extract(impatient, "appointments", config.clinic_id, path).exact  # it passes

    holder = sqlite3.connect(database)
    holder.execute("DROP TABLE appointments")  # a refusal no retry changes
    holder.commit()
    holder.close()
    with pytest.raises(StagingError) as missing:
        staging.load_extract(impatient, "appointments", config.clinic_id, path)
    assert not missing.value.retryable
    impatient.dispose()


def test_the_committed_ddl_is_the_tables_ddl() -> None:
    committed = Path(__file__).resolve().parents[1] / "sql" / "schema.sql"
    assert committed.read_text(encoding="utf-8") == store.schema_ddl(), "run `make schema`"
