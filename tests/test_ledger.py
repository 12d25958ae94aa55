"""The ledger under overlapping runs: a final state is never taken back, and never sent twice.

A nightly run and an analyst's backfill of an overlapping interval may upload the same
conversion at the same time (the DAG serializes its own runs, not a CLI run beside them). These
tests drive ``deliver.upload_conversions`` with an in-process destination that plays the other
run: while one batch is "on the wire", it finishes rows of the next batch in the ledger.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from etl import deliver, ledger, store
from etl.destinations.base import Outcome, RowResult
from tests.conftest import make_config

AT = datetime(2026, 6, 1, tzinfo=UTC)
CLINIC = "sunrise-medspa"
DEST = "meta_events"


@pytest.mark.parametrize(
    ("first", "then", "kept"),
    [
        ("accepted", "planned", "accepted"),
        ("accepted", "deferred", "accepted"),
        ("already_sent", "planned", "already_sent"),
        ("rejected", "deferred", "rejected"),
        ("planned", "accepted", "accepted"),
        ("deferred", "planned", "planned"),
        ("planned", "deferred", "deferred"),
        ("sent", "accepted", "accepted"),
    ],
)
def test_a_final_state_is_never_taken_back(first: str, then: str, kept: str, tmp_path: Path) -> None:
    with store.engine_for(f"sqlite:///{tmp_path / 'l.sqlite'}") as engine:
        for status, run in ((first, "run-a"), (then, "run-b")):
            ledger.write_ledger(engine, CLINIC, DEST, [{"opaque_id": "x" * 64, "status": status}],
                                run_id=run, at=AT)  # fmt: skip
        assert ledger.read_ledger(engine, CLINIC, DEST)["x" * 64].status == kept
        assert ledger.final_among(engine, CLINIC, DEST, ["x" * 64, "y" * 64]) == (
            {"x" * 64} if kept in ledger.FINAL_STATES else set()
        )


class _OtherRunFinishesTheNextBatch:
    """A destination that accepts what it gets; during the first request, "another run" accepts
    the rows of the second batch in the ledger."""

    name = DEST
    max_batch = 3

    def __init__(self, engine: Any, second_batch: list[str]) -> None:
        self.engine, self.second_batch = engine, second_batch
        self.received: list[str] = []

    def send(self, rows: Sequence[dict[str, Any]], *, validate_only: bool = False) -> list[RowResult]:
        if not self.received:
            ledger.write_ledger(self.engine, CLINIC, DEST,
                                [{"opaque_id": k, "status": "accepted"} for k in self.second_batch],
                                run_id="the-other-run", at=AT)  # fmt: skip
        self.received += [r["event_id"] for r in rows]
        return [RowResult(r["event_id"], Outcome.ACCEPTED) for r in rows]


def test_rows_another_run_finished_meanwhile_are_not_sent_again(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    ids = [f"{i:064x}" for i in range(6)]
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    lines = [json.dumps({"event_id": k, "event_name": "Purchase"}) for k in ids]
    (outbox / "meta_events.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with store.engine_for(f"sqlite:///{tmp_path / 'l.sqlite'}") as engine:
        destination = _OtherRunFinishesTheNextBatch(engine, ids[3:5])
        counts = deliver.upload_conversions(config, engine, outbox, destination,  # type: ignore[arg-type]
                                            run_id="this-run", clock=lambda: AT)  # fmt: skip
        recorded = ledger.read_ledger(engine, CLINIC, DEST)
    assert destination.received == [*ids[:3], ids[5]]
    assert counts["already_sent"] == 2 and counts["accepted"] == 4 and counts["sent"] == 4
    assert {k: e.status for k, e in recorded.items()} == dict.fromkeys(ids, "accepted")
