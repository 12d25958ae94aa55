"""The send ledger, the audience sync state and run summaries: what left, and when.

Compliance officers ask "what left the building, under which run?"; these tables answer it.
The ledger is keyed by clinic, destination and opaque ID (SPEC rule 11): a row in a final state
is never sent again to that destination. Tables are defined in ``etl.store``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from etl import audit
from etl.errors import ConfigError
from etl.store import (
    _CHUNK,
    CODE_WIDTH,
    audience_pending,
    audience_state,
    audience_sync_log,
    audience_syncs,
    journey_siblings,
    journey_views,
    ledger_targets,
    run_summaries,
    send_ledger,
    validation_sends,
)

log = logging.getLogger(__name__)

# Ledger states after which a conversion is never sent again to that destination (SPEC rule 11).
# "planned" (written before a request, never answered) and "deferred" are sent again.
FINAL_STATES = ("sent", "accepted", "rejected", "already_sent", "withdrawn")
# The final states in which the platform holds (or, for "sent", may hold) the conversion: a
# journey sent under one appointment's ID is not sent again under another's (SPEC rules 4, 11).
HELD_STATES = ("sent", "accepted", "already_sent")
# Not sent, by an upload that found the row's journey held under another of its IDs
# (``journey_relatives``). Not final: a later plan whose interval (with its late-arrival days)
# covers the row, that converts a journey at that visit and finds no held sibling (the journey
# was split since) plans and sends it. Not unfinished either: nothing carries it over night
# after night as if its upload had stopped.
SUPERSEDED = "superseded"
# Never sent, for good: a later real plan found the person's consent revoked (SPEC rule 6: a
# revoked person is never uploaded again) while the row was still unfinished, so the upload of
# the run that planned it, retried or cleared afterwards, does not send it. Final, but never over
# another final state: a row sent meanwhile stays what it is.
WITHDRAWN = "withdrawn"


# as SQL literals: an upsert runs as executemany, which cannot expand a bound list
_FINAL_LITERALS: list[sa.ColumnElement[Any]] = [sa.literal_column(f"'{state}'") for state in FINAL_STATES]


def _utc(at: datetime) -> datetime:
    """In UTC, as a plain datetime (a pandas Timestamp's nanoseconds cut here, not rounded by a
    driver): the audit chain hashes exactly what the database stores."""
    if hasattr(at, "to_pydatetime"):
        at = at.to_pydatetime(warn=False)
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).astimezone(UTC)


@dataclass(frozen=True)
class LedgerEntry:
    status: str
    code: str | None
    run_id: str | None = None  # the run that recorded this state (a final state is never rewritten)
    request_id: str | None = None


def record_path(base_dir: Path, clinic_id: str, target: str) -> Path:
    """Beside the clinic YAML (as its run folders are): which database holds its send ledger."""
    return base_dir / "var" / "ledgers" / f"{clinic_id}.{target}.json"


def _claim_of(conn: Connection, clinic_id: str) -> dict[str, str] | None:
    row = conn.execute(
        sa.select(ledger_targets.c.target, ledger_targets.c.run_id, ledger_targets.c.claimed_at).where(
            ledger_targets.c.clinic_id == clinic_id
        )
    ).first()
    if row is None:
        return None
    return {
        "clinic_id": clinic_id,
        "target": row.target,
        "first_run_id": row.run_id,
        "claimed_at": _utc(row.claimed_at).isoformat(timespec="microseconds"),
    }


def read_record(record: Path) -> dict[str, str] | None:
    try:
        text = record.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        raise ConfigError(f"send ledger record {record}: not JSON; restore it or delete it") from None
    keys = _CLAIM_KEYS
    if not isinstance(data, dict) or any(not isinstance(data.get(k), str) for k in keys):
        raise ConfigError(f"send ledger record {record}: lacks {', '.join(keys)}; restore it or delete it")
    extra = {KEY_CHECK: data[KEY_CHECK]} if isinstance(data.get(KEY_CHECK), str) else {}
    return {k: data[k] for k in keys} | extra


_CLAIM_KEYS = ("clinic_id", "target", "first_run_id", "claimed_at")
KEY_CHECK = "id_key_check"


def _claim_part(recorded: Mapping[str, str]) -> dict[str, str]:
    return {k: recorded[k] for k in _CLAIM_KEYS}


def id_key_check(secret: bytes) -> str:
    """A fingerprint of the opaque-ID key (an HMAC of a fixed text, not of any data), kept in the
    ledger record: IDs made with another key match nothing in the ledger, so every conversion
    would be sent again under new IDs the platforms cannot de-duplicate."""
    return hmac.new(secret, b"medspa-conversions: opaque ID key check", hashlib.sha256).hexdigest()[:16]


def key_mismatch_error(record: Path, key_check: str) -> ConfigError | None:
    """The refusal when the clinic's record names another opaque-ID key than ``key_check``."""
    recorded = read_record(record)
    if recorded is None or recorded.get(KEY_CHECK) in (None, key_check):
        return None
    return ConfigError(
        f"MEDSPA_ID_SECRET: clinic {recorded['clinic_id']}'s {recorded['target']} sends were made with "
        f"another opaque-ID key than this run's ({record} holds its fingerprint). Every order_id and "
        "event_id would change, and every conversion be sent again under IDs Google and Meta cannot "
        "de-duplicate. Restore the key (the Airflow connection or variable medspa_id_secret, or the "
        "environment); to start over on purpose, rerun with --new-database (or delete that file)"
    )


def _write_record(record: Path, claim: Mapping[str, str]) -> None:
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_name(f".{record.name}.{os.getpid()}.tmp")  # the sends of one night write at once
    body = {**claim, "about": _RECORD_ABOUT}
    tmp.write_text(json.dumps(body, sort_keys=True, indent=2) + "\n", encoding="utf-8")
    tmp.replace(record)


_RECORD_ABOUT = (
    "Written by the first real send from the staging database that holds this clinic's send "
    "ledger for this target; a real send from a database whose first send differs is refused "
    "(a new, empty ledger would send every conversion again). `run --new-database` (or deleting "
    "this file) starts a new ledger on purpose."
)


def ledger_mismatch(
    engine: Engine | None, clinic_id: str, target: str, record: Path
) -> tuple[dict[str, str], dict[str, str] | None] | None:
    """The clinic's recorded ledger and this database's claim when they differ, else None.

    ``engine`` None stands for a database that does not exist yet (a SQLite file not made):
    it holds no claim.
    """
    recorded = read_record(record)
    if recorded is None or recorded["target"] != target:
        return None
    claim = None
    if engine is not None:
        with engine.connect() as conn:
            claim = _claim_of(conn, clinic_id)
    return None if claim == _claim_part(recorded) else (recorded, claim)


def _first_send(claim: Mapping[str, str]) -> str:
    return f"run {claim['first_run_id']} at {claim['claimed_at']}"  # a rerun of one interval shares its id


def mismatch_error(record: Path, recorded: Mapping[str, str], claim: Mapping[str, str] | None) -> ConfigError:
    here = (
        "this staging database has never sent for it"
        if claim is None
        else f"this staging database's first {claim['target']} send was {_first_send(claim)}"
    )
    return ConfigError(
        f"send ledger: clinic {recorded['clinic_id']}'s {recorded['target']} sends are recorded in the "
        f"database whose first send was {_first_send(recorded)} ({record}), but {here}. Sending "
        "from it would send again every conversion that database holds as sent. Check --database / "
        "database_url / MEDSPA_DATABASE_URL; to start a new ledger on purpose (the old one is lost), "
        "rerun with --new-database (or delete that file)"
    )


def claim_target(
    engine: Engine,
    clinic_id: str,
    target: str,
    *,
    run_id: str,
    at: datetime,
    record: Path | None = None,
    new_database: bool = False,
    key_check: str | None = None,
) -> None:
    """Make sure this database's sends for the clinic all go to one target (sandbox or live),
    and, given the clinic's ``record`` (``record_path``), that it is the database the clinic's
    earlier sends were recorded in: a mistyped or replaced database holds an empty ledger, and
    everything would be sent again. The first send writes the record; ``new_database`` rewrites
    it to this database (the old ledger is lost, on purpose). ``key_check`` (``id_key_check``
    of the key the plan's IDs were made with) is kept in the record, and a record naming
    another key refuses the send.

    Raises:
        ConfigError: the database already holds sends to the other target (its ledger would
            count them as sent: a sandbox "accepted" is not Google's or Meta's), or it is not
            the one ``record`` names, or the record names another opaque-ID key.
    """
    with engine.begin() as conn:
        # insert-if-absent, then read: the three sends of a first night claim at the same time
        insert = dialect_insert(conn, ledger_targets)
        first = conn.execute(insert.on_conflict_do_nothing(index_elements=["clinic_id"]),
                             {"clinic_id": clinic_id, "target": target, "run_id": run_id, "claimed_at": at})  # fmt: skip
        claim = _claim_of(conn, clinic_id)
        assert claim is not None  # inserted or already there, in this transaction
        if claim["target"] != target:
            raise ConfigError(
                f"this staging database holds {claim['target']} sends for clinic {clinic_id}; a {target} send "
                f"would share their ledger (a {claim['target']} 'accepted' would read as sent). Use a separate "
                "database for each target (--database, or database_url / MEDSPA_DATABASE_URL)"
            )
        recorded = None if record is None else read_record(record)
        if first.rowcount == 1 and recorded is None:
            # nothing names an earlier ledger: the first send from this clinic's folder (a folder
            # moved or restored without its var/ledgers record is not told apart)
            log.warning(
                "first %s send for clinic %s recorded in this staging database%s; if this clinic sent "
                "before from another database, restore that one instead (docs/decisions.md)",
                target, clinic_id, "" if record is None else f" (its record: {record})",
            )  # fmt: skip
        if record is None:
            return
        if recorded is not None and _claim_part(recorded) == claim:
            if key_check is None or recorded.get(KEY_CHECK) == key_check:
                return
            if not new_database and (refusal := key_mismatch_error(record, key_check)) is not None:
                raise refusal
            recorded = None  # a record from before key checks: it now names this key
        elif recorded is not None and not new_database:
            raise mismatch_error(
                record, recorded, None if first.rowcount == 1 else claim
            )  # rolls the claim back
    # only once the claim is committed: a record naming a claim the database never kept would
    # refuse every send from the right database (a claim without its record is written next time)
    if recorded is not None:
        log.warning(
            "send ledger: clinic %s's %s sends are now recorded in this database (--new-database); "
            "the ledger of the database whose first send was run %s is no longer read",
            clinic_id, target, recorded["first_run_id"],
        )  # fmt: skip
    _write_record(record, claim | ({KEY_CHECK: key_check} if key_check else {}))


def record_validation(
    engine: Engine,
    clinic_id: str,
    destination: str,
    *,
    target: str,
    run_id: str,
    at: datetime,
    conversions: Sequence[tuple[str, str | None, str | None, str | None]] = (),
    adds: int = 0,
    removes: int = 0,
) -> None:
    """Record what a validate-only request carried (``validation_sends``): ``conversions`` as
    (opaque ID, stage, code, request id), or a list sync's ``adds`` and ``removes``. Called only
    for rows that left this process; nothing in the send ledger changes."""
    base = {"clinic_id": clinic_id, "destination": destination, "target": target, "run_id": run_id,
            "sent_at": _utc(at)}  # fmt: skip
    rows = [
        {**base, "opaque_id": oid, "stage": stage, "code": code[:CODE_WIDTH] if code else None,
         "request_id": None if request is None else str(request)[:128], "adds": None, "removes": None}
        for oid, stage, code, request in conversions
    ]  # fmt: skip
    if adds or removes:
        rows.append({**base, "opaque_id": None, "stage": None, "code": None, "request_id": None,
                     "adds": adds, "removes": removes})  # fmt: skip
    if not rows:
        return
    with engine.begin() as conn:
        for lo in range(0, len(rows), _CHUNK):
            conn.execute(validation_sends.insert(), rows[lo : lo + _CHUNK])


def read_ledger(engine: Engine, clinic_id: str, destination: str) -> dict[str, LedgerEntry]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(
                send_ledger.c.opaque_id,
                send_ledger.c.status,
                send_ledger.c.code,
                send_ledger.c.run_id,
                send_ledger.c.request_id,
            ).where(send_ledger.c.clinic_id == clinic_id, send_ledger.c.destination == destination)
        )
        return {r.opaque_id: LedgerEntry(r.status, r.code, r.run_id, r.request_id) for r in rows}


def write_ledger(
    engine: Engine,
    clinic_id: str,
    destination: str,
    entries: Iterable[Mapping[str, Any]],
    *,
    run_id: str,
    at: datetime,
    then: Callable[[Connection], Any] | None = None,
) -> None:
    """Record one state per opaque ID (planned, sent, accepted, rejected, deferred, already_sent,
    superseded); ``then`` runs in the same transaction (what the states' request left to track).

    Each call commits on its own: the pipeline calls it before and after every batch, so a
    process killed between batches leaves an exact record of what went out. A row already in a
    final state keeps it when asked to become ``planned`` or ``deferred``.
    """
    at = _utc(at)  # SQLite keeps a datetime's wall time and drops its offset; readers take UTC
    rows = []
    for entry in entries:
        status = entry["status"]
        rows.append(
            {
                "clinic_id": clinic_id,
                "destination": destination,
                "opaque_id": entry["opaque_id"],
                "stage": entry.get("stage"),
                "status": status,
                # a code longer than any known one is still recorded, cut, not refused: the
                # batch it describes has already gone out
                "code": entry["code"][:CODE_WIDTH] if entry.get("code") else entry.get("code"),
                "request_id": None if entry.get("request_id") is None else str(entry["request_id"]),
                "run_id": run_id,
                "planned_at": at if status == "planned" else None,
                # when a request first carried it: a row our own checks refused never left, and
                # a row deferred after a request did (``transmitted``; without it, by status)
                "sent_at": at
                if status != "planned" and entry.get("transmitted", status != "deferred")
                else None,
                "updated_at": at,
                "consent_at": None if entry.get("consent_at") is None else _utc(entry["consent_at"]),
                "consent_stated": None
                if entry.get("consent_stated") is None
                else bool(entry["consent_stated"]),
            }
        )
    if not rows and then is None:
        return

    def upsert(insert: Any) -> Any:
        return insert.on_conflict_do_update(
            index_elements=["clinic_id", "destination", "opaque_id"],
            set_={
                "status": insert.excluded.status,
                "code": insert.excluded.code,
                "request_id": insert.excluded.request_id,
                "run_id": insert.excluded.run_id,
                "sent_at": sa.func.coalesce(send_ledger.c.sent_at, insert.excluded.sent_at),  # the first
                "planned_at": sa.func.coalesce(send_ledger.c.planned_at, insert.excluded.planned_at),
                "updated_at": insert.excluded.updated_at,
                "stage": sa.func.coalesce(insert.excluded.stage, send_ledger.c.stage),
                # an outcome carries no consent: the plan's record of it stays
                "consent_at": sa.func.coalesce(insert.excluded.consent_at, send_ledger.c.consent_at),
                "consent_stated": sa.case(
                    (insert.excluded.consent_at.is_(None), send_ledger.c.consent_stated),
                    else_=insert.excluded.consent_stated,
                ),
            },
            # a final state is never taken back to planned or deferred: another run (an overlapping
            # backfill) may have finished the row since this one read the ledger
            where=~(
                send_ledger.c.status.in_(_FINAL_LITERALS)
                & (insert.excluded.status.not_in(_FINAL_LITERALS) | (insert.excluded.status == WITHDRAWN))
            ),
        )

    record = audit.outcomes_record(destination, rows)
    with engine.begin() as conn:
        _upsert_rows(conn, send_ledger, rows, upsert)
        if record is not None:  # the same transaction: no outcome without its audit record
            audit.append(conn, clinic_id, "outcomes", run_id, record, at)
        if then is not None:
            then(conn)


CONVERSION_DESTINATIONS = ("google_conversions", "meta_events")  # the ledger's conversion uploads


def unfinished_ids(
    engine: Engine, clinic_id: str, destinations: Sequence[str], *, since: datetime | None = None
) -> frozenset[str]:
    """Opaque IDs a real run planned for one of ``destinations`` and that never reached a final
    state there (its upload stopped, was deferred, or never ran): the next run sends them. Not
    ``superseded`` rows: their journey is on the platform under another ID.

    ``since``: only rows planned (or deferred) at or after it. A conversion is planned after
    its event, so one planned before ``end`` minus the longest age a platform accepts is too old
    for every platform: carried again, it would only be counted too old night after night.
    """
    planned = sa.func.coalesce(send_ledger.c.planned_at, send_ledger.c.updated_at)
    final = sa.select(send_ledger.c.opaque_id).where(
        send_ledger.c.clinic_id == clinic_id,
        send_ledger.c.destination.in_(list(destinations)),
        send_ledger.c.status.not_in((*FINAL_STATES, SUPERSEDED)),
        sa.true() if since is None else planned >= since.astimezone(UTC),
    )
    with engine.connect() as conn:
        return frozenset(conn.execute(final).scalars())


def withdraw(
    engine: Engine,
    clinic_id: str,
    destination: str,
    opaque_ids: Iterable[str],
    reason: str,
    *,
    run_id: str,
    at: datetime,
) -> int:
    """Record as ``withdrawn`` those of ``opaque_ids`` a real run's upload planned for
    ``destination`` and that are unfinished there (planned or deferred); returns how many.

    An ID with no ledger row is left alone: no published real outbox holds it (publishing
    records its rows ``planned`` before any upload; a run that publishes after this plan is
    not covered: docs/decisions.md).
    """
    unfinished = sorted(
        _among(
            engine, clinic_id, destination, sorted(set(opaque_ids)),
            send_ledger.c.status.not_in((*FINAL_STATES, SUPERSEDED)),
        )
    )  # fmt: skip
    if unfinished:
        # never carried by a request for this: a withdrawal sets no sent_at (a row a request did
        # carry before, deferred after it, keeps the sent_at it has), so disclosures never count
        # a withdrawn conversion as having left
        entries = [
            {"opaque_id": oid, "status": WITHDRAWN, "code": reason, "transmitted": False}
            for oid in unfinished
        ]
        write_ledger(engine, clinic_id, destination, entries, run_id=run_id, at=at)
        log.info("%s: %d unsent conversions withdrawn (%s)", destination, len(unfinished), reason)
    return len(unfinished)


def withdrawn_among(engine: Engine, clinic_id: str, destination: str, opaque_ids: Sequence[str]) -> set[str]:
    """Which of ``opaque_ids`` a later plan withdrew (``WITHDRAWN``)."""
    return _among(engine, clinic_id, destination, opaque_ids, send_ledger.c.status == WITHDRAWN)


def final_among(engine: Engine, clinic_id: str, destination: str, opaque_ids: Sequence[str]) -> set[str]:
    """Which of ``opaque_ids`` are in a final state now (read just before a batch is sent)."""
    return _among(engine, clinic_id, destination, opaque_ids, send_ledger.c.status.in_(FINAL_STATES))


def held_among(engine: Engine, clinic_id: str, destination: str, opaque_ids: Sequence[str]) -> set[str]:
    """Which of ``opaque_ids`` the platform holds (or may hold) now: ``HELD_STATES``."""
    return _among(engine, clinic_id, destination, opaque_ids, send_ledger.c.status.in_(HELD_STATES))


def record_siblings(
    engine: Engine,
    clinic_id: str,
    siblings: Mapping[str, Sequence[str]],
    *,
    run_id: str,
    planned_at: datetime,
    horizon: datetime,
) -> None:
    """Record a plan's view of its conversions' journeys: for each opaque ID it looked at, the
    IDs its journey would carry at its other visits (possibly none), as a plan made at
    ``planned_at`` over an interval ending at ``horizon`` (it saw no visit after it) saw them.

    Times only move forward: a view or pair recorded again keeps the latest time (and a pair the
    furthest horizon), so an old run's upload rerun later (it records its own plan's time) does
    not make its view newer than it was.
    """
    at, until = planned_at.astimezone(UTC), horizon.astimezone(UTC)
    views = [{"clinic_id": clinic_id, "opaque_id": oid, "horizon": until, "viewed_at": at, "run_id": run_id}
             for oid in sorted(siblings)]  # fmt: skip
    pairs = [
        {"clinic_id": clinic_id, "opaque_id": oid, "sibling_id": sib, "run_id": run_id, "recorded_at": at,
         "horizon": until}
        for oid, sibs in sorted(siblings.items())
        for sib in sorted(set(sibs))
        if sib != oid
    ]  # fmt: skip

    def latest(table: sa.Table, keys: list[str], times: tuple[str, ...]) -> Callable[[Any], Any]:
        def upsert(insert: Any) -> Any:
            def later(name: str) -> Any:
                return sa.case(
                    (insert.excluded[name] > table.c[name], insert.excluded[name]), else_=table.c[name]
                )

            newer = insert.excluded[times[0]] > table.c[times[0]]
            return insert.on_conflict_do_update(
                index_elements=keys,
                set_={
                    **{name: later(name) for name in times},
                    "run_id": sa.case((newer, insert.excluded.run_id), else_=table.c.run_id),
                },
            )

        return upsert

    with engine.begin() as conn:
        if views:
            _upsert_rows(conn, journey_views, views,
                         latest(journey_views, ["clinic_id", "opaque_id", "horizon"], ("viewed_at",)))  # fmt: skip
        if pairs:
            _upsert_rows(conn, journey_siblings, pairs,
                         latest(journey_siblings, ["clinic_id", "opaque_id", "sibling_id"], ("recorded_at", "horizon")))  # fmt: skip


def journey_relatives(engine: Engine, clinic_id: str, opaque_ids: Iterable[str]) -> dict[str, set[str]]:
    """Per opaque ID, the other IDs that name the same journey and stage, as the recorded views
    (``record_siblings``) that saw the most have it.

    A pair holds until a plan that saw at least as much looked at either of its IDs and left it
    out: planned later, over an interval reaching at least as far. Night one related two visits
    as one journey, but a lead created between them, exported late, split it in two, and night
    two saw each visit's conversion without the other. A backfill of an interval ending between
    the visits, planned later still, cannot see the second visit and cancels nothing. Pairs are
    not chained across plans (one view lists all of a journey's other visits).
    """
    c, v = journey_siblings.c, journey_views.c
    wanted = sorted(set(opaque_ids))
    pairs: list[tuple[str, str, Any, Any]] = []
    with engine.connect() as conn:
        for lo in range(0, len(wanted), 500):
            chunk = wanted[lo : lo + 500]
            for column in (c.opaque_id, c.sibling_id):  # two index searches, not one OR
                rows = conn.execute(
                    sa.select(c.opaque_id, c.sibling_id, c.recorded_at, c.horizon).where(
                        c.clinic_id == clinic_id, column.in_(chunk)
                    )
                )
                pairs += [(a, b, at, until) for a, b, at, until in rows]
        involved = sorted({oid for a, b, _, _ in pairs for oid in (a, b)})
        viewed: dict[str, list[tuple[Any, Any]]] = {}
        for lo in range(0, len(involved), 500):
            rows = conn.execute(
                sa.select(v.opaque_id, v.viewed_at, v.horizon).where(
                    v.clinic_id == clinic_id, v.opaque_id.in_(involved[lo : lo + 500])
                )
            )
            for oid, at, until in rows:
                viewed.setdefault(oid, []).append((at, until))
    wanted_set = set(wanted)
    out: dict[str, set[str]] = {}
    for a, b, at, until in pairs:
        if any(seen > at and reach >= until for oid in (a, b) for seen, reach in viewed.get(oid, ())):
            continue  # a plan that saw at least as much looked at one of them without the other
        for mine, other in ((a, b), (b, a)):
            if mine in wanted_set:
                out.setdefault(mine, set()).add(other)
    return out


def _among(
    engine: Engine, clinic_id: str, destination: str, opaque_ids: Sequence[str], condition: Any
) -> set[str]:
    out: set[str] = set()
    ids = list(opaque_ids)
    with engine.connect() as conn:
        for lo in range(0, len(ids), 500):
            out.update(
                conn.execute(
                    sa.select(send_ledger.c.opaque_id).where(
                        send_ledger.c.clinic_id == clinic_id,
                        send_ledger.c.destination == destination,
                        send_ledger.c.opaque_id.in_(ids[lo : lo + 500]),
                        condition,
                    )
                ).scalars()
            )
    return out


def _upsert_rows(conn: Connection, table: sa.Table, rows: list[dict[str, Any]], upsert: Any) -> None:
    """Run ``upsert(insert)`` over ``rows``: one executemany per chunk on SQLite, multi-row
    VALUES statements on PostgreSQL, whose driver runs an executemany of an upsert as one
    statement (one round trip) per row: 30,000 ledger rows took 8x SQLite's time."""
    if conn.dialect.name != "postgresql":
        stmt = upsert(dialect_insert(conn, table))
        for lo in range(0, len(rows), _CHUNK):
            conn.execute(stmt, rows[lo : lo + _CHUNK])
        return
    keys = [c.name for c in table.primary_key.columns]
    per = max(1, 30_000 // len(table.columns))  # bind parameters per statement stay under 65,535
    for lo in range(0, len(rows), per):
        chunk = rows[lo : lo + per]
        if len({tuple(r[k] for k in keys) for r in chunk}) < len(chunk):
            # one statement may not touch a row twice: a repeated key goes row by row, in order
            conn.execute(upsert(dialect_insert(conn, table)), chunk)
        else:
            conn.execute(upsert(dialect_insert(conn, table).values(chunk)))


def dialect_insert(conn: Connection, table: sa.Table) -> Any:
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table)


def read_audience_state(engine: Engine, clinic_id: str, destination: str) -> dict[str, str]:
    """member_key -> payload JSON of the last synced membership."""
    return _member_payloads(engine, audience_state, clinic_id, destination)


def read_pending_adds(engine: Engine, clinic_id: str, destination: str) -> dict[str, str]:
    """member_key -> payload JSON of adds sent with no recorded outcome (see ``audience_pending``)."""
    return _member_payloads(engine, audience_pending, clinic_id, destination)


def _member_payloads(engine: Engine, table: sa.Table, clinic_id: str, destination: str) -> dict[str, str]:
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(table.c.member_key, table.c.payload).where(
                table.c.clinic_id == clinic_id, table.c.destination == destination
            )
        )
        return {r.member_key: r.payload for r in rows}


def record_pending_adds(
    engine: Engine,
    clinic_id: str,
    destination: str,
    added: Mapping[str, str],
    *,
    at: datetime,
    run_id: str | None = None,
    replacing: bool = False,
) -> None:
    """Write, before the request, the adds a sync is about to hand to the platform.

    From here until ``apply_audience_delta`` settles them, each may or may not be on the list;
    the plan treats them as possibly there, so whoever stops being wanted gets a remove.

    ``replacing`` (a full resync, which empties the list first): the synced state moves into
    the pending adds in the same transaction. Until the sync's outcome is recorded nobody is
    known to be on the list, only possibly there, so a crash after the platform emptied it
    makes the next sync add every member again (and remove whoever left), instead of trusting
    a state that says they are all still there.
    """
    rows = [
        {"clinic_id": clinic_id, "destination": destination, "member_key": k, "payload": v,
         "run_id": run_id, "recorded_at": at}
        for k, v in added.items()
    ]  # fmt: skip
    if not rows and not replacing:
        return

    def upsert(insert: Any) -> Any:
        return insert.on_conflict_do_update(
            index_elements=["clinic_id", "destination", "member_key"],
            set_={
                "payload": insert.excluded.payload,
                "run_id": insert.excluded.run_id,
                "recorded_at": insert.excluded.recorded_at,
            },
        )

    with engine.begin() as conn:
        if replacing:
            state = (audience_state.c.clinic_id == clinic_id) & (audience_state.c.destination == destination)
            columns = ["clinic_id", "destination", "member_key", "payload", "run_id", "recorded_at"]
            synced = sa.select(
                audience_state.c.clinic_id,
                audience_state.c.destination,
                audience_state.c.member_key,
                audience_state.c.payload,
                sa.literal(run_id, sa.String),
                sa.literal(at, sa.DateTime(timezone=True)),
            ).where(state)
            moved = dialect_insert(conn, audience_pending).from_select(columns, synced)
            conn.execute(
                moved.on_conflict_do_nothing(index_elements=["clinic_id", "destination", "member_key"])
            )
            conn.execute(audience_state.delete().where(state))
        if rows:
            _upsert_rows(conn, audience_pending, rows, upsert)


def apply_audience_delta(
    engine: Engine,
    clinic_id: str,
    destination: str,
    *,
    added: Mapping[str, str],
    removed: Sequence[str],
    at: datetime,
    replace_all: bool = False,
    run_id: str | None = None,
    run_end: datetime | None = None,
    settled: Sequence[str] = (),
    then: Callable[[Connection], Any] | None = None,
) -> None:
    """Record what the platform now holds, after it confirmed the sync (and, with ``run_end``,
    which run's end the lists now mirror, in the same transaction).

    ``settled`` are pending adds whose outcome is now known (applied, or removed again); they
    leave ``audience_pending`` in the same transaction, so no crash point loses track of them.
    """
    at = _utc(at)
    where = (audience_state.c.clinic_id == clinic_id) & (audience_state.c.destination == destination)
    pending = (audience_pending.c.clinic_id == clinic_id) & (audience_pending.c.destination == destination)
    with engine.begin() as conn:
        for lo in range(0, len(settled), 500):
            chunk = list(settled[lo : lo + 500])
            conn.execute(audience_pending.delete().where(pending & audience_pending.c.member_key.in_(chunk)))
        if run_id is not None and run_end is not None:
            insert = dialect_insert(conn, audience_syncs)
            conn.execute(
                insert.on_conflict_do_update(
                    index_elements=["clinic_id", "destination", "run_id"],
                    set_={"run_end": insert.excluded.run_end, "synced_at": insert.excluded.synced_at},
                ),
                # in UTC: SQLite keeps a datetime's wall time and drops its offset
                {"clinic_id": clinic_id, "destination": destination, "run_id": run_id,
                 "run_end": run_end.astimezone(UTC), "synced_at": at},
            )  # fmt: skip
        if run_id is not None:
            # upsert: a retry of this same transaction after its commit was lost writes it once
            log_insert = dialect_insert(conn, audience_sync_log)
            conn.execute(
                log_insert.on_conflict_do_nothing(index_elements=["clinic_id", "destination", "run_id", "synced_at"]),
                {"clinic_id": clinic_id, "destination": destination, "run_id": run_id, "synced_at": at,
                 "adds": len(added), "removes": len(removed), "full_resync": replace_all},
            )  # fmt: skip
        if replace_all:
            conn.execute(audience_state.delete().where(where))
        for lo in range(0, len(removed), 500):
            conn.execute(
                audience_state.delete().where(
                    where & audience_state.c.member_key.in_(list(removed[lo : lo + 500]))
                )
            )
        rows = [
            {
                "clinic_id": clinic_id,
                "destination": destination,
                "member_key": k,
                "payload": v,
                "synced_at": at,
            }
            for k, v in added.items()
        ]
        _upsert_rows(conn, audience_state, rows, lambda insert: insert.on_conflict_do_update(
            index_elements=["clinic_id", "destination", "member_key"],
            set_={"payload": insert.excluded.payload, "synced_at": insert.excluded.synced_at},
        ))  # fmt: skip
        # a pending add the state now records as applied says nothing more (a crashed full
        # resync leaves every member pending; the next delta sync re-adds none of the synced)
        synced = sa.select(audience_state.c.member_key).where(where)
        conn.execute(audience_pending.delete().where(pending & audience_pending.c.member_key.in_(synced)))
        if run_id is not None:
            sync = {"destination": destination, "adds": len(added), "removes": len(removed),
                    "full_resync": replace_all, "synced_at": at.isoformat()}  # fmt: skip
            audit.append(conn, clinic_id, "audience_sync", run_id, sync, at)
        if then is not None:  # what the sync's requests left to track (etl.confirm)
            then(conn)


# how far a recorded sync may seem to precede its run's end, or follow now (clocks of two
# machines apart): past it, the row cannot have come from a sync
_CLOCK_SLACK = timedelta(hours=1)


def latest_synced_end(
    engine: Engine,
    clinic_id: str,
    destination: str,
    *,
    excluding_run: str | None = None,
    now: datetime | None = None,
) -> datetime | None:
    """The newest run end a sync of ``destination`` mirrored (by a run other than
    ``excluding_run``), or None before the first sync.

    A row no sync can have written is left out, with a warning: a run end after its own sync
    (a real run's end is never after the time it runs), or a sync after ``now``. Such a row, a
    run end of 2099 say, would otherwise leave every later delta of the list unsent
    (``skipped_newer_sync``), and a person who revoked on it for good; ``audience_syncs`` is
    not in the audit chain, so this is where an edit of it is caught."""
    where = [audience_syncs.c.clinic_id == clinic_id, audience_syncs.c.destination == destination]
    if excluding_run is not None:
        where.append(audience_syncs.c.run_id != excluding_run)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(audience_syncs.c.run_id, audience_syncs.c.run_end, audience_syncs.c.synced_at).where(
                *where
            )
        ).all()
    values = []
    for run_id, run_end, synced_at in rows:
        # compared as instants: SQLite hands back naive UTC values
        end, synced = _utc(run_end), _utc(synced_at)
        if end > synced + _CLOCK_SLACK or (now is not None and synced > _utc(now) + _CLOCK_SLACK):
            log.warning("audience_syncs: the %s sync recorded for run %s is dated as no sync can be (its "
                        "run's end after it, or it after now): the table was changed outside the "
                        "pipeline; the row is ignored", destination, run_id)  # fmt: skip
            continue
        values.append(end)
    return max(values, default=None)


def record_summary(engine: Engine, summary: Mapping[str, Any], *, run_id: str, at: datetime) -> None:
    """Add the run's summary as it stands now; one the run's latest row already holds (a report
    retried after it recorded) is not added twice."""
    text, at = json.dumps(summary, sort_keys=True), _utc(at)
    with engine.begin() as conn:
        if latest_summary(conn, run_id) == text:
            return
        conn.execute(
            run_summaries.insert(),
            {
                "run_id": run_id,
                "recorded_at": at,
                "clinic_id": summary["clinic_id"],
                "start": summary["start"],
                "end": summary["end"],
                "dry_run": bool(summary["dry_run"]),
                "target": summary["target"],
                "summary": text,
            },
        )
        audit.append(conn, summary["clinic_id"], "run_summary", run_id, {"summary": text}, at)


def latest_summary(conn: Connection, run_id: str) -> str | None:
    """The run's summary as its latest report recorded it (JSON text), None before any."""
    return conn.execute(
        sa.select(run_summaries.c.summary)
        .where(run_summaries.c.run_id == run_id)
        .order_by(run_summaries.c.recorded_at.desc())
        .limit(1)
    ).scalar()
