"""Send a published outbox through destination adapters, exactly once, recording every outcome.

Every row passes the PHI egress gate (``etl.gate``) again right here, as read from the outbox
just before it is sent: an outbox is also checked when it is published, but an upload task can
be re-run on its own later, under other code or config. Exactly-once rests on four things: opaque IDs derived from the source record (so a re-send is
the same ``order_id``/``event_id`` and the platform de-duplicates it), the ledger written around
the batches (every row ``planned`` before the first request, each outcome committed as its
batch is answered), rows
in a final ledger state never being sent again, and one sender per clinic and destination at a
time (the lease of ``etl.leases``, held from before the ledger is read). A process killed between two batches therefore
re-sends nothing it recorded; one killed during a request re-sends that batch, which the
platform answers as already there. Results per destination go to ``results/<name>.json`` so
parallel upload tasks never write the same file.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from etl import confirm, leases, ledger, store, switches
from etl.config import ClinicConfig
from etl.destinations.base import (
    AudienceDestination,
    AudienceResult,
    ConversionDestination,
    Outcome,
    RowResult,
)
from etl.errors import DestinationConfigError, QuotaExhausted
from etl.gate import check_outbound
from etl.outbox import read_rows, verify_published
from etl.payloads import canonical_json, google_member_key, meta_member_key

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
_ID_FIELD = {"google_conversions": "order_id", "meta_events": "event_id"}


def _stage_of(config: ClinicConfig, destination: str, row: dict[str, Any]) -> str | None:
    if destination == "google_conversions" and config.google_ads is not None:
        actions = config.google_ads.conversion_actions.model_dump()
        return next((s for s, a in actions.items() if a == row.get("conversion_action")), None)
    if destination == "meta_events" and config.meta is not None:
        names = config.meta.event_names.model_dump()
        return next((s for s, n in names.items() if n == row.get("event_name")), None)
    return None


def _entry(result: RowResult, stages: dict[str, str | None]) -> dict[str, Any]:
    return {"opaque_id": result.key, "stage": stages.get(result.key), "status": str(result.outcome),
            "code": result.code, "request_id": result.request_id, "transmitted": result.transmitted}  # fmt: skip


def write_result(results_dir: Path, name: str, counts: dict[str, Any]) -> None:
    results_dir.mkdir(parents=True, exist_ok=True)
    tmp = results_dir / f"{name}.json.tmp"
    tmp.write_text(json.dumps(counts, sort_keys=True, indent=2) + "\n", encoding="utf-8")
    tmp.replace(results_dir / f"{name}.json")


def upload_conversions(
    config: ClinicConfig,
    engine: Engine,
    outbox: Path,
    destination: ConversionDestination,
    *,
    run_id: str,
    clock: Clock,
    validate_only: bool = False,
    target: str = "sandbox",
    on_batch: Callable[[int, int], None] | None = None,
    siblings: PlanSiblings | None = None,
    progress: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Send every outbox row of one destination not yet final in the ledger, batch by batch.

    ``progress``, when given, is the counts dict itself, kept current batch by batch: a caller
    whose upload fails half way (a lost lease, a database that refused an outcome) still has
    what the platform took, for ``summary.json``.

    A row whose journey the ledger holds under another of its IDs is not sent either (it is
    recorded ``superseded``), as the recorded views of its journey that saw the most relate them
    (``ledger.journey_relatives``). This run's own view (``siblings``: ``read_siblings``) is
    recorded first: a journey held on a platform was sent by an upload that recorded its view
    before it sent, whichever run's upload comes later (unless its outbox predates the view
    file).

    Returns:
        counts ``planned, sent, accepted, rejected, already_sent, deferred`` (plus
        ``stopped: "daily_quota"`` when the platform's daily quota ran out; the unsent rows stay
        ``planned`` in the ledger and go out on the next run).
    """
    name = destination.name
    verify_published(outbox, name)  # the bytes the gates checked, not an edited copy
    rows = list(read_rows(outbox, name))
    check_outbound(config, {name: rows})  # the egress gate again, on exactly what is about to leave
    if validate_only:  # the ledger is not written (only what left, in validation_sends): no race
        return _upload(config, engine, rows, destination, run_id=run_id, clock=clock, lease=None,
                       validate_only=True, target=target, on_batch=on_batch, progress=progress)  # fmt: skip
    with leases.hold(engine, config.clinic_id, name, run_id=run_id) as lease:
        if siblings is not None:
            _record_siblings(engine, config.clinic_id, siblings, run_id=run_id)
        # what Google made of earlier requests, before this upload adds its own (etl.confirm)
        checked = (
            confirm.confirm(engine, config.clinic_id, destination, now=clock())
            if confirm.checks_requests(destination)
            else {}
        )
        if checked and progress is not None:
            progress["request_statuses"] = checked
        counts = _upload(config, engine, rows, destination, run_id=run_id, clock=clock, lease=lease,
                         validate_only=False, on_batch=on_batch, progress=progress)  # fmt: skip
        if checked:
            counts["request_statuses"] = checked
        return counts


def _upload(
    config: ClinicConfig,
    engine: Engine,
    rows: list[dict[str, Any]],
    destination: ConversionDestination,
    *,
    run_id: str,
    clock: Clock,
    lease: leases.Lease | None,
    validate_only: bool,
    on_batch: Callable[[int, int], None] | None,
    target: str = "sandbox",
    progress: dict[str, Any] | None = None,
) -> dict[str, Any]:
    name = destination.name
    id_field = _ID_FIELD[name]
    recorded = ledger.read_ledger(engine, config.clinic_id, name)
    final = {
        r[id_field]: recorded[r[id_field]]
        for r in rows
        if r[id_field] in recorded and recorded[r[id_field]].status in ledger.FINAL_STATES
    }
    todo = [r for r in rows if r[id_field] not in final]
    elsewhere: set[str] = set()
    if not validate_only:
        # a journey the platform holds under another of its IDs is not sent again (SPEC rules 4,
        # 11): a newer run sent it after a late export moved the conversion to another visit
        elsewhere = _held_under_another_id(engine, config.clinic_id, name, [r[id_field] for r in todo])  # fmt: skip
        todo = [r for r in todo if r[id_field] not in elsewhere]
    counts: dict[str, Any] = progress if progress is not None else {}
    counts.update(
        {
            "planned": len(rows),
            "sent": 0,
            "accepted": 0,
            "rejected": 0,
            "already_sent": 0,
            "deferred": 0,
            "requests": 0,
        }
    )
    rejected_codes: dict[str, int] = {}
    counts["rejected_codes"] = rejected_codes  # the same dict: current in ``progress`` too
    if validate_only:  # from the start: counts a failed attempt leaves say what they are
        counts["validate_only"] = True
    _count_finished(final.values(), run_id, counts, rejected_codes)
    if elsewhere:
        counts["already_sent"] += len(elsewhere)
        counts["held_under_another_id"] = len(elsewhere)
        _supersede(config, engine, name, rows, elsewhere, run_id=run_id, at=clock())
    if not validate_only:
        # every row still to go is planned before the first request: a process killed at any
        # batch (or stopped by a quota) leaves the rest unfinished in the ledger, so a later run
        # carries it over even when its interval no longer covers the rows' ready time
        ledger.write_ledger(
            engine, config.clinic_id, name, _planned(config, name, todo), run_id=run_id, at=clock()
        )
    batches = [todo[lo : lo + destination.max_batch] for lo in range(0, len(todo), destination.max_batch)]
    platform = switches.platform_of(name)
    for number, batch in enumerate(batches, start=1):
        if (halt := switches.refusal(engine, config.clinic_id, platform)) is not None:
            # the kill switch, thrown while this upload runs: the batches not reached stay planned
            counts["stopped"] = "kill_switch"
            counts["rejected_codes"] = dict(sorted(rejected_codes.items()))
            halt.counts = counts
            log.warning("%s: sending stopped (kill switch) after %d of %d batches; the rest stays planned",
                        name, number - 1, len(batches))  # fmt: skip
            raise halt
        stages = {r[id_field]: _stage_of(config, name, r) for r in batch}
        if lease is not None:
            lease.check()
        if not validate_only:
            # rows another run finished since the ledger was read above are not sent twice, nor
            # rows whose journey another run sent meanwhile under another ID
            finished = ledger.final_among(engine, config.clinic_id, name, list(stages))
            # withdrawn meanwhile by a later plan (consent revoked): not sent, not "already sent"
            withdrawn = (
                ledger.withdrawn_among(engine, config.clinic_id, name, list(finished)) if finished else set()
            )
            if withdrawn:
                counts["withdrawn"] = counts.get("withdrawn", 0) + len(withdrawn)
            late = _held_under_another_id(engine, config.clinic_id, name, [k for k in stages if k not in finished])  # fmt: skip
            if late:
                counts["held_under_another_id"] = counts.get("held_under_another_id", 0) + len(late)
                _supersede(config, engine, name, batch, late, run_id=run_id, at=clock())
            finished |= late
            if finished:
                batch = [r for r in batch if r[id_field] not in finished]
                counts["already_sent"] += len(finished - withdrawn)
                if not batch:
                    continue
        try:
            results = destination.send(batch, validate_only=validate_only)
        except (DestinationConfigError, QuotaExhausted) as exc:
            # rows the platform already decided before it stopped us are recorded, not re-sent,
            # and counted, so summary.json and the ledger agree
            decided = _tally(exc.partial_results, stages, counts, rejected_codes)
            if validate_only:
                _record_validation(
                    engine, config.clinic_id, name, decided, target=target, run_id=run_id, at=clock()
                )
            else:  # the batches not reached stay planned for the next run
                _record_outcomes(engine, config.clinic_id, name, decided, run_id=run_id, at=clock(),
                                 track=confirm.checks_requests(destination))  # fmt: skip
            if isinstance(exc, DestinationConfigError):
                counts["stopped"] = "destination_config"
                counts["rejected_codes"] = dict(sorted(rejected_codes.items()))
                exc.counts = counts  # the caller records them before the stop propagates
                raise
            counts["stopped"] = "daily_quota"
            log.warning(
                "%s: daily quota exhausted after %d of %d batches; the rest is planned for the next run",
                name,
                number - 1,
                len(batches),
            )
            break
        entries = _tally(results, stages, counts, rejected_codes)
        if validate_only:
            _record_validation(
                engine, config.clinic_id, name, entries, target=target, run_id=run_id, at=clock()
            )
        else:
            _record_outcomes(engine, config.clinic_id, name, entries, run_id=run_id, at=clock(),
                             track=confirm.checks_requests(destination))  # fmt: skip
        if on_batch is not None:
            on_batch(number, len(batches))
    counts["rejected_codes"] = dict(sorted(rejected_codes.items()))
    if validate_only:
        counts["validate_only"] = True
    log.info("%s: %s", name, {k: v for k, v in counts.items() if k != "rejected_codes"})
    return counts


# The outcome of a batch the platform took is recorded with retries of its own: failing here
# fails the step, and its retry sends the batch again (Data Manager counts a re-sent conversion
# twice). About a minute of waits covers a busy SQLite file or a PostgreSQL failover.
RECORD_ATTEMPTS = 7
RECORD_WAIT = wait_exponential_jitter(multiplier=0.5, max=20)


def _record_outcomes(
    engine: Engine,
    clinic_id: str,
    name: str,
    entries: list[dict[str, Any]],
    *,
    run_id: str,
    at: datetime,
    track: bool = False,
) -> None:
    """Record a batch's outcomes; with ``track``, also the requests that carried them, to read
    their processing status later (Data Manager, ``etl.confirm``), in the same transaction."""
    requests = confirm.requests_of(entries, "IngestEvents") if track else {}

    def then(conn: Connection) -> None:
        confirm.track(conn, clinic_id, name, requests, run_id=run_id, at=at)

    _recorded(
        lambda: ledger.write_ledger(
            engine, clinic_id, name, entries, run_id=run_id, at=at, then=then if requests else None
        ),
        f"{name}: the send ledger refused the outcome of a batch the platform answered",
        "its rows stay planned, so the next run sends them again",
    )


def _recorded(write: Callable[[], None], what: str, consequence: str) -> None:
    """Record what a platform already applied: a busy or lost database is retried in place (a
    failed step's retry would send again); a refusal no retry passes is a ``StagingError``."""

    def transient(exc: BaseException) -> bool:
        return isinstance(exc, sa.exc.DBAPIError) and exc.orig is not None and store.passes_on_retry(exc.orig)

    try:
        for attempt in Retrying(retry=retry_if_exception(transient), stop=stop_after_attempt(RECORD_ATTEMPTS),
                                wait=RECORD_WAIT, reraise=True, before_sleep=_log_record_retry):  # fmt: skip
            with attempt:
                write()
    except sa.exc.DBAPIError as exc:
        raise store.refused(exc, what, consequence) from None


def _log_record_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    log.warning("recording a sent batch failed (%s); trying again (attempt %d of %d)",
                type(getattr(exc, "orig", None) or exc).__name__, state.attempt_number + 1, RECORD_ATTEMPTS)  # fmt: skip


def _count_finished(
    entries: Iterable[ledger.LedgerEntry], run_id: str, counts: dict[str, Any], rejected_codes: dict[str, int]
) -> None:
    """Count rows found final before this upload started.

    The plan leaves out what was final when it was made, so a row of this plan that is final
    under this run's id was finished by an earlier attempt of this upload (an Airflow retry, a
    rerun after a kill): it counts as what that attempt did, so the summary says what this run
    sent. A row another run finished meanwhile is ``already_sent``. The earlier attempt's
    request count is not known and is not added.
    """
    earlier = 0
    for entry in entries:
        if entry.status == ledger.WITHDRAWN:  # a later plan found consent revoked: never sent
            counts["withdrawn"] = counts.get("withdrawn", 0) + 1
            continue
        if entry.run_id != run_id:
            counts["already_sent"] += 1
            continue
        earlier += 1
        if entry.status in ("accepted", "sent") or entry.request_id:  # it left this process
            counts["sent"] += 1
        if entry.status != "sent":
            counts[entry.status] += 1
        if entry.status == "rejected":
            rejected_codes[entry.code or "unknown"] = rejected_codes.get(entry.code or "unknown", 0) + 1
    if earlier:
        counts["finished_by_an_earlier_attempt"] = earlier
        log.info("%d row(s) were finished by an earlier attempt of this run; counted as its own", earlier)


def _planned(config: ClinicConfig, name: str, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"opaque_id": r[_ID_FIELD[name]], "stage": _stage_of(config, name, r), "status": "planned"}
            for r in rows]  # fmt: skip


def _supersede(
    config: ClinicConfig,
    engine: Engine,
    name: str,
    rows: Sequence[dict[str, Any]],
    keys: set[str],
    *,
    run_id: str,
    at: datetime,
) -> None:
    """Record rows not sent because the platform holds their journey under another ID."""
    log.info("%s: %d row(s) not sent: the platform holds their journey under another ID", name, len(keys))
    entries = [{**entry, "status": ledger.SUPERSEDED, "transmitted": False}
               for entry in _planned(config, name, [r for r in rows if r[_ID_FIELD[name]] in keys])]  # fmt: skip
    ledger.write_ledger(engine, config.clinic_id, name, entries, run_id=run_id, at=at)


def _record_siblings(engine: Engine, clinic_id: str, siblings: PlanSiblings, *, run_id: str) -> None:
    if siblings.planned_at is not None and siblings.horizon is not None:  # else it cannot be ranked
        ledger.record_siblings(engine, clinic_id, siblings.siblings, run_id=run_id,
                               planned_at=siblings.planned_at, horizon=siblings.horizon)  # fmt: skip


def _held_under_another_id(engine: Engine, clinic_id: str, name: str, opaque_ids: Sequence[str]) -> set[str]:
    """Which of ``opaque_ids`` name a journey and stage the ledger holds, for this destination,
    under a related ID (``ledger.journey_relatives``: as the newest views have the journey)."""
    relatives = ledger.journey_relatives(engine, clinic_id, opaque_ids)
    if not relatives:
        return set()
    held = ledger.held_among(engine, clinic_id, name, sorted(set().union(*relatives.values())))
    return {oid for oid, related in relatives.items() if not held.isdisjoint(related)}


@dataclass(frozen=True)
class PlanSiblings:
    """A plan's view of its conversions' journeys (``siblings.json`` in its outbox): per opaque ID
    it looked at, the IDs its journey would carry at its other visits (possibly none); when the
    plan was made; and its horizon, the run's end (it saw no visit after it)."""

    planned_at: datetime | None = None
    horizon: datetime | None = None
    siblings: Mapping[str, Sequence[str]] = field(default_factory=dict)


def read_siblings(outbox: Path) -> PlanSiblings:
    """Empty for an outbox published before the file existed: its uploads record no view."""
    from etl.outbox import SIBLINGS_FILE

    path = outbox / SIBLINGS_FILE
    if not path.exists():
        return PlanSiblings()
    raw = json.loads(path.read_text(encoding="utf-8"))

    def when(key: str) -> datetime | None:
        return datetime.fromisoformat(raw[key]) if raw.get(key) else None

    return PlanSiblings(when("planned_at"), when("horizon"),
                        {str(k): [str(v) for v in vs] for k, vs in raw["siblings"].items()})  # fmt: skip


def plan_conversions(
    config: ClinicConfig,
    engine: Engine,
    outbox: Path,
    *,
    run_id: str,
    at: datetime,
    consent: Mapping[str, tuple[datetime, bool | None]] | None = None,
) -> None:
    """Record every conversion of a published real run's outbox as ``planned`` (final states
    are kept), before any upload starts, with ``consent``: per opaque ID, the time of the
    authorization in force at the run's end and whether the export stated it (``consent_granted``).

    The uploads are separate steps (Airflow tasks, or one after the other in the CLI): a run
    that dies before one of them begins would otherwise leave that platform's conversions
    nowhere in the ledger, and once the next nights' intervals no longer cover their ready
    time nothing would carry them over.
    """
    known = consent or {}
    for name in _ID_FIELD:
        planned = _planned(config, name, list(read_rows(outbox, name)))
        for entry in planned:
            entry["consent_at"], entry["consent_stated"] = known.get(entry["opaque_id"], (None, None))
        ledger.write_ledger(engine, config.clinic_id, name, planned, run_id=run_id, at=at)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def consent_granted(conversions: Path) -> dict[str, tuple[datetime, bool | None]]:
    """Per opaque ID of a run's conversion candidates (``RunPaths.conversions``), the time of
    the consent grant in force at the run's end and whether the export stated it; empty when
    the file is gone."""
    import pyarrow.parquet as pq

    if not conversions.exists() or "consent_at" not in (names := pq.read_schema(conversions).names):
        return {}  # gone, or written by a version before the record (an upgrade mid-run)
    columns = ["opaque_id", "consent_at", *(["consent_stated"] if "consent_stated" in names else [])]
    table = pq.read_table(conversions, columns=columns)
    stated = table["consent_stated"].to_pylist() if "consent_stated" in names else [None] * table.num_rows
    out: dict[str, tuple[datetime, bool | None]] = {}
    for key, micros, flag in zip(table["opaque_id"].to_pylist(), table["consent_at"].to_pylist(), stated,
                                 strict=True):  # fmt: skip
        if micros is not None:
            out[key] = (_EPOCH + timedelta(microseconds=micros), flag)
    return out


def _record_validation(
    engine: Engine,
    clinic_id: str,
    name: str,
    entries: Sequence[dict[str, Any]],
    *,
    target: str,
    run_id: str,
    at: datetime,
) -> None:
    """What a validate-only batch carried out of the building (``validation_sends``): the rows
    a request held, whatever the platform thought of them."""
    left = [(e["opaque_id"], e.get("stage"), e.get("code"), e.get("request_id")) for e in entries
            if e.get("transmitted", True)]  # fmt: skip
    ledger.record_validation(engine, clinic_id, name, target=target, run_id=run_id, at=at, conversions=left)


def _tally(
    results: Sequence[RowResult],
    stages: dict[str, str | None],
    counts: dict[str, Any],
    rejected_codes: dict[str, int],
) -> list[dict[str, Any]]:
    """Count one batch's outcomes (``sent``: what left; a request when anything left) and return
    its ledger entries."""
    if any(r.transmitted for r in results):
        counts["requests"] += 1
    counts["sent"] += sum(1 for r in results if r.transmitted)
    for result in results:
        counts[str(result.outcome)] += 1
        if result.outcome is Outcome.REJECTED:
            rejected_codes[result.code or "unknown"] = rejected_codes.get(result.code or "unknown", 0) + 1
    return [_entry(r, stages) for r in results]


def _audience_rows(outbox: Path, name: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    verify_published(outbox, name)
    rows = list(read_rows(outbox, name))
    add_op = "create" if name == "google_customer_match" else "add"
    return [r for r in rows if r["operation"] == add_op], [r for r in rows if r["operation"] == "remove"]


def _member_keys(name: str, rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    """member_key -> stored payload, the same keys ``etl.pipeline`` diffs against."""
    if name == "google_customer_match":
        return {
            google_member_key(r): canonical_json(
                {"operation": "create", "user_identifiers": r["user_identifiers"]}
            )
            for r in rows
        }
    return {meta_member_key(d): canonical_json(d) for r in rows for d in r["data"]}


def sync_audience(
    config: ClinicConfig,
    engine: Engine,
    outbox: Path,
    destination: AudienceDestination,
    *,
    full_resync: bool,
    clock: Clock,
    validate_only: bool = False,
    run_id: str | None = None,
    run_end: datetime | None = None,
    target: str = "sandbox",
) -> dict[str, Any]:
    """Apply the outbox's membership delta, then record the platform's new state (and the
    ``run_end`` it mirrors, which keeps older runs from syncing afterwards).

    The synced state changes only after the adapter returned, and records only what the
    platform applied: a member it refused or never got (a failed batch) is left out of the
    state, so the next sync sends that add or remove again (adds and removes are idempotent on
    both platforms); a full resync empties the state into the pending adds first, so one
    that did not replace the list, or died after the platform emptied it, is made whole by the
    next sync.
    The adds are written ahead as pending, so a crash between the platform applying them and
    the state being written leaves them known as possibly on the list.
    """
    # the stale-delta check below and the sync it guards are one step: no other sender between
    # (validate-only records nothing, so there is nothing to race on)
    held = nullcontext() if validate_only else leases.hold(engine, config.clinic_id, destination.name,
                                                           run_id=run_id or "unnamed")  # fmt: skip
    with held:
        name = destination.name
        if (halt := switches.refusal(engine, config.clinic_id, switches.platform_of(name))) is not None:
            raise halt  # before anything is written ahead or sent
        newest = (
            ledger.latest_synced_end(engine, config.clinic_id, name, excluding_run=run_id, now=clock())
            if run_end is not None
            else None
        )
        if newest is not None and run_end is not None and newest >= run_end.astimezone(UTC):
            # planned before a later run synced (e.g. backfill runs side by side): this delta is
            # stale, and applying it would put back people who revoked since. Another run of the
            # same end counts as later too (which plan is newer is not recorded): at worst a
            # removal waits for the next night, never a revoked person put back; this run's own
            # earlier sync (a retried task) is no reason
            log.info("%s: a run ending %s synced the list after this plan; left alone", name, newest)
            return {
                "adds": 0,
                "removes": 0,
                "rejected": 0,
                "codes": {},
                "requests": 0,
                "skipped_newer_sync": 1,
            }
        checked = (
            confirm.confirm(engine, config.clinic_id, destination, now=clock())
            if confirm.checks_requests(destination) and not validate_only
            else {}
        )  # a failure found here makes the next plan replace the list (confirm.resync_due)
        adds, removes = _audience_rows(outbox, name)
        check_outbound(config, {name: [*adds, *removes]})  # the egress gate again, just before upload
        add_keys, remove_keys = _member_keys(name, adds), list(_member_keys(name, removes))
        if not validate_only:  # write-ahead: a crash from here on cannot hide these adds
            ledger.record_pending_adds(engine, config.clinic_id, name, add_keys, at=clock(), run_id=run_id,
                                       replacing=full_resync)  # fmt: skip

        def record_carried() -> None:
            # the members handed to validate-only requests (a full resync carries no removes,
            # only remove_all); counted as handed over, also when the platform then stopped the
            # sync: a disclosure record may count high, never low
            if validate_only and destination.validates_remotely:
                ledger.record_validation(engine, config.clinic_id, name, target=target, run_id=run_id or "unnamed",
                                         at=clock(), adds=len(adds), removes=0 if full_resync else len(removes))  # fmt: skip

        try:
            result = destination.sync(adds, removes, full_resync=full_resync, validate_only=validate_only)
        except (DestinationConfigError, QuotaExhausted) as stop:
            record_carried()
            if stop.partial_audience is not None and not validate_only:
                # the platform changed the list before the stop (emptied it): record that much
                _record_sync(config, engine, name, stop.partial_audience, add_keys, remove_keys,
                             full_resync=full_resync, clock=clock, run_id=run_id, run_end=run_end)  # fmt: skip
            raise
        if not validate_only:
            _record_sync(config, engine, name, result, add_keys, remove_keys,
                         full_resync=full_resync, clock=clock, run_id=run_id, run_end=run_end)  # fmt: skip
        else:
            record_carried()
        counts = {
            "adds": result.adds,
            "removes": result.removes,
            "rejected": result.rejected,
            "codes": dict(sorted(result.codes.items())),
            "requests": len(result.request_ids),
            # the platform's id of every request (Meta fbtrace_id, Google job / request id): what
            # support asks for, recorded in results/<list>.json, never in summary.json
            "request_ids": list(result.request_ids),
        }
        if validate_only:
            counts["validate_only"] = True
        if checked:
            counts["request_statuses"] = checked
        log.info("%s: %s", name, counts)
        return counts


def _record_sync(
    config: ClinicConfig,
    engine: Engine,
    name: str,
    result: AudienceResult,
    add_keys: Mapping[str, str],
    remove_keys: Sequence[str],
    *,
    full_resync: bool,
    clock: Clock,
    run_id: str | None,
    run_end: datetime | None,
) -> None:
    """Move the synced state (and settle pending adds) by what the platform applied."""
    unapplied = result.unapplied | {r.key for r in getattr(result, "rejected_members", ())}
    if full_resync and not result.replaced:
        # the state went into the pending adds when the resync began: nobody is known to be on
        # the list, so the next sync adds every member again and removes whoever left
        log.warning("%s: the full resync did not replace the list; the next sync re-adds every member", name)
    else:
        applied = {k: v for k, v in add_keys.items() if k not in unapplied}
        removed = [k for k in remove_keys if k not in unapplied]
        if full_resync:  # the list was emptied first: only this sync's unapplied adds may be on it
            pending = ledger.read_pending_adds(engine, config.clinic_id, name)
            settled = [k for k in pending if k not in add_keys or k not in unapplied]
        else:
            settled = [*applied, *removed]
        at = clock()
        _recorded(
            lambda: ledger.apply_audience_delta(
                engine,
                config.clinic_id,
                name,
                at=at,
                replace_all=full_resync,
                added=applied,
                removed=removed,
                run_id=run_id,
                run_end=run_end,
                settled=settled,
                then=partial(
                    confirm.track,
                    clinic_id=config.clinic_id,
                    destination=name,
                    requests=getattr(result, "checks", {}),
                    run_id=run_id or "unnamed",
                    at=at,
                ),
            ),
            f"{name}: the list state refused what the platform applied",
            "the state stays as before this sync, so the next sync repeats these adds and removes "
            "(both platforms apply them idempotently)",
        )
