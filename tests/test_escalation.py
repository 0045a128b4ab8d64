"""Escalation L1 -> L3 on the time-skipping server, with the real Slack, PagerDuty and Jira
clients talking to the fakes: deadlines, reminders, snoozes, and the vendor calls each makes."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import SecretStr
from temporalio.client import Client, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.testing import WorkflowEnvironment

import worker
from config.escalation import PolicyFileError, load_escalation
from config.settings import Settings
from domain.escalation import DEFAULT_POLICIES, ChannelTarget, EscalationLevel, span
from domain.incident import (
    ActionRequest,
    Breach,
    IncidentInput,
    IncidentState,
    IncidentStatus,
    NotificationPlan,
    Severity,
    SnoozeRequest,
    Trigger,
)
from tests.conftest import incident_worker
from tests.fakes.jira import FakeJira
from tests.fakes.pagerduty import FakePagerDuty
from tests.fakes.slack import FakeSlack
from tests.helpers import close_incidents, eventually
from workflows.incident import IncidentWorkflow

DEFAULT_KEY = "R" * 32  # PAGERLOOP_PAGERDUTY_ROUTING_KEY in the settings fixture
L2_KEY = "K" * 32
POLICY_FILE = f"""
repeat_interval_seconds = 600
[[levels]]
name = "L1"
description = "On-call"
ack_timeout_seconds = 300
resolve_timeout_seconds = 1800
[[levels]]
name = "L2"
description = "Platform"
ack_timeout_seconds = 600
resolve_timeout_seconds = 3600
pagerduty_routing_key = "{L2_KEY}"
jira_project = "OPS"
[[levels]]
name = "L3"
description = "Leadership"
ack_timeout_seconds = 900
resolve_timeout_seconds = 7200
jira_project = "OPS"
"""


class Incidents:
    def __init__(self, env: WorkflowEnvironment, task_queue: str, plan: NotificationPlan) -> None:
        self.env = env
        self.client: Client = env.client
        self.task_queue = task_queue
        self.plan = plan
        self.handles: list[WorkflowHandle] = []

    async def open(self) -> WorkflowHandle:
        incident_id = f"incident-error_rate-global-{uuid.uuid4().hex[:8]}"
        opened = datetime.now(UTC)
        handle = await self.client.start_workflow(
            IncidentWorkflow.run,
            IncidentInput(
                incident_id=incident_id,
                trigger=Trigger.ERROR_RATE,
                scope="global",
                severity=Severity.SEV2,
                opened_at=opened,
                notify=self.plan,
            ),
            id=incident_id,
            task_queue=self.task_queue,
        )
        breach = Breach(Trigger.ERROR_RATE, "global", Severity.SEV2, opened, "error rate 9.0%")
        await handle.execute_update(IncidentWorkflow.report_breach, breach)
        self.handles.append(handle)
        return handle

    async def after(self, handle: WorkflowHandle, minutes: float) -> IncidentState:
        await self.env.sleep(timedelta(minutes=minutes))
        state: IncidentState = await handle.query(IncidentWorkflow.state)
        return state


@pytest.fixture
async def incidents(
    time_skipping_env: WorkflowEnvironment, settings: Settings, tmp_path: Path
) -> AsyncIterator[Incidents]:
    policy_file = tmp_path / "escalation.toml"
    policy_file.write_text(POLICY_FILE)
    settings = settings.model_copy(update={"escalation_policy_file": policy_file})
    client = time_skipping_env.client
    plan = worker.notification_plan(settings, load_escalation(policy_file))
    async with incident_worker(client, settings):
        opened = Incidents(time_skipping_env, settings.task_queue, plan)
        yield opened
        await close_incidents(opened.handles)


def kinds(state: IncidentState) -> list[str]:
    return [entry.kind for entry in state.timeline]


async def test_acknowledged_in_time_stays_at_l1(
    incidents: Incidents, fake_pagerduty: FakePagerDuty, fake_jira: FakeJira
) -> None:
    handle = await incidents.open()
    await incidents.after(handle, 3)
    await handle.execute_update(IncidentWorkflow.acknowledge, ActionRequest("U1", "slack"))
    state = await incidents.after(handle, 20)
    assert (state.level_name, state.status) == ("L1", IncidentStatus.ACKNOWLEDGED)
    assert state.ack_by is None
    assert "escalated" not in kinds(state)
    assert len(fake_pagerduty.events("trigger")) == 1
    assert fake_jira.issues == {}


async def test_acknowledged_late_escalates_once(
    incidents: Incidents, fake_pagerduty: FakePagerDuty, fake_jira: FakeJira, fake_slack: FakeSlack
) -> None:
    handle = await incidents.open()
    state = await incidents.after(handle, 6)
    assert state.level_name == "L2"
    assert "not acknowledged within 5 min at L1" in state.timeline[-1].text or any(
        "not acknowledged within 5 min at L1" in e.text for e in state.timeline
    )
    # L2 pages its own service and opens the ticket.
    await eventually(lambda: len(fake_pagerduty.events("trigger")) == 2)
    l1, l2 = fake_pagerduty.events("trigger")
    assert (l1["routing_key"], l1["dedup_key"]) == (DEFAULT_KEY, state.incident_id)
    assert (l2["routing_key"], l2["dedup_key"]) == (L2_KEY, f"{state.incident_id}/L2")
    await eventually(lambda: len(fake_jira.issues) == 1)

    await handle.execute_update(IncidentWorkflow.acknowledge, ActionRequest("U2", "slack"))
    state = await incidents.after(handle, 12)
    assert state.level_name == "L2"  # acknowledged: no further escalation for that
    await eventually(lambda: len(fake_pagerduty.events("acknowledge")) == 2)
    assert {e["dedup_key"] for e in fake_pagerduty.events("acknowledge")} == {
        state.incident_id,
        f"{state.incident_id}/L2",
    }
    await handle.execute_update(IncidentWorkflow.resolve, ActionRequest("U2", "slack", "fixed"))
    await handle.result()
    [issue] = fake_jira.issues.values()
    assert issue["status"] == "Done"
    assert issue["comments"][-1]["body"].startswith("h3. Postmortem")
    assert f"pagerloop:{state.incident_id}" in issue["fields"]["labels"]
    [message] = fake_slack.messages.values()
    assert any("escalated" in reply for reply in message.replies)
    assert len(fake_slack.posts()) == 1


async def test_never_acknowledged_climbs_to_l3_then_reminds(
    incidents: Incidents, fake_pagerduty: FakePagerDuty, fake_slack: FakeSlack
) -> None:
    handle = await incidents.open()
    assert (await incidents.after(handle, 6)).level_name == "L2"
    assert (await incidents.after(handle, 11)).level_name == "L3"
    state = await incidents.after(handle, 16)
    assert state.level_name == "L3"
    assert kinds(state).count("reminder") == 1
    state = await incidents.after(handle, 10)
    assert kinds(state).count("reminder") == 2
    assert kinds(state).count("escalated") == 2
    assert state.remind_at is not None
    # L1 and L3 page the default service (one PagerDuty incident, re-triggered), L2 its own.
    await eventually(lambda: len(fake_pagerduty.events("trigger")) >= 5)
    dedup_keys = {e["dedup_key"] for e in fake_pagerduty.events("trigger")}
    assert dedup_keys == {state.incident_id, f"{state.incident_id}/L2"}

    await handle.execute_update(IncidentWorkflow.acknowledge, ActionRequest("U3", "slack"))
    state = await incidents.after(handle, 30)
    assert kinds(state).count("reminder") == 2  # acknowledged: the reminders stop
    assert state.resolve_by is None  # the top level's resolve deadline had passed already


async def test_resolved_before_any_deadline(
    incidents: Incidents, fake_pagerduty: FakePagerDuty
) -> None:
    handle = await incidents.open()
    await incidents.after(handle, 2)
    await eventually(lambda: len(fake_pagerduty.events("trigger")) == 1)
    await handle.execute_update(IncidentWorkflow.resolve, ActionRequest("alice", "cli"))
    result = await handle.result()
    assert result.status == IncidentStatus.RESOLVED
    assert "escalated" not in [e.kind for e in result.timeline]
    await eventually(lambda: len(fake_pagerduty.events("resolve")) == 1)


async def test_a_snooze_moves_the_deadline(incidents: Incidents) -> None:
    handle = await incidents.open()
    await incidents.after(handle, 4)
    state = await handle.execute_update(
        IncidentWorkflow.snooze, SnoozeRequest("U1", minutes=30, channel="slack")
    )
    assert state.ack_by is not None
    assert (await incidents.after(handle, 20)).level_name == "L1"  # would be L2 at minute 5
    state = await incidents.after(handle, 15)
    assert state.level_name == "L2"  # the snoozed deadline (minute 34) passed
    assert "snoozed" in kinds(state)


async def test_not_resolved_in_time_escalates_too(incidents: Incidents) -> None:
    handle = await incidents.open()
    await handle.execute_update(IncidentWorkflow.acknowledge, ActionRequest("U1", "slack"))
    assert (await incidents.after(handle, 25)).level_name == "L1"
    state = await incidents.after(handle, 10)
    assert state.level_name == "L2"
    assert any("not resolved within 30 min at L1" in e.text for e in state.timeline)


async def test_manual_escalation_and_notes(incidents: Incidents, fake_slack: FakeSlack) -> None:
    handle = await incidents.open()
    await eventually(lambda: len(fake_slack.messages) == 1)
    state = await handle.execute_update(
        IncidentWorkflow.escalate, ActionRequest("U1", "slack", "needs the platform team")
    )
    assert state.level_name == "L2"
    await handle.execute_update(
        IncidentWorkflow.add_note, ActionRequest("U1", "cli", "quota raised with OpenAI")
    )
    [message] = fake_slack.messages.values()
    await eventually(lambda: any("quota raised" in reply for reply in message.replies))
    assert len(fake_slack.posts()) == 1  # the escalation came while the post was in flight
    with pytest.raises(WorkflowUpdateFailedError) as refused:
        await handle.execute_update(IncidentWorkflow.add_note, ActionRequest("U1", "cli", " "))
    assert "a note needs some text" in str(refused.value.cause)


def test_timeouts_read_as_people_say_them() -> None:
    assert [span(s) for s in (20, 60, 90, 300, 3600, 5400)] == [
        "20 s",
        "1 min",
        "1 min 30 s",
        "5 min",
        "1 h",
        "90 min",
    ]


# The policy file, read without Temporal. Channels known today (the worker checks the names
# against its registry; the file loader cannot import it).
KNOWN_CHANNELS = {"slack", "pagerduty", "jira", "email", "webhook"}
HOOK_TOKEN = "T0KEN-in-the-path"
HOOK_1 = f"https://hooks.example.com/services/{HOOK_TOKEN}"
HOOK_2 = "http://127.0.0.1:9093/alerts?token=second-secret"
LEVEL = 'name = "{name}"\nack_timeout_seconds = 300\nresolve_timeout_seconds = 1800\n'


def policy_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "escalation.toml"
    path.write_text(text)
    return path


def told(level: EscalationLevel) -> dict[str, tuple[str, ...]]:
    assert (level.slack, level.slack_channel, level.page, level.jira, level.jira_project) == (
        (None,) * 5
    ), "levels are built with channels only"
    return {target.channel: target.to for target in level.channels}


def test_policy_file_before_channels_tells_the_same_channels(tmp_path: Path) -> None:
    escalation = load_escalation(policy_file(tmp_path, POLICY_FILE))
    for severity in ("SEV1", "SEV2", "SEV3", "SEV4"):
        l1, l2, l3 = escalation.policies[severity].levels
        # L2 has a routing key (so it pages), L2 and L3 a Jira project (so they open tickets).
        assert told(l2) == {"slack": (), "pagerduty": (), "jira": ("OPS",), "webhook": ()}
        # L1 pages by severity (SEV1/2 at once), L3 pages at every severity (SEV4 from L3).
        paged = {"pagerduty": ()} if severity in ("SEV1", "SEV2") else {}
        assert told(l1) == {"slack": ()} | paged | {"webhook": ()}
        assert told(l3) == {"slack": (), "pagerduty": (), "jira": ("OPS",), "webhook": ()}
    assert {k: v.get_secret_value() for k, v in escalation.routing_keys.items()} == {
        f"{severity}/L2": L2_KEY for severity in ("SEV1", "SEV2", "SEV3", "SEV4")
    }
    assert escalation.webhook_targets == {}


def test_policy_file_before_channels_pages_by_severity_and_as_told(tmp_path: Path) -> None:
    l1, l2, l3 = (LEVEL.format(name=f"L{n}") for n in (1, 2, 3))
    text = (
        f"[[severities.SEV3.levels]]\n{l1}[[severities.SEV3.levels]]\n{l2}"
        f"[[severities.SEV4.levels]]\n{l1}slack = false\njira = true\n"
        f'email_to = ["oncall@example.com"]\n'
        f'[[severities.SEV4.levels]]\n{l2}slack_channel = "#sev4"\n'
        f"[[severities.SEV4.levels]]\n{l3}"
        f'[[severities.SEV1.levels]]\n{l1}page = false\npagerduty_routing_key = "{L2_KEY}"\n'
        f'slack = false\nslack_channel = "#ignored"\n'
    )
    policies = load_escalation(policy_file(tmp_path, text)).policies
    sev3, sev4, sev1 = policies["SEV3"].levels, policies["SEV4"].levels, policies["SEV1"].levels
    # SEV3 starts in Slack and pages from L2, as before.
    assert [list(told(level)) for level in sev3] == [
        ["slack", "webhook"],
        ["slack", "pagerduty", "webhook"],
    ]
    # SEV4 pages at L3 only; `jira = true` without a project: the default project.
    assert [told(level) for level in sev4] == [
        {"jira": (), "email": ("oncall@example.com",), "webhook": ()},
        {"slack": ("#sev4",), "webhook": ()},
        {"slack": (), "pagerduty": (), "webhook": ()},
    ]
    # An explicit `page = false` wins over the severity and the routing key.
    assert told(sev1[0]) == {"webhook": ()}
    # What the level said before channels, read by the domain as recorded inputs are read.
    before = EscalationLevel("L2", slack=True, slack_channel="#sev4", page=False, jira=False)
    assert (*before.channels, ChannelTarget("webhook")) == sev4[1].channels


def test_policy_file_channels_with_their_options(tmp_path: Path) -> None:
    text = (
        f"[[levels]]\n{LEVEL.format(name='L1')}"
        'channels = ["slack", "pagerduty", "email", "webhook"]\n'
        f'slack_channel = "#llm-oncall"\npagerduty_routing_key = "{L2_KEY}"\n'
        'email_to = ["oncall@example.com", "Team Lead <lead@example.com>"]\n'
        f'webhook_urls = ["{HOOK_1}", "{HOOK_2}"]\n'
        f"[[levels]]\n{LEVEL.format(name='L2')}"
        'channels = ["pagerduty"]\n'
        f"[[severities.SEV4.levels]]\n{LEVEL.format(name='L1')}"
        'channels = ["email", "jira"]\njira_project = "PLAT"\n'
    )
    escalation = load_escalation(policy_file(tmp_path, text))
    l1, l2 = escalation.policies["SEV2"].levels
    assert l1.channels == (
        ChannelTarget("slack", ("#llm-oncall",)),
        ChannelTarget("pagerduty"),
        ChannelTarget("email", ("oncall@example.com", "Team Lead <lead@example.com>")),
        ChannelTarget("webhook", ("SEV2/L1#1", "SEV2/L1#2")),
    )
    # Only what is listed: no Slack, no webhook, even at a severity that used to page anyway.
    assert told(l2) == {"pagerduty": ()}
    [sev4] = escalation.policies["SEV4"].levels
    assert list(told(sev4).items()) == [("email", ()), ("jira", ("PLAT",))]  # the file's order
    assert escalation.routing_key("SEV1", "L1", None) == SecretStr(L2_KEY)
    assert escalation.routing_key("SEV2", "L2", None) is None
    assert escalation.routing_key("SEV4", "L1", None) is None


def test_policy_file_names_each_levels_webhook_receivers(tmp_path: Path) -> None:
    text = (
        f"[[levels]]\n{LEVEL.format(name='L1')}"
        f'webhook_urls = ["{HOOK_1}", "{HOOK_2}"]\n'
        f"[[levels]]\n{LEVEL.format(name='L2')}"
        f"[[severities.SEV1.levels]]\n{LEVEL.format(name='P1')}"
        f'channels = ["webhook"]\nwebhook_urls = ["{HOOK_2}"]\n'
    )
    escalation = load_escalation(policy_file(tmp_path, text))
    targets = {name: url.get_secret_value() for name, url in escalation.webhook_targets.items()}
    assert targets == {"SEV1/P1#1": HOOK_2} | {
        f"{severity}/L1#{position}": url
        for severity in ("SEV2", "SEV3", "SEV4")
        for position, url in ((1, HOOK_1), (2, HOOK_2))
    }
    assert told(escalation.policies["SEV3"].levels[0])["webhook"] == ("SEV3/L1#1", "SEV3/L1#2")
    assert told(escalation.policies["SEV3"].levels[1])["webhook"] == ()  # the settings' URLs
    assert told(escalation.policies["SEV1"].levels[0]) == {"webhook": ("SEV1/P1#1",)}


def test_policy_file_secrets_stay_out_of_reprs_and_policies(tmp_path: Path) -> None:
    text = (
        f"[[levels]]\n{LEVEL.format(name='L1')}"
        f'channels = ["pagerduty", "webhook"]\npagerduty_routing_key = "{L2_KEY}"\n'
        f'webhook_urls = ["{HOOK_1}", "{HOOK_2}"]\n'
    )
    escalation = load_escalation(policy_file(tmp_path, text))
    shown = repr(escalation) + str(escalation) + repr(escalation.policies)
    for secret in (L2_KEY, HOOK_TOKEN, "second-secret", "hooks.example.com", "127.0.0.1"):
        assert secret not in shown
    assert len(escalation.webhook_targets) == 8  # both URLs, for each of the four severities


@pytest.mark.parametrize(
    ("level", "problem"),
    [
        ('channels = ["slack"]\njira_project = "OPS"', "jira_project is given but 'jira' is not"),
        ('channels = ["slack"]\nemail_to = ["a@example.com"]', "email_to is given but 'email'"),
        (f'channels = ["slack"]\nwebhook_urls = ["{HOOK_1}"]', "webhook_urls is given but"),
        ('channels = ["jira"]\nslack_channel = "#x"', "slack_channel is given but 'slack'"),
        (
            f'channels = ["slack"]\npagerduty_routing_key = "{L2_KEY}"',
            "pagerduty_routing_key is given but 'pagerduty' is not in channels",
        ),
        (
            'channels = ["slack"]\npage = true',
            "page cannot be combined with channels: use channels",
        ),
        ('channels = ["slack"]\nslack = true', "slack cannot be combined with channels"),
        ('channels = ["jira"]\njira = false\npage = false', "page and jira cannot be combined"),
        ('channels = ["slack", "email", "slack"]', "channel 'slack' is listed twice"),
        ('channels = ["slack", " "]', "channel 2 has no name"),
        ("channels = []", "channels: List should have at least 1 item"),
        ('email_to = ["oncall@example.com", "oncall"]', "address 2 ('oncall') is not an email"),
        ('email_to = ["on call@example.com"]', "is not an email address"),
        ('email_to = ["a@example.com", "A <a@example.com>"]', "address 2 ("),
        ("email_to = []", "email_to: List should have at least 1 item"),
        (f'webhook_urls = ["{HOOK_2}", "ftp://x.example.com/{HOOK_TOKEN}"]', "URL 2 is not an"),
        (f'webhook_urls = ["https:///{HOOK_TOKEN}"]', "URL 1 is not an http(s) URL with a host"),
        (f'webhook_urls = ["{HOOK_1}", "{HOOK_1}"]', "URL 2 repeats URL 1"),
        ('channels = ["email"]\nemail_to = "a@example.com"', "email_to: Input should be a valid"),
        ('to = { ntfy = ["topic"] }', "to names channels: list them in channels"),
        ('channels = ["slack"]\nto = { ntfy = ["topic"] }', "to.ntfy is given but 'ntfy' is not"),
        ('channels = ["slack"]\nto = { slack = ["#x"] }', "to.slack: use slack_channel"),
    ],
)
def test_policy_file_refuses(tmp_path: Path, level: str, problem: str) -> None:
    path = policy_file(tmp_path, f"[[severities.SEV3.levels]]\n{LEVEL.format(name='L1')}{level}\n")
    with pytest.raises(PolicyFileError) as refused:
        load_escalation(path)
    message = str(refused.value)
    assert message.startswith(f"PAGERLOOP_ESCALATION_POLICY_FILE {path}: severities.SEV3.levels.0")
    assert problem in message
    assert HOOK_TOKEN not in message
    assert L2_KEY not in message


def test_policy_file_absent_keeps_the_built_in_policies() -> None:
    escalation = load_escalation(None)
    assert escalation.policies == DEFAULT_POLICIES
    assert (escalation.routing_keys, escalation.webhook_targets) == ({}, {})


def test_default_policies_list_known_channels_each_once() -> None:
    for severity, policy in DEFAULT_POLICIES.items():
        for level in policy.levels:
            names = [target.channel for target in level.channels]
            assert set(names) <= KNOWN_CHANNELS, (severity, level.name, names)
            assert len(names) == len(set(names)), (severity, level.name, names)
            assert "webhook" in names, (severity, level.name)  # every level posts to receivers
    assert "email" in [t.channel for t in DEFAULT_POLICIES["SEV4"].levels[0].channels]


def test_policy_file_gives_any_channel_its_addresses(tmp_path: Path) -> None:
    """A channel without a named option of its own (one added later) gets its addresses from
    the level's `to` table."""
    level = LEVEL.format(name="L1") + 'channels = ["slack", "ntfy"]\nto = { ntfy = ["oncall"] }\n'
    escalation = load_escalation(policy_file(tmp_path, f"[[levels]]\n{level}"))
    assert escalation.policies["SEV1"].levels[0].channels == (
        ChannelTarget("slack"),
        ChannelTarget("ntfy", ("oncall",)),
    )
