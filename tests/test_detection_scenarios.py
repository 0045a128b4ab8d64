"""Detection end to end on the local dev server: calls through /v1/llm-calls (and feedback
through /v1/feedback), the real detector, the real incidents, visibility queries to count them."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

import worker
from config import Settings
from detectors.detector import DetectorStatus, DetectorWorkflow
from domain import search_attributes as sa
from domain.workflow_names import detector_workflow_id
from tests.conftest import INGEST_KEY, OPERATOR_KEY
from tests.helpers import eventually

RULES = """
for_evaluations = 2

[tpm_quota]
"gpt-4.1-nano" = 10000
"""
AUTH = {"Authorization": f"Bearer {INGEST_KEY}"}
OPERATOR = {"Authorization": f"Bearer {OPERATOR_KEY}"}


@pytest.fixture
def settings(settings: Settings, tmp_path: Path) -> Settings:
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES)
    return settings.model_copy(update={"rules_file": rules, "daily_budget_usd": 500.0})


def call(status: str = "success", model: str = "gpt-4.1", **extra: Any) -> dict[str, Any]:
    return {"model": model, "status": status, "latency_ms": 800, **extra}


async def post(settings: Settings, calls: list[dict[str, Any]]) -> None:
    async with httpx.AsyncClient(base_url=settings.api_url, timeout=30) as api:
        for start in range(0, len(calls), 5000):
            response = await api.post(
                "/v1/llm-calls", json={"calls": calls[start : start + 5000]}, headers=AUTH
            )
            assert response.status_code == 202, response.text


def detector(client: Client, settings: Settings) -> Any:
    return client.get_workflow_handle_for(
        DetectorWorkflow.run, detector_workflow_id(settings.task_queue)
    )


async def status(client: Client, settings: Settings) -> DetectorStatus:
    found: DetectorStatus = await detector(client, settings).query(DetectorWorkflow.status)
    return found


async def evaluations(client: Client, settings: Settings, more: int) -> DetectorStatus:
    start = (await status(client, settings)).evaluations

    async def done() -> DetectorStatus | None:
        now = await status(client, settings)
        return now if now.evaluations >= start + more else None

    result: DetectorStatus = await eventually(done, timeout=30)
    return result


async def open_incidents(client: Client, settings: Settings) -> list[tuple[str, str, str]]:
    found = []
    query = f"WorkflowType = 'IncidentWorkflow' AND TaskQueue = '{settings.task_queue}'"
    async for execution in client.list_workflows(query):
        attrs = execution.typed_search_attributes
        found.append(
            (
                attrs.get(sa.INCIDENT_TRIGGER) or "",
                attrs.get(sa.INCIDENT_SCOPE) or "",
                attrs.get(sa.INCIDENT_SEVERITY) or "",
            )
        )
    return found


def earlier_today(minutes: int) -> str:
    """`minutes` ago (below 0: now, with the reset at midnight at least that far off)."""
    now = datetime.now(UTC)
    at = now - timedelta(minutes=minutes)
    if at.date() != now.date():
        pytest.skip("too close to midnight UTC for a call earlier today")
    return min(at, now).isoformat()


async def post_quality(settings: Settings, score: float, count: int) -> None:
    await post(settings, [call(call_id="ab" * 8)])
    async with httpx.AsyncClient(base_url=settings.api_url) as api:
        body = [{"call_id": "ab" * 8, "score": score, "source": "eval"}] * count
        assert (await api.post("/v1/feedback", json=body, headers=AUTH)).status_code == 202


SCENARIOS: dict[str, tuple[Callable[[], list[dict[str, Any]]], tuple[str, str, str]]] = {
    "rate limits": (
        lambda: [call()] * 80 + [call("rate_limited", http_status=429)] * 20,
        ("rate_limit_exhaustion", "global", "SEV2"),
    ),
    "slow answers": (
        lambda: [call(latency_ms=20_000)] * 30,
        ("elevated_latency", "global", "SEV2"),
    ),
    "errors": (
        lambda: [call()] * 90 + [call("error", http_status=400)] * 10,
        ("error_rate", "global", "SEV2"),
    ),
    "outage": (
        lambda: [call("server_error", http_status=503)] * 30,
        ("api_outage", "global", "SEV1"),
    ),
    # $10 in a minute: a spend rate of $100+/h against $20.8/h, but the $490 left would last
    # 8 h at the 10-minute burn (a bigger spike is a budget running out: budget_runway).
    "cost spike": (
        lambda: [call(cost_usd=2.0)] * 5,
        ("cost_spike", "global", "SEV2"),
    ),
    # $100 in a minute: at the 10-minute burn ($570/h) the $400 left lasts 42 min.
    "budget runway": (
        lambda: [call(cost_usd=20.0, timestamp=earlier_today(-60))] * 5,
        ("budget_exhaustion", "global", "SEV1"),
    ),
    "budget": (
        lambda: [call(cost_usd=98.0, timestamp=earlier_today(20))] * 5,
        ("budget_exhaustion", "global", "SEV2"),
    ),
    "token quota": (
        lambda: [call(model="gpt-4.1-nano", input_tokens=20_000, output_tokens=0)] * 5,
        ("token_quota", "model:gpt-4.1-nano", "SEV2"),
    ),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_each_trigger_opens_exactly_one_incident(
    running: Client, settings: Settings, scenario: str
) -> None:
    calls, expected = SCENARIOS[scenario]
    await post(settings, calls())
    found = await eventually(lambda: open_incidents(running, settings), timeout=30)
    await evaluations(running, settings, 3)  # the breach goes on: still one incident
    assert await open_incidents(running, settings) == [expected] == found


async def test_low_quality_opens_a_quality_incident(running: Client, settings: Settings) -> None:
    await post_quality(settings, 0.2, 25)
    found = await eventually(lambda: open_incidents(running, settings), timeout=30)
    await evaluations(running, settings, 2)
    assert (
        await open_incidents(running, settings)
        == found
        == [("quality_degradation", "global", "SEV2")]
    )


async def test_a_breach_on_one_model_opens_that_model_only(
    running: Client, settings: Settings
) -> None:
    await post(settings, [call("error", model="o3")] * 30 + [call(model="gpt-4.1")] * 3000)
    found = await eventually(lambda: open_incidents(running, settings), timeout=30)
    await evaluations(running, settings, 3)
    assert await open_incidents(running, settings) == found == [("error_rate", "model:o3", "SEV2")]


async def test_a_metric_flipping_every_evaluation_opens_nothing(
    running: Client, settings: Settings
) -> None:
    # One line (50 %) for warning and critical keeps the steps small: each turns the window's
    # error rate bad or good, one step per evaluation.
    config = (await status(running, settings)).config
    rules = tuple(
        replace(rule, warning=0.5, critical=0.5) if rule.name == "error_rate" else rule
        for rule in config.rules.rules
    )
    config = replace(config, rules=replace(config.rules, rules=rules))
    await detector(running, settings).signal(DetectorWorkflow.reconfigure, config)
    await evaluations(running, settings, 1)
    steps = [
        [call("error")] * 25,  # 25 / 25
        [call()] * 30,  # 25 / 55 = 45 %
        [call("error")] * 40,  # 65 / 95 = 68 %
        [call()] * 45,  # 65 / 140 = 46 %
        [call("error")] * 70,  # 135 / 210 = 64 %
        [call()] * 90,  # 135 / 300 = 45 %
    ]
    verdicts = []
    for batch in steps:
        await post(settings, batch)
        seen = await evaluations(running, settings, 1)
        verdicts.append(seen.last_verdicts["error_rate|global"])
    assert verdicts == ["pending", "ok"] * 3
    assert await open_incidents(running, settings) == []


async def test_a_silenced_trigger_opens_nothing_until_the_silence_ends(
    running: Client, settings: Settings
) -> None:
    async with httpx.AsyncClient(base_url=settings.api_url) as api:
        created = await api.post(
            "/v1/silences",
            json={"trigger": "error_rate", "scope": "model:*", "reason": "other"},
            headers=OPERATOR,
        )
        assert created.status_code == 201
        silence = await api.post(
            "/v1/silences",
            json={"trigger": "error_rate", "scope": "glo*", "duration_minutes": 30,
                  "reason": "provider maintenance"},
            headers=OPERATOR,
        )  # fmt: skip
        assert silence.json()["author"] == "alice"  # the key's name, not a field
    silence_id = silence.json()["id"]
    await post(settings, [call("error")] * 50)
    seen = await evaluations(running, settings, 4)
    assert seen.trigger_states["error_rate|global"].silenced_by == silence_id
    assert await open_incidents(running, settings) == []

    async with httpx.AsyncClient(base_url=settings.api_url) as api:
        expired = await api.delete(f"/v1/silences/{silence_id}", headers=OPERATOR)
        assert expired.json()["active"] is False
        listed = await api.get("/v1/silences", headers=OPERATOR)
    assert [s["id"] for s in listed.json()] == [created.json()["id"]]
    found = await eventually(lambda: open_incidents(running, settings), timeout=30)
    assert found == [("error_rate", "global", "SEV2")]


async def test_the_breach_count_survives_a_worker_restart(
    dev_env: WorkflowEnvironment, settings: Settings, tmp_path: Path
) -> None:
    rules = tmp_path / "slow-rules.toml"
    rules.write_text("for_evaluations = 3\n")
    settings = settings.model_copy(update={"rules_file": rules, "detector_interval_seconds": 2})
    client = dev_env.client
    engine = worker.open_store(settings)
    server = worker_api(settings, client, engine)
    serving = asyncio.create_task(server.serve())
    try:
        async with worker.build_worker(settings, client, engine):
            await worker.ensure_detector(client, settings)
            await post(settings, [call("error")] * 50)

            async def two_in_a_row() -> DetectorStatus | None:
                seen = await status(client, settings)
                state = seen.rule_states.get("error_rate|global")
                return seen if state is not None and state.breaches == 2 else None

            before = await eventually(two_in_a_row, timeout=30)
        await asyncio.sleep(3)  # no worker: no evaluation, no incident
        assert await open_incidents(client, settings) == []
        async with worker.build_worker(settings, client, engine):
            found = await eventually(lambda: open_incidents(client, settings), timeout=30)
            after = await status(client, settings)
            assert found == [("error_rate", "global", "SEV2")]
            # The third breach came with the first evaluation or two after the restart: the
            # count went on from two (starting over would have taken three evaluations).
            assert after.evaluations - before.evaluations <= 2
            assert after.rule_states["error_rate|global"].firing
            await detector(client, settings).terminate()
    finally:
        server.should_exit = True
        await serving
        engine.dispose()


def worker_api(settings: Settings, client: Client, engine: Any) -> Any:
    from worker import api_server

    return api_server(settings, worker.build_api(settings, client, engine))
