"""Whole-interval behaviour: determinism, the ledger, the suppression mirror, staging backends."""

from __future__ import annotations

import filecmp
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from etl import ledger, pipeline, store
from etl.config import ClinicConfig
from etl.outbox import OUTBOX_FILES
from etl.rules.stages import RunWindow
from tests.conftest import APPT_HEADER, DATA, ONE_LEAD, SECRET, CaseRun, make_config, run_dry, visit

NOW = datetime(2026, 11, 23, tzinfo=UTC)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from etl.synth import write_synthetic_clinic

    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic_clinic(out, appointments=3000, leads=1200, seed=11)
    return out


def test_same_dry_run_twice_gives_byte_identical_outboxes(synthetic: Path, tmp_path: Path) -> None:
    from etl.config import load_config

    config = load_config(synthetic / "clinic.yaml")
    first = run_dry(config, "2026-09-01", "2026-11-23", tmp_path / "one")
    second = run_dry(config, "2026-09-01", "2026-11-23", tmp_path / "two")
    names = [*OUTBOX_FILES.values(), "summary.json"]
    match, mismatch, errors = filecmp.cmpfiles(first.outbox, second.outbox, names, shallow=False)
    assert mismatch == [] and errors == []
    assert len(match) == 5
    # and the demo data exercises both platforms and most drop reasons
    assert first.rows["google_conversions"] and first.rows["meta_events"]
    assert first.rows["google_customer_match"] and first.rows["meta_audience"]
    drops = first.summary["drops"]
    for reason in ("not_attended", "test_record", "no_lead", "no_consent", "duplicate_in_journey"):
        assert drops[reason] > 0, reason


def _plan(config, engine, start: str, end: str, tmp: Path | None = None, **kwargs) -> pipeline.Plan:
    window = RunWindow(
        start=datetime.fromisoformat(start).replace(tzinfo=config.tz),
        end=datetime.fromisoformat(end).replace(tzinfo=config.tz),
    )
    import tempfile

    run_dir = Path(tempfile.mkdtemp(dir=tmp)) if tmp else Path(tempfile.mkdtemp())
    pipeline.stage_sources(
        config, engine, window, pipeline.Timings(), pipeline.RunPaths(run_dir, run_dir / "outbox")
    )
    dry_run = kwargs.pop("dry_run", True)
    return pipeline.plan_run(config, engine, window, secret=SECRET, target="none", dry_run=dry_run, **kwargs)


def test_ledger_sent_conversion_is_left_out_of_the_next_dry_run(tmp_path: Path) -> None:
    config = make_config(DATA / "rules" / "reschedule")
    with store.engine_for(f"sqlite:///{tmp_path / 's.sqlite'}") as engine:
        first = _plan(config, engine, "2026-05-01", "2026-06-30")
        google = first.outbound["google_conversions"]
        assert len(google) == 2
        sent = google[0]["order_id"]
        assert (
            ledger.read_ledger(engine, config.clinic_id, "google_conversions") == {}
        )  # dry run wrote nothing
        ledger.write_ledger(
            engine,
            config.clinic_id,
            "google_conversions",
            [{"opaque_id": sent, "status": "accepted"}],
            run_id="r1",
            at=NOW,
        )
        second = _plan(config, engine, "2026-05-01", "2026-06-30")
    assert [r["order_id"] for r in second.outbound["google_conversions"]] == [google[1]["order_id"]]
    assert second.summary["destinations"]["google_conversions"]["already_sent"] == 1
    assert second.summary["drops"]["already_sent"] == 1
    assert len(second.outbound["meta_events"]) == 2  # the ledger is per destination


@pytest.mark.parametrize(
    ("night_one", "night_two", "windows"),
    [
        # the earlier visit's "attended" is entered 5 days late: the journey converts there now
        ([visit("A1", "booked", "05"), visit("A2", "completed", "07", "200")],
         [visit("A1", "completed", "05", "300"), visit("A2", "completed", "07", "200")],
         (("2026-11-07", "2026-11-08"), ("2026-11-10", "2026-11-11"))),
        # the sent visit is re-exported as cancelled: the journey converts at the next visit now
        ([visit("A1", "completed", "05", "300"), visit("A2", "booked", "07")],
         [visit("A1", "cancelled", "05"), visit("A2", "completed", "07", "200")],
         (("2026-11-05", "2026-11-06"), ("2026-11-07", "2026-11-08"))),
    ],
    ids=["earlier_visit_attended_late", "sent_visit_cancelled"],
)  # fmt: skip
def test_a_journey_sent_under_one_visit_is_not_sent_again_under_another(
    night_one: list[str], night_two: list[str], windows: tuple[tuple[str, str], ...], tmp_path: Path
) -> None:
    # SPEC rule 4 (one conversion per journey and stage) and rule 11 (sent once, ever): the
    # opaque ID names the converting visit, so a late export that moves the conversion to
    # another visit must not send the journey a second time (a backfill sends it once)
    config = make_config(tmp_path)
    (tmp_path / "leads.csv").write_text(ONE_LEAD, encoding="utf-8")
    (tmp_path / "appointments.csv").write_text(APPT_HEADER + "".join(night_one), encoding="utf-8")
    (first, second) = windows
    with store.engine_for(f"sqlite:///{tmp_path / 'nightly.sqlite'}") as engine:
        one = _plan(config, engine, *first, tmp_path)
        for dest, field in (("google_conversions", "order_id"), ("meta_events", "event_id")):
            assert len(one.outbound[dest]) == 1
            ledger.write_ledger(engine, config.clinic_id, dest, [{"opaque_id": one.outbound[dest][0][field],
                                "status": "accepted"}], run_id="night-one", at=NOW)  # fmt: skip
        (tmp_path / "appointments.csv").write_text(APPT_HEADER + "".join(night_two), encoding="utf-8")
        two = _plan(config, engine, *second, tmp_path)
    assert two.summary["stages"]["consultation"] == 1  # the journey still converts (at the other visit)
    for dest in ("google_conversions", "meta_events"):
        assert two.outbound[dest] == []
        assert two.summary["destinations"][dest]["already_sent"] == 1
    assert two.summary["drops"]["already_sent"] == 2
    # held back, but looked at: the plan's view of it (the sent ID its sibling) is kept for the
    # uploads to record, so an older view that left the pair out cannot count as the newest
    (sent,) = {r["order_id"] for r in one.outbound["google_conversions"]}
    assert [sibs for sibs in two.siblings.values() if sent in sibs]
    # the same exports on a fresh database: the journey is planned once per destination
    with store.engine_for(f"sqlite:///{tmp_path / 'fresh.sqlite'}") as engine:
        fresh = _plan(config, engine, first[0], second[1], tmp_path)
    assert [len(fresh.outbound[d]) for d in ("google_conversions", "meta_events")] == [1, 1]
    # a sibling the platform rejected holds nothing there: the journey's conversion goes
    with store.engine_for(f"sqlite:///{tmp_path / 'rejected.sqlite'}") as engine:
        (tmp_path / "appointments.csv").write_text(APPT_HEADER + "".join(night_one), encoding="utf-8")
        one = _plan(config, engine, *first, tmp_path)
        ledger.write_ledger(engine, config.clinic_id, "meta_events", [{"opaque_id": one.outbound["meta_events"][0]
                            ["event_id"], "status": "rejected", "code": "x"}], run_id="night-one", at=NOW)  # fmt: skip
        (tmp_path / "appointments.csv").write_text(APPT_HEADER + "".join(night_two), encoding="utf-8")
        two = _plan(config, engine, *second, tmp_path)
    assert len(two.outbound["meta_events"]) == 1 and len(two.outbound["google_conversions"]) == 1


def _lead(lid: str, created: str) -> str:
    return (f"{lid},{created} 10:00,Ann,Lee,ann.lee@gmail.com,4155550134,94103,Cj0KCQ-{lid},,,,,,yes,"
            f"{created} 10:00,,,,,\n")  # fmt: skip


@pytest.mark.parametrize(
    ("late_lead", "lookback", "night_two_planned", "backfill_planned"),
    [
        # a second lead between the visits: the late "attended" splits one journey into two, and
        # the first journey's own conversion goes (the next journey's sent visit is not its sibling)
        (_lead("L2", "2026-11-06"), 0, 1, 2),
        # a late lead 88 days before moves the window: the sent visit now lies outside it, but the
        # lead whose journey it converted is this journey's, so the journey is not sent again
        (_lead("L0", "2026-08-09"), 365, 0, 1),
    ],
    ids=["next_journey_is_not_a_sibling", "window_moved_by_a_late_earlier_lead"],
)
def test_a_journey_re_attributed_by_late_data_is_sent_once_as_a_backfill_would(
    late_lead: str, lookback: int, night_two_planned: int, backfill_planned: int, tmp_path: Path
) -> None:
    config = make_config(tmp_path, rules__existing_patient_lookback_days=lookback)
    (tmp_path / "leads.csv").write_text(ONE_LEAD, encoding="utf-8")
    (tmp_path / "appointments.csv").write_text(
        APPT_HEADER + visit("A1", "booked", "05") + visit("A2", "completed", "07", "200"), encoding="utf-8"
    )
    with store.engine_for(f"sqlite:///{tmp_path / 'nightly.sqlite'}") as engine:
        one = _plan(config, engine, "2026-11-07", "2026-11-08", tmp_path)
        for dest, field in (("google_conversions", "order_id"), ("meta_events", "event_id")):
            ledger.write_ledger(engine, config.clinic_id, dest, [{"opaque_id": one.outbound[dest][0][field],
                                "status": "accepted"}], run_id="night-one", at=NOW)  # fmt: skip
        (tmp_path / "leads.csv").write_text(ONE_LEAD + late_lead, encoding="utf-8")
        (tmp_path / "appointments.csv").write_text(
            APPT_HEADER + visit("A1", "completed", "05", "300") + visit("A2", "completed", "07", "200"),
            encoding="utf-8",
        )
        two = _plan(config, engine, "2026-11-10", "2026-11-11", tmp_path)
    with store.engine_for(f"sqlite:///{tmp_path / 'fresh.sqlite'}") as engine:
        fresh = _plan(config, engine, "2026-11-01", "2026-11-11", tmp_path)
    for dest in ("google_conversions", "meta_events"):
        assert len(two.outbound[dest]) == night_two_planned
        assert len(fresh.outbound[dest]) == backfill_planned
        # what the nights sent in all equals what one backfill sends
        field = "order_id" if dest == "google_conversions" else "event_id"
        nightly = {r[field] for r in one.outbound[dest] + two.outbound[dest]}
        assert len(nightly) == backfill_planned


@pytest.mark.parametrize("status", ["planned", "deferred"])
def test_unfinished_ledger_states_are_sent_again(status: str, tmp_path: Path) -> None:
    config = make_config(DATA / "rules" / "reschedule")
    with store.engine_for(f"sqlite:///{tmp_path / 's.sqlite'}") as engine:
        first = _plan(config, engine, "2026-05-01", "2026-06-30")
        oid = first.outbound["meta_events"][0]["event_id"]
        ledger.write_ledger(
            engine,
            config.clinic_id,
            "meta_events",
            [{"opaque_id": oid, "status": status}],
            run_id="r1",
            at=NOW,
        )
        second = _plan(config, engine, "2026-05-01", "2026-06-30")
    assert len(second.outbound["meta_events"]) == 2


def test_suppression_mirror_adds_then_removes(tmp_path: Path) -> None:
    config = make_config(DATA / "rules" / "reexport_downgrade")
    with store.engine_for(f"sqlite:///{tmp_path / 's.sqlite'}") as engine:
        first = _plan(config, engine, "2026-05-01", "2026-06-30")
        for dest, delta in first.audiences.items():
            assert len(delta.adds) == 1 and not delta.removes
            ledger.apply_audience_delta(
                engine,
                config.clinic_id,
                dest,
                at=NOW,
                removed=[],
                added={k: json.dumps(v) for k, v in delta.adds.items()},
            )
        unchanged = _plan(config, engine, "2026-05-01", "2026-06-30")
        assert all(not d.adds and not d.removes for d in unchanged.audiences.values())
        resync = _plan(config, engine, "2026-05-01", "2026-06-30", full_resync=True)
        assert all(len(d.adds) == 1 for d in resync.audiences.values())
        # the visit is re-exported as cancelled: the person is no longer a patient to suppress
        downgraded = config.model_copy(
            update={
                "sources": config.sources.model_copy(
                    update={
                        "appointments": config.sources.appointments.model_copy(
                            update={"path": Path("appointments_reexport.csv")}
                        )
                    }
                )
            }
        )
        after = _plan(downgraded, engine, "2026-05-01", "2026-06-30")
    assert {d: len(x.removes) for d, x in after.audiences.items()} == {
        "google_customer_match": 1,
        "meta_audience": 1,
    }
    removal = after.outbound["google_customer_match"]
    assert [r["operation"] for r in removal] == ["remove"]
    assert removal[0]["user_identifiers"] == first.outbound["google_customer_match"][0]["user_identifiers"]
    assert [r["operation"] for r in after.outbound["meta_audience"]] == ["remove"]


def test_suppression_lists_respect_the_clinic_switches(tmp_path: Path) -> None:
    config = make_config(DATA / "rules" / "existing_patient", google_ads__suppression_enabled=False)
    run = run_dry(config, "2026-05-01", "2026-06-30", tmp_path)
    assert run.rows["google_customer_match"] == []
    assert len(run.rows["meta_audience"]) == 1


def test_a_list_switched_on_without_its_id_is_skipped_out_loud(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # it was passed over in silence: members 0, adds 0, night after night
    config = make_config(DATA / "rules" / "existing_patient", meta__suppression_audience_id=None)
    with caplog.at_level("WARNING", logger="etl.pipeline"):
        run = run_dry(config, "2026-05-01", "2026-06-30", tmp_path)
    assert run.rows["meta_audience"] == [] and len(run.rows["google_customer_match"]) == 1
    assert run.summary["destinations"]["meta_audience"]["skipped_no_list"] == 1
    assert "skipped_no_list" not in run.summary["destinations"]["google_customer_match"]
    assert "meta_audience: suppression is on but meta.suppression_audience_id is not set" in caplog.text
    switched_off = make_config(DATA / "rules" / "existing_patient", meta__suppression_audience_id=None,
                               meta__suppression_enabled=False)  # fmt: skip
    off = run_dry(switched_off, "2026-05-01", "2026-06-30", tmp_path / "off")
    assert "skipped_no_list" not in off.summary["destinations"]["meta_audience"]


def test_failed_gate_writes_no_outbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from etl import payloads
    from etl.errors import GateViolation

    real = payloads.meta_event_rows

    def leaky(conv, config):
        rows = real(conv, config)
        rows[0]["custom_data"] = {**rows[0].get("custom_data", {}), "content_name": "Botox"}
        return rows

    monkeypatch.setattr(payloads, "meta_event_rows", leaky)
    config = make_config(DATA / "rules" / "reschedule")
    with pytest.raises(GateViolation):
        run_dry(config, "2026-05-01", "2026-06-30", tmp_path)
    assert not (tmp_path / "outbox").exists()


def test_the_planned_counts_are_members_for_both_lists(synthetic: Path, tmp_path: Path) -> None:
    # the Meta audience file holds batches of members; a count of its lines read "1"
    from etl import tasks
    from etl.config import load_config

    config = load_config(synthetic / "clinic.yaml")
    spec = tasks.spec_for(config, datetime(2026, 9, 1, tzinfo=config.tz), datetime(2026, 11, 23, tzinfo=config.tz),
                          database=f"sqlite:///{tmp_path / 's.sqlite'}", outbox=tmp_path / "outbox")  # fmt: skip
    tasks.extract(spec)
    tasks.stage(spec)
    planned = tasks.build_conversions(spec, secret=SECRET, dry_run=True, target="none")["planned"]
    assert planned["meta_audience"] == planned["google_customer_match"] > 1
    # each list's member count is its own (Meta needs an email or a phone): on a first sync,
    # everyone a list holds is an add
    summary = json.loads((spec.paths.pending / "summary.json").read_text(encoding="utf-8"))
    for dest in ("google_customer_match", "meta_audience"):
        assert (
            summary["destinations"][dest]["members"] == summary["destinations"][dest]["adds"] == planned[dest]
        )


def test_a_refused_extract_leaves_no_half_of_an_earlier_attempts_files(tmp_path: Path) -> None:
    # attempt 1 extracted both exports; attempt 2's leads export is refused half-way: its stage
    # step (cleared on its own in Airflow) must not stage attempt 2's appointments beside
    # attempt 1's leads
    import shutil

    from etl import tasks
    from etl.errors import InputError, NotPlanned

    clinic = tmp_path / "clinic"
    shutil.copytree(DATA / "rules" / "reschedule", clinic)
    config = make_config(clinic)
    spec = tasks.spec_for(config, datetime(2026, 5, 1, tzinfo=config.tz), datetime(2026, 6, 30, tzinfo=config.tz),
                          database=f"sqlite:///{tmp_path / 's.sqlite'}", outbox=tmp_path / "outbox")  # fmt: skip
    tasks.extract(spec)
    assert (spec.paths.extracts / "leads.parquet").exists()
    (clinic / "leads.csv").write_text("lead_id,created_at\nL1,not a date\n", encoding="utf-8")
    with pytest.raises(InputError):
        tasks.extract(spec)
    assert not (spec.paths.extracts / "leads.parquet").exists()
    with pytest.raises(NotPlanned, match="needs the extract step's files"):
        tasks.stage(spec)


BOB = ("B1,P2,Bob,Ray,bob.ray@corp.test,4155550199,94110,San Francisco,CA,US,Peel,completed,"
       "2026-11-04 10:00,120,USD,L1,2026-11-04 12:00,yes,2026-11-01 10:00,\n")  # fmt: skip


def _members(run: CaseRun) -> int:
    return int(run.summary["destinations"]["google_customer_match"]["members"])


@pytest.mark.parametrize("complete", [True, False])
def test_a_complete_export_deletes_the_records_it_no_longer_holds(complete: bool, tmp_path: Path) -> None:
    # SPEC rule 12: a person deleted at the source leaves the lists. Only an export declared
    # complete says so: an incremental one that lacks Bob says nothing about him
    complete_export_case(tmp_path, f"sqlite:///{tmp_path / 'stage.sqlite'}", complete=complete)


def complete_export_case(tmp_path: Path, url: str, *, complete: bool) -> None:
    """Bob's visit is in the first export and not in the second (tests/test_postgres.py too)."""
    (tmp_path / "leads.csv").write_text(ONE_LEAD, encoding="utf-8")
    (tmp_path / "appointments.csv").write_text(APPT_HEADER + visit("A1", "completed", "05", "450") + BOB)
    config = make_config(tmp_path, sources__appointments__complete=complete,
                         sources__appointments__max_deleted_share=1.0)  # fmt: skip
    assert _members(run_dry(config, "2026-11-01", "2026-11-23", tmp_path / "1", db_url=url)) == 2
    (tmp_path / "appointments.csv").write_text(APPT_HEADER + visit("A1", "completed", "05", "450"))
    after = run_dry(config, "2026-11-02", "2026-11-24", tmp_path / "2", db_url=url)
    assert _members(after) == (1 if complete else 2)
    with store.engine_for(url) as engine, engine.connect() as conn:
        staged = conn.execute(sa.select(store.appointments.c.appointment_id)).scalars().all()
    assert sorted(staged) == (["A1"] if complete else ["A1", "B1"])


def test_a_complete_export_that_would_delete_too_much_is_refused_whole(tmp_path: Path) -> None:
    # a truncated file declared complete would otherwise take most patients off the lists
    from etl.errors import InputError

    (tmp_path / "leads.csv").write_text(ONE_LEAD, encoding="utf-8")
    (tmp_path / "appointments.csv").write_text(APPT_HEADER + visit("A1", "completed", "05", "450") + BOB)
    config = make_config(tmp_path, sources__appointments__complete=True)
    url = f"sqlite:///{tmp_path / 'stage.sqlite'}"
    run_dry(config, "2026-11-01", "2026-11-23", tmp_path / "1", db_url=url)
    (tmp_path / "appointments.csv").write_text(APPT_HEADER + visit("A1", "completed", "06", "500"))
    with pytest.raises(InputError) as info:
        run_dry(config, "2026-11-02", "2026-11-24", tmp_path / "2", db_url=url)
    (problem,) = info.value.problems
    assert problem.file == "appointments.csv"
    assert "would delete 1 of the 2 staged appointments (more than max_deleted_share 0.2)" in problem.reason
    with store.engine_for(url) as engine, engine.connect() as conn:  # nothing of the load kept
        rows = conn.execute(
            sa.select(store.appointments.c.appointment_id, store.appointments.c.revenue)
        ).all()
    assert sorted(rows) == [("A1", 450.0), ("B1", 120.0)]


def _staged_ann_and_bob(tmp_path: Path) -> tuple[str, ClinicConfig]:
    """A complete appointments source (any share may go), staged with Ann's visit and Bob's."""
    (tmp_path / "leads.csv").write_text(ONE_LEAD, encoding="utf-8")
    (tmp_path / "appointments.csv").write_text(APPT_HEADER + visit("A1", "completed", "03", "450") + BOB)
    config = make_config(tmp_path, sources__appointments__complete=True,
                         sources__appointments__max_deleted_share=1.0)  # fmt: skip
    url = f"sqlite:///{tmp_path / 'stage.sqlite'}"
    run_dry(config, "2026-11-01", "2026-11-23", tmp_path / "first", db_url=url)
    return url, config


def test_a_complete_export_older_than_a_staged_record_spares_it(tmp_path: Path) -> None:
    # night 1's stage step retried after night 2 staged Bob's newer visit: night 1's export
    # was taken before that visit existed, so its absence deletes nothing
    url, config = _staged_ann_and_bob(tmp_path)
    (tmp_path / "appointments.csv").write_text(APPT_HEADER + visit("A1", "completed", "03", "450"))
    assert _members(run_dry(config, "2026-11-01", "2026-11-23", tmp_path / "1", db_url=url)) == 2
    with store.engine_for(url) as engine, engine.connect() as conn:
        staged = conn.execute(sa.select(store.appointments.c.appointment_id)).scalars().all()
    assert sorted(staged) == ["A1", "B1"]


def test_a_complete_export_may_not_delete_every_staged_record(tmp_path: Path) -> None:
    from etl.errors import InputError

    url, config = _staged_ann_and_bob(tmp_path)
    (tmp_path / "appointments.csv").write_text(APPT_HEADER + visit("C1", "completed", "10", "90"))
    with pytest.raises(InputError, match=r"would delete 2 of the 2 staged appointments \(every one\)"):
        run_dry(config, "2026-11-01", "2026-11-23", tmp_path / "2", db_url=url)
