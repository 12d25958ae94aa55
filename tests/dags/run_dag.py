"""Run one DAG several times in one process with ``dag.test()``; results as JSON in a file.

``python tests/dags/run_dag.py RUNS.json OUT.json DAG_ID`` where RUNS.json is a list of
``{"logical_date": ISO, "conf": {...}}`` (the environment names AIRFLOW_HOME, the dags folder and
MEDSPA_CLINICS_DIR). Each ``dag.test()`` is one DAG run whose data interval the timetable infers
from the logical date, as for a scheduled or backfill run; one process pays Airflow's start-up
(about 30 s with the in-process execution API and the Great Expectations import) once.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


def main(dag_id: str, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    import pendulum
    from airflow.dag_processing.dagbag import DagBag

    runs = []
    for request in requests:
        # parsed afresh per run, as each worker does: dag.test() leaves run conf in dag.params
        dag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"]).get_dag(dag_id)
        if dag is None:
            raise SystemExit(f"{dag_id} not found")
        run = dag.test(logical_date=pendulum.parse(request["logical_date"]), run_conf=request.get("conf"))
        runs.append({
            "logical_date": request["logical_date"],
            "state": str(run.state),
            "data_interval_start": run.data_interval_start.isoformat(),
            "data_interval_end": run.data_interval_end.isoformat(),
            "tasks": {ti.task_id: str(ti.state) for ti in run.get_task_instances()},
        })  # fmt: skip
    return runs


if __name__ == "__main__":
    requested, out, dag_id = sys.argv[1:]
    runs = main(dag_id, json.loads(Path(requested).read_text(encoding="utf-8")))
    Path(out).write_text(json.dumps(runs, indent=2), encoding="utf-8")
