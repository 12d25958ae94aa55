"""Parse ``dags/`` as the dag-processor does and report what parsing touched, as JSON on stdout.

Run in a fresh interpreter by ``test_dag_integrity.py`` (so nothing the test session imported
hides a heavy import): ``python tests/dags/parse_probe.py OUT.json DAGS_DIR CLINICS_DIR...``
parses ``DAGS_DIR`` once per clinics directory and writes, per parse: import errors and warnings,
each DAG's timetable, params and edges, SQL statements executed on any SQLAlchemy engine,
connection and variable lookups, non-code files opened, and heavy modules imported. (Airflow logs
to stdout, hence the output file.)
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

HEAVY_MODULES = ("pandas", "numpy", "pyarrow", "great_expectations", "etl.tasks", "etl.pipeline",
                 "etl.store", "google.ads", "facebook_business", "grpc")  # fmt: skip
CODE_SUFFIXES = (".py", ".pyc", ".so", ".pth", ".pyi")


def main(dags_dir: str, clinics_dirs: list[str]) -> list[dict[str, Any]]:
    recording: list[bool] = [False]
    opened: list[str] = []

    def audit(event: str, args: tuple[Any, ...]) -> None:
        if recording[0] and event == "open" and isinstance(args[0], str | Path):
            opened.append(str(args[0]))

    sys.addaudithook(audit)

    import sqlalchemy as sa
    from sqlalchemy.engine import Engine

    statements: list[str] = []

    def count_sql(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if recording[0]:
            statements.append(statement.split("\n")[0][:120])

    sa.event.listen(Engine, "before_cursor_execute", count_sql)

    from airflow import settings
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.connection import Connection as CoreConnection
    from airflow.models.variable import Variable as CoreVariable
    from airflow.sdk.bases.hook import BaseHook
    from airflow.sdk.definitions.connection import Connection
    from airflow.sdk.definitions.variable import Variable

    if settings.engine is None:  # make sure an accidental query would have an engine to run on
        settings.configure_orm()
    lookups: list[str] = []

    def spy(name: str) -> Any:
        def looked_up(*_args: Any, **_kwargs: Any) -> Any:
            lookups.append(name)
            raise RuntimeError(f"{name} called while parsing")

        return classmethod(looked_up)

    Connection.get = spy("sdk.Connection.get")  # type: ignore[method-assign]
    Variable.get = spy("sdk.Variable.get")  # type: ignore[method-assign]
    BaseHook.get_connection = spy("BaseHook.get_connection")  # type: ignore[method-assign]
    CoreConnection.get_connection_from_secrets = spy("models.Connection.get_connection_from_secrets")  # type: ignore[method-assign]
    CoreVariable.get = spy("models.Variable.get")  # type: ignore[method-assign]

    reports = []
    for clinics in clinics_dirs:
        os.environ["MEDSPA_CLINICS_DIR"] = clinics
        opened.clear()
        statements.clear()
        lookups.clear()
        before = set(sys.modules)
        recording[0] = True
        bag = DagBag(dag_folder=dags_dir)
        recording[0] = False
        imported = set(sys.modules) - before
        reports.append({
            "clinics_dir": clinics,
            "import_errors": {str(k): str(v)[-2000:] for k, v in bag.import_errors.items()},
            "warnings": [w for ws in bag.captured_warnings.values() for w in ws],
            "dags": {dag_id: _describe(dag) for dag_id, dag in sorted(bag.dags.items())},
            "sql_statements": list(statements),
            "lookups": list(lookups),
            "opened": sorted({p for p in opened if not p.endswith(CODE_SUFFIXES) and Path(p).is_file()}),
            "heavy_modules": sorted(m for m in imported if m in HEAVY_MODULES or m.split(".")[0] in HEAVY_MODULES),
        })  # fmt: skip
    return reports


def _describe(dag: Any) -> dict[str, Any]:
    timetable = dag.timetable
    return {
        "timetable": f"{type(timetable).__module__}.{type(timetable).__qualname__}",
        "expression": getattr(timetable, "expression", None),
        "timezone": str(getattr(timetable, "timezone", None)),
        "max_active_runs": dag.max_active_runs,
        "catchup": dag.catchup,
        "params": {k: dag.params[k] for k in dag.params},
        "tasks": sorted(t.task_id for t in dag.tasks),
        "edges": sorted([t.task_id, d] for t in dag.tasks for d in t.downstream_task_ids),
        "retries": {t.task_id: t.retries for t in dag.tasks},
        "one_at_a_time": sorted(t.task_id for t in dag.tasks if t.max_active_tis_per_dag == 1),
        "trigger_rules": {t.task_id: str(t.trigger_rule) for t in dag.tasks},
        # every task alerts on failure but the watcher, whose failure repeats a send's
        "has_failure_callback": all(
            bool(t.on_failure_callback) for t in dag.tasks if t.task_id != "sends_failed"
        ),
        "watcher_alerts": any(bool(t.on_failure_callback) for t in dag.tasks if t.task_id == "sends_failed"),
        "tags": sorted(dag.tags),
    }


if __name__ == "__main__":
    out, dags, *clinics = sys.argv[1:]
    Path(out).write_text(json.dumps(main(dags, clinics), indent=2, sort_keys=True), encoding="utf-8")
