"""The audit chain: an append-only, hash-chained record of what the sends wrote.

The compliance checklist (shared reference, hipaa-and-peers.md section 2, item 11) asks for an
audit trail that is append-only and tamper-evident. The send ledger cannot be that by itself:
it holds each conversion's state *now* (planned, then deferred, then accepted). So every ledger
write, list sync and run summary also appends, in the same transaction, one row to
``audit_chain``:

- ``outcomes``: the rows one ledger write gave the upsert (``planned`` included: the plan writes
  the authorization time a conversion leaves under), by opaque ID, with state, code, request
  ID, stage, authorization time and whether a request carried it;
- ``audience_sync``: a list sync the platform confirmed (counts, as ``audience_sync_log``);
- ``run_summary``: a run summary as ``run_summaries`` stores it;
- ``send_stop``: a platform's sends stopped or resumed (``etl.switches``, the kill switch);
- ``prune``: a run folder's working files deleted by retention (``etl.retention``): files and
  bytes; nothing in the database mirrors it, so it is checked as a link of the chain only;
- ``baseline``: what the ledger, ``run_summaries`` and ``audience_sync_log`` held when the
  chain's table was made (``write_baselines``): a database an earlier version filled.

Each row's ``sha256`` covers its own fields and the previous row's ``sha256`` (per clinic, ``seq``
1, 2, ...). ``verify`` walks the chain, then replays the outcomes and compares them with the
ledger, ``run_summaries``, ``audience_sync_log`` and ``send_stops``: a row edited, deleted or added in any of them,
or in the chain, is named by table, sequence number, destination or opaque ID and the columns
that differ, never by value.

What it does not stop: someone with write access who rewrites the chain from some point on and
the tables with it. Each report logs the chain's head (``seq`` and ``sha256``); kept apart (the
Airflow task log, a ticket), a head the chain no longer holds shows that rewrite
(``verify --head``). Nothing here is PHI: opaque IDs, codes, request IDs, counts, and the
OS account that stopped or resumed a platform.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from etl.store import audience_sync_log, audit_chain, exclusive, run_summaries, send_ledger, send_stops

GENESIS = "0" * 64  # the previous sha256 of a clinic's first record
# as ledger.FINAL_STATES (not imported: ledger imports this module)
_FINAL = frozenset({"sent", "accepted", "rejected", "already_sent", "withdrawn"})
_MAX_PROBLEMS = 50


def stamp(at: datetime) -> str:
    """A time as the chain holds it: ISO UTC text to the microsecond (a naive time is UTC)."""
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).astimezone(UTC).isoformat(timespec="microseconds")


def _digest(
    prev: str, seq: int, clinic_id: str, recorded_at: str, kind: str, run_id: str, record: str
) -> str:
    body = json.dumps([prev, seq, clinic_id, recorded_at, kind, run_id, record], separators=(",", ":"))
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def _text(record: Mapping[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


def append(
    conn: Connection, clinic_id: str, kind: str, run_id: str, record: Mapping[str, Any], at: datetime
) -> None:
    """Add one record at the end of the clinic's chain, in the caller's transaction.

    Writers of one clinic are serialized first: on SQLite a write takes the database's write
    lock for the rest of the transaction (a no-op UPDATE, in case the caller wrote nothing yet),
    on PostgreSQL a transaction-scoped advisory lock; so no two records get one ``seq``.
    """
    conn.execute(sa.update(audit_chain).where(sa.false()).values(seq=audit_chain.c.seq))
    exclusive(conn, "audit", clinic_id)
    last = _last(conn, clinic_id)
    seq, prev = (1, GENESIS) if last is None else (last[0] + 1, last[1])
    when, text = stamp(at), _text(record)
    conn.execute(
        audit_chain.insert(),
        {"clinic_id": clinic_id, "seq": seq, "recorded_at": when, "kind": kind, "run_id": run_id,
         "record": text, "prev_sha256": prev,
         "sha256": _digest(prev, seq, clinic_id, when, kind, run_id, text)},
    )  # fmt: skip


_BASELINE_ROWS = 20_000  # ledger rows per baseline record


def _summary_key(run_id: str, recorded_at: str, text: str) -> tuple[Any, ...]:
    """What ``run_summaries`` holds of one summary: every column is derived from its text."""
    summary = json.loads(text)
    return (run_id, recorded_at, summary["start"], summary["end"], bool(summary["dry_run"]),
            summary["target"], hashlib.sha256(text.encode("utf-8")).hexdigest())  # fmt: skip


def chain_dropped(conn: Connection) -> bool:
    """No ``audit_chain`` in a database a chain-keeping version made: ``send_stops`` came after
    the chain, so a database holding it once held a chain, and its absence is a removal (a table
    dropped to hide edits), not an earlier version's database to start a chain for."""
    inspector = sa.inspect(conn)
    return not inspector.has_table("audit_chain") and inspector.has_table("send_stops")


def write_baselines(conn: Connection) -> None:
    """Start each clinic's chain from what the tables already hold, in the transaction that
    creates ``audit_chain``: rows an earlier version wrote are then judged like any other (a row
    carried over and sent later replays from its earlier state), and none can be added later
    with an old time and pass as written before the chain."""
    at = datetime.now(UTC)
    clinics = sorted(
        set(conn.execute(sa.select(send_ledger.c.clinic_id).distinct()).scalars())
        | set(conn.execute(sa.select(run_summaries.c.clinic_id).distinct()).scalars())
        | set(conn.execute(sa.select(audience_sync_log.c.clinic_id).distinct()).scalars())
    )
    for clinic_id in clinics:
        summaries = [
            list(_summary_key(r.run_id, stamp(r.recorded_at), r.summary))
            for r in conn.execute(sa.select(run_summaries).where(run_summaries.c.clinic_id == clinic_id))
        ]
        syncs = [
            [r.destination, r.run_id, stamp(r.synced_at), r.adds, r.removes, bool(r.full_resync)]
            for r in conn.execute(
                sa.select(audience_sync_log).where(audience_sync_log.c.clinic_id == clinic_id)
            )
        ]
        ledger = [
            [r.destination, r.opaque_id, *(_stored(r._mapping[c], c) for c in _COMPARED)]
            for r in conn.execute(
                sa.select(send_ledger)
                .where(send_ledger.c.clinic_id == clinic_id)
                .order_by(send_ledger.c.destination, send_ledger.c.opaque_id)
            )
        ]
        append(conn, clinic_id, "baseline", "baseline",
               {"summaries": summaries, "syncs": syncs, "ledger": ledger[:_BASELINE_ROWS]}, at)  # fmt: skip
        for lo in range(_BASELINE_ROWS, len(ledger), _BASELINE_ROWS):
            append(conn, clinic_id, "baseline", "baseline",
                   {"summaries": [], "syncs": [], "ledger": ledger[lo : lo + _BASELINE_ROWS]}, at)  # fmt: skip


def outcomes_record(destination: str, rows: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The ``outcomes`` record of one ledger write: each row as the upsert got it, in its order
    (the last of two rows for one ID wins, in the ledger as in the replay). The row's times are
    the record's own (``at``): ``transmitted`` says whether it sets ``sent_at``."""
    kept = [
        [r["opaque_id"], r["status"], r["code"], r["request_id"], r["stage"],
         None if r["consent_at"] is None else stamp(r["consent_at"]), r["consent_stated"],
         r["sent_at"] is not None]
        for r in rows
    ]  # fmt: skip
    return {"destination": destination, "rows": kept} if kept else None


def _last(conn: Connection, clinic_id: str) -> tuple[int, str] | None:
    row = conn.execute(
        sa.select(audit_chain.c.seq, audit_chain.c.sha256)
        .where(audit_chain.c.clinic_id == clinic_id)
        .order_by(audit_chain.c.seq.desc())
        .limit(1)
    ).first()
    return None if row is None else (row.seq, row.sha256)


def head(engine: Engine, clinic_id: str) -> tuple[int, str] | None:
    """The clinic's last record: (seq, sha256), None before the first."""
    with engine.connect() as conn:
        return _last(conn, clinic_id)


@dataclass
class Verdict:
    """What ``verify`` found: ``problems`` is empty when the chain and the tables agree."""

    records: int = 0
    head_seq: int | None = None
    head_sha256: str | None = None
    states_checked: int = 0
    unrecorded: int = 0  # rows of the ledger, summaries and syncs the chain does not hold
    problems: list[str] = field(default_factory=list)
    more_problems: int = 0

    def problem(self, text: str) -> None:
        if len(self.problems) < _MAX_PROBLEMS:
            self.problems.append(text)
        else:
            self.more_problems += 1

    @property
    def intact(self) -> bool:
        return not self.problems


@dataclass
class _Row:
    """A ledger row as the replayed records make it (times as ``stamp`` text)."""

    status: str
    code: str | None
    request_id: str | None
    run_id: str
    stage: str | None
    consent_at: str | None
    consent_stated: bool | None
    planned_at: str | None
    sent_at: str | None
    updated_at: str
    seq: int


def _replay(before: _Row | None, row: list[Any], run_id: str, at: str, seq: int) -> _Row | None:
    """One row of an ``outcomes`` record applied as ``ledger.write_ledger``'s upsert applies it;
    None when the upsert leaves the row as it was (a final state asked to become non-final, or
    withdrawn)."""
    _id, status, code, request_id, stage, consent_at, consent_stated, transmitted = row
    planned_at, sent_at = (at if status == "planned" else None), (at if transmitted else None)
    if before is None:
        return _Row(
            status, code, request_id, run_id, stage, consent_at, consent_stated, planned_at, sent_at, at, seq
        )
    if before.status in _FINAL and (status not in _FINAL or status == "withdrawn"):
        return None
    return _Row(
        status, code, request_id, run_id,
        stage if stage is not None else before.stage,
        consent_at if consent_at is not None else before.consent_at,
        before.consent_stated if consent_at is None else consent_stated,
        before.planned_at or planned_at, before.sent_at or sent_at, at, seq,
    )  # fmt: skip


def snapshot(conn: Connection) -> Connection:
    """Make every read of ``conn`` see the database as of its first one, before anything else
    runs on it: a batch an upload commits while ``verify`` reads would otherwise be in the chain
    read first and not yet in the ledger read next, or the other way round."""
    if conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN")  # a read transaction: one WAL snapshot for all reads
        return conn
    return conn.execution_options(isolation_level="REPEATABLE READ")


def verify(conn: Connection, clinic_id: str, *, anchor: str | None = None) -> Verdict:
    """Check the clinic's chain link by link, then the ledger, ``run_summaries``,
    ``audience_sync_log`` and ``send_stops`` against it. ``anchor``: a sha256 a report logged, which the chain
    must still hold. Give it a ``snapshot`` connection."""
    verdict = Verdict()
    expected: dict[tuple[str, str], _Row] = {}
    summaries: dict[tuple[Any, ...], int] = {}
    syncs: dict[tuple[Any, ...], int] = {}
    stops: dict[str, tuple[tuple[Any, ...], int]] = {}  # platform -> (the stop's row, its record)
    prev, anchored = GENESIS, anchor is None
    rows = conn.execute(
        sa.select(audit_chain).where(audit_chain.c.clinic_id == clinic_id).order_by(audit_chain.c.seq)
    )
    for row in rows:
        verdict.records += 1
        if row.seq != verdict.records:
            verdict.problem(f"audit_chain: record {verdict.records} is missing (the next is {row.seq})")
            verdict.records = row.seq
        if row.prev_sha256 != prev:
            verdict.problem(f"audit_chain: record {row.seq} does not follow the record before it")
        prev = row.sha256
        anchored = anchored or row.sha256 == anchor
        verdict.head_seq, verdict.head_sha256 = row.seq, row.sha256
        fields = (row.prev_sha256, row.seq, clinic_id, row.recorded_at, row.kind, row.run_id, row.record)
        if row.sha256 != _digest(*fields):
            verdict.problem(f"audit_chain: record {row.seq} was changed after it was written")
            continue  # what it says now is not what was written: nothing to compare with
        try:
            record = json.loads(row.record)
            if row.kind == "outcomes":
                for item in record["rows"]:
                    key = (record["destination"], item[0])
                    after = _replay(expected.get(key), item, row.run_id, row.recorded_at, row.seq)
                    if after is not None:
                        expected[key] = after
            elif row.kind == "run_summary":
                summaries[_summary_key(row.run_id, row.recorded_at, record["summary"])] = row.seq
            elif row.kind == "baseline":
                for destination, opaque_id, *columns in record["ledger"]:
                    expected[(destination, opaque_id)] = _Row(
                        **dict(zip(_COMPARED, columns, strict=True)), seq=row.seq
                    )
                summaries.update((tuple(key), row.seq) for key in record["summaries"])
                syncs.update((tuple(key), row.seq) for key in record["syncs"])
            elif row.kind == "audience_sync":
                sync = (record["destination"], row.run_id, stamp(datetime.fromisoformat(record["synced_at"])),
                        record["adds"], record["removes"], record["full_resync"])  # fmt: skip
                syncs[sync] = row.seq
            elif row.kind == "send_stop":
                _replay_stop(stops, record, row.seq, verdict)
        except (ValueError, KeyError, TypeError, IndexError):
            verdict.problem(f"audit_chain: record {row.seq} ({row.kind}) cannot be read")
    if not anchored:
        verdict.problem(
            "audit_chain: the chain no longer holds the given head (rewritten after it was logged)"
        )
    _check_ledger(conn, clinic_id, expected, verdict)
    _check_summaries(conn, clinic_id, summaries, verdict)
    _check_syncs(conn, clinic_id, syncs, verdict)
    _check_stops(conn, clinic_id, dict(stops.values()), verdict)
    if verdict.records == 0 and verdict.unrecorded:
        verdict.problems.insert(  # first: it explains every "no audit record" after it
            0,
            "audit_chain: holds no record of this clinic while the send ledger, run_summaries or "
            "audience_sync_log hold rows: the chain was deleted (it begins, when its table is made, "
            "with what those tables held)",
        )
    return verdict


_COMPARED = ("status", "code", "request_id", "run_id", "stage", "consent_at", "consent_stated",
             "planned_at", "sent_at", "updated_at")  # fmt: skip
_TIMES = frozenset({"consent_at", "planned_at", "sent_at", "updated_at"})


def _stored(value: Any, name: str) -> Any:
    if name in _TIMES and value is not None:
        return stamp(value)
    if name == "consent_stated" and value is not None:
        return bool(value)
    return value


def _check_ledger(
    conn: Connection, clinic_id: str, expected: dict[tuple[str, str], _Row], verdict: Verdict
) -> None:
    ledger = conn.execute(
        sa.select(send_ledger.c.destination, send_ledger.c.opaque_id, *(send_ledger.c[c] for c in _COMPARED))
        .where(send_ledger.c.clinic_id == clinic_id)
    )  # fmt: skip
    seen = set()
    for row in ledger:
        key = (row.destination, row.opaque_id)
        seen.add(key)
        want = expected.get(key)
        if want is None:
            verdict.unrecorded += 1
            verdict.problem(
                f"send_ledger: {row.destination} {row.opaque_id} is {row.status} with no audit record"
            )
            continue
        verdict.states_checked += 1
        stored = row._mapping
        differ = [name for name in _COMPARED if _stored(stored[name], name) != getattr(want, name)]
        if differ:
            verdict.problem(
                f"send_ledger: {row.destination} {row.opaque_id} differs from audit record {want.seq} "
                f"in {', '.join(differ)} (recorded as {want.status})"
            )
    for (destination, opaque_id), want in expected.items():
        if (destination, opaque_id) not in seen:
            verdict.problem(
                f"send_ledger: {destination} {opaque_id} is gone (audit record {want.seq} recorded it as {want.status})"
            )


def _check_mirror(
    table: str,
    stored: Iterable[tuple[tuple[Any, ...], str]],
    chained: Mapping[tuple[Any, ...], int],
    what: Callable[[tuple[Any, ...]], str],
    verdict: Verdict,
) -> None:
    """A table every row of which the chain also holds (``stored``: each row's key and how to
    name it): a row the chain lacks was changed or added, a chained one missing here was changed
    or deleted."""
    found = set()
    for key, named in stored:
        if key in chained:
            found.add(key)
        else:
            verdict.unrecorded += 1
            verdict.problem(f"{table}: {named} has no audit record (changed or added)")
    for key, seq in chained.items():
        if key not in found:
            verdict.problem(f"{table}: {what(key)} in audit record {seq} is gone or changed")


def _check_summaries(
    conn: Connection, clinic_id: str, chained: dict[tuple[Any, ...], int], verdict: Verdict
) -> None:
    rows = conn.execute(sa.select(run_summaries).where(run_summaries.c.clinic_id == clinic_id))
    stored = (
        ((r.run_id, stamp(r.recorded_at), r.start, r.end, bool(r.dry_run), r.target,
          hashlib.sha256(r.summary.encode("utf-8")).hexdigest()), f"a summary of run {r.run_id}")
        for r in rows
    )  # fmt: skip
    _check_mirror("run_summaries", stored, chained, lambda key: f"the summary of run {key[0]}", verdict)


def _check_syncs(
    conn: Connection, clinic_id: str, chained: dict[tuple[Any, ...], int], verdict: Verdict
) -> None:
    rows = conn.execute(sa.select(audience_sync_log).where(audience_sync_log.c.clinic_id == clinic_id))
    stored = (
        ((r.destination, r.run_id, stamp(r.synced_at), r.adds, r.removes, bool(r.full_resync)),
         f"a {r.destination} sync of run {r.run_id}")
        for r in rows
    )  # fmt: skip
    _check_mirror(
        "audience_sync_log", stored, chained, lambda key: f"the {key[0]} sync of run {key[1]}", verdict
    )


def _replay_stop(
    stops: dict[str, tuple[tuple[Any, ...], int]], record: Mapping[str, Any], seq: int, verdict: Verdict
) -> None:
    """One stop or resume applied to the stops standing. ``etl.switches`` writes neither a stop
    of a stopped platform nor a resume of one not stopped: either in the chain means the table
    was changed between the two records (a stop deleted, then a new one; a stop inserted, then
    resumed), which the table alone would no longer show."""
    platform, standing = record["platform"], stops.get(record["platform"])
    if record["state"] == "stopped":
        if standing is not None:
            verdict.problem(f"send_stops: the stop of {platform} in audit record {standing[1]} was removed "
                            f"without a resume before record {seq} stopped it again")  # fmt: skip
        stops[platform] = ((platform, record["reason"], record["by"], record["stopped_at"]), seq)
        return
    if standing is None or standing[0][3] != record["stopped_at"]:
        verdict.problem(f"send_stops: audit record {seq} resumes a stop of {platform} that no audit "
                        "record made (added outside the switch)")  # fmt: skip
    stops.pop(platform, None)


def _check_stops(
    conn: Connection, clinic_id: str, chained: dict[tuple[Any, ...], int], verdict: Verdict
) -> None:
    """The kill switch's rows against the stops the chain leaves standing: one deleted outside
    ``etl.switches`` resumed sends with no record of who did it."""
    if not sa.inspect(conn).has_table("send_stops"):  # a copy made before the switch existed
        rows: list[Any] = []
    else:
        rows = list(conn.execute(sa.select(send_stops).where(send_stops.c.clinic_id == clinic_id)))
    stored = (((r.platform, r.reason, r.stopped_by, r.stopped_at), f"a stop of {r.platform}") for r in rows)
    _check_mirror("send_stops", stored, chained, lambda key: f"the stop of {key[0]}", verdict)
