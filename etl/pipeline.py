"""The stages in order: stage sources, plan conversions, gate, write the outbox (then deliver).

The CLI and the Airflow DAG are two doors into these functions, so nothing is implemented
twice. Each function takes plain values (config, window, engine, secret) and returns counts or
paths; none reads the clock: ``window.end`` is "now" for every rule, and audit timestamps
(``recorded_at``) are handed in by the caller.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy.engine import Engine

from etl import confirm, extract, ledger, payloads, staging, store
from etl.config import ClinicConfig
from etl.gate import check_outbound
from etl.identifiers import hash_identifiers, usable_click_ids
from etl.outbox import write_outbox
from etl.rules.consent import consent_events
from etl.rules.journeys import build_journeys
from etl.rules.persons import link_persons
from etl.rules.records import flag_test_records
from etl.rules.stages import RunWindow, build_conversions, journey_sibling_ids, opaque_id
from etl.rules.suppression import suppression_members

log = logging.getLogger(__name__)

DROP_REASONS = (
    "not_attended",
    "test_record",
    "no_lead",
    "existing_patient",
    "no_consent",
    "consent_revoked",
    "no_identifiers",
    "outside_window",
    "duplicate_in_journey",
    "no_revenue",
    "too_old_for_google",
    "too_old_for_meta",
    "already_sent",
)
CONVERSION_DESTINATIONS = ledger.CONVERSION_DESTINATIONS
# the longest age either platform takes (Google: click or conversion 90 days; Meta: 62 at most),
# plus a day of slack: an unfinished row planned longer ago than this is not carried any more
_CARRY_HORIZON = timedelta(days=91)
AUDIENCE_DESTINATIONS = ("google_customer_match", "meta_audience")
_ID_COLUMN = {"google_conversions": "order_id", "meta_events": "event_id"}


@dataclass
class Timings:
    """Wall time per stage, for progress output and the benchmark (never in summary.json)."""

    seconds: dict[str, float] = field(default_factory=dict)
    on_step: Callable[[str], None] | None = None

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time one step; afterwards hand its freed memory back to the operating system.

        Allocators keep freed memory for reuse, so without the release a run's peak RSS would
        be the sum of its steps' peaks rather than the largest one.
        """
        if self.on_step is not None:
            self.on_step(name)
        began = time.perf_counter()
        try:
            yield
        finally:
            release_memory()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - began


def release_memory() -> None:
    """Return freed heap to the OS: release Arrow's pool, then glibc's ``malloc_trim`` where it
    exists.

    No full garbage collection here: its cost grows with the live containers (1.7 s a call once a
    million appointments' payload rows exist, 8 s a run), and the one part of a run that leaves
    large reference cycles, Great Expectations, collects after itself (``quality_gx.run_suites``).
    """
    import ctypes
    import ctypes.util

    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    libc = ctypes.util.find_library("c")
    if libc and "libc.so" in libc:
        trim = getattr(ctypes.CDLL(libc), "malloc_trim", None)
        if trim is not None:
            trim(0)


@dataclass
class AudienceDelta:
    adds: dict[str, Any]
    removes: dict[str, Any]
    full_resync: bool
    skipped: bool = False  # a later run already synced this list (this run is a backfill)
    members: int = 0  # people this list holds at the run's end (Meta needs an email or a phone)
    resync_due: bool = False  # replaced because Google failed a request of it (etl.confirm)


@dataclass
class Plan:
    """Everything a run would send, already gated; ``summary`` holds counts only."""

    run_id: str
    outbound: dict[str, list[dict[str, Any]]]
    audiences: dict[str, AudienceDelta]
    summary: dict[str, Any]
    stages: dict[str, dict[str, str]]  # destination -> opaque id -> stage, for the ledger
    # the plan's view of each conversion it looked at (not final): opaque id -> the IDs its
    # journey's stage would carry at its other visits; a real run's upload records it
    siblings: dict[str, list[str]] = field(default_factory=dict)
    planned_at: datetime | None = None  # the plan task's clock (``consent_as_of``), if it passed one
    # this run's conversion candidates as the rules made them (opaque keys, times, values,
    # outcome, carried): what the staged-conversion checks judge, kept with the run's files
    conversions: pd.DataFrame | None = None


DRY_RUN_LABEL = "dry-run"
VALIDATE_ONLY_LABEL = "validate-only"


def run_label(*, dry_run: bool, validate_only: bool = False) -> str | None:
    """The label of a run that sends nothing for real: a dry run, or one the platforms only
    validate. It gets a folder and run id of its own, so previewing an interval already sent
    never replaces the outbox, summary and report that say what left for it."""
    if dry_run:
        return DRY_RUN_LABEL
    return VALIDATE_ONLY_LABEL if validate_only else None


def run_id_for(config: ClinicConfig, window: RunWindow, label: str | None = None) -> str:
    """The clinic and the interval (a rerun is the same run); ``label`` marks a run of another
    kind over the same interval (``validate``, ``run_label``), which must not write over the
    run's records."""
    fmt = "%Y%m%dT%H%M%z"
    start, end = window.start.astimezone(config.tz), window.end.astimezone(config.tz)
    base = f"{config.clinic_id}__{start.strftime(fmt)}__{end.strftime(fmt)}"
    return f"{base}__{label}" if label else base


def is_run_of(name: str, clinic_id: str) -> bool:
    """Whether ``name`` is a run id of ``clinic_id`` (not of ``<clinic_id>__west``, another clinic
    whose id merely starts the same)."""
    moment = r"[0-9]{8}T[0-9]{4}[+-][0-9]{4}"
    return re.fullmatch(rf"{re.escape(clinic_id)}__{moment}__{moment}(?:__[a-z-]+)?", name) is not None


@dataclass(frozen=True)
class RunPaths:
    """Where one run keeps its files: hashed extracts, the pending plan, the outbox, results.

    Everything under ``run_dir`` is pseudonymous (hashes, opaque IDs, counts): raw identifiers
    are hashed inside ``extract_sources`` before the first byte is written.
    """

    run_dir: Path
    outbox: Path

    @property
    def extracts(self) -> Path:
        return self.run_dir / "extract"

    @property
    def pending(self) -> Path:
        return self.outbox.with_name(f".{self.outbox.name}.pending")

    @property
    def results(self) -> Path:
        return self.run_dir / "results"

    @property
    def conversions(self) -> Path:
        """This attempt's conversion candidates as the rules made them (see ``build_pending``)."""
        return self.run_dir / "conversions.parquet"

    @property
    def stopped(self) -> Path:
        """Names the step a gate stopped this run's latest attempt at; gone once it published."""
        return self.run_dir / "stopped.txt"


def paths_for(
    config: ClinicConfig, window: RunWindow, outbox: Path | None = None, label: str | None = None
) -> RunPaths:
    run_dir = config.base_dir / "var" / "runs" / run_id_for(config, window, label)
    # resolved: "." has no name to put the pending plan beside
    return RunPaths(run_dir=run_dir, outbox=outbox.resolve() if outbox else run_dir / "outbox")


REPORT_FILE = "report.html"  # in the run's folder (``etl.report``)


def start_attempt(paths: RunPaths) -> None:
    """Clear what an earlier attempt of this run left: its outbox, upload results, stop marker.

    The run id is the clinic and interval, so a rerun works in the same folder; a later step
    must never fold the earlier attempt's outbox or results as if this attempt had made them
    (the report after a stopped rerun did). What was sent stays in the send ledger, the audience
    state and ``run_summaries``.
    """
    from etl.outbox import check_outbox_folder
    from etl.retention import PRUNED_FILE

    check_outbox_folder(paths.outbox)
    for folder in (paths.outbox, paths.results, paths.pending):
        clear_folder(folder)
    paths.stopped.unlink(missing_ok=True)
    paths.conversions.unlink(missing_ok=True)
    # the earlier attempt's page: an attempt that fails before its report must not leave it
    # looking like this attempt's (``report --run-id`` renders the recorded summary, and says so)
    if (page := paths.run_dir / REPORT_FILE).is_file():
        page.unlink()
    (paths.run_dir / PRUNED_FILE).unlink(missing_ok=True)  # this attempt's files are new


def clear_folder(folder: Path) -> None:
    """Remove ``folder``; one that cannot be removed (another user's files, a read-only disk)
    is an error, never passed over: a later step would fold what it holds as this attempt's
    (a dry run's summary once reported an earlier real run's sends as its own)."""
    import shutil

    with suppress(FileNotFoundError):
        shutil.rmtree(folder)


def extract_sources(
    config: ClinicConfig,
    window: RunWindow,
    paths: RunPaths,
    timings: Timings,
    *,
    read_at: datetime | None = None,
) -> dict[str, int]:
    """Read both exports, flag test records, hash identifiers; write hashed Parquet extracts.

    ``read_at`` (the clock as the exports are read) goes beside them: staging orders exports by
    it, whenever each run's stage step runs (``staging.load_extract``).

    Raw identifiers live only inside this function's frames: what reaches disk is the
    ``is_test`` flag and the per-platform hashes (plus the clinic's own record IDs).

    Returns:
        row counts per kind. Each source's fingerprint (a CSV file's bytes, or a SQL source's
        query text) goes to ``extract/sources.json`` for the plan's summary, so the run's record
        says which export it read (not in the return value: that is a task's XCom, counts only).
    """
    counts: dict[str, int] = {}
    fingerprints: dict[str, str] = {}
    readers = {"appointments": extract.read_appointments, "leads": extract.read_leads}
    # an earlier attempt's files go first: an export refused half-way must not leave this
    # attempt's appointments beside that attempt's leads for a stage step cleared on its own
    clear_folder(paths.extracts)
    paths.extracts.mkdir(parents=True, exist_ok=True)
    for kind, reader in readers.items():
        source = getattr(config.sources, kind)
        with timings.step(f"extract_{kind}"):
            frame = reader(source, config, start=window.start, end=window.end)
        with timings.step(f"hash_{kind}"):
            frame["is_test"] = flag_test_records(frame, config.exclude).to_numpy()
            frame, unusable = usable_click_ids(frame)
            frame = hash_identifiers(frame, config.default_region)
            frame.to_parquet(paths.extracts / f"{kind}.parquet", index=False)
        counts[f"{kind}_rows"] = len(frame)
        fingerprints[kind] = source_fingerprint(config, source)
        if kind == "appointments":
            counts["unknown_statuses"] = int((~frame["status_known"].astype(bool)).sum())
        else:
            counts["unusable_click_ids"] = unusable
            if unusable:
                log.warning("leads: %d click-ID cell(s) not shaped like a click ID were left out", unusable)
        log.info("extracted %s: %d rows", kind, len(frame))
        if not len(frame):
            # an export that failed upstream often still has its header: say so, do not stop
            # (a quiet day, or an incremental export with nothing new, is an empty file too)
            log.warning("%s: the export holds no rows (a quiet day, or an export cut short upstream?)", kind)
    (paths.extracts / SOURCES_FILE).write_text(
        json.dumps(fingerprints, sort_keys=True) + "\n", encoding="utf-8"
    )
    if read_at is not None:
        (paths.extracts / READ_AT_FILE).write_text(read_at.isoformat() + "\n", encoding="utf-8")
    return counts


SOURCES_FILE = "sources.json"  # beside the extracts: each source's fingerprint, for the summary
READ_AT_FILE = "read_at"  # beside the extracts: when the exports were read (ISO 8601)


def _read_at(extracts: Path) -> datetime | None:
    try:
        return datetime.fromisoformat((extracts / READ_AT_FILE).read_text(encoding="utf-8").strip())
    except FileNotFoundError:  # extracted and staged in one call: staged after everything so far
        return None


def read_fingerprints(extracts: Path | None) -> dict[str, str]:
    """The fingerprints ``extract_sources`` wrote for this run's extracts (empty without them)."""
    path = None if extracts is None else extracts / SOURCES_FILE
    if path is None or not path.exists():
        return {}
    loaded: dict[str, str] = json.loads(path.read_text(encoding="utf-8"))
    return loaded


def source_fingerprint(config: ClinicConfig, source: Any) -> str:
    """SHA-256 of what a source is: a CSV export's bytes, or (``query:`` prefixed) a SQL source's
    query file, since its rows are not a file. Not PHI: a digest of a whole file only confirms
    a copy someone already holds."""
    import hashlib

    if source.path is not None:
        with config.resolve(source.path).open("rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    return "query:" + hashlib.sha256(config.resolve(source.query).read_bytes()).hexdigest()


def config_fingerprint(config: ClinicConfig) -> str:
    """SHA-256 of the validated clinic config (canonical JSON, defaults filled in): the rules a
    run applied, whatever the YAML's layout or comments."""
    import hashlib

    return hashlib.sha256(config.model_dump_json().encode()).hexdigest()


def stage_extracts(config: ClinicConfig, engine: Engine, paths: RunPaths, timings: Timings) -> dict[str, int]:
    """Upsert the hashed extracts into staging (latest wins); returns rows loaded per kind.

    Also records which load each extract became (``staging.write_marker``), so the plan step can
    read the history from the extract when staging holds exactly that export.
    """
    counts: dict[str, int] = {}
    loaded: dict[str, staging.Loaded] = {}
    read_at = _read_at(paths.extracts)
    (paths.extracts / staging.MARKER).unlink(missing_ok=True)
    for kind in ("appointments", "leads"):
        source = getattr(config.sources, kind)
        deletions = None
        if source.complete:
            named = source.path if source.path is not None else source.query
            deletions = staging.Deletions(source=Path(str(named)).name, max_share=source.max_deleted_share)
        with timings.step(f"stage_{kind}"):
            loaded[kind] = staging.load_extract(
                engine,
                kind,
                config.clinic_id,
                paths.extracts / f"{kind}.parquet",
                deletions,
                extracted_at=read_at,
            )
            counts[f"{kind}_staged"] = loaded[kind].rows
            if source.complete:
                counts[f"{kind}_deleted"] = loaded[kind].deleted
    staging.write_marker(paths.extracts, loaded)
    return counts


def stage_sources(
    config: ClinicConfig, engine: Engine, window: RunWindow, timings: Timings, paths: RunPaths
) -> dict[str, int]:
    """Extract then stage, in one call."""
    counts = extract_sources(config, window, paths, timings)
    stage_extracts(config, engine, paths, timings)
    return counts


def _with_later(visible: pd.DataFrame, later: pd.DataFrame) -> pd.DataFrame:
    """The visible rows' identity and consent columns, then the later rows'."""
    if later.empty:
        return visible
    return pd.concat([visible[list(later.columns)], later], ignore_index=True)


def _visible_first(
    appt_person: np.ndarray, lead_person: np.ndarray, n_appts: int, n_leads: int
) -> tuple[np.ndarray, np.ndarray]:
    """Person labels renumbered by first appearance among the visible rows, then the later ones.

    ``link_persons`` numbers persons by first appearance in its inputs (visible appointments,
    later appointments, visible leads, later leads); renumbered, the persons of the visible rows
    keep the numbers they would have without later rows (deterministic output either way).
    """
    if len(appt_person) == n_appts and len(lead_person) == n_leads:
        return appt_person, lead_person
    sequence = np.concatenate([appt_person[:n_appts], lead_person[:n_leads],
                               appt_person[n_appts:], lead_person[n_leads:]])  # fmt: skip
    labels, first = np.unique(sequence, return_index=True)
    rank = np.empty(int(labels.max()) + 1 if len(labels) else 0, dtype=np.int64)
    rank[labels[np.argsort(first)]] = np.arange(len(labels))
    return rank[appt_person], rank[lead_person]


def _window_mask(times: pd.Series, lo: pd.Timestamp, hi: pd.Timestamp) -> np.ndarray:
    t = pd.to_datetime(times, utc=True)
    return ((t >= lo) & (t < hi)).to_numpy()


def _row_drops(
    appts: pd.DataFrame,
    leads: pd.DataFrame,
    appt_class: np.ndarray,
    lo: pd.Timestamp,
    hi: pd.Timestamp,
) -> Counter[str]:
    """Row-level reasons for appointments (and test leads) in ``[start - late_arrival, end)``."""
    drops: Counter[str] = Counter()
    in_window = _window_mask(appts["start_at"], lo, hi)
    is_test = appts["is_test"].to_numpy(dtype=bool)
    drops["test_record"] += int((in_window & is_test).sum())
    drops["test_record"] += int(
        (_window_mask(leads["created_at"], lo, hi) & leads["is_test"].to_numpy(dtype=bool)).sum()
    )
    real = in_window & ~is_test
    drops["not_attended"] += int((real & (appts["status"].to_numpy() != "attended")).sum())
    for reason in ("no_lead", "outside_window", "duplicate_in_journey"):
        drops[reason] += int((real & (appt_class == reason)).sum())
    return drops


def plan_run(
    config: ClinicConfig,
    engine: Engine,
    window: RunWindow,
    *,
    secret: bytes,
    target: str,
    dry_run: bool,
    full_resync: bool = False,
    timings: Timings | None = None,
    inputs: dict[str, int] | None = None,
    extracts: Path | None = None,
    run_id: str | None = None,
    consent_as_of: datetime | None = None,
) -> Plan:
    """Apply SPEC section 4 to everything staged before ``end`` and build the gated rows.

    ``consent_as_of``: when the plan will be uploaded (the task passes its clock; the rules read
    none). A person whose consent is revoked then, by a revocation staged after ``end``, is not
    sent or listed (rule 6: never uploaded again). Default: ``end``.

    ``extracts`` is this run's extract folder: when staging holds exactly those exports, the
    history is read from them rather than from the database (same rows, same frame).

    Raises:
        GateViolation: a row would carry something outside the allowlist; nothing was written.
    """
    timings = timings or Timings()
    run_id = run_id or run_id_for(config, window)
    end = window.end_ts
    as_of = end if consent_as_of is None else max(end, pd.Timestamp(consent_as_of).tz_convert("UTC"))
    with timings.step("read_staged"):
        appts, later_appts = staging.load_staged_and_later(
            engine, "appointments", config.clinic_id, before=window.end, extracts=extracts
        )
        leads, later_leads = staging.load_staged_and_later(
            engine, "leads", config.clinic_id, before=window.end, extracts=extracts
        )
    with timings.step("link_persons"):
        usable_a = ~appts["is_test"].to_numpy(dtype=bool)
        usable_l = ~leads["is_test"].to_numpy(dtype=bool)
        # rows dated after ``end`` take part in linking and consent only (staging.load_staged_and_later)
        later_a = later_appts[~later_appts["is_test"].to_numpy(dtype=bool)]
        later_l = later_leads[~later_leads["is_test"].to_numpy(dtype=bool)]
        known_a = _with_later(appts[usable_a], later_a)
        known_l = _with_later(leads[usable_l], later_l)
        appt_person, lead_person = _visible_first(
            *link_persons(known_a, known_l), usable_a.sum(), usable_l.sum()
        )
        a_person = np.full(len(appts), -1, dtype=np.int64)
        l_person = np.full(len(leads), -1, dtype=np.int64)
        a_person[usable_a] = appt_person[: usable_a.sum()]
        l_person[usable_l] = lead_person[: usable_l.sum()]
        attended = usable_a & (appts["status"].to_numpy() == "attended")
        consent = consent_events(known_a, appt_person, known_l, lead_person)
        del known_a, known_l, later_appts, later_leads, later_a, later_l
    with timings.step("journeys"):
        journeys = build_journeys(
            appts,
            a_person,
            attended,
            leads,
            l_person,
            usable_l,
            attribution_window_days=config.rules.attribution_window_days,
            existing_patient_lookback_days=config.rules.existing_patient_lookback_days,
        )
    with timings.step("conversions"):
        conv = build_conversions(
            config=config,
            window=window,
            secret=secret,
            journeys=journeys.frame,
            lead_journey=journeys.lead_journey,
            appts=appts,
            appt_person=a_person,
            attended=attended,
            leads=leads,
            consent=consent,
            carry=ledger.unfinished_ids(
                engine, config.clinic_id, CONVERSION_DESTINATIONS, since=window.end - _CARRY_HORIZON
            ),
            consent_as_of=as_of,
        )
        outbound = {
            "google_conversions": payloads.google_conversion_rows(conv, config),
            "meta_events": payloads.meta_event_rows(conv, config),
        }
    drops = _row_drops(
        appts,
        leads,
        journeys.appt_class,
        window.start_ts - pd.Timedelta(days=config.rules.late_arrival_days),
        end,
    )
    drops.update({str(k): int(v) for k, v in conv.loc[conv["drop"] != "", "drop"].value_counts().items()})
    for dest in ("google", "meta"):
        drops[f"too_old_for_{dest}"] += int((conv[dest] == f"too_old_for_{dest}").sum())
    destinations: dict[str, dict[str, int]] = {}
    stages: dict[str, dict[str, str]] = {}
    carried_ids = set(conv.loc[conv["carried"], "opaque_id"])
    with timings.step("ledger"):
        withdrawn: dict[str, int] = {}
        revoked = conv.loc[conv["drop"] == "consent_revoked", "opaque_id"].tolist()
        if not dry_run and revoked:
            # an earlier run's unsent rows of a person who revoked since: its upload, retried or
            # cleared later, must not send them (rule 6); a dry run writes nothing to the ledger
            for dest in CONVERSION_DESTINATIONS:
                withdrawn[dest] = ledger.withdraw(
                    engine, config.clinic_id, dest, revoked, "consent_revoked", run_id=run_id, at=as_of
                )
        position = {oid: i for i, oid in enumerate(conv["opaque_id"])}
        recorded = {
            dest: ledger.read_ledger(engine, config.clinic_id, dest) for dest in CONVERSION_DESTINATIONS
        }
        done = {
            dest: {
                r[_ID_COLUMN[dest]]
                for r in outbound[dest]
                if _is_final(recorded[dest].get(r[_ID_COLUMN[dest]]))
            }
            for dest in CONVERSION_DESTINATIONS
        }
        held = {
            dest: {oid for oid, entry in recorded[dest].items() if entry.status in ledger.HELD_STATES}
            for dest in CONVERSION_DESTINATIONS
        }
        # the journey's other possible IDs: a journey held under one of them is not sent again
        # (a late re-attribution), and the uploads check them again (``Plan.siblings``)
        open_ids = {
            r[_ID_COLUMN[d]]
            for d in CONVERSION_DESTINATIONS
            for r in outbound[d]
            if r[_ID_COLUMN[d]] not in done[d]
        }
        siblings: dict[str, list[str]] = {}
        if open_ids:
            found = journey_sibling_ids(
                conv,
                np.array(sorted(position[oid] for oid in open_ids)),
                journeys.frame,
                appts,
                a_person,
                leads,
                journeys.lead_journey,
                attribution_window_days=config.rules.attribution_window_days,
                secret=secret,
                clinic_id=config.clinic_id,
            )
            siblings = {str(conv["opaque_id"].iat[p]): sorted(set(ids)) for p, ids in found.items()}
        stage_of = dict(zip(conv["opaque_id"], conv["stage"], strict=True))
        for dest in CONVERSION_DESTINATIONS:
            id_col = _ID_COLUMN[dest]
            # final under this very run's id: an earlier attempt of it sent them (killed, then the
            # interval run again). They stay in its plan, so the upload counts them as this run's
            # (``deliver._count_finished``) and its summary says what it sent, not "already sent"
            own = {oid for oid in done[dest] if recorded[dest][oid].run_id == run_id}
            final = (done[dest] - own) | {
                r[id_col] for r in outbound[dest] if not held[dest].isdisjoint(siblings.get(r[id_col], ()))
            }
            fresh = [r for r in outbound[dest] if r[id_col] not in final]
            # a carried conversion final here was unfinished elsewhere: not this interval's news
            already = sum(1 for r in outbound[dest] if r[id_col] in final and r[id_col] not in carried_ids)
            outbound[dest] = fresh
            drops["already_sent"] += already
            destinations[dest] = {
                "planned": len(fresh),
                "sent": 0,
                "accepted": 0,
                "rejected": 0,
                "already_sent": already,
                "deferred": 0,
            }
            if withdrawn.get(dest):
                destinations[dest]["withdrawn"] = withdrawn[dest]
            stages[dest] = {r[id_col]: stage_of[r[id_col]] for r in fresh}
        # this plan's view of every conversion it looked at (no sibling is a view too), kept with
        # the outbox for its uploads to record (``deliver.read_siblings``)
        siblings = {oid: siblings.get(oid, []) for oid in sorted(open_ids)}
    with timings.step("suppression"):
        members = suppression_members(
            appts=appts,
            appt_person=a_person,
            attended=attended,
            leads=leads,
            lead_person=l_person,
            lead_usable=usable_l,
            consent=consent,
            end=end,
            lookback_days=config.rules.suppression_lookback_days,
            requires_consent=config.rules.suppression_requires_consent,
            consent_as_of=as_of,
        )
        # every hash the plan sends is now in ``conv`` or ``members``: drop the history's hash
        # columns before the audience payloads are built (a few hundred MiB at 1M rows)
        appts = appts.drop(columns=list(store.HASH_COLUMNS))
        leads = leads.drop(columns=list(store.HASH_COLUMNS))
        release_memory()
        audiences = _audience_deltas(
            config, engine, members, full_resync=full_resync, end=window.end, now=consent_as_of
        )
        lists_without_id = _lists_without_id(config)
        outbound["google_customer_match"] = payloads.google_audience_lines(
            list(audiences["google_customer_match"].adds.values())
            if "google_customer_match" in audiences
            else [],
            list(audiences["google_customer_match"].removes.values())
            if "google_customer_match" in audiences
            else [],
        )
        meta_delta = audiences.get("meta_audience")
        outbound["meta_audience"] = payloads.meta_audience_lines(
            list(meta_delta.adds.values()) if meta_delta else [],
            list(meta_delta.removes.values()) if meta_delta else [],
        )
        for dest in AUDIENCE_DESTINATIONS:
            delta = audiences.get(dest)
            destinations[dest] = {
                "adds": len(delta.adds) if delta else 0,
                "removes": len(delta.removes) if delta else 0,
                "members": delta.members if delta else 0,
            }
            if delta is not None and delta.skipped:
                destinations[dest]["skipped_newer_sync"] = 1
            if delta is not None and delta.resync_due:  # the upload replaces this list
                destinations[dest]["resync_due"] = 1
            if dest in lists_without_id:
                destinations[dest]["skipped_no_list"] = 1
    with timings.step("gate"):
        check_outbound(config, outbound)
    kept = conv[conv["drop"] == ""]
    summary: dict[str, Any] = {
        "clinic_id": config.clinic_id,
        "run_id": run_id,
        "start": window.start.isoformat(),
        "end": window.end.isoformat(),
        "dry_run": dry_run,
        "target": target,
        "full_resync": full_resync,
        "inputs": inputs or {},
        "sources_sha256": read_fingerprints(extracts),
        "config_sha256": config_fingerprint(config),
        "legal_basis": config.legal_basis_record(),
        "version": _version(),
        "stages": {stage: int((kept["stage"] == stage).sum()) for stage in ("consultation", "purchase")},
        "carried_over": len(carried_ids),
        "drops": {reason: int(drops.get(reason, 0)) for reason in DROP_REASONS},
        "destinations": destinations,
    }
    with timings.step("derived_tables"):
        checked = _store_derived(engine, config, secret, run_id, appts, leads, a_person, l_person, conv)
    log.info(
        "planned run %s: %s",
        run_id,
        {k: v.get("planned", v.get("adds")) for k, v in destinations.items()},
    )
    return Plan(run_id=run_id, outbound=outbound, audiences=audiences, summary=summary, stages=stages,
                siblings=siblings, planned_at=consent_as_of, conversions=checked)  # fmt: skip


def _is_final(entry: ledger.LedgerEntry | None) -> bool:
    return entry is not None and entry.status in ledger.FINAL_STATES


def _lists_without_id(config: ClinicConfig) -> set[str]:
    """Lists with suppression on but no list named: skipped, and said so (``doctor`` flags them
    too, and a live CLI run refuses), rather than passed over in silence every night."""
    google, meta = config.google_ads, config.meta
    unset = []
    if google is not None and google.suppression_enabled and not google.suppression_user_list:
        unset.append(("google_customer_match", "google_ads", "suppression_user_list"))
    if meta is not None and meta.suppression_enabled and not meta.suppression_audience_id:
        unset.append(("meta_audience", "meta", "suppression_audience_id"))
    for dest, section, key in unset:
        log.warning(
            "%s: suppression is on but %s.%s is not set: the list is not synced (set it, or "
            "set %s.suppression_enabled: false)", dest, section, key, section,
        )  # fmt: skip
    return {dest for dest, _, _ in unset}


def _audience_deltas(
    config: ClinicConfig,
    engine: Engine,
    members: pd.DataFrame,
    *,
    full_resync: bool,
    end: datetime,
    now: datetime | None = None,
) -> dict[str, AudienceDelta]:
    """Adds and removes against the last synced membership (SPEC rule 12), per enabled list.

    A list a later run already mirrored (this run is a backfill) gets no delta: lists mirror
    the present, and this run's membership would re-add people who revoked since its ``end``.
    """
    current: dict[str, dict[str, Any]] = {}
    google, meta = config.google_ads, config.meta
    if google is not None and google.suppression_user_list and google.suppression_enabled:
        current["google_customer_match"] = dict(payloads.google_member_rows(members))
    if meta is not None and meta.suppression_audience_id and meta.suppression_enabled:
        current["meta_audience"] = dict(payloads.meta_member_rows(members))
    deltas: dict[str, AudienceDelta] = {}
    for dest, now_members in current.items():
        newest = ledger.latest_synced_end(engine, config.clinic_id, dest, now=now)
        if newest is not None and newest > end:
            log.info("%s: a run ending %s already synced the list; this backfill leaves it", dest, newest)
            deltas[dest] = AudienceDelta(adds={}, removes={}, full_resync=False, skipped=True,
                                         members=len(now_members))  # fmt: skip
            continue
        synced = ledger.read_audience_state(engine, config.clinic_id, dest)
        # adds a crashed or failed sync may have applied: possibly on the list, so removed
        # when no longer wanted (and re-added, idempotently, when still wanted)
        maybe = {**ledger.read_pending_adds(engine, config.clinic_id, dest), **synced}
        # Google failed a request of this list in processing: the state may be wrong both ways
        due = not full_resync and confirm.resync_due(engine, config.clinic_id, dest)
        if due:
            log.warning("%s: Google failed a list request in processing; this plan replaces the list", dest)
        if full_resync or due:
            adds = dict(sorted(now_members.items()))
            removes: dict[str, Any] = {}
        else:
            adds = {k: v for k, v in sorted(now_members.items()) if k not in synced}
            removes = {k: _stored_payload(dest, maybe[k]) for k in sorted(maybe) if k not in now_members}
        deltas[dest] = AudienceDelta(
            adds=adds,
            removes=removes,
            full_resync=full_resync or due,
            members=len(now_members),
            resync_due=due,
        )
    return deltas


def _stored_payload(dest: str, text: str) -> Any:
    value = json.loads(text)
    if dest == "google_customer_match":
        return {"operation": "remove", "user_identifiers": value["user_identifiers"]}
    return value


def _store_derived(
    engine: Engine,
    config: ClinicConfig,
    secret: bytes,
    run_id: str,
    appts: pd.DataFrame,
    leads: pd.DataFrame,
    a_person: np.ndarray,
    l_person: np.ndarray,
    conv: pd.DataFrame,
) -> pd.DataFrame:
    """Persons and conversions for inspection; person keys are opaque (HMAC of a member record).

    Returns the conversions as stored, plus ``carried`` (the rules carried it over from an
    unfinished upload): the frame the staged-conversion checks judge.

    A person's key is the HMAC of their first record in key order (appointments, then leads; the
    staged frames are read in key order), so it is stable while that record exists.
    """
    labels = np.concatenate([a_person, l_person])
    n_persons = int(labels.max(initial=-1)) + 1
    valid = np.flatnonzero(labels >= 0)
    _, first = np.unique(labels[valid], return_index=True)
    first_rows = valid[first]
    n_a = len(a_person)
    appt_ids, lead_ids = appts["appointment_id"].to_numpy(), leads["lead_id"].to_numpy()
    keys = [
        opaque_id(
            secret, config.clinic_id, "person", f"a:{appt_ids[r]}" if r < n_a else f"l:{lead_ids[r - n_a]}"
        )
        for r in first_rows.tolist()
    ]
    n_appts = np.bincount(a_person[a_person >= 0], minlength=n_persons)
    n_leads = np.bincount(l_person[l_person >= 0], minlength=n_persons)
    person_frame = pd.DataFrame({"person_key": keys, "appointments": n_appts, "leads": n_leads})
    conv_frame = pd.DataFrame(
        {
            "opaque_id": conv["opaque_id"],
            "stage": conv["stage"],
            "person_key": [keys[p] for p in conv["person"]],
            "event_time": store.to_epoch_us(conv["event_time"]),
            "ready_at": store.to_epoch_us(conv["ready_at"]),
            "value": conv["value"],
            "outcome": [d or "kept" for d in conv["drop"]],
            "consent_at": store.to_epoch_us(conv["consent_at"]),
            "consent_stated": pd.array(conv["consent_stated"].to_numpy(), dtype="boolean"),
        }
    )
    store.replace_derived(engine, config.clinic_id, run_id, person_frame, conv_frame)
    return conv_frame.assign(carried=conv["carried"].to_numpy(dtype=bool))


def build_pending(plan: Plan, paths: RunPaths) -> Path:
    """Write the gated plan where ``validate_outbound`` will look; not yet an outbox.

    The run's conversion candidates go beside it (``RunPaths.conversions``), in the run's own
    folder: the ``conversions`` table holds only the latest run's view, and two backfill runs of
    one clinic planning side by side would otherwise check each other's rows.
    """
    paths.run_dir.mkdir(parents=True, exist_ok=True)
    if plan.conversions is not None:
        plan.conversions.to_parquet(paths.conversions, index=False)
    views = {
        "planned_at": plan.planned_at.isoformat() if plan.planned_at else None,
        "horizon": plan.summary["end"],
        "siblings": plan.siblings,
    }
    # a dry run's outbox is never sent, and stays the same bytes run after run (SPEC 5)
    return write_outbox(
        paths.pending, plan.outbound, plan.summary, siblings=None if plan.summary["dry_run"] else views
    )


def publish_outbox(
    config: ClinicConfig,
    paths: RunPaths,
    checks: Callable[[Path], None] | None = None,
    *,
    before_publish: Callable[[Path], None] | None = None,
) -> Path:
    """Re-check the pending plan (PHI gate, then any data-quality checks) and make it the outbox.

    The gate runs on the rows as read back from disk, so what the uploaders will read is
    exactly what was checked. A plan the gates refuse is deleted: no outbox appears. Any other
    failure (a locked database while the check results are stored, say) keeps it, so a retry
    checks the same plan again instead of finding nothing to publish. ``before_publish`` gets
    the checked plan's folder just before it becomes the outbox (a real run records its rows
    ``planned`` there: no published outbox is ever missing from the ledger).
    """
    import shutil

    from etl.errors import GateViolation, QualityGateFailed
    from etl.outbox import OUTBOX_FILES, check_outbox_folder, read_rows

    try:
        outbound = {dest: list(read_rows(paths.pending, dest)) for dest in OUTBOX_FILES}
        check_outbound(config, outbound)
        del outbound  # the checks read the plan themselves: don't hold two copies of it
        release_memory()
        if checks is not None:
            checks(paths.pending)
    except (GateViolation, QualityGateFailed):
        shutil.rmtree(paths.pending, ignore_errors=True)
        raise
    if before_publish is not None:
        before_publish(paths.pending)
    check_outbox_folder(paths.outbox)
    old = paths.outbox.with_name(f".{paths.outbox.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if paths.outbox.exists():
        paths.outbox.rename(old)
    paths.pending.rename(paths.outbox)
    shutil.rmtree(old, ignore_errors=True)
    paths.stopped.unlink(missing_ok=True)
    return paths.outbox


def finalize_summary(paths: RunPaths, summary: dict[str, Any]) -> dict[str, Any]:
    """Fold upload results (``results/*.json``) into the plan's summary and rewrite summary.json.

    ``planned`` stays what the plan held; ``already_sent`` adds rows the ledger or the platform
    reported as already there at upload time to those left out while planning.
    """
    from etl.outbox import write_summary

    merged = json.loads(json.dumps(summary))
    for dest, counts in merged["destinations"].items():
        result_file = paths.results / f"{dest}.json"
        if not result_file.exists():
            continue
        result = json.loads(result_file.read_text(encoding="utf-8"))
        if result.get("validate_only"):
            # the platform validated, nothing was applied: never to be read as a real send
            merged["validate_only"] = True
        if dest in CONVERSION_DESTINATIONS:
            for key in ("sent", "accepted", "rejected", "deferred"):
                counts[key] = int(result.get(key, 0))
            # of `planned`; folding again (a report retried) must not add it twice
            planning = int(counts["already_sent"]) - int(counts.get("already_sent_at_upload", 0))
            counts["already_sent_at_upload"] = int(result.get("already_sent", 0))
            counts["already_sent"] = planning + counts["already_sent_at_upload"]
            counts["requests"] = int(result.get("requests", 0))
            if result.get("finished_by_an_earlier_attempt"):
                # of `sent`: rows final under this run's id before this attempt (an attempt
                # killed after sending, or the same interval run from a second folder)
                counts["finished_by_an_earlier_attempt"] = int(result["finished_by_an_earlier_attempt"])
            if result.get("held_under_another_id"):  # of `already_sent`: the journey left under another ID
                counts["held_under_another_id"] = int(result["held_under_another_id"])
            if result.get("rejected_codes"):
                counts["rejected_codes"] = result["rejected_codes"]
            if result.get("stopped"):
                counts["stopped"] = result["stopped"]
            if result.get("request_statuses"):  # earlier Data Manager requests read (etl.confirm)
                counts["request_statuses"] = result["request_statuses"]
        else:
            counts["sent_adds"] = int(result.get("adds", 0))
            counts["sent_removes"] = int(result.get("removes", 0))
            counts["rejected"] = int(result.get("rejected", 0))
            if result.get("skipped_newer_sync"):  # a later run synced after this plan was made
                counts["skipped_newer_sync"] = 1
            if result.get("stopped"):  # refused before it began (kill switch, legal basis)
                counts["stopped"] = result["stopped"]
            if result.get("request_statuses"):
                counts["request_statuses"] = result["request_statuses"]
    if paths.outbox.exists():
        write_summary(paths.outbox, merged)
    return merged


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("medspa-conversions")
    except PackageNotFoundError:  # a source tree not installed
        return "unknown"
