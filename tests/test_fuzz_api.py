"""schemathesis, the maintained property-based OpenAPI fuzzer, against the real API server with
the `not_a_server_error` check: schema examples, boundary values, then fuzzing, once per kind
of key (an app's ingest key reaches ingest, an operator's key the rest, no key the webhooks),
on SQLite and PostgreSQL. A 5xx is a finding: it must mean a dependency is down, and here
every dependency is up."""

from __future__ import annotations

import asyncio
import json
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine
from temporalio.testing import WorkflowEnvironment

from config import Settings
from tests.conftest import free_port, serving_api

INGEST = "fuzz-ingest-key"
OPERATOR = "fuzz-operator-key"
# Per key and store; the whole module stays around a minute and a half.
FUZZ_SECONDS = 12


@pytest.fixture
async def api_url(dev_env: WorkflowEnvironment, store: Engine) -> AsyncIterator[str]:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=store.url.render_as_string(hide_password=False),
        api_port=free_port(),
        ingest_api_keys=INGEST,
        operator_api_keys=f"fuzzer:{OPERATOR}",
        slack_signing_secret="fuzz-slack-secret",
        pagerduty_webhook_secret="fuzz-pagerduty-secret",
        max_active_silences=10_000,
    )
    async with serving_api(settings, dev_env.client, store) as url:
        yield url


# Each key on the operations it may call; a run on the others would only collect 401s.
RUNS = (
    ("ingest", INGEST, r"^/v1/(llm-calls|traces|feedback)$"),
    ("operator", OPERATOR, r"^/(v1/silences.*|metrics|status|healthz)$"),
    ("none", None, r"^/(slack|pagerduty)/"),
)
_GENERATED = re.compile(r"(\d+) generated, (\d+) passed")


async def fuzz(url: str, schema: Path, key: str | None, paths: str) -> tuple[int, str]:
    headers = ["-H", f"Authorization: Bearer {key}"] if key else []
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        str(schema),
        "--url",
        url,
        "--checks",
        "not_a_server_error",
        "--phases",
        "examples,coverage,fuzzing",
        "--max-time",
        str(FUZZ_SECONDS),
        "--seed",
        "10",
        "--workers",
        "2",
        "--request-timeout",
        "10",
        "--no-color",
        "--suppress-health-check",
        "all",
        "--include-path-regex",
        paths,
        *headers,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    return process.returncode or 0, output.decode(errors="replace")


@pytest.mark.timeout(240)
async def test_no_request_the_schema_allows_or_refuses_gets_a_server_error(
    api_url: str, tmp_path: Path
) -> None:
    async with httpx.AsyncClient(base_url=api_url) as api:
        answer = await api.get("/openapi.json", headers={"Authorization": f"Bearer {OPERATOR}"})
    schema = tmp_path / "openapi.json"
    schema.write_text(answer.text)
    assert {"/v1/llm-calls", "/v1/silences", "/v1/feedback"} <= set(answer.json()["paths"])

    for name, key, paths in RUNS:
        code, output = await fuzz(api_url, schema, key, paths)
        assert code == 0, f"schemathesis with the {name} key found server errors:\n{output}"
        # It really sent requests: a run that tested nothing would pass too.
        counted = _GENERATED.search(output)
        assert counted is not None, output
        assert int(counted.group(1)) > 100, output


def test_the_schema_bounds_every_ingest_number(tmp_path: Path) -> None:
    """What the fuzzer generates from: the documented bounds are in the schema itself."""
    from api.ingest import BATCH

    call = BATCH.components()["CallIn"]["properties"]
    assert json.dumps(call["latency_ms"]).count("maximum") == 1
    for field in ("input_tokens", "output_tokens", "retry_count", "cost_usd"):
        assert "maximum" in json.dumps(call[field]), field
