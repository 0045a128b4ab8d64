"""The project's promises about itself: the README's commands, the compose file, and the place
of worker.py in the layers."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import compose
import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = Path(compose.__file__).parent / "docker-compose"


def readme() -> str:
    return (ROOT / "README.md").read_text()


# What the compose file requires, with no default (it refuses to start without them).
REQUIRED = {
    "PAGERLOOP_INGEST_API_KEYS": "ingest-key-one,ingest-key-two",
    "PAGERLOOP_USER_HASH_SALT": "salt-from-the-environment",
    "STORES_DB_PASSWORD": "stores-password-from-the-environment",
    "TEMPORAL_DB_PASSWORD": "temporal-password-from-the-environment",
}


def compose_text() -> str:
    return (ROOT / "docker-compose.yml").read_text()


def compose_config(**env: str) -> subprocess.CompletedProcess[str]:
    """`docker compose config` with only `env` of what the file reads (no `.env` either)."""
    named = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", compose_text()))
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PAGERLOOP_", "COMPOSE_")) and k not in named
    }
    return subprocess.run(
        [
            str(COMPOSE),
            "-f",
            str(ROOT / "docker-compose.yml"),
            "--env-file",
            os.devnull,
            "config",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        env=clean | env,
        check=False,
        timeout=60,
    )


def compose_services(**env: str) -> dict[str, Any]:
    result = compose_config(**(REQUIRED | env))
    assert result.returncode == 0, result.stderr
    services: dict[str, Any] = json.loads(result.stdout)["services"]
    return services


def test_ci_runs_exactly_the_readme_test_command() -> None:
    blocks = re.findall(r"```sh\n(.*?)\n```", readme(), flags=re.DOTALL)
    assert blocks[0] == "uv run pagerloop dev"
    test_command = blocks[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"\n{test_command}\n" in ci


def test_compose_file_is_valid_and_names_every_service_the_readme_names() -> None:
    services = compose_services()
    section = readme().split("## Running on real servers (docker compose)")[1].split("\n## ")[0]
    named = set(re.findall(r"^\| `([a-z-]+)` \|", section, flags=re.MULTILINE))
    assert named == set(services)
    assert named >= {"temporal", "temporal-db", "temporal-ui", "stores-db", "worker", "api"}
    for name in ("temporal-db", "temporal", "temporal-ui", "stores-db", "worker", "api"):
        assert "healthcheck" in services[name], name
    for name in ("worker", "api"):
        assert services[name]["build"]["context"] == str(ROOT)
        assert services[name]["depends_on"]["temporal"]["condition"] == "service_healthy"
        assert services[name]["depends_on"]["stores-db"]["condition"] == "service_healthy"
        env = services[name]["environment"]
        assert env["PAGERLOOP_TEMPORAL_ADDRESS"] == "temporal:7233"
        assert env["PAGERLOOP_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert services["temporal"]["depends_on"]["temporal-db"]["condition"] == "service_healthy"


@pytest.mark.parametrize("variable", sorted(REQUIRED))
@pytest.mark.parametrize("profile", ["", "example"])
def test_compose_refuses_to_start_without_each_required_secret(variable: str, profile: str) -> None:
    for value in (None, ""):
        env = {k: v for k, v in REQUIRED.items() if k != variable}
        if value is not None:
            env[variable] = value
        result = compose_config(**env, COMPOSE_PROFILES=profile)
        assert result.returncode != 0, (variable, value)
        assert f"required variable {variable} is missing a value" in result.stderr
        assert f"set {variable} (" in result.stderr  # the file's own message says what it is


def test_only_the_api_and_the_temporal_ui_are_published_on_the_host() -> None:
    services = compose_services(COMPOSE_PROFILES="example")
    published = {
        name: sorted((str(port["published"]), port["target"]) for port in service["ports"])
        for name, service in services.items()
        if service.get("ports")
    }
    assert published == {"api": [("8080", 8080)], "temporal-ui": [("8233", 8080)]}
    # The Temporal frontend stays on the compose network, where the others reach it.
    assert "ports" not in services["temporal"]
    assert services["temporal"]["expose"] == ["7233"]
    assert services["temporal-ui"]["environment"]["TEMPORAL_ADDRESS"] == "temporal:7233"


def test_no_database_password_has_a_default() -> None:
    services = compose_services(COMPOSE_PROFILES="example")
    passwords = {
        "temporal-db": ("POSTGRES_PASSWORD", "TEMPORAL_DB_PASSWORD"),
        "temporal": ("POSTGRES_PWD", "TEMPORAL_DB_PASSWORD"),
        "stores-db": ("POSTGRES_PASSWORD", "STORES_DB_PASSWORD"),
    }
    for name, (key, variable) in passwords.items():
        assert services[name]["environment"][key] == REQUIRED[variable], name
    for name, service in services.items():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|PWD", key):  # every one of them comes from the environment
                assert value in REQUIRED.values(), (name, key)
            if key == "PAGERLOOP_DATABASE_URL":
                userinfo = value.split("://", 1)[1].split("@", 1)[0]
                assert userinfo == f"pagerloop:{REQUIRED['STORES_DB_PASSWORD']}", name
            if key == "PAGERLOOP_USER_HASH_SALT":
                assert value == REQUIRED["PAGERLOOP_USER_HASH_SALT"], name
    # Nor does the file hold a fallback for a secret anywhere: `${..._PASSWORD:-x}` and the like.
    secrets = re.compile(r"\$\{(\w*(?:PASSWORD|PWD|SALT)\w*)(:?[-?])")
    assert set(secrets.findall(compose_text())) <= {(variable, ":?") for variable in REQUIRED}


def test_the_example_app_runs_the_sdk_example_against_the_api_under_a_profile() -> None:
    assert "example-app" not in compose_services()  # `docker compose up` leaves it out
    services = compose_services(COMPOSE_PROFILES="example")
    app, llmock = services["example-app"], services["llmock"]
    assert app["profiles"] == ["example"]
    assert llmock["profiles"] == ["example"]
    env = app["environment"]
    assert env["PAGERLOOP_URL"] == "http://api:8080"
    assert "8080" in {str(port["target"]) for port in services["api"]["ports"]}
    assert app["depends_on"]["api"]["condition"] == "service_healthy"
    # The first ingest key the API accepts (the command keeps the part before a comma) ...
    assert env["PAGERLOOP_API_KEY"] == REQUIRED["PAGERLOOP_INGEST_API_KEYS"]
    assert "PAGERLOOP_API_KEY%%,*}" in app["command"][-1]
    # ... or a key of its own.
    own = compose_services(COMPOSE_PROFILES="example", PAGERLOOP_EXAMPLE_API_KEY="app-key")
    assert own["example-app"]["environment"]["PAGERLOOP_API_KEY"] == "app-key"
    # The SDK from ./sdk, read-only, and the example script in it.
    [mount] = app["volumes"]
    assert (mount["source"], mount["target"]) == (str(ROOT / "sdk"), "/sdk")
    assert mount["read_only"]
    command = app["command"][-1]
    assert re.search(r"pip install [^&]*/sdk &&", command)
    assert command.index("pip install") < command.index("python /sdk/examples/chat_app.py")
    assert (ROOT / "sdk" / "examples" / "chat_app.py").is_file()
    # OpenAI is llmock, run from the project image, on the port the app is pointed at.
    assert env["OPENAI_BASE_URL"] == "http://llmock:8000/v1"
    assert llmock["build"]["context"] == str(ROOT)
    assert llmock["command"][:2] == ["llmock", "serve"]
    assert llmock["command"][llmock["command"].index("--port") + 1] == "8000"
    assert app["depends_on"]["llmock"]["condition"] == "service_healthy"
    real = compose_services(
        COMPOSE_PROFILES="example", OPENAI_BASE_URL="https://api.openai.com/v1", OPENAI_API_KEY="sk"
    )
    assert real["example-app"]["environment"]["OPENAI_BASE_URL"] == "https://api.openai.com/v1"
    assert real["example-app"]["environment"]["OPENAI_API_KEY"] == "sk"


def test_the_image_copies_the_sdk_before_installing() -> None:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    first_sync = next(i for i, line in enumerate(lines) if line.startswith("RUN uv sync"))
    last_sync = max(i for i, line in enumerate(lines) if line.startswith("RUN uv sync"))
    assert lines.index("COPY sdk/pyproject.toml sdk/") < first_sync
    assert lines.index("COPY sdk/ sdk/") < last_sync


def imported(path: Path) -> set[str]:
    """The top-level names of the modules a file imports (anywhere in it, lazily or not)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_worker_py_sits_under_the_cli_and_over_every_other_layer() -> None:
    """import-linter (`uv run lint-imports`) takes packages, not the module worker.py, so its
    place is checked here: the CLI runs it, nothing else of ours imports it, and it imports no
    CLI module (`python worker.py --dev` runs the stack without the CLI)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    importers = []
    for package in config["root_packages"]:
        spec = importlib.util.find_spec(package)
        assert spec is not None, package
        for directory in spec.submodule_search_locations or []:
            importers += [
                str(path) for path in Path(directory).rglob("*.py") if "worker" in imported(path)
            ]
    assert sorted(importers) == sorted(
        str(path) for path in (ROOT / "cli").rglob("*.py") if "worker" in imported(path)
    )
    assert "worker" in imported(ROOT / "cli" / "main.py")
    assert "cli" not in imported(ROOT / "worker.py")


def test_the_names_other_layers_use_are_the_incident_workflows_own() -> None:
    """activities/incidents.py starts and updates incidents by these names, without the class."""
    from temporalio.workflow import _Definition

    from domain import workflow_names
    from workflows.incident import IncidentWorkflow

    definition = _Definition.must_from_class(IncidentWorkflow)
    assert definition.name == workflow_names.INCIDENT_WORKFLOW
    assert {workflow_names.REPORT_BREACH, workflow_names.REPORT_RECOVERY} <= set(definition.updates)
