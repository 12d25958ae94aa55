"""The ledger under overlapping runs: a final state is never taken back, and never sent twice.

A nightly run and an analyst's backfill of an overlapping interval may upload the same
conversion at the same time (the DAG serializes its own runs, not a CLI run beside them). These
tests drive ``deliver.upload_conversions`` with an in-process destination that plays the other
run: while one batch is "on the wire", it finishes rows of the next batch in the ledger.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from etl import deliver, ledger, store
from etl.destinations.base import Outcome, RowResult
from etl.payloads import META_AUDIENCE_SCHEMA
from tests.conftest import DATA, make_config, run_dry

AT = datetime(2026, 6, 1, tzinfo=UTC)
SYNCED = datetime(2026, 7, 1, tzinfo=UTC)  # after the runs ending 2026-06-30, as a real sync is
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
        ("superseded", "planned", "planned"),  # a later plan converts the journey there again
        ("accepted", "superseded", "accepted"),
        # withdrawn (consent revoked since the plan) ends an unfinished row, and nothing else
        ("planned", "withdrawn", "withdrawn"),
        ("withdrawn", "planned", "withdrawn"),
        ("withdrawn", "deferred", "withdrawn"),
        ("accepted", "withdrawn", "accepted"),
        ("rejected", "withdrawn", "rejected"),
    ],
)
def test_a_final_state_is_never_taken_back(first: str, then: str, kept: str, tmp_path: Path) -> None:
    from etl import audit

    with store.engine_for(f"sqlite:///{tmp_path / 'l.sqlite'}") as engine:
        for status, run in ((first, "run-a"), (then, "run-b")):
            ledger.write_ledger(engine, CLINIC, DEST, [{"opaque_id": "x" * 64, "status": status}],
                                run_id=run, at=AT)  # fmt: skip
        assert ledger.read_ledger(engine, CLINIC, DEST)["x" * 64].status == kept
        assert ledger.final_among(engine, CLINIC, DEST, ["x" * 64, "y" * 64]) == (
            {"x" * 64} if kept in ledger.FINAL_STATES else set()
        )
        with engine.connect() as conn:  # the audit chain replays the upsert's rule
            assert audit.verify(audit.snapshot(conn), CLINIC).problems == []


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


def _events_outbox(tmp_path: Path, ids: list[str]) -> Path:
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    lines = [json.dumps({"event_name": "Purchase", "event_time": 1780000000, "event_id": k,
                         "action_source": "physical_store", "user_data": {"em": ["e" * 64]}})
             for k in ids]  # fmt: skip
    (outbox / "meta_events.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return outbox


def test_rows_another_run_finished_meanwhile_are_not_sent_again(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    ids = [f"{i:064x}" for i in range(6)]
    outbox = _events_outbox(tmp_path, ids)
    with store.engine_for(f"sqlite:///{tmp_path / 'l.sqlite'}") as engine:
        destination = _OtherRunFinishesTheNextBatch(engine, ids[3:5])
        counts = deliver.upload_conversions(config, engine, outbox, destination,  # type: ignore[arg-type]
                                            run_id="this-run", clock=lambda: AT)  # fmt: skip
        recorded = ledger.read_ledger(engine, CLINIC, DEST)
    assert destination.received == [*ids[:3], ids[5]]
    assert counts["already_sent"] == 2 and counts["accepted"] == 4 and counts["sent"] == 4
    assert {k: e.status for k, e in recorded.items()} == dict.fromkeys(ids, "accepted")


class _OtherRunSendsTheJourneyOfTheNextBatch(_OtherRunFinishesTheNextBatch):
    """During the first request, "another run" plans and sends the journey of the second batch's
    first row under another opaque ID (a re-attribution it saw), recording the relation."""

    def send(self, rows: Sequence[dict[str, Any]], *, validate_only: bool = False) -> list[RowResult]:
        if not self.received:
            other = "f" * 64
            ledger.record_siblings(
                self.engine,
                CLINIC,
                {other: self.second_batch},
                run_id="the-other-run",
                planned_at=AT,
                horizon=AT,
            )
            ledger.write_ledger(self.engine, CLINIC, DEST, [{"opaque_id": other, "status": "accepted"}],
                                run_id="the-other-run", at=AT)  # fmt: skip
        self.received += [r["event_id"] for r in rows]
        return [RowResult(r["event_id"], Outcome.ACCEPTED) for r in rows]


def test_a_row_whose_journey_another_run_sent_meanwhile_under_another_id_is_not_sent(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    ids = [f"{i:064x}" for i in range(6)]
    outbox = _events_outbox(tmp_path, ids)
    with store.engine_for(f"sqlite:///{tmp_path / 'l.sqlite'}") as engine:
        destination = _OtherRunSendsTheJourneyOfTheNextBatch(engine, [ids[4]])
        counts = deliver.upload_conversions(config, engine, outbox, destination,  # type: ignore[arg-type]
                                            run_id="this-run", clock=lambda: AT)  # fmt: skip
        recorded = ledger.read_ledger(engine, CLINIC, DEST)
    assert destination.received == [*ids[:4], ids[5]]
    assert counts["already_sent"] == 1 and counts["held_under_another_id"] == 1 and counts["sent"] == 5
    assert recorded[ids[4]].status == "superseded"  # never sent, and not carried over as unfinished
    with store.engine_for(f"sqlite:///{tmp_path / 'l.sqlite'}") as engine:
        assert ledger.unfinished_ids(engine, CLINIC, [DEST]) == frozenset()
        with engine.connect() as conn:
            sent_at = conn.execute(sa.select(store.send_ledger.c.sent_at).where(
                store.send_ledger.c.opaque_id == ids[4])).scalar()  # fmt: skip
    assert sent_at is None  # it never left: disclosures do not count it


def test_a_view_that_saw_at_least_as_much_decides_which_ids_name_a_journey(tmp_path: Path) -> None:
    a, b, c, d = ("a" * 64, "b" * 64, "c" * 64, "d" * 64)
    day = [AT + timedelta(days=n) for n in range(5)]
    with store.engine_for(f"sqlite:///{tmp_path / 'l.sqlite'}") as engine:

        def view(
            ids: dict[str, list[str]], run: str, planned: datetime, horizon: datetime, clinic: str = CLINIC
        ) -> None:
            ledger.record_siblings(engine, clinic, ids, run_id=run, planned_at=planned, horizon=horizon)

        # night one saw a's journey also at b's visit; night two saw c's at b's (c itself: ignored)
        view({a: [b]}, "night-one", day[0], day[0])
        view({c: [b, c]}, "night-two", day[1], day[1])
        view({d: [a]}, "elsewhere", day[1], day[1], clinic="another-clinic")
        # one plan's view, not chained through b across two plans: a and c are not related
        assert ledger.journey_relatives(engine, CLINIC, [a, b, c, d]) == {a: {b}, b: {a, c}, c: {b}}
        assert ledger.journey_relatives(engine, "another-clinic", [a]) == {a: {d}}
        # a backfill planned later over an interval ending before night one's sees b alone: it
        # saw less than night one, and cancels nothing
        view({b: []}, "backfill", day[2], day[0] - timedelta(days=3))
        assert ledger.journey_relatives(engine, CLINIC, [a]) == {a: {b}}
        # night three saw b with no sibling (a late lead split the journey) and as far: it wins
        view({b: []}, "night-three", day[2], day[2])
        assert ledger.journey_relatives(engine, CLINIC, [a, b, c]) == {}
        # night one's upload rerun today records night one's time: still older
        view({a: [b]}, "night-one", day[0], day[0])
        assert ledger.journey_relatives(engine, CLINIC, [a]) == {}
        # a newer plan that sees the pair again makes it hold again (one row, the newer time)
        view({a: [b]}, "night-four", day[3], day[3])
        assert ledger.journey_relatives(engine, CLINIC, [a, b]) == {a: {b}, b: {a}}
        with engine.connect() as conn:
            rows = conn.execute(sa.select(store.journey_siblings.c.run_id).where(
                store.journey_siblings.c.opaque_id == a)).scalars().all()  # fmt: skip
        assert rows == ["night-four"]


class _QuotaRunsOutMidBatch:
    """Accepts the first two rows of its first request, then the daily quota runs out."""

    name = DEST
    max_batch = 3

    def send(self, rows: Sequence[dict[str, Any]], *, validate_only: bool = False) -> list[RowResult]:
        from etl.errors import QuotaExhausted

        stop = QuotaExhausted("quota")
        stop.partial_results = [RowResult(r["event_id"], Outcome.ACCEPTED) for r in rows[:2]]
        raise stop


def test_rows_accepted_before_a_quota_stop_are_recorded_not_sent_again(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    ids = [f"{i:064x}" for i in range(5)]
    outbox = _events_outbox(tmp_path, ids)
    with store.engine_for(f"sqlite:///{tmp_path / 'l.sqlite'}") as engine:
        counts = deliver.upload_conversions(config, engine, outbox, _QuotaRunsOutMidBatch(),  # type: ignore[arg-type]
                                            run_id="r", clock=lambda: AT)  # fmt: skip
        recorded = {k: e.status for k, e in ledger.read_ledger(engine, CLINIC, DEST).items()}
    assert counts["stopped"] == "daily_quota" and counts["accepted"] == 2 and counts["sent"] == 2
    # the batch not reached is planned as well: the next run carries it over whatever its interval
    assert recorded == {ids[0]: "accepted", ids[1]: "accepted", **dict.fromkeys(ids[2:], "planned")}
    with store.engine_for(f"sqlite:///{tmp_path / 'l.sqlite'}") as engine:
        assert ledger.unfinished_ids(engine, CLINIC, [DEST]) == frozenset(ids[2:])


class _AcceptsAll:
    name = DEST
    max_batch = 3

    def send(self, rows: Sequence[dict[str, Any]], *, validate_only: bool = False) -> list[RowResult]:
        return [RowResult(r["event_id"], Outcome.ACCEPTED) for r in rows]


def test_a_ledger_that_refuses_a_sent_batch_is_one_clear_error_naming_no_value(tmp_path: Path) -> None:
    import sqlalchemy as sa

    from etl.errors import StagingError

    ids = [f"{i:064x}" for i in range(2)]
    outbox = _events_outbox(tmp_path, ids)
    with store.engine_for(f"sqlite:///{tmp_path / 'l.sqlite'}") as engine:
        with engine.begin() as conn:  # the database refuses every outcome (a constraint, a full disk)
            conn.execute(sa.text("CREATE TRIGGER no_outcomes BEFORE UPDATE ON send_ledger "
                                 "WHEN NEW.status = 'accepted' BEGIN SELECT RAISE(ABORT, 'refused'); END"))  # fmt: skip
        with pytest.raises(StagingError) as info:
            deliver.upload_conversions(make_config(tmp_path), engine, outbox, _AcceptsAll(),  # type: ignore[arg-type]
                                       run_id="r", clock=lambda: AT)  # fmt: skip
        recorded = {k: e.status for k, e in ledger.read_ledger(engine, CLINIC, DEST).items()}
    message = str(info.value)
    assert message.startswith(
        "meta_events: the send ledger refused the outcome of a batch the platform answered"
    )
    assert "IntegrityError" in message and "stay planned" in message and not info.value.retryable
    assert ids[0] not in message and "refused'" not in message  # no row, no driver text
    assert recorded == dict.fromkeys(ids, "planned")  # the next run sends them again


def test_an_unfinished_upload_is_sent_by_a_later_interval_not_lost(tmp_path: Path) -> None:
    # the journeys case converts on 2026-01-20; a run for [01-15, 03-01) plans both stages
    config = make_config(DATA / "rules" / "journeys")
    url = f"sqlite:///{tmp_path / 'l.sqlite'}"
    first = run_dry(config, "2026-01-15", "2026-03-01", tmp_path / "first", db_url=url)
    google = {r["order_id"] for r in first.rows["google_conversions"]}
    meta = {r["event_id"] for r in first.rows["meta_events"]}
    assert len(google) == len(meta) == 2
    # the real run's Google upload finished; Meta throttled and deferred everything
    with store.engine_for(url) as engine:
        for dest, ids, status in (
            ("google_conversions", google, "accepted"),
            ("meta_events", meta, "deferred"),
        ):
            ledger.write_ledger(engine, config.clinic_id, dest, [{"opaque_id": i, "status": status} for i in ids],
                                run_id="first", at=AT)  # fmt: skip
    # the next night's interval no longer reaches back to those ready times
    later = run_dry(config, "2026-03-05", "2026-03-06", tmp_path / "later", db_url=url)
    assert {r["event_id"] for r in later.rows["meta_events"]} == meta
    assert later.rows["google_conversions"] == []
    assert later.summary["carried_over"] == 2
    assert later.summary["drops"]["already_sent"] == 0  # Google's were not this interval's to count
    # once Meta has them too, nothing is carried any more
    with store.engine_for(url) as engine:
        ledger.write_ledger(engine, config.clinic_id, "meta_events",
                            [{"opaque_id": i, "status": "accepted"} for i in meta], run_id="later", at=AT)  # fmt: skip
    after = run_dry(config, "2026-03-06", "2026-03-07", tmp_path / "after", db_url=url)
    assert after.summary["carried_over"] == 0 and after.rows["meta_events"] == []


def test_an_unfinished_row_too_old_for_every_platform_is_not_carried_night_after_night(
    tmp_path: Path,
) -> None:
    # a published real run whose uploads never ran: its rows stay planned; once they were
    # planned longer ago than any platform's age limit, carrying them only counts them again
    config = make_config(DATA / "rules" / "journeys")
    url = f"sqlite:///{tmp_path / 'l.sqlite'}"
    first = run_dry(config, "2026-01-15", "2026-03-01", tmp_path / "first", db_url=url)
    planned_at = datetime(2026, 3, 1, 11, tzinfo=UTC)
    with store.engine_for(url) as engine:
        for dest, field in (("google_conversions", "order_id"), ("meta_events", "event_id")):
            ledger.write_ledger(engine, config.clinic_id, dest, [{"opaque_id": r[field], "status": "planned"}
                                for r in first.rows[dest]], run_id="first", at=planned_at)  # fmt: skip
    soon = run_dry(config, "2026-03-05", "2026-03-06", tmp_path / "soon", db_url=url)
    assert soon.summary["carried_over"] == 2
    much_later = run_dry(config, "2026-06-05", "2026-06-06", tmp_path / "later", db_url=url)
    assert much_later.summary["carried_over"] == 0
    assert much_later.summary["drops"].get("too_old_for_google", 0) == 0
    assert much_later.summary["drops"].get("too_old_for_meta", 0) == 0


class _RefusingAudience:
    """Applies a Meta-shaped delta except the member keys it is told to refuse (a failed batch)."""

    name = "meta_audience"
    validates_remotely = False

    def __init__(self, refuse: set[str], *, replaced: bool = True) -> None:
        self.refuse, self.replace_ok = refuse, replaced

    def sync(self, adds: Any, removes: Any, *, full_resync: bool = False, validate_only: bool = False) -> Any:
        from etl.destinations.base import AudienceResult

        return AudienceResult(unapplied=set(self.refuse), replaced=full_resync and self.replace_ok)


def _audience_outbox(tmp_path: Path, adds: list[list[str]], removes: list[list[str]]) -> Path:
    outbox = tmp_path / "outbox"
    outbox.mkdir(parents=True)
    schema = list(META_AUDIENCE_SCHEMA)
    lines = [json.dumps({"operation": op, "schema": schema, "data": rows})
             for op, rows in (("add", adds), ("remove", removes)) if rows]  # fmt: skip
    (outbox / "meta_audience.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return outbox


def test_the_synced_state_records_only_what_the_platform_applied(tmp_path: Path) -> None:
    from etl.payloads import meta_member_key

    config = make_config(tmp_path)
    a, b, c = ([f"{i:064x}", *[""] * 7] for i in range(3))
    with store.engine_for(f"sqlite:///{tmp_path / 'l.sqlite'}") as engine:
        state = lambda: set(ledger.read_audience_state(engine, CLINIC, "meta_audience"))  # noqa: E731
        deliver.sync_audience(config, engine, _audience_outbox(tmp_path / "1", [a, b], []),
                              _RefusingAudience(set()), full_resync=False, clock=lambda: AT)  # type: ignore[arg-type]  # fmt: skip
        assert state() == {meta_member_key(a), meta_member_key(b)}
        # b revoked: its remove fails; c's add fails too. Neither may be recorded as done
        refused = {meta_member_key(b), meta_member_key(c)}
        deliver.sync_audience(config, engine, _audience_outbox(tmp_path / "2", [c], [b]),
                              _RefusingAudience(refused), full_resync=False, clock=lambda: AT)  # type: ignore[arg-type]  # fmt: skip
        assert state() == {meta_member_key(a), meta_member_key(b)}  # the next sync removes b again
        # a full resync the platform did not carry out: whether it emptied the list is not
        # known, so nobody is known to be on it, everyone is possibly there (pending)
        deliver.sync_audience(config, engine, _audience_outbox(tmp_path / "3", [c], []),
                              _RefusingAudience(set(), replaced=False), full_resync=True, clock=lambda: AT)  # type: ignore[arg-type]  # fmt: skip
        assert state() == set()
        assert set(ledger.read_pending_adds(engine, CLINIC, "meta_audience")) == {
            meta_member_key(a), meta_member_key(b), meta_member_key(c)}  # fmt: skip
        deliver.sync_audience(config, engine, _audience_outbox(tmp_path / "4", [c], []),
                              _RefusingAudience(set()), full_resync=True, clock=lambda: AT,  # type: ignore[arg-type]
                              run_id="r4", run_end=AT)  # fmt: skip
        assert state() == {meta_member_key(c)}
        assert ledger.latest_synced_end(engine, CLINIC, "meta_audience") == AT


def test_adds_with_no_recorded_outcome_stay_pending_until_settled(tmp_path: Path) -> None:
    from etl.payloads import meta_member_key

    config = make_config(tmp_path)
    a, b, c = ([f"{i:064x}", *[""] * 7] for i in range(3))
    ka, kb = (meta_member_key(x) for x in (a, b))
    with store.engine_for(f"sqlite:///{tmp_path / 'l.sqlite'}") as engine:
        pending = lambda: set(ledger.read_pending_adds(engine, CLINIC, "meta_audience"))  # noqa: E731
        sync = lambda n, adds, refused, resync=False: deliver.sync_audience(  # noqa: E731
            config, engine, _audience_outbox(tmp_path / n, adds, []), _RefusingAudience(refused),  # type: ignore[arg-type]
            full_resync=resync, clock=lambda: AT)  # fmt: skip
        sync("1", [a, b], {kb})  # b's batch failed: the platform may hold it or not
        assert pending() == {kb}
        assert set(ledger.read_audience_state(engine, CLINIC, "meta_audience")) == {ka}
        sync("2", [b, c], set())
        assert pending() == set()
        sync("3", [a], {ka}, resync=True)  # the list was emptied first; only a may be on it
        assert pending() == {ka}
        sync("3b", [a], set())  # a is applied now: nothing about it is pending any more
        assert pending() == set()
        sync("3c", [a, b], {ka, kb}, resync=True)  # a crashed-like resync: both unapplied, pending
        assert pending() == {ka, kb}
        ledger.apply_audience_delta(engine, CLINIC, "meta_audience", added={kb: "{}"}, removed=[], at=AT)
        assert pending() == {ka}  # b is recorded as synced: its pending row is redundant
        # validate-only sends nothing for real: nothing becomes pending
        deliver.sync_audience(config, engine, _audience_outbox(tmp_path / "4", [c], []),
                              _RefusingAudience(set()), full_resync=False, clock=lambda: AT,  # type: ignore[arg-type]
                              validate_only=True)  # fmt: skip
        assert pending() == {ka}


def test_a_delta_planned_before_a_later_run_synced_is_not_applied(tmp_path: Path) -> None:
    # two backfill runs side by side: the older one planned its delta, then the newer one
    # synced first; the older delta is stale and would put back whoever revoked in between
    config = make_config(tmp_path)
    a = [f"{1:064x}", *[""] * 7]
    older_end, newer_end = datetime(2026, 5, 20, 7, tzinfo=UTC), datetime(2026, 6, 30, 7, tzinfo=UTC)
    with store.engine_for(f"sqlite:///{tmp_path / 'l.sqlite'}") as engine:
        ledger.apply_audience_delta(engine, CLINIC, "meta_audience", added={}, removed=[], at=SYNCED,
                                    run_id="newer", run_end=newer_end)  # fmt: skip
        destination = _RefusingAudience(set())
        calls: list[Any] = []
        destination.sync = lambda *args, **kwargs: calls.append(args)  # type: ignore[method-assign]
        counts = deliver.sync_audience(config, engine, _audience_outbox(tmp_path / "o", [a], []), destination,  # type: ignore[arg-type]
                                       full_resync=False, clock=lambda: SYNCED, run_id="older", run_end=older_end)  # fmt: skip
        assert calls == [] and counts["skipped_newer_sync"] == 1
        assert ledger.read_pending_adds(engine, CLINIC, "meta_audience") == {}
        assert ledger.latest_synced_end(engine, CLINIC, "meta_audience") == newer_end


def test_a_delta_planned_before_another_run_of_the_same_end_synced_is_not_applied(tmp_path: Path) -> None:
    # a CLI backfill and the nightly run share an end: the backfill planned, the nightly run
    # (planned after a revocation) synced, then the backfill's stale delta put the person back
    config = make_config(tmp_path)
    a = [f"{1:064x}", *[""] * 7]
    end = datetime(2026, 6, 30, 7, tzinfo=UTC)
    with store.engine_for(f"sqlite:///{tmp_path / 'l.sqlite'}") as engine:
        ledger.apply_audience_delta(engine, CLINIC, "meta_audience", added={}, removed=[], at=SYNCED,
                                    run_id="nightly", run_end=end)  # fmt: skip
        calls: list[Any] = []

        def audience() -> Any:
            destination = _RefusingAudience(set())
            real = destination.sync
            destination.sync = lambda *args, **kwargs: calls.append(args) or real(*args, **kwargs)  # type: ignore[method-assign]
            return destination

        def sync(run_id: str) -> dict[str, Any]:
            return deliver.sync_audience(config, engine, _audience_outbox(tmp_path / run_id, [a], []), audience(),  # type: ignore[arg-type]
                                         full_resync=False, clock=lambda: SYNCED, run_id=run_id, run_end=end)  # fmt: skip

        assert sync("backfill")["skipped_newer_sync"] == 1 and calls == []
        # the nightly run's own sync retried (a cleared task) is not stale: it goes through
        assert "skipped_newer_sync" not in sync("nightly") and len(calls) == 1


def test_a_backfill_leaves_lists_a_later_run_synced(tmp_path: Path) -> None:
    # the consent_revoked case: a patient revoked on 05-25; a backfill ending 05-20 still sees
    # them granted, and must not put them back on the lists the nightly run of 06-30 mirrored
    config = make_config(DATA / "rules" / "consent_revoked")
    url = f"sqlite:///{tmp_path / 'l.sqlite'}"
    nightly_end = datetime(2026, 6, 30, 7, tzinfo=UTC)
    with store.engine_for(url) as engine:
        for dest in ("google_customer_match", "meta_audience"):
            # synced once its interval ended, as a real run is
            ledger.apply_audience_delta(engine, config.clinic_id, dest, added={}, removed=[],
                                        at=nightly_end + timedelta(hours=3), run_id="nightly", run_end=nightly_end)  # fmt: skip
            assert ledger.latest_synced_end(engine, config.clinic_id, dest) == nightly_end
    backfill = run_dry(config, "2026-05-01", "2026-05-20", tmp_path / "backfill", db_url=url)
    for dest in ("google_customer_match", "meta_audience"):
        assert backfill.rows[dest] == []
        assert backfill.summary["destinations"][dest]["skipped_newer_sync"] == 1
    # on a database no later run synced, the same backfill plans the lists, and still leaves the
    # patient off: granted at its end, but revoked on record before its upload (rule 6)
    fresh = run_dry(config, "2026-05-01", "2026-05-20", tmp_path / "fresh")
    assert fresh.rows["google_customer_match"] == fresh.rows["meta_audience"] == []
    assert "skipped_newer_sync" not in fresh.summary["destinations"]["meta_audience"]


@pytest.mark.parametrize(
    ("run_end", "synced_at"),
    [(datetime(2099, 1, 1, tzinfo=UTC), datetime(2026, 7, 1, tzinfo=UTC)),
     (datetime(2099, 1, 1, tzinfo=UTC), datetime(2099, 1, 2, tzinfo=UTC))],
    ids=["end-after-its-sync", "sync-in-the-future"],
)  # fmt: skip
def test_a_sync_row_no_sync_can_have_written_does_not_stall_the_lists(
    tmp_path: Path, run_end: datetime, synced_at: datetime, caplog: pytest.LogCaptureFixture
) -> None:
    # audience_syncs is not in the audit chain: a run end of 2099 written into it made every
    # later delta "skipped_newer_sync", and a patient who revoked stayed on the lists for good
    config = make_config(DATA / "rules" / "consent_revoked")
    url = f"sqlite:///{tmp_path / 'l.sqlite'}"
    with store.engine_for(url) as engine, engine.begin() as conn:
        for dest in ("google_customer_match", "meta_audience"):
            conn.execute(store.audience_syncs.insert().values(
                clinic_id=config.clinic_id, destination=dest, run_id="forged", run_end=run_end, synced_at=synced_at))  # fmt: skip
    planned = run_dry(config, "2026-05-01", "2026-06-30", tmp_path / "run", db_url=url)
    for dest in ("google_customer_match", "meta_audience"):
        assert "skipped_newer_sync" not in planned.summary["destinations"][dest]
    assert "the table was changed outside the pipeline" in caplog.text and "forged" in caplog.text


def test_an_outbox_changed_after_publishing_is_stopped_at_upload(tmp_path: Path) -> None:
    from etl.errors import GateViolation

    config = make_config(tmp_path)
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    row = {"event_name": "Purchase", "event_time": 1780000000, "event_id": "f" * 64,
           "action_source": "physical_store", "user_data": {"em": ["jane.doe@gmail.com"]}}  # fmt: skip
    (outbox / "meta_events.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
    with store.engine_for(f"sqlite:///{tmp_path / 'l.sqlite'}") as engine:
        destination = _OtherRunFinishesTheNextBatch(engine, [])
        with pytest.raises(GateViolation) as info:
            deliver.upload_conversions(config, engine, outbox, destination,  # type: ignore[arg-type]
                                       run_id="r", clock=lambda: AT)  # fmt: skip
        assert destination.received == [] and ledger.read_ledger(engine, CLINIC, DEST) == {}
    assert "user_data.em[0]" in str(info.value) and "jane" not in str(info.value)


def test_an_outbox_file_whose_bytes_are_not_the_published_ones_is_not_sent(tmp_path: Path) -> None:
    # a value edited after publishing passes the PHI gate (it is still a number); summary.json's
    # digests catch it, so what leaves is what the gates checked
    from etl.errors import GateViolation
    from etl.outbox import write_outbox

    config = make_config(tmp_path)
    event = {"event_name": "Purchase", "event_time": 1780000000, "event_id": "f" * 64,
             "action_source": "physical_store", "user_data": {"em": ["e" * 64]},
             "custom_data": {"value": 450.0, "currency": "USD"}}  # fmt: skip
    outbox = write_outbox(tmp_path / "outbox", {DEST: [event]}, {"clinic_id": CLINIC})
    with store.engine_for(f"sqlite:///{tmp_path / 'l.sqlite'}") as engine:
        untouched = _OtherRunFinishesTheNextBatch(engine, [])
        deliver.upload_conversions(config, engine, outbox, untouched, run_id="r", clock=lambda: AT)  # type: ignore[arg-type]
        assert untouched.received == ["f" * 64]  # the published bytes go
        path = outbox / "meta_events.jsonl"
        path.write_text(path.read_text(encoding="utf-8").replace("450.0", "4500.0"), encoding="utf-8")
        edited = _OtherRunFinishesTheNextBatch(engine, [])
        with pytest.raises(GateViolation, match="changed since the outbox was published"):
            deliver.upload_conversions(config, engine, outbox, edited, run_id="r2", clock=lambda: AT)  # type: ignore[arg-type]
        assert edited.received == []


def test_sandbox_and_live_sends_never_share_a_ledger(tmp_path: Path) -> None:
    from etl.errors import ConfigError

    with store.engine_for(f"sqlite:///{tmp_path / 'l.sqlite'}") as engine:
        ledger.claim_target(engine, CLINIC, "sandbox", run_id="try-out", at=AT)
        ledger.claim_target(engine, CLINIC, "sandbox", run_id="again", at=AT)  # same target: fine
        ledger.claim_target(engine, "other-clinic", "live", run_id="n1", at=AT)  # per clinic
        with pytest.raises(ConfigError, match="holds sandbox sends") as info:
            ledger.claim_target(engine, CLINIC, "live", run_id="go-live", at=AT)
    assert "separate" in str(info.value) and "--database" in str(info.value)


class _RefusesOneLocally:
    """Refuses the first row before any request (our own pre-check), accepts the rest."""

    name = DEST
    max_batch = 10

    def send(self, rows: Sequence[dict[str, Any]], *, validate_only: bool = False) -> list[RowResult]:
        first, *rest = rows
        return [RowResult(first["event_id"], Outcome.REJECTED, "invalid_format", transmitted=False),
                *(RowResult(r["event_id"], Outcome.ACCEPTED) for r in rest)]  # fmt: skip


def test_sent_counts_only_rows_that_left(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    ids = [f"{i:064x}" for i in range(4)]
    with store.engine_for(f"sqlite:///{tmp_path / 'l.sqlite'}") as engine:
        counts = deliver.upload_conversions(config, engine, _events_outbox(tmp_path, ids), _RefusesOneLocally(),  # type: ignore[arg-type]
                                            run_id="r", clock=lambda: AT)  # fmt: skip
    assert (counts["sent"], counts["accepted"], counts["rejected"]) == (3, 3, 1)


class _AccountRefusedMidBatch:
    """Accepts the first two rows of its first request, then the account is refused."""

    name = DEST
    max_batch = 5

    def send(self, rows: Sequence[dict[str, Any]], *, validate_only: bool = False) -> list[RowResult]:
        from etl.errors import DestinationConfigError

        stop = DestinationConfigError("account refused")
        stop.partial_results = [RowResult(r["event_id"], Outcome.ACCEPTED) for r in rows[:2]]
        raise stop


def test_rows_decided_before_an_account_stop_are_counted_with_the_stop(tmp_path: Path) -> None:
    from etl.errors import DestinationConfigError

    config = make_config(tmp_path)
    ids = [f"{i:064x}" for i in range(4)]
    with store.engine_for(f"sqlite:///{tmp_path / 'l.sqlite'}") as engine:
        with pytest.raises(DestinationConfigError) as info:
            deliver.upload_conversions(config, engine, _events_outbox(tmp_path, ids), _AccountRefusedMidBatch(),  # type: ignore[arg-type]
                                       run_id="r", clock=lambda: AT)  # fmt: skip
        recorded = {k: e.status for k, e in ledger.read_ledger(engine, CLINIC, DEST).items()}
    counts = info.value.counts
    assert counts is not None and counts["stopped"] == "destination_config"
    assert (counts["sent"], counts["accepted"], counts["requests"]) == (2, 2, 1)
    assert sum(1 for s in recorded.values() if s == "accepted") == counts["accepted"]


def test_folding_upload_results_twice_counts_them_once(tmp_path: Path) -> None:
    from etl.pipeline import RunPaths, finalize_summary

    paths = RunPaths(run_dir=tmp_path, outbox=tmp_path / "outbox")
    paths.results.mkdir()
    result = {"sent": 4, "accepted": 4, "already_sent": 3, "finished_by_an_earlier_attempt": 4, "requests": 0}
    (paths.results / f"{DEST}.json").write_text(json.dumps(result))
    summary = {"destinations": {DEST: {"planned": 6, "already_sent": 2}}}
    once = finalize_summary(paths, summary)
    twice = finalize_summary(paths, once)  # a retried report folds the folded summary again
    assert once == twice
    assert twice["destinations"][DEST]["already_sent"] == 5
    assert twice["destinations"][DEST]["already_sent_at_upload"] == 3
    # sent 4 with no request of its own: the summary says an earlier attempt of the run sent them
    assert twice["destinations"][DEST]["finished_by_an_earlier_attempt"] == 4


def test_the_first_send_recorded_in_a_database_warns_that_it_is_the_record(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # a fresh database for a clinic that sent before would send everything again
    import logging

    with store.engine_for(f"sqlite:///{tmp_path / 'l.sqlite'}") as engine, caplog.at_level(logging.WARNING):
        ledger.claim_target(engine, CLINIC, "live", run_id="night-1", at=AT)
        ledger.claim_target(engine, CLINIC, "live", run_id="night-2", at=AT)
    warned = [r for r in caplog.records if "first live send" in r.getMessage()]
    assert len(warned) == 1 and "restore that one instead" in warned[0].getMessage()


def test_a_report_retried_after_it_recorded_adds_no_second_summary_row(tmp_path: Path) -> None:
    import sqlalchemy as sa

    summary = {"clinic_id": CLINIC, "start": "2026-05-01T00:00:00-07:00", "end": "2026-06-01T00:00:00-07:00",
               "dry_run": False, "target": "sandbox", "stages": {"consultation": 3}}  # fmt: skip
    later = {**summary, "stages": {"consultation": 4}}
    with store.engine_for(f"sqlite:///{tmp_path / 'l.sqlite'}") as engine:
        ledger.record_summary(engine, summary, run_id="r1", at=AT)
        ledger.record_summary(
            engine, summary, run_id="r1", at=datetime(2026, 6, 1, 0, 5, tzinfo=UTC)
        )  # the retry
        ledger.record_summary(
            engine, later, run_id="r1", at=datetime(2026, 6, 2, tzinfo=UTC)
        )  # new facts: a row
        ledger.record_summary(engine, summary, run_id="r2", at=AT)  # another run
        with engine.connect() as conn:
            rows = conn.execute(sa.select(store.run_summaries.c.run_id, store.run_summaries.c.summary)
                                .order_by(store.run_summaries.c.recorded_at, store.run_summaries.c.run_id)).all()  # fmt: skip
    assert [(r.run_id, json.loads(r.summary)["stages"]["consultation"]) for r in rows] == [
        ("r1", 3), ("r2", 3), ("r1", 4)]  # fmt: skip
