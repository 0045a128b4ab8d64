"""The project's promises about itself: the README's commands and the compose file."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import compose

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = Path(compose.__file__).parent / "docker-compose"


def readme() -> str:
    return (ROOT / "README.md").read_text()


def compose_config(**env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PAGERLOOP_")}
    return subprocess.run(
        [str(COMPOSE), "-f", str(ROOT / "docker-compose.yml"), "config", "--format", "json"],
        capture_output=True,
        text=True,
        env=clean | env,
        check=False,
        timeout=60,
    )


def test_ci_runs_exactly_the_readme_test_command() -> None:
    blocks = re.findall(r"```sh\n(.*?)\n```", readme(), flags=re.DOTALL)
    assert blocks[0] == "uv run pagerloop dev"
    test_command = blocks[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert f"\n{test_command}\n" in ci


def test_compose_file_is_valid_and_names_every_service_the_readme_names() -> None:
    result = compose_config(PAGERLOOP_INGEST_API_KEYS="k")
    assert result.returncode == 0, result.stderr
    services = json.loads(result.stdout)["services"]
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


def test_compose_refuses_to_start_the_api_without_ingest_keys() -> None:
    result = compose_config()
    assert result.returncode != 0
    assert "PAGERLOOP_INGEST_API_KEYS" in result.stderr
