"""The kill switch: stop a clinic's sends to one platform now, from every machine.

The compliance checklist (shared reference, hipaa-and-peers.md section 2, item 18) asks for a
"per clinic/destination stop". An incident (a suspected leak, a consent problem, a platform's
policy notice) needs sending to stop at once, not at the next deploy: taking the platform's
section or its legal-basis entry out of the YAML works only where that YAML is read, and an
upload already sending would not notice.

A stop is a row of ``send_stops`` in the staging database, which every sender of the clinic
reads, whatever machine it runs on:

- ``tasks.upload`` and ``tasks.sync_suppression`` refuse the platform before they open it
  (its credentials are not read);
- an upload already sending checks before each batch, so it stops before its next batch (a
  batch the platform throttles or bisects can take minutes of its own retries); the rows not
  sent stay ``planned`` in the ledger and a run after the resume sends them, once;
- a list sync checks before it starts; one already applying its list finishes that list (all
  of its requests: 10,000 members each on Meta), and the next is refused.

Dry runs are never stopped: they send nothing. Sandbox runs are, as live ones: the switch
belongs to the database, and a sandbox database never sends live (``ledger.claim_target``).

Each stop and resume is appended to the audit chain in the same transaction, with its reason
code, the OS account that ran the command (from the password database, not the environment)
and the time; ``verify-audit`` replays them and names
a stop deleted, edited or added outside this module. The reason is a code from a fixed list,
not free text: a free-text note is where a patient's name would end up.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from etl import audit
from etl.config import PLATFORM_DESTINATIONS
from etl.errors import ConfigError, SendingStopped
from etl.store import exclusive, send_stops

PLATFORMS = tuple(PLATFORM_DESTINATIONS)
REASONS = ("incident", "consent_problem", "legal_review", "platform_notice", "clinic_request", "other")
KIND = "send_stop"  # the audit chain's record kind
RUN_ID = "kill_switch"  # the chain's run_id of a stop or resume: no run made it
_PLATFORM_OF = {name: platform for platform, names in PLATFORM_DESTINATIONS.items() for name in names}


@dataclass(frozen=True)
class Stop:
    """A platform the clinic's sends are stopped for: why (a ``REASONS`` code), by which OS
    account, since when (ISO UTC text, as the audit chain holds it)."""

    platform: str
    reason: str
    stopped_by: str
    stopped_at: str

    def describe(self) -> str:
        return f"stopped since {self.stopped_at} by {self.stopped_by}, reason {self.reason}"


def platform_of(destination: str) -> str:
    """The platform an outbox destination (``google_conversions``, ``meta_audience``, ...) goes to."""
    return _PLATFORM_OF[destination]


def operator() -> str:
    """Who runs the command, as the audit record names them: the account of the process's user
    ID. Not ``getpass.getuser()``, which reads ``LOGNAME``/``USER`` first: typed text, which could
    name anyone or carry anything."""
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name[:64]
    except KeyError:  # a container user with no passwd entry
        return f"uid {uid}"


def stopped(bind: Engine | Connection, clinic_id: str) -> dict[str, Stop]:
    """The clinic's platforms whose sends are stopped now."""
    query = sa.select(send_stops).where(send_stops.c.clinic_id == clinic_id)
    if isinstance(bind, Engine):
        with bind.connect() as conn:
            rows = conn.execute(query).all()
    else:
        rows = bind.execute(query).all()
    return {r.platform: Stop(r.platform, r.reason, r.stopped_by, r.stopped_at) for r in rows}


def _platforms(platforms: Iterable[str]) -> list[str]:
    chosen = sorted(set(platforms), key=PLATFORMS.index) if set(platforms) <= set(PLATFORMS) else None
    if not chosen:
        raise ConfigError(f"--platform: one or more of {', '.join(PLATFORMS)}")
    return chosen


def _serialized(conn: Connection, clinic_id: str) -> None:
    """One switch change of a clinic at a time (a second stop of a platform keeps the first's
    record): SQLite's write lock taken now, a PostgreSQL advisory lock."""
    conn.execute(sa.update(send_stops).where(sa.false()).values(reason=send_stops.c.reason))
    exclusive(conn, "send_stops", clinic_id)


def stop(
    engine: Engine, clinic_id: str, platforms: Iterable[str], *, reason: str, by: str, at: datetime
) -> tuple[dict[str, Stop], list[str]]:
    """Stop the platforms' sends; one already stopped keeps its first stop's record. Returns
    every stop of the clinic afterwards, and the platforms this stopped."""
    chosen = _platforms(platforms)
    if reason not in REASONS:
        raise ConfigError(f"--reason: one of {', '.join(REASONS)}")
    with engine.begin() as conn:
        _serialized(conn, clinic_id)
        current = stopped(conn, clinic_id)
        added = [p for p in chosen if p not in current]
        for platform in added:
            row = Stop(platform, reason, by[:64], audit.stamp(at))
            conn.execute(send_stops.insert(), {"clinic_id": clinic_id, **row.__dict__})
            audit.append(conn, clinic_id, KIND, RUN_ID, {"platform": platform, "state": "stopped",
                         "reason": reason, "by": row.stopped_by, "stopped_at": row.stopped_at}, at)  # fmt: skip
        return stopped(conn, clinic_id), added


def resume(engine: Engine, clinic_id: str, platforms: Iterable[str], *, by: str, at: datetime) -> list[Stop]:
    """Let the platforms' sends go again; returns the stops this lifted (none for a platform
    that was not stopped)."""
    chosen = _platforms(platforms)
    with engine.begin() as conn:
        _serialized(conn, clinic_id)
        current = stopped(conn, clinic_id)
        lifted = [current[p] for p in chosen if p in current]
        for lift in lifted:
            conn.execute(
                sa.delete(send_stops).where(
                    send_stops.c.clinic_id == clinic_id, send_stops.c.platform == lift.platform
                )
            )
            audit.append(conn, clinic_id, KIND, RUN_ID, {"platform": lift.platform, "state": "resumed",
                         "reason": lift.reason, "by": by[:64], "stopped_at": lift.stopped_at}, at)  # fmt: skip
    return lifted


def refusal(bind: Engine | Connection, clinic_id: str, platform: str) -> SendingStopped | None:
    """Why nothing may be sent to the platform now, or None when sends may go."""
    found = stopped(bind, clinic_id).get(platform)
    if found is None:
        return None
    return SendingStopped(
        f"{platform}: sending is {found.describe()} (kill switch); nothing more goes there until "
        f"`medspa-conversions resume-sending --platform {platform}`"
    )
