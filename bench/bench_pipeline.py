"""Benchmark: a dry run on 1M appointments + 400k leads against a floor measured in the same run.

The floor is the least any implementation must do: read both CSVs with pyarrow and SHA-256 the
email and phone columns with hashlib. Targets (issue #2): dry-run wall time <= 3x the floor,
peak RSS <= 2 GiB, per-row cost at 1M within 1.3x of the cost at 100k. Next to the floor it
measures SQLite's own cost of writing the staged rows (``staging_bound_seconds``), the least any
design that stages them in SQLite pays, and the cost of importing Great Expectations
(``gx_import_seconds``), which every run that checks its data pays once. A second part measures upload throughput against the
local sandboxes (issues #3 and #4). Figures are ratios from one run on one machine; absolute
seconds vary with the machine's load.

Usage: .venv/bin/python bench/bench_pipeline.py [--appointments N] [--leads M] [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import resource
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
START, END = "2026-08-01", "2026-11-23"


def floor_seconds(folder: Path) -> float:
    """Read both exports with pyarrow and hash email and phone with hashlib: the floor."""
    import pyarrow.csv as pacsv

    began = time.perf_counter()
    for name in ("appointments.csv", "leads.csv"):
        options = pacsv.ParseOptions(newlines_in_values=True)  # synth writes quoted newlines
        table = pacsv.read_csv(folder / "exports" / name, parse_options=options)
        for column in ("email", "phone"):
            for value in table.column(column).to_pylist():
                if value:
                    hashlib.sha256(str(value).encode()).hexdigest()
    return time.perf_counter() - began


def staging_bound_seconds(database: Path, *, keys_only: bool = False) -> float:
    """SQLite's own cost of writing the staged rows: copy both staging tables, as the dry run left
    them, into a fresh database file with one ``INSERT ... SELECT`` each (no Python per row, same
    pragmas). Any design that stages these rows in SQLite pays at least this on a first load;
    with ``keys_only``, what even a table of the records' keys alone would cost."""
    import sqlite3

    fresh = database.with_name(database.name + ".bound")
    for suffix in ("", "-wal", "-shm"):
        Path(f"{fresh}{suffix}").unlink(missing_ok=True)
    conn = sqlite3.connect(database, isolation_level=None)
    try:
        conn.execute("ATTACH DATABASE ? AS fresh", (str(fresh),))
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "cache_size=-65536"):
            conn.execute(f"PRAGMA fresh.{pragma}")
        ddl = dict(conn.execute("SELECT name, sql FROM main.sqlite_master WHERE type = 'table'").fetchall())
        began = time.perf_counter()
        conn.execute("BEGIN")
        for table, key in (("appointments", "appointment_id"), ("leads", "lead_id")):
            if keys_only:
                create = f"CREATE TABLE fresh.{table} (clinic_id TEXT NOT NULL, {key} TEXT NOT NULL, "
                conn.execute(create + f"PRIMARY KEY (clinic_id, {key}))")
                conn.execute(f"INSERT INTO fresh.{table} SELECT clinic_id, {key} FROM main.{table}")
            else:
                conn.execute(ddl[table].replace(f"CREATE TABLE {table}", f"CREATE TABLE fresh.{table}", 1))
                conn.execute(f"INSERT INTO fresh.{table} SELECT * FROM main.{table}")
        conn.execute("COMMIT")
        return time.perf_counter() - began
    finally:
        conn.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{fresh}{suffix}").unlink(missing_ok=True)


def gx_import_seconds(runs: int = 3) -> float:
    """The fastest of ``runs`` fresh imports of Great Expectations, after the libraries the
    pipeline loads anyway (pandas, pyarrow, SQLAlchemy): a fixed cost every checked run pays,
    whatever it checks, so it belongs next to the floor when judging a ratio to it."""
    probe = (
        "import time, pandas, pyarrow, sqlalchemy; t = time.perf_counter(); "
        "import great_expectations; print(time.perf_counter() - t)"
    )
    seconds = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
        seconds.append(float(out.stdout.strip().splitlines()[-1]))
    return min(seconds)


class RssByStep:
    """Samples the process's RSS every 50 ms and keeps the highest per pipeline step."""

    def __init__(self) -> None:
        import threading

        import psutil

        self.step = "start"
        self.peaks: dict[str, float] = {}
        self.at_entry: dict[str, int] = {}
        self._proc = psutil.Process()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def enter(self, step: str) -> None:
        self.step = step
        self.at_entry[step] = round(self._proc.memory_info().rss / 2**20)

    def _sample(self) -> None:
        while not self._done.wait(0.05):
            mib = self._proc.memory_info().rss / 2**20
            self.peaks[self.step] = max(self.peaks.get(self.step, 0.0), mib)

    def stop(self) -> dict[str, int]:
        self._done.set()
        self._thread.join()
        return {k: round(v) for k, v in self.peaks.items()}


def child(config: str, database: str, mode: str) -> None:
    """Runs in a fresh process so wall time and peak RSS belong to the pipeline alone."""
    from etl import pipeline, staging, tasks
    from etl.config import load_config, resolve_id_secret

    cfg = load_config(config)
    tz = cfg.tz
    start = datetime.fromisoformat(START).replace(tzinfo=tz)
    end = datetime.fromisoformat(END).replace(tzinfo=tz)
    spec = tasks.spec_for(cfg, start, end, database=database)
    rss = RssByStep()
    timings = pipeline.Timings(on_step=rss.enter)
    secret, _ = resolve_id_secret(real_send=False)
    began = time.perf_counter()
    out: dict[str, Any] = {}
    if mode in ("dry_run", "dry_run_db_history"):
        inputs = tasks.extract(spec, timings)
        inputs.pop("run_id")
        tasks.stage(spec, timings)
        if mode == "dry_run_db_history":
            # what a run pays when staging holds more than this export (an incremental export):
            # without the load marker the history is read back from the database
            (spec.paths.extracts / staging.MARKER).unlink()
        with timings.step("validate_inputs"):
            tasks.validate_inputs(spec)
        built = tasks.build_conversions(
            spec, secret=secret, dry_run=True, target="none", inputs=inputs, timings=timings
        )
        with timings.step("validate_outbound"):
            tasks.validate_outbound(spec)
        out["planned"] = built["planned"]
    else:
        from etl.targets import started_sandboxes

        # a real (non-dry) plan on a fresh database, then the uploads alone are timed
        tasks.extract(spec)
        tasks.stage(spec)
        tasks.build_conversions(spec, secret=secret, dry_run=False, target="sandbox")
        tasks.validate_outbound(spec)
        began = time.perf_counter()
        with started_sandboxes(cfg, now=end) as sandboxes:
            families: tuple[tasks.Family, ...] = ("google", "meta")
            for family in families:
                with timings.step(f"upload_{family}"):
                    out[family] = tasks.upload(spec, family, target="sandbox", sandboxes=sandboxes)
            with timings.step("sync_suppression"):
                out["suppression"] = tasks.sync_suppression(spec, target="sandbox", sandboxes=sandboxes)
    out["wall"] = time.perf_counter() - began
    out["stages"] = timings.seconds
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["peak_rss_mib_by_stage"] = rss.stop()
    print(json.dumps(out, default=str))


def run_child(config: Path, database: str, mode: str) -> dict[str, Any]:
    began = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", str(config), database, mode],
        stdout=subprocess.PIPE,
        cwd=ROOT,
        text=True,
    )
    stdout, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"benchmark child failed ({mode}, exit {proc.returncode})")
    result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    result["process_wall"] = time.perf_counter() - began
    return result


def synth(folder: Path, appointments: int, leads: int) -> float:
    from etl.synth import write_synthetic_clinic

    began = time.perf_counter()
    if not (folder / "clinic.yaml").exists():
        write_synthetic_clinic(folder, appointments=appointments, leads=leads, seed=1)
    return time.perf_counter() - began


def measure(folder: Path, label: str, appointments: int, mode: str = "dry_run") -> dict[str, Any]:
    database = f"sqlite:///{folder / f'bench-{label}.sqlite'}"
    for suffix in ("", "-wal", "-shm"):
        Path(folder / f"bench-{label}.sqlite{suffix}").unlink(missing_ok=True)
    dry = run_child(folder / "clinic.yaml", database, mode)
    floor = floor_seconds(folder)
    bound = staging_bound_seconds(folder / f"bench-{label}.sqlite")
    keys_bound = staging_bound_seconds(folder / f"bench-{label}.sqlite", keys_only=True)
    gx_import = gx_import_seconds()
    return {
        "mode": mode,
        "label": label,
        "appointments": appointments,
        "dry_run_seconds": round(dry["wall"], 2),
        "process_seconds": round(dry["process_wall"], 2),
        "floor_seconds": round(floor, 2),
        "ratio_to_floor": round(dry["wall"] / floor, 2),
        "staging_bound_seconds": round(bound, 2),
        "floor_plus_staging_bound_ratio": round((floor + bound) / floor, 2),
        "staging_keys_only_bound_seconds": round(keys_bound, 2),
        "gx_import_seconds": round(gx_import, 2),
        # the floor plus what the required components cost before any rule runs
        "floor_plus_staging_bound_and_gx_import_ratio": round((floor + bound + gx_import) / floor, 2),
        "rows_per_second": round(appointments / dry["wall"]),
        "us_per_appointment": round(dry["wall"] / appointments * 1e6, 2),
        "peak_rss_mib": round(dry["peak_rss_mib"]),
        "stages": {k: round(v, 2) for k, v in dry["stages"].items()},
        "peak_rss_mib_by_stage": dry["peak_rss_mib_by_stage"],
        "planned": dry["planned"],
        "database": database,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--appointments", type=int, default=1_000_000)
    parser.add_argument("--leads", type=int, default=400_000)
    parser.add_argument("--out", type=Path, default=ROOT / "var" / "bench")
    parser.add_argument("--skip-uploads", action="store_true")
    args = parser.parse_args()
    small_n, small_l = max(args.appointments // 10, 1000), max(args.leads // 10, 400)
    small_dir, big_dir = args.out / f"clinic-{small_n}", args.out / f"clinic-{args.appointments}"
    print(f"synth {small_n:,} + {args.appointments:,} appointments ...", file=sys.stderr)
    synth(small_dir, small_n, small_l)
    synth(big_dir, args.appointments, args.leads)
    print("small dry run ...", file=sys.stderr)
    small = measure(small_dir, "small", small_n)
    print("large dry run ...", file=sys.stderr)
    big = measure(big_dir, "large", args.appointments)
    print("large dry run, history read back from the database ...", file=sys.stderr)
    big_db = measure(big_dir, "large-db", args.appointments, mode="dry_run_db_history")
    results: dict[str, Any] = {"small": small, "large": big, "large_history_from_database": big_db}
    results["targets"] = {
        "ratio_to_floor <= 3": big["ratio_to_floor"] <= 3,
        "peak_rss <= 2048 MiB": big["peak_rss_mib"] <= 2048,
        "ratio_to_floor, history from the database": big_db["ratio_to_floor"],
        "peak_rss MiB, history from the database": big_db["peak_rss_mib"],
        "per-row cost 1M / 100k <= 1.3": round(big["us_per_appointment"] / small["us_per_appointment"], 2),
    }
    if not args.skip_uploads:
        print("uploads to the sandboxes (small clinic) ...", file=sys.stderr)
        upload_db = small_dir / "bench-upload.sqlite"
        upload_db.unlink(missing_ok=True)
        up = run_child(small_dir / "clinic.yaml", f"sqlite:///{upload_db}", "upload")
        rows = {
            "google_conversions": up["google"].get("google_conversions", {}).get("sent", 0),
            "meta_events": up["meta"].get("meta_events", {}).get("sent", 0),
        }
        results["uploads"] = {
            "seconds": {k: round(v, 2) for k, v in up["stages"].items()},
            "rows": rows,
            "rows_per_second": {
                "google_conversions": round(rows["google_conversions"] / up["stages"]["upload_google"]),
                "meta_events": round(rows["meta_events"] / up["stages"]["upload_meta"]),
            },
            "requests": {
                "google_conversions": up["google"].get("google_conversions", {}).get("requests"),
                "expected_google": math.ceil(rows["google_conversions"] / 2000),
                "meta_events": up["meta"].get("meta_events", {}).get("requests"),
                "expected_meta": math.ceil(rows["meta_events"] / 1000),
            },
            "suppression": up["suppression"],
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        main()
