"""SPEC section 4, one named case each, end to end through staging on committed CSV fixtures.

Each case folder under tests/data/rules/ holds a leads.csv and an appointments.csv of a few rows;
the default window is [2026-05-01, 2026-06-30) in America/Los_Angeles.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.conftest import DATA, SECRET, CaseRun, make_config, run_dry

CASES = DATA / "rules"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def case(
    name: str, tmp_path: Path, start: str = "2026-05-01", end: str = "2026-06-30", **overrides
) -> CaseRun:
    return run_dry(make_config(CASES / name, **overrides), start, end, tmp_path)


def stages(run: CaseRun) -> dict[str, int]:
    return run.summary["stages"]


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("cancellation", "not_attended"),
        ("late_cancel_fee", "not_attended"),
        ("no_show", "not_attended"),
    ],
)
def test_only_attended_visits_convert(name: str, reason: str, tmp_path: Path) -> None:
    run = case(name, tmp_path)
    assert run.drops == {reason: 1}
    assert stages(run) == {"consultation": 0, "purchase": 0}
    assert run.rows["google_conversions"] == [] and run.rows["meta_events"] == []


def test_late_cancel_fee_is_not_revenue(tmp_path: Path) -> None:
    run = case("late_cancel_fee", tmp_path)
    assert not [r for r in run.rows["meta_events"] if r["event_name"] == "Purchase"]


def test_reschedule_converts_at_the_attended_visit(tmp_path: Path) -> None:
    run = case("reschedule", tmp_path)
    assert run.drops == {"not_attended": 1}
    assert stages(run) == {"consultation": 1, "purchase": 1}
    purchase = next(r for r in run.rows["google_conversions"] if r["conversion_action"].endswith("/222"))
    assert purchase["conversion_value"] == 1200.0
    assert purchase["conversion_date_time"] == "2026-05-12 10:00:00-07:00"


def test_refund_reduces_the_purchase_value(tmp_path: Path) -> None:
    run = case("refund", tmp_path)
    purchase = next(r for r in run.rows["meta_events"] if r["event_name"] == "Purchase")
    assert purchase["custom_data"] == {"value": 800.0, "currency": "USD"}
    assert run.drops == {"duplicate_in_journey": 1}


def test_purchase_value_sums_only_the_conversions_own_currency(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # 1000 USD, then 300 EUR at another location, then 200 in the clinic's default (USD): the
    # value goes with one currency code, so the EUR visit is not added to it
    with caplog.at_level(logging.WARNING, logger="etl.rules.stages"):
        run = case("mixed_currency", tmp_path)
    purchase = next(r for r in run.rows["meta_events"] if r["event_name"] == "Purchase")
    assert purchase["custom_data"] == {"value": 1200.0, "currency": "USD"}
    google = next(r for r in run.rows["google_conversions"] if r["conversion_action"].endswith("/222"))
    assert (google["conversion_value"], google["currency_code"]) == (1200.0, "USD")
    assert "1 attended visits in another currency" in caplog.text


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [("Booked", "Completed", 1), ("Completed", "Cancelled", 0)],
    ids=["reexport_upgrade", "reexport_downgrade"],
)
def test_reexport_latest_wins(first: str, second: str, expected: int, tmp_path: Path) -> None:
    name = "reexport_upgrade" if expected else "reexport_downgrade"
    config = make_config(CASES / name)
    db = f"sqlite:///{tmp_path / 'stage.sqlite'}"
    before = run_dry(config, "2026-05-01", "2026-06-30", tmp_path / "a", db_url=db)
    after = run_dry(
        config,
        "2026-05-01",
        "2026-06-30",
        tmp_path / "b",
        db_url=db,
        appointments="appointments_reexport.csv",
    )
    assert stages(before)["consultation"] == 1 - expected
    assert stages(after) == {"consultation": expected, "purchase": expected}
    assert after.drops == ({} if expected else {"not_attended": 1})
    # an older export loaded again afterwards does not undo the newer status
    again = run_dry(config, "2026-05-01", "2026-06-30", tmp_path / "c", db_url=db)
    assert stages(again) == stages(after)


def test_gmail_dot_and_plus_variants_link(tmp_path: Path) -> None:
    run = case("gmail_variants", tmp_path)
    assert stages(run) == {"consultation": 1, "purchase": 1}
    google = run.rows["google_conversions"][0]
    assert {"hashed_email": sha("janedoe@gmail.com")} in google["user_identifiers"]
    meta = run.rows["meta_events"][0]
    # Meta keeps dots and plus tags: both spellings go as separate hashes
    assert set(meta["user_data"]["em"]) == {
        sha("janedoe@gmail.com"),
        sha("jane.doe+spring@gmail.com"),
    }


def test_phone_formats_link_and_hash_per_platform(tmp_path: Path) -> None:
    run = case("phone_formats", tmp_path)
    assert stages(run)["consultation"] == 1
    google = run.rows["google_conversions"][0]
    assert google["user_identifiers"] == [{"hashed_phone_number": sha("+14155550123")}]
    assert run.rows["meta_events"][0]["user_data"]["ph"] == [sha("14155550123")]


def test_persons_linked_only_by_phone(tmp_path: Path) -> None:
    run = case("linked_by_phone_only", tmp_path)
    assert stages(run) == {"consultation": 1, "purchase": 1}


def test_existing_patient_is_not_a_new_client(tmp_path: Path) -> None:
    run = case("existing_patient", tmp_path)
    assert run.drops == {"existing_patient": 2}
    assert run.rows["google_conversions"] == []
    # still an existing patient to suppress
    assert [r["operation"] for r in run.rows["google_customer_match"]] == ["create"]


def test_walk_in_has_no_lead(tmp_path: Path) -> None:
    run = case("walk_in", tmp_path)
    assert run.drops == {"no_lead": 1}
    assert stages(run) == {"consultation": 0, "purchase": 0}


@pytest.mark.parametrize(
    ("name", "reason", "member"),
    [
        ("consent_missing", "no_consent", False),
        ("consent_revoked", "consent_revoked", False),
        ("consent_after_event", "no_consent", True),
    ],
)
def test_consent(name: str, reason: str, member: bool, tmp_path: Path) -> None:
    run = case(name, tmp_path)
    assert run.drops == {reason: 2}
    assert run.rows["google_conversions"] == [] and run.rows["meta_events"] == []
    # suppression needs consent at the run's end: granted after the visit still counts there
    assert len(run.rows["google_customer_match"]) == int(member)
    assert len(run.rows["meta_audience"]) == int(member)


@pytest.mark.parametrize(("name", "member"), [("consent_missing", True), ("consent_revoked", False)])
def test_without_the_consent_requirement_lists_still_leave_out_who_revoked(
    name: str, member: bool, tmp_path: Path
) -> None:
    # suppression_requires_consent: false lists people with no authorization event; a
    # revocation still takes a person off (rule 6), whatever the setting
    run = case(name, tmp_path, rules__suppression_requires_consent=False)
    assert len(run.rows["google_customer_match"]) == len(run.rows["meta_audience"]) == int(member)


def test_a_revocation_taken_at_the_intake_of_a_booked_visit_is_in_force(tmp_path: Path) -> None:
    # A2 is booked for 2026-07-15, after the run's end, and linked only by patient ID; the
    # revocation it carries was recorded on 2026-06-20, before the end
    run = case("consent_revoked_at_a_booked_visit", tmp_path)
    assert run.drops == {"consent_revoked": 2}
    assert all(not rows for rows in run.rows.values())
    # a run whose end is before the revocation (a backfill) uploads after it: a revoked person is
    # never uploaded again (rule 6), so nothing goes and the list does not take her either; the
    # consent was granted at that end, so it is the revocation on record that drops her
    earlier = case("consent_revoked_at_a_booked_visit", tmp_path / "earlier", end="2026-06-15")
    assert earlier.drops == {"consent_revoked": 2} and stages(earlier) == {"consultation": 0, "purchase": 0}
    assert all(not rows for rows in earlier.rows.values())
    # a grant after the revocation restores her, for that backfill too
    name = "consent_revoked_at_a_booked_visit"
    regranted = tmp_path / "regranted.csv"
    regranted.write_text((CASES / name / "appointments.csv").read_text()
                         + "A3,P1,,,,,,,,,Peel,Booked,2026-08-01 10:00,0,USD,L1,2026-07-01 09:00,yes,2026-07-01 09:00,\n")  # fmt: skip
    restored = run_dry(make_config(CASES / name), "2026-05-01", "2026-06-15", tmp_path / "restored",
                       appointments=str(regranted))  # fmt: skip
    assert restored.drops == {} and stages(restored) == {"consultation": 1, "purchase": 1}
    assert len(restored.rows["google_conversions"]) == 2 and len(restored.rows["google_customer_match"]) == 1


def test_a_revocation_dated_after_the_upload_is_not_in_force_yet(tmp_path: Path) -> None:
    # an authorization's expiry entered ahead (or a typo'd year): a revocation dated after the
    # upload is not in force yet, and the runs before it keep sending and listing
    name = "consent_revoked_at_a_booked_visit"
    ahead = tmp_path / "ahead.csv"
    rows = (CASES / name / "appointments.csv").read_text()
    assert rows.endswith(",2026-06-20 12:00\n")
    ahead.write_text(rows[: -len("2026-06-20 12:00\n")] + "2099-01-01 00:00\n")
    run = run_dry(
        make_config(CASES / name), "2026-05-01", "2026-06-30", tmp_path / "run", appointments=str(ahead)
    )
    assert run.drops == {} and stages(run) == {"consultation": 1, "purchase": 1}
    assert len(run.rows["google_customer_match"]) == 1


def test_test_records_are_dropped(tmp_path: Path) -> None:
    run = case("test_records", tmp_path)
    assert run.drops == {"test_record": 4}
    assert all(not rows for rows in run.rows.values())


def test_event_in_the_spring_forward_gap_shifts_forward(tmp_path: Path) -> None:
    run = case("dst_spring_forward", tmp_path, start="2026-03-01", end="2026-04-15")
    google = run.rows["google_conversions"][0]
    assert google["conversion_date_time"] == "2026-03-08 03:30:00-07:00"
    assert run.rows["meta_events"][0]["event_time"] == int(
        datetime(2026, 3, 8, 10, 30, tzinfo=UTC).timestamp()
    )


def test_ambiguous_fall_back_time_takes_the_first_occurrence(tmp_path: Path) -> None:
    run = case("dst_fall_back", tmp_path, start="2025-11-01", end="2025-12-15")
    google = run.rows["google_conversions"][0]
    assert google["conversion_date_time"] == "2025-11-02 01:30:00-07:00"
    assert run.rows["meta_events"][0]["event_time"] == int(
        datetime(2025, 11, 2, 8, 30, tzinfo=UTC).timestamp()
    )


def test_lead_created_after_the_visit_does_not_convert(tmp_path: Path) -> None:
    run = case("lead_after_event", tmp_path)
    assert run.drops == {"outside_window": 1}
    assert stages(run) == {"consultation": 0, "purchase": 0}


def test_too_old_per_platform(tmp_path: Path) -> None:
    run = case("too_old", tmp_path, start="2026-03-01", end="2026-06-25")
    assert run.drops == {"too_old_for_google": 2, "too_old_for_meta": 2}
    google_times = {r["conversion_date_time"][:10] for r in run.rows["google_conversions"]}
    meta_times = {
        datetime.fromtimestamp(r["event_time"], UTC).date().isoformat() for r in run.rows["meta_events"]
    }
    assert google_times == {"2026-04-20"}  # click 85 days old, event 66 days: Google yes, Meta no
    assert meta_times == {"2026-05-01"}  # click 144 days old, event 55 days: Meta yes, Google no


def test_purchase_value_window_edges(tmp_path: Path) -> None:
    run = case("value_window_edges", tmp_path)
    purchase = next(r for r in run.rows["google_conversions"] if r["conversion_action"].endswith("/222"))
    assert purchase["conversion_value"] == 120.0  # 100 + 20 at 09:59; the visit at exactly +30 days is out


def test_purchase_waits_for_its_value_window(tmp_path: Path) -> None:
    run = case("value_window_edges", tmp_path, end="2026-06-01")
    assert stages(run) == {"consultation": 1, "purchase": 0}


def test_consultation_value_from_config(tmp_path: Path) -> None:
    run = case("reschedule", tmp_path, rules__consultation_value=75)
    consult = next(r for r in run.rows["meta_events"] if r["event_name"] == "ConsultationAttended")
    assert consult["custom_data"] == {"value": 75.0, "currency": "USD"}
    unvalued = case("reschedule", tmp_path / "b")
    assert "custom_data" not in next(r for r in unvalued.rows["meta_events"] if r["event_name"] != "Purchase")


def test_click_id_choice(tmp_path: Path) -> None:
    run = case("click_ids", tmp_path)
    google = run.rows["google_conversions"][0]
    assert (
        google["gclid"] == "Cj0-first_testclickid0000" and "gbraid" not in google and "wbraid" not in google
    )
    user = run.rows["meta_events"][0]["user_data"]
    assert user["fbc"] == "fb.1.1777100000000.IwAR-second_testclickid0000"
    assert user["fbp"] == "fb.1.1777100000000.123456789"


def test_fbc_built_from_fbclid(tmp_path: Path) -> None:
    run = case("fbclid_only", tmp_path)
    created_ms = int(datetime(2026, 5, 1, 16, 0, tzinfo=UTC).timestamp() * 1000)
    assert run.rows["meta_events"][0]["user_data"]["fbc"] == f"fb.1.{created_ms}.IwAR-only_testclickid0000"
    assert "gclid" not in run.rows["google_conversions"][0]


def test_the_longest_fbclid_extract_keeps_builds_an_fbc_the_gate_takes(tmp_path: Path) -> None:
    # extract keeps an fbclid of up to 512 characters: the fbc built from it must pass the gate
    from etl.identifiers import CLICK_ID, FBC

    fbclid = "IwAR" + "x" * 508
    assert CLICK_ID.fullmatch(fbclid) and FBC.fullmatch(f"fb.1.1777100000000.{fbclid}")


def test_a_click_id_column_holding_no_click_id_sends_none(tmp_path: Path) -> None:
    # a name, a patient number and phone digits filed in click-ID columns: they leave in clear,
    # so they are left out at extract, and the conversion goes by its hashed identifiers alone
    run = case("misfiled_click_ids", tmp_path)
    (google,) = [r for r in run.rows["google_conversions"] if r["conversion_action"].endswith("/111")]
    assert not {"gclid", "gbraid", "wbraid"} & set(google) and google["user_identifiers"]
    (meta,) = [r for r in run.rows["meta_events"] if r["event_name"] == "ConsultationAttended"]
    assert "fbc" not in meta["user_data"] and meta["user_data"]["em"]
    sent = "".join(path.read_text() for path in run.outbox.glob("*.jsonl"))
    assert "jane.doe134" not in sent and "000261" not in sent and "4155550123" not in sent


def test_a_conversion_no_configured_destination_can_take_has_no_identifiers(tmp_path: Path) -> None:
    # email, phone and an fbclid, but Google takes identifiers only for enhanced conversions for
    # leads and there is no Meta section: nothing can carry it, so it is counted, not lost
    run = case("fbclid_only", tmp_path, meta=None, google_ads__enhanced_conversions_for_leads=False)
    assert run.drops == {"no_identifiers": 2}
    assert stages(run) == {"consultation": 0, "purchase": 0}
    assert run.rows["google_conversions"] == []
    # the same visit with Meta configured is a conversion
    sent = case("fbclid_only", tmp_path / "meta", google_ads__enhanced_conversions_for_leads=False)
    assert stages(sent) == {"consultation": 1, "purchase": 1} and len(sent.rows["meta_events"]) == 2


def test_journey_groups_leads_and_dedupes_visits(tmp_path: Path) -> None:
    run = case("journeys", tmp_path, start="2026-01-15", end="2026-03-01")
    assert stages(run) == {"consultation": 1, "purchase": 1}
    assert run.drops == {"duplicate_in_journey": 1}
    purchase = next(r for r in run.rows["google_conversions"] if r["conversion_action"].endswith("/222"))
    assert purchase["conversion_value"] == 350.0


def test_a_lead_after_a_conversion_starts_a_journey_of_its_own() -> None:
    import numpy as np
    import pandas as pd

    from etl.rules.journeys import CONVERSION, build_journeys

    def at(*days: str) -> pd.DataFrame:
        return pd.DataFrame({"start_at": pd.to_datetime(list(days), utc=True)})

    appts = at("2026-05-05", "2026-05-20")
    leads = at("2026-05-01", "2026-05-10").rename(columns={"start_at": "created_at"})
    for lookback, existing in ((365, [False, True]), (0, [False, False])):
        journeys = build_journeys(
            appts, np.zeros(2, dtype=np.int64), np.ones(2, dtype=bool), leads, np.zeros(2, dtype=np.int64),
            np.ones(2, dtype=bool), attribution_window_days=90, existing_patient_lookback_days=lookback,
        )  # fmt: skip
        assert journeys.appt_class.tolist() == [CONVERSION, CONVERSION]
        assert journeys.frame["conv_appt"].tolist() == [0, 1] and journeys.lead_journey.tolist() == [0, 1]
        assert journeys.frame["existing"].tolist() == existing


def test_second_journey_of_a_patient_is_existing(tmp_path: Path) -> None:
    run = case("journeys", tmp_path)
    assert run.drops == {"existing_patient": 2}


def test_opaque_ids_are_keyed_hashes(tmp_path: Path) -> None:
    import hmac

    run = case("reschedule", tmp_path)
    ids = {r["order_id"] for r in run.rows["google_conversions"]}
    expected = {
        hmac.new(SECRET, f"sunrise-medspa\x1f{stage}\x1fA2".encode(), hashlib.sha256).hexdigest()
        for stage in ("consultation", "purchase")
    }
    assert ids == expected
    assert ids == {r["event_id"] for r in run.rows["meta_events"]}


def test_a_patient_from_abroad_is_a_list_member_with_the_national_postal_code(tmp_path: Path) -> None:
    run = case("member_from_abroad", tmp_path)
    (member,) = run.rows["google_customer_match"]
    address = next(i["address_info"] for i in member["user_identifiers"] if "address_info" in i)
    assert (address["postal_code"], address["country_code"]) == ("M1 1AE", "GB")
    assert len(run.rows["meta_audience"]) == 1


def test_a_members_address_comes_from_one_row(tmp_path: Path) -> None:
    # a newer lead has no postal code and no country column (the clinic's region, US): its
    # country must not be paired with the visit's British postal code
    run = case("member_from_abroad_newer_lead", tmp_path)
    (member,) = run.rows["google_customer_match"]
    address = next(i["address_info"] for i in member["user_identifiers"] if "address_info" in i)
    assert (address["postal_code"], address["country_code"]) == ("M1 1AE", "GB")
    (row,) = run.rows["meta_audience"][0]["data"]
    assert sha("m11ae") in row and sha("gb") in row and sha("us") not in row


def test_each_list_counts_its_own_members(tmp_path: Path) -> None:
    # Ann has only a name and an address: Google can match that, Meta needs an email or a phone
    run = case("member_without_email_or_phone", tmp_path)
    google, meta = (run.summary["destinations"][d] for d in ("google_customer_match", "meta_audience"))
    assert (google["members"], google["adds"]) == (2, 2)
    assert (meta["members"], meta["adds"]) == (1, 1)
