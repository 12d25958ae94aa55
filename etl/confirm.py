"""What Google made of the Data Manager requests it took: read back, recorded, acted on.

Data Manager answers an ingest with a request ID only and processes the request afterwards:
Google's diagnostics guide says to retrieve each request's status 30 minutes on, repeatedly
with backoff, until every destination reads SUCCESS, PARTIAL_SUCCESS or FAILED. Until then an
``accepted`` in the ledger means "Google took the request", not "Google recorded the
conversion". So each request an upload or list sync sends is tracked in ``request_checks`` (in
the same transaction as the outcomes it carried), and every later upload to that destination
first reads the statuses of the tracked requests old enough:

- SUCCESS: done.
- FAILED: Google applied none of the request's records. Its conversions still ``accepted`` are
  recorded ``rejected`` with the reason Google gave (``REQUEST_FAILED`` when it gave several),
  under the run that sent them, through the ledger (and so the audit chain). They are not sent
  again: a failed request's error counts do not say which record failed for which reason.
- PARTIAL_SUCCESS: some records failed and the status does not say which; the conversions stay
  ``accepted`` and the error counts are recorded and reported.
- For a Customer Match list, either of the last two makes the next plan a full resync of that
  list (``resync_due``): the synced state may hold members Google never added, or have dropped
  members Google never removed, and nothing says which; replacing the list settles both.

A request still PROCESSING is read again by the next upload, and given up as ``unconfirmed``
after ``GIVE_UP_AFTER``. Nothing here is PHI: request IDs, reasons and counts.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeGuard

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from etl import ledger
from etl.store import audience_sync_log, request_checks, send_ledger

log = logging.getLogger(__name__)

CHECK_AFTER = timedelta(minutes=30)  # Google: retrieve the status 30 minutes after the request
GIVE_UP_AFTER = timedelta(days=7)
MAX_CHECKS_PER_UPLOAD = 200  # of the project's 300 requests a minute, leaving room for the sends
OPEN = "processing"
FAILED = "failed"
PARTIAL = "partial_success"
SUCCESS = "success"
UNCONFIRMED = "unconfirmed"  # still processing when given up, or unknown to Google


@dataclass(frozen=True)
class RequestStatus:
    """One request's status over all its destinations, and its error counts by reason."""

    status: str  # processing | success | partial_success | failed | unconfirmed
    errors: dict[str, int] = field(default_factory=dict)


class ChecksRequests(Protocol):
    """A destination whose platform processes requests after answering them (Data Manager)."""

    name: str

    def request_status(self, request_id: str) -> RequestStatus | None:
        """The request's status; None when it could not be read now (retried next upload)."""
        ...


def checks_requests(destination: object) -> TypeGuard[ChecksRequests]:
    return callable(getattr(destination, "request_status", None))


def track(
    conn: Connection,
    clinic_id: str,
    destination: str,
    requests: Mapping[str, tuple[str, int]],
    *,
    run_id: str,
    at: datetime,
) -> None:
    """Remember requests the platform took (request ID -> method, records) to check later; a
    request already tracked (a retried write) is left as it is."""
    if not requests:
        return
    insert = ledger.dialect_insert(conn, request_checks)
    conn.execute(
        insert.on_conflict_do_nothing(index_elements=["clinic_id", "destination", "request_id"]),
        [
            {"clinic_id": clinic_id, "destination": destination, "request_id": rid, "method": method,
             "run_id": run_id, "records": records, "sent_at": at.astimezone(UTC), "status": OPEN,
             "errors": None, "checks": 0, "checked_at": None}
            for rid, (method, records) in sorted(requests.items())
        ],
    )  # fmt: skip


def requests_of(entries: Iterable[Mapping[str, Any]], method: str) -> dict[str, tuple[str, int]]:
    """The requests behind ledger entries the platform took: request ID -> (method, rows)."""
    counts = Counter(
        e["request_id"] for e in entries if e.get("request_id") and e.get("status") == "accepted"
    )
    return {rid: (method, n) for rid, n in counts.items()}


def _aware(at: datetime) -> datetime:
    return at if at.tzinfo else at.replace(tzinfo=UTC)


def confirm(
    engine: Engine,
    clinic_id: str,
    destination: ChecksRequests,
    *,
    now: datetime,
    on_check: Callable[[str], None] | None = None,
) -> dict[str, int]:
    """Read the status of this destination's tracked requests sent at least ``CHECK_AFTER``
    before ``now`` and act on it (module docstring); counts by status, for the summary."""
    name = destination.name
    where = (
        (request_checks.c.clinic_id == clinic_id)
        & (request_checks.c.destination == name)
        & (request_checks.c.status == OPEN)
    )
    with engine.connect() as conn:
        # the least recently read first: a request whose status cannot be read (a refusal that
        # persists) goes to the back instead of taking the place of newer ones night after night
        due = conn.execute(
            sa.select(request_checks.c.request_id, request_checks.c.run_id, request_checks.c.sent_at)
            .where(where & (request_checks.c.sent_at <= (now - CHECK_AFTER).astimezone(UTC)))
            .order_by(
                request_checks.c.checked_at.nulls_first(),
                request_checks.c.sent_at,
                request_checks.c.request_id,
            )
            .limit(MAX_CHECKS_PER_UPLOAD)
        ).all()
    counts: Counter[str] = Counter()
    for request_id, run_id, sent_at in due:
        if on_check is not None:
            on_check(request_id)
        found = destination.request_status(request_id)
        status = OPEN if found is None else found.status
        if status == OPEN and now - _aware(sent_at) > GIVE_UP_AFTER:
            status = UNCONFIRMED  # still processing, or never readable, a week on
        elif found is None:  # not readable now: asked again by a later upload
            counts["unread"] += 1
            _record(engine, clinic_id, name, request_id, run_id, OPEN, {}, now)
            continue
        _record(
            engine, clinic_id, name, request_id, run_id, status, {} if found is None else found.errors, now
        )
        counts[status] += 1
    if counts:
        log.info("%s: request statuses read: %s", name, dict(sorted(counts.items())))
    return dict(sorted(counts.items()))


def _record(
    engine: Engine,
    clinic_id: str,
    name: str,
    request_id: str,
    run_id: str,
    status: str,
    errors: Mapping[str, int],
    now: datetime,
) -> None:
    key = (
        (request_checks.c.clinic_id == clinic_id)
        & (request_checks.c.destination == name)
        & (request_checks.c.request_id == request_id)
    )
    values = {
        "status": status,
        "errors": json.dumps(dict(sorted(errors.items()))) if errors else None,
        "checks": request_checks.c.checks + 1,
        "checked_at": now.astimezone(UTC),
    }
    if status == FAILED and name in ledger.CONVERSION_DESTINATIONS:
        code = next(iter(errors)) if len(errors) == 1 else "REQUEST_FAILED"
        with engine.connect() as conn:
            carried = conn.execute(
                sa.select(send_ledger.c.opaque_id, send_ledger.c.stage).where(
                    (send_ledger.c.clinic_id == clinic_id)
                    & (send_ledger.c.destination == name)
                    & (send_ledger.c.request_id == request_id)
                    & (send_ledger.c.status == "accepted")
                )
            ).all()
        entries = [
            {"opaque_id": oid, "stage": stage, "status": "rejected", "code": code, "request_id": request_id}
            for oid, stage in carried
        ]
        # the ledger's outcome (and its audit record) and the check in one transaction
        ledger.write_ledger(
            engine, clinic_id, name, entries, run_id=run_id, at=now,
            then=lambda conn: conn.execute(request_checks.update().where(key).values(**values)),
        )  # fmt: skip
        log.warning("%s: Google failed request %s in processing: %d conversions recorded rejected (%s)",
                    name, request_id, len(entries), code)  # fmt: skip
        return
    with engine.begin() as conn:
        conn.execute(request_checks.update().where(key).values(**values))
    if status in (FAILED, PARTIAL):
        log.warning("%s: Google %s request %s in processing: %s", name,
                    "failed" if status == FAILED else "partly failed", request_id,
                    dict(sorted(errors.items())))  # fmt: skip


def resync_due(engine: Engine, clinic_id: str, destination: str) -> bool:
    """A request of this list was found failed (in whole or part) in processing since the list
    was last replaced: which members it left wrong is not known, so the next sync replaces it."""
    with engine.connect() as conn:
        replaced = conn.execute(
            sa.select(sa.func.max(audience_sync_log.c.synced_at)).where(
                (audience_sync_log.c.clinic_id == clinic_id)
                & (audience_sync_log.c.destination == destination)
                & audience_sync_log.c.full_resync.is_(True)
            )
        ).scalar()
        failed = (
            (request_checks.c.clinic_id == clinic_id)
            & (request_checks.c.destination == destination)
            & request_checks.c.status.in_([FAILED, PARTIAL])
        )
        if replaced is None:
            return conn.execute(sa.select(sa.func.count()).where(failed)).scalar_one() > 0
        since = replaced.astimezone(UTC) if replaced.tzinfo else replaced
        found = failed & (request_checks.c.checked_at > since)
        # not one of that replacement's own adds (tracked at its sync time): a record Google
        # cannot process fails again in every replacement, which would then empty the list every
        # other night. Its remove-all failing does count: the list was never emptied, so whoever
        # left may still be on it
        later = (request_checks.c.sent_at > since) | (request_checks.c.method == "RemoveAllAudienceMembers")
        due = conn.execute(sa.select(sa.func.count()).where(found & later)).scalar_one() > 0
        if not due and conn.execute(sa.select(sa.func.count()).where(found)).scalar_one():
            log.warning("%s: Google failed requests of the last list replacement in processing; not "
                        "replaced again on its own (a record Google cannot process would fail again): "
                        "run with --full-resync once the cause is fixed", destination)  # fmt: skip
        return due
