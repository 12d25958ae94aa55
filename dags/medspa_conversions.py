"""One nightly DAG per clinic YAML: hashed offline conversions to Google Ads and Meta.

Contract: issue #6 and ``docs/airflow.md``. Wiring only (STYLE 1): the tasks are thin wrappers
over ``etl.airflow_support``, which calls ``etl.tasks``, the same steps the CLI runs. Parsing
reads the clinic YAML files under ``MEDSPA_CLINICS_DIR`` (default: the repository's
``clinics/``) and nothing else: no database, no connection, no pandas.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from airflow.sdk import (
    DAG,
    CronDataIntervalTimetable,
    Param,
    TriggerRule,
    chain,
    dag,
    get_parsing_context,
    task,
)

from etl import airflow_support as steps

DOC = """
### Nightly offline conversions for clinic `{clinic_id}`

extract -> stage -> validate_inputs -> build_conversions -> validate_outbound (PHI gate)
-> upload_google | upload_meta | sync_suppression -> report (also after a failed send; then
`sends_failed` fails the run).

Each run covers its data interval (`{schedule}` in {timezone}), is keyed by clinic and interval
in the staging database, and sends nothing the send ledger already holds, so reruns and
backfills are safe. XComs carry counts and paths only. The `report` task returns where the
outbox, summary.json and the HTML report are. Params: `dry_run` (write the outbox, send
nothing), `target` (`sandbox` = local fakes of Google and Meta, `live`) and `new_database`
(start a new send ledger on purpose, as `run --new-database`). See docs/airflow.md.
"""


def build_dag(clinic: steps.Clinic) -> DAG:
    """The clinic's DAG; every task re-reads the YAML at ``clinic.config_path`` when it runs."""
    path = str(clinic.config_path)

    @dag(
        dag_id=clinic.dag_id,
        description=f"Offline conversions for {clinic.clinic_id} (Google Ads, Meta)",
        doc_md=DOC.format(clinic_id=clinic.clinic_id, schedule=clinic.schedule, timezone=clinic.timezone),
        schedule=CronDataIntervalTimetable(clinic.schedule, timezone=clinic.timezone),
        start_date=steps.START_DATE,
        catchup=False,
        max_active_runs=1,
        tags=["medspa-conversions", clinic.clinic_id],
        params={
            "dry_run": Param(False, type="boolean", description="Write the outbox; send nothing."),
            "target": Param(
                steps.default_target(),
                type="string",
                enum=list(steps.TARGETS),
                description="sandbox: local fakes of Google and Meta; live: the real APIs.",
            ),
            "new_database": Param(
                False,
                type="boolean",
                description="Start a new send ledger in this database although the clinic's earlier sends "
                "are recorded in another (var/ledgers/): everything not in this one's ledger is sent "
                "again. Only when the old database is lost.",
            ),
        },
        default_args={**steps.RETRIES, "on_failure_callback": steps.notify_failure},
    )
    def medspa_conversions() -> None:
        @task
        def extract(
            data_interval_start: datetime | None = None,
            data_interval_end: datetime | None = None,
            params: dict[str, Any] | None = None,
        ) -> dict[str, Any]:
            return steps.run_extract(path, data_interval_start, data_interval_end, params)

        @task
        def stage(
            data_interval_start: datetime | None = None,
            data_interval_end: datetime | None = None,
            params: dict[str, Any] | None = None,
        ) -> dict[str, Any]:
            return steps.run_stage(path, data_interval_start, data_interval_end, params)

        @task
        def validate_inputs(
            data_interval_start: datetime | None = None,
            data_interval_end: datetime | None = None,
            params: dict[str, Any] | None = None,
        ) -> dict[str, Any]:
            return steps.run_validate_inputs(path, data_interval_start, data_interval_end, params)

        @task
        def build_conversions(
            inputs: dict[str, Any],
            data_interval_start: datetime | None = None,
            data_interval_end: datetime | None = None,
            params: dict[str, Any] | None = None,
        ) -> dict[str, Any]:
            return steps.run_build_conversions(path, data_interval_start, data_interval_end, params, inputs)

        @task
        def validate_outbound(
            data_interval_start: datetime | None = None,
            data_interval_end: datetime | None = None,
            params: dict[str, Any] | None = None,
        ) -> dict[str, Any]:
            return steps.run_validate_outbound(path, data_interval_start, data_interval_end, params)

        @task(**steps.SENDING_TASK)
        def upload_google(
            data_interval_start: datetime | None = None,
            data_interval_end: datetime | None = None,
            params: dict[str, Any] | None = None,
        ) -> dict[str, Any]:
            return steps.run_upload("google", path, data_interval_start, data_interval_end, params)

        @task(**steps.SENDING_TASK)
        def upload_meta(
            data_interval_start: datetime | None = None,
            data_interval_end: datetime | None = None,
            params: dict[str, Any] | None = None,
        ) -> dict[str, Any]:
            return steps.run_upload("meta", path, data_interval_start, data_interval_end, params)

        @task(**steps.SENDING_TASK)
        def sync_suppression(
            data_interval_start: datetime | None = None,
            data_interval_end: datetime | None = None,
            params: dict[str, Any] | None = None,
        ) -> dict[str, Any]:
            return steps.run_sync_suppression(path, data_interval_start, data_interval_end, params)

        # once every send finished, whatever each one's outcome: a run that reached Meta while
        # Google refused still gets its summary and report (it skips when nothing was published)
        @task(trigger_rule=TriggerRule.ALL_DONE)
        def report(
            data_interval_start: datetime | None = None,
            data_interval_end: datetime | None = None,
            params: dict[str, Any] | None = None,
        ) -> dict[str, Any]:
            return steps.run_report(path, data_interval_start, data_interval_end, params)

        @task(trigger_rule=TriggerRule.ONE_FAILED, retries=0, on_failure_callback=None)
        def sends_failed() -> None:
            steps.fail_run_for_failed_sends()

        inputs = extract()
        published, summarized = validate_outbound(), report()
        sends = [upload_google(), upload_meta(), sync_suppression()]
        chain(
            inputs,
            stage(),
            validate_inputs(),
            build_conversions(inputs),  # type: ignore[arg-type]  # the XComArg resolves to a dict
            published,
            # the three sends are independent: one platform refusing never holds back the
            # other's conversions or either list's removals (revoked people leave at the next sync)
            sends,
            summarized,
        )
        published >> summarized
        sends >> sends_failed()  # a leaf that fails the run when a send failed

    return medspa_conversions()


for _clinic in steps.discover_clinics(
    steps.clinics_root(Path(__file__).resolve().parent.parent),
    only_dag_id=get_parsing_context().dag_id,
):
    globals()[_clinic.dag_id] = build_dag(_clinic)
