"""Airflow glue for the per-clinic DAGs: discovery, run windows, credentials, task bodies, alerts.

Contract: issue #6 and ``docs/airflow.md``. This is the only ``etl`` module that touches Airflow,
and only inside functions, so the CLI never pays for it; ``dags/medspa_conversions.py`` wires the
functions below and holds no logic (STYLE 1).

Parse time (``clinics_root``, ``discover_clinics``, ``default_target``) reads the clinic YAML
files and the process environment, nothing else: no database, no connection, no pandas.
Task time (``run_*``) rebuilds the run from (clinic YAML, data interval), calls ``etl.tasks`` (the
functions the CLI calls) and returns counts and paths, never rows, so the result can be an XCom.
Credentials come from Airflow connections mapped onto the variable names the destination
factories read and handed over as ``environ=``: never exported to ``os.environ``, never logged.
"""

from __future__ import annotations

import html
import json
import logging
import os
import urllib.request
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn, cast
from urllib.parse import quote

from etl.config import DATABASE_URL_ENV, ID_SECRET_ENV, ClinicConfig, load_config, resolve_id_secret
from etl.errors import ConfigError, MedspaError
from etl.settings import private_files, quiet_third_party_loggers

if TYPE_CHECKING:
    from etl.rules.stages import RunWindow
    from etl.tasks import RunSpec

log = logging.getLogger(__name__)

DAG_ID_PREFIX = "medspa_conversions__"
CLINICS_DIR_ENV = "MEDSPA_CLINICS_DIR"
DEFAULT_TARGET_ENV = "MEDSPA_DEFAULT_TARGET"
ALERT_WEBHOOK = "MEDSPA_ALERT_WEBHOOK"
ALERT_EMAIL = "MEDSPA_ALERT_EMAIL"
ALERT_SMTP_CONN = "MEDSPA_ALERT_SMTP_CONN"
ID_SECRET_KEY = "medspa_id_secret"
TARGETS = ("sandbox", "live")
# the earliest interval a backfill can ask for; catchup is off, so nothing runs from here by itself
START_DATE = datetime(2025, 1, 1, tzinfo=UTC)
STEP_IDS = (
    "extract", "stage", "validate_inputs", "build_conversions", "validate_outbound",
    "upload_google", "upload_meta", "sync_suppression", "report",
)  # fmt: skip
# Every step retries what a retry can change: a transient platform, network or database failure,
# or a refusal because another process holds the run's folder or the platform's send lease.
# Our own errors (configuration, data, gates) fail at once (_fail_without_retry). Each step is
# safe to repeat: writers rebuild their files, and a rerun re-sends nothing the ledger holds as
# final (SPEC rule 11).
RETRIES: dict[str, Any] = {
    "retries": 3,
    "retry_delay": timedelta(minutes=2),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=30),
}
# The tasks that send: one instance of each at a time across all of the DAG's runs. A
# backfill's runs are not bound by the DAG's max_active_runs (Airflow 3 gives each backfill its
# own, 10 unless --max-active-runs says otherwise), and two uploads of overlapping intervals
# running at once can both send a batch before either records it.
SENDING_TASK: dict[str, Any] = {"max_active_tis_per_dag": 1}

Target = Literal["sandbox", "live"]
Family = Literal["google", "meta"]

# connection id -> (variable the destination factories read, where it sits on the connection);
# the names are those of etl/destinations/google_setup.py and etl/destinations/meta.py
CONNECTION_FIELDS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "medspa_google_ads": (
        ("GOOGLE_ADS_DEVELOPER_TOKEN", ("extra.developer_token",)),
        ("GOOGLE_ADS_CLIENT_ID", ("login", "extra.client_id")),
        ("GOOGLE_ADS_CLIENT_SECRET", ("password", "extra.client_secret")),
        ("GOOGLE_ADS_REFRESH_TOKEN", ("extra.refresh_token",)),
        ("GOOGLE_ADS_JSON_KEY_FILE_PATH", ("extra.json_key_file_path",)),
        ("GOOGLE_ADS_IMPERSONATED_EMAIL", ("extra.impersonated_email",)),
        ("GOOGLE_ADS_LOGIN_CUSTOMER_ID", ("extra.login_customer_id",)),
    ),
    "medspa_google_datamanager": (
        ("DATAMANAGER_CLIENT_ID", ("login", "extra.client_id")),
        ("DATAMANAGER_CLIENT_SECRET", ("password", "extra.client_secret")),
        ("DATAMANAGER_REFRESH_TOKEN", ("extra.refresh_token",)),
        ("GOOGLE_APPLICATION_CREDENTIALS", ("extra.key_file_path",)),
        ("GOOGLE_ADS_LOGIN_CUSTOMER_ID", ("extra.login_customer_id",)),
    ),
    "medspa_meta": (
        ("META_ACCESS_TOKEN", ("password", "extra.access_token")),
        ("META_APP_SECRET", ("extra.app_secret",)),
        ("META_APP_ID", ("login", "extra.app_id")),
    ),
}
_SECRET_FIELDS = {"password", "extra.developer_token", "extra.client_secret", "extra.refresh_token",
                  "extra.access_token", "extra.app_secret"}  # fmt: skip


@dataclass(frozen=True)
class Clinic:
    """What the DAG factory needs of one clinic YAML; the task processes re-read the file."""

    clinic_id: str
    config_path: Path
    timezone: str
    schedule: str

    @property
    def dag_id(self) -> str:
        return DAG_ID_PREFIX + self.clinic_id


def clinics_root(repo_root: Path) -> Path:
    """``MEDSPA_CLINICS_DIR`` (relative: to the repository), else the repository's ``clinics/``."""
    value = os.environ.get(CLINICS_DIR_ENV, "").strip()
    if not value:
        return repo_root / "clinics"
    path = Path(value).expanduser()
    return path if path.is_absolute() else repo_root / path


def clinic_files(root: Path) -> list[Path]:
    """Clinic YAMLs: ``<root>/*.yaml`` (or ``.yml``) and ``<root>/<folder>/clinic.yaml``."""
    if not root.is_dir():
        return []
    found = [*root.glob("*.yaml"), *root.glob("*.yml"), *root.glob("*/clinic.yaml")]
    return sorted(p for p in found if p.is_file())


def discover_clinics(root: Path, *, only_dag_id: str | None = None) -> list[Clinic]:
    """Read and validate every clinic YAML under ``root``; parse-time safe (no DB, no network).

    A YAML that does not validate or has a bad cron is skipped with a warning naming the file
    and the key path (never a value), so one broken clinic does not hide the DAGs of the others.
    A clinic_id in more than one file skips every one of them: which file is the clinic's is
    unknowable (the copy may sort first), and the wrong one's folder holds another staging
    database and ledger record, so its DAG would send every conversion again.

    Args:
        only_dag_id: when Airflow parses the file to run one DAG's task, build only that DAG.
    """
    from croniter import croniter

    found: dict[str, list[Clinic]] = {}
    for path in clinic_files(root):
        try:
            config = load_config(path)
        except ConfigError as exc:
            _parse_warning(f"clinic skipped: {exc}")
            continue
        if not croniter.is_valid(config.schedule) or not _fires(config.schedule):
            _parse_warning(f"clinic skipped: {path}: schedule is not a valid cron expression")
            continue
        clinic = Clinic(config.clinic_id, path.resolve(), config.timezone, config.schedule)
        found.setdefault(config.clinic_id, []).append(clinic)
    clinics: list[Clinic] = []
    for clinic_id, same in found.items():
        if len(same) > 1:
            files = ", ".join(str(c.config_path) for c in same)
            _parse_warning(
                f"clinic {clinic_id} skipped: its clinic_id is in more than one file ({files}); keep one"
            )
            continue
        if only_dag_id is None or same[0].dag_id == only_dag_id:
            clinics.append(same[0])
    return clinics


def _fires(schedule: str) -> bool:
    """Whether a valid cron ever fires (``0 3 30 2 *`` is valid, and never does: Airflow then
    fails to serialize the DAG)."""
    from croniter import CroniterBadDateError, croniter

    try:
        croniter(schedule, datetime(2026, 1, 1)).get_next(datetime)  # any start: a wall time
    except CroniterBadDateError:
        return False
    return True


def _parse_warning(message: str) -> None:
    log.error(message)
    warnings.warn(message, UserWarning, stacklevel=3)


def default_target() -> Target:
    """The ``target`` param's default: ``MEDSPA_DEFAULT_TARGET`` (``live`` in production)."""
    value = os.environ.get(DEFAULT_TARGET_ENV, "sandbox").strip() or "sandbox"
    if value not in TARGETS:
        _parse_warning(f"{DEFAULT_TARGET_ENV} must be 'sandbox' or 'live'; using 'sandbox'")
        return "sandbox"
    return cast(Target, value)


def latest_interval(config: ClinicConfig, run_after: datetime) -> tuple[datetime, datetime]:
    """The interval Airflow infers for a manual run at ``run_after``: the last complete one.

    Used for a run triggered without a logical date, which Airflow 3 gives no data interval.
    """
    import pendulum
    from airflow.timetables.interval import CronDataIntervalTimetable

    timetable = CronDataIntervalTimetable(config.schedule, config.timezone)
    interval = timetable.infer_manual_data_interval(run_after=pendulum.instance(run_after))
    return interval.start, interval.end


def run_window(config: ClinicConfig, start: datetime | None, end: datetime | None) -> RunWindow:
    """The run's ``[start, end)`` as plain datetimes in the clinic's zone (run ids read locally)."""
    from etl.rules.stages import RunWindow

    if start is None or end is None:
        from airflow.sdk import get_current_context

        run_after = get_current_context()["dag_run"].run_after
        start, end = latest_interval(config, run_after)
        log.info("no data interval on this run: using the last complete interval before run_after")
    tz = config.tz
    return RunWindow(start=datetime.fromtimestamp(start.timestamp(), tz=tz),
                     end=datetime.fromtimestamp(end.timestamp(), tz=tz))  # fmt: skip


def run_spec(
    config_path: str | Path,
    start: datetime | None,
    end: datetime | None,
    params: Mapping[str, Any] | None = None,
) -> RunSpec:
    """Rebuild the run in this task process: staging from the YAML, else ``MEDSPA_DATABASE_URL``
    (and, for the steps that claim the database, the ``new_database`` param). A dry run works
    under a run id and folder of its own (``pipeline.run_label``): every step must be given the
    params, or it would look in the folder of the interval's real run."""
    from etl.pipeline import run_label
    from etl.tasks import RunSpec

    config = load_config(config_path)
    database = None if config.database_url else (os.environ.get(DATABASE_URL_ENV, "").strip() or None)
    quiet_third_party_loggers()
    private_files()
    dry_run, _ = run_params(params)
    return RunSpec(config=config, window=run_window(config, start, end), database=database,
                   new_database=new_database_param(params), label=run_label(dry_run=dry_run))  # fmt: skip


PARAM_NAMES = ("dry_run", "target", "new_database")  # the DAG's params (dags/medspa_conversions.py)


def new_database_param(params: Mapping[str, Any] | None) -> bool:
    """``new_database``: start a new send ledger in this database (``run --new-database``)."""
    new = (params or {}).get("new_database", False)
    if not isinstance(new, bool):
        raise ConfigError("param new_database must be true or false")
    return new


def run_params(params: Mapping[str, Any] | None) -> tuple[bool, Target]:
    """``dry_run`` and ``target`` from the run's params (checked again: conf can be anything).

    A key the DAG does not take is refused: Airflow merges a run's conf into its params
    unchecked, and ``{"dryrun": true}`` would otherwise run, and send, as if it were absent.
    """
    params = params or {}
    if unknown := sorted(str(k)[:40] for k in params if k not in PARAM_NAMES):
        raise ConfigError(
            f"unknown param {', '.join(map(repr, unknown))}: the DAG takes {', '.join(PARAM_NAMES)}"
        )
    dry_run = params.get("dry_run", False)
    target = params.get("target", "sandbox")
    if not isinstance(dry_run, bool):
        raise ConfigError("param dry_run must be true or false")
    if target not in TARGETS:
        raise ConfigError("param target must be 'sandbox' or 'live'")
    return dry_run, cast(Target, target)


def count_line(step: str, result: Mapping[str, Any]) -> str:
    """One log line of a step's numbers (``key.sub=value``; a list shows its length)."""
    parts = [f"{key}={value}" for key, value in _numbers(result)]
    return f"{step}: " + (" ".join(parts) if parts else "no counts")


def _numbers(value: Any, prefix: str = "") -> Iterable[tuple[str, int | float]]:
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from _numbers(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list):  # e.g. names of failed checks: their count
        yield prefix, len(value)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield prefix, value


def numbers_only(value: Any) -> Any:
    """The nested numeric leaves of a step result, lists as their length (what an alert carries)."""
    if isinstance(value, Mapping):
        kept = {str(k): numbers_only(v) for k, v in value.items()}
        return {k: v for k, v in kept.items() if v is not None and v != {}}
    if isinstance(value, list):
        return len(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    return None


def _done(step: str, result: dict[str, Any]) -> dict[str, Any]:
    counts = {k: v for k, v in result.items() if k != "run_id"}
    line = count_line(step, counts)
    if not any(True for _ in _numbers(counts)) and "outbox" in result:
        line = f"{step}: outbox published at {result['outbox']}"
    log.info(line)
    return result


def _skip(reason: str) -> NoReturn:
    from airflow.sdk.exceptions import AirflowSkipException

    log.info("skipped: %s", reason)
    raise AirflowSkipException(reason)


def _fail_without_retry(exc: MedspaError) -> NoReturn:
    """Our errors are about configuration or data, which a retry does not change; the ones that
    are not (another process holds the run's folder or the send lease) fail the try and leave
    Airflow's retries to them."""
    from airflow.sdk.exceptions import AirflowFailException

    if exc.retryable:
        raise RuntimeError(str(exc)) from exc
    raise AirflowFailException(str(exc)) from exc


def fail_run_for_failed_sends() -> NoReturn:
    """The DAG's watcher: runs only when a send failed, and fails the run.

    Airflow derives a run's state from its leaf tasks, and the report (a leaf that runs after a
    failed send on purpose) would otherwise mark a run whose Google upload failed "success".
    The failed send already alerted; this one does not (no callback on the watcher).
    """
    from airflow.sdk.exceptions import AirflowFailException

    raise AirflowFailException(
        "a send failed or could not run (see the failed task upstream); the others and the report ran"
    )


@contextmanager
def _step_errors() -> Iterator[None]:
    """Around each step's work: our errors fail the task without a retry unless one can help."""
    try:
        yield
    except MedspaError as exc:
        _fail_without_retry(exc)


def run_extract(
    config_path: str, start: datetime | None, end: datetime | None, params: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Extract; a real run first checks that the database is the clinic's send ledger
    (``tasks.check_ledger_record``), before anything is written to a mistyped one."""
    from etl import tasks

    with _step_errors():
        spec = run_spec(config_path, start, end, params)
        dry_run, target = run_params(params)
        if not dry_run:
            tasks.check_ledger_record(spec, target)
        return _done("extract", tasks.extract(spec))


def run_stage(
    config_path: str, start: datetime | None, end: datetime | None, params: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    from etl import tasks

    with _step_errors():
        return _done("stage", tasks.stage(run_spec(config_path, start, end, params)))


def run_validate_inputs(
    config_path: str, start: datetime | None, end: datetime | None, params: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    from etl import tasks

    with _step_errors():
        return _done("validate_inputs", tasks.validate_inputs(run_spec(config_path, start, end, params)))


def run_build_conversions(
    config_path: str,
    start: datetime | None,
    end: datetime | None,
    params: Mapping[str, Any] | None,
    inputs: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """Plan the run; a live send needs the real ID secret, others may use the development key.

    Args:
        inputs: the extract task's counts (recorded in summary.json).
    """
    from etl import tasks

    counts = {k: int(v) for k, v in (inputs or {}).items() if k != "run_id" and isinstance(v, int)}
    with _step_errors():
        dry_run, target = run_params(params)
        spec = run_spec(config_path, start, end, params)
        secret = id_secret(real_send=not dry_run and target == "live")
        result = tasks.build_conversions(spec, secret=secret, dry_run=dry_run, target=target, inputs=counts)
        return _done("build_conversions", result)


def run_validate_outbound(
    config_path: str, start: datetime | None, end: datetime | None, params: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    from etl import tasks

    with _step_errors():
        return _done("validate_outbound", tasks.validate_outbound(run_spec(config_path, start, end, params)))


def run_upload(
    family: Family,
    config_path: str,
    start: datetime | None,
    end: datetime | None,
    params: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """Send one platform's conversions; skipped on a dry run or without that platform's section."""
    from etl import tasks

    with _step_errors():
        dry_run, target = run_params(params)
        if dry_run:
            _skip("dry run: the outbox is written, nothing is sent")
        spec = run_spec(config_path, start, end, params)
        if (refusal := tasks.upload_refusal(spec, family, target)) is not None:
            raise refusal  # legal basis, kill switch: before the platform's credentials are read
        environ = live_environ(spec.config, (family,)) if target == "live" else None
        result = tasks.upload(spec, family, target=target, environ=environ)
    if "skipped" in result:
        _skip(str(result["skipped"]))
    return _done(f"upload_{family}", result)


def run_sync_suppression(
    config_path: str, start: datetime | None, end: datetime | None, params: Mapping[str, Any] | None
) -> dict[str, Any]:
    from etl import tasks

    with _step_errors():
        dry_run, target = run_params(params)
        if dry_run:
            _skip("dry run: suppression lists are not synced")
        spec = run_spec(config_path, start, end, params)
        environ = None
        if target == "live":  # only the credentials of platforms whose lists may be touched
            refused = {**tasks.list_refusals(spec.config), **tasks.stop_refusals(spec)}
            environ = live_environ(
                spec.config, tuple(f for f in tasks.list_families(spec.config) if f not in refused)
            )
        result = tasks.sync_suppression(spec, target=target, environ=environ)
    if "skipped" in result:
        _skip(str(result["skipped"]))
    return _done("sync_suppression", result)


def run_report(
    config_path: str, start: datetime | None, end: datetime | None, params: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Fold the upload results into summary.json; return its counts and where the reports are."""
    from etl import store, tasks
    from etl.outbox import SUMMARY_FILE

    with _step_errors():
        spec = run_spec(config_path, start, end, params)
        if spec.paths.stopped.exists() or not (spec.paths.outbox / SUMMARY_FILE).exists():
            # the report runs after failed sends too (trigger rule all_done); before a published
            # outbox there is nothing to fold, and the failed step has already said why
            _skip("nothing was published: the run stopped before the outbox")
        if store.sqlite_file_missing(spec.config.resolved_database_url(spec.database)):
            # this attempt's extract refused the database (a mistyped one) before clearing an
            # earlier attempt's outbox: folding that into a new, empty file would record it there
            _skip("the staging database is not there: nothing of this attempt to report")
        result = tasks.report(spec)
    summary = result["summary"]
    out: dict[str, Any] = {
        "run_id": result["run_id"],
        "outbox": result["outbox"],
        "summary_json": str(Path(result["outbox"]) / "summary.json"),
        "dry_run": summary.get("dry_run"),
        "target": summary.get("target"),
        "counts": {k: summary[k] for k in ("inputs", "stages", "drops", "destinations") if k in summary},
    }
    if result.get("report"):
        out["report"] = str(result["report"])
    if result.get("audit_head"):  # kept apart from the database: `verify-audit --head` checks it
        out["audit_head"] = result["audit_head"]
    log.info(count_line("report", out["counts"]))
    log.info("report: outbox at %s%s", out["outbox"],
             f", HTML report at {out['report']}" if "report" in out else "")  # fmt: skip
    return out


def _connection(conn_id: str) -> Any | None:
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return Connection.get(conn_id)
    except AirflowNotFoundException:
        return None


def _variable(key: str) -> str | None:
    from airflow.sdk import Variable

    value = Variable.get(key, default=None)
    return str(value) if value not in (None, "") else None


def _mask(value: str) -> None:
    from airflow.sdk.log import mask_secret

    mask_secret(value)


def connection_environ(conn_id: str, conn: Any) -> dict[str, str]:
    """The variables one connection provides (login, password, extras per ``CONNECTION_FIELDS``)."""
    extra = conn.extra_dejson if getattr(conn, "extra", None) else {}
    out: dict[str, str] = {}
    for name, sources in CONNECTION_FIELDS[conn_id]:
        for source in sources:
            raw = extra.get(source[6:]) if source.startswith("extra.") else getattr(conn, source, None)
            value = str(raw).strip() if raw is not None else ""
            if value:
                if source in _SECRET_FIELDS:
                    _mask(value)
                out[name] = value
                break
    return out


def live_environ(config: ClinicConfig, families: Iterable[Family]) -> dict[str, str]:
    """Credentials for a live send: a defined connection wins whole, else the (CLI's) environment.

    A connection is used all or nothing (no per-field mixing with environment variables), so what
    a data engineer sees in Admin > Connections is exactly what the run used.
    """
    conn_ids: list[str] = []
    for family in families:
        if family == "google" and config.google_ads is not None:
            api = config.google_ads.api
            conn_ids.append("medspa_google_ads" if api == "google_ads" else "medspa_google_datamanager")
        if family == "meta" and config.meta is not None:
            conn_ids.append("medspa_meta")
    names = {name for fields in CONNECTION_FIELDS.values() for name, _ in fields}
    environ = {name: os.environ[name] for name in sorted(names) if os.environ.get(name)}
    for conn_id in conn_ids:
        conn = _connection(conn_id)
        if conn is None:
            log.info("connection %s is not defined: using environment variables", conn_id)
            continue
        for name, _ in CONNECTION_FIELDS[conn_id]:
            environ.pop(name, None)
        environ.update(connection_environ(conn_id, conn))
        log.info("credentials from connection %s", conn_id)
    return environ


def id_secret(*, real_send: bool) -> bytes:
    """The opaque-ID key: connection or variable ``medspa_id_secret``, else ``MEDSPA_ID_SECRET``.

    Raises:
        ConfigError: a live send without a secret (``resolve_id_secret`` refuses the public key).
    """
    conn = _connection(ID_SECRET_KEY)
    value = (conn.password if conn is not None else None) or _variable(ID_SECRET_KEY)
    value = value or os.environ.get(ID_SECRET_ENV, "")
    if value:
        _mask(value)
    secret, development = resolve_id_secret(
        real_send=real_send, environ={ID_SECRET_ENV: value} if value else {}
    )
    if development:
        log.warning(
            "WARNING: no %s connection or variable and no %s: using the public DEVELOPMENT key. "
            "Opaque IDs from this run are guessable; a live send refuses this key.",
            ID_SECRET_KEY, ID_SECRET_ENV,
        )  # fmt: skip
    return secret


def describe_error(exc: BaseException | None) -> tuple[str, str | None]:
    """(class name, message) for an alert: a message only from our own PHI-safe exceptions.

    Third-party exceptions (SDKs, drivers) may quote row values, so only their class is named.
    """
    seen: set[int] = set()
    current = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, MedspaError):
            return type(current).__name__, str(current)
        current = current.__cause__
    return (type(exc).__name__ if exc is not None else "unknown"), None


def run_url(dag_id: str, run_id: str) -> str:
    from airflow.sdk import conf

    base = str(conf.get("api", "base_url", fallback="http://localhost:8080/")).rstrip("/")
    return f"{base}/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"


def failure_payload(context: Mapping[str, Any]) -> dict[str, Any]:
    """The alert body: ids, links, error class (and our message), counts so far. Never PHI."""
    ti = context["ti"]
    error_type, message = describe_error(context.get("exception"))
    counts: dict[str, Any] = {}
    for task_id in STEP_IDS:
        if task_id == ti.task_id:
            continue
        value = ti.xcom_pull(task_ids=task_id)
        if isinstance(value, Mapping):
            counts[task_id] = numbers_only(value)
    start, end = context.get("data_interval_start"), context.get("data_interval_end")
    text = f"medspa-conversions: {ti.dag_id} failed at {ti.task_id} ({error_type})"
    return {
        "text": text,
        "dag_id": ti.dag_id,
        "run_id": ti.run_id,
        "task_id": ti.task_id,
        "try_number": ti.try_number,
        "data_interval_start": start.isoformat() if start else None,
        "data_interval_end": end.isoformat() if end else None,
        "error": {"type": error_type, "message": message},
        "counts": counts,
        "run_url": run_url(ti.dag_id, ti.run_id),
        "log_url": getattr(ti, "log_url", None),
    }


def alert_setting(name: str) -> str | None:
    """An alert destination from the environment, else an Airflow Variable of the same name."""
    return os.environ.get(name, "").strip() or _variable(name)


def notify_failure(context: Mapping[str, Any]) -> None:
    """``on_failure_callback`` of every task: post the alert to the webhook and/or by email.

    Never raises: a broken alert path must not hide the task's own failure. Nothing about the
    destination (a webhook URL can hold a token) or the payload's values is logged.
    """
    try:
        payload = failure_payload(context)
        webhook, email = alert_setting(ALERT_WEBHOOK), alert_setting(ALERT_EMAIL)
        if not webhook and not email:
            log.warning("failure alert not sent: set %s or %s", ALERT_WEBHOOK, ALERT_EMAIL)
            return
        if webhook:
            post_alert(webhook, payload)
        if email:
            email_alert(email, payload)
        log.info("failure alert sent for %s", payload["task_id"])
    except Exception as exc:
        log.warning("failure alert not sent (%s)", type(exc).__name__)


def post_alert(url: str, payload: Mapping[str, Any], timeout: float = 10.0) -> None:
    """POST the alert as JSON (a Slack-compatible ``text`` plus the structured fields)."""
    body = json.dumps(payload, sort_keys=True).encode("utf-8")
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(request, timeout=timeout) as response:
        response.read()


def email_alert(to: str, payload: Mapping[str, Any]) -> None:
    """Mail the alert via the SMTP connection ``MEDSPA_ALERT_SMTP_CONN`` names (smtp_default)."""
    from airflow.providers.smtp.hooks.smtp import SmtpHook

    conn_id = alert_setting(ALERT_SMTP_CONN) or "smtp_default"
    body = "<pre>" + html.escape(json.dumps(payload, indent=2, sort_keys=True)) + "</pre>"
    with SmtpHook(smtp_conn_id=conn_id) as hook:
        hook.send_email_smtp(to=[a.strip() for a in to.split(",") if a.strip()],
                             subject=str(payload["text"]), html_content=body)  # fmt: skip
