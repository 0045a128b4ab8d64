"""One incident from start to finish with every part real: `python worker.py` as its own process
(killed mid-incident and started again), the API taking Slack clicks and PagerDuty webhooks, the
CLI, and the Slack, PagerDuty and Jira fakes counting every call. Local dev server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr
from temporalio.client import Client, WorkflowHandle
from temporalio.testing import WorkflowEnvironment

import worker
from activities.incidents import IncidentActivities, OpenIncidentRequest
from api.app import create_app
from api.deps import Services
from config import Settings
from config.escalation import load_escalation
from domain.incident import Breach, IncidentState, IncidentStatus, Severity, Trigger
from stores.llm_calls import CallRecord
from stores.writer import write_calls
from tests.conftest import SIGNING_SECRET
from tests.fakes import pagerduty
from tests.fakes.jira import FakeJira
from tests.fakes.pagerduty import FakePagerDuty
from tests.fakes.slack import FakeSlack, button_click
from tests.helpers import eventually
from workflows.incident import IncidentWorkflow

REPO = Path(__file__).resolve().parent.parent
PAGERLOOP = str(Path(sys.executable).parent / "pagerloop")
WEBHOOK_SECRET = "pd-webhook-secret"
RESPONDERS = ["U0ALICE00", "U0BOB0000"]
# L1 opens the ticket at once so that the worker can be killed with the Slack post and the
# Jira create both in flight; nobody acknowledges in time, so L2 follows after 20 s.
POLICY = """
[severities.SEV2]
repeat_interval_seconds = 600
[[severities.SEV2.levels]]
name = "L1"
description = "On-call"
ack_timeout_seconds = 20
resolve_timeout_seconds = 600
jira_project = "OPS"
[[severities.SEV2.levels]]
name = "L2"
description = "Platform"
ack_timeout_seconds = 600
resolve_timeout_seconds = 1200
"""


class WorkerProcess:
    """`python worker.py`, as a deployment runs it."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = env
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "worker.py"],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(30)


@pytest.fixture
def deployed(settings: Settings, dev_env: WorkflowEnvironment, tmp_path: Path) -> Settings:
    policy = tmp_path / "escalation.toml"
    policy.write_text(POLICY)
    return settings.model_copy(
        update={
            "temporal_address": dev_env.client.service_client.config.target_host,
            "escalation_policy_file": policy,
            "pagerduty_webhook_secret": SecretStr(WEBHOOK_SECRET),
            "slack_allowed_users": RESPONDERS,
            "detector_interval_seconds": 3600,
            "data_dir": tmp_path / ".pagerloop",
        }
    )


def environment(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAGERLOOP_")}
    for name, value in settings.model_dump().items():
        if value is None or name == "dev_mode":
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, list):
            value = ",".join(v.get_secret_value() if isinstance(v, SecretStr) else v for v in value)
        elif name == "operator_api_keys":
            value = ",".join(f"{k}:{v.get_secret_value()}" for k, v in value.items())
        elif isinstance(value, dict):
            value = ",".join(f"{k}={v}" for k, v in value.items())
        env[f"PAGERLOOP_{name.upper()}"] = str(value)
    return env


@pytest.fixture
def worker_process(deployed: Settings, tmp_path: Path) -> Iterator[WorkerProcess]:
    process = WorkerProcess(environment(deployed), tmp_path / "worker.log")
    process.start()
    yield process
    process.stop()


@pytest.fixture
async def api(deployed: Settings, dev_env: WorkflowEnvironment) -> AsyncIterator[httpx.AsyncClient]:
    engine = worker.open_store(deployed)
    services = Services(deployed, engine, dev_env.client, worker.make_slack_client(deployed))
    transport = httpx.ASGITransport(app=create_app(services))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client
    engine.dispose()


async def open_incident(settings: Settings, client: Client) -> WorkflowHandle:
    """What the detector does on a breach (after the failed calls it saw, which the chart in
    the Slack thread shows)."""
    plan = worker.notification_plan(settings, load_escalation(settings.escalation_policy_file))
    engine = worker.open_store(settings)
    now = datetime.now(UTC)
    write_calls(
        engine,
        [
            CallRecord(
                ts=now - timedelta(seconds=i * 3),
                model="gpt-4.1",
                status="error" if i % 5 < 2 else "success",
                latency_ms=800.0,
            )
            for i in range(50)
        ],
    )
    opener = IncidentActivities(client, settings.task_queue, plan, engine)
    breach = Breach(
        Trigger.ERROR_RATE,
        "global",
        Severity.SEV2,
        datetime.now(UTC),
        "error rate 40.0% > 5% (20/50 calls in 300s)",
        {"error_rate": 0.4, "calls": 50, "errors": 20},
    )
    [opened] = await opener.open_or_update(
        [
            OpenIncidentRequest(
                breach, proposed_id=f"incident-error_rate-global-{uuid.uuid4().hex[:8]}"
            )
        ]
    )
    engine.dispose()
    return client.get_workflow_handle_for(IncidentWorkflow.run, opened.incident_id)


def cli(settings: Settings, *args: str) -> str:
    done = subprocess.run(
        [PAGERLOOP, "incidents", *args],
        cwd=REPO,
        env=environment(settings) | {"COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_a_whole_incident_makes_exactly_the_expected_vendor_calls(
    deployed: Settings,
    dev_env: WorkflowEnvironment,
    worker_process: WorkerProcess,
    api: httpx.AsyncClient,
    fake_slack: FakeSlack,
    fake_pagerduty: FakePagerDuty,
    fake_jira: FakeJira,
) -> None:
    client = dev_env.client
    # Both calls do their work, then keep the worker waiting: it dies before it hears back.
    fake_slack.delay_next("chat.postMessage", 10)
    fake_jira.delay_next("create", 10)
    handle = await open_incident(deployed, client)
    incident_id = handle.id
    await eventually(lambda: len(fake_slack.messages) == 1 and len(fake_jira.issues) == 1)
    worker_process.kill()
    worker_process.start()

    # The retries (once the dead worker's attempts time out) find the message and the ticket
    # made before the crash instead of making new ones.
    async def ticket_and_message_known() -> bool:
        state: IncidentState = await handle.query(IncidentWorkflow.state)
        return state.jira_issue is not None and state.slack_message is not None

    await eventually(ticket_and_message_known, timeout=90)
    assert len(fake_slack.posts()) == 1
    assert fake_slack.calls("conversations.history")  # the retry looked before posting again
    assert len(fake_jira.received("/rest/api/2/issue")) == 1  # one create request, ever

    # Nobody acknowledged within L1's 20 s: L2 is told, in the thread and on the ticket.
    state = await eventually(lambda: _at_level(handle, "L2"), timeout=60)
    assert any("not acknowledged within 20 s at L1" in e.text for e in state.timeline)

    # Acknowledged in PagerDuty: applied once, never echoed back to PagerDuty.
    body, headers = pagerduty.webhook("incident.acknowledged", incident_id, WEBHOOK_SECRET)
    bad = {**headers, "X-PagerDuty-Signature": "v1=" + "0" * 64}
    assert (await api.post("/pagerduty/webhook", content=body, headers=bad)).status_code == 401
    applied = await api.post("/pagerduty/webhook", content=body, headers=headers)
    assert applied.json() == {"status": "applied", "incident": incident_id}
    again = await api.post("/pagerduty/webhook", content=body, headers=headers)
    assert again.json()["status"] == "ignored"
    assert "already acknowledged by Dana On-Call (PagerDuty)" in again.json()["reason"]
    state = await handle.query(IncidentWorkflow.state)
    assert (state.status, state.acknowledged_by) == (
        IncidentStatus.ACKNOWLEDGED,
        "Dana On-Call (PagerDuty)",
    )

    # The CLI adds a note, escalates (at the top level: tells L2 again) and shows the timeline.
    cli(deployed, "note", incident_id, "quota raised with OpenAI", "--user", "dana")
    assert "is at L2" in cli(deployed, "escalate", incident_id, "--reason", "need the DBA")
    shown = cli(deployed, "show", incident_id)
    assert "quota raised with OpenAI" in shown
    assert "acknowledged" in shown
    assert incident_id in cli(deployed, "list")

    # Slack: someone outside the allow-list is told privately and changes nothing.
    [message] = fake_slack.messages.values()
    outsider = button_click(message, "incident_resolve", "U0MALLORY", SIGNING_SECRET)
    refused = await api.post("/slack/interactions", content=outsider[0], headers=outsider[1])
    assert refused.status_code == 200
    await eventually(lambda: len(fake_slack.ephemeral) == 1)
    assert "not allowed" in fake_slack.ephemeral[0]["text"]
    assert (await handle.query(IncidentWorkflow.state)).status == IncidentStatus.ACKNOWLEDGED

    # A responder resolves; the same signed request replayed is refused.
    click = button_click(message, "incident_resolve", RESPONDERS[0], SIGNING_SECRET)
    assert (await api.post("/slack/interactions", content=click[0], headers=click[1])).is_success
    replayed = await api.post("/slack/interactions", content=click[0], headers=click[1])
    assert replayed.status_code == 401
    result = await handle.result()
    assert result.status == IncidentStatus.RESOLVED
    assert result.resolved_by == RESPONDERS[0]

    # Slack: one message, edited in place, the story in its thread.
    await eventually(lambda: "resolved by <@U0ALICE00>" in str(message.blocks))
    assert len(fake_slack.posts()) == 1
    # The chart of the error rate, once in the thread: the retry that found the message
    # uploaded it (the killed attempt never got that far).
    [chart] = fake_slack.uploaded(thread_ts=message.ts)
    assert chart.filename.endswith(".png")
    assert len(fake_slack.calls("files.getUploadURLExternal")) == 1
    assert len(message.edits) >= 3  # escalated, acknowledged, resolved
    told = "\n".join(message.replies)
    for kind in ("*escalated*", "*acknowledged*", "*note*", "*reminder*", "*resolved*"):
        assert kind in told
    # PagerDuty: one dedup key from trigger to resolve; the ack came from PagerDuty itself.
    await eventually(lambda: fake_pagerduty.alerts.get(incident_id) == "resolved")
    assert {e["dedup_key"] for e in fake_pagerduty.events()} == {incident_id}
    assert fake_pagerduty.events("acknowledge") == []
    assert len(fake_pagerduty.events("resolve")) == 1
    # Jira: one ticket, commented along the way, done, with the postmortem last.
    await eventually(lambda: next(iter(fake_jira.issues.values()))["status"] == "Done")
    [issue] = fake_jira.issues.values()
    assert f"pagerloop:{incident_id}" in issue["fields"]["labels"]
    comments = [c["body"] for c in issue["comments"]]
    assert any(c.startswith("acknowledged by Dana On-Call (PagerDuty)") for c in comments)
    assert any(c.startswith("note by dana via cli: quota raised") for c in comments)
    assert comments[-1].startswith("h3. Postmortem")
    assert "Time to acknowledge" in comments[-1]


async def _at_level(handle: WorkflowHandle, level: str) -> IncidentState | None:
    state: IncidentState = await handle.query(IncidentWorkflow.state)
    return state if state.level_name == level else None
