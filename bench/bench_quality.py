"""Benchmark: data-quality validation time on 1M appointments against the dry run's own time.

Target (issue #5): all validation (GX import, the input suites on the hashed extracts and staged
volume, the staged-conversion and outbound suites on the plan) under 25% of a dry run without
the gates. Each runs in a fresh process (as Airflow tasks do), on the same synthetic clinic
(``write_synthetic_clinic(out, appointments=1_000_000, leads=400_000, seed=1)``). Figures are
from one run on one machine; absolute seconds vary with its load, the ratio much less.

Usage: .venv/bin/python bench/bench_quality.py [--appointments N] [--leads M] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
START, END = "2026-08-01", "2026-11-23"


def _spec(config: str, database: str) -> Any:
    from etl import tasks
    from etl.config import load_config

    cfg = load_config(config)
    start = datetime.fromisoformat(START).replace(tzinfo=cfg.tz)
    end = datetime.fromisoformat(END).replace(tzinfo=cfg.tz)
    return tasks.spec_for(cfg, start, end, database=database)


def dry_run_child(config: str, database: str) -> dict[str, Any]:
    """A dry run without the data-quality gates (the PHI gate stays): the time to compare with."""
    from etl import pipeline, tasks
    from etl.config import resolve_id_secret

    spec = _spec(config, database)
    secret, _ = resolve_id_secret(real_send=False)
    timings = pipeline.Timings()
    began = time.perf_counter()
    inputs = tasks.extract(spec, timings)
    inputs.pop("run_id")
    tasks.stage(spec, timings)
    built = tasks.build_conversions(
        spec, secret=secret, dry_run=True, target="none", inputs=inputs, timings=timings
    )
    with timings.step("publish_outbox"):
        tasks.validate_outbound(spec, checks=lambda _pending: None)
    return {"seconds": time.perf_counter() - began, "steps": timings.seconds, "planned": built["planned"]}


def validate_child(config: str, database: str) -> dict[str, Any]:
    """Every validation step on the dry run's artifacts, in a fresh process as an Airflow task would."""
    spec = _spec(config, database)
    at = datetime.now(UTC)  # audit stamp of the stored results only
    seconds: dict[str, float] = {}
    began = time.perf_counter()
    import great_expectations  # noqa: F401 - timed on its own: the import is part of the cost

    seconds["gx_import"] = time.perf_counter() - began
    from etl import quality, tasks

    step = time.perf_counter()
    results = quality.check_inputs(spec, at=at)
    seconds["input_suites"] = time.perf_counter() - step
    step = time.perf_counter()
    results += quality.check_pending(spec, spec.paths.outbox, at=at)
    seconds["outbound_suites"] = time.perf_counter() - step
    total = time.perf_counter() - began
    step = time.perf_counter()
    tasks.report(spec)
    seconds["report_html"] = time.perf_counter() - step
    checked = ("appointment_id_unique", "lead_id_unique", "hash_hex64", "order_id_unique")
    return {
        "seconds": total,
        "steps": seconds,
        "checks": len(results),
        "failed": [r.label for r in results if not r.success],
        "rows": {r.label: r.element_count for r in results if r.check in checked},
    }


def child(mode: str, config: str, database: str) -> None:
    out = dry_run_child(config, database) if mode == "dry_run" else validate_child(config, database)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(out, default=str))


def run_child(mode: str, config: Path, database: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--child", mode, str(config), database],
                          stdout=subprocess.PIPE, cwd=ROOT, text=True, check=True)  # fmt: skip
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--appointments", type=int, default=1_000_000)
    parser.add_argument("--leads", type=int, default=400_000)
    parser.add_argument("--out", type=Path, default=ROOT / "var" / "bench")
    args = parser.parse_args()
    folder = args.out / f"clinic-{args.appointments}"
    if not (folder / "clinic.yaml").exists():
        from etl.synth import write_synthetic_clinic

        print(f"synth {args.appointments:,} appointments ...", file=sys.stderr)
        write_synthetic_clinic(folder, appointments=args.appointments, leads=args.leads, seed=1)
    database = folder / "bench-quality.sqlite"
    database.unlink(missing_ok=True)
    print("dry run without the data-quality gates ...", file=sys.stderr)
    dry = run_child("dry_run", folder / "clinic.yaml", f"sqlite:///{database}")
    print("validation on its artifacts ...", file=sys.stderr)
    val = run_child("validate", folder / "clinic.yaml", f"sqlite:///{database}")
    ratio = val["seconds"] / dry["seconds"]
    results = {
        "appointments": args.appointments,
        "dry_run_seconds": round(dry["seconds"], 1),
        "validation_seconds": round(val["seconds"], 1),
        "validation_share_of_dry_run": round(ratio, 3),
        "target validation < 25% of dry run": ratio < 0.25,
        "validation_steps": {k: round(v, 1) for k, v in val["steps"].items()},
        "dry_run_steps": {k: round(v, 1) for k, v in dry["steps"].items()},
        "checks": val["checks"],
        "failed_checks": val["failed"],
        "rows_validated": val["rows"],
        "planned": dry["planned"],
        "peak_rss_mib": {"dry_run": round(dry["peak_rss_mib"]), "validation": round(val["peak_rss_mib"])},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results-quality.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        main()
