"""Issue #10, item 2: poison never reaches a page. Infinite and NaN metrics leave for Slack,
PagerDuty and Jira as finite, strict JSON; a vendor call that no retry can fix fails at once,
lands on the timeline, and the incident carries on through the other channels. The real
clients talk to the fakes, which parse JSON as strictly as the vendors do."""

from __future__ import annotations

import json
import math
import time as clock
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from enum import Enum
from fractions import Fraction
from typing import Any

import httpx
import pdpyras
import pytest
from jira import JIRAError
from pydantic import SecretStr
from temporalio.client import WorkflowHandle
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment

from activities import jira, pagerduty, slack
from activities.finite import MAX_TEXT, human_number, json_safe
from activities.incidents import IncidentActivities, OpenIncidentRequest
from activities.jira import JiraActivities, JiraPermanentError, JiraTicket
from activities.pagerduty import PagerDutyActivities, PagerDutyPermanentError, PageRequest
from activities.policies import VENDOR_CALL
from activities.slack import SlackPermanentError
from config.settings import Settings
from domain.escalation import ChannelTarget, EscalationLevel, EscalationPolicy
from domain.incident import (
    ActionRequest,
    Breach,
    IncidentState,
    IncidentStatus,
    NotificationPlan,
    RunbookPlan,
    Severity,
    Trigger,
)
from tests.conftest import incident_worker
from tests.fakes.jira import FakeJira
from tests.fakes.pagerduty import FakePagerDuty
from tests.fakes.slack import FakeSlack
from tests.helpers import close_incidents, eventually
from workflows.incident import IncidentWorkflow

INF, NAN = math.inf, math.nan
POISON = {"cost_usd": INF, "budget_used_ratio": NAN, "headroom_usd": -INF, "calls": 1.0}


def strict(value: Any) -> str:
    """Encoded as requests and vendors require, or ValueError."""
    return json.dumps(value, allow_nan=False)


# --- the sanitising function --------------------------------------------------------------


def test_non_finite_numbers_become_telling_strings_at_any_depth() -> None:
    safe = json_safe({"a": INF, "b": [NAN, -INF, {"c": (INF, 1.5)}], "d": None, "e": True})
    assert safe == {
        "a": "Infinity",
        "b": ["NaN", "-Infinity", {"c": ["Infinity", 1.5]}],
        "d": None,
        "e": True,
    }
    strict(safe)


def test_what_is_json_already_comes_back_equal() -> None:
    payload = {"incident_id": "i-1", "n": 3, "rate": 0.25, "tags": ["a", "b"], "x": None}
    assert json_safe(payload) == payload


class Colour(Enum):
    RED = 1


@dataclass
class Target:
    key: str
    at: datetime


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no")


def test_other_types_are_stringified_sanely() -> None:
    at = datetime(2026, 11, 26, 12, tzinfo=UTC)
    safe = json_safe(
        {
            "decimal": Decimal("Infinity"),
            "fraction": Fraction(1, 4),
            "when": at,
            "day": date(2026, 11, 26),
            "set": {"b", "a"},
            "enum": Colour.RED,
            "trigger": Trigger.COST_SPIKE,
            "target": Target("k", at),
            "bytes": b"caf\xc3\xa9\xff",
            "object": Unprintable(),
            "long": "x" * 10_000,
            (1, 2): "tuple key",
            INF: "infinite key",
            None: "none key",
        }
    )
    strict(safe)
    assert isinstance(safe, dict)
    assert safe["decimal"] == "Infinity"
    assert safe["fraction"] == 0.25
    assert safe["when"] == "2026-11-26T12:00:00+00:00"
    assert safe["day"] == "2026-11-26"
    assert safe["set"] == ["a", "b"]
    assert safe["enum"] == 1
    assert safe["trigger"] == "cost_spike"
    assert safe["target"] == {"key": "k", "at": "2026-11-26T12:00:00+00:00"}
    assert safe["bytes"] == "café\ufffd"
    assert safe["object"] == "<Unprintable>"
    assert safe["long"] == "x" * 10_000  # strings are the vendors' limits to apply
    assert safe["Infinity"] == "infinite key"
    assert safe["null"] == "none key"
    assert safe["(1, 2)"] == "tuple key"


def test_huge_numbers_print_as_magnitudes() -> None:
    safe = json_safe({"big": 10**5000, "bigger_than_exact": 2**60, "float": 1e308})
    text = strict(safe)
    assert len(text) < 100
    assert safe == {"big": "~1e+5000", "bigger_than_exact": float(2**60), "float": 1e308}


def test_cycles_and_deep_nesting_end_as_text() -> None:
    loop: dict[str, Any] = {"n": 1}
    loop["self"] = loop
    fan: dict[str, Any] = {}
    fan["a"] = fan["b"] = fan["c"] = fan
    deep: list[Any] = []
    for _ in range(1000):
        deep = [deep]
    for value in (loop, fan, deep):
        strict(json_safe(value))
    assert json_safe(loop) == {"n": 1, "self": "{'n': 1, 'self': {...}}"}


@pytest.mark.parametrize(
    ("value", "percent", "text"),
    [
        (INF, False, "∞"),
        (-INF, False, "-∞"),
        (NAN, False, "NaN"),
        (INF, True, "∞"),
        (NAN, True, "NaN"),
        ("Infinity", False, "∞"),  # json_safe's output reads the same
        (None, False, "n/a"),
        (0.4, True, "40.0%"),
        (0.05, True, "5.0%"),
        (1e300, True, "1e+302%"),
        (50, False, "50"),
        (50.0, False, "50"),
        (0.1234, False, "0.123"),
        (1e300, False, "1e+300"),
        (10**5000, False, "~1e+5000"),
        (10**20, False, "1e+20"),
    ],
    ids=lambda value: value if isinstance(value, str) else type(value).__name__,
)
def test_human_numbers(value: object, percent: bool, text: str) -> None:
    assert human_number(value, percent=percent) == text


# --- the fakes are as strict as the vendors ---------------------------------------------------

POISONED_BODY = b'{"event_action": "trigger", "x": Infinity}'


def test_the_fakes_refuse_json_no_vendor_would_parse(
    fake_pagerduty: FakePagerDuty, fake_slack: FakeSlack, fake_jira: FakeJira
) -> None:
    headers = {"Content-Type": "application/json", "Authorization": "Bearer xoxb-test"}
    with httpx.Client(headers=headers) as http:
        pd = http.post(f"{fake_pagerduty.url}/v2/enqueue", content=POISONED_BODY)
        sl = http.post(f"{fake_slack.api_url}chat.postMessage", content=POISONED_BODY)
        ji = http.post(f"{fake_jira.url}/rest/api/2/issue", content=POISONED_BODY)
        broken = http.post(f"{fake_pagerduty.url}/v2/enqueue", content=b'{"event_action":')
    assert pd.status_code == 400
    assert pd.json()["status"] == "invalid event"
    assert sl.status_code == 200
    assert sl.json()["error"] == "invalid_json"
    assert ji.status_code == 400
    assert ji.json()["errorMessages"]
    assert broken.status_code == 400
    assert fake_slack.messages == {}
    assert fake_jira.issues == {}
    first = fake_pagerduty.received("/v2/enqueue")[0]
    assert (first.body, first.data) == (POISONED_BODY, {})  # recorded, and refused


# --- each activity, with the real client against its fake ----------------------------------


def page(custom_details: dict[str, Any]) -> PageRequest:
    return PageRequest(
        "incident-cost_spike-global-1", "L1", Severity.SEV2, "cost", "pagerloop/global",
        custom_details,
    )  # fmt: skip


async def test_pagerduty_sends_poisoned_metrics_as_strict_json(
    fake_pagerduty: FakePagerDuty,
) -> None:
    activities = PagerDutyActivities(fake_pagerduty.url, SecretStr("R" * 32))
    await ActivityEnvironment().run(activities.trigger, page({"incident_id": "i", **POISON}))
    [event] = fake_pagerduty.events("trigger")
    assert event["payload"]["custom_details"] == {
        "incident_id": "i",
        "cost_usd": "Infinity",
        "budget_used_ratio": "NaN",
        "headroom_usd": "-Infinity",
        "calls": 1.0,
    }


def test_a_body_requests_cannot_encode_is_permanent(fake_pagerduty: FakePagerDuty) -> None:
    session = pagerduty.make_session("R" * 32, fake_pagerduty.url)
    with pytest.raises(pdpyras.PDClientError) as failed:
        session.trigger("cost", "pagerloop/global", custom_details={"cost_usd": INF})
    translated = pagerduty._translate(failed.value, "trigger")
    assert isinstance(translated, PagerDutyPermanentError)
    assert "could not be encoded" in str(translated)
    assert fake_pagerduty.requests == []  # it never left


@pytest.mark.parametrize("status", [400, 413, 422])
async def test_pagerduty_refusing_the_event_is_permanent(
    fake_pagerduty: FakePagerDuty, status: int
) -> None:
    fake_pagerduty.fail_next(status)
    activities = PagerDutyActivities(fake_pagerduty.url, SecretStr("R" * 32))
    with pytest.raises(PagerDutyPermanentError, match=f"HTTP {status}"):
        await ActivityEnvironment().run(activities.trigger, page({}))


def test_slack_refusing_a_body_it_cannot_parse_is_permanent(fake_slack: FakeSlack) -> None:
    client = slack.make_client("xoxb-test", fake_slack.api_url)
    # slack-sdk writes a float as Python does (`Infinity`); Slack answers invalid_json.
    raw = [{"type": "section", "text": {"type": "mrkdwn", "text": "x"}, "n": INF}]
    with pytest.raises(SlackPermanentError, match="invalid_json"):
        slack.post_message(client, "#llm-oncall", "text", raw)
    with pytest.raises(SlackPermanentError, match="could not be encoded"):
        slack.post_message(client, "#llm-oncall", "text", [{"type": "section", "x": object()}])
    assert fake_slack.messages == {}


def test_jira_refusing_a_body_it_cannot_parse_is_permanent(fake_jira: FakeJira) -> None:
    client = jira.make_client(fake_jira.url, None, "jira-test-token")
    with pytest.raises(JIRAError) as refused:
        client.create_issue(
            fields={
                "project": {"key": "OPS"},
                "summary": "s",
                "issuetype": {"name": "Task"},
                "cost": INF,
            }
        )
    assert isinstance(jira._translate(refused.value, "the ticket"), JiraPermanentError)


async def test_a_jira_request_that_cannot_be_built_is_permanent(fake_jira: FakeJira) -> None:
    activities = JiraActivities(jira.make_client(fake_jira.url, None, "jira-test-token"))
    ticket = JiraTicket("i-1", "OPS", "summary", description=INF)  # type: ignore[arg-type]
    with pytest.raises(JiraPermanentError, match="could not be encoded"):
        await ActivityEnvironment().run(activities.open_ticket, ticket)


def test_the_slack_message_shows_absurd_metrics_readably() -> None:
    state = IncidentState(
        incident_id="i-1",
        trigger=Trigger.COST_SPIKE,
        scope="global",
        severity=Severity.SEV2,
        status=IncidentStatus.DETECTED,
        opened_at=datetime(2026, 11, 26, 12, tzinfo=UTC),
        metrics={**POISON, "error_rate": INF, "tokens": float(10**300)},
    )
    blocks = slack.incident_blocks(state)
    text = json.dumps(blocks, allow_nan=False, ensure_ascii=False)
    assert "cost_usd: *∞*" in blocks[2]["text"]["text"]
    assert "budget_used_ratio: *NaN*" in text
    assert "headroom_usd: *-∞*" in text
    assert "error_rate: *∞*" in text
    assert "tokens: *1e+300*" in text
    assert "inf" not in text.replace("Infinity", "")
    assert len(text) < MAX_TEXT * 10


def test_vendor_errors_stay_non_retryable() -> None:
    named = set(VENDOR_CALL.retry.non_retryable_error_types or [])
    for error in (SlackPermanentError, PagerDutyPermanentError, JiraPermanentError):
        assert error.__name__ in named


# --- whole incidents on the time-skipping server ---------------------------------------------


def told(*channels: str) -> tuple[ChannelTarget, ...]:
    return tuple(ChannelTarget(channel) for channel in channels)


PLAN = NotificationPlan(
    slack_channel="#llm-oncall",
    pagerduty=True,
    jira=True,
    jira_project="OPS",
    policies={
        "SEV2": EscalationPolicy(
            (
                EscalationLevel("L1", "On-call", channels=told("slack", "pagerduty", "jira")),
                EscalationLevel("L2", "Platform", channels=told("slack", "pagerduty")),
            )
        )
    },
    runbook=RunbookPlan(enabled=False),
)


def poisoned_breach() -> Breach:
    return Breach(
        trigger=Trigger.COST_SPIKE,
        scope="global",
        severity=Severity.SEV2,
        observed_at=datetime.now(UTC),
        summary="cost today $inf > budget $500",
        metrics=dict(POISON),
    )


class Incidents:
    def __init__(self, opener: IncidentActivities, env: WorkflowEnvironment) -> None:
        self.opener = opener
        self.client = env.client
        self.handles: list[WorkflowHandle[Any, Any]] = []

    async def open(self) -> WorkflowHandle[Any, Any]:
        incident_id = f"incident-cost_spike-global-{uuid.uuid4().hex[:8]}"
        request = OpenIncidentRequest(poisoned_breach(), incident_id, known_id=incident_id)
        [result] = await self.opener.open_or_update([request])
        assert result.incident_id == incident_id
        handle = self.client.get_workflow_handle_for(IncidentWorkflow.run, incident_id)
        self.handles.append(handle)
        return handle


@pytest.fixture
async def incidents(
    time_skipping_env: WorkflowEnvironment, settings: Settings
) -> AsyncIterator[Incidents]:
    client = time_skipping_env.client
    async with incident_worker(client, settings) as engine:
        opened = Incidents(
            IncidentActivities(client, settings.task_queue, PLAN, engine), time_skipping_env
        )
        yield opened
        await close_incidents(opened.handles)


async def state_of(handle: WorkflowHandle[Any, Any]) -> IncidentState:
    state: IncidentState = await handle.query(IncidentWorkflow.state)
    return state


async def test_an_infinite_cost_still_pages_posts_and_opens_a_ticket(
    incidents: Incidents,
    fake_pagerduty: FakePagerDuty,
    fake_slack: FakeSlack,
    fake_jira: FakeJira,
) -> None:
    handle = await incidents.open()

    await eventually(lambda: len(fake_pagerduty.events("trigger")) == 1)
    await eventually(lambda: len(fake_slack.messages) == 1 and len(fake_jira.issues) == 1)
    [trigger] = fake_pagerduty.events("trigger")
    details = trigger["payload"]["custom_details"]
    assert details["cost_usd"] == "Infinity"
    assert details["budget_used_ratio"] == "NaN"
    assert details["headroom_usd"] == "-Infinity"
    assert details["calls"] == 1.0
    assert details["trigger"] == "cost_spike"
    [message] = fake_slack.messages.values()
    assert "cost_usd: *∞*" in str(message.blocks)
    [issue] = fake_jira.issues.values()
    assert "cost today $inf" in issue["fields"]["description"]

    await handle.execute_update(IncidentWorkflow.resolve, ActionRequest("alice", "cli"))
    result = await handle.result()
    assert result.status == IncidentStatus.RESOLVED
    kinds = [entry.kind for entry in result.timeline]
    assert {"notified", "paged", "ticket", "resolved"} <= set(kinds)
    assert "notification_failed" not in kinds
    assert fake_pagerduty.alerts[result.incident_id] == "resolved"
    await eventually(lambda: issue["status"] == "Done")
    assert any("cost_usd" in c["body"] for c in issue["comments"])  # the postmortem


async def test_a_page_pagerduty_refuses_is_on_the_timeline_and_the_rest_goes_on(
    incidents: Incidents,
    fake_pagerduty: FakePagerDuty,
    fake_slack: FakeSlack,
    fake_jira: FakeJira,
) -> None:
    fake_pagerduty.fail_next(400)
    started = clock.monotonic()
    handle = await incidents.open()

    async def refused() -> bool:
        timeline = (await state_of(handle)).timeline
        return any(
            e.kind == "notification_failed" and e.channel == "pagerduty" and "HTTP 400" in e.text
            for e in timeline
        )

    await eventually(refused)
    assert clock.monotonic() - started < 15  # not a day of retries
    await eventually(lambda: len(fake_slack.messages) == 1 and len(fake_jira.issues) == 1)

    async def recorded() -> bool:  # the vendors answered; the incident records their answers
        state = await state_of(handle)
        return state.slack_message is not None and state.jira_issue is not None

    await eventually(recorded)
    assert len(fake_pagerduty.events("trigger")) == 1  # tried once: retrying cannot help
    state = await state_of(handle)
    assert state.paged == []
    assert state.status == IncidentStatus.DETECTED
