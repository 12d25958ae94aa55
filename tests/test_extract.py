"""etl.extract against small committed exports (tests/data/extract, one file per edge case).

The contract is docs/architecture.md "Canonical frames" and SPEC section 3.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from etl import cells, csvread, extract
from etl.config import ClinicConfig
from etl.csvread import CsvExport
from etl.errors import ConfigError, InputError

DATA = Path(__file__).parent / "data" / "extract"
SQL = Path(__file__).parents[1] / "sql"
LA = "America/Los_Angeles"


def make_config(tmp_base: Path = DATA, **sources: dict[str, object]) -> ClinicConfig:
    defaults: dict[str, dict[str, object]] = {
        "appointments": {"path": "header_only.csv"},
        "leads": {"path": "booleans.csv"},
    }
    return ClinicConfig.model_validate(
        {
            "clinic_id": "spa-one",
            "timezone": LA,
            "base_dir": tmp_base,
            "sources": {**defaults, **sources},
        }
    )


def appointments(name: str, profile: str = "generic", **extra: object) -> pd.DataFrame:
    config = make_config(appointments={"path": name, "profile": profile, **extra})
    return extract.read_appointments(config.sources.appointments, config)


def leads(name: str) -> pd.DataFrame:
    config = make_config(leads={"path": name})
    return extract.read_leads(config.sources.leads, config)


def input_error(name: str, profile: str = "generic", **extra: object) -> InputError:
    with pytest.raises(InputError) as info:
        appointments(name, profile, **extra)
    return info.value


def utc(text: str) -> pd.Timestamp:
    return pd.Timestamp(text, tz="UTC")


def assert_canonical(frame: pd.DataFrame, kind: extract.Kind) -> None:
    assert list(frame.columns) == extract.columns_of(kind)
    for column, how in extract.FIELDS[kind].items():
        expected = {
            "text": "string",
            "status": "string",
            "time": "datetime64[ns, UTC]",
            "money": "float64",
            "flag": "bool",
        }[how]
        assert frame[column].dtype == expected, column
    assert frame["source_file"].dtype == "string"
    assert frame["source_line"].dtype == np.int64
    if kind == "appointments":
        assert frame["status_known"].dtype == bool


def test_bom_is_stripped_from_the_first_header():
    frame = appointments("bom.csv")
    assert_canonical(frame, "appointments")
    assert frame["appointment_id"].tolist() == ["A1"]
    assert frame["source_file"].tolist() == ["bom.csv"]


def test_crlf_line_ends():
    frame = appointments("crlf.csv")
    assert frame["appointment_id"].tolist() == ["A1", "A2"]
    assert frame["updated_at"].iloc[1] == utc("2026-03-02 20:00")
    assert frame["source_line"].tolist() == [2, 3]
    assert not frame["appointment_id"].str.contains("\r").any()


def test_quoted_newlines_keep_physical_start_lines():
    frame = appointments("quoted_newline.csv")
    assert frame["appointment_id"].tolist() == ["A1", "A2", "A3"]
    assert frame["source_line"].tolist() == [2, 5, 7]


def test_quoted_newline_then_bad_date_reports_physical_line():
    error = input_error("quoted_newline_then_bad_date.csv")
    assert [(p.file, p.line, p.column) for p in error.problems] == [
        ("quoted_newline_then_bad_date.csv", 7, "start_at")
    ]


def test_revenue_forms():
    frame = appointments("money.csv")
    assert frame["revenue"].tolist() == [1200.0, 1200.0, -45.5, -45.5, 0.0, 75.0]


def test_unparseable_revenue_is_reported_without_value():
    error = input_error("bad_money.csv")
    assert [(p.line, p.reason) for p in error.problems] == [
        (2, "not a decimal amount"),
        (3, "not a decimal amount"),
    ]
    assert "dollars" not in str(error) and "1.2.3" not in str(error)


def test_blank_lines_are_skipped():
    frame = appointments("blank_lines.csv")
    assert frame["appointment_id"].tolist() == ["A1", "A2", "A3"]
    assert frame["source_line"].tolist() == [3, 6, 8]


def test_cp1252_file_from_excel():
    raw = (DATA / "cp1252.csv").read_bytes()
    assert "José".encode("cp1252") in raw
    frame = appointments("cp1252.csv")
    assert frame["first_name"].tolist() == ["José"]
    assert frame["last_name"].tolist() == ["Muñoz"]


def test_forced_wrong_encoding_names_file_and_line():
    error = input_error("cp1252.csv", encoding="utf-8")
    assert [(p.file, p.line) for p in error.problems] == [("cp1252.csv", 2)]
    assert "José" not in str(error) and "Jos" not in str(error)


def test_missing_required_column_names_file_and_column_not_values():
    error = input_error("missing_column.csv")
    assert [(p.file, p.line, p.column, p.reason) for p in error.problems] == [
        ("missing_column.csv", 1, "start_at", "missing required column")
    ]
    assert "missing_column.csv" in str(error) and "start_at" in str(error)
    assert "P-SECRET-1" not in str(error)


def test_bad_dates_name_file_line_column_and_never_the_value():
    error = input_error("bad_date.csv")
    assert [(p.file, p.line, p.column, p.reason) for p in error.problems] == [
        ("bad_date.csv", 3, "start_at", "not an ISO 8601 timestamp (years 1900-2199)"),
        ("bad_date.csv", 4, "start_at", "not an ISO 8601 timestamp (years 1900-2199)"),
        ("bad_date.csv", 5, "appointment_id", "missing value"),
        ("bad_date.csv", 5, "start_at", "missing value"),
    ]
    message = str(error)
    assert "bad_date.csv, line 3, column 'start_at'" in message
    for value in ("03/08/2026", "2:30 PM", "2026-02-30"):
        assert value not in message


def _tmp_error(tmp_path: Path, text: str) -> InputError:
    (tmp_path / "export.csv").write_text(text, encoding="utf-8")
    config = make_config(tmp_path, appointments={"path": "export.csv"})
    with pytest.raises(InputError) as info:
        extract.read_appointments(config.sources.appointments, config)
    return info.value


HEADER = "appointment_id,status,start_at,revenue,service,notes\n"


def test_a_row_shifted_by_an_unquoted_amount_is_an_error_not_a_wrong_revenue(tmp_path: Path) -> None:
    # "$1,200.00" unquoted splits into two cells; the shift lands in a blank trailing column
    error = _tmp_error(tmp_path, HEADER + "A0,completed,2026-01-05 09:00,$45.00,Botox,\n"
                       "A1,completed,2026-01-05 10:00,$1,200.00,Botox,\n")  # fmt: skip
    assert [(p.line, p.column) for p in error.problems] == [(3, "revenue")]
    assert "amount with a thousands separator is not quoted" in error.problems[0].reason


def test_a_number_before_an_amount_is_no_split_amount(tmp_path: Path) -> None:
    # trailing blank cells on every row, and a duration of 60 before a revenue of 350.00: only
    # the money column's own cell can be an amount's head
    (tmp_path / "export.csv").write_text("appointment_id,status,start_at,duration_min,revenue\n"
                                         "A1,completed,2026-01-05 09:00,60,350.00,\n"
                                         "A2,completed,2026-01-05 10:00,45,120.50,\n", encoding="utf-8")  # fmt: skip
    config = make_config(tmp_path, appointments={"path": "export.csv"})
    assert extract.read_appointments(config.sources.appointments, config)["revenue"].tolist() == [
        350.0,
        120.5,
    ]


def test_every_row_shifted_by_an_unquoted_amount_is_an_error_too(tmp_path: Path) -> None:
    # trailing blank cells on every row are forgiven as an export's habit, but not when they
    # come from a split amount: read so, each revenue was $1 and $2
    for amounts in (
        ("$1,200.00", "$2,450.00"),
        ("1,200.00", "2,450.50"),
        ("(1,200)", "$12,000"),
        ("1,200", "3,400"),
    ):
        error = _tmp_error(
            tmp_path,
            HEADER
            + "".join(
                f"A{i},completed,2026-01-05 10:00,{amount},Botox,\n" for i, amount in enumerate(amounts)
            ),
        )
        assert [(p.line, p.column) for p in error.problems] == [(2, "revenue"), (3, "revenue")], amounts
        assert "1,200" not in str(error) and "450" not in str(error)


def test_a_currency_code_in_lower_case_reads_as_the_code(tmp_path: Path) -> None:
    (tmp_path / "export.csv").write_text("appointment_id,status,start_at,revenue,currency\n"
                                         "A0,completed,2026-01-05 09:00,45, usd \nA1,completed,2026-01-05 10:00,12,\n",
                                         encoding="utf-8")  # fmt: skip
    config = make_config(tmp_path, appointments={"path": "export.csv"})
    frame = extract.read_appointments(config.sources.appointments, config)
    assert frame["currency"].iloc[0] == "USD" and pd.isna(frame["currency"].iloc[1])


def test_trailing_empty_cells_on_every_row_are_forgiven(tmp_path: Path) -> None:
    (tmp_path / "export.csv").write_text(HEADER + "A0,completed,2026-01-05 09:00,45,Botox,,\n"
                                         "A1,completed,2026-01-05 10:00,12,Botox,,\n", encoding="utf-8")  # fmt: skip
    config = make_config(tmp_path, appointments={"path": "export.csv"})
    frame = extract.read_appointments(config.sources.appointments, config)
    assert frame["revenue"].tolist() == [45.0, 12.0]


def test_times_outside_1900_to_2199_and_infinite_amounts_are_errors(tmp_path: Path) -> None:
    error = _tmp_error(tmp_path, HEADER + "A0,completed,2262-04-11 23:00,45,x,\n"
                       "A1,completed,1677-09-21 07:00,12,x,\n" f"A2,completed,2026-01-05 10:00,{'9' * 400},x,\n")  # fmt: skip
    assert [(p.line, p.column, p.reason) for p in error.problems] == [
        (2, "start_at", "not an ISO 8601 timestamp (years 1900-2199)"),
        (3, "start_at", "not an ISO 8601 timestamp (years 1900-2199)"),
        (4, "revenue", "not a decimal amount"),
    ]


def test_excel_unicode_text_is_named_for_what_it_is(tmp_path: Path) -> None:
    text = "appointment_id\tstatus\tstart_at\r\nA1\tcompleted\t2026-01-05 10:00\r\n"
    (tmp_path / "export.csv").write_bytes(text.encode("utf-16"))
    config = make_config(tmp_path, appointments={"path": "export.csv"})
    with pytest.raises(InputError) as info:
        extract.read_appointments(config.sources.appointments, config)
    assert [(p.line, p.reason) for p in info.value.problems] == [
        (1, 'tab-separated (Excel "Unicode text"); save it as "CSV UTF-8" instead')
    ]


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be", "utf-32"])
def test_utf16_and_utf32_without_a_byte_order_mark_are_named_for_what_they_are(
    codec: str, tmp_path: Path
) -> None:
    # read as UTF-8, every required column would be "missing": one error that says what it is
    text = "appointment_id,status,start_at\r\nA1,completed,2026-01-05 10:00\r\n"
    (tmp_path / "export.csv").write_bytes(text.encode(codec))
    config = make_config(tmp_path, appointments={"path": "export.csv"})
    if codec == "utf-32":  # with its byte-order mark: read as what it is
        frame = extract.read_appointments(config.sources.appointments, config)
        assert frame["appointment_id"].tolist() == ["A1"]
        return
    with pytest.raises(InputError) as info:
        extract.read_appointments(config.sources.appointments, config)
    assert [(p.line, p.reason) for p in info.value.problems] == [
        (1, "UTF-16 or UTF-32 text without a byte-order mark; save the export as CSV UTF-8")
    ]


def test_an_id_wider_than_its_staging_column_is_an_error_by_line(tmp_path: Path) -> None:
    error = _tmp_error(tmp_path, HEADER + f"{'A' * 129},completed,2026-01-05 10:00,45,x,\n")
    assert [(p.line, p.column, p.reason) for p in error.problems] == [
        (2, "appointment_id", "longer than 128 characters")
    ]
    assert "A" * 129 not in str(error)


def test_a_nul_character_in_a_staged_text_cell_is_an_error_by_line(tmp_path: Path) -> None:
    # SQLite would keep it; PostgreSQL refuses the whole load without naming a line
    error = _tmp_error(
        tmp_path,
        HEADER + "A1,completed,2026-01-05 10:00,45,x,\n" + "A\x002,completed,2026-01-05 10:00,45,x,\n",
    )
    assert [(p.line, p.column, p.reason) for p in error.problems] == [
        (3, "appointment_id", "contains a NUL character")
    ]


def test_duplicate_header_names_the_column():
    error = input_error("duplicate_header.csv")
    assert [(p.line, p.column, p.reason) for p in error.problems] == [
        (1, "status", "duplicate column header")
    ]


def test_a_header_problem_names_the_header_line_below_blank_lines(tmp_path: Path) -> None:
    # Excel's "CSV" of a sheet whose table starts lower keeps the empty rows above it
    error = _tmp_error(
        tmp_path, ",,,\n\n" + HEADER.replace("start_at", "starts") + "A0,completed,x,45,Botox,\n"
    )
    assert [(p.line, p.column, p.reason) for p in error.problems] == [
        (3, "start_at", "missing required column")
    ]


def test_empty_file_is_an_error():
    error = input_error("empty.csv")
    assert [(p.file, p.reason) for p in error.problems] == [("empty.csv", "file is empty (no header)")]


def test_header_only_gives_an_empty_canonical_frame():
    frame = appointments("header_only.csv")
    assert len(frame) == 0
    assert_canonical(frame, "appointments")


def test_dst_gap_shifts_forward_and_ambiguous_takes_first_occurrence():
    frame = appointments("dst.csv")
    assert frame["start_at"].tolist() == [
        utc("2026-03-08 10:30"),  # 02:30 does not exist; read as 02:30 PST = 03:30 PDT
        utc("2026-11-01 08:30"),  # 01:30 happens twice; the first is PDT (-07:00)
        utc("2026-07-01 19:00"),
    ]
    assert frame["updated_at"].tolist() == [
        utc("2026-03-08 10:30"),
        utc("2026-11-01 08:30"),
        utc("2026-07-01 07:00"),  # a date alone is local midnight
    ]


def test_offset_bearing_timestamps_ignore_the_clinic_zone():
    frame = appointments("offsets.csv")
    assert frame["start_at"].tolist() == [
        utc("2026-03-02 18:00"),
        utc("2026-03-02 18:00"),
        utc("2026-03-02 18:00"),
        utc("2026-03-02 08:00"),
        utc("2026-03-02 18:00:00.250"),
        utc("2026-03-02 18:00"),  # hours only: PostgreSQL's text for a timestamptz
        utc("2026-03-02 18:30"),
    ]


def test_generic_status_vocabulary():
    frame = appointments("statuses_generic.csv")
    expected = (
        ["attended"] * 6
        + ["cancelled"] * 2
        + ["late_cancel"] * 2
        + ["no_show"] * 4
        + ["rescheduled"]
        + ["scheduled"] * 4
        + ["attended", "unknown"]
    )
    assert frame["status"].tolist() == expected
    assert frame["status_known"].tolist() == [True] * 20 + [False]


def test_zenoti_profile():
    frame = appointments("zenoti.csv", profile="zenoti")
    assert_canonical(frame, "appointments")
    assert frame["appointment_id"].tolist() == [f"Z{i}" for i in range(1, 8)]
    assert frame["patient_id"].iloc[0] == "G1"
    assert frame["status"].tolist() == [
        "attended",
        "scheduled",  # checked in, not closed
        "attended",
        "cancelled",
        "no_show",
        "scheduled",
        "unknown",  # Time Elapsed: unmapped until a sample export says what it means
    ]
    assert frame["status_known"].tolist() == [True] * 6 + [False]
    # the UTC column wins over the local one
    assert frame["start_at"].iloc[0] == utc("2026-03-02 18:00")
    assert frame["revenue"].iloc[0] == 1200.0
    assert frame["location_id"].iloc[0] == "C1"
    assert frame["consent_marketing"].tolist() == [False] * 7


@pytest.mark.parametrize(("profile", "dropped"), [("zenoti", "Invoice Total"), ("mindbody", "Amount")])
def test_a_vendor_export_without_a_mapped_column_is_named_in_a_warning(
    profile: str, dropped: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # a renamed revenue column would otherwise drop every purchase as no_revenue without a word
    source = DATA / f"{profile}.csv"
    header, _, body = source.read_text(encoding="utf-8").partition("\n")
    (tmp_path / "export.csv").write_text(
        header.replace(dropped, "Amount Paid") + "\n" + body, encoding="utf-8"
    )
    config = make_config(tmp_path, appointments={"path": "export.csv", "profile": profile})
    with caplog.at_level("WARNING", logger="etl.extract"):
        frame = extract.read_appointments(config.sources.appointments, config)
    assert (frame["revenue"] == 0).all()
    (message,) = [r.getMessage() for r in caplog.records if r.name == "etl.extract"]
    assert f"'{dropped}'" in message and "read as blank" in message


def test_mindbody_profile():
    frame = appointments("mindbody.csv", profile="mindbody")
    assert_canonical(frame, "appointments")
    assert frame["status"].tolist() == [
        "attended",
        "scheduled",  # Arrived
        "no_show",
        "late_cancel",
        "cancelled",
        "scheduled",  # the literal status "None"
        "scheduled",
        "unknown",
    ]
    assert frame["status_known"].tolist() == [True] * 7 + [False]
    assert frame["start_at"].iloc[0] == utc("2026-03-02 18:00")
    assert frame["revenue"].tolist()[:2] == [350.0, 0.0]


def test_generic_csv_rejected_by_vendor_profile_names_vendor_columns():
    error = input_error("statuses_generic.csv", profile="zenoti")
    # "status" matches "Status": headers compare without case
    assert {p.column for p in error.problems} == {"Appointment Id", "Start Time (UTC)"}
    assert "nor 'Start Time'" in str(error)


def test_latest_updated_at_wins_within_a_file():
    frame = appointments("latest_wins.csv")
    assert frame["appointment_id"].tolist() == ["A1", "A2", "A3"]
    assert frame["status"].tolist() == ["attended", "attended", "no_show"]
    assert frame["revenue"].tolist() == [300.0, 200.0, 0.0]
    assert frame["source_line"].tolist() == [4, 5, 8]


def test_later_row_wins_without_updated_at():
    frame = appointments("latest_wins_no_updated_at.csv")
    assert frame["status"].tolist() == ["cancelled"]


def test_later_lead_row_wins():
    frame = leads("leads_latest_wins.csv")
    assert frame["lead_id"].tolist() == ["L2", "L1"]
    assert frame["gclid"].tolist() == [pd.NA, "Cj0-later_testclickid0000"]


def test_phi_only_columns_are_absent_from_leads():
    frame = leads("leads_phi.csv")
    assert_canonical(frame, "leads")
    for column in ("source", "treatment_interest", "notes", "landing_page_url", "utm_content"):
        assert column not in frame.columns
    cells_text = frame.astype(str).to_numpy().ravel().tolist()
    for value in ("Botox", "pregnancy", "spa.test", "Laser", "lips-ad", "google"):
        assert not any(value in cell for cell in cells_text)
    assert frame["consent_marketing"].tolist() == [True, False]
    assert frame["gclid"].tolist() == ["Cj0abc_testclickid0000", pd.NA]
    assert frame["consent_revoked_at"].isna().all()


def test_phi_only_columns_are_absent_from_appointments():
    frame = appointments("appointments_phi.csv")
    assert "service" not in frame.columns and "provider" not in frame.columns
    assert not frame.astype(str).isin(["Botox 20 units", "Dr Secret"]).any().any()


def test_booleans():
    frame = leads("booleans.csv")
    assert frame["consent_marketing"].tolist() == [True, False, True, False] * 2 + [False]


def test_unreadable_boolean_is_reported():
    config = make_config(leads={"path": "bad_boolean.csv"})
    with pytest.raises(InputError) as info:
        extract.read_leads(config.sources.leads, config)
    assert [(p.line, p.column) for p in info.value.problems] == [(2, "consent_marketing")]
    assert "opted" not in str(info.value)


def test_ragged_rows_are_reported_by_line():
    error = input_error("ragged_row.csv")
    past = "1 more after this, the header's last column"
    assert [(p.line, p.column, p.reason) for p in error.problems] == [
        (3, "start_at", "expected 3 fields, found 2: the row ends before this column"),
        (4, "start_at", f"expected 3 fields, found 4: {past}"),
        # a blank extra cell on some rows only may be a shifted row (see the "$1,200.00" test)
        (5, "start_at", f"expected 3 fields, found 4: {past}"),
    ]
    assert "extra" not in str(error)


def test_stray_quote_in_unquoted_field_falls_back_to_exact_reader():
    frame = appointments("stray_quote.csv")
    assert frame["appointment_id"].tolist() == ["A1", "A2", "A3"]
    assert frame["source_line"].tolist() == [2, 3, 4]


@pytest.mark.parametrize("name", ["quoted_newline.csv", "blank_lines.csv", "crlf.csv", "bom.csv"])
def test_fast_and_exact_readers_agree(name):
    export = CsvExport(DATA / name)
    indices = list(range(len(export.header)))
    fast = export._read_fast(indices)
    assert fast is not None
    exact = export._read_exact(indices)
    assert [a.to_pylist() for a in fast[0]] == [a.to_pylist() for a in exact[0]]
    assert fast[1].tolist() == exact[1].tolist()


def test_a_stray_quote_before_a_quoted_newline_keeps_the_line_numbers(tmp_path):
    # the row count matches, so only a quote-grammar check catches that line 3 is really line 4
    path = tmp_path / "stray.csv"
    path.write_bytes(b'id,h,v\n1,a"b,"c\nd"\n2,x,y\n')
    export = CsvExport(path)
    columns, lines = export.read([0, 1, 2])
    assert [column.to_pylist() for column in columns] == [["1", "2"], ['a"b', "x"], ["c\nd", "y"]]
    assert lines.tolist() == [2, 4]


def _read_or_problems(read):
    try:
        columns, lines = read()
    except InputError as error:
        return [(p.line, p.reason) for p in error.problems]
    return [column.to_pylist() for column in columns], lines.tolist()


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.lists(st.text(alphabet='a",\n', max_size=4), min_size=1, max_size=3).map(",".join),
        min_size=1,
        max_size=6,
    ),
    st.sampled_from(["\n", "\r\n"]),
)
def test_whatever_the_quoting_the_reader_agrees_with_the_csv_module(tmp_path_factory, rows, newline):
    # the fast reader may only answer when it gives exactly what the exact reader gives
    path = tmp_path_factory.mktemp("csv") / "random.csv"
    path.write_bytes(newline.join(["id,h,v", *rows]).encode())
    try:
        export = CsvExport(path)
    except InputError:
        return
    indices = list(range(len(export.header)))
    assert _read_or_problems(lambda: export.read(indices)) == _read_or_problems(
        lambda: export._read_exact(indices)
    )


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("2026-03-08 02:30", "2026-03-08 10:30"),
        ("2026-03-08T02:30:00", "2026-03-08 10:30"),
        ("2026-03-08T03:00", "2026-03-08 10:00"),
        ("2026-11-01 01:30:00", "2026-11-01 08:30"),
        ("2026-11-01 02:30", "2026-11-01 10:30"),
        ("2026-11-01T01:30:00-08:00", "2026-11-01 09:30"),
        ("2026-03-08", "2026-03-08 08:00"),
        ("2026-03-08T10:30Z", "2026-03-08 10:30"),
    ],
    ids=[
        "gap",
        "gap-T-seconds",
        "after-gap",
        "ambiguous",
        "after-fold",
        "explicit-second",
        "date",
        "zulu",
    ],
)
def test_timestamp_cells(cell, expected):
    parsed, bad = cells.timestamps(pa.array([cell]), ZoneInfo(LA))
    assert not bad.any()
    assert parsed.iloc[0] == utc(expected)


@pytest.mark.parametrize(
    "cell",
    [
        "2026-3-8",
        "8/3/2026",
        "2026-03-08T24:00",
        "2026-02-29",
        "2026-03-08 2:30",
        "yesterday",
        "0001-01-01",
    ],
)
def test_bad_timestamp_cells(cell):
    parsed, bad = cells.timestamps(pa.array([cell, "2026-03-08"]), None)
    assert bad.tolist() == [True, False]
    assert parsed.isna().tolist() == [True, False]


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("$1,200.00", 1200.0),
        ("(45.50)", -45.5),
        ("-$45", -45.0),
        ("$-45", -45.0),
        ("", 0.0),
        (".5", 0.5),
    ],
)
def test_money_cells(cell, expected):
    amounts, bad = cells.money(pa.array([cell]))
    assert amounts.tolist() == [expected] and not bad.any()


@pytest.mark.parametrize("cell", ["$", "1,20", "(-45)", "1e5", "nan", "--5", "12 USD"])
def test_bad_money_cells(cell):
    _, bad = cells.money(pa.array([cell]))
    assert bad.tolist() == [True]


@pytest.mark.parametrize("name", ["generic", "zenoti", "mindbody"])
def test_every_profile_keeps_the_contract(name):
    profile = extract.load_profile(name)
    assert profile.appointments is not None
    for kind in ("appointments", "leads"):
        section = getattr(profile, kind)
        if section is None:
            continue
        assert set(extract.MIN_REQUIRED[kind]) <= set(section.required)
        assert set(section.columns) <= set(extract.FIELDS[kind])
        assert not {"service", "notes", "treatment_interest", "landing_page_url", "source"} & set(
            section.columns
        )
    assert set(profile.appointments.status_map().values()) <= {
        "attended",
        "cancelled",
        "late_cancel",
        "no_show",
        "rescheduled",
        "scheduled",
    }


def test_unknown_profile_and_missing_leads_section():
    with pytest.raises(ConfigError, match="unknown profile 'nope'"):
        extract.load_profile("nope")
    config = make_config(leads={"path": "booleans.csv", "profile": "zenoti"})
    with pytest.raises(ConfigError, match="no leads mapping"):
        extract.read_leads(config.sources.leads, config)


@pytest.fixture
def source_db(tmp_path: Path) -> str:
    path = tmp_path / "pms.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(
            """
            CREATE TABLE patients (patient_id TEXT PRIMARY KEY, clinic_id TEXT, first_name TEXT,
              last_name TEXT, email TEXT, phone TEXT, zip TEXT, city TEXT, state TEXT,
              country TEXT, consent_marketing INTEGER, consent_at TEXT, consent_revoked_at TEXT,
              updated_at TEXT, date_of_birth TEXT);
            CREATE TABLE appointments (appointment_id TEXT PRIMARY KEY, clinic_id TEXT,
              patient_id TEXT, status TEXT, start_at TEXT, paid_total REAL, currency TEXT,
              location_id TEXT, updated_at TEXT, service TEXT, provider TEXT, notes TEXT);
            CREATE TABLE leads (lead_id TEXT PRIMARY KEY, clinic_id TEXT, created_at TEXT,
              updated_at TEXT, first_name TEXT, last_name TEXT, email TEXT, phone TEXT, zip TEXT,
              gclid TEXT, gbraid TEXT, wbraid TEXT, fbclid TEXT, fbc TEXT, fbp TEXT,
              consent_marketing INTEGER, consent_at TEXT, consent_revoked_at TEXT, source TEXT,
              treatment_interest TEXT, notes TEXT, landing_page_url TEXT);
            INSERT INTO patients VALUES
              ('P1', 'spa-one', 'Ana', 'Ruiz', 'ana@mail.test', '5550001', '90210', 'LA', 'CA',
               'US', 1, '2026-02-01 10:00:00+00:00', NULL, '2026-02-01 10:00:00+00:00', '1980-01-01');
            INSERT INTO appointments VALUES
              ('A1', 'spa-one', 'P1', 'completed', '2026-03-02 18:00:00+00:00', 350.5, 'USD',
               'L1', '2026-03-02 20:00:00+00:00', 'Botox', 'Dr X', 'secret note'),
              ('A2', 'spa-one', 'P1', 'booked', '2026-03-09 18:00:00+00:00', NULL, 'USD',
               'L1', '2026-03-03 09:00:00+00:00', 'Botox', 'Dr X', NULL),
              ('A3', 'spa-one', 'P1', 'completed', '2026-01-02 18:00:00+00:00', 99, 'USD',
               'L1', '2026-01-02 20:00:00+00:00', 'Peel', 'Dr X', NULL),
              ('A4', 'spa-two', NULL, 'completed', '2026-03-02 18:00:00+00:00', 10, 'USD',
               'L9', '2026-03-02 20:00:00+00:00', 'Peel', 'Dr Y', NULL);
            INSERT INTO leads VALUES
              ('L1', 'spa-one', '2026-03-01 17:00:00+00:00', '2026-03-01 17:00:00+00:00', 'Ana',
               'Ruiz', 'ana@mail.test', '5550001', '90210', 'Cj0abc_testclickid0000', NULL, NULL, NULL, NULL,
               NULL, 1, '2026-03-01 17:00:00+00:00', NULL, 'google', 'Botox', 'note',
               'https://spa.test/botox'),
              ('L2', 'spa-two', '2026-03-01 17:00:00+00:00', '2026-03-01 17:00:00+00:00', 'Bo',
               'Li', 'bo@mail.test', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 0, NULL,
               NULL, 'meta', 'Laser', NULL, NULL);
            """
        )
    return f"sqlite:///{path}"


WINDOW = {"start": datetime(2026, 3, 1, tzinfo=UTC), "end": datetime(2026, 3, 8, tzinfo=UTC)}


def test_the_example_query_selects_visits_again_when_their_patient_changed(source_db: str):
    # consent lives on the patient: a revocation recorded there changed no appointment's
    # updated_at, so the night it happened selected nothing and it was never staged
    with sqlite3.connect(source_db.removeprefix("sqlite:///")) as db:
        db.execute("UPDATE patients SET consent_revoked_at = '2026-04-02 09:00:00+00:00', "
                   "updated_at = '2026-04-02 09:00:00+00:00' WHERE patient_id = 'P1'")  # fmt: skip
    config = make_config(SQL, appointments={"sql_url": source_db, "query": "appointments.sql"})
    night = {"start": datetime(2026, 4, 2, tzinfo=UTC), "end": datetime(2026, 4, 3, tzinfo=UTC)}
    frame = extract.read_appointments(config.sources.appointments, config, **night)
    assert sorted(frame["appointment_id"]) == ["A1", "A2", "A3"]  # every visit of P1, none of spa-two
    assert frame["consent_revoked_at"].notna().all()
    assert (frame["updated_at"] == utc("2026-04-02 09:00")).all()  # newer than what staging holds


def test_sql_source_binds_clinic_and_window(source_db: str):
    config = make_config(
        SQL,
        appointments={"sql_url": source_db, "query": "appointments.sql"},
        leads={"sql_url": source_db, "query": "leads.sql"},
    )
    frame = extract.read_appointments(config.sources.appointments, config, **WINDOW)
    assert_canonical(frame, "appointments")
    assert frame["appointment_id"].tolist() == ["A1", "A2"]
    assert frame["status"].tolist() == ["attended", "scheduled"]
    assert frame["revenue"].tolist() == [350.5, 0.0]
    assert frame["start_at"].iloc[0] == utc("2026-03-02 18:00")
    assert frame["consent_marketing"].tolist() == [True, True]
    assert frame["source_file"].tolist() == ["appointments.sql"] * 2
    assert frame["source_line"].tolist() == [1, 2]

    lead_frame = extract.read_leads(config.sources.leads, config, **WINDOW)
    assert_canonical(lead_frame, "leads")
    assert lead_frame["lead_id"].tolist() == ["L1"]
    assert lead_frame["gclid"].tolist() == ["Cj0abc_testclickid0000"]
    assert lead_frame["created_at"].tolist() == [utc("2026-03-01 17:00")]


def test_a_sqlite_source_compares_the_window_in_clinic_time(tmp_path: Path):
    # SQLite has no time zones: a PMS table holds wall-clock times, which SPEC section 3 reads as
    # clinic-local, and the window is bound so (bound as UTC text it shifted by 7-8 hours)
    from zoneinfo import ZoneInfo

    with sqlite3.connect(tmp_path / "pms.sqlite") as db:
        db.executescript(
            """
            CREATE TABLE appointments (appointment_id TEXT, clinic_id TEXT, status TEXT,
              start_at TEXT, updated_at TEXT);
            INSERT INTO appointments VALUES
              ('IN-0200', 'spa-one', 'completed', '2026-11-01 02:00', '2026-11-01 02:00'),
              ('IN-2230', 'spa-one', 'completed', '2026-11-22 22:30', '2026-11-22 22:30'),
              ('OUT-0300', 'spa-one', 'completed', '2026-11-23 03:00', '2026-11-23 03:00');
            """
        )
    (tmp_path / "changed.sql").write_text(
        "SELECT appointment_id, status, start_at, updated_at FROM appointments\n"
        "WHERE clinic_id = :clinic_id AND updated_at >= :start AND updated_at < :end\n"
        "ORDER BY appointment_id"
    )
    config = make_config(tmp_path, appointments={"sql_url": "sqlite:///pms.sqlite", "query": "changed.sql"})
    assert config.timezone == "America/Los_Angeles"
    zone = ZoneInfo(config.timezone)
    window = {"start": datetime(2026, 11, 1, tzinfo=zone), "end": datetime(2026, 11, 23, tzinfo=zone)}
    # the relative SQLite path is the YAML folder's file, wherever the run starts
    frame = extract.read_appointments(config.sources.appointments, config, **window)
    assert frame["appointment_id"].tolist() == ["IN-0200", "IN-2230"]
    config = make_config(
        tmp_path, appointments={"sql_url": "sqlite+pysqlite:///pms.sqlite", "query": "changed.sql"}
    )
    frame = extract.read_appointments(config.sources.appointments, config, **window)  # with a driver named
    assert frame["appointment_id"].tolist() == ["IN-0200", "IN-2230"]
    assert config.resolve_url("sqlite:///:memory:") == "sqlite:///:memory:"


def test_a_query_file_saved_by_notepad_or_excel_is_read_or_named(source_db: str, tmp_path: Path):
    query = "-- rows of :clinic_id\nSELECT appointment_id, status, start_at FROM appointments WHERE clinic_id = :clinic_id"
    (tmp_path / "bom.sql").write_bytes(b"\xef\xbb\xbf" + query.encode())  # a BOM before a comment
    config = make_config(tmp_path, appointments={"sql_url": source_db, "query": "bom.sql"})
    frame = extract.read_appointments(config.sources.appointments, config, **WINDOW)
    assert frame["appointment_id"].tolist() == ["A1", "A2", "A3"]
    (tmp_path / "cp1252.sql").write_bytes(("-- caf\xe9\n" + query).encode("cp1252"))
    (tmp_path / "folder.sql").mkdir()
    for name, reason in (("cp1252.sql", "not UTF-8 text"), ("folder.sql", "cannot read the query file")):
        config = make_config(tmp_path, appointments={"sql_url": source_db, "query": name})
        with pytest.raises(InputError) as info:
            extract.read_appointments(config.sources.appointments, config, **WINDOW)
        (problem,) = info.value.problems
        assert problem.file == name and reason in problem.reason


def test_a_source_url_with_a_password_is_refused_even_with_a_typo_in_its_port(tmp_path: Path):
    with pytest.raises(ValidationError, match="holds a password") as info:
        make_config(
            tmp_path, appointments={"sql_url": "postgresql://pms:S3CRET-PW@db:5432x/pms", "query": "q.sql"}
        )
    assert "S3CRET-PW" not in str(info.value.errors(include_input=False))
    with pytest.raises(ValidationError, match="holds a password"):  # a "/" in the password
        make_config(
            tmp_path, appointments={"sql_url": "postgresql://u:S3cr/et@db:5432x/pms", "query": "q.sql"}
        )
    (tmp_path / "all.sql").write_text("SELECT appointment_id, status, start_at FROM appointments")
    config = make_config(tmp_path, appointments={"sql_url": "postgresql://db:5432x/pms", "query": "all.sql"})
    with pytest.raises(ConfigError, match="not a valid SQLAlchemy URL"):
        extract.read_appointments(config.sources.appointments, config, **WINDOW)


def test_a_sql_source_is_fingerprinted_by_its_query(source_db: str):
    # its rows are no file: the run's record names the query that read them
    import hashlib

    from etl.pipeline import source_fingerprint

    config = make_config(SQL, appointments={"sql_url": source_db, "query": "appointments.sql"})
    query = hashlib.sha256((SQL / "appointments.sql").read_bytes()).hexdigest()
    assert source_fingerprint(config, config.sources.appointments) == f"query:{query}"


def test_sql_source_numbers_read_as_the_digits_the_database_holds() -> None:
    # a `real` (float4) column arrives widened to a double: 760.1 as 760.0999755859375
    from etl.sqlread import as_text

    assert as_text(float(np.float32(760.1))) == "760.1"
    assert as_text(760.1) == "760.1" and as_text(1234567.89) == "1234567.89"
    assert as_text(100.0) == "100" and as_text(-12.25) == "-12.25"
    assert as_text(1e20) == "100000000000000000000"  # never exponent notation
    # a double a float32 happens to hold exactly keeps its own digits (was 1500000.2, 134217740)
    assert as_text(1500000.25) == "1500000.25" and as_text(2500000.75) == "2500000.75"
    assert as_text(134217744.0) == "134217744" and as_text(float(np.float32(0.1))) == "0.1"
    assert as_text(Decimal("350.50")) == "350.50"


def test_sql_source_needs_the_window_it_binds(source_db: str):
    config = make_config(SQL, appointments={"sql_url": source_db, "query": "appointments.sql"})
    with pytest.raises(ConfigError, match="binds"):
        extract.read_appointments(config.sources.appointments, config)


def test_a_sql_source_comment_may_name_parameters_with_their_colon(source_db: str, tmp_path: Path):
    (tmp_path / "commented.sql").write_text(
        "-- rows of :clinic_id changed in [:start, :end), and :nothing else\n"
        "SELECT appointment_id, status, start_at FROM appointments\n"
        "    -- keyed on :clinic_id\n"
        "WHERE clinic_id = :clinic_id ORDER BY appointment_id"
    )
    config = make_config(tmp_path, appointments={"sql_url": source_db, "query": "commented.sql"})
    frame = extract.read_appointments(config.sources.appointments, config, **WINDOW)
    assert frame["appointment_id"].tolist() == ["A1", "A2", "A3"]


def test_sql_source_without_window_parameters(source_db: str, tmp_path: Path):
    (tmp_path / "all.sql").write_text(
        "SELECT appointment_id, status, start_at FROM appointments "
        "WHERE clinic_id = :clinic_id ORDER BY appointment_id"
    )
    config = make_config(tmp_path, appointments={"sql_url": source_db, "query": "all.sql"})
    frame = extract.read_appointments(config.sources.appointments, config, **WINDOW)
    assert frame["appointment_id"].tolist() == ["A1", "A2", "A3"]
    assert frame["source_file"].tolist() == ["all.sql"] * 3


def test_a_failing_sql_source_query_is_one_clear_error_without_values(source_db: str, tmp_path: Path):
    # the driver's message would quote the statement (and could quote a cell value)
    (tmp_path / "bad.sql").write_text("SELECT * FROM no_such_table WHERE note = 'P-SECRET-9'")
    config = make_config(tmp_path, appointments={"sql_url": source_db, "query": "bad.sql"})
    with pytest.raises(InputError) as info:
        extract.read_appointments(config.sources.appointments, config, **WINDOW)
    (problem,) = info.value.problems
    assert problem.file == "bad.sql" and "OperationalError" in problem.reason
    assert "P-SECRET-9" not in str(info.value) and "no_such_table" not in str(info.value)


def test_a_sql_source_whose_driver_is_missing_is_a_config_error_without_the_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    (tmp_path / "all.sql").write_text("SELECT appointment_id, status, start_at FROM appointments")
    monkeypatch.setenv("PMS_URL", "mysql+pymysql://pms:S3CRET-PW@127.0.0.1:1/pms")  # no pymysql here
    config = make_config(tmp_path, appointments={"sql_url_env": "PMS_URL", "query": "all.sql"})
    with pytest.raises(ConfigError, match="driver that is not installed") as info:
        extract.read_appointments(config.sources.appointments, config, **WINDOW)
    assert "S3CRET-PW" not in str(info.value)


def test_bare_cr_line_ends_from_old_excel():
    frame = appointments("bare_cr.csv")
    assert frame["appointment_id"].tolist() == ["A1", "A2"]
    assert frame["source_line"].tolist() == [2, 3]


def test_zenoti_without_utc_column_reads_local_time():
    frame = appointments("zenoti_local_time.csv", profile="zenoti")
    assert frame["start_at"].tolist() == [utc("2026-03-02 18:00")]
    assert frame["status"].tolist() == ["attended"]  # the newer "Last Updated" row wins


def test_utf16_with_bom_is_detected():
    frame = appointments("utf16_bom.csv")
    assert frame["appointment_id"].tolist() == ["A1"]
    assert frame["source_line"].tolist() == [2]


def test_neither_utf8_nor_cp1252_names_file_line_and_column():
    error = input_error("undecodable.csv")
    assert [(p.file, p.line, p.column, p.reason) for p in error.problems] == [
        ("undecodable.csv", 3, "status", "neither UTF-8 nor cp1252 text")
    ]


@pytest.mark.parametrize("name", ["quoted_newline.csv", "blank_lines.csv", "crlf.csv", "bom.csv"])
def test_record_scan_is_the_same_in_tiny_chunks(name, monkeypatch):
    whole = csvread._scan_records(csvread._decode((DATA / name).read_bytes(), name, None))
    monkeypatch.setattr(csvread, "_SCAN_CHUNK", 3)  # every chunk boundary splits something
    chunked = csvread._scan_records(csvread._decode((DATA / name).read_bytes(), name, None))
    for got, expected in zip(chunked, whole, strict=True):
        assert np.array_equal(got, expected)


@pytest.mark.parametrize(
    "raw",
    [
        b"", b"plain", "José €".encode(), "😀".encode(), b"\xc3", b"\xc0\x80", b"\xe0\x80\x80",
        b"\xed\xa0\x80", b"\xed\x9f\xbf", b"\xf4\x8f\xbf\xbf", b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80",
        b"a\xffb", b"\x80", b"ok\xe2\x82",
    ],
)  # fmt: skip
def test_utf8_check_agrees_with_python(raw):
    try:
        raw.decode("utf-8")
        python_accepts = True
    except UnicodeDecodeError:
        python_accepts = False
    assert csvread._is_utf8(raw) == python_accepts


def _repeated(cells_: list[str], times: int = 50) -> pa.Array:
    return pa.array(cells_ * times, type=pa.string())


def test_timestamps_parsed_per_distinct_cell_match_cell_by_cell():
    distinct = [
        "2026-03-08 02:30", "2026-11-01 01:30:00", "2026-11-01T01:30:00-08:00", "2026-03-08T10:30Z",
        "2026-03-08", "", "2026-02-29", "yesterday", "2026-05-01 09:15:30.5",
    ]  # fmt: skip
    for tz in (ZoneInfo(LA), None):
        parsed, bad = cells.timestamps(_repeated(distinct), tz)
        one_by_one = [cells.timestamps(pa.array([cell]), tz) for cell in distinct]
        assert parsed.tolist() == [p.iloc[0] for p, _ in one_by_one] * 50
        assert bad.tolist() == [b[0] for _, b in one_by_one] * 50


def test_amounts_parsed_per_distinct_cell_match_cell_by_cell():
    distinct = ["$1,200.00", "(45.50)", "-$45", "", ".5", "1,20", "nan", "450"]
    amounts, bad = cells.money(_repeated(distinct))
    one_by_one = [cells.money(pa.array([cell])) for cell in distinct]
    assert np.array_equal(amounts, np.array([a[0] for a, _ in one_by_one] * 50), equal_nan=True)
    assert bad.tolist() == [b[0] for _, b in one_by_one] * 50


def test_latest_rows_match_a_row_by_row_reference():
    rng = np.random.default_rng(7)
    keys = [f"A{k}" for k in rng.integers(0, 300, 1000)]
    recency = rng.integers(0, 5, 1000).astype(np.int64)
    for rec in (recency, None):
        best: dict[str, tuple[int, int]] = {}
        for row, key in enumerate(keys):
            rank = (0 if rec is None else int(rec[row]), row)
            best[key] = max(best.get(key, rank), rank)
        keep = extract._latest_rows(pa.array(keys), rec)
        assert keep is not None
        assert np.flatnonzero(keep).tolist() == sorted(row for _, row in best.values())
    assert extract._latest_rows(pa.array(["A1", "A2"]), None) is None


def test_a_quote_left_open_is_an_error_not_a_swallowed_row(tmp_path: Path) -> None:
    # the lenient reader took L2 into L1's notes: one lead fewer, exit 0, outbox written
    error = _tmp_error(tmp_path, HEADER + 'A1,completed,2026-01-05 09:00,45,Botox,"oops no end\n'
                       'A2,completed,2026-01-06 09:00,45,Botox,"said ""hi"" x"\n'
                       "A3,completed,2026-01-07 09:00,45,Botox,\n")  # fmt: skip
    assert [(p.line, p.reason.split(" (")[0]) for p in error.problems] == [(2, "malformed CSV record")]
    glued = _tmp_error(tmp_path, HEADER + 'A1,completed,2026-01-05 09:00,45,"Botox"x,\n')
    assert [p.line for p in glued.problems] == [2] and "Botox" not in str(glued)


def test_a_utf8_export_with_a_byte_that_is_not_utf8_is_refused_not_misread(tmp_path: Path) -> None:
    # the whole file was re-read as cp1252: "Núñez" became "NÃºÃ±ez" and hashed to nothing
    path = tmp_path / "export.csv"
    path.write_bytes("appointment_id,status,start_at,first_name\n"
                     "A1,completed,2026-01-05 09:00,Núñez\nA2,completed,2026-01-05 09:00,Zoë\n".encode()
                     + b"A3,completed,2026-01-05 09:00,Jos\xe9\n")  # fmt: skip
    config = make_config(tmp_path, appointments={"path": "export.csv"})
    with pytest.raises(InputError) as info:
        extract.read_appointments(config.sources.appointments, config)
    assert [(p.line, p.column, p.reason.split(";")[0]) for p in info.value.problems] == [
        (4, "first_name", "UTF-8 text with bytes that are not UTF-8 (mixed encodings)")]  # fmt: skip
    # a real cp1252 file, even one with an accented capital before a no-break space, still reads
    path.write_bytes("appointment_id,status,start_at,first_name\n"
                     "A1,completed,2026-01-05 09:00,RENÉ\xa0\nA2,completed,2026-01-05 09:00,Zoë\n"
                     "A3,completed,2026-01-05 09:00,José\n".encode("cp1252"))  # fmt: skip
    assert CsvExport(path).read([3])[0][0].to_pylist() == ["RENÉ\xa0", "Zoë", "José"]
    # mostly cp1252 with one row pasted from a UTF-8 source: read as cp1252, its "José" was
    # "JosÃ©", which hashes to nothing
    path.write_bytes("appointment_id,status,start_at,first_name\n"
                     "A1,completed,2026-01-05 09:00,Renée\nA2,completed,2026-01-05 09:00,Zoë\n"
                     "A3,completed,2026-01-05 09:00,Hélène\n".encode("cp1252")
                     + "A4,completed,2026-01-05 09:00,José\n".encode())  # fmt: skip
    with pytest.raises(InputError) as info:
        extract.read_appointments(config.sources.appointments, config)
    assert [(p.line, p.column, p.reason.split(";")[0]) for p in info.value.problems] == [
        (5, "first_name", "cp1252 text with a UTF-8 character here (mixed encodings)")]  # fmt: skip
    assert "Jos" not in str(info.value)
    # cp1252 names of their own with a capital Ä or Å before a no-break space, a dash or a
    # curly apostrophe read as they are, and so does such a pair in a column never read
    for name, notes in (("KIVELÄ\xa0", ""), ("MÄKELÄ–SMITH", ""), ("LÅ’", ""), ("Zoë", "Ã©")):
        path.write_bytes(("appointment_id,status,start_at,first_name,notes\n"
                          f"A1,completed,2026-01-05 09:00,{name},{notes}\n"
                          "A2,completed,2026-01-05 09:00,Zoë,\nA3,completed,2026-01-05 09:00,Renée,\n").encode("cp1252"))  # fmt: skip
        assert CsvExport(path).read([3])[0][0].to_pylist() == [name, "Zoë", "Renée"]
        assert extract.read_appointments(config.sources.appointments, config)["source_line"].tolist() == [
            2,
            3,
            4,
        ]


@pytest.mark.parametrize(
    ("above", "record", "expected"),
    [
        (b"", b"\xe9A4,completed,2026-01-05 09:00,x\n", (5, "appointment_id")),
        (b"", b'A4,completed,2026-01-05 09:00,"two\nli\xe9nes"\n', (6, "first_name")),  # quoted newline
        (
            b",,,\n\n",
            b"A4,completed,2026-01-05 0\xe99:00,x\n",
            (7, "start_at"),
        ),  # blank lines above the header
        (b"", b"A4,completed,2026-01-05 09:00,x,\xe9\n", (5, None)),  # a cell past the header's width
    ],
    ids=["first_cell", "quoted_newline", "below_blank_lines", "past_the_header"],
)
def test_an_undecodable_byte_is_placed_by_line_and_column(
    tmp_path: Path, above: bytes, record: bytes, expected: tuple[int, str | None]
) -> None:
    # the clinic retypes one cell in Excel; the line alone leaves a row of a dozen to search
    good = "A1,completed,2026-01-05 09:00,Núñez\nA2,completed,2026-01-05 09:00,Zoë\nA3,completed,2026-01-05 09:00,Renée\n"
    path = tmp_path / "export.csv"
    path.write_bytes(above + b"appointment_id,status,start_at,first_name\n" + good.encode() + record)
    columns = frozenset({"appointment_id", "status", "start_at", "first_name"})  # the profile's
    with pytest.raises(InputError) as info:
        CsvExport(path, columns=columns)
    assert [(p.line, p.column) for p in info.value.problems] == [expected]
    (tmp_path / "header.csv").write_bytes(b"appointment_id,st\xe9tus,start_at,first_name\n" + good.encode())
    with pytest.raises(InputError) as info:
        CsvExport(tmp_path / "header.csv", columns=columns)
    assert [(p.line, p.column) for p in info.value.problems] == [(1, None)]  # in the header itself


def test_an_undecodable_byte_never_names_a_data_cell_as_its_column(tmp_path: Path) -> None:
    # an export saved without its header row: the first record is a patient, not a header
    rows = "A1,completed,2026-01-05 09:00,Núñez\nA2,completed,2026-01-05 09:00,Zoë\nA3,completed,2026-01-05 09:00,Renée\n"
    (tmp_path / "export.csv").write_bytes(rows.encode() + b"A4,completed,2026-01-05 09:00,Jos\xe9\n")
    config = make_config(tmp_path, appointments={"path": "export.csv"})
    with pytest.raises(InputError) as info:
        extract.read_appointments(config.sources.appointments, config)
    assert [(p.line, p.column) for p in info.value.problems] == [(4, None)]
    assert "Renée" not in str(info.value) and "Zoë" not in str(info.value)


def test_an_export_that_cannot_be_read_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "export.csv").mkdir()  # a folder where the file should be
    with pytest.raises(InputError, match=r"export\.csv: cannot be read \(IsADirectoryError\)"):
        CsvExport(tmp_path / "export.csv")
    (tmp_path / "rot.csv").write_text(HEADER)
    with pytest.raises(InputError, match="is not a text encoding"):
        CsvExport(tmp_path / "rot.csv", "rot13")
    with pytest.raises(InputError, match="is not a text encoding"):
        CsvExport(tmp_path / "rot.csv", "undefined")  # a codec whose decoding always fails


def test_a_stray_quote_in_the_header_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "export.csv"
    path.write_text('appointment_id,"status,start_at\n' + "A1,completed,2026-01-05 09:00\n" * 20_000)
    with pytest.raises(InputError, match=r"line 1: malformed header"):
        CsvExport(path)


def test_a_cell_longer_than_the_csv_modules_default_limit_reads(tmp_path: Path) -> None:
    # a 140 kB note (a column never read) plus a stray quote elsewhere sent the file to the
    # exact reader, whose 128 KiB field limit called the valid row malformed
    path = tmp_path / "export.csv"
    path.write_text(HEADER + f"A1,completed,2026-01-05 09:00,45,Botox,{'x' * 140_000}\n"
                    'A2,completed,2026-01-06 09:00,45,Sam"s peel,\n')  # fmt: skip
    columns, lines = CsvExport(path).read([0, 4])
    assert columns[0].to_pylist() == ["A1", "A2"] and lines.tolist() == [2, 3]


@pytest.mark.parametrize("above", [b"  \n", b",,\n", b"\n \r\n"])
def test_blank_celled_lines_above_the_header_are_skipped(tmp_path: Path, above: bytes) -> None:
    path = tmp_path / "export.csv"
    path.write_bytes(above + HEADER.encode() + b"A1,completed,2026-01-05 09:00,45,Botox,\n")
    export = CsvExport(path)
    assert export.header[0] == "appointment_id"
    columns, lines = export.read([0])
    assert columns[0].to_pylist() == ["A1"] and lines.tolist() == [above.count(b"\n") + 2]


def test_a_missing_spec_column_is_named_in_a_warning_and_read_as_blank(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # without "revenue" every purchase would be dropped as no_revenue with nothing said why
    (tmp_path / "export.csv").write_text(
        "appointment_id,status,start_at,email\nA1,completed,2026-01-05 10:00,ann@mail.test\n",
        encoding="utf-8",
    )
    config = make_config(tmp_path, appointments={"path": "export.csv"})
    with caplog.at_level("WARNING", logger="etl.extract"):
        frame = extract.read_appointments(config.sources.appointments, config)
    assert frame["revenue"].tolist() == [0.0]
    (record,) = [r for r in caplog.records if r.name == "etl.extract"]
    message = record.getMessage()
    assert message.startswith("export.csv: no column 'patient_id', 'first_name'")
    assert "'revenue'" in message and "'updated_at'" in message and "'email'" not in message
    assert "ann@mail.test" not in message


CANARY = "qzvx.person@gmail.com"
LEADS_HEADER = "lead_id,email,created_at,first_name,last_name,phone,zip,gclid,consent_marketing,consent_at"
LEAD_ROWS = [
    f"L1,{CANARY},2026-11-01 09:00,Qzvxfirst,Qzvxlast,(415) 555-0123,94110,,yes,2026-11-01 09:00",
    "L2,ann.bee@yahoo.com,2026-11-02 09:00,Ann,Bee,(415) 555-0124,94110,,yes,2026-11-02 09:00",
]


def _leads_error(tmp_path: Path, text: str) -> InputError:
    (tmp_path / "leads.csv").write_text(text, encoding="utf-8")
    config = make_config(tmp_path, leads={"path": "leads.csv"})
    with pytest.raises(InputError) as info:
        extract.read_leads(config.sources.leads, config)
    return info.value


def test_a_row_glued_onto_the_header_never_names_a_cell_as_a_short_rows_column(tmp_path: Path) -> None:
    # `cat header.csv rows.csv` with no final newline in header.csv: L1 joins the header line,
    # the required columns are still found, and every later row is "too short" at a header
    # cell that is a patient's email
    error = _leads_error(tmp_path, LEADS_HEADER + LEAD_ROWS[0] + "\n" + LEAD_ROWS[1] + "\n")
    assert [(p.file, p.line, p.column) for p in error.problems] == [("leads.csv", 2, None)]
    assert error.problems[0].reason == "expected 19 fields, found 10: the row ends before column 11"
    assert error.exit_code == 2
    for text in (str(error), repr(error.problems), *(p.reason for p in error.problems)):
        assert CANARY not in text and "qzvx" not in text.lower() and "555-0123" not in text


def test_a_value_glued_onto_the_headers_last_cell_never_names_a_long_rows_column(tmp_path: Path) -> None:
    error = _leads_error(tmp_path, LEADS_HEADER + f",{CANARY}\n" + LEAD_ROWS[1] + ",x,y\n")
    assert [(p.file, p.line, p.column) for p in error.problems] == [("leads.csv", 2, None)]
    assert error.problems[0].reason == (
        "expected 11 fields, found 12: 1 more after column 11, the header's last column"
    )
    assert error.exit_code == 2
    assert CANARY not in str(error) and CANARY not in repr(error.problems)


def test_a_tie_of_utf8_and_cp1252_names_the_byte_that_is_not_utf8(tmp_path: Path) -> None:
    # one UTF-8 "ë" on line 2, one cp1252 "é" on line 3: only line 2 was named, and an analyst
    # looking there for the undecodable byte found a name that reads fine
    path = tmp_path / "export.csv"
    path.write_bytes("appointment_id,status,start_at,first_name\n"
                     "A1,completed,2026-01-05 09:00,Zoë\n".encode()
                     + "A2,completed,2026-01-05 09:00,Renée\n".encode("cp1252"))  # fmt: skip
    config = make_config(tmp_path, appointments={"path": "export.csv"})
    with pytest.raises(InputError) as info:
        extract.read_appointments(config.sources.appointments, config)
    assert [(p.file, p.line, p.column, p.reason.split(" (")[0]) for p in info.value.problems] == [
        ("export.csv", 2, "first_name", "a UTF-8 character, in a file with as many bytes that are not UTF-8"),
        ("export.csv", 3, "first_name", "a byte that is not UTF-8, in a file with as many UTF-8 characters"),
    ]  # fmt: skip
    assert "Zo" not in str(info.value) and "Ren" not in str(info.value)
