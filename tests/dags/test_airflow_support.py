"""``etl.airflow_support`` without a running Airflow: credentials, secret, params, alerts, discovery."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa

from etl import airflow_support as support
from etl.config import load_config
from etl.errors import ConfigError, GateViolation
from tests.dags.conftest import DEMO_CLINIC, REPO


def fake_connection(login: str | None = None, password: str | None = None, **extra: str) -> Any:
    return SimpleNamespace(login=login, password=password, extra=json.dumps(extra) if extra else None,
                           extra_dejson=extra)  # fmt: skip


def test_connection_names_are_the_variables_the_destination_factories_read() -> None:
    from etl.destinations import google_setup, meta

    read = {
        google_setup.DEVELOPER_TOKEN, google_setup.LOGIN_CUSTOMER_ID, google_setup.ADS_KEY_FILE,
        google_setup.ADS_IMPERSONATED_EMAIL, google_setup.DM_KEY_FILE, *google_setup.ADS_OAUTH,
        *google_setup.DM_OAUTH, meta.ACCESS_TOKEN_ENV, meta.APP_SECRET_ENV, meta.APP_ID_ENV,
    }  # fmt: skip
    mapped = {name for fields in support.CONNECTION_FIELDS.values() for name, _ in fields}
    assert mapped == read


def test_connection_fields_map_onto_variables() -> None:
    conn = fake_connection("app-1", "meta-token", app_secret="shh")
    assert support.connection_environ("medspa_meta", conn) == {
        "META_ACCESS_TOKEN": "meta-token",
        "META_APP_SECRET": "shh",
        "META_APP_ID": "app-1",
    }
    ads = fake_connection(None, None, developer_token="dev", client_id="cid", client_secret="cs",
                          refresh_token="rt", login_customer_id="1234567890")  # fmt: skip
    assert support.connection_environ("medspa_google_ads", ads) == {
        "GOOGLE_ADS_DEVELOPER_TOKEN": "dev",
        "GOOGLE_ADS_CLIENT_ID": "cid",
        "GOOGLE_ADS_CLIENT_SECRET": "cs",
        "GOOGLE_ADS_REFRESH_TOKEN": "rt",
        "GOOGLE_ADS_LOGIN_CUSTOMER_ID": "1234567890",
    }


def test_live_credentials_take_a_defined_connection_whole_and_never_touch_os_environ(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = load_config(DEMO_CLINIC / "clinic.yaml")
    monkeypatch.setenv("META_ACCESS_TOKEN", "from-env")
    monkeypatch.setenv("META_APP_SECRET", "env-secret")
    monkeypatch.setenv("DATAMANAGER_CLIENT_ID", "env-client")
    connections = {"medspa_meta": fake_connection(password="from-connection")}
    monkeypatch.setattr(support, "_connection", connections.get)
    monkeypatch.setattr(support, "_mask", lambda value: None)
    environ = support.live_environ(config, ("google", "meta"))
    assert environ["META_ACCESS_TOKEN"] == "from-connection"
    assert "META_APP_SECRET" not in environ  # no mixing of a connection with the environment
    assert environ["DATAMANAGER_CLIENT_ID"] == "env-client"  # no medspa_google_datamanager: env
    assert support.os.environ["META_ACCESS_TOKEN"] == "from-env"


@pytest.mark.parametrize(
    ("connection", "variable", "env", "expected"),
    [
        ("c" * 20, "v" * 20, "e" * 20, "c" * 20),
        (None, "v" * 20, "e" * 20, "v" * 20),
        (None, None, "e" * 20, "e" * 20),
    ],
    ids=["connection-first", "then-variable", "then-environment"],
)
def test_id_secret_lookup_order(
    monkeypatch: pytest.MonkeyPatch, connection: str | None, variable: str | None, env: str, expected: str
) -> None:
    monkeypatch.setattr(
        support, "_connection", lambda _id: fake_connection(password=connection) if connection else None
    )
    monkeypatch.setattr(support, "_variable", lambda _key: variable)
    monkeypatch.setattr(support, "_mask", lambda value: None)
    monkeypatch.setenv("MEDSPA_ID_SECRET", env)
    assert support.id_secret(real_send=True) == expected.encode()


def test_live_send_without_a_secret_refuses_and_sandbox_warns(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(support, "_connection", lambda _id: None)
    monkeypatch.setattr(support, "_variable", lambda _key: None)
    with pytest.raises(ConfigError, match="MEDSPA_ID_SECRET"):
        support.id_secret(real_send=True)
    with caplog.at_level("WARNING"):
        assert b"DEVELOPMENT" in support.id_secret(real_send=False)
    assert "DEVELOPMENT key" in caplog.text


@pytest.mark.parametrize(
    "params",
    [{"target": "prod"}, {"dry_run": "yes"}, {"dryrun": True, "target": "sandbox"}],
    ids=["bad-target", "bad-dry-run", "misspelled-dry-run"],  # the last one ran, and sent
)
def test_run_params_are_checked(params: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        support.run_params(params)


def test_error_description_keeps_only_our_messages() -> None:
    ours = GateViolation("meta_events", [("data[0].em", "not_hashed")])
    wrapped = RuntimeError("wrapper")
    wrapped.__cause__ = ours
    assert support.describe_error(wrapped) == ("GateViolation", str(ours))
    assert support.describe_error(ValueError("jane@example.org is not valid")) == ("ValueError", None)


class FakeTi:
    dag_id = "medspa_conversions__sunrise-medspa"
    run_id = "scheduled__2026-11-22T11:00:00+00:00"
    task_id = "upload_meta"
    try_number = 4
    log_url = "http://airflow.example/dags/x/runs/y/tasks/upload_meta"

    def xcom_pull(self, task_ids: str) -> Any:
        return {"extract": {"run_id": "r", "appointments_rows": 10, "path": "/x"}}.get(task_ids)


def test_failure_payload_carries_ids_links_and_counts_only() -> None:
    context = {
        "ti": FakeTi(),
        "exception": ValueError("+1 555 0100 rejected"),
        "data_interval_start": datetime(2026, 11, 22, 11, tzinfo=UTC),
        "data_interval_end": datetime(2026, 11, 23, 11, tzinfo=UTC),
    }
    payload = support.failure_payload(context)
    assert payload["error"] == {"type": "ValueError", "message": None}
    assert payload["counts"] == {"extract": {"appointments_rows": 10}}
    assert payload["run_url"].endswith(
        "/dags/medspa_conversions__sunrise-medspa/runs/scheduled__2026-11-22T11%3A00%3A00%2B00%3A00"
    )
    assert "555" not in json.dumps(payload)


def test_notify_failure_never_raises_nor_logs_the_destination(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(support, "_variable", lambda _key: None)
    monkeypatch.setenv("MEDSPA_ALERT_WEBHOOK", "http://127.0.0.1:9/hooks/token-abc")
    with caplog.at_level("INFO"):
        support.notify_failure({"ti": FakeTi(), "exception": RuntimeError("boom")})
    assert "failure alert not sent (URLError)" in caplog.text
    assert "token-abc" not in caplog.text


def test_count_line_is_one_line_of_numbers() -> None:
    line = support.count_line(
        "upload_google", {"google_conversions": {"sent": 7, "skipped": "x"}, "ok": True}
    )
    assert line == "upload_google: google_conversions.sent=7"


def test_clinics_root_and_default_target(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MEDSPA_CLINICS_DIR", raising=False)
    assert support.clinics_root(REPO) == REPO / "clinics"
    monkeypatch.setenv("MEDSPA_CLINICS_DIR", "var/clinics")
    assert support.clinics_root(REPO) == REPO / "var" / "clinics"
    monkeypatch.setenv("MEDSPA_CLINICS_DIR", str(tmp_path))
    assert support.clinics_root(REPO) == tmp_path
    monkeypatch.setenv("MEDSPA_DEFAULT_TARGET", "live")
    assert support.default_target() == "live"
    monkeypatch.setenv("MEDSPA_DEFAULT_TARGET", "production")
    with pytest.warns(UserWarning):
        assert support.default_target() == "sandbox"


def test_a_clinic_id_in_two_files_skips_both(tmp_path: Path) -> None:
    # a clinic folder copied and not renamed: whichever file won, its folder holds another
    # staging database and no ledger record, and its DAG would send every conversion again
    import shutil

    for name in ("a-copy", "demo"):
        shutil.copytree(DEMO_CLINIC, tmp_path / name, ignore=shutil.ignore_patterns("var"))
    other = tmp_path / "other"
    shutil.copytree(DEMO_CLINIC, other, ignore=shutil.ignore_patterns("var"))
    text = (other / "clinic.yaml").read_text()
    (other / "clinic.yaml").write_text(text.replace("clinic_id: sunrise-medspa", "clinic_id: other-spa"))
    with pytest.warns(UserWarning) as caught:
        clinics = support.discover_clinics(tmp_path)
    assert [c.clinic_id for c in clinics] == ["other-spa"]
    (message,) = [str(w.message) for w in caught]
    assert "sunrise-medspa" in message and "a-copy" in message and str(tmp_path / "demo") in message
    with pytest.warns(UserWarning):  # a worker building one DAG skips it too
        assert support.discover_clinics(tmp_path, only_dag_id=support.DAG_ID_PREFIX + "sunrise-medspa") == []


@pytest.mark.parametrize(("schedule", "kept"), [("0 3 30 2 *", False), ("0 3 29 2 *", True)])
def test_a_cron_that_never_fires_skips_its_clinic(schedule: str, kept: bool, tmp_path: Path) -> None:
    # valid to croniter, but February 30 never comes: Airflow failed to serialize the DAG
    import shutil

    shutil.copytree(DEMO_CLINIC, tmp_path / "demo", ignore=shutil.ignore_patterns("var"))
    path = tmp_path / "demo" / "clinic.yaml"
    path.write_text(path.read_text() + f'schedule: "{schedule}"\n')
    if kept:  # leap days come every four years: a rare night, but a night
        assert [c.schedule for c in support.discover_clinics(tmp_path)] == [schedule]
        return
    with pytest.warns(UserWarning, match="schedule is not a valid cron expression"):
        assert support.discover_clinics(tmp_path) == []


def test_manual_run_without_logical_date_gets_the_last_complete_night() -> None:
    config = load_config(DEMO_CLINIC / "clinic.yaml")
    start, end = support.latest_interval(config, datetime(2026, 11, 23, 17, 30, tzinfo=UTC))
    assert (start.isoformat(), end.isoformat()) == ("2026-11-22T11:00:00+00:00", "2026-11-23T11:00:00+00:00")
    window = support.run_window(config, start, end)
    assert window.start.isoformat() == "2026-11-22T03:00:00-08:00"


def _refund_clinic(tmp_path: Path) -> tuple[Path, datetime, datetime]:
    """The refund rule's two exports under the base config, and the interval that holds them."""
    import shutil

    import yaml

    from tests.conftest import BASE_CONFIG, DATA

    for name in ("appointments.csv", "leads.csv"):
        shutil.copy(DATA / "rules" / "refund" / name, tmp_path / name)
    path = tmp_path / "clinic.yaml"
    path.write_text(yaml.safe_dump(BASE_CONFIG))
    return path, datetime(2026, 5, 1, 7, tzinfo=UTC), datetime(2026, 6, 30, 7, tzinfo=UTC)


def test_a_writer_step_refused_for_a_run_in_progress_is_retried_and_bad_input_is_not(tmp_path: Path) -> None:
    # a CLI run of the same interval holds the run's folder: the DAG's extract failed the whole
    # run (writer steps had no retries); a missing export fails at once, as before
    from airflow.sdk.exceptions import AirflowFailException

    from tests.test_leases import _holding_the_folder

    path, start, end = _refund_clinic(tmp_path)
    holder = _holding_the_folder(support.run_spec(path, start, end).paths.run_dir, shared=False)
    try:
        with pytest.raises(Exception) as refused:
            support.run_extract(str(path), start, end)
        assert not isinstance(refused.value, AirflowFailException)  # Airflow's retries take it up
        assert "another process" in str(refused.value)
    finally:
        holder.kill()
        holder.wait()
    assert support.run_extract(str(path), start, end)["appointments_rows"] == 2  # the retry works
    (tmp_path / "leads.csv").unlink()
    with pytest.raises(AirflowFailException, match=r"leads\.csv: file not found"):
        support.run_extract(str(path), start, end)


def test_a_real_runs_extract_refuses_a_database_that_is_not_the_clinics_ledger(tmp_path: Path) -> None:
    # the DAG met the check only when publishing, after extract, stage and plan had filled the
    # mistyped database; a dry run is not checked (it sends nothing)
    from airflow.sdk.exceptions import AirflowFailException

    from etl import ledger, store

    path, start, end = _refund_clinic(tmp_path)
    record = ledger.record_path(tmp_path, "sunrise-medspa", "sandbox")
    with store.engine_for(f"sqlite:///{tmp_path / 'sent-from.sqlite'}") as engine:
        ledger.claim_target(engine, "sunrise-medspa", "sandbox", run_id="night-1", at=start, record=record)
    database = tmp_path / "var" / "sunrise-medspa.sqlite"  # the YAML's default: not that one
    with pytest.raises(AirflowFailException, match="has never sent for it"):
        support.run_extract(str(path), start, end, {"dry_run": False, "target": "sandbox"})
    assert not database.exists()
    assert support.run_extract(str(path), start, end, {"dry_run": True})["appointments_rows"] == 2
    # on purpose (the old database is lost): the param lets the run through, as --new-database
    with pytest.raises(AirflowFailException, match="new_database must be true or false"):
        support.run_extract(str(path), start, end, {"target": "sandbox", "new_database": "yes"})
    new = {"dry_run": False, "target": "sandbox", "new_database": True}
    assert support.run_extract(str(path), start, end, new)["appointments_rows"] == 2
    assert support.run_spec(path, start, end, new).new_database


def test_the_report_records_nothing_into_a_database_that_is_not_there(tmp_path: Path) -> None:
    # an earlier attempt published; this attempt's extract refused a mistyped database before
    # clearing the folder: the report (all_done) folded the old outbox into a new, empty file
    from airflow.sdk.exceptions import AirflowSkipException

    path, start, end = _refund_clinic(tmp_path)
    spec = support.run_spec(path, start, end)
    spec.paths.outbox.mkdir(parents=True)
    (spec.paths.outbox / "summary.json").write_text("{}\n", encoding="utf-8")
    database = tmp_path / "var" / "sunrise-medspa.sqlite"
    with pytest.raises(AirflowSkipException, match="staging database is not there"):
        support.run_report(str(path), start, end)
    assert not database.exists()


def test_a_database_that_cannot_be_reached_now_is_retried_and_one_that_is_no_database_is_not(
    tmp_path: Path,
) -> None:
    # a PostgreSQL restart at 03:00 failed the whole night at once (no retry)
    from airflow.sdk.exceptions import AirflowFailException

    from etl import store
    from etl.errors import StagingError

    with (
        pytest.raises(StagingError) as down,
        store.engine_for("postgresql+psycopg2://medspa@127.0.0.1:9/medspa"),
    ):
        pass
    assert down.value.retryable
    with pytest.raises(Exception) as retried:
        support._fail_without_retry(down.value)
    assert not isinstance(retried.value, AirflowFailException)  # Airflow's retries take it up
    (tmp_path / "folder.sqlite").mkdir()  # a folder where the file should be: no retry helps
    with pytest.raises(StagingError) as broken, store.engine_for(f"sqlite:///{tmp_path / 'folder.sqlite'}"):
        pass
    assert not broken.value.retryable
    with pytest.raises(AirflowFailException):
        support._fail_without_retry(broken.value)


def test_a_send_refused_for_another_sender_is_retried_and_other_errors_are_not() -> None:
    from airflow.sdk.exceptions import AirflowFailException

    from etl.errors import SendInProgress

    with pytest.raises(AirflowFailException):
        support._fail_without_retry(ConfigError("bad key"))
    with pytest.raises(Exception) as retried:
        support._fail_without_retry(SendInProgress("another sender holds it"))
    assert not isinstance(retried.value, AirflowFailException)  # Airflow's retries take it up
    assert "another sender holds it" in str(retried.value)


def test_the_alert_mail_goes_through_the_smtp_connection_a_variable_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # MEDSPA_ALERT_SMTP_CONN was read from the environment only, though the docs (and the other
    # alert settings) take an Airflow Variable too; a real SMTP exchange with a local server
    import threading
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import asyncore
        import smtpd

    received: list[tuple[str, list[str], bytes]] = []

    class Server(smtpd.SMTPServer):
        def process_message(
            self, peer: Any, mailfrom: str, rcpttos: list[str], data: bytes, **_: Any
        ) -> None:
            received.append((mailfrom, rcpttos, data))

    server = Server(("127.0.0.1", 0), None)
    loop = threading.Thread(target=asyncore.loop, kwargs={"timeout": 0.05}, daemon=True)
    loop.start()
    try:
        monkeypatch.setenv("AIRFLOW_CONN_MEDSPA_TEST_SMTP", json.dumps({
            "conn_type": "smtp", "host": "127.0.0.1", "port": server.socket.getsockname()[1],
            "extra": {"disable_ssl": True, "disable_tls": True, "from_email": "alerts@clinic.test"}}))  # fmt: skip
        monkeypatch.delenv(support.ALERT_SMTP_CONN, raising=False)
        monkeypatch.setenv(f"AIRFLOW_VAR_{support.ALERT_SMTP_CONN}", "medspa_test_smtp")
        support.email_alert("ops@clinic.test, oncall@clinic.test", {"text": "medspa-conversions: x failed"})
    finally:
        server.close()
    ((mailfrom, to, data),) = received
    assert (mailfrom, to) == ("alerts@clinic.test", ["ops@clinic.test", "oncall@clinic.test"])
    assert b"Subject: medspa-conversions: x failed" in data


WINDOW = (datetime(2026, 5, 1, 7, tzinfo=UTC), datetime(2026, 6, 30, 7, tzinfo=UTC))


def _published_live_plan(folder: Path, config: dict[str, Any]) -> tuple[Path, Any]:
    """A clinic YAML and its published live plan, as the night's earlier tasks leave them."""
    import shutil

    import yaml

    from etl import tasks
    from tests.conftest import DATA, SECRET

    for name in ("appointments.csv", "leads.csv"):
        shutil.copy(DATA / "rules" / "refund" / name, folder / name)
    path = folder / "clinic.yaml"
    path.write_text(yaml.safe_dump(config))
    spec = support.run_spec(path, *WINDOW)
    for step in (tasks.extract, tasks.stage, tasks.validate_inputs):
        step(spec)
    tasks.build_conversions(spec, secret=SECRET, dry_run=False, target="live")
    tasks.validate_outbound(spec)
    return path, spec


def test_a_live_send_without_a_legal_basis_fails_at_once_before_reading_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # no compliance.legal_basis entry at all: neither the upload nor the list sync reads the
    # platform's connection, and neither is retried (renewing the review is a change to the YAML)
    from airflow.sdk.exceptions import AirflowFailException

    from tests.conftest import BASE_CONFIG

    path, _spec = _published_live_plan(tmp_path, BASE_CONFIG)
    read: list[Any] = []
    monkeypatch.setattr(support, "live_environ", lambda config, families: read.append(tuple(families)) or {})
    for family in ("google", "meta"):
        key = "google_ads" if family == "google" else "meta"
        with pytest.raises(AirflowFailException, match=rf"compliance\.legal_basis\.{key}"):
            support.run_upload(family, str(path), *WINDOW, {"target": "live"})  # type: ignore[arg-type]
    with pytest.raises(AirflowFailException, match=r"compliance\.legal_basis\.google_ads"):
        support.run_sync_suppression(str(path), *WINDOW, {"target": "live"})
    assert read == [()]  # the sync asked for no platform's credentials


def test_a_platform_the_kill_switch_stopped_fails_at_once_before_reading_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a current legal basis for both, and both platforms stopped (`stop-sending --platform all`):
    # live or sandbox, neither upload nor the list sync reads a connection, and none is retried
    # (a stop is lifted by a person, not by waiting)
    from airflow.sdk.exceptions import AirflowFailException

    from etl import store, switches
    from tests.conftest import BASE_CONFIG

    entry = {"basis": "marketing_authorization", "baa": False, "valid_until": "2099-12-31"}
    config = {**BASE_CONFIG, "compliance": {"legal_basis": {"google_ads": entry, "meta": entry}}}
    path, spec = _published_live_plan(tmp_path, config)
    with spec.engine() as engine:
        switches.stop(engine, spec.config.clinic_id, ["google_ads", "meta"], reason="incident", by="oncall",
                      at=datetime(2026, 7, 1, tzinfo=UTC))  # fmt: skip
    read: list[Any] = []
    monkeypatch.setattr(support, "live_environ", lambda config, families: read.append(tuple(families)) or {})
    for target in ("live", "sandbox"):
        for family in ("google", "meta"):
            key = "google_ads" if family == "google" else "meta"
            with pytest.raises(AirflowFailException, match=rf"{key}: sending is stopped since .*kill switch"):
                support.run_upload(family, str(path), *WINDOW, {"target": target})  # type: ignore[arg-type]
        with pytest.raises(AirflowFailException, match=r"sending is stopped since"):
            support.run_sync_suppression(str(path), *WINDOW, {"target": target})
    assert read == [()]  # the live sync asked for no platform's credentials
    for name in ("google_conversions", "meta_events", "google_customer_match", "meta_audience"):
        result = json.loads((spec.paths.results / f"{name}.json").read_text(encoding="utf-8"))
        assert result["stopped"] == "kill_switch", name  # what the report folds into summary.json
    with spec.engine() as engine, engine.connect() as conn:  # the plan's rows wait, unsent
        assert set(conn.execute(sa.select(store.send_ledger.c.status)).scalars()) == {"planned"}
        assert conn.execute(sa.select(sa.func.count()).select_from(store.audience_state)).scalar() == 0
