"""Run folders keep their pseudonymous working files only as long as they are useful.

Each run leaves ``var/runs/<run id>/`` behind: the outbox rows (hashed identifiers, click IDs,
opaque IDs: one copy of each night's suppression lists), the candidate file, and after a gate
stop the hashed extracts. Nightly runs would keep a copy of every list member's hashes per
night, without end. Pruning deletes those once a folder has not changed for the configured
number of days and keeps the run's record: ``outbox/summary.json``, ``results/*.json`` and
``report.html`` (counts only), plus ``pruned.json`` saying what was deleted and when. What was
sent stays in the send ledger; a rerun of the interval extracts again.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from etl.config import ClinicConfig
from etl.errors import RunInProgress
from etl.leases import hold_run_folder
from etl.outbox import OUTBOX_FILES
from etl.pipeline import is_run_of

log = logging.getLogger(__name__)

PRUNED_FILE = "pruned.json"
_NOT_ACTIVITY = (".lock", PRUNED_FILE, PRUNED_FILE + ".tmp")


@dataclass(frozen=True)
class Pruned:
    run_id: str
    files: int  # files deleted (or that would be, in a dry run)
    bytes: int
    skipped: str | None = None  # why the folder was left alone ("in use")


def runs_dir(config: ClinicConfig) -> Path:
    return config.base_dir / "var" / "runs"


def _scratch_folders(run_dir: Path) -> list[Path]:
    """Folders of rows a step writes on its way: extracts, and the plan's staging folders
    (``.outbox.pending``, ``.outbox.old``, and ``write_outbox``'s ``*.partial`` / ``*.old``
    siblings a killed write leaves)."""
    hidden = [
        p for p in run_dir.glob(".*") if p.is_dir() and p.name.endswith((".pending", ".partial", ".old"))
    ]
    return [p for p in [run_dir / "extract", *hidden] if p.is_dir()]


def _working_files(run_dir: Path) -> list[Path]:
    """The files in ``run_dir`` that hold rows (hashes, click IDs, opaque IDs), not counts."""
    outbox = run_dir / "outbox"
    found = [outbox / name for name in OUTBOX_FILES.values()]
    found.append(run_dir / "conversions.parquet")  # not outbox/siblings.json: opaque IDs only
    for folder in _scratch_folders(run_dir):
        found.extend(p for p in folder.rglob("*") if p.is_file())
    return [p for p in found if p.is_file()]


def _last_change(run_dir: Path) -> datetime:
    # the lock and the prune record are not the run's activity
    newest = max((p.stat().st_mtime for p in run_dir.rglob("*") if p.is_file() and p.name not in _NOT_ACTIVITY),
                 default=run_dir.stat().st_mtime)  # fmt: skip
    return datetime.fromtimestamp(newest, tz=UTC)


def prune_runs(
    config: ClinicConfig,
    *,
    older_than: timedelta,
    now: datetime,
    dry_run: bool = False,
    keep: str | None = None,
    on_pruned: Callable[[Pruned], None] | None = None,
) -> Iterator[Pruned]:
    """Delete the working files of every run folder of ``config``'s clinic unchanged for
    ``older_than``.

    Only folders of this clinic (``<clinic_id>__...``): several clinic YAMLs may share one
    folder and so one ``var/runs``. ``keep``: a run id never pruned (the run calling this). A
    folder another process holds (a run in progress) is left alone and reported as skipped;
    one that cannot be pruned (another user's files, a damaged record) is logged, reported
    as skipped and left for the next time, without stopping the others. ``on_pruned`` is told
    of each folder whose files were deleted, as soon as they are (``audit_recorder``).
    """
    base = runs_dir(config)
    if not base.is_dir():
        return
    for run_dir in sorted(p for p in base.iterdir() if p.is_dir() and is_run_of(p.name, config.clinic_id)):
        if run_dir.name == keep:
            continue
        try:
            pruned = _prune_one(run_dir, older_than=older_than, now=now, dry_run=dry_run)
        except RunInProgress:
            pruned = Pruned(run_dir.name, 0, 0, skipped="in use")
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            log.warning(
                "retention: run %s left as it is (%s); the next prune tries again", run_dir.name, reason
            )
            pruned = Pruned(run_dir.name, 0, 0, skipped=f"failed: {reason}")
        if pruned is not None:
            if on_pruned is not None and not dry_run and pruned.skipped is None:
                on_pruned(pruned)
            yield pruned


def audit_recorder(engine: Engine, clinic_id: str, now: datetime) -> Callable[[Pruned], None]:
    """Append each prune to the audit chain (checklist item 15: the purge is audited): which
    run folder, how many files and bytes went. A chain the database refuses is logged, not
    raised: the files are gone either way, and ``pruned.json`` in the folder still says so."""
    from etl import audit

    def record(pruned: Pruned) -> None:
        try:
            with engine.begin() as conn:
                audit.append(conn, clinic_id, "prune", pruned.run_id,
                             {"files": pruned.files, "bytes": pruned.bytes}, now)  # fmt: skip
        except sa.exc.SQLAlchemyError as exc:
            log.warning("retention: the prune of run %s is not in the audit chain (%s)", pruned.run_id,
                        type(exc).__name__)  # fmt: skip

    return record


def _prune_one(run_dir: Path, *, older_than: timedelta, now: datetime, dry_run: bool) -> Pruned | None:
    if now - _last_change(run_dir) < older_than or not _working_files(run_dir):
        return None
    if dry_run:
        files = _working_files(run_dir)
        return Pruned(run_dir.name, len(files), sum(p.stat().st_size for p in files))
    with hold_run_folder(run_dir):
        # again under the lock: a rerun may have started since the first look
        files = _working_files(run_dir)
        if now - _last_change(run_dir) < older_than or not files:
            return None
        size = sum(p.stat().st_size for p in files)
        _prune(run_dir, files, size, now)
    log.info("pruned run %s: %d files, %d bytes", run_dir.name, len(files), size)
    return Pruned(run_dir.name, len(files), size)


def _prune(run_dir: Path, files: list[Path], size: int, now: datetime) -> None:
    """Delete ``files``; record it in ``pruned.json`` when outbox rows go (the run can no longer
    be sent or re-reported from its folder). A run whose outbox lives elsewhere (``--outbox``)
    loses only its candidate file and extracts, and stays sendable."""
    outbox_rows = [p for p in files if p.parent == run_dir / "outbox"]
    if outbox_rows:
        marker = run_dir / PRUNED_FILE
        previous = json.loads(marker.read_text(encoding="utf-8")) if marker.exists() else {}
        record = {
            "pruned_at": now.astimezone(UTC).isoformat(),
            "files": int(previous.get("files", 0)) + len(files),
            "bytes": int(previous.get("bytes", 0)) + size,
            "deleted": sorted(
                {*previous.get("deleted", []), *(p.relative_to(run_dir).as_posix() for p in files)}
            ),
        }
        # the record first: a prune killed halfway is still on record, and a second one finishes it
        tmp = marker.with_name(PRUNED_FILE + ".tmp")
        tmp.write_text(json.dumps(record, sort_keys=True, indent=2) + "\n", encoding="utf-8")
        tmp.replace(marker)
    for folder in _scratch_folders(run_dir):
        shutil.rmtree(folder)
    for path in files:
        path.unlink(missing_ok=True)


def pruned_at(run_dir: Path) -> str | None:
    """When the run's working files were pruned, or None."""
    marker = run_dir / PRUNED_FILE
    if not marker.exists():
        return None
    return str(json.loads(marker.read_text(encoding="utf-8")).get("pruned_at"))
