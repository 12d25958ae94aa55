"""The run's steps as plain functions of (clinic YAML, interval): what DAG tasks and the CLI call.

Each step is keyed by clinic and data interval, works on the staging database and the run's
folder (``var/runs/<run id>/`` beside the clinic YAML), and returns a small dict of counts and
paths, never rows, so it can be an Airflow XCom as it is. Steps can run in separate processes:
everything one hands the next is on disk (hashed Parquet extracts, the pending plan, the
outbox, ``results/*.json``) or in the database (staging, ledger, audience state).

Order: extract -> stage -> validate_inputs -> build_conversions -> validate_outbound ->
upload google | upload meta | sync_suppression (independent) -> report.
"""

from __future__ import annotations

import functools
import logging
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar

from sqlalchemy.engine import Engine

from etl import audit, deliver, leases, ledger, pipeline, store, switches
from etl.config import ClinicConfig, load_config
from etl.errors import (
    ConfigError,
    DestinationConfigError,
    LegalBasisRefused,
    MedspaError,
    NotPlanned,
    QuotaExhausted,
    SendingStopped,
    SendInProgress,
    StagingError,
)
from etl.outbox import SUMMARY_FILE, read_summary
from etl.rules.stages import RunWindow

log = logging.getLogger(__name__)

Family = Literal["google", "meta"]
_FAMILY: dict[Family, tuple[str, str]] = {
    "google": ("google_conversions", "google_customer_match"),
    "meta": ("meta_events", "meta_audience"),
}
_PLATFORM = {"google": "google_ads", "meta": "meta"}  # the family's config section


@dataclass(frozen=True)
class RunSpec:
    """Everything that identifies one run; cheap to rebuild in every task process."""

    config: ClinicConfig
    window: RunWindow
    database: str | None = None
    outbox: Path | None = None
    label: str | None = None  # "validate": the checks alone, under a run id and folder of their own
    new_database: bool = False  # real sends start a new send ledger here (``ledger.claim_target``)

    @property
    def paths(self) -> pipeline.RunPaths:
        return pipeline.paths_for(self.config, self.window, self.outbox, self.label)

    @property
    def run_id(self) -> str:
        return pipeline.run_id_for(self.config, self.window, self.label)

    @contextmanager
    def engine(self) -> Iterator[Engine]:
        with store.engine_for(self.config.resolved_database_url(self.database)) as engine:
            yield engine


def spec_for(
    config: str | Path | ClinicConfig,
    start: datetime,
    end: datetime,
    *,
    database: str | None = None,
    outbox: Path | None = None,
) -> RunSpec:
    cfg = config if isinstance(config, ClinicConfig) else load_config(config)
    return RunSpec(config=cfg, window=RunWindow(start=start, end=end), database=database, outbox=outbox)


P = ParamSpec("P")
R = TypeVar("R")


def _in_run_folder(
    *, shared: bool = False
) -> Callable[[Callable[Concatenate[RunSpec, P], R]], Callable[Concatenate[RunSpec, P], R]]:
    """The step holds its run's folder (``leases.hold_run_folder``): writers alone, readers
    of the published outbox side by side."""

    def wrap(step: Callable[Concatenate[RunSpec, P], R]) -> Callable[Concatenate[RunSpec, P], R]:
        @functools.wraps(step)
        def held(spec: RunSpec, *args: P.args, **kwargs: P.kwargs) -> R:
            with leases.hold_run_folder(spec.paths.run_dir, shared=shared):
                return step(spec, *args, **kwargs)

        return held

    return wrap


KEY_CHECK_FILE = "id_key_check"  # in the run folder: the fingerprint of the key its plan's IDs use


def claim_target(spec: RunSpec, engine: Engine, target: str) -> None:
    try:
        key_check: str | None = (spec.paths.run_dir / KEY_CHECK_FILE).read_text(encoding="utf-8").strip()
    except FileNotFoundError:  # a plan from before key checks
        key_check = None
    ledger.claim_target(engine, spec.config.clinic_id, target, run_id=spec.run_id, at=_clock(),
                        record=ledger.record_path(spec.config.base_dir, spec.config.clinic_id, target),
                        new_database=spec.new_database, key_check=key_check or None)  # fmt: skip


def check_ledger_record(spec: RunSpec, target: str) -> None:
    """Before a real run's extract: is this the database the clinic's earlier sends are recorded
    in (``ledger.claim_target`` checks again at each send)? A SQLite file that does not exist is
    not created to find out.

    Raises:
        ConfigError: it is not, and ``spec.new_database`` is not set.
    """
    if spec.new_database:
        return
    record = ledger.record_path(spec.config.base_dir, spec.config.clinic_id, target)
    url = spec.config.resolved_database_url(spec.database)
    if store.sqlite_file_missing(url):
        mismatch = ledger.ledger_mismatch(None, spec.config.clinic_id, target, record)
    else:
        with spec.engine() as engine:
            mismatch = ledger.ledger_mismatch(engine, spec.config.clinic_id, target, record)
    if mismatch is not None:
        raise ledger.mismatch_error(record, *mismatch)


def _clock() -> datetime:
    return datetime.now(UTC)  # audit stamps and the order exports were read in, never a rule input


@_in_run_folder()
def extract(spec: RunSpec, timings: pipeline.Timings | None = None) -> dict[str, Any]:
    """The attempt's first step: clear the previous attempt's outputs, then hash the exports.

    ``validate`` works under a run id and folder of its own (``RunSpec.label``), so this never
    clears a published run's outbox for it.
    """
    pipeline.start_attempt(spec.paths)
    counts = pipeline.extract_sources(
        spec.config, spec.window, spec.paths, timings or pipeline.Timings(), read_at=_clock()
    )
    return {"run_id": spec.run_id, **counts}


@_in_run_folder()
def stage(spec: RunSpec, timings: pipeline.Timings | None = None) -> dict[str, Any]:
    """Gate the hashed extracts (critical extract checks), then upsert them into staging."""
    from etl import quality

    _need_extracts(spec, "stage")
    with (timings or pipeline.Timings()).step("gate_extracts"):
        quality.gate_extracts(spec, at=_clock())
    with spec.engine() as engine:
        counts = pipeline.stage_extracts(spec.config, engine, spec.paths, timings or pipeline.Timings())
    return {"run_id": spec.run_id, **counts}


@_in_run_folder()
def validate_inputs(spec: RunSpec) -> dict[str, Any]:
    """Input data-quality suites (hashed extracts, staged daily volume); results stored per run.

    Raises:
        QualityGateFailed: a critical check failed; nothing has been planned, written or sent.
    """
    from etl import quality

    _need_extracts(spec, "validate_inputs")
    return quality.validate_inputs(spec, at=_clock())


def _need_extracts(spec: RunSpec, step: str) -> None:
    """A step that reads the hashed extracts, run without them (cleared in Airflow after the
    run's report deleted them): say so, rather than a file-not-found from pyarrow."""
    if not all((spec.paths.extracts / f"{kind}.parquet").exists() for kind in ("appointments", "leads")):
        raise NotPlanned(
            f"no extracts for run {spec.run_id}: {step} needs the extract step's files (a run's report "
            "deletes them); clear the run from extract"
        )


def refuse_future_end(window: RunWindow, *, dry_run: bool) -> None:
    """A run that records or sends ends at most now: its end is when ready times, purchase value
    windows and the platforms' age limits are judged, and a view of a journey that claims to have
    seen visits after now would outrank tomorrow's (``ledger.journey_relatives``).

    Raises:
        ConfigError: ``window.end`` is after the clock and this is not a dry run.
    """
    if not dry_run and window.end > _clock():
        raise ConfigError(
            f"the run's end {window.end.isoformat()} is after now: a run that sends ends at most now "
            "(ready times and purchase values are judged at its end); preview it with --dry-run"
        )


@_in_run_folder()
def build_conversions(
    spec: RunSpec,
    *,
    secret: bytes,
    dry_run: bool,
    target: str,
    full_resync: bool = False,
    inputs: dict[str, int] | None = None,
    timings: pipeline.Timings | None = None,
) -> dict[str, Any]:
    """Apply the rules and write the gated plan as ``pending`` (not yet an outbox).

    Raises:
        ConfigError: a real run whose key is not the one the clinic's sends were made with
            (``ledger.key_mismatch_error``): every opaque ID would differ, and everything be
            sent again.
    """
    refuse_future_end(spec.window, dry_run=dry_run)
    key_check = ledger.id_key_check(secret)
    if not dry_run and target in ("sandbox", "live") and not spec.new_database:
        record = ledger.record_path(spec.config.base_dir, spec.config.clinic_id, target)
        if (refusal := ledger.key_mismatch_error(record, key_check)) is not None:
            raise refusal
    with spec.engine() as engine:
        plan = pipeline.plan_run(
            spec.config,
            engine,
            spec.window,
            secret=secret,
            target="none" if dry_run else target,
            dry_run=dry_run,
            full_resync=full_resync,
            timings=timings,
            inputs=inputs,
            extracts=spec.paths.extracts,
            run_id=spec.run_id,
            # a revocation recorded since a backfill's end is in force at its upload
            consent_as_of=_clock(),
        )
    pipeline.build_pending(plan, spec.paths)
    if not dry_run:  # what its sends check the clinic's ledger record against (claim_target)
        (spec.paths.run_dir / KEY_CHECK_FILE).write_text(key_check + "\n", encoding="utf-8")
    return {
        "run_id": spec.run_id,
        "stages": plan.summary["stages"],
        # rows per destination; for the Meta audience, members (its rows are batches of them)
        "planned": {
            k: sum(len(r["data"]) for r in v) if k == "meta_audience" else len(v)
            for k, v in plan.outbound.items()
        },
    }


@_in_run_folder()
def validate_outbound(
    spec: RunSpec, checks: Callable[[Path], None] | None = None, *, validate_only: bool = False
) -> dict[str, Any]:
    """Gate the pending plan again (and run outbound data-quality checks), then publish it.

    A real run's conversions go into the ledger as ``planned`` here, before any upload starts
    (``deliver.plan_conversions``); a dry run and a validate-only run record nothing. The
    database is claimed for the run's target before the plan is published: a sandbox run
    refused on a database that sends live leaves no outbox that looks ready to send.

    A retry after the plan was published (the ledger refused the planned rows, say) publishes
    nothing again and records the published plan.
    """
    from etl import quality

    pending = (spec.paths.pending / SUMMARY_FILE).exists()
    if not pending and not (spec.paths.outbox / SUMMARY_FILE).exists():
        raise NotPlanned(
            f"no plan to publish for run {spec.run_id}: build_conversions has not run since its extract"
        )
    plan = read_summary(spec.paths.pending if pending else spec.paths.outbox)
    sends_to = plan["target"] if not plan["dry_run"] and not validate_only else None
    if sends_to:
        with spec.engine() as engine:
            claim_target(spec, engine, sends_to)

    def record_planned(folder: Path) -> None:
        with spec.engine() as engine:
            deliver.plan_conversions(spec.config, engine, folder, run_id=spec.run_id, at=_clock(),
                                     consent=deliver.consent_granted(spec.paths.conversions))  # fmt: skip

    outbox = spec.paths.outbox
    if pending:
        # planned in the ledger before the outbox appears: a run killed between the two, and
        # never rerun, left a published plan whose rows nothing would carry over
        outbox = pipeline.publish_outbox(
            spec.config, spec.paths, checks or quality.outbound_checks(spec, at=_clock()),
            before_publish=record_planned if sends_to else None,
        )  # fmt: skip
        pipeline.clear_folder(spec.paths.results)
    elif sends_to:
        record_planned(outbox)
    return {"run_id": spec.run_id, "outbox": str(outbox)}


def _published_summary(spec: RunSpec) -> dict[str, Any]:
    """The published outbox's summary; a step run out of order gets a clear error, not a traceback.

    A pruned run's outbox holds its summary but no rows (``etl.retention``): sending it would
    send nothing and call that done, so its steps are refused too.
    """
    from etl.retention import pruned_at

    pruned = pruned_at(spec.paths.run_dir)
    if pruned is not None:
        raise NotPlanned(
            f"run {spec.run_id}: its outbox rows were pruned at {pruned} (retention); rerun the "
            "interval from extract to send or report it again (the send ledger keeps what was sent)"
        )
    if not (spec.paths.outbox / SUMMARY_FILE).exists():
        raise NotPlanned(
            f"no published outbox for run {spec.run_id}: validate_outbound has not run since its extract"
        )
    return read_summary(spec.paths.outbox)


def legal_basis_refusal(config: ClinicConfig, family: Family) -> LegalBasisRefused | None:
    """Why a live send to the family's platform is refused today (compliance.legal_basis in the
    clinic YAML: no entry, or one whose review expired), None when it may go."""
    platform = _PLATFORM[family]
    if getattr(config, platform) is None:
        return None  # nothing to send there
    problem = config.legal_basis_problem(platform, _clock().astimezone(config.tz).date())
    if problem is None:
        return None
    return LegalBasisRefused(f"{platform}: nothing sent: {problem}")


def warn_review_due(config: ClinicConfig, family: Family) -> None:
    """Log that the platform's legal-basis entry is close to its last day: said on every live
    send until the review moves ``valid_until``, so it is read before live sends stop."""
    platform = _PLATFORM[family]
    left = config.legal_basis_days_left(platform, _clock().astimezone(config.tz).date())
    if left is not None:
        entry = getattr(config.compliance.legal_basis, platform)
        log.warning("compliance.legal_basis.%s: review due, %d day(s) left after today; live sends to "
                    "it stop after %s", platform, left, entry.valid_until.isoformat())  # fmt: skip


def list_families(config: ClinicConfig) -> tuple[Family, ...]:
    """The families whose platform mirrors a suppression list: the ones a list sync opens."""
    return tuple(f for f in _FAMILY if config.mirrors_a_list(_PLATFORM[f]))


def list_refusals(config: ClinicConfig) -> dict[Family, LegalBasisRefused]:
    """The platforms whose suppression list a live sync may not touch today (a platform that
    mirrors no list there needs no entry for it)."""
    refusals = {}
    for family in _FAMILY:
        refusal = legal_basis_refusal(config, family)
        if refusal is not None and config.mirrors_a_list(_PLATFORM[family]):
            refusals[family] = refusal
    return refusals


def stop_refusals(spec: RunSpec) -> dict[Family, SendingStopped]:
    """The configured platforms whose sends the kill switch stopped (``etl.switches``), each
    with the error a send to it raises."""
    families = [f for f in _FAMILY if getattr(spec.config, _PLATFORM[f]) is not None]
    if not families:
        return {}
    with spec.engine() as engine:
        found = {f: switches.refusal(engine, spec.config.clinic_id, _PLATFORM[f]) for f in families}
    return {f: halt for f, halt in found.items() if halt is not None}


def upload_refusal(
    spec: RunSpec, family: Family, target: Literal["sandbox", "live"]
) -> DestinationConfigError | None:
    """Why the family's upload may not send at all (no current legal basis for a live send; the
    kill switch, on every target), recorded in its results; None when it may go."""
    refusal: DestinationConfigError | None = (
        legal_basis_refusal(spec.config, family) if target == "live" else None
    )
    refusal = stop_refusals(spec).get(family) or refusal
    if refusal is not None:
        _record_refusal(spec, _FAMILY[family][0], refusal)
    return refusal


def _record_refusal(spec: RunSpec, name: str, refusal: MedspaError) -> None:
    """Say in the destination's results that nothing went, and why (``kill_switch`` or
    ``legal_basis``): summary.json, ``run_summaries`` and the report then show the stop rather
    than the plan's counts alone. A later attempt that sends replaces it."""
    nothing = (
        {"sent": 0, "accepted": 0, "rejected": 0, "deferred": 0, "already_sent": 0, "requests": 0}
        if name in ("google_conversions", "meta_events")
        else {"adds": 0, "removes": 0, "rejected": 0, "requests": 0}
    )
    stopped = "kill_switch" if isinstance(refusal, SendingStopped) else "legal_basis"
    deliver.write_result(spec.paths.results, name, {**nothing, "stopped": stopped})


def upload_time(spec: RunSpec, target: Literal["sandbox", "live"]) -> datetime:
    """The time the platforms judge event age by: Meta measures it when it receives the event.

    The plan checks age limits at the run's end (SPEC rule 10); a backfill of a past interval
    uploads later, and an event inside the limit at ``end`` but past it now would make Meta
    refuse its whole request, bisected down to the budget and deferred night after night.
    The sandbox's clock is the run's end, so a sandbox run keeps it.
    """
    return spec.window.end if target == "sandbox" else max(spec.window.end, _clock())


@_in_run_folder(shared=True)
def upload(
    spec: RunSpec,
    family: Family,
    *,
    target: Literal["sandbox", "live"],
    validate_only: bool = False,
    meta_test_event_code: str | None = None,
    sandboxes: dict[str, Any] | None = None,
    retry_wait: float | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Send one platform's conversions from the published outbox, recording each batch.

    ``environ`` holds live credentials (default ``os.environ``; the DAG maps connections).
    """
    from etl.targets import open_destinations

    summary = _published_summary(spec)
    if summary["dry_run"]:
        return {"run_id": spec.run_id, "skipped": "dry run"}
    if (refusal := upload_refusal(spec, family, target)) is not None:  # before the ledger or the platform
        raise refusal
    if target == "live":
        warn_review_due(spec.config, family)
    name = _FAMILY[family][0]
    with (
        spec.engine() as engine,
        open_destinations(
            spec.config,
            target,
            now=upload_time(spec, target),
            test_event_code=meta_test_event_code,
            retry_wait=retry_wait,
            sandboxes=sandboxes,
            only=family,
            environ=environ,
        ) as dests,
    ):
        destination = dests.conversions.get(name)
        if destination is None:
            return {"run_id": spec.run_id, "skipped": f"{family} not configured"}
        if not validate_only:
            claim_target(spec, engine, target)
        progress: dict[str, Any] = {}
        try:
            counts = deliver.upload_conversions(
                spec.config,
                engine,
                spec.paths.outbox,
                destination,
                run_id=spec.run_id,
                clock=_clock,
                validate_only=validate_only,
                target=target,
                siblings=deliver.read_siblings(spec.paths.outbox),
                progress=progress,
            )
        except DestinationConfigError as stop:
            if stop.counts is not None:  # what was decided before the stop reaches summary.json
                deliver.write_result(spec.paths.results, name, stop.counts)
            raise
        except BaseException:
            # any other failure half way (a lost lease, an outcome the database refused, a
            # platform error): what the platform took before it still reaches summary.json and
            # the report, which run whatever this step's end. Only when this attempt sent a
            # request: a retry failing before its first would replace an earlier attempt's
            # counts (which its own include, as finished by an earlier attempt) with fewer
            if progress.get("requests"):
                progress.setdefault("stopped", "failed")
                progress["rejected_codes"] = dict(sorted(progress.get("rejected_codes", {}).items()))
                deliver.write_result(spec.paths.results, name, progress)
            raise
    deliver.write_result(spec.paths.results, name, counts)
    return {"run_id": spec.run_id, name: {k: v for k, v in counts.items() if k != "rejected_codes"}}


@_in_run_folder(shared=True)
def sync_suppression(
    spec: RunSpec,
    *,
    target: Literal["sandbox", "live"],
    validate_only: bool = False,
    sandboxes: dict[str, Any] | None = None,
    retry_wait: float | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Mirror both suppression lists from the published outbox; the synced state moves after success."""
    from etl.targets import open_destinations

    summary = _published_summary(spec)
    if summary["dry_run"]:
        return {"run_id": spec.run_id, "skipped": "dry run"}
    out: dict[str, Any] = {"run_id": spec.run_id}
    # a platform without a current legal basis is not opened at all; the other one's list still
    # syncs (its removals of people who revoked must not wait on this one's paperwork)
    refusals: dict[Family, MedspaError] = {**(list_refusals(spec.config) if target == "live" else {})}
    refusals.update((f, halt) for f, halt in stop_refusals(spec).items()
                    if spec.config.mirrors_a_list(_PLATFORM[f]))  # fmt: skip
    stops: list[MedspaError] = []
    for family, refusal in refusals.items():
        log.error("%s: %s", _FAMILY[family][1], refusal)
        _record_refusal(spec, _FAMILY[family][1], refusal)
        stops.append(refusal)
    # only platforms with a list to mirror are opened: a stopped (or unconfigured-list) platform's
    # adapters are never built, so its credentials are not needed (nor read by the DAG)
    allowed = [f for f in list_families(spec.config) if f not in refusals]
    for family in allowed if target == "live" else []:
        warn_review_due(spec.config, family)
    if not allowed:
        if stops:
            raise stops[0]
        return out  # no suppression list configured: nothing to mirror
    with (
        spec.engine() as engine,
        open_destinations(
            spec.config,
            target,
            now=spec.window.end,
            retry_wait=retry_wait,
            sandboxes=sandboxes,
            only=allowed[0] if len(allowed) == 1 else None,
            environ=environ,
        ) as dests,
    ):
        if dests.audiences and not validate_only:
            claim_target(spec, engine, target)
        for name, audience in dests.audiences.items():
            try:
                counts = deliver.sync_audience(
                    spec.config,
                    engine,
                    spec.paths.outbox,
                    audience,
                    # the run's --full-resync, or this list's replacement the plan found due
                    full_resync=bool(
                        summary.get("full_resync")
                        or summary.get("destinations", {}).get(name, {}).get("resync_due")
                    ),
                    clock=_clock,
                    validate_only=validate_only,
                    run_id=spec.run_id,
                    run_end=spec.window.end,
                    target=target,
                )
            except (DestinationConfigError, QuotaExhausted, SendInProgress, StagingError) as stop:
                # one platform refusing (or its state refused) does not hold back the other list's removals
                log.error("%s: %s", name, stop)
                stops.append(stop)
                continue
            deliver.write_result(spec.paths.results, name, counts)
            out[name] = {k: v for k, v in counts.items() if k != "request_ids"}  # counts only
    if stops:
        raise stops[0]
    return out


@_in_run_folder()
def report(spec: RunSpec) -> dict[str, Any]:
    """Fold upload results into summary.json, record it, render ``report.html``; return the counts.

    Then the run's hashed extracts are deleted: every later step reads the published outbox,
    the staging database and the run's small files, and a rerun of the interval extracts again.
    They are a pseudonymous copy of both whole exports, a few hundred MB a night at a million
    appointments, so keeping each night's would grow the disk and the data at rest without end
    (a run a gate stopped keeps them until its rerun, for the diagnosis).
    """
    from etl.report import render_run_report

    summary = _published_summary(spec)
    merged = pipeline.finalize_summary(spec.paths, summary)
    with spec.engine() as engine:
        ledger.record_summary(engine, merged, run_id=spec.run_id, at=_clock())
        chain = audit.head(engine, spec.config.clinic_id)
        html = render_run_report(spec.config, spec.paths, engine, run_id=spec.run_id, summary=merged)
    if chain is not None:
        # kept apart from the database (task log, XCom), a head shows a chain rewritten after it
        log.info("audit chain head: seq %d sha256 %s (`verify-audit --head` checks it)", *chain)
    shutil.rmtree(spec.paths.extracts, ignore_errors=True)
    _prune_older_runs(spec)
    return {
        "run_id": spec.run_id,
        "outbox": str(spec.paths.outbox),
        "summary": merged,
        "report": str(html),
        "audit_head": None if chain is None else {"seq": chain[0], "sha256": chain[1]},
    }


def _prune_older_runs(spec: RunSpec) -> None:
    """With ``retention.run_files_days`` set, each report prunes the clinic's older run folders
    (``etl.retention``): nightly runs then need no separate clean-up job. A folder that cannot
    be pruned (another user's files) is logged and left for the next night, never failing a
    run whose sends are done."""
    from etl.retention import audit_recorder, prune_runs

    days = spec.config.retention.run_files_days
    if days is None:
        return
    now = _clock()
    try:
        with spec.engine() as engine:
            recorder = audit_recorder(engine, spec.config.clinic_id, now)
            for pruned in prune_runs(spec.config, older_than=timedelta(days=days), now=now, keep=spec.run_id,
                                     on_pruned=recorder):  # fmt: skip
                if pruned.skipped:
                    log.info("retention: run %s left alone (%s)", pruned.run_id, pruned.skipped)
    except OSError as exc:
        log.warning("retention: pruning older runs stopped (%s); the next report tries again",
                    exc.strerror or type(exc).__name__)  # fmt: skip
