"""The audit chain: an append-only, hash-chained record of what the sends wrote.

The compliance checklist (shared reference, hipaa-and-peers.md section 2, item 11) asks for an
audit trail that is append-only and tamper-evident. The send ledger cannot be that by itself:
it holds each conversion's state *now* (planned, then deferred, then accepted). So every write
that records an outcome also appends, in the same transaction, one row to ``audit_chain``:

- ``outcomes``: the states a ledger write recorded (every state but ``planned``), by opaque ID,
  with code, request ID and run;
- ``audience_sync``: a list sync the platform confirmed (counts, as ``audience_sync_log``);
- ``run_summary``: a run summary as ``run_summaries`` stores it.

Each row's ``sha256`` covers its own fields and the previous row's ``sha256`` (per clinic, ``seq``
1, 2, ...). ``verify`` walks the chain, then replays the outcomes and compares them with the
ledger, ``run_summaries`` and ``audience_sync_log``: a row edited or deleted in any of them, or
in the chain, is named by table, sequence number, destination or opaque ID, never by value.

What it does not stop: someone with write access who rewrites the chain from some point on and
the tables with it. Each report logs the chain's head (``seq`` and ``sha256``); kept apart (the
Airflow task log, a ticket), a head the chain no longer holds shows that rewrite
(``verify --head``). Nothing here is PHI: opaque IDs, codes, request IDs, counts.
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

from etl.store import audience_sync_log, audit_chain, exclusive, run_summaries, send_ledger

GENESIS = "0" * 64  # the previous sha256 of a clinic's first record
# as ledger.FINAL_STATES (not imported: ledger imports this module)
_FINAL = frozenset({"sent", "accepted", "rejected", "already_sent"})
_MAX_PROBLEMS = 50


def _stamp(at: datetime) -> str:
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).astimezone(UTC).isoformat(timespec="microseconds")


def _digest(
    prev: str, seq: int, clinic_id: str, recorded_at: str, kind: str, run_id: str, record: str
) -> str:
    body = json.dumps([prev, seq, clinic_id, recorded_at, kind, run_id, record], separators=(",", ":"))
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def _text(record: Mapping[str, Any]) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), default=str)


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
    stamp, text = _stamp(at), _text(record)
    conn.execute(
        audit_chain.insert(),
        {"clinic_id": clinic_id, "seq": seq, "recorded_at": stamp, "kind": kind, "run_id": run_id,
         "record": text, "prev_sha256": prev,
         "sha256": _digest(prev, seq, clinic_id, stamp, kind, run_id, text)},
    )  # fmt: skip


def outcomes_record(destination: str, rows: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The ``outcomes`` record of one ledger write (None when it wrote only ``planned`` rows)."""
    kept = sorted(
        [r["opaque_id"], r["status"], r["code"], r["request_id"]] for r in rows if r["status"] != "planned"
    )
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
    first_recorded_at: str | None = None
    states_checked: int = 0
    predating: int = 0  # ledger states written before the chain's first record
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


def verify(conn: Connection, clinic_id: str, *, anchor: str | None = None) -> Verdict:
    """Check the clinic's chain link by link, then the ledger, ``run_summaries`` and
    ``audience_sync_log`` against it. ``anchor``: a sha256 a report logged, which the chain
    must still hold."""
    verdict = Verdict()
    expected: dict[tuple[str, str], tuple[str, str | None, str | None, str, int]] = {}
    summaries: dict[tuple[str, str], int] = {}
    syncs: dict[tuple[str, str, int, int, bool], int] = {}
    prev, anchored = GENESIS, anchor is None
    rows = conn.execute(
        sa.select(audit_chain).where(audit_chain.c.clinic_id == clinic_id).order_by(audit_chain.c.seq)
    )
    for row in rows:
        verdict.records += 1
        verdict.first_recorded_at = verdict.first_recorded_at or row.recorded_at
        if row.seq != verdict.records:
            verdict.problem(f"audit_chain: record {verdict.records} is missing (the next is {row.seq})")
            verdict.records = row.seq
        if row.prev_sha256 != prev:
            verdict.problem(f"audit_chain: record {row.seq} does not follow the record before it")
        if row.sha256 != _digest(
            row.prev_sha256, row.seq, clinic_id, row.recorded_at, row.kind, row.run_id, row.record
        ):
            verdict.problem(f"audit_chain: record {row.seq} was changed after it was written")
        prev = row.sha256
        anchored = anchored or row.sha256 == anchor
        verdict.head_seq, verdict.head_sha256 = row.seq, row.sha256
        record = json.loads(row.record)
        if row.kind == "outcomes":
            for opaque_id, status, code, request_id in record["rows"]:
                key = (record["destination"], opaque_id)
                before = expected.get(key)
                # as the ledger's upsert: a final state is never taken back to a non-final one
                if before is None or before[0] not in _FINAL or status in _FINAL:
                    expected[key] = (status, code, request_id, row.run_id, row.seq)
        elif row.kind == "run_summary":
            summaries[(row.run_id, record["summary"])] = row.seq
        elif row.kind == "audience_sync":
            # a retry after a lost commit may append a sync twice; the log keeps it once
            sync = (
                record["destination"],
                row.run_id,
                record["adds"],
                record["removes"],
                record["full_resync"],
            )
            syncs[sync] = row.seq
    if not anchored:
        verdict.problem(
            "audit_chain: the chain no longer holds the given head (rewritten after it was logged)"
        )
    _check_ledger(conn, clinic_id, expected, verdict)
    _check_summaries(conn, clinic_id, summaries, verdict)
    _check_syncs(conn, clinic_id, syncs, verdict)
    return verdict


def _check_ledger(
    conn: Connection,
    clinic_id: str,
    expected: dict[tuple[str, str], tuple[str, str | None, str | None, str, int]],
    verdict: Verdict,
) -> None:
    ledger = conn.execute(
        sa.select(send_ledger.c.destination, send_ledger.c.opaque_id, send_ledger.c.status, send_ledger.c.code,
                  send_ledger.c.request_id, send_ledger.c.run_id, send_ledger.c.updated_at)
        .where(send_ledger.c.clinic_id == clinic_id)
    )  # fmt: skip
    seen = set()
    for row in ledger:
        key = (row.destination, row.opaque_id)
        seen.add(key)
        want = expected.get(key)
        if want is None:
            if row.status == "planned":
                continue
            if verdict.first_recorded_at is None or _stamp(row.updated_at) < verdict.first_recorded_at:
                verdict.predating += 1
                continue
            verdict.problem(
                f"send_ledger: {row.destination} {row.opaque_id} is {row.status} with no audit record"
            )
            continue
        verdict.states_checked += 1
        status, code, request_id, run_id, seq = want
        if status in _FINAL:
            if (row.status, row.code, row.request_id, row.run_id) != (status, code, request_id, run_id):
                verdict.problem(
                    f"send_ledger: {row.destination} {row.opaque_id} differs from audit record {seq} "
                    f"(a final state, recorded as {status})"
                )
        elif row.status not in (status, "planned"):
            verdict.problem(
                f"send_ledger: {row.destination} {row.opaque_id} differs from audit record {seq} "
                f"(recorded as {status})"
            )
    for (destination, opaque_id), (status, *_rest, seq) in expected.items():
        if (destination, opaque_id) not in seen:
            verdict.problem(
                f"send_ledger: {destination} {opaque_id} is gone (audit record {seq} recorded it as {status})"
            )


def _check_mirror(
    table: str,
    stored: Iterable[tuple[tuple[Any, ...], datetime, str]],
    chained: Mapping[tuple[Any, ...], int],
    what: Callable[[tuple[Any, ...]], str],
    verdict: Verdict,
) -> None:
    """A table every row of which the chain also holds (``stored``: each row's key, its time and
    how to name it): a row the chain lacks was changed or added, a chained one missing here was
    changed or deleted. Rows older than the chain predate it."""
    found = set()
    for key, at, named in stored:
        if key in chained:
            found.add(key)
        elif verdict.first_recorded_at is not None and _stamp(at) >= verdict.first_recorded_at:
            verdict.problem(f"{table}: {named} has no audit record (changed or added)")
    for key, seq in chained.items():
        if key not in found:
            verdict.problem(f"{table}: {what(key)} in audit record {seq} is gone or changed")


def _check_summaries(
    conn: Connection, clinic_id: str, chained: dict[tuple[str, str], int], verdict: Verdict
) -> None:
    rows = conn.execute(
        sa.select(run_summaries.c.run_id, run_summaries.c.summary, run_summaries.c.recorded_at).where(
            run_summaries.c.clinic_id == clinic_id
        )
    )
    stored = (((r.run_id, r.summary), r.recorded_at, f"a summary of run {r.run_id}") for r in rows)
    _check_mirror("run_summaries", stored, chained, lambda key: f"the summary of run {key[0]}", verdict)


def _check_syncs(
    conn: Connection, clinic_id: str, chained: dict[tuple[str, str, int, int, bool], int], verdict: Verdict
) -> None:
    rows = conn.execute(sa.select(audience_sync_log).where(audience_sync_log.c.clinic_id == clinic_id))
    stored = (
        ((r.destination, r.run_id, r.adds, r.removes, bool(r.full_resync)), r.synced_at,
         f"a {r.destination} sync of run {r.run_id}")
        for r in rows
    )  # fmt: skip
    _check_mirror(
        "audience_sync_log", stored, chained, lambda key: f"the {key[0]} sync of run {key[1]}", verdict
    )
