"""The synthetic clinic: deterministic, SPEC section 3 shaped, and every SPEC section 4 edge case in it.

One small run (2,000 appointments, 800 leads) is read back with pandas (every cell as text) and
searched for each edge case the generator promises; the big benchmark size is timed ad hoc, not here.
"""

from __future__ import annotations

import csv
import io
import re
from datetime import date, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
import phonenumbers
import pytest
import yaml

from etl.config import load_config
from etl.synth import (
    _FIRST,
    _TEST_FIRST,
    APPOINTMENT_COLUMNS,
    LEAD_COLUMNS,
    TIMEZONE,
    SynthResult,
    _Clock,
    _epoch,
    write_synthetic_clinic,
)

END = date(2026, 11, 23)
DST_DAYS = ("2025-11-02", "2026-03-08", "2026-11-01")
ISSUE_2_EXAMPLE = {
    "clinic_id": "sunrise-medspa",
    "timezone": "America/Los_Angeles",
    "currency": "USD",
    "default_region": "US",
    "sources": {
        "appointments": {"path": "exports/appointments.csv", "profile": "generic"},
        "leads": {"path": "exports/leads.csv", "profile": "generic"},
    },
    "rules": {
        "attribution_window_days": 90,
        "value_window_days": 30,
        "existing_patient_lookback_days": 365,
        "late_arrival_days": 7,
        "suppression_lookback_days": 365,
        "suppression_requires_consent": True,
        "consultation_value": None,
    },
    "exclude": {"email_domains": ["example.com", "test.com"], "name_patterns": ["^test$", "^do not use$"]},
    "google_ads": {
        "customer_id": "1234567890",
        "conversion_actions": {
            "consultation": "customers/1234567890/conversionActions/111",
            "purchase": "customers/1234567890/conversionActions/222",
        },
        "suppression_user_list": "customers/1234567890/userLists/333",
        "enhanced_conversions_for_leads": True,
        "click_window_days": 90,
    },
    "meta": {
        "pixel_id": "123456789012345",
        "suppression_audience_id": "23850000000000000",
        "event_names": {"consultation": "ConsultationAttended", "purchase": "Purchase"},
        "action_source": "physical_store",
        "max_event_age_days": 62,
    },
}
GENERIC_STATUSES = {
    "completed", "checked out", "checked-out", "attended", "arrived", "closed", "cancelled",
    "canceled", "late cancel", "late cancellation", "no show", "no-show", "noshow", "missed",
    "rescheduled", "booked", "confirmed", "scheduled", "pending",
}  # fmt: skip
ATTENDED = {"completed", "checked out", "checked-out", "attended", "arrived", "closed"}
SCHEDULED = {"booked", "confirmed", "scheduled", "pending"}
CANCELLED = {"cancelled", "canceled"}
TRUTHY = {"true", "yes", "y", "1"}


@pytest.fixture(scope="module")
def clinic(tmp_path_factory: pytest.TempPathFactory) -> SynthResult:
    return write_synthetic_clinic(tmp_path_factory.mktemp("clinic"), appointments=2000, leads=800, seed=7)


@pytest.fixture(scope="module")
def appts(clinic: SynthResult) -> pd.DataFrame:
    frame = pd.read_csv(clinic.appointments_path, dtype=str, keep_default_na=False)
    frame["local_start"] = _local(frame.start_at)
    frame["status_lc"] = frame.status.str.lower()
    frame["em"] = frame.email.map(_google_email)
    frame["ph"] = frame.phone.map(_e164)
    return frame


@pytest.fixture(scope="module")
def leads(clinic: SynthResult) -> pd.DataFrame:
    frame = pd.read_csv(clinic.leads_path, dtype=str, keep_default_na=False)
    frame["local_created"] = _local(frame.created_at)
    frame["em"] = frame.email.map(_google_email)
    frame["ph"] = frame.phone.map(_e164)
    return frame


def _local(values: pd.Series) -> pd.Series:
    """Clinic-local naive times of ISO 8601 text with or without an offset (blank -> NaT)."""
    out = pd.Series(pd.NaT, index=values.index, dtype="datetime64[ns]")
    aware = values.str.contains(r"(?:Z|[+-]\d\d:\d\d)$")
    naive = ~aware & (values != "")
    out[naive] = pd.to_datetime(values[naive], format="ISO8601")
    utc = pd.to_datetime(values[aware], format="ISO8601", utc=True)
    out[aware] = utc.dt.tz_convert(TIMEZONE).dt.tz_localize(None)
    return out


def _google_email(raw: str) -> str:
    email = raw.strip().lower()
    local, _, domain = email.partition("@")
    if domain in ("gmail.com", "googlemail.com"):
        local = local.split("+", 1)[0].replace(".", "")
    return f"{local}@{domain}" if domain else ""


def _e164(raw: str) -> str:
    try:
        number = phonenumbers.parse(raw, "US")
    except phonenumbers.NumberParseException:
        return ""
    if not phonenumbers.is_valid_number(number):
        return ""
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _records(path: Path) -> list[list[str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


# files, determinism, configuration


def test_same_arguments_give_byte_identical_files(tmp_path: Path) -> None:
    runs = [write_synthetic_clinic(tmp_path / name, appointments=600, leads=250, seed=3) for name in "ab"]
    for attr in ("config_path", "appointments_path", "leads_path"):
        first, second = (getattr(run, attr).read_bytes() for run in runs)
        assert first == second, attr
    other = write_synthetic_clinic(tmp_path / "c", appointments=600, leads=250, seed=4)
    assert other.appointments_path.read_bytes() != runs[0].appointments_path.read_bytes()
    assert other.leads_path.read_bytes() != runs[0].leads_path.read_bytes()


def test_headers_are_the_spec_columns_and_row_counts_are_exact(clinic: SynthResult) -> None:
    appointments, leads = _records(clinic.appointments_path), _records(clinic.leads_path)
    assert tuple(appointments[0]) == APPOINTMENT_COLUMNS
    assert tuple(leads[0]) == LEAD_COLUMNS
    assert len(appointments) - 1 == clinic.appointment_rows == 2000
    assert len(leads) - 1 == clinic.lead_rows == 800
    assert {len(row) for row in appointments + leads} == {20}
    assert clinic.appointment_ids == len({row[0] for row in appointments[1:]})
    assert clinic.lead_ids == len({row[0] for row in leads[1:]})


def test_csv_is_utf8_rfc4180_with_minimal_quoting(clinic: SynthResult) -> None:
    for path in (clinic.appointments_path, clinic.leads_path):
        text = path.read_text(encoding="utf-8")
        again = io.StringIO(newline="")
        csv.writer(again, lineterminator="\n").writerows(_records(path))
        assert again.getvalue() == text, path.name


def test_clinic_yaml_has_exactly_the_issue_2_keys_and_loads(clinic: SynthResult) -> None:
    raw = yaml.safe_load(clinic.config_path.read_text(encoding="utf-8"))
    assert raw == ISSUE_2_EXAMPLE
    config = load_config(clinic.config_path)
    assert config.database_url is None
    assert config.timezone == TIMEZONE
    assert config.sources.appointments.path is not None and config.sources.leads.path is not None
    assert config.resolve(config.sources.appointments.path) == clinic.appointments_path
    assert config.resolve(config.sources.leads.path) == clinic.leads_path


def test_another_clinic_id_is_written_and_still_loads(tmp_path: Path) -> None:
    result = write_synthetic_clinic(tmp_path, appointments=50, leads=20, seed=1, clinic_id="2024")
    assert load_config(result.config_path).clinic_id == "2024"


@pytest.mark.parametrize(("appointments", "leads"), [(0, 0), (5, 3), (50, 0), (0, 50), (300, 10)], ids=str)
def test_tiny_and_empty_sizes_still_write_valid_files(tmp_path: Path, appointments: int, leads: int) -> None:
    result = write_synthetic_clinic(tmp_path, appointments=appointments, leads=leads, seed=2)
    assert len(_records(result.appointments_path)) == appointments + 1
    assert len(_records(result.leads_path)) == leads + 1
    load_config(result.config_path)


@pytest.mark.parametrize(
    "kwargs",
    [{"appointments": -1}, {"leads": -1}, {"clinic_id": "Sunrise MedSpa"}],
    ids=["negative appointments", "negative leads", "bad clinic id"],
)
def test_bad_arguments_are_refused(tmp_path: Path, kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"appointments": 10, "leads": 10, "seed": 1, **kwargs}
    with pytest.raises(ValueError):
        write_synthetic_clinic(tmp_path, **args)  # type: ignore[arg-type]


def test_clock_converts_wall_times_like_pandas_with_the_spec_dst_rules() -> None:
    clock = _Clock(ZoneInfo(TIMEZONE), _epoch(date(2024, 1, 1)), _epoch(date(2028, 1, 1)))
    rng = np.random.default_rng(0)
    edges = [_epoch(date.fromisoformat(day)) + s for day in DST_DAYS for s in range(0, 4 * 3600, 900)]
    local = np.concatenate([rng.integers(_epoch(date(2025, 1, 1)), _epoch(date(2027, 1, 1)), 5000), edges])
    index = pd.DatetimeIndex(local.astype("datetime64[s]"))
    expected = index.tz_localize(TIMEZONE, ambiguous=np.ones(len(local), bool), nonexistent="shift_forward")
    utc = clock.to_utc(local)
    assert (utc == expected.as_unit("s").asi8).all()
    walls = expected.tz_localize(None).as_unit("s").asi8
    assert (clock.wall(utc) == walls).all()


# edge cases of SPEC sections 3 and 4, found in the small run


def test_people_have_about_point_nine_of_the_leads_and_walk_ins_exist(
    clinic: SynthResult, leads: pd.DataFrame, appts: pd.DataFrame
) -> None:
    # one person per connected email/phone component of the leads
    parent = list(range(len(leads)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for key in ("em", "ph"):
        first: dict[str, int] = {}
        for i, value in enumerate(leads[key]):
            if value:
                parent[find(i)] = find(first.setdefault(value, i))
    people = len({find(i) for i in range(len(leads))})
    assert 0.85 * len(leads) <= people <= 0.95 * len(leads)
    walk_ins = appts[(appts.em != "") & ~appts.em.isin(leads.em) & ~appts.ph.isin(leads.ph)]
    assert walk_ins.patient_id.nunique() > 100
    assert clinic.people > people


def test_statuses_cover_the_generic_vocabulary_in_mixed_case_plus_unknown_ones(appts: pd.DataFrame) -> None:
    seen = set(appts.status_lc)
    assert seen >= GENERIC_STATUSES
    assert {"in progress"} <= seen - GENERIC_STATUSES
    assert (appts.status != appts.status_lc).any() and (appts.status == appts.status_lc).any()
    assert (appts.status == appts.status.str.upper()).any()


def test_re_exports_upgrade_and_downgrade_and_only_updated_at_tells_which_is_newer(
    appts: pd.DataFrame, leads: pd.DataFrame
) -> None:
    repeated = appts[appts.appointment_id.duplicated(keep=False)].copy()
    assert repeated.appointment_id.nunique() >= 10
    repeated["updated"] = _local(repeated.updated_at)
    repeated["position"] = repeated.index
    upgrades = downgrades = newer_first = 0
    for _, rows in repeated.groupby("appointment_id"):
        assert rows.updated.nunique() == len(rows)
        old, new = rows.sort_values("updated").iloc[[0, -1]].itertuples()
        upgrades += old.status_lc in SCHEDULED and new.status_lc in ATTENDED
        downgrades += old.status_lc in ATTENDED and new.status_lc in CANCELLED
        newer_first += new.position < old.position
    assert upgrades and downgrades and newer_first
    assert leads.lead_id.duplicated().any()


def test_gmail_dot_and_plus_variants_differ_between_lead_and_pms(
    appts: pd.DataFrame, leads: pd.DataFrame
) -> None:
    pms = appts[appts.email.str.contains("@gmail.com", case=False)].drop_duplicates("em")
    pairs = leads.merge(pms[["em", "email"]], on="em", suffixes=("_lead", "_pms"))
    differ = pairs[pairs.email_lead.str.strip().str.lower() != pairs.email_pms.str.strip().str.lower()]
    assert differ.email_lead.str.contains(r"\+").any()
    assert (differ.email_lead.str.count(r"\.") != differ.email_pms.str.count(r"\.")).any()
    assert leads.email.str.startswith(" ").any() and (leads.email != leads.email.str.lower()).any()


def test_some_addresses_are_unusable(appts: pd.DataFrame, leads: pd.DataFrame) -> None:
    for frame in (appts, leads):
        typed = frame.email[frame.email != ""].str.strip()
        usable = typed.str.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+")
        assert 0 < (~usable).sum() < 0.03 * len(typed)


def test_phones_come_in_mixed_formats_and_some_are_invalid(appts: pd.DataFrame, leads: pd.DataFrame) -> None:
    phones = pd.concat([appts.phone, leads.phone])
    for pattern in (r"\(\d{3}\) \d{3}-\d{4}", r"\d{3}\.\d{3}\.\d{4}", r"\+1 \d{3} \d{3} \d{4}", r"\d{10}"):
        assert phones.str.fullmatch(pattern).any(), pattern
    typed = phones[phones != ""]
    valid = typed.map(_e164) != ""
    assert (~valid).sum() >= 10
    assert valid.mean() > 0.9
    assert (phones == "").any()


def test_some_people_link_only_by_phone_and_some_only_by_email(
    appts: pd.DataFrame, leads: pd.DataFrame
) -> None:
    by_phone = leads[(leads.em != "") & ~leads.em.isin(appts.em) & (leads.ph != "") & leads.ph.isin(appts.ph)]
    assert len(by_phone) >= 5
    by_email = leads[(leads.ph != "") & ~leads.ph.isin(appts.ph) & (leads.em != "") & leads.em.isin(appts.em)]
    assert len(by_email) >= 5


def test_patient_ids_are_shared_and_some_patients_have_two_charts(appts: pd.DataFrame) -> None:
    assert appts.patient_id.value_counts().max() > 3
    charts = appts[appts.em != ""].groupby("em").patient_id.nunique()
    assert (charts > 1).any()


def test_existing_patients_and_leads_after_the_visit(appts: pd.DataFrame, leads: pd.DataFrame) -> None:
    attended = appts[appts.status_lc.isin(ATTENDED) & (appts.em != "")][["em", "local_start"]]
    pairs = leads[leads.em != ""].merge(attended, on="em")
    before = pairs.local_created - pairs.local_start
    existing = pairs[(before > pd.Timedelta(days=30)) & (before <= pd.Timedelta(days=365))]
    assert existing.lead_id.nunique() >= 10
    after_visit = pairs[(before > pd.Timedelta(0)) & (before <= pd.Timedelta(days=6))]
    assert after_visit.lead_id.nunique() >= 5


def test_people_fill_several_forms_inside_and_after_the_window(leads: pd.DataFrame) -> None:
    known = leads[leads.em != ""].sort_values("local_created")
    gaps = known.groupby("em").local_created.diff().dropna()
    assert (gaps < pd.Timedelta(hours=1)).any()
    assert ((gaps > pd.Timedelta(days=1)) & (gaps < pd.Timedelta(days=90))).any()
    assert (gaps >= pd.Timedelta(days=90)).any()
    fills = known[known.groupby("em").local_created.diff() < pd.Timedelta(hours=1)]
    clicked = fills[fills.gclid != ""]
    assert clicked.gclid.isin(known.drop(fills.index).gclid).all()


def test_revenue_formats_fees_and_refunds(appts: pd.DataFrame) -> None:
    revenue = appts.revenue
    assert revenue.str.fullmatch(r"\$\d{1,3}(,\d{3})+\.\d\d").any()
    assert revenue.str.fullmatch(r"\d+\.\d\d").any() and revenue.str.fullmatch(r"\d+").any()
    assert (revenue == "").any()
    late = appts[appts.status_lc.isin({"late cancel", "late cancellation"})]
    assert (late.revenue.str.replace(r"[$,]", "", regex=True).replace("", "0").astype(float) > 0).any()
    refunds = appts[revenue.str.startswith("-")]
    assert refunds.service.str.startswith("Refund - ").any()
    assert (~refunds.service.str.startswith("Refund - ")).any()
    assert refunds.status_lc.isin(ATTENDED).all()


def test_test_records_are_in_both_files(appts: pd.DataFrame, leads: pd.DataFrame) -> None:
    for frame in (appts, leads):
        domains = frame.email.str.strip().str.lower().str.rsplit("@", n=1).str[-1]
        assert {"example.com", "test.com"} <= set(domains)
        names = pd.concat([frame.first_name, frame.last_name]).str.strip().str.lower()
        assert {"test", "do not use"} <= set(names)


def test_consent_is_granted_missing_revoked_and_granted_after_the_visit(
    appts: pd.DataFrame, leads: pd.DataFrame
) -> None:
    flags = set(appts.consent_marketing) | set(leads.consent_marketing)
    assert {"yes", "no", "Y", "1", "true", "TRUE", ""} <= flags
    for frame in (appts, leads):
        assert (frame.consent_revoked_at != "").any()
        assert (frame.consent_marketing == "").any()
    granted = appts[appts.consent_marketing.str.lower().isin(TRUTHY)]
    assert (_local(granted.consent_at) > granted.local_start).any()
    assert (_local(granted.consent_at) < granted.local_start).any()


def test_events_span_fifteen_months_with_old_and_future_rows(
    appts: pd.DataFrame, leads: pd.DataFrame
) -> None:
    end = pd.Timestamp(END)
    for times in (appts.local_start, leads.local_created):
        assert times.min() < end - pd.Timedelta(days=400)
        assert (times < end - pd.Timedelta(days=90)).mean() > 0.5
        assert ((times >= end - pd.Timedelta(days=62)) & (times < end)).any()
    assert leads.local_created.max() < end
    assert (appts.local_start >= end).any()
    assert appts[appts.local_start >= end].status_lc.isin(SCHEDULED).all()


def test_rows_on_the_clock_change_days_include_the_odd_hours(
    appts: pd.DataFrame, leads: pd.DataFrame
) -> None:
    for day in DST_DAYS:
        for frame, column in ((appts, "start_at"), (leads, "created_at")):
            assert (frame[column] == f"{day} 01:30").any(), (column, day)
    assert (appts.start_at == "2026-03-08 02:30").any()  # inside the spring-forward gap
    assert (appts.start_at.str.startswith("2026-11-01 01:") & appts.status_lc.isin(ATTENDED)).any()


def test_timestamps_are_mostly_naive_local_with_some_offsets(
    appts: pd.DataFrame, leads: pd.DataFrame
) -> None:
    for values in (appts.start_at, appts.updated_at, leads.created_at):
        assert values.str.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d(:\d\d)?").mean() > 0.7
        assert values.str.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d").any()
        assert values.str.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ").any()


def test_click_ids_have_the_platform_shapes_and_shares(leads: pd.DataFrame) -> None:
    share = (leads[["gclid", "gbraid", "wbraid", "fbclid", "fbc", "fbp"]] != "").mean()
    assert 0.4 < share.gclid < 0.6 and 0.2 < share.fbclid < 0.4
    assert share.gbraid > 0 and share.wbraid > 0 and share.fbc > 0 and share.fbp > 0
    fbc = leads[leads.fbc != ""]
    assert fbc.fbc.str.fullmatch(r"fb\.1\.\d{13}\.IwAR[\w-]+").all()
    assert (fbc.fbc.str.rsplit(".", n=1).str[-1] == fbc.fbclid).all()
    assert leads[leads.fbp != ""].fbp.str.fullmatch(r"fb\.1\.\d{13}\.\d{10}").all()
    assert ((leads.fbclid != "") & (leads.fbc == "")).any()
    assert ((leads.gclid == "") & (leads.gbraid != "")).any()


def test_phi_looking_free_text_is_present_and_round_trips(appts: pd.DataFrame, leads: pd.DataFrame) -> None:
    for values in (appts.service, leads.treatment_interest, leads.notes, leads.landing_page_url):
        assert values.str.contains("hyperhidrosis").any()
    assert leads.landing_page_url.str.contains("utm_content=hyperhidrosis").any()
    assert leads.notes.str.contains("\n").any() and leads.notes.str.contains('"').any()
    assert appts.service.str.contains('"').any() and appts.service.str.contains(",").any()


def test_names_and_addresses_come_from_the_fixed_fake_lists(appts: pd.DataFrame, leads: pd.DataFrame) -> None:
    emails = pd.concat([appts.email, leads.email]).str.strip().str.lower()
    usable = emails[emails.str.fullmatch(r"[^@\s]+@[^@\s]+\.[^@\s]+")]
    allowed = {"gmail.com", "yahoo.com", "icloud.com", "outlook.com", "hotmail.com", "aol.com"}
    allowed |= {"comcast.net", "sbcglobal.net", "example.com", "test.com"}
    assert set(usable.str.rsplit("@", n=1).str[-1]) <= allowed
    assert usable.str.contains(r"\d(?:\+\w+)?@").all()  # numbered, so no real person's address
    names = set(pd.concat([appts.first_name, leads.first_name]).str.strip().str.lower())
    assert names <= {name.lower() for name in _FIRST + _TEST_FIRST}


def test_end_moves_every_time(tmp_path: Path) -> None:
    result = write_synthetic_clinic(tmp_path, appointments=400, leads=150, seed=5, end=date(2025, 6, 1))
    leads = pd.read_csv(result.leads_path, dtype=str, keep_default_na=False)
    created = _local(leads.created_at)
    assert created.max() < pd.Timestamp(2025, 6, 1)
    assert created.min() >= pd.Timestamp(date(2025, 6, 1) - timedelta(days=460))
    assert re.search("2025-03-09 0[12]:", leads.created_at.str.cat(sep="|"))  # that year's DST day
