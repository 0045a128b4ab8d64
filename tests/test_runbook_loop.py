"""The whole loop on the local dev server, every part real: an instrumented OpenAI client hits
llmock's real rate limit -> 429s in the store -> the detector opens a rate-limit incident -> its
runbook throttles the feature and turns on backoff (controls the client obeys) -> the 429 rate
falls -> verification passes -> resolve reverts the controls."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
from llmock.pytest_plugin import LLMock
from sqlalchemy import Engine
from sqlmodel import Session, col, select
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment
from typer.testing import CliRunner

import worker
from cli.main import app as cli_app
from config import Settings
from domain.incident import ActionRequest, IncidentStatus
from stores.llm_calls import LLMCall
from tests.conftest import incident_ids
from tests.helpers import FeatureTraffic, eventually, running_service
from workflows.incident import IncidentWorkflow

RPM = 120  # llmock's quota: 2 requests a second
LATENCY = 0.5  # seconds per answer: 6 callers ask for 12 a second, 6 times the quota
WORKERS = 6


@pytest.fixture
def loop_settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "detector_window_seconds": 30,
            "runbook_verify_seconds": 30,
            "feature_priorities": {"search": "normal", "chat": "critical"},
        }
    )


@pytest.fixture
async def service(dev_env: WorkflowEnvironment, loop_settings: Settings) -> AsyncIterator[Client]:
    async with running_service(dev_env.client, loop_settings) as client:
        yield client


@pytest.fixture
def stores(loop_settings: Settings) -> Iterator[Engine]:
    engine = worker.open_store(loop_settings)
    yield engine
    engine.dispose()


def calls(engine: Engine, since_id: int = 0) -> list[LLMCall]:
    with Session(engine) as session:
        query = select(LLMCall).where(col(LLMCall.id) > since_id).order_by(col(LLMCall.id))
        return list(session.exec(query))


def share_429(rows: list[LLMCall]) -> float:
    return sum(row.status == "rate_limited" for row in rows) / max(len(rows), 1)


async def test_rate_limits_are_throttled_verified_and_reverted_on_resolve(
    service: Client, loop_settings: Settings, llmock: LLMock, stores: Engine
) -> None:
    client = service
    llmock.limits(rpm=RPM).delay(LATENCY, times=None)
    runner = CliRunner()
    env = {
        "PAGERLOOP_DATABASE_URL": loop_settings.database_url,
        "PAGERLOOP_TASK_QUEUE": loop_settings.task_queue,
    }
    with FeatureTraffic(llmock, stores, ["search"] * WORKERS, "find it"):
        [incident_id] = await eventually(
            lambda: incident_ids(client, loop_settings.task_queue), timeout=90
        )
        assert incident_id.startswith("incident-rate_limit_exhaustion-")
        handle = client.get_workflow_handle_for(IncidentWorkflow.run, incident_id)
        before = calls(stores)
        assert share_429(before) > 0.05

        async def mitigating() -> bool:
            state = await handle.query(IncidentWorkflow.state)
            return any(entry.kind == "mitigation" for entry in state.timeline)

        await eventually(mitigating, timeout=60)
        state = await handle.query(IncidentWorkflow.state)
        assert state.status == IncidentStatus.MITIGATING
        listed = runner.invoke(cli_app, ["controls", "list"], env=env)
        assert listed.exit_code == 0, listed.output
        assert "rpm" in listed.output
        assert "backoff" in listed.output
        assert incident_id in listed.output

        mark = before[-1].id or 0
        await asyncio.sleep(5)  # calls made under the controls
        changed = [row for row in calls(stores, since_id=mark) if row.controls]
        assert changed, "no call record names the control that changed it"
        assert any("rpm#" in (row.controls or "") for row in changed)

        async def verified() -> bool:
            state = await handle.query(IncidentWorkflow.state)
            return state.verification is not None

        await eventually(verified, timeout=150)
        state = await handle.query(IncidentWorkflow.state)
        assert state.verification == "recovered", [(e.kind, e.text) for e in state.timeline]
        assert any(entry.kind == "verified" for entry in state.timeline)
        under_controls = [row for row in calls(stores, since_id=mark) if row.controls]
        assert len(under_controls) >= 20
        assert share_429(under_controls) < share_429(before) / 2

        await handle.execute_update(IncidentWorkflow.resolve, ActionRequest("oncall", "cli"))
        result = await asyncio.wait_for(handle.result(), timeout=60)
        assert result.status == IncidentStatus.RESOLVED
        assert "controls_reverted" in [entry.kind for entry in result.timeline]

    listed = runner.invoke(cli_app, ["controls", "list"], env=env)
    assert listed.exit_code == 0, listed.output
    assert incident_id not in listed.output
