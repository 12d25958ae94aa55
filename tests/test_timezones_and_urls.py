"""One time-zone database for every clinic-local time, and no password in a YAML URL's query.

Offset-less export times must be read with the same rules (``zoneinfo``) the config, the CLI and
the Google payload use: where pandas' own copy (pytz) disagrees, one visit would reach Google and
Meta an hour apart. Zone names only ``zoneinfo`` opens (posix/, right/, localtime, Factory) and
URLs carrying ``?password=`` are refused when the config loads, naming the key, never the value.
"""

from __future__ import annotations

from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import yaml
from typer.testing import CliRunner

from etl import cells
from etl.cli import app
from etl.config import load_config
from etl.errors import ConfigError
from tests.conftest import APPT_HEADER, BASE_CONFIG, ONE_LEAD, make_config, run_dry

VANCOUVER = "America/Vancouver"
SECRET_TEXT = "qzvxSECRET"


def test_a_vancouver_visit_reaches_google_and_meta_at_the_clinic_wall_time(tmp_path: Path) -> None:
    (tmp_path / "leads.csv").write_text(ONE_LEAD, encoding="utf-8")
    (tmp_path / "appointments.csv").write_text(
        APPT_HEADER + "A1,P1,Ann,Lee,ann.lee@gmail.com,4155550134,94103,Vancouver,BC,CA,Botox,completed,"
        "2026-12-01 10:00,300,USD,L1,2026-12-01 12:00,yes,2026-11-01 10:00,\n",
        encoding="utf-8",
    )
    config = make_config(tmp_path, timezone=VANCOUVER)
    run = run_dry(config, "2026-11-25", "2026-12-10", tmp_path)
    wall = datetime(2026, 12, 1, 10, 0, tzinfo=ZoneInfo(VANCOUVER))  # the clinic's own clock
    google, meta = run.rows["google_conversions"], run.rows["meta_events"]
    assert google and meta
    assert {r["conversion_date_time"] for r in google} == {wall.isoformat(sep=" ")}
    assert {r["event_time"] for r in meta} == {int(wall.timestamp())}
    # and the two name one instant
    (google_time,) = {datetime.fromisoformat(r["conversion_date_time"]) for r in google}
    assert int(google_time.timestamp()) == meta[0]["event_time"]


def test_offset_less_times_follow_the_zone_object_not_a_database_looked_up_by_its_name() -> None:
    # Tokyo's rules (+09:00, no DST) under Vancouver's name: only the object's rules may count
    tokyo = resources.files("tzdata.zoneinfo").joinpath("Asia", "Tokyo")
    with tokyo.open("rb") as fobj:
        zone = ZoneInfo.from_file(fobj, key=VANCOUVER)
    parsed, bad = cells.timestamps(pa.array(["2026-12-01 10:00", "2026-07-01 10:00"]), zone)
    assert not bad.any()
    assert parsed.tolist() == [
        pd.Timestamp("2026-12-01 01:00", tz=UTC),
        pd.Timestamp("2026-07-01 01:00", tz=UTC),
    ]


@pytest.mark.parametrize(
    "name",
    ["America/Vancouver", "America/Edmonton", "America/Winnipeg", "America/Havana", "Africa/Casablanca"],
)
def test_offset_less_times_match_zoneinfo_hour_by_hour(name: str) -> None:
    # the zones the reviewer found pytz and the system's tzdata to disagree on over 2024-2027;
    # each 45 minutes (so every half and whole hour of a gap or a repeated hour comes round)
    zone = ZoneInfo(name)
    walls = np.arange(np.datetime64("2024-01-01T00:15"), np.datetime64("2028-01-01"), np.timedelta64(45, "m"))
    text = np.datetime_as_string(walls, unit="m")
    parsed, bad = cells.timestamps(pa.array(text.tolist()), zone)
    assert not bad.any()
    expected = [
        datetime.fromisoformat(t).replace(tzinfo=zone).astimezone(UTC).replace(tzinfo=None)
        for t in text.tolist()
    ]
    got = parsed.dt.tz_localize(None).to_numpy(dtype="datetime64[ns]")
    wrong = [t for t, g, e in zip(text.tolist(), got, expected, strict=True) if g != np.datetime64(e, "ns")]
    assert wrong == []


@pytest.mark.parametrize(
    "name", ["posix/America/Los_Angeles", "right/America/Los_Angeles", "localtime", "Factory"]
)
def test_a_zone_only_zoneinfo_opens_is_refused_at_config(name: str, tmp_path: Path) -> None:
    raw = yaml.safe_load(yaml.safe_dump(BASE_CONFIG))
    raw["timezone"] = name
    (tmp_path / "clinic.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "clinic.yaml")
    (problem,) = str(caught.value).splitlines()[1:]
    assert problem.strip().startswith("timezone: ") and "IANA" in problem


@pytest.mark.parametrize(
    ("key", "url"),
    [
        ("database_url", f"postgresql://medspa@db/medspa?password={SECRET_TEXT}"),
        ("database_url", f"sqlite:////srv/sunrise.sqlite?PassWord={SECRET_TEXT}"),
        ("sources.leads.sql_url", f"postgresql://pms@pms/pms?sslmode=require&password={SECRET_TEXT}"),
        ("sources.leads.sql_url", f"mysql+pymysql://pms@pms/pms?passwd={SECRET_TEXT}"),
    ],
    ids=["database_url", "database_url-any-case", "sql_url", "sql_url-passwd"],
)
def test_a_password_in_a_yaml_urls_query_is_refused_without_showing_it(
    key: str, url: str, tmp_path: Path
) -> None:
    raw = yaml.safe_load(yaml.safe_dump(BASE_CONFIG))
    if key == "database_url":
        raw["database_url"] = url
    else:
        raw["sources"]["leads"] = {"sql_url": url, "query": "leads.sql"}
    (tmp_path / "clinic.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "clinic.yaml")
    assert f"{key}: " in str(caught.value) and "holds a password" in str(caught.value)
    assert SECRET_TEXT.lower() not in str(caught.value).lower()
    result = CliRunner().invoke(
        app, ["run", "--config", str(tmp_path / "clinic.yaml"), "--start", "2026-05-01", "--end", "2026-06-30",
              "--dry-run"],
    )  # fmt: skip
    assert result.exit_code == 2 and key in result.stderr
    assert SECRET_TEXT.lower() not in result.output.lower()
    assert not (tmp_path / "var").exists()


def _pinned(name: str, key: str) -> ZoneInfo:
    with resources.files("tzdata.zoneinfo").joinpath(*name.split("/")).open("rb") as fobj:
        return ZoneInfo.from_file(fobj, key=key)


def test_doctor_says_when_this_machines_zone_rules_part_from_the_pinned_tzdata(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a machine whose tzdata predates a change of the rules (British Columbia's in 2026) reads
    # every clinic-local time an hour off, and the schedule's midnights with them
    from etl.config import ClinicConfig
    from etl.doctor import zone_rules_check

    (tmp_path / "leads.csv").write_text(ONE_LEAD, encoding="utf-8")
    config = make_config(tmp_path, timezone=VANCOUVER)
    now = datetime(2026, 11, 25, tzinfo=UTC)
    monkeypatch.setattr(ClinicConfig, "tz", property(lambda self: _pinned(VANCOUVER, VANCOUVER)))
    name, status = zone_rules_check(config, now)
    assert (name, status.split(" (")[0]) == ("time zone rules", "ok")
    # rules that part from the pinned ones (Edmonton's: Mountain time) under Vancouver's name
    monkeypatch.setattr(ClinicConfig, "tz", property(lambda self: _pinned("America/Edmonton", VANCOUVER)))
    name, status = zone_rules_check(config, now)
    assert status.startswith("invalid: America/Vancouver reads differently from 2025-11-24")
    assert "PYTHONTZPATH" in status
