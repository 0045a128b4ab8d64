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
import yaml

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
    "GRAFANA_ADMIN_PASSWORD": "grafana-password-from-the-environment",
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


def test_only_the_api_the_temporal_ui_and_grafana_are_published_on_the_host() -> None:
    services = compose_services(COMPOSE_PROFILES="example")
    published = {
        name: sorted((str(port["published"]), port["target"]) for port in service["ports"])
        for name, service in services.items()
        if service.get("ports")
    }
    assert published == {
        "api": [("8080", 8080)],
        "temporal-ui": [("8233", 8080)],
        "grafana": [("3000", 3000)],
        # Jaeger's UI has no login, and the collector takes spans from anyone who reaches it:
        # both on the host's loopback only.
        "jaeger": [("16686", 16686)],
        "otel-collector": [("4317", 4317), ("4318", 4318)],
    }
    for name in ("jaeger", "otel-collector"):
        assert {port.get("host_ip") for port in services[name]["ports"]} == {"127.0.0.1"}, name
    for name in ("api", "temporal-ui", "grafana"):
        assert {port.get("host_ip") for port in services[name]["ports"]} == {None}, name
    # Prometheus too stays on the compose network, where Grafana reads it.
    assert "ports" not in services["prometheus"]
    assert services["prometheus"]["expose"] == ["9090"]
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
        "grafana": ("GF_SECURITY_ADMIN_PASSWORD", "GRAFANA_ADMIN_PASSWORD"),
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


def mounts(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A service's volumes by their target in the container."""
    return {mount["target"]: mount for mount in service.get("volumes", [])}


def test_prometheus_scrapes_the_api_and_grafana_shows_the_dashboard_from_this_repository() -> None:
    services = compose_services()
    prometheus, grafana, api = services["prometheus"], services["grafana"], services["api"]
    # Prometheus runs this repository's configuration, which scrapes the API's /metrics.
    config_mount = mounts(prometheus)["/etc/prometheus/prometheus.yml"]
    assert config_mount["source"] == str(ROOT / "deploy" / "prometheus" / "prometheus.yml")
    assert config_mount["read_only"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"][-1]
    assert mounts(prometheus)["/prometheus"]["type"] == "volume"  # its data outlives containers
    config = yaml.safe_load(Path(config_mount["source"]).read_text())
    [job] = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    api_port = api["environment"]["PAGERLOOP_API_PORT"]
    assert job["static_configs"] == [{"targets": [f"api:{api_port}"]}]
    assert {str(port["target"]) for port in api["ports"]} == {api_port}
    # The operator key for a /metrics kept to operators: written where the scrape reads it, on
    # a tmpfs, from a variable that is empty (a public /metrics) unless set.
    key_file = job["authorization"]["credentials_file"]
    assert job["authorization"]["type"] == "Bearer"
    assert str(Path(key_file).parent) in prometheus["tmpfs"]
    assert f"> {key_file}" in prometheus["command"][-1]
    assert prometheus["environment"]["PAGERLOOP_METRICS_KEY"] == ""
    assert "PAGERLOOP_METRICS_KEY" in prometheus["command"][-1]
    assert api["environment"]["PAGERLOOP_PUBLIC_ENDPOINTS"] == "metrics,status"
    keyed = compose_services(PAGERLOOP_PUBLIC_ENDPOINTS="", PAGERLOOP_METRICS_KEY="k")
    assert keyed["api"]["environment"]["PAGERLOOP_PUBLIC_ENDPOINTS"] == ""  # nothing public
    assert keyed["prometheus"]["environment"]["PAGERLOOP_METRICS_KEY"] == "k"

    # Grafana: this repository's provisioning (data source, dashboard provider) and dashboards.
    provisioning = mounts(grafana)["/etc/grafana/provisioning"]
    assert provisioning["source"] == str(ROOT / "deploy" / "grafana" / "provisioning")
    assert provisioning["read_only"]
    [provider] = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/dashboards/pagerloop.yml").read_text()
    )["providers"]
    dashboards = mounts(grafana)[provider["options"]["path"]]
    assert dashboards["source"] == str(ROOT / "deploy" / "grafana" / "dashboards")
    assert (Path(dashboards["source"]) / "pagerloop.json").is_file()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards['target']}/pagerloop.json"
    [source] = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    )["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == f"http://prometheus:{prometheus['expose'][0]}"
    # Every panel reads that data source, by its uid.
    dashboard = json.loads((Path(dashboards["source"]) / "pagerloop.json").read_text())
    used = {
        json.dumps(item["datasource"], sort_keys=True)
        for panel in dashboard["panels"]
        for item in [panel, *panel.get("targets", [])]
        if "datasource" in item
    }
    assert used == {json.dumps({"type": "prometheus", "uid": source["uid"]}, sort_keys=True)}
    # No way in without the password: no anonymous viewers, no sign-up.
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert grafana["environment"]["GF_USERS_ALLOW_SIGN_UP"] == "false"
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"
    assert "healthcheck" in prometheus
    assert "healthcheck" in grafana


def merged(*documents: dict[str, Any]) -> dict[str, Any]:
    """Collector configurations given as several `--config`, merged as the collector merges
    them: maps joined key by key, anything else (lists too) replaced by the later one."""
    result: dict[str, Any] = {}
    for document in documents:
        for key, value in document.items():
            if isinstance(value, dict) and isinstance(result.get(key), dict):
                result[key] = merged(result[key], value)
            else:
                result[key] = value
    return result


def collector_config(service: dict[str, Any]) -> dict[str, Any]:
    """The collector's configuration as its command names it, read from the mounted folder."""
    mount = mounts(service)["/etc/otelcol-contrib"]
    assert mount["source"] == str(ROOT / "deploy" / "otel-collector")
    assert mount["read_only"]
    files = [arg.removeprefix("--config=") for arg in service["command"]]
    assert files
    assert all(f.startswith("/etc/otelcol-contrib/") for f in files), files
    documents = []
    for name in files:
        path = Path(mount["source"]) / Path(name).relative_to("/etc/otelcol-contrib")
        assert path.is_file(), path
        documents.append(yaml.safe_load(path.read_text()))
    return merged(*documents)


def check_pipelines(config: dict[str, Any]) -> None:
    """Every pipeline takes spans from defined receivers, through defined processors, to
    defined exporters (what the collector refuses to start without)."""
    assert config["service"]["pipelines"], "no pipeline"
    for name, pipeline in config["service"]["pipelines"].items():
        assert pipeline["receivers"], name
        assert pipeline["exporters"], name
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in config[kind], (name, kind, component)


def test_the_collector_sends_the_apps_spans_to_jaeger_and_on_demand_to_the_api() -> None:
    services = compose_services()
    collector, jaeger, api = services["otel-collector"], services["jaeger"], services["api"]
    assert collector["image"].startswith("otel/opentelemetry-collector-contrib:")
    assert jaeger["image"].startswith("jaegertracing/jaeger:")
    for service in (collector, jaeger):  # pinned, never `latest`
        assert re.fullmatch(r"\d+\.\d+\.\d+", service["image"].rsplit(":", 1)[1]), service["image"]
    assert collector["depends_on"]["jaeger"]["condition"] == "service_started"

    config = collector_config(collector)
    check_pipelines(config)
    # OTLP in on both protocols, on every interface of the container, on the published ports.
    protocols = config["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"] == "0.0.0.0:4317"
    assert protocols["http"]["endpoint"] == "0.0.0.0:4318"
    assert {port["target"] for port in collector["ports"]} == {4317, 4318}
    # Out to Jaeger's OTLP port on the compose network, which Jaeger listens on.
    [traces] = [p for name, p in config["service"]["pipelines"].items() if name == "traces"]
    assert traces["receivers"] == ["otlp"]
    assert traces["exporters"] == ["otlp_grpc/jaeger"]  # by default, Jaeger only
    exporter = config["exporters"]["otlp_grpc/jaeger"]
    host, port = exporter["endpoint"].split(":")
    assert host == "jaeger"
    assert host in services
    assert port in jaeger["expose"]
    assert exporter["tls"]["insecure"] is True
    assert jaeger["environment"]["JAEGER_LISTEN_HOST"] == "0.0.0.0"  # noqa: S104 (its container)
    assert [p["target"] for p in jaeger["ports"]] == [16686]  # its UI

    # On demand, the API's OTLP intake too, with an ingest key of the collector's own.
    both = compose_services(
        PAGERLOOP_COLLECTOR_PIPELINE="jaeger-and-pagerloop", PAGERLOOP_COLLECTOR_API_KEY="k1"
    )["otel-collector"]
    forwarding = collector_config(both)
    check_pipelines(forwarding)
    assert forwarding["service"]["pipelines"]["traces"]["exporters"] == [
        "otlp_grpc/jaeger",
        "otlp_http/pagerloop",
    ]
    intake = forwarding["exporters"]["otlp_http/pagerloop"]
    assert intake["endpoint"] == f"http://api:{api['environment']['PAGERLOOP_API_PORT']}"
    assert intake["headers"]["Authorization"] == "Bearer ${env:PAGERLOOP_COLLECTOR_API_KEY}"
    assert both["environment"]["PAGERLOOP_COLLECTOR_API_KEY"] == "k1"
    assert collector["environment"]["PAGERLOOP_COLLECTOR_API_KEY"] == ""  # no key by default
    # Every pipeline file there is makes a configuration the collector can start with.
    base = yaml.safe_load((ROOT / "deploy/otel-collector/config.yaml").read_text())
    pipelines = sorted((ROOT / "deploy/otel-collector").glob("pipeline-*.yaml"))
    assert [p.name for p in pipelines] == [
        "pipeline-jaeger-and-pagerloop.yaml",
        "pipeline-jaeger.yaml",
    ]
    for path in pipelines:
        check_pipelines(merged(base, yaml.safe_load(path.read_text())))


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
