"""Whole-interval behaviour: determinism, the ledger, the suppression mirror, staging backends."""

from __future__ import annotations

import filecmp
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from etl import ledger, pipeline, store
from etl.outbox import OUTBOX_FILES
from etl.rules.stages import RunWindow
from tests.conftest import DATA, SECRET, make_config, run_dry

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
    return pipeline.plan_run(config, engine, window, secret=SECRET, target="none", dry_run=True, **kwargs)


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
