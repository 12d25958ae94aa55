"""``docker-compose.yml`` without a Docker engine (issue #6, item 6).

The file is validated against the Compose Specification's JSON schema (vendored, see
``tests/data/compose-spec/README.md``); then every service's image, command and mounted path is
checked against this repository and the installed Airflow CLI.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from etl import airflow_support as support
from tests.dags.conftest import REPO

COMPOSE = REPO / "docker-compose.yml"
SCHEMA = REPO / "tests" / "data" / "compose-spec" / "compose-spec.json"
AIRFLOW_SERVICES = {
    "airflow-apiserver": ["api-server"],
    "airflow-scheduler": ["scheduler"],
    "airflow-dag-processor": ["dag-processor"],
    "airflow-triggerer": ["triggerer"],
    "airflow-worker": ["celery", "worker"],
    "airflow-init": ["db", "migrate"],
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text(encoding="utf-8")))


def test_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    validator = jsonschema.validators.validator_for(schema)(schema)
    validator.validate(compose)
    # and the schema does reject what Compose would: a misspelt key, a wrong type
    broken = json.loads(json.dumps(compose))
    broken["services"]["redis"]["imagee"] = broken["services"]["redis"].pop("image")
    broken["services"]["postgres"]["ports"] = "5432"
    paths = {error.json_path for error in validator.iter_errors(broken)}
    assert {"$.services.redis", "$.services.postgres.ports"} <= paths


def test_the_deployment_has_every_service(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"postgres", "redis", *AIRFLOW_SERVICES}
    for name, command in AIRFLOW_SERVICES.items():
        service = compose["services"][name]
        assert service["command"] == command, name
        assert service["environment"]["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"


def test_every_command_is_an_airflow_cli_command(compose: dict[str, Any]) -> None:
    from airflow.cli.cli_config import core_commands

    commands = {c.name: c for c in core_commands}
    for name in AIRFLOW_SERVICES:
        first, *rest = compose["services"][name]["command"]
        if first == "celery":  # the Celery provider's command, shipped in the official image
            assert rest == ["worker"]
            continue
        assert first in commands, name
        subcommands = getattr(commands[first], "subcommands", None)
        if subcommands:
            assert rest and rest[0] in {s.name for s in subcommands}, name


def test_every_image_is_pinned_and_the_built_one_matches_the_installed_airflow(
    compose: dict[str, Any],
) -> None:
    import airflow

    for name, service in compose["services"].items():
        image = service["image"]
        assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), name
        if "build" in service:
            assert (REPO / service["build"]["context"] / service["build"]["dockerfile"]).is_file(), name
    dockerfile = (REPO / "docker" / "Dockerfile").read_text(encoding="utf-8")
    assert f"FROM apache/airflow:{airflow.__version__}-python3.11" in dockerfile
    assert f'"apache-airflow=={airflow.__version__}"' in dockerfile
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            sources = [s for s in line.split()[1:-1] if not s.startswith("--")]
            for source in sources:
                assert (REPO / source).exists(), source


def test_every_mount_exists_and_lands_where_the_services_look(compose: dict[str, Any]) -> None:
    named = set(compose.get("volumes", {}))
    targets: dict[str, str] = {}
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name}: {source}"
                targets[source] = target
            else:
                assert source in named, f"{name}: {source}"
    env = compose["services"]["airflow-scheduler"]["environment"]
    assert targets["./dags"] == env["AIRFLOW__CORE__DAGS_FOLDER"]
    assert targets["./clinics"] == env["MEDSPA_CLINICS_DIR"]
    assert targets["./etl"] == "/opt/medspa/etl"  # the editable install of docker/Dockerfile


def test_compose_names_only_variables_the_dags_read(compose: dict[str, Any]) -> None:
    env = compose["services"]["airflow-worker"]["environment"]
    ours = {k for k in env if k.startswith("MEDSPA_")}
    known = {support.CLINICS_DIR_ENV, support.DATABASE_URL_ENV, support.DEFAULT_TARGET_ENV,
             support.ALERT_WEBHOOK, support.ALERT_EMAIL}  # fmt: skip
    assert ours == known
    assert "MEDSPA_ID_SECRET" not in COMPOSE.read_text(encoding="utf-8")  # secrets: connections


def test_staging_database_is_created_beside_the_metadata_database(compose: dict[str, Any]) -> None:
    init = Path(REPO / "docker" / "postgres-init.sql").read_text(encoding="utf-8")
    assert "CREATE DATABASE medspa;" in init
    assert compose["services"]["airflow-worker"]["environment"]["MEDSPA_DATABASE_URL"].endswith("/medspa")


def test_secrets_fail_closed_and_ports_stay_on_loopback(compose: dict[str, Any]) -> None:
    text = COMPOSE.read_text(encoding="utf-8")
    for name in ("AIRFLOW_JWT_SECRET", "AIRFLOW_FERNET_KEY", "POSTGRES_PASSWORD", "REDIS_PASSWORD"):
        uses = re.findall(r"\$\{" + name + r"(:[?-])?[^}]*\}", text)
        assert uses and set(uses) == {":?"}, f"{name} must be required (${{{name}:?...}}), never defaulted"
    for service in ("postgres", "redis"):
        (port,) = compose["services"][service]["ports"]
        assert port.startswith("${" + service.upper() + "_BIND:-127.0.0.1}:"), port
    assert "--requirepass" in compose["services"]["redis"]["command"]
    assert ":${REDIS_PASSWORD" in compose["x-airflow-common"]["environment"]["AIRFLOW__CELERY__BROKER_URL"]
