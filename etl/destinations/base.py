"""The interface every ad-platform adapter implements (docs/architecture.md, "Destinations").

Adapters receive rows that already passed the PHI egress gate (``etl.gate``) in the exact outbox
shapes of SPEC section 5, and report one ``RowResult`` per row. They never see raw identifiers,
so nothing they log or raise can carry PHI; they must still never log request URLs or bodies,
because tokens travel in URLs (Meta) and hashes are pseudonymous personal data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol


class Outcome(StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    DEFERRED = "deferred"  # retry on the next run (e.g. Google TOO_RECENT_EVENT)
    ALREADY_SENT = "already_sent"  # the platform already holds it (ORDER_ID_ALREADY_IN_USE)


@dataclass(frozen=True)
class RowResult:
    """One row's outcome. ``transmitted`` is False when the row never left this process (refused
    by our own checks before batching, or deferred without a request): ``sent`` counts only
    what left, which is what a compliance reader takes it to mean."""

    key: str
    outcome: Outcome
    code: str | None = None
    request_id: str | None = None
    transmitted: bool = True


@dataclass
class AudienceResult:
    """What a sync did. The synced state records only what the platform applied: every member
    key in ``unapplied`` (refused, or in a batch that failed) is re-sent by the next sync, and a
    ``full_resync`` replaces the recorded state only when ``replaced`` says the list was."""

    adds: int = 0
    removes: int = 0
    rejected: int = 0
    request_ids: list[str] = field(default_factory=list)
    codes: dict[str, int] = field(default_factory=dict)
    unapplied: set[str] = field(default_factory=set)
    replaced: bool = False


class ConversionDestination(Protocol):
    name: str
    max_batch: int

    def send(self, rows: Sequence[dict[str, Any]], *, validate_only: bool = False) -> list[RowResult]:
        """Send one batch (len(rows) <= max_batch); one result per row, in any order."""
        ...


class AudienceDestination(Protocol):
    name: str
    validates_remotely: bool  # a validate-only sync sends the members (the hashes leave)

    def sync(
        self,
        adds: Sequence[dict[str, Any]],
        removes: Sequence[dict[str, Any]],
        *,
        full_resync: bool = False,
        validate_only: bool = False,
    ) -> AudienceResult:
        """Apply a membership delta (or replace the whole list when ``full_resync``)."""
        ...
