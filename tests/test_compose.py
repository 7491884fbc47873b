"""The compose demo starts many workers at once, and only healthy ones serve.

These read ``docker-compose.yml`` and the ``Dockerfile`` as files: no Docker and
no database are needed, only what the demo promises about its shape.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text("utf-8"))
    services: dict[str, Any] = compose["services"]
    return services


def _command(app: dict[str, Any]) -> list[str]:
    """The app's command: compose's ``command`` if set, else the image's CMD."""
    if "command" in app:
        command = app["command"]
        return shlex.split(command) if isinstance(command, str) else list(command)

    lines = (ROOT / "Dockerfile").read_text("utf-8").splitlines()
    cmds = [line for line in lines if line.startswith("CMD ")]
    assert cmds, "the Dockerfile has no CMD and compose sets no command"
    # Docker uses the last CMD; exec form is a JSON array, shell form is not.
    form = cmds[-1].removeprefix("CMD ").strip()
    parsed: list[str] = json.loads(form) if form.startswith("[") else shlex.split(form)
    return parsed


def _option(command: list[str], name: str) -> str:
    """The value of ``--name value`` or ``--name=value`` in a command line."""
    for i, word in enumerate(command):
        if word == name:
            return command[i + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    raise AssertionError(f"{name} not in {command}")


def test_app_runs_three_replicas(services: dict[str, Any]) -> None:
    assert services["app"]["deploy"]["replicas"] == 3


def test_each_replica_runs_uvicorn_with_four_workers(
    services: dict[str, Any],
) -> None:
    command = _command(services["app"])

    assert command[:2] == ["uvicorn", "app.main:app"]
    assert _option(command, "--workers") == "4"
    assert _option(command, "--host") == "0.0.0.0"


def test_app_healthcheck_asks_the_gate_if_ready(services: dict[str, Any]) -> None:
    test = services["app"]["healthcheck"]["test"]
    line = " ".join(test) if isinstance(test, list) else test

    assert "/health/ready" in line
    # The slim image has no curl; the check must get by with Python.
    assert "curl" not in line
    assert "python" in line


def test_app_starts_after_db_is_healthy(services: dict[str, Any]) -> None:
    assert services["app"]["depends_on"]["db"]["condition"] == "service_healthy"


def test_db_reports_healthy_with_pg_isready(services: dict[str, Any]) -> None:
    db = services["db"]
    test = db["healthcheck"]["test"]
    line = " ".join(test) if isinstance(test, list) else test

    assert db["image"].startswith("postgres:18")
    assert "pg_isready" in line


def test_app_database_url_names_the_db_service(services: dict[str, Any]) -> None:
    environment = services["app"]["environment"]
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)

    url = environment["DATABASE_URL"]
    assert url.startswith("postgresql://")
    assert "@db:5432/" in url
