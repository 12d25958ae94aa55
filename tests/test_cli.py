"""The command line as a user meets it: help that teaches, one clear error per bad input."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml
from typer.testing import CliRunner

from etl import ledger, store
from etl.cli import app
from etl.errors import ConfigError, MachineError
from tests.conftest import BASE_CONFIG, DATA

RUNNER = CliRunner()
GOOD = DATA / "rules" / "reschedule"


def clinic(tmp_path: Path, appointments: Path, encoding: str | None = None) -> Path:
    """A clinic whose appointment export is ``appointments`` and whose leads are a good file."""
    shutil.copy(appointments, tmp_path / "appointments.csv")
    shutil.copy(GOOD / "leads.csv", tmp_path / "leads.csv")
    raw = yaml.safe_load(yaml.safe_dump(BASE_CONFIG))
    if encoding:
        raw["sources"]["appointments"]["encoding"] = encoding
    (tmp_path / "clinic.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path / "clinic.yaml"


def run(config: Path) -> object:
    return RUNNER.invoke(
        app,
        ["run", "--config", str(config), "--start", "2026-05-01", "--end", "2026-06-30", "--dry-run"],
    )


def test_help_teaches() -> None:
    result = RUNNER.invoke(app, ["run", "--help"])
    assert result.exit_code == 0
    for word in ("--dry-run", "--target", "--start", "late_arrival_days", "already_sent"):
        assert word in result.stdout


def test_good_run_prints_counts_and_the_outbox(tmp_path: Path) -> None:
    result = run(clinic(tmp_path, GOOD / "appointments.csv"))
    assert result.exit_code == 0, result.output
    assert "conversions: consultation" in result.stdout
    assert "outbox:" in result.stderr
    (run_dir,) = (tmp_path / "var" / "runs").iterdir()
    assert (run_dir / "outbox" / "summary.json").exists() and (run_dir / "report.html").exists()
    # the hashed copies of both exports are gone once the run reported: not a copy a night
    assert not (run_dir / "extract").exists()


def test_a_header_only_export_runs_but_is_named_in_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = clinic(tmp_path, GOOD / "appointments.csv")
    leads = tmp_path / "leads.csv"
    leads.write_text(leads.read_text().splitlines()[0] + "\n")  # the header alone
    result = run(config)
    assert result.exit_code == 0, result.output
    warned = [
        r.getMessage()
        for r in caplog.records
        if r.levelname == "WARNING" and "holds no rows" in r.getMessage()
    ]
    assert warned == ["leads: the export holds no rows (a quiet day, or an export cut short upstream?)"]


@pytest.mark.parametrize(
    ("fixture", "encoding", "expected"),
    [
        ("missing_column.csv", None, "line 1, column 'start_at': missing required column"),
        ("bad_date.csv", None, "column 'start_at': not an ISO 8601"),
        ("undecodable.csv", None, "neither UTF-8 nor cp1252 text"),
        ("cp1252.csv", "utf-8", "appointments.csv"),
        ("empty.csv", None, "file is empty"),
        ("duplicate_header.csv", None, "line 1, column 'status': duplicate column header"),
    ],
    ids=["missing_column", "bad_date", "undecodable", "wrong_encoding", "empty_file", "duplicate_header"],
)
def test_bad_input_gives_one_clear_error_and_no_outbox(
    fixture: str, encoding: str | None, expected: str, tmp_path: Path
) -> None:
    result = run(clinic(tmp_path, DATA / "extract" / fixture, encoding))
    assert result.exit_code == 2
    assert "appointments.csv" in result.stderr and expected in result.stderr
    assert result.stderr.count("error:") == 1
    assert "Traceback" not in result.output
    assert not list((tmp_path / "var").rglob("*.jsonl")) if (tmp_path / "var").exists() else True


def test_bad_config_names_the_key_path(tmp_path: Path) -> None:
    raw = yaml.safe_load(yaml.safe_dump(BASE_CONFIG))
    raw["rules"] = {"value_window_days": -3}
    raw["meta"]["pixel_id"] = "not-a-pixel"
    raw["quality"] = {"max_no_lead_share": 2}
    (tmp_path / "clinic.yaml").write_text(yaml.safe_dump(raw))
    result = run(tmp_path / "clinic.yaml")
    assert result.exit_code == 2
    assert "rules.value_window_days" in result.stderr and "meta.pixel_id" in result.stderr
    assert "quality.max_no_lead_share" in result.stderr
    assert "not-a-pixel" not in result.stderr


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        # shaped right, but no country or currency: a traceback mid-run, or every row refused
        # by the egress gate as if the data leaked
        ("default_region", "ZZ", "not an ISO 3166-1 alpha-2 country code"),
        ("currency", "XYZ", "not an ISO 4217 currency code"),
    ],
)
def test_an_unknown_region_or_currency_is_a_config_error(
    key: str, value: str, problem: str, tmp_path: Path
) -> None:
    config = clinic(tmp_path, GOOD / "appointments.csv")
    raw = yaml.safe_load(config.read_text())
    raw[key] = value
    config.write_text(yaml.safe_dump(raw))
    result = run(config)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"{key}: Value error, {problem}" in " ".join(result.stderr.split())
    assert not (tmp_path / "var").exists()  # refused before anything was written


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("consultation_value", True),  # yes: not a $1 consultation
        ("late_arrival_days", False),  # no: not zero days
        ("attribution_window_days", True),
    ],
)
def test_yaml_booleans_are_no_numbers(key: str, value: bool, tmp_path: Path) -> None:
    config = clinic(tmp_path, GOOD / "appointments.csv")
    raw = yaml.safe_load(config.read_text())
    raw["rules"] = {key: value}
    config.write_text(yaml.safe_dump(raw))
    result = run(config)
    assert result.exit_code == 2
    assert f"rules.{key}: Value error, expected a number, not true/false" in " ".join(result.stderr.split())
    # a real boolean setting still takes one
    raw["rules"] = {"suppression_requires_consent": False}
    config.write_text(yaml.safe_dump(raw))
    assert run(config).exit_code == 0


@pytest.mark.parametrize("value", [".inf", ".nan"])
def test_a_consultation_value_that_is_no_amount_is_a_config_error(value: str, tmp_path: Path) -> None:
    # YAML reads .inf as infinity: the PHI gate would refuse every consultation after staging
    config = clinic(tmp_path, GOOD / "appointments.csv")
    config.write_text(config.read_text() + f"rules:\n  consultation_value: {value}\n")
    result = run(config)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "rules.consultation_value:" in " ".join(result.stderr.split())
    assert not (tmp_path / "var").exists()  # refused before anything was written


def test_a_repeated_key_is_an_error_not_a_silent_reset(tmp_path: Path) -> None:
    config = clinic(tmp_path, GOOD / "appointments.csv")
    with config.open("a") as out:
        out.write(
            "meta:\n  pixel_id: '123456789012345'\n"
        )  # a second block: the first's settings would reset
    result = run(config)
    assert result.exit_code == 2
    assert "the key 'meta' appears twice in one mapping (line 26)" in " ".join(result.stderr.split())


def test_yaml_merge_keys_still_work_and_odd_keys_are_config_errors(tmp_path: Path) -> None:
    config = clinic(tmp_path, GOOD / "appointments.csv")
    raw = config.read_text()
    # an anchor merged into another mapping may repeat (override) a key: no duplicate
    merged = raw.replace("  leads:\n    path: leads.csv\n    profile: generic\n",
                         "  leads:\n    <<: *src\n    path: leads.csv\n", 1)  # fmt: skip
    merged = merged.replace("  appointments:\n", "  appointments: &src\n", 1)
    assert merged.count("*src") == 1 and merged.count("&src") == 1
    config.write_text(merged)
    assert run(config).exit_code == 0
    # a complex key, and phone digits pasted as a numeric key
    for extra, shown in (
        ("? [a, b]\n: 1\n", "not valid YAML"),
        ("rules: {4155550134: 3}\n", "<unnamed key>"),
    ):
        config.write_text(raw + extra)
        result = run(config)
        said = " ".join(result.stderr.split())
        assert result.exit_code == 2 and shown in said and "Traceback" not in result.output, said
        assert "4155550134" not in result.output


def test_a_key_that_is_no_name_is_not_repeated_in_the_error(tmp_path: Path) -> None:
    config = clinic(tmp_path, GOOD / "appointments.csv")
    with config.open("a") as out:  # a patient's address pasted where a key belongs
        out.write("zq.canary@gmail.com: Zqfirst Zqlast\nexclude_typo: 1\n")
    result = run(config)
    assert result.exit_code == 2
    said = " ".join(result.stderr.split())
    assert "<unnamed key>: Extra inputs are not permitted" in said
    assert "exclude_typo: Extra inputs are not permitted" in said  # a name is shown
    assert "zq.canary" not in result.output and "Zqfirst" not in result.output


@pytest.mark.parametrize(
    ("meta", "expected"),
    [
        ({"action_source": "website"}, "page URL, IP, user agent"),
        ({"action_source": "app"}, "page URL, IP, user agent"),
        ({"action_source": "phone_call", "max_event_age_days": 30}, "Meta takes phone_call"),
        ({"ldu_state": 1001}, "meta.ldu_state"),
        ({"ldu_country": 2}, "meta.ldu_country"),
        # sent to Meta as they are: a treatment in the name tells Meta what each person had done
        (
            {"event_names": {"consultation": "ConsultationAttended", "purchase": "BotoxLipFiller"}},
            "meta.event_names.purchase: Value error, 'Botox', 'Lip', 'Filler' is not a generic word",
        ),
        (
            {"event_names": {"consultation": "laser_consult", "purchase": "Purchase"}},
            "meta.event_names.consultation: Value error, 'laser' is not a generic word",
        ),
    ],
)
def test_meta_settings_meta_would_refuse_every_event_for_are_config_errors(
    meta: dict[str, object], expected: str, tmp_path: Path
) -> None:
    # caught here, not as every event rejected for good (rejected is a final ledger state)
    raw = yaml.safe_load(yaml.safe_dump(BASE_CONFIG))
    raw["meta"].update(meta)
    if "max_event_age_days" not in meta:
        raw["meta"].pop("max_event_age_days", None)
    (tmp_path / "clinic.yaml").write_text(yaml.safe_dump(raw))
    result = run(tmp_path / "clinic.yaml")
    said = " ".join(result.stderr.split())
    assert result.exit_code == 2 and expected in said and "meta" in said, said
    assert not (tmp_path / "var").exists()


@pytest.mark.parametrize("name", ["ConsultationAttended", "Purchase", "Lead", "Schedule", "CompleteRegistration",
                                  "first_visit_2", "NewClientConsultV2", "DepositPaid", "lead_v3"])  # fmt: skip
def test_generic_event_names_pass(name: str) -> None:
    from etl.config import non_generic_words

    assert non_generic_words(name) == []


@pytest.mark.parametrize(("name", "odd"), [("Purchase_B_O_T_O_X", ["B", "O", "T", "O", "X"]),
                                           ("Lead_i_p_l", ["i", "p", "l"]), ("PatientVisit", ["Patient"]),
                                           ("V2Lead", ["V"])])  # fmt: skip
def test_letters_spelling_a_word_and_health_words_do_not_pass(name: str, odd: list[str]) -> None:
    from etl.config import non_generic_words

    assert non_generic_words(name) == odd


def test_data_manager_refuses_a_conversion_action_or_list_of_another_customer(tmp_path: Path) -> None:
    # Data Manager sends to customer_id as the operating account, which must own the action
    # (ad-platforms.md A5); a manager's action passed config and the sandbox, and would be
    # refused or land elsewhere live. The Google Ads API may send through a manager.
    raw = yaml.safe_load(yaml.safe_dump(BASE_CONFIG))
    raw["google_ads"]["conversion_actions"]["purchase"] = "customers/9999999999/conversionActions/222"
    (tmp_path / "clinic.yaml").write_text(yaml.safe_dump(raw))
    result = run(tmp_path / "clinic.yaml")
    assert result.exit_code == 2
    told = " ".join(result.stderr.split())
    assert "google_ads" in told and "conversion_actions.purchase belongs to customer 9999999999" in told
    raw["google_ads"]["conversion_actions"]["purchase"] = "customers/1234567890/conversionActions/222"
    raw["google_ads"]["suppression_user_list"] = "customers/9999999999/userLists/333"
    (tmp_path / "clinic.yaml").write_text(yaml.safe_dump(raw))
    assert "suppression_user_list belongs to customer" in " ".join(
        run(tmp_path / "clinic.yaml").stderr.split()
    )
    raw["google_ads"]["api"] = "google_ads"
    from etl.config import ClinicConfig

    assert ClinicConfig.model_validate({**raw, "base_dir": tmp_path}).google_ads is not None


def test_a_password_in_the_yaml_is_refused_and_the_environment_carries_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = yaml.safe_load(yaml.safe_dump(BASE_CONFIG))
    raw["database_url"] = "postgresql://medspa:hunter2@db/medspa"
    raw["sources"]["leads"] = {"sql_url": "postgresql://pms:s3cret@pms/pms", "query": "leads.sql"}
    (tmp_path / "clinic.yaml").write_text(yaml.safe_dump(raw))
    result = run(tmp_path / "clinic.yaml")
    assert result.exit_code == 2
    assert "database_url" in result.stderr and "MEDSPA_DATABASE_URL" in result.stderr
    assert "sources.leads.sql_url" in result.stderr and "sql_url_env" in result.stderr
    assert "hunter2" not in result.output and "s3cret" not in result.output
    # the same URLs from the environment: accepted, and the staging one used when the YAML has none
    from etl.config import ClinicConfig

    monkeypatch.setenv("PMS_URL", "sqlite:///pms.sqlite")
    monkeypatch.setenv("MEDSPA_DATABASE_URL", "postgresql://medspa:hunter2@db/medspa")
    raw.pop("database_url")
    raw["sources"]["leads"] = {"sql_url_env": "PMS_URL", "query": "leads.sql"}
    config = ClinicConfig.model_validate({**raw, "base_dir": tmp_path})
    assert config.sources.leads.source_url() == "sqlite:///pms.sqlite"
    assert config.resolved_database_url() == "postgresql://medspa:hunter2@db/medspa"
    assert config.resolved_database_url("sqlite:///other.sqlite").endswith("other.sqlite")
    monkeypatch.delenv("PMS_URL")
    with pytest.raises(ConfigError, match="PMS_URL is not set"):
        config.sources.leads.source_url()


def test_live_send_refuses_the_development_key(tmp_path: Path) -> None:
    config = clinic(tmp_path, GOOD / "appointments.csv")
    result = RUNNER.invoke(app, ["run", "--config", str(config), "--end", "2026-06-30", "--target", "live"])
    assert result.exit_code == 2
    assert "MEDSPA_ID_SECRET" in result.stderr
    assert not (tmp_path / "var").exists()


def test_doctor_says_what_is_missing_without_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = clinic(tmp_path, GOOD / "appointments.csv")
    missing = RUNNER.invoke(app, ["doctor", "--config", str(config)])
    assert missing.exit_code == 1
    assert "MEDSPA_ID_SECRET" in missing.stdout and "META_ACCESS_TOKEN" in missing.stdout
    monkeypatch.setenv("MEDSPA_ID_SECRET", "s3cret-value-0123456789")
    monkeypatch.setenv("META_ACCESS_TOKEN", "EAAB-token-value-xyz")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "nope.json"))
    partial = RUNNER.invoke(app, ["doctor", "--config", str(config)])
    assert "s3cret-value" not in partial.output and "EAAB-token" not in partial.output
    assert "sources.appointments" in partial.stdout and "staging database" in partial.stdout
    # a path where a URL belongs is a finding, not a crash
    bad = RUNNER.invoke(app, ["doctor", "--config", str(config), "--database", str(tmp_path / "x.sqlite")])
    assert bad.exit_code == 1 and "not a database URL" in bad.stdout
    assert bad.exception is None or isinstance(bad.exception, SystemExit)  # no crash


def test_doctor_opens_the_exports_as_a_run_would(tmp_path: Path) -> None:
    config = clinic(tmp_path, GOOD / "appointments.csv")
    good = RUNNER.invoke(app, ["doctor", "--config", str(config)])
    assert "columns mapped" in good.stdout
    # the vendor renamed a column in its new export; doctor says so before the nightly run does
    lines = (GOOD / "appointments.csv").read_text(encoding="utf-8").splitlines()
    lines[0] = lines[0].replace("status", "state_of_visit")
    (tmp_path / "renamed.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    renamed = RUNNER.invoke(
        app, ["doctor", "--config", str(clinic(tmp_path, tmp_path / "renamed.csv"))], env={"COLUMNS": "250"}
    )  # one line per check
    assert renamed.exit_code == 1
    assert "invalid: appointments.csv, line 1, column 'status': missing required column" in renamed.stdout


def test_an_outbox_folder_holding_other_files_is_refused_and_kept(tmp_path: Path) -> None:
    # the outbox replaces its whole folder: pointed at the clinic's own folder, it took the
    # YAML, the exports and the staging database with it
    raw = yaml.safe_load(yaml.safe_dump(BASE_CONFIG))
    (tmp_path / "clinic.yaml").write_text(yaml.safe_dump(raw))
    for name in ("appointments.csv", "leads.csv"):
        shutil.copy(DATA / "rules" / "consent_revoked" / name, tmp_path / name)
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine", encoding="utf-8")
    for outbox in (keep, tmp_path):
        result = CliRunner().invoke(app, ["run", "--config", str(tmp_path / "clinic.yaml"), "--start", "2026-05-01",
                                          "--end", "2026-06-30", "--dry-run", "--outbox", str(outbox)],
                                    env={"COLUMNS": "250"})  # fmt: skip
        assert result.exit_code == 2 and "give a new or empty one" in result.stderr
        assert "notes.txt" not in result.stderr and "Traceback" not in result.output
    assert (keep / "notes.txt").read_text(encoding="utf-8") == "mine" and (tmp_path / "clinic.yaml").exists()
    # an earlier outbox in that place is replaced as before
    fresh = tmp_path / "out"
    argv = ["run", "--config", str(tmp_path / "clinic.yaml"), "--start", "2026-05-01", "--end", "2026-06-30",
            "--dry-run", "--outbox", str(fresh)]  # fmt: skip
    assert CliRunner().invoke(app, argv).exit_code == 0
    assert CliRunner().invoke(app, argv).exit_code == 0 and (fresh / "summary.json").exists()


def test_an_outbox_under_a_file_is_refused_before_the_extract(tmp_path: Path) -> None:
    # found only when the plan was published, after minutes of work, as a machine error
    config = _sandbox_clinic(tmp_path)
    (tmp_path / "a-file").write_text("x", encoding="utf-8")
    result = RUNNER.invoke(app, _run_args(config, "--dry-run", "--outbox", str(tmp_path / "a-file" / "out")))
    said = " ".join(result.stderr.split())
    assert result.exit_code == ConfigError.exit_code, result.output
    assert "cannot be created" in said and "is not a folder this user may write" in said
    assert not list((tmp_path / "var" / "runs").rglob("*.parquet"))  # nothing extracted


@pytest.mark.parametrize(
    ("database", "code", "expected"),
    [
        ("/tmp/not-a-url.sqlite", 2, "not a database URL"),
        ("foo://bar", 2, "not a database URL"),
        ("sqlite:////proc/medspa/db.sqlite", 2, "cannot create the folder"),
        ("postgresql+psycopg2://medspa@127.0.0.1:9/medspa", 7, "cannot open it"),
        ("postgresql+psycopg2://medspa@127.0.0.1:9/medspa", 7, "that it is reachable"),
    ],
)
def test_a_database_that_cannot_be_used_is_one_clear_error_before_any_work(
    database: str, code: int, expected: str, tmp_path: Path
) -> None:
    raw = yaml.safe_load(yaml.safe_dump(BASE_CONFIG))
    (tmp_path / "clinic.yaml").write_text(yaml.safe_dump(raw))
    for name in ("appointments.csv", "leads.csv"):
        shutil.copy(DATA / "rules" / "consent_revoked" / name, tmp_path / name)
    result = CliRunner().invoke(app, ["run", "--config", str(tmp_path / "clinic.yaml"), "--start", "2026-05-01",
                                      "--end", "2026-06-30", "--dry-run", "--database", database])  # fmt: skip
    assert result.exit_code == code, result.output
    assert expected in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "var" / "runs").exists() or not any((tmp_path / "var" / "runs").rglob("*.parquet"))


def test_error_text_is_printed_as_text_not_markup(tmp_path: Path) -> None:
    raw = yaml.safe_load(yaml.safe_dump(BASE_CONFIG))
    raw["clinic_id"] = "Not Valid!"
    folder = tmp_path / "[a-z]"
    folder.mkdir()
    (folder / "clinic.yaml").write_text(yaml.safe_dump(raw))
    result = run(folder / "clinic.yaml")
    assert result.exit_code == 2
    text = result.stderr.replace("\n", "")
    assert "[a-z]" in text and "[a-z0-9][a-z0-9_-]{0,62}" in text


def test_a_live_run_missing_a_platform_credential_stops_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the ID secret is there, the platforms' credentials are not: found before the extract, for both
    config = clinic(tmp_path, GOOD / "appointments.csv")
    monkeypatch.setenv("MEDSPA_ID_SECRET", "s3cret-value-0123456789")
    result = RUNNER.invoke(app, ["run", "--config", str(config), "--end", "2026-06-30", "--target", "live"])
    assert result.exit_code == 2
    text = result.stderr.replace("\n", " ")
    assert "not ready for a live run" in text and "META_ACCESS_TOKEN" in text and "doctor" in text
    assert "s3cret-value" not in result.output
    assert not (tmp_path / "var" / "runs").exists()


def test_a_validate_only_run_says_so_in_its_summary(tmp_path: Path) -> None:
    config = clinic(tmp_path, GOOD / "appointments.csv")
    argv = [
        "run",
        "--config",
        str(config),
        "--start",
        "2026-05-01",
        "--end",
        "2026-06-30",
        "--target",
        "sandbox",
    ]
    result = RUNNER.invoke(app, [*argv, "--validate-only", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["validate_only"] is True and summary["dry_run"] is False
    assert summary["destinations"]["google_conversions"]["accepted"] > 0  # Google validated them
    table = RUNNER.invoke(app, [*argv, "--validate-only"])
    assert "validate only" in table.stdout
    from etl import store

    (database,) = (tmp_path / "var").glob("*.sqlite")
    with store.engine_for(f"sqlite:///{database}") as engine, engine.connect() as conn:
        # nothing recorded: not even planned rows, nor a target claim
        for table_ in (store.send_ledger, store.ledger_targets, store.audience_state, store.audience_pending):
            assert conn.execute(sa.select(sa.func.count()).select_from(table_)).scalar() == 0, table_.name
    real = RUNNER.invoke(app, [*argv, "--json"])
    assert real.exit_code == 0 and "validate_only" not in json.loads(real.stdout)


def test_synth_prints_counts_as_numbers_and_refuses_bad_input(tmp_path: Path) -> None:
    made = RUNNER.invoke(
        app, ["synth", "--out", str(tmp_path / "c"), "--appointments", "50", "--leads", "20"]
    )
    assert made.exit_code == 0, made.output
    counts = json.loads(made.stdout)
    assert all(isinstance(v, int) for k, v in counts.items() if k.endswith("rows"))
    for argv in (["--appointments", "-5"], ["--leads", "-1"], ["--end", "notadate"]):
        bad = RUNNER.invoke(app, ["synth", "--out", str(tmp_path / "d"), *argv])
        assert bad.exit_code == 2, argv
        assert bad.exception is None or isinstance(bad.exception, SystemExit), argv  # no crash


def test_synth_into_a_file_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("not a folder", encoding="utf-8")
    result = RUNNER.invoke(
        app, ["synth", "--out", str(tmp_path / "taken"), "--appointments", "5", "--leads", "2"]
    )
    assert result.exit_code == 2 and "cannot write the clinic there" in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert (tmp_path / "taken").read_text(encoding="utf-8") == "not a folder"


def test_synth_overwrites_its_own_clinic_and_refuses_a_real_one(tmp_path: Path) -> None:
    argv = ["synth", "--appointments", "30", "--leads", "10"]
    assert RUNNER.invoke(app, [*argv, "--out", str(tmp_path / "c")]).exit_code == 0
    assert RUNNER.invoke(app, [*argv, "--out", str(tmp_path / "c"), "--seed", "8"]).exit_code == 0
    real = tmp_path / "real"
    (real / "exports").mkdir(parents=True)
    (real / "clinic.yaml").write_text(yaml.safe_dump(BASE_CONFIG), encoding="utf-8")
    shutil.copy(GOOD / "appointments.csv", real / "exports" / "appointments.csv")
    refused = RUNNER.invoke(app, [*argv, "--out", str(real)], env={"COLUMNS": "250"})
    assert refused.exit_code == 2 and "synth did not write" in refused.output
    assert (real / "clinic.yaml").read_text(encoding="utf-8") == yaml.safe_dump(BASE_CONFIG)
    assert (real / "exports" / "appointments.csv").read_bytes() == (GOOD / "appointments.csv").read_bytes()
    assert not (real / "exports" / "leads.csv").exists()


def test_one_platform_refusing_the_account_stops_neither_the_other_nor_the_report(tmp_path: Path) -> None:
    # as in the DAG: Google refuses (a conversion action of another customer); Meta's events and
    # both lists still go, the summary and report are written, and the exit code says what stopped
    shutil.copy(GOOD / "appointments.csv", tmp_path / "appointments.csv")
    shutil.copy(GOOD / "leads.csv", tmp_path / "leads.csv")
    raw = yaml.safe_load(yaml.safe_dump(BASE_CONFIG))
    raw["google_ads"]["api"] = "google_ads"
    raw["google_ads"]["conversion_actions"] = {
        stage: action.replace("customers/1234567890/", "customers/9999999999/")
        for stage, action in raw["google_ads"]["conversion_actions"].items()
    }
    (tmp_path / "clinic.yaml").write_text(yaml.safe_dump(raw))
    result = RUNNER.invoke(app, ["run", "--config", str(tmp_path / "clinic.yaml"), "--start", "2026-05-01",
                                 "--end", "2026-06-30", "--target", "sandbox"])  # fmt: skip
    assert result.exit_code == 5 and "NO_CONVERSION_ACTION_FOUND" in result.stderr
    (summary_file,) = (tmp_path / "var" / "runs").glob("*/outbox/summary.json")
    destinations = json.loads(summary_file.read_text(encoding="utf-8"))["destinations"]
    assert destinations["meta_events"]["accepted"] > 0 and destinations["google_conversions"]["accepted"] == 0
    assert destinations["meta_audience"]["sent_adds"] > 0
    assert (summary_file.parent.parent / "report.html").exists()


def test_a_send_another_process_holds_exits_8_after_the_others_and_the_report(tmp_path: Path) -> None:
    # a CLI run beside a DAG task that is sending Meta events: this run's Meta upload is refused
    # before it reads the ledger; Google's conversions and both lists still go
    from datetime import UTC, datetime

    from etl import store

    shutil.copy(GOOD / "appointments.csv", tmp_path / "appointments.csv")
    shutil.copy(GOOD / "leads.csv", tmp_path / "leads.csv")
    (tmp_path / "clinic.yaml").write_text(yaml.safe_dump(BASE_CONFIG))
    url = f"sqlite:///{tmp_path / 'staging.sqlite'}"
    now = datetime.now(UTC)
    with store.engine_for(url) as engine, engine.begin() as conn:
        conn.execute(store.send_leases.insert(), {
            "clinic_id": BASE_CONFIG["clinic_id"], "destination": "meta_events", "holder": "w2:7:x",
            "run_id": "scheduled__2026-06-30", "host": "w2", "pid": 7, "acquired_at": now, "renewed_at": now})  # fmt: skip
    result = RUNNER.invoke(app, ["run", "--config", str(tmp_path / "clinic.yaml"), "--start", "2026-05-01",
                                 "--end", "2026-06-30", "--target", "sandbox", "--database", url])  # fmt: skip
    assert result.exit_code == 8, result.output
    assert "upload_meta stopped" in result.stderr and "run scheduled__2026-06-30" in result.stderr
    (summary_file,) = (tmp_path / "var" / "runs").glob("*/outbox/summary.json")
    destinations = json.loads(summary_file.read_text(encoding="utf-8"))["destinations"]
    assert destinations["google_conversions"]["accepted"] > 0 and destinations["meta_events"]["sent"] == 0
    assert destinations["meta_audience"]["sent_adds"] > 0


def test_a_sandbox_run_on_a_database_that_sends_live_publishes_nothing(tmp_path: Path) -> None:
    # the claim was checked after the outbox was published: the refused run left an outbox
    # that read as ready to send
    from datetime import UTC, datetime

    from etl import ledger, store

    config = clinic(tmp_path, GOOD / "appointments.csv")
    database = tmp_path / "var" / "live.sqlite"
    database.parent.mkdir(parents=True, exist_ok=True)
    with store.engine_for(f"sqlite:///{database}") as engine:
        ledger.claim_target(
            engine, "sunrise-medspa", "live", run_id="night-1", at=datetime(2026, 6, 1, tzinfo=UTC)
        )
    result = RUNNER.invoke(app, ["run", "--config", str(config), "--start", "2026-05-01", "--end", "2026-06-30",
                                 "--target", "sandbox", "--database", f"sqlite:///{database}"])  # fmt: skip
    assert result.exit_code == ConfigError.exit_code and "holds live sends" in result.stderr
    assert not list((tmp_path / "var" / "runs").glob("*/outbox/summary.json"))
    with store.engine_for(f"sqlite:///{database}") as engine, engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(store.send_ledger)).scalar() == 0


def _sandbox_clinic(tmp_path: Path) -> Path:
    shutil.copy(GOOD / "appointments.csv", tmp_path / "appointments.csv")
    shutil.copy(GOOD / "leads.csv", tmp_path / "leads.csv")
    (tmp_path / "clinic.yaml").write_text(yaml.safe_dump(BASE_CONFIG))
    return tmp_path / "clinic.yaml"


def _run_args(config: Path, *mode: str) -> list[str]:
    return ["run", "--config", str(config), "--start", "2026-05-01", "--end", "2026-06-30", *mode]


def test_a_dry_run_or_validate_only_run_after_a_real_run_leaves_what_was_sent_on_record(
    tmp_path: Path,
) -> None:
    # they shared the interval's run id and folder: previewing an interval already sent replaced
    # its outbox, summary.json and report.html, and its newest run_summaries row said dry_run
    config = _sandbox_clinic(tmp_path)
    assert RUNNER.invoke(app, _run_args(config, "--target", "sandbox")).exit_code == 0
    (real_dir,) = (tmp_path / "var" / "runs").iterdir()
    files = {p: p.read_bytes() for p in (real_dir / "outbox").iterdir()} | {
        real_dir / "report.html": (real_dir / "report.html").read_bytes()
    }
    assert json.loads((real_dir / "outbox" / "summary.json").read_text())["destinations"]["meta_events"][
        "sent"
    ]
    for mode, label in (
        (["--dry-run"], "dry-run"),
        (["--target", "sandbox", "--validate-only"], "validate-only"),
    ):
        again = RUNNER.invoke(app, _run_args(config, *mode))
        assert again.exit_code == 0, again.output
        assert f"{real_dir.name}__{label}" in " ".join(again.stderr.split())  # its outbox and report
        assert (real_dir.with_name(f"{real_dir.name}__{label}") / "outbox" / "summary.json").exists()
    assert {p: p.read_bytes() for p in files} == files
    database = f"sqlite:///{tmp_path / 'var' / 'sunrise-medspa.sqlite'}"
    with store.engine_for(database) as engine, engine.connect() as conn:
        rows = conn.execute(sa.select(store.run_summaries.c.run_id, store.run_summaries.c.dry_run)).all()
    assert sorted(rows) == sorted(
        [
            (real_dir.name, False),
            (f"{real_dir.name}__dry-run", True),
            (f"{real_dir.name}__validate-only", False),
        ]
    )


def test_one_interval_written_with_another_offset_is_the_same_run(tmp_path: Path) -> None:
    # the run id took the offset as typed: 07:00Z and the clinic-local date it is made two runs
    # (two folders, two locks, and a rerun's list sync skipped as another run's)
    config = _sandbox_clinic(tmp_path)
    by_date = RUNNER.invoke(app, _run_args(config, "--dry-run", "--json"))
    by_utc = RUNNER.invoke(app, ["run", "--config", str(config), "--start", "2026-05-01T07:00Z",
                                 "--end", "2026-06-30T07:00:00+00:00", "--dry-run", "--json"])  # fmt: skip
    assert by_date.exit_code == by_utc.exit_code == 0, by_utc.output
    assert [p.name for p in (tmp_path / "var" / "runs").iterdir()] == [
        "sunrise-medspa__20260501T0000-0700__20260630T0000-0700__dry-run"
    ]
    first, second = json.loads(by_date.stdout), json.loads(by_utc.stdout)
    assert (first["start"], first["end"]) == (second["start"], second["end"])


def test_a_report_the_disk_refuses_after_every_send_is_one_clear_error(tmp_path: Path) -> None:
    # the sends all went and are recorded; the report could not be written (a full disk, say):
    # exit 9 naming the step and the path, not a traceback exiting 1
    config = _sandbox_clinic(tmp_path)
    first = RUNNER.invoke(app, _run_args(config, "--dry-run"))
    assert first.exit_code == 0
    (dry_dir,) = (tmp_path / "var" / "runs").iterdir()
    run_dir = dry_dir.with_name(dry_dir.name.removesuffix("__dry-run"))  # the real run's folder
    (run_dir / "report.html").mkdir(parents=True)  # the report's atomic rename now fails, as on a broken disk
    (run_dir / "report.html" / "keep").write_text("x")
    result = RUNNER.invoke(app, _run_args(config, "--target", "sandbox"))
    assert result.exit_code == MachineError.exit_code, result.output
    assert "error: report:" in result.stderr and "report.html" in result.stderr
    assert "Traceback" not in result.output
    with store.engine_for(f"sqlite:///{tmp_path / 'var' / 'sunrise-medspa.sqlite'}") as engine:
        accepted = ledger.read_ledger(engine, "sunrise-medspa", "meta_events")
    assert accepted and {e.status for e in accepted.values()} == {"accepted"}  # the sends stand


def test_a_dry_runs_machine_error_does_not_point_at_a_send_ledger(tmp_path: Path) -> None:
    config = _sandbox_clinic(tmp_path)
    assert RUNNER.invoke(app, _run_args(config, "--dry-run")).exit_code == 0
    (run_dir,) = (tmp_path / "var" / "runs").iterdir()
    (run_dir / "report.html").unlink()
    (run_dir / "report.html").mkdir()  # the report's atomic rename now fails
    (run_dir / "report.html" / "keep").write_text("x")
    result = RUNNER.invoke(app, _run_args(config, "--dry-run"))
    said = " ".join(result.stderr.split())
    assert result.exit_code == MachineError.exit_code and "error: report:" in said, result.output
    assert "rerun the interval" in said and "send ledger" not in said


def test_upload_results_a_rerun_cannot_clear_stop_it_instead_of_being_folded_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # results/ that cannot be removed (another user's files) was passed over in silence: the
    # rerun that followed a real run reported the earlier attempt's sends as its own
    import shutil as shutil_module

    config = _sandbox_clinic(tmp_path)
    assert RUNNER.invoke(app, _run_args(config, "--target", "sandbox")).exit_code == 0
    (results,) = (tmp_path / "var" / "runs").glob("*/results")
    (published,) = (tmp_path / "var" / "runs").glob("*/outbox/summary.json")
    sent = published.read_bytes()
    real_rmtree = shutil_module.rmtree

    def rmtree(path: Any, ignore_errors: bool = False, **kwargs: Any) -> None:
        if Path(path) == results:
            if ignore_errors:
                return
            raise PermissionError(13, "Permission denied", str(path))
        real_rmtree(path, ignore_errors=ignore_errors, **kwargs)

    monkeypatch.setattr(shutil_module, "rmtree", rmtree)
    result = RUNNER.invoke(app, _run_args(config, "--target", "sandbox"))
    assert result.exit_code == MachineError.exit_code, result.output
    assert "error: extract: Permission denied (EACCES) at" in " ".join(result.stderr.split())
    # the rerun stopped at its extract: no summary of it folds the first attempt's results
    assert not published.exists() or published.read_bytes() == sent


def test_a_list_state_the_database_refuses_is_one_clear_error_after_the_other_sends(tmp_path: Path) -> None:
    config = _sandbox_clinic(tmp_path)
    with (
        store.engine_for(f"sqlite:///{tmp_path / 'var' / 'sunrise-medspa.sqlite'}") as engine,
        engine.begin() as conn,
    ):
        conn.execute(sa.text("CREATE TRIGGER no_state BEFORE INSERT ON audience_state "
                             "WHEN NEW.destination = 'google_customer_match' BEGIN SELECT RAISE(ABORT, 'x'); END"))  # fmt: skip
    result = RUNNER.invoke(app, _run_args(config, "--target", "sandbox"))
    assert result.exit_code == 7, result.output
    flat = " ".join(result.stderr.split())
    assert "google_customer_match: the list state refused what the platform applied (IntegrityError" in flat
    assert "Traceback" not in result.output
    (summary_file,) = (tmp_path / "var" / "runs").glob("*/outbox/summary.json")
    destinations = json.loads(summary_file.read_text(encoding="utf-8"))["destinations"]
    assert destinations["meta_audience"]["sent_adds"] > 0  # the sync after it still ran


def test_a_database_read_only_or_full_is_not_called_unreachable(tmp_path: Path) -> None:
    # a full disk or a read-only file is no wrong URL: the hint says where to look
    import sqlite3

    from etl.errors import StagingError

    sqlite3.connect(tmp_path / "ro.sqlite").close()  # an empty database file, opened read-only
    with pytest.raises(StagingError) as info:
        store.open_engine(f"sqlite:///file:{tmp_path}/ro.sqlite?mode=ro&uri=true")
    assert "SQLITE_READONLY" in str(info.value)
    assert "disk has space and its file and folder are writable" in str(info.value)


def test_the_summary_names_the_exports_config_and_files_of_the_run(tmp_path: Path) -> None:
    # the run's record says which export and which rules it ran on, and which bytes it planned
    import hashlib

    config = clinic(tmp_path, GOOD / "appointments.csv")
    assert run(config).exit_code == 0  # type: ignore[attr-defined]
    (summary_file,) = (tmp_path / "var" / "runs").glob("*/outbox/summary.json")
    summary = json.loads(summary_file.read_text(encoding="utf-8"))
    for kind in ("appointments", "leads"):
        digest = hashlib.sha256((tmp_path / f"{kind}.csv").read_bytes()).hexdigest()
        assert summary["sources_sha256"][kind] == digest
    assert all(isinstance(v, int) for v in summary["inputs"].values())  # counts only (a task's XCom)
    assert summary["outbox_sha256"] == {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in summary_file.parent.glob("*.jsonl")
    }
    first = summary["config_sha256"]
    # the same rules in another layout are the same config; another rule is not
    text = config.read_text()
    config.write_text("# re-saved by hand\n" + yaml.safe_dump(yaml.safe_load(text), default_flow_style=True))
    assert run(config).exit_code == 0  # type: ignore[attr-defined]
    assert json.loads(summary_file.read_text(encoding="utf-8"))["config_sha256"] == first
    raw = yaml.safe_load(text)
    raw["rules"] = {"attribution_window_days": 60}
    config.write_text(yaml.safe_dump(raw))
    assert run(config).exit_code == 0  # type: ignore[attr-defined]
    assert json.loads(summary_file.read_text(encoding="utf-8"))["config_sha256"] != first


REGISTRY = {
    "google_ads": {"basis": "marketing_authorization", "baa": False, "valid_until": "2026-11-24"},
    "meta": {"basis": "marketing_authorization", "baa": False, "valid_until": "2026-11-24"},
}


@pytest.mark.parametrize(
    ("entry", "key", "reason"),
    [
        ({"baa": True}, "compliance.legal_basis.meta.baa", "sign no business associate agreement"),
        ({"basis": "legitimate_interest"}, "compliance.legal_basis.meta.basis", "marketing authorization"),
        ({"valid_until": "next year"}, "compliance.legal_basis.meta.valid_until", "date"),
    ],
)
def test_a_legal_basis_no_send_may_rest_on_is_a_config_error(
    tmp_path: Path, entry: dict[str, Any], key: str, reason: str
) -> None:
    raw = yaml.safe_load(yaml.safe_dump(BASE_CONFIG))
    raw["compliance"] = {"legal_basis": {**REGISTRY, "meta": {**REGISTRY["meta"], **entry}}}
    (tmp_path / "clinic.yaml").write_text(yaml.safe_dump(raw))
    result = run(tmp_path / "clinic.yaml")
    assert result.exit_code == 2  # type: ignore[attr-defined]
    text = result.stderr.replace("\n", " ")  # type: ignore[attr-defined]
    assert key in text and reason in text


def test_the_legal_basis_registry_covers_its_last_day_and_not_the_next(tmp_path: Path) -> None:
    from datetime import date

    from tests.conftest import make_config

    config = make_config(tmp_path, compliance={"legal_basis": {"google_ads": REGISTRY["google_ads"]}})
    assert config.legal_basis_problem("google_ads", date(2026, 11, 24)) is None
    assert config.legal_basis_problem("google_ads", date(2026, 11, 25)) == (
        "compliance.legal_basis.google_ads expired after 2026-11-24 (review it, then move valid_until)"
    )
    assert "missing compliance.legal_basis.meta" in str(config.legal_basis_problem("meta", date(2026, 1, 1)))


def test_doctor_and_a_live_run_check_the_legal_basis_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datetime import UTC, datetime

    from etl.config import load_config
    from etl.doctor import run_checks

    config = clinic(tmp_path, GOOD / "appointments.csv")
    raw = yaml.safe_load(config.read_text())
    raw["compliance"] = {
        "hipaa_status": "covered_entity",
        "legal_basis": {"google_ads": REGISTRY["google_ads"]},
    }
    config.write_text(yaml.safe_dump(raw))
    # 2026-11-25 07:30 UTC is still the 24th in Los Angeles: the entry's last day
    checks = dict(run_checks(load_config(config), {}, now=datetime(2026, 11, 25, 7, 30, tzinfo=UTC)))
    assert checks["compliance.legal_basis.google_ads"] == (
        "ok (marketing_authorization until 2026-11-24; review due: 0 day(s) left, then live sends stop)"
    )
    # the review is flagged from 30 days before its last day, not earlier
    due = dict(run_checks(load_config(config), {}, now=datetime(2026, 10, 25, 12, tzinfo=UTC)))
    assert due["compliance.legal_basis.google_ads"].endswith(
        "review due: 30 day(s) left, then live sends stop)"
    )
    early = dict(run_checks(load_config(config), {}, now=datetime(2026, 10, 24, 12, tzinfo=UTC)))
    assert early["compliance.legal_basis.google_ads"] == "ok (marketing_authorization until 2026-11-24)"
    assert checks["compliance.legal_basis.meta"].startswith("missing")
    later = dict(run_checks(load_config(config), {}, now=datetime(2026, 11, 25, 8, 30, tzinfo=UTC)))
    assert later["compliance.legal_basis.google_ads"].startswith("invalid: expired after 2026-11-24")

    shown = RUNNER.invoke(app, ["doctor", "--config", str(config)], env={"COLUMNS": "250"})
    assert shown.exit_code == 1 and "compliance.legal_basis.meta" in shown.stdout
    # a live run names it among what is not ready, before any work
    monkeypatch.setenv("MEDSPA_ID_SECRET", "s3cret-value-0123456789")
    live = RUNNER.invoke(app, ["run", "--config", str(config), "--end", "2026-06-30", "--target", "live"])
    assert live.exit_code == 2
    assert "compliance.legal_basis.meta" in live.stderr.replace("\n", " ")
    assert not (tmp_path / "var" / "runs").exists()
    # a validate-only live run sends the rows too: refused the same way, before the extract
    argv = ["run", "--config", str(config), "--end", "2026-06-30", "--target", "live", "--validate-only"]
    checked = RUNNER.invoke(app, argv)
    assert checked.exit_code == 2 and "compliance.legal_basis.meta" in checked.stderr.replace("\n", " ")
    assert not (tmp_path / "var" / "runs").exists()
    # and a dry run's summary records the regime the clinic declared
    assert run(config).exit_code == 0  # type: ignore[attr-defined]
    (summary_file,) = (tmp_path / "var" / "runs").glob("*/outbox/summary.json")
    assert json.loads(summary_file.read_text(encoding="utf-8"))["legal_basis"] == {
        "hipaa_status": "covered_entity", "google_ads": REGISTRY["google_ads"], "meta": None,
    }  # fmt: skip


def test_what_a_run_writes_is_readable_by_its_user_only(tmp_path: Path) -> None:
    # the staging database, extracts and outbox hold pseudonymous identifiers and record IDs
    import os
    import stat
    import subprocess
    import sys

    config = clinic(tmp_path, GOOD / "appointments.csv")
    old = os.umask(0o022)  # the common default the CLI must not rely on
    try:
        done = subprocess.run(
            [sys.executable, "-m", "etl", "run", "--config", str(config), "--start", "2026-05-01",
             "--end", "2026-06-30", "--dry-run"],
            capture_output=True, text=True, env={**os.environ, "MEDSPA_ID_SECRET": "0123456789abcdef-test"},
        )  # fmt: skip
    finally:
        os.umask(old)
    assert done.returncode == 0, done.stderr
    written = [p for p in (tmp_path / "var").rglob("*")]
    assert any(p.suffix == ".jsonl" for p in written) and any(p.suffix == ".sqlite" for p in written)
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path.relative_to(tmp_path)


def _sent(url: str) -> int:
    with store.engine_for(url) as engine, engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(store.send_ledger)).scalar() or 0)


def test_a_real_run_on_a_database_that_is_not_the_clinics_ledger_is_refused_before_any_work(
    tmp_path: Path,
) -> None:
    # a mistyped --database (or a replaced file) opened a new, empty ledger with a warning, and
    # every conversion already sent went again
    config = _sandbox_clinic(tmp_path)
    kept, typo = tmp_path / "var" / "sunrise-medspa.sqlite", tmp_path / "var" / "sunrise-medpsa.sqlite"
    assert RUNNER.invoke(app, _run_args(config, "--target", "sandbox")).exit_code == 0
    record = tmp_path / "var" / "ledgers" / "sunrise-medspa.sandbox.json"
    assert json.loads(record.read_text(encoding="utf-8"))["target"] == "sandbox"
    sent = _sent(f"sqlite:///{kept}")
    assert sent > 0

    result = RUNNER.invoke(app, _run_args(config, "--target", "sandbox", "--database", f"sqlite:///{typo}"))
    assert result.exit_code == ConfigError.exit_code, result.output
    said = " ".join(result.stderr.split())
    assert "has never sent for it" in said and "--new-database" in said and "first send was run" in said
    assert not typo.exists()  # not even an empty file is left at the mistyped path
    runs = tmp_path / "var" / "runs"
    assert not [p for p in runs.rglob("*") if p.parent.name == "extract"]  # refused before the extract

    # on purpose: the old database is lost, this one starts a new ledger and the record follows
    result = RUNNER.invoke(app, _run_args(config, "--target", "sandbox", "--database", f"sqlite:///{typo}",
                                          "--new-database"))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert _sent(f"sqlite:///{typo}") == sent
    # ... and now the old database is the wrong one: its first send is named
    result = RUNNER.invoke(app, _run_args(config, "--target", "sandbox"))
    assert result.exit_code == ConfigError.exit_code, result.output
    said = " ".join(result.stderr.split())
    assert "first sandbox send was run sunrise-medspa__" in said and said.count(" at 20") == 2
    assert _sent(f"sqlite:///{kept}") == sent  # nothing more recorded there


def test_a_real_run_with_another_id_key_is_refused_before_it_plans(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # another key makes every order_id and event_id new: the ledger matched none of them, and
    # every conversion went again under IDs the platforms cannot de-duplicate
    config = _sandbox_clinic(tmp_path)
    kept = f"sqlite:///{tmp_path / 'var' / 'sunrise-medspa.sqlite'}"
    monkeypatch.setenv("MEDSPA_ID_SECRET", "first-key-0123456789abcdef")
    assert RUNNER.invoke(app, _run_args(config, "--target", "sandbox")).exit_code == 0
    record = tmp_path / "var" / "ledgers" / "sunrise-medspa.sandbox.json"
    fingerprint = json.loads(record.read_text(encoding="utf-8"))["id_key_check"]
    assert fingerprint == ledger.id_key_check(b"first-key-0123456789abcdef")
    assert "first-key" not in record.read_text(encoding="utf-8")
    sent = _sent(kept)
    assert sent > 0

    monkeypatch.setenv("MEDSPA_ID_SECRET", "rotated-key-0123456789abcd")
    result = RUNNER.invoke(app, _run_args(config, "--target", "sandbox"))
    assert result.exit_code == ConfigError.exit_code, result.output
    said = " ".join(result.stderr.split())
    assert "another opaque-ID key" in said and "--new-database" in said and "rotated-key" not in said
    assert _sent(kept) == sent  # nothing planned, nothing sent

    # the same key again: the rerun sends nothing new and is not refused
    monkeypatch.setenv("MEDSPA_ID_SECRET", "first-key-0123456789abcdef")
    assert RUNNER.invoke(app, _run_args(config, "--target", "sandbox")).exit_code == 0
    assert _sent(kept) == sent
    # the check at each send: a plan made with another key (a DAG's upload task) is refused too
    with store.engine_for(kept) as engine, pytest.raises(ConfigError, match="another opaque-ID key"):
        ledger.claim_target(engine, "sunrise-medspa", "sandbox", run_id="later", at=datetime.now(UTC),
                            record=record, key_check=ledger.id_key_check(b"rotated"))  # fmt: skip


def test_a_send_refused_for_the_wrong_ledger_does_not_claim_the_database(tmp_path: Path) -> None:
    # the check at each send (the DAG's tasks meet it there): refused inside the claim's
    # transaction, so the wrong database is not left claimed either
    from datetime import UTC, datetime

    record = tmp_path / "var" / "ledgers" / "sunrise-medspa.live.json"
    at = datetime(2026, 6, 1, tzinfo=UTC)
    with store.engine_for(f"sqlite:///{tmp_path / 'a.sqlite'}") as first:
        ledger.claim_target(first, "sunrise-medspa", "live", run_id="night-1", at=at, record=record)
        ledger.claim_target(
            first, "sunrise-medspa", "live", run_id="night-2", at=at, record=record
        )  # same: fine
    with store.engine_for(f"sqlite:///{tmp_path / 'b.sqlite'}") as other:
        with pytest.raises(ConfigError, match="first send was run night-1"):
            ledger.claim_target(other, "sunrise-medspa", "live", run_id="night-3", at=at, record=record)
        with other.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(store.ledger_targets)).scalar() == 0
        # a sandbox ledger is recorded apart: this database may still send to the sandbox
        ledger.claim_target(other, "sunrise-medspa", "sandbox", run_id="night-3", at=at,
                            record=record.with_name("sunrise-medspa.sandbox.json"))  # fmt: skip


def test_the_ledger_record_is_written_only_once_the_claim_is_committed(tmp_path: Path) -> None:
    # written inside the claim's transaction, a commit that failed left a record naming a
    # claim the database never kept: every later send from the right database was refused
    from datetime import UTC, datetime

    record = tmp_path / "var" / "ledgers" / "sunrise-medspa.live.json"
    at = datetime(2026, 6, 1, tzinfo=UTC)
    with store.engine_for(f"sqlite:///{tmp_path / 'a.sqlite'}") as engine:
        failing = {"commit": True}

        @sa.event.listens_for(engine, "commit")
        def lost(_conn: Any) -> None:
            if failing.pop("commit", False):
                raise RuntimeError("connection lost at commit")

        with pytest.raises(RuntimeError, match="connection lost"):
            ledger.claim_target(engine, "sunrise-medspa", "live", run_id="night-1", at=at, record=record)
        assert not record.exists()
        ledger.claim_target(
            engine, "sunrise-medspa", "live", run_id="night-1", at=at, record=record
        )  # the retry
        assert json.loads(record.read_text(encoding="utf-8"))["first_run_id"] == "night-1"


def test_doctor_names_a_database_that_is_not_the_clinics_live_ledger(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    config = _sandbox_clinic(tmp_path)
    record = tmp_path / "var" / "ledgers" / "sunrise-medspa.live.json"
    with store.engine_for(f"sqlite:///{tmp_path / 'live.sqlite'}") as engine:
        ledger.claim_target(engine, "sunrise-medspa", "live", run_id="night-1",
                            at=datetime(2026, 6, 1, tzinfo=UTC), record=record)  # fmt: skip
    other = tmp_path / "other.sqlite"
    result = RUNNER.invoke(app, ["doctor", "--config", str(config), "--database", f"sqlite:///{other}"])
    assert "send ledger" in result.stdout and "run night-1" in result.stdout, result.output
    assert not other.exists()
    result = RUNNER.invoke(app, ["doctor", "--config", str(config), "--database",
                                 f"sqlite:///{tmp_path / 'live.sqlite'}"])  # fmt: skip
    assert "run night-1" not in result.stdout, result.output
    # a record a live run would refuse as unreadable is named here too, not passed over
    record.write_text("{not json", encoding="utf-8")
    result = RUNNER.invoke(app, ["doctor", "--config", str(config), "--database",
                                 f"sqlite:///{tmp_path / 'live.sqlite'}"])  # fmt: skip
    said = " ".join(result.stdout.split())
    assert "send ledger" in said and "not JSON" in said, result.output


@pytest.mark.parametrize(
    "extra",
    [["--target", "live"], ["--validate-only"], ["--meta-test-event-code", "TEST1"], ["--new-database"]],
    ids=["target-live", "validate-only", "meta-test-event-code", "new-database"],
)
def test_options_that_only_mean_something_when_sending_are_refused_with_dry_run(
    extra: list[str], tmp_path: Path
) -> None:
    config = _sandbox_clinic(tmp_path)
    result = RUNNER.invoke(app, _run_args(config, "--dry-run", *extra))
    assert result.exit_code == ConfigError.exit_code, result.output
    assert f"--dry-run sends nothing, so {extra[0]}" in " ".join(result.stderr.split())
    assert not (tmp_path / "var" / "runs").exists()


def test_report_of_a_run_whose_outbox_is_elsewhere_says_to_pass_its_outbox(tmp_path: Path) -> None:
    # rendered without --outbox, the page said the run "stopped before publishing" although it
    # had published, into the folder --outbox named
    config = _sandbox_clinic(tmp_path)
    elsewhere = tmp_path / "scratch-outbox"
    assert RUNNER.invoke(app, _run_args(config, "--dry-run", "--outbox", str(elsewhere))).exit_code == 0
    (run_dir,) = (tmp_path / "var" / "runs").iterdir()
    result = RUNNER.invoke(app, ["report", "--config", str(config), "--run-id", run_dir.name])
    assert result.exit_code == 0, result.output
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert 'id="recorded"' in page and "wrote its outbox elsewhere" in page and "report --outbox" in page
    again = RUNNER.invoke(app, ["report", "--config", str(config), "--run-id", run_dir.name,
                                "--outbox", str(elsewhere)])  # fmt: skip
    assert again.exit_code == 0 and 'id="recorded"' not in (run_dir / "report.html").read_text(
        encoding="utf-8"
    )


def test_an_attempt_that_fails_leaves_no_page_or_extracts_of_the_attempt_before(tmp_path: Path) -> None:
    # the earlier attempt's report.html and hashed extracts stayed beside a rerun that failed at
    # its extract, and read as this attempt's; `report --run-id` then showed the database's
    # record of the earlier attempt without a word
    config = _sandbox_clinic(tmp_path)
    assert RUNNER.invoke(app, _run_args(config, "--target", "sandbox")).exit_code == 0
    (run_dir,) = (tmp_path / "var" / "runs").iterdir()
    assert (run_dir / "report.html").is_file()
    (run_dir / "extract").mkdir(exist_ok=True)  # a gate-stopped attempt keeps its extracts
    (run_dir / "extract" / "appointments.parquet").write_bytes(b"earlier attempt")
    shutil.copy(DATA / "extract" / "missing_column.csv", tmp_path / "appointments.csv")
    failed = RUNNER.invoke(app, _run_args(config, "--target", "sandbox"))
    assert failed.exit_code == 2, failed.output
    assert not (run_dir / "report.html").exists() and not list((run_dir / "extract").glob("*"))
    assert not (run_dir / "outbox").exists()
    result = RUNNER.invoke(app, ["report", "--config", str(config), "--run-id", run_dir.name])
    assert result.exit_code == 0, result.output
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert 'id="recorded"' in page and "last summary recorded in the database, at 20" in page


@pytest.mark.parametrize(
    ("command", "start", "end", "expected"),
    [
        ("run", "0026-11-01", "2026-11-23", "'0026-11-01': the year must be between 1900 and 2199"),
        ("run", "2026-11-01", "9999-12-31", "'9999-12-31': the year must be between 1900 and 2199"),
        ("run", "2026-13-01", "2026-11-23", "'2026-13-01' is not a date"),
        ("validate", "1026-11-01", "2026-11-23", "'1026-11-01': the year must be between 1900 and 2199"),
    ],
    ids=["run-year-typo", "run-far-end", "run-no-month-13", "validate-year-typo"],
)
def test_a_mistyped_date_is_one_clear_error_before_any_work(
    command: str, start: str, end: str, expected: str, tmp_path: Path
) -> None:
    # a year like 0026 passed the parse and crashed after the extract (OverflowError, exit 1),
    # leaving a run folder of hashed extracts behind
    config = _sandbox_clinic(tmp_path)
    args = [command, "--config", str(config), "--start", start, "--end", end]
    result = RUNNER.invoke(app, args + (["--dry-run"] if command == "run" else []))
    assert result.exit_code == ConfigError.exit_code, result.output
    assert expected in " ".join(result.stderr.split()) and "Traceback" not in result.output
    assert not (tmp_path / "var" / "runs").exists()


def test_prune_and_report_refuse_a_database_that_is_not_there_and_report_waits_for_the_run(
    tmp_path: Path,
) -> None:
    # a mistyped --database made a new, empty staging database: prune recorded its deletions in
    # it (the clinic's audit chain never got them) and report rendered an empty page over the
    # real one, both exiting 0; report also wrote into a run folder another process held
    from tests.test_leases import _holding_the_folder

    config = _sandbox_clinic(tmp_path)
    assert RUNNER.invoke(app, _run_args(config, "--dry-run")).exit_code == 0
    (run_dir,) = (tmp_path / "var" / "runs").iterdir()
    page = (run_dir / "report.html").read_bytes()
    typo = tmp_path / "var" / "sunrise-medpsa.sqlite"
    for args in (["prune", "--config", str(config), "--older-than", "1"],
                 ["report", "--config", str(config), "--run-id", run_dir.name]):  # fmt: skip
        result = RUNNER.invoke(app, [*args, "--database", f"sqlite:///{typo}"])
        assert result.exit_code == ConfigError.exit_code and "no SQLite file" in result.stderr, result.output
        assert not typo.exists()
    assert (run_dir / "report.html").read_bytes() == page
    holder = _holding_the_folder(run_dir, shared=False)
    try:
        result = RUNNER.invoke(app, ["report", "--config", str(config), "--run-id", run_dir.name])
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 8, result.output
    assert RUNNER.invoke(app, ["report", "--config", str(config), "--run-id", run_dir.name]).exit_code == 0


def test_doctor_reads_a_read_only_uri_filename_as_the_file_it_names(tmp_path: Path) -> None:
    # the README's read-only form was taken for a file still to be created ("will be created on
    # the first run"), existing or not
    config = _sandbox_clinic(tmp_path)
    assert RUNNER.invoke(app, _run_args(config, "--dry-run")).exit_code == 0
    database = tmp_path / "var" / "sunrise-medspa.sqlite"
    for path, expected in (
        (database, "│ ok (sqlite)"),
        (tmp_path / "gone.sqlite", "│ invalid: no SQLite file at"),
    ):
        url = f"sqlite:///file:{path}?mode=ro&uri=true"
        result = RUNNER.invoke(
            app, ["doctor", "--config", str(config), "--database", url], env={"COLUMNS": "250"}
        )
        (line,) = [line for line in result.stdout.splitlines() if "staging database" in line]
        assert expected in line and "will be created" not in line, result.output
