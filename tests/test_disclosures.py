"""What left, and under which consent: the ledger keeps each conversion's authorization, and
``disclosures`` accounts for it (real sends to the sandboxes through the real SDK clients)."""

from __future__ import annotations

import csv
import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml
from typer.testing import CliRunner

from etl import store
from etl.cli import app
from etl.rules.stages import opaque_id
from tests.conftest import BASE_CONFIG, SECRET

RUNNER = CliRunner()
LEAD_HEADER = (
    "lead_id,created_at,first_name,last_name,email,phone,zip,gclid,gbraid,wbraid,fbclid,fbc,fbp,"
    "consent_marketing,consent_at,consent_revoked_at,source,treatment_interest,notes,landing_page_url"
)
APPT_HEADER = (
    "appointment_id,patient_id,first_name,last_name,email,phone,zip,city,state,country,service,status,"
    "start_at,revenue,currency,location_id,updated_at,consent_marketing,consent_at,consent_revoked_at"
)
# Jane authorized on her lead form (May 1), then signed a new authorization at a booking (June 10):
# at the run's end the June one is in force. Bob's only authorization is his lead form's.
APPOINTMENTS = [
    "APPT-JANE-1,PAT-JANE,Janecanary,Doecanary,jane.canary@gmail.com,(415) 555-0123,94110,San Francisco,CA,US,"
    "Botox for hyperhidrosis,Completed,2026-05-05 10:00,450.00,USD,L1,2026-05-05 10:00,,,",
    "APPT-JANE-2,PAT-JANE,Janecanary,Doecanary,jane.canary@gmail.com,(415) 555-0123,94110,San Francisco,CA,US,"
    "Filler,Booked,2026-07-20 10:00,0,USD,L1,2026-06-10 08:00,yes,2026-06-10 08:00,",
    "APPT-BOB-1,PAT-BOB,Bobcanary,Smithcanary,bob.canary@yahoo.com,(415) 555-0188,94110,San Francisco,CA,US,"
    "Laser hair removal,Completed,2026-05-06 11:00,300.00,USD,L1,2026-05-06 11:00,,,",
]
LEADS = [
    "LEAD-JANE,2026-05-01 09:00,Janecanary,Doecanary,jane.canary@gmail.com,(415) 555-0123,94110,Cj0KCQ-jane,,,,,,"
    "yes,2026-05-01 09:00,,google,hyperhidrosis,sweaty palms,https://spa.example/botox",
    "LEAD-BOB,2026-05-02 09:00,Bobcanary,Smithcanary,bob.canary@yahoo.com,(415) 555-0188,94110,Cj0KCQ-bob,,,,,,"
    "yes,,,google,laser,back hair,https://spa.example/laser",
]
RAW = ["canary", "APPT-", "PAT-", "LEAD-", "Botox", "hyperhidrosis", "555-01", "spa.example"]
JANE_CONSENT = datetime(2026, 6, 10, 15, 0, tzinfo=UTC)  # 08:00 Pacific daylight time
BOB_CONSENT = datetime(2026, 5, 2, 16, 0, tzinfo=UTC)  # his lead's created_at: no consent_at given


def _clinic(tmp_path: Path, leads: list[str] = LEADS) -> Path:
    (tmp_path / "appointments.csv").write_text("\n".join([APPT_HEADER, *APPOINTMENTS]) + "\n")
    (tmp_path / "leads.csv").write_text("\n".join([LEAD_HEADER, *leads]) + "\n")
    (tmp_path / "clinic.yaml").write_text(yaml.safe_dump(BASE_CONFIG))
    return tmp_path / "clinic.yaml"


def _ledger(tmp_path: Path) -> list[dict[str, object]]:
    url = f"sqlite:///{tmp_path / 'var' / 'sunrise-medspa.sqlite'}"
    with store.engine_for(url) as engine, engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.select(store.send_ledger)).mappings()]


def _as_utc(value: object) -> datetime:
    assert isinstance(value, datetime)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


@pytest.fixture
def sent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MEDSPA_ID_SECRET", SECRET.decode())
    config = _clinic(tmp_path)
    result = RUNNER.invoke(app, ["run", "--config", str(config), "--start", "2026-05-01", "--end", "2026-06-30",
                                 "--target", "sandbox"])  # fmt: skip
    assert result.exit_code == 0, result.output
    return config


def test_each_conversion_sent_records_the_authorization_in_force_at_the_run_end(sent: Path) -> None:
    expected = {
        opaque_id(SECRET, "sunrise-medspa", stage, appointment): consent
        for appointment, consent in (("APPT-JANE-1", JANE_CONSENT), ("APPT-BOB-1", BOB_CONSENT))
        for stage in ("consultation", "purchase")
    }
    rows = _ledger(sent.parent)
    assert {r["destination"] for r in rows} == {"google_conversions", "meta_events"}
    assert {r["opaque_id"] for r in rows} == set(expected)  # both stages of both people, to both
    bob = {opaque_id(SECRET, "sunrise-medspa", stage, "APPT-BOB-1") for stage in ("consultation", "purchase")}
    for row in rows:
        assert row["status"] == "accepted"
        assert _as_utc(row["consent_at"]) == expected[str(row["opaque_id"])]
        # Jane's export stated her consent time; Bob's lead flagged consent without one
        assert row["consent_stated"] is (row["opaque_id"] not in bob)


def test_a_later_revocation_keeps_the_record_of_the_consent_a_conversion_left_under(
    sent: Path, tmp_path: Path
) -> None:
    revoked = [LEADS[0].replace("yes,2026-05-01 09:00,,", "yes,2026-05-01 09:00,2026-07-05 09:00,"), LEADS[1]]
    _clinic(tmp_path, revoked)
    result = RUNNER.invoke(app, ["run", "--config", str(sent), "--start", "2026-06-30", "--end", "2026-07-10",
                                 "--target", "sandbox"])  # fmt: skip
    assert result.exit_code == 0, result.output
    jane = {
        opaque_id(SECRET, "sunrise-medspa", stage, "APPT-JANE-1") for stage in ("consultation", "purchase")
    }
    rows = [r for r in _ledger(tmp_path) if r["opaque_id"] in jane]
    assert len(rows) == 4 and all(_as_utc(r["consent_at"]) == JANE_CONSENT for r in rows)


def test_disclosures_counts_what_left_and_lists_it_by_opaque_id(sent: Path, tmp_path: Path) -> None:
    out_csv = tmp_path / "disclosures.csv"
    result = RUNNER.invoke(app, ["disclosures", "--config", str(sent), "--since", "2026-01-01",
                                 "--csv", str(out_csv), "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    counts = json.loads(result.stdout)
    assert counts["target"] == "sandbox"
    assert {(c["destination"], c["stage"], c["status"], c["rows"], c["consent_recorded"])
            for c in counts["conversions"]} == {
        (dest, stage, "accepted", 2, 2)
        for dest in ("google_conversions", "meta_events")
        for stage in ("consultation", "purchase")
    }  # fmt: skip
    lists = counts["lists"]
    assert set(lists) == {"google_customer_match", "meta_audience"}
    assert all(
        v["syncs"] == 1 and v["adds"] == v["members_now"] == 2 and v["removes"] == 0 for v in lists.values()
    )
    with out_csv.open(newline="", encoding="utf-8") as handle:
        lines = list(csv.DictReader(handle))
    assert len(lines) == 8 and out_csv.stat().st_mode & 0o077 == 0
    assert all(re.fullmatch(r"[0-9a-f]{64}", line["opaque_id"]) for line in lines)
    by_id = {line["opaque_id"]: line for line in lines}
    jane = opaque_id(SECRET, "sunrise-medspa", "purchase", "APPT-JANE-1")
    assert datetime.fromisoformat(by_id[jane]["consent_at"]) == JANE_CONSENT
    assert by_id[jane]["consent_at_source"] == "export"
    bob = opaque_id(SECRET, "sunrise-medspa", "purchase", "APPT-BOB-1")
    assert datetime.fromisoformat(by_id[bob]["consent_at"]) == BOB_CONSENT
    assert by_id[bob]["consent_at_source"] == "row_time"  # his lead's created_at stands in
    assert all(line["request_id"] and line["run_id"] and line["sent_at"] for line in lines)
    everything = result.output + out_csv.read_text(encoding="utf-8")
    assert not [raw for raw in RAW if raw in everything]


def test_disclosures_counts_only_the_sends_inside_the_period(sent: Path) -> None:
    # the sends happened "now" (the sandbox run's wall clock); a period that ended before has none
    result = RUNNER.invoke(app, ["disclosures", "--config", str(sent), "--until", "2026-01-01", "--json"])
    assert result.exit_code == 0, result.output
    counts = json.loads(result.stdout)
    assert counts["conversions"] == [] and all(v["syncs"] == 0 for v in counts["lists"].values())
    table = RUNNER.invoke(app, ["disclosures", "--config", str(sent), "--since", "2030-01-01"])
    assert table.exit_code == 0 and "nothing sent in this period" in " ".join(table.stdout.split())
    backwards = RUNNER.invoke(app, ["disclosures", "--config", str(sent), "--since", "2026-06-01",
                                    "--until", "2026-05-01"])  # fmt: skip
    assert backwards.exit_code == 2 and "--since must be before --until" in backwards.stderr


def test_a_database_from_before_the_consent_record_gains_it_and_reads_not_recorded(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.sqlite'}"
    ddl = "".join(
        line for line in store.schema_ddl("sqlite").splitlines(keepends=True) if not line.startswith("--")
    )
    old = ddl.replace(
        "\tconsent_at BIGINT,\n\tconsent_stated BOOLEAN,\n\tPRIMARY KEY (clinic_id, opaque_id)",
        "\tPRIMARY KEY (clinic_id, opaque_id)",
    )
    old = old.replace("\tconsent_at DATETIME,\n\tconsent_stated BOOLEAN,\n", "")
    assert "consent_stated" not in old
    assert (
        old.count("consent_at BIGINT,") == 2 and "consent_at DATETIME" not in old
    )  # the two added columns gone
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        for statement in old.split(";"):
            if "CREATE TABLE" in statement:
                conn.execute(sa.text(statement))
        conn.execute(sa.text(
            "INSERT INTO send_ledger (clinic_id, destination, opaque_id, stage, status, run_id, sent_at, updated_at) "
            "VALUES ('sunrise-medspa', 'meta_events', :id, 'purchase', 'accepted', 'r1', "
            "'2026-06-01 00:00:00.000000', '2026-06-01 00:00:00.000000')"), {"id": "a" * 64})  # fmt: skip
    engine.dispose()
    config = _clinic(tmp_path)
    result = RUNNER.invoke(app, ["disclosures", "--config", str(config), "--database", url, "--json"])
    assert result.exit_code == 0, result.output
    (line,) = json.loads(result.stdout)["conversions"]
    assert line["rows"] == 1 and line["consent_recorded"] == 0
    out_csv = tmp_path / "old.csv"
    listed = RUNNER.invoke(
        app, ["disclosures", "--config", str(config), "--database", url, "--csv", str(out_csv)]
    )
    assert listed.exit_code == 0 and out_csv.read_text().splitlines()[1].endswith(
        ",,"
    )  # consent not recorded
    engine = sa.create_engine(url)
    with engine.connect() as conn:  # an audit changes nothing, not even the schema
        assert "consent_at" not in {c["name"] for c in sa.inspect(conn).get_columns("send_ledger")}
    engine.dispose()
    with store.engine_for(url) as upgraded:  # a run's open brings it up to date
        assert {c["name"] for c in sa.inspect(upgraded).get_columns("conversions")} >= {"consent_at"}
        assert {c["name"] for c in sa.inspect(upgraded).get_columns("send_ledger")} >= {"consent_at"}


def test_disclosures_never_creates_a_database_and_reads_a_read_only_one(sent: Path, tmp_path: Path) -> None:
    # a typo in --database made a new, empty database that read "nothing sent": the worst answer
    missing = tmp_path / "typo" / "sunrise.sqlite"
    result = RUNNER.invoke(app, ["disclosures", "--config", str(sent), "--database", f"sqlite:///{missing}"])
    assert result.exit_code == 2 and "no SQLite file" in result.stderr and not missing.parent.exists()
    empty = tmp_path / "empty.sqlite"
    sa.create_engine(f"sqlite:///{empty}").connect().close()
    result = RUNNER.invoke(app, ["disclosures", "--config", str(sent), "--database", f"sqlite:///{empty}"])
    assert result.exit_code == 2 and "no send ledger" in result.stderr
    # a read-only URI (an auditor's copy) is read as it is, and makes no stray folder
    staging = sent.parent / "var" / "sunrise-medspa.sqlite"
    read_only = f"sqlite:///file:{staging}?mode=ro&uri=true"
    result = RUNNER.invoke(app, ["disclosures", "--config", str(sent), "--database", read_only, "--json"])
    assert result.exit_code == 0, result.output
    assert sum(c["rows"] for c in json.loads(result.stdout)["conversions"]) == 8
    assert not list(sent.parent.glob("file:*"))


def _recall(
    config: Path, tmp_path: Path, lines: str, *extra: str
) -> tuple[dict[str, object], list[dict[str, str]]]:
    person = tmp_path / "request.txt"
    person.write_text(lines)
    out_csv = tmp_path / "request.csv"
    result = RUNNER.invoke(app, ["disclosures", "--config", str(config), "--person", str(person),
                                 "--csv", str(out_csv), "--json", *extra])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert not [raw for raw in [*RAW, "Jane.Canary"] if raw in result.output]  # nothing they typed, echoed
    with out_csv.open(newline="", encoding="utf-8") as handle:
        return json.loads(result.stdout), list(csv.DictReader(handle))


def test_one_persons_disclosures_are_found_from_any_of_their_identifiers(sent: Path, tmp_path: Path) -> None:
    jane = {
        opaque_id(SECRET, "sunrise-medspa", stage, "APPT-JANE-1") for stage in ("consultation", "purchase")
    }
    # a Gmail variant of her address finds her (rule 9's Google form, as rule 2 links)
    counts, lines = _recall(sent, tmp_path, "# access request 42\nemail: Jane.Canary+spa@Gmail.com\n")
    assert counts["persons"] == 1 and counts["appointments"] == 2 and counts["leads"] == 1
    assert {line["opaque_id"] for line in lines} == jane and len(lines) == 4  # both stages, both platforms
    assert all(datetime.fromisoformat(line["consent_at"]) == JANE_CONSENT for line in lines)
    assert counts["lists_now"] == {"google_customer_match": 1, "meta_audience": 1}
    # her phone in another format, or Bob's patient ID, find the same way
    by_phone, _ = _recall(sent, tmp_path, "phone: +1 415-555-0123\n")
    assert by_phone == counts
    bob, bob_lines = _recall(sent, tmp_path, "patient_id: PAT-BOB\n")
    assert bob["persons"] == 1 and bob["leads"] == 1  # his lead has no patient_id: linked by email
    assert len(bob_lines) == 4 and not {line["opaque_id"] for line in bob_lines} & jane
    nobody, none = _recall(sent, tmp_path, "email: someone.else@yahoo.com\n")
    assert nobody["persons"] == 0 and none == [] and nobody["lists_now"] == {
        "google_customer_match": 0, "meta_audience": 0
    }  # fmt: skip


def test_a_person_file_line_that_is_not_an_identifier_names_the_line_not_the_value(
    sent: Path, tmp_path: Path
) -> None:
    person = tmp_path / "request.txt"
    person.write_text("email: jane.canary@gmail.com\nJanecanary Doecanary\n")
    result = RUNNER.invoke(app, ["disclosures", "--config", str(sent), "--person", str(person)])
    assert (
        result.exit_code == 2
        and "line 2" in " ".join(result.stderr.split())
        and "canary" not in result.output
    )


def test_a_plan_written_before_the_consent_record_still_publishes(tmp_path: Path) -> None:
    # an upgrade between build_conversions and validate_outbound: the candidate file has no
    # consent column, and every retry of validate_outbound failed on it
    import pandas as pd

    from etl.deliver import consent_granted

    older = tmp_path / "conversions.parquet"
    pd.DataFrame({"opaque_id": ["a" * 64], "stage": ["purchase"]}).to_parquet(older, index=False)
    assert consent_granted(older) == {} and consent_granted(tmp_path / "gone.parquet") == {}


def test_a_config_path_that_is_a_folder_is_one_clear_error(tmp_path: Path) -> None:
    result = RUNNER.invoke(app, ["disclosures", "--config", str(tmp_path)])
    flat = " ".join(result.stderr.split())
    assert result.exit_code == 2 and "cannot read the config file" in flat and "--csv" not in flat


def test_left_means_a_request_carried_it(tmp_path: Path) -> None:
    # a row our own checks refused never left; one deferred after a request carried it did
    from etl import ledger
    from etl.deliver import _entry
    from etl.destinations.base import Outcome, RowResult
    from etl.disclosures import account

    results = [
        RowResult("a" * 64, Outcome.REJECTED, "invalid_format", transmitted=False),
        RowResult("b" * 64, Outcome.DEFERRED, "throttled/2", transmitted=True),
        RowResult("c" * 64, Outcome.DEFERRED, "validate_only", transmitted=False),
        RowResult("d" * 64, Outcome.ACCEPTED, request_id="r-1"),
    ]
    url = f"sqlite:///{tmp_path / 's.sqlite'}"
    at = datetime(2026, 6, 1, tzinfo=UTC)
    with store.engine_for(url) as engine:
        ledger.write_ledger(engine, "c1", "meta_events", [_entry(r, {}) for r in results], run_id="r", at=at)
        counts = account(engine, "c1", since=None, until=None)
        # the deferred row goes again and is accepted: it first left at the first request
        later = datetime(2026, 6, 2, tzinfo=UTC)
        again = [_entry(RowResult("b" * 64, Outcome.ACCEPTED, request_id="r-2"), {})]
        ledger.write_ledger(engine, "c1", "meta_events", again, run_id="r2", at=later)
        with engine.connect() as conn:
            sent_at = conn.execute(
                sa.select(store.send_ledger.c.sent_at).where(store.send_ledger.c.opaque_id == "b" * 64)
            ).scalar_one()
    assert {status: n for (_, _, status), n in counts.conversions.items()} == {"deferred": 1, "accepted": 1}
    assert _as_utc(sent_at) == at


def test_list_syncs_are_counted_once_each_whatever_reruns_follow(sent: Path) -> None:
    # run_summaries and audience_syncs keep only a run's latest attempt: a rerun of the interval
    # (its sync adds nothing new), a dry run or a validate-only run over it erased the first
    # sync's adds from the account
    def lists() -> dict[str, dict[str, int]]:
        result = RUNNER.invoke(app, ["disclosures", "--config", str(sent), "--json"])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["lists"]

    first = {"syncs": 1, "adds": 2, "removes": 0, "members_now": 2}
    assert lists() == {"google_customer_match": first, "meta_audience": first}
    for mode in (["--target", "sandbox"], ["--dry-run"], ["--target", "sandbox", "--validate-only"]):
        result = RUNNER.invoke(app, ["run", "--config", str(sent), "--start", "2026-05-01", "--end", "2026-06-30",
                                     *mode])  # fmt: skip
        assert result.exit_code == 0, result.output
    both = {"syncs": 2, "adds": 2, "removes": 0, "members_now": 2}  # the rerun's sync applied nothing new
    assert lists() == {"google_customer_match": both, "meta_audience": both}


def test_what_validate_only_requests_carried_is_accounted_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Google validates a request's rows without keeping them, but the hashes left the building:
    # the account said "nothing sent in this period" after a validate-only run. Meta's checks
    # are local (nothing leaves), so only Google's rows are counted
    monkeypatch.setenv("MEDSPA_ID_SECRET", SECRET.decode())
    config = _clinic(tmp_path)
    result = RUNNER.invoke(app, ["run", "--config", str(config), "--start", "2026-05-01", "--end", "2026-06-30",
                                 "--target", "sandbox", "--validate-only"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert _ledger(tmp_path) == []  # the ledger is still untouched
    out_csv = tmp_path / "disclosures.csv"
    result = RUNNER.invoke(app, ["disclosures", "--config", str(config), "--csv", str(out_csv), "--json"])
    assert result.exit_code == 0, result.output
    counts = json.loads(result.stdout)
    assert counts["conversions"] == [] and counts["target"] is None
    assert counts["validate_only"] == [
        {"destination": "google_conversions", "target": "sandbox", "conversions": 4, "list_adds": 0, "list_removes": 0},
        {"destination": "google_customer_match", "target": "sandbox", "conversions": 0, "list_adds": 2,
         "list_removes": 0},
    ]  # fmt: skip
    with out_csv.open(newline="", encoding="utf-8") as handle:
        lines = list(csv.DictReader(handle))
    jane = opaque_id(SECRET, "sunrise-medspa", "purchase", "APPT-JANE-1")
    assert {(line["destination"], line["status"]) for line in lines} == {
        ("google_conversions", "validate_only")
    }
    assert jane in {line["opaque_id"] for line in lines} and len(lines) == 4
    assert all(line["run_id"] and datetime.fromisoformat(line["sent_at"]).tzinfo for line in lines)
    table = RUNNER.invoke(app, ["disclosures", "--config", str(config)])
    assert "validate only" in table.stdout and "nothing sent" not in table.stdout, table.output
    # one person's request finds them too
    person = tmp_path / "person.txt"
    person.write_text("email: jane.canary@gmail.com\n", encoding="utf-8")
    result = RUNNER.invoke(app, ["disclosures", "--config", str(config), "--person", str(person), "--json"])
    assert result.exit_code == 0, result.output
    assert sorted(
        (c["destination"], c["stage"], c["status"], c["rows"])
        for c in json.loads(result.stdout)["conversions"]
    ) == [
        ("google_conversions", "consultation", "validate_only", 1),
        ("google_conversions", "purchase", "validate_only", 1),
    ]
    everything = result.output + out_csv.read_text(encoding="utf-8") + table.output
    assert not [raw for raw in RAW if raw in everything]


def test_one_persons_request_on_a_database_that_only_validated_live_needs_the_real_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # only `--target live --validate-only` runs so far (before go-live): no live claim, so the
    # development key was used to match, and the person's rows (made with the real secret)
    # were not found, with only a warning
    from etl import ledger

    config = _clinic(tmp_path)
    url = f"sqlite:///{tmp_path / 'var' / 'sunrise-medspa.sqlite'}"
    with store.engine_for(url) as engine:
        ledger.record_validation(engine, "sunrise-medspa", "google_conversions", target="live", run_id="r1",
                                 at=datetime(2026, 6, 1, tzinfo=UTC), conversions=[("a" * 64, "purchase", None, None)])  # fmt: skip
    person = tmp_path / "person.txt"
    person.write_text("email: jane.canary@gmail.com\n", encoding="utf-8")
    monkeypatch.delenv("MEDSPA_ID_SECRET", raising=False)
    result = RUNNER.invoke(app, ["disclosures", "--config", str(config), "--person", str(person)])
    assert result.exit_code == 2 and "MEDSPA_ID_SECRET is not set" in result.stderr, result.output
