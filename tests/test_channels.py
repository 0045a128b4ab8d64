"""The channel registry end to end: the real IncidentWorkflow on the time-skipping server, its
worker wired from Settings as worker.py wires it, emailing a real SMTP server in-process
(aiosmtpd) and posting Alertmanager payloads to the fake webhook receiver; and a policy naming
a channel nobody wrote, refused before any worker starts."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import WorkflowHandle
from temporalio.testing import WorkflowEnvironment

import worker
from activities import email
from activities.webhook import ZERO_TIME, rfc3339
from config.escalation import load_escalation
from config.settings import ConfigurationError, Settings, load_settings
from domain.incident import (
    ActionRequest,
    Breach,
    IncidentInput,
    IncidentResult,
    IncidentState,
    Severity,
    Trigger,
)
from tests.conftest import incident_worker
from tests.fakes.webhook import FakeWebhookReceiver, signature_matches
from tests.helpers import close_incidents, eventually
from tests.test_email import Mailbox, Received, serve
from workflows.incident import IncidentWorkflow

SENDER = "pagerloop@example.com"
ONCALL = "oncall@example.com"
SECRET = "webhook-signing-secret"


@pytest.fixture
def mailbox() -> Mailbox:
    return Mailbox()


@pytest.fixture
def smtp_port(mailbox: Mailbox) -> Iterator[int]:
    """A relay taking mail without TLS or AUTH."""
    yield from serve(mailbox)


@pytest.fixture
def receiver() -> Iterator[FakeWebhookReceiver]:
    with FakeWebhookReceiver(secret=SECRET) as server:
        yield server


@pytest.fixture
def channel_settings(
    settings: Settings,
    smtp_port: int,
    receiver: FakeWebhookReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> Settings:
    """The shared settings (Slack, PagerDuty and Jira on their fakes) with email and the
    webhook read from the environment as a deployment sets them; no runbooks."""
    env = {
        "SMTP_HOST": "127.0.0.1",
        "SMTP_PORT": str(smtp_port),
        "SMTP_STARTTLS": "false",  # the plain test server offers no STARTTLS
        "EMAIL_FROM": SENDER,
        "EMAIL_TO": ONCALL,
        "WEBHOOK_URLS": receiver.alerts_url,
        "WEBHOOK_SECRET": SECRET,
        "RUNBOOKS_ENABLED": "false",
    }
    for name, value in env.items():
        monkeypatch.setenv(f"PAGERLOOP_{name}", value)
    parsed = load_settings(_env_file=None)
    return settings.model_copy(update={name.lower(): getattr(parsed, name.lower()) for name in env})


class Incidents:
    def __init__(self, env: WorkflowEnvironment, settings: Settings) -> None:
        self.env = env
        self.settings = settings
        self.plan = worker.notification_plan(
            settings, load_escalation(settings.escalation_policy_file)
        )
        self.handles: list[WorkflowHandle[Any, IncidentResult]] = []

    async def open(
        self, severity: Severity, trigger: Trigger = Trigger.COST_SPIKE
    ) -> WorkflowHandle[Any, IncidentResult]:
        incident_id = f"incident-{trigger}-global-{uuid.uuid4().hex[:8]}"
        opened = datetime.now(UTC)
        handle = await self.env.client.start_workflow(
            IncidentWorkflow.run,
            IncidentInput(
                incident_id=incident_id,
                trigger=trigger,
                scope="global",
                severity=severity,
                opened_at=opened,
                notify=self.plan,
            ),
            id=incident_id,
            task_queue=self.settings.task_queue,
        )
        self.handles.append(handle)
        summary = f"{trigger} over its threshold"
        await handle.execute_update(
            IncidentWorkflow.report_breach, Breach(trigger, "global", severity, opened, summary)
        )
        return handle

    async def resolve(self, handle: WorkflowHandle[Any, IncidentResult]) -> IncidentResult:
        """Resolve and wait for the run to end: every lane has drained by then, so what the
        mailbox and the receiver hold is final."""
        await handle.execute_update(IncidentWorkflow.resolve, ActionRequest("alice", "cli", "ok"))
        return await handle.result()


@pytest.fixture
async def incidents(
    time_skipping_env: WorkflowEnvironment, channel_settings: Settings
) -> AsyncIterator[Incidents]:
    async with incident_worker(time_skipping_env.client, channel_settings):
        opened = Incidents(time_skipping_env, channel_settings)
        yield opened
        await close_incidents(opened.handles)


def emails(mailbox: Mailbox, event: str) -> list[Received]:
    return [m for m in list(mailbox.received) if m.header("X-Pagerloop-Event") == event]


def alerts(receiver: FakeWebhookReceiver, status: str) -> list[dict[str, Any]]:
    return [d.payload for d in receiver.deliveries() if d.payload["status"] == status]


def notified(state: IncidentState | IncidentResult, channel: str) -> list[str]:
    return [e.text for e in state.timeline if e.kind == "notified" and e.channel == channel]


def failed(state: IncidentState | IncidentResult) -> list[str]:
    return [e.text for e in state.timeline if e.kind == "notification_failed"]


async def test_a_sev4_incident_emails_and_fires_then_resolves_in_one_thread(
    incidents: Incidents, mailbox: Mailbox, receiver: FakeWebhookReceiver
) -> None:
    handle = await incidents.open(Severity.SEV4)
    incident_id = handle.id
    [opened] = await eventually(lambda: emails(mailbox, "opened"))
    assert (opened.mail_from, opened.rcpt_tos, opened.header("To")) == (SENDER, [ONCALL], ONCALL)
    subject = opened.header("Subject") or ""
    assert "[SEV4]" in subject
    assert not subject.startswith("Re:")
    assert opened.header("Message-ID") == email.root_message_id(incident_id)
    assert opened.header("In-Reply-To") is None
    assert incident_id in opened.text()
    assert incident_id in opened.html()

    [firing] = await eventually(lambda: alerts(receiver, "firing"))
    [alert] = firing["alerts"]
    assert (firing["version"], alert["status"], alert["fingerprint"]) == (
        "4",
        "firing",
        incident_id,
    )
    assert alert["labels"]["incident_severity"] == "SEV4"
    assert alert["labels"]["severity"] == "info"
    assert (alert["labels"]["level"], alert["labels"]["trigger"]) == ("L1", "cost_spike")
    assert alert["endsAt"] == ZERO_TIME

    result = await incidents.resolve(handle)

    # Exactly one message per event, the resolve threaded under the opening message.
    assert [m.header("X-Pagerloop-Event") for m in mailbox.received] == ["opened", "resolved"]
    [resolved] = emails(mailbox, "resolved")
    assert resolved.header("In-Reply-To") == opened.header("Message-ID")
    assert resolved.header("References") == opened.header("Message-ID")
    assert (resolved.header("Subject") or "").startswith("Re: ")
    assert resolved.rcpt_tos == [ONCALL]
    assert resolved.text()
    assert resolved.html()

    # One firing, one resolved, both signed with the secret over the exact body.
    deliveries = receiver.deliveries()
    assert [d.payload["status"] for d in deliveries] == ["firing", "resolved"]
    for delivery in deliveries:
        assert signature_matches(SECRET, delivery.body, delivery.headers)
    [ended] = deliveries[1].payload["alerts"]
    assert ended["fingerprint"] == incident_id
    assert result.resolved_at is not None
    assert ended["endsAt"] == rfc3339(result.resolved_at) != ZERO_TIME
    assert ended["startsAt"] == alert["startsAt"]
    assert deliveries[1].payload["groupKey"] == firing["groupKey"]

    [target] = incidents.plan.webhook_receivers
    assert notified(result, "email") == [
        f"email (opened) to {ONCALL}",
        f"email (resolved) to {ONCALL}",
    ]
    assert notified(result, "webhook") == [
        f"opened alert to {target}",
        f"resolved alert to {target}",
    ]
    assert failed(result) == []


async def test_a_sev2_incident_posts_firing_per_level_and_sends_no_email(
    incidents: Incidents, mailbox: Mailbox, receiver: FakeWebhookReceiver
) -> None:
    handle = await incidents.open(Severity.SEV2, Trigger.ERROR_RATE)
    [l1] = await eventually(lambda: alerts(receiver, "firing"))
    assert l1["commonLabels"]["level"] == "L1"
    assert l1["commonLabels"]["incident_severity"] == "SEV2"
    assert l1["commonLabels"]["severity"] == "error"

    await incidents.env.sleep(timedelta(minutes=11))  # L1 had 10 min to acknowledge
    state: IncidentState = await handle.query(IncidentWorkflow.state)
    assert state.level_name == "L2"
    await eventually(lambda: len(alerts(receiver, "firing")) == 2)
    first, l2 = alerts(receiver, "firing")
    assert first == l1
    assert l2["commonLabels"]["level"] == "L2"
    assert l2["commonAnnotations"]["event"] == "escalated"
    assert l2["alerts"][0]["fingerprint"] == handle.id
    assert l2["groupKey"] == l1["groupKey"]

    result = await incidents.resolve(handle)
    assert len(alerts(receiver, "resolved")) == 1
    assert len(alerts(receiver, "firing")) == 2
    assert mailbox.received == []  # SEV2 lists no email at any level it reached
    assert notified(result, "email") == []
    assert not [text for text in failed(result) if text.startswith("email")]


async def test_a_failing_receiver_gets_one_firing_after_retries_and_email_goes_on(
    incidents: Incidents, mailbox: Mailbox, receiver: FakeWebhookReceiver
) -> None:
    # Each refusal asks for 2 minutes: in real time the webhook stays failing for the test.
    receiver.fail_next(503, retry_after=120, times=2)
    handle = await incidents.open(Severity.SEV4)
    await eventually(lambda: emails(mailbox, "opened") and receiver.received("/alerts"))
    assert receiver.deliveries() == []  # the email did not wait for the receiver

    async def delivered_after_a_minute_more() -> bool:
        await incidents.env.sleep(timedelta(minutes=1))  # skipped: past each Retry-After
        return bool(receiver.deliveries())

    await eventually(delivered_after_a_minute_more, timeout=30)
    [delivery] = receiver.deliveries()
    assert delivery.payload["status"] == "firing"
    assert delivery.payload["alerts"][0]["fingerprint"] == handle.id
    tries = receiver.received("/alerts")
    assert len(tries) == 3
    assert {t.body for t in tries} == {delivery.body}
    assert len({t.headers["x-pagerloop-delivery"] for t in tries}) == 1

    result = await incidents.resolve(handle)
    assert [d.payload["status"] for d in receiver.deliveries()] == ["firing", "resolved"]
    assert len(emails(mailbox, "opened")) == 1
    assert [t for t in failed(result) if t.startswith("webhook")] == []


def test_a_policy_naming_an_unknown_channel_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "escalation.toml"
    path.write_text(
        '[[levels]]\nname = "L1"\nack_timeout_seconds = 300\nresolve_timeout_seconds = 1800\n'
        'channels = ["slack", "teams", "webhook"]\n'
    )
    escalation = load_escalation(path)
    with pytest.raises(ConfigurationError, match=r"unknown channel\(s\) teams \(known: ") as error:
        worker.check_channels(escalation)
    assert re.search(r"escalation policy SEV\d/L1: ", str(error.value))
    worker.check_channels(load_escalation(None))  # the built-in policies name known ones
