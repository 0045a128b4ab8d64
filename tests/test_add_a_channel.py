"""README "Add a channel", run as written: its `activities/ntfy.py` is taken out of the README,
registered as the README says (a line in CHANNELS, its activity on the worker, a level that
lists it with `to`), and an incident opens, escalates and resolves through it on Temporal's
time-skipping server, against a local ntfy."""

from __future__ import annotations

import importlib.util
import re
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.channels import CHANNELS
from config.escalation import load_escalation
from domain.incident import (
    ActionRequest,
    IncidentInput,
    NotificationPlan,
    RunbookPlan,
    Severity,
    Trigger,
)
from tests.fakes.server import FakeServer
from workflows.incident import IncidentWorkflow

README = Path(__file__).parent.parent / "README.md"
MARKER = "<!-- add-a-channel: activities/ntfy.py"


def readme_block(after: str, language: str) -> str:
    text = README.read_text()
    start = text.index(after)
    found = re.search(rf"```{language}\n(.*?)```", text[start:], re.DOTALL)
    assert found is not None, f"no {language} block after {after!r}"
    return found.group(1)


@pytest.fixture
def ntfy_module(tmp_path: Path) -> Iterator[ModuleType]:
    path = tmp_path / "ntfy_from_readme.py"
    path.write_text(readme_block(MARKER, "python"))
    spec = importlib.util.spec_from_file_location("ntfy_from_readme", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


class FakeNtfy(FakeServer):
    def __init__(self) -> None:
        super().__init__([Route("/{topic}", self.publish, methods=["POST"])])

    async def publish(self, request: Request) -> Response:
        self.record(request, await request.body(), {})
        return Response('{"id":"x"}', media_type="application/json")


async def test_the_readmes_ntfy_channel_pushes_open_escalate_and_resolve(
    time_skipping_env: WorkflowEnvironment,
    ntfy_module: ModuleType,
    tmp_path: Path,
    task_queue: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(CHANNELS, "ntfy", ntfy_module.NTFY)
    # The README's level, under a SEV2 policy of two levels (the second to another topic).
    level = readme_block("(`NtfyActivities(httpx.AsyncClient(timeout=10)).push`)", "toml")
    second = level.replace('"L1"', '"L2"').replace("llm-oncall", "llm-platform")
    policy_file = tmp_path / "escalation.toml"
    levels = f"{level}\n{second}".replace("[[levels]]", "[[severities.SEV2.levels]]")
    policy_file.write_text(levels)
    plan = NotificationPlan(
        policies=dict(load_escalation(policy_file).policies), runbook=RunbookPlan(enabled=False)
    )
    client = time_skipping_env.client
    with FakeNtfy() as ntfy:
        ntfy_activities = ntfy_module.NtfyActivities(httpx.AsyncClient(timeout=10), ntfy.url)
        async with Worker(
            client,
            task_queue=task_queue,
            workflows=[IncidentWorkflow],
            activities=[ntfy_activities.push],
        ):
            incident_id = f"incident-error_rate-global-{uuid.uuid4().hex[:8]}"
            handle = await client.start_workflow(
                IncidentWorkflow.run,
                IncidentInput(
                    incident_id=incident_id,
                    trigger=Trigger.ERROR_RATE,
                    scope="global",
                    severity=Severity.SEV2,
                    opened_at=datetime.now(UTC),
                    notify=plan,
                ),
                id=incident_id,
                task_queue=task_queue,
            )
            await time_skipping_env.sleep(timedelta(minutes=6))  # past L1's 5 min to ack
            await handle.execute_update(IncidentWorkflow.resolve, ActionRequest("alice", "api"))
            await handle.result()
    pushes = [(r.path, r.headers["title"].rsplit(": ", 1)[1]) for r in ntfy.requests]
    assert pushes == [
        ("/llm-oncall", "opened"),
        ("/llm-platform", "escalated"),
        ("/llm-oncall", "resolved"),
        ("/llm-platform", "resolved"),
    ]
    assert {r.headers["priority"] for r in ntfy.requests} == {"high"}  # SEV2
    assert ntfy.requests[0].headers["title"].startswith("[SEV2] error_rate on global")
    assert b"not acknowledged within 5 min" in ntfy.requests[1].body
