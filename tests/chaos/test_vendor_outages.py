"""Chaos: vendor outages on the time-skipping server, through the real slack-sdk, pdpyras and
jira clients talking to the fakes. A Slack 429 storm with Retry-After, PagerDuty answering 5xx
for 10 minutes, Jira down for an hour: each incident still escalates on time, and once the
vendor is back every change lands in it exactly once.

The fakes answer in real time while Temporal's clock skips: an outage "for 10 minutes" is the
fake failing every call until the workflow clock (`env.get_current_time()`) has passed the
window, then switched back. Retries back off in workflow time (VENDOR_CALL: 1 s doubling to
5 min; Slack's Retry-After when it gives one), so a vendor back at minute 60 is reached again
within 5 minutes of workflow time."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from temporalio.client import WorkflowHandle
from temporalio.testing import WorkflowEnvironment

import worker
from activities.incidents import IncidentActivities, OpenIncidentRequest
from activities.policies import VENDOR_CALL
from config.escalation import load_escalation
from config.settings import Settings
from domain.escalation import EscalationPolicy
from domain.incident import (
    ActionRequest,
    Breach,
    IncidentResult,
    IncidentStatus,
    Severity,
    TimelineEntry,
    Trigger,
)
from domain.incident_machine import TOLD
from tests.chaos import ledger
from tests.conftest import incident_worker
from tests.fakes.jira import FakeJira
from tests.fakes.pagerduty import FakePagerDuty
from tests.fakes.slack import FakeSlack
from tests.helpers import close_incidents
from workflows.incident import IncidentWorkflow

INCIDENTS = 3  # put through each outage side by side
L2_KEY = "K" * 32
L3_KEY = "J" * 32
# Every level pages a service of its own (one dedup key per level) and L2 opens the ticket:
# L1 for 5 min, L2 for 10, L3 for 15, then a reminder every hour.
POLICY = f"""
repeat_interval_seconds = 3600
[[levels]]
name = "L1"
description = "On-call"
ack_timeout_seconds = 300
resolve_timeout_seconds = 7200
page = true
[[levels]]
name = "L2"
description = "Platform"
ack_timeout_seconds = 600
resolve_timeout_seconds = 7200
pagerduty_routing_key = "{L2_KEY}"
jira_project = "OPS"
[[levels]]
name = "L3"
description = "Leadership"
ack_timeout_seconds = 900
resolve_timeout_seconds = 7200
pagerduty_routing_key = "{L3_KEY}"
jira_project = "OPS"
"""
# A timer firing later than this after its deadline fails the scenario.
MAX_TIMER_DELAY_S = 5.0
# VENDOR_CALL backs off to at most this between tries: a vendor back is reached again within it.
RETRY_CEILING = VENDOR_CALL.retry.maximum_interval + timedelta(seconds=5)


@dataclass
class Fakes:
    slack: FakeSlack
    pagerduty: FakePagerDuty
    jira: FakeJira


@dataclass
class Counts:
    """What one outage did to its incidents."""

    incidents: int = 0
    lost: list[str] = field(default_factory=list)  # not resolved, or an escalation missing
    duplicates: Counter[str] = field(default_factory=Counter)  # by what was duplicated
    missing: Counter[str] = field(default_factory=Counter)  # changes that never landed
    delays: list[float] = field(default_factory=list)  # seconds, each timer vs its deadline
    caught_up: list[float] = field(default_factory=list)  # seconds from the vendor's return

    @property
    def worst_delay(self) -> float:
        return max(self.delays, default=0.0)


@dataclass
class Outage:
    fault: str  # the ledger's name of it
    down: Callable[[], Awaitable[None]]
    up: Callable[[], Awaitable[None]]
    lasts: timedelta  # in workflow time
    horizon: timedelta  # how long the incidents stay open, in workflow time
    landed: str  # the timeline kind of the vendor's first success for an incident
    catch_up: timedelta  # how soon after the vendor is back that must come, at the latest


class Gate:
    """A loopback port forwarding to a fake, which can stop listening (connections refused,
    those open cut) and listen again on the same port: a vendor that is down, not erring."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def listen(self) -> None:
        self._server = await asyncio.start_server(
            self._forward, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def refuse(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._open):
            writer.close()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._open |= {writer, upstream}
        try:
            await asyncio.gather(_pipe(reader, upstream), _pipe(upstream_reader, writer))
        finally:
            self._open -= {writer, upstream}
            writer.close()
            upstream.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(OSError):
        writer.close()


@pytest.fixture
async def jira_gate(fake_jira: FakeJira) -> AsyncIterator[Gate]:
    gate = Gate(fake_jira.port)
    await gate.listen()
    yield gate
    await gate.refuse()


@pytest.fixture
def chaos_settings(settings: Settings, tmp_path: Path, jira_gate: Gate) -> Settings:
    """Our escalation policy, no runbooks, and Jira reached through a gate that can refuse."""
    policy = tmp_path / "escalation.toml"
    policy.write_text(POLICY)
    return settings.model_copy(
        update={
            "escalation_policy_file": policy,
            "runbooks_enabled": False,
            "jira_url": jira_gate.url,
        }
    )


@pytest.fixture
def fakes(fake_slack: FakeSlack, fake_pagerduty: FakePagerDuty, fake_jira: FakeJira) -> Fakes:
    return Fakes(fake_slack, fake_pagerduty, fake_jira)


class Stage:
    """Incidents opened the way the detector opens them (update-with-start), on a worker wired
    as worker.py wires it, on the shared time-skipping server."""

    def __init__(self, env: WorkflowEnvironment, settings: Settings, opener: IncidentActivities):
        self.env = env
        self.settings = settings
        self.opener = opener
        self.handles: list[WorkflowHandle] = []

    @property
    def policy(self) -> EscalationPolicy:
        return load_escalation(self.settings.escalation_policy_file).policies["SEV2"]

    async def open(self) -> WorkflowHandle:
        incident_id = f"incident-error_rate-chaos-{uuid.uuid4().hex[:8]}"
        breach = Breach(
            Trigger.ERROR_RATE,
            "global",
            Severity.SEV2,
            await self.env.get_current_time(),
            "error rate 40.0% > 5% (20/50 calls in 300s)",
            {"error_rate": 0.4, "calls": 50, "errors": 20},
        )
        # The time-skipping server cannot list workflows: name the incident.
        [result] = await self.opener.open_or_update(
            [OpenIncidentRequest(breach, proposed_id=incident_id, known_id=incident_id)]
        )
        assert result.incident_id == incident_id
        handle = self.env.client.get_workflow_handle_for(IncidentWorkflow.run, incident_id)
        self.handles.append(handle)
        return handle


@pytest.fixture
async def stage(
    time_skipping_env: WorkflowEnvironment, chaos_settings: Settings
) -> AsyncIterator[Stage]:
    client = time_skipping_env.client
    escalation = load_escalation(chaos_settings.escalation_policy_file)
    plan = worker.notification_plan(chaos_settings, escalation)
    async with incident_worker(client, chaos_settings) as engine:
        opener = IncidentActivities(client, chaos_settings.task_queue, plan, engine)
        staged = Stage(time_skipping_env, chaos_settings, opener)
        try:
            yield staged
        finally:
            await close_incidents(staged.handles)


async def put_through(stage: Stage, outage: Outage) -> tuple[list[IncidentResult], datetime]:
    """Open the incidents with the vendor down, keep it down for `outage.lasts` of workflow
    time, bring it back, let the incidents run to `outage.horizon`, then resolve them."""
    env = stage.env
    await outage.down()
    try:
        handles = [await stage.open() for _ in range(INCIDENTS)]
        began = await env.get_current_time()
        await sleep_until(env, began + outage.lasts)
    finally:
        await outage.up()
    back = await env.get_current_time()
    await sleep_until(env, began + outage.horizon)
    results = []
    for handle in handles:
        await handle.execute_update(IncidentWorkflow.resolve, ActionRequest("U024BE7LH", "cli"))
        with contextlib.suppress(TimeoutError):
            results.append(await asyncio.wait_for(handle.result(), timeout=30))
    return results, back


async def sleep_until(env: WorkflowEnvironment, at: datetime) -> None:
    """Skip workflow time up to `at` (in steps, so that retries fire along the way)."""
    while (now := await env.get_current_time()) < at:
        await env.sleep(min(at - now, timedelta(minutes=5)))


def opened_at(timeline: list[TimelineEntry]) -> datetime:
    return next(e.at for e in timeline if e.kind == "opened")


def deadlines(policy: EscalationPolicy, start: datetime, until: datetime) -> list[datetime]:
    """When an incident nobody acknowledges escalates, level by level, then is reminded."""
    due, entered = [], start
    for number in range(1, policy.top):
        entered += timedelta(seconds=policy.level(number).ack_timeout_seconds)
        due.append(entered)
    at = entered + timedelta(seconds=policy.level(policy.top).ack_timeout_seconds)
    while at <= until:
        due.append(at)
        at += timedelta(seconds=policy.repeat_interval_seconds)
    return [d for d in due if d <= until]


REPORT_HEAD = "*Incident report*"


def told_lines(result: IncidentResult, since: int = 0) -> Counter[str]:
    """The lines the incident told Slack (thread) and Jira (comments): Slack's form."""
    return Counter(
        f"*{e.kind.replace('_', ' ')}* by {e.actor} via {e.channel}: {e.text}"
        for e in result.timeline[since:]
        if e.kind in TOLD
    )


def lines(texts: list[str]) -> Counter[str]:
    """The lines told, without the invisible mark a Jira comment carries for its retries."""
    return Counter(
        line for text in texts for line in text.splitlines() if not line.startswith("{anchor:")
    )


def tally(
    stage: Stage, fakes: Fakes, outage: Outage, results: list[IncidentResult], back: datetime
) -> Counts:
    until = back - outage.lasts + outage.horizon
    counts = Counts(incidents=len(stage.handles))
    policy = stage.policy
    by_id = {r.incident_id: r for r in results}
    messages = list(fakes.slack.messages.values())
    triggers = Counter(e["dedup_key"] for e in fakes.pagerduty.accepted_events("trigger"))
    for handle in stage.handles:
        result = by_id.get(handle.id)
        if result is None or result.status != IncidentStatus.RESOLVED:
            counts.lost.append(handle.id)
            continue
        start = opened_at(result.timeline)
        resolved = result.resolved_at or until
        fired = [e.at for e in result.timeline if e.kind in ("escalated", "reminder")]
        due = deadlines(policy, start, min(until, resolved))
        if len(fired) < len(due):
            counts.lost.append(handle.id)  # frozen: a deadline passed and nothing fired
        counts.delays += [(at - d).total_seconds() for at, d in zip(fired, due, strict=False)]
        landed = next((e.at for e in result.timeline if e.kind == outage.landed), None)
        if landed is not None:
            counts.caught_up.append((landed - back).total_seconds())

        # Slack: one message, every told line once in its thread, the last state shown.
        ours = [m for m in messages if (m.metadata or {}).get("event_payload", {}) == {
            "incident_id": handle.id}]  # fmt: skip
        counts.duplicates["slack messages"] += max(len(ours) - 1, 0)
        counts.missing["slack messages"] += 1 - min(len(ours), 1)
        thread = [reply for m in ours for reply in m.replies]
        # The incident report's summary closes the thread, once.
        reports = [reply for reply in thread if reply.startswith(REPORT_HEAD)]
        counts.duplicates["slack reports"] += max(len(reports) - 1, 0)
        counts.missing["slack reports"] += 1 - min(len(reports), 1)
        replies = lines([reply for reply in thread if not reply.startswith(REPORT_HEAD)])
        _diff(counts, told_lines(result), replies, "slack replies")
        if ours and "RESOLVED" not in str(ours[0].blocks):
            counts.missing["slack updates"] += 1

        # PagerDuty: each page (a level reached, a reminder) lands once on its level's key.
        pages = Counter({handle.id: 1})
        for entry in result.timeline:
            if entry.kind == "escalated":
                pages[_dedup_key(handle.id, entry.text.split()[1])] += 1
            elif entry.kind == "reminder":
                pages[_dedup_key(handle.id, entry.text.split(" at ")[1].split(":")[0])] += 1
        _diff(counts, pages, Counter({k: triggers[k] for k in pages}), "pagerduty triggers")

        # Jira: one ticket once L2 is reached, each line told from then on commented once.
        label = f"pagerloop:{handle.id}"
        tickets = [i for i in fakes.jira.issues.values() if label in i["fields"]["labels"]]
        counts.duplicates["jira tickets"] += max(len(tickets) - 1, 0)
        counts.missing["jira tickets"] += 1 - min(len(tickets), 1)
        since = next(i for i, e in enumerate(result.timeline) if e.text.startswith("to L2"))
        expected = Counter(
            {line.replace("*", "", 2): n for line, n in told_lines(result, since + 1).items()}
        )
        bodies = [c["body"] for t in tickets for c in t["comments"]]
        postmortems = [b for b in bodies if b.startswith("h3. Postmortem")]
        counts.duplicates["jira postmortems"] += max(len(postmortems) - 1, 0)
        comments = lines([b for b in bodies if not b.startswith("h3. Postmortem")])
        _diff(counts, expected, comments, "jira comments")
    counts.duplicates = +counts.duplicates
    counts.missing = +counts.missing
    return counts


def _dedup_key(incident_id: str, level: str) -> str:
    return incident_id if level == "L1" else f"{incident_id}/{level}"


def _diff(counts: Counts, expected: Counter[str], landed: Counter[str], what: str) -> None:
    for line in expected.keys() | landed.keys():
        if landed[line] > expected[line]:
            counts.duplicates[what] += landed[line] - expected[line]
        elif landed[line] < expected[line]:
            counts.missing[what] += expected[line] - landed[line]


def record_and_check(outage: Outage, counts: Counts) -> None:
    ledger.record(
        outage.fault,
        runs=counts.incidents,
        incidents_lost=len(counts.lost),
        duplicates=sum(counts.duplicates.values()),
        worst_timer_delay_s=counts.worst_delay,
        records_lost=0,
    )
    assert counts.incidents == INCIDENTS
    assert counts.lost == [], f"incidents lost or frozen: {counts.lost}"
    assert not counts.duplicates, f"landed more than once: {dict(counts.duplicates)}"
    assert not counts.missing, f"never landed: {dict(counts.missing)}"
    assert len(counts.delays) >= 2 * INCIDENTS, counts.delays  # L2 and L3 at least
    assert min(counts.delays) >= 0, counts.delays
    assert counts.worst_delay <= MAX_TIMER_DELAY_S, counts.delays
    # Nothing got through while the vendor was down, and all of it soon after it came back.
    assert len(counts.caught_up) == INCIDENTS, counts.caught_up
    assert min(counts.caught_up) >= 0, counts.caught_up
    assert max(counts.caught_up) <= outage.catch_up.total_seconds(), counts.caught_up


async def test_slack_429_storm_with_retry_after(stage: Stage, fakes: Fakes) -> None:
    """Every Slack call answered 429 (Retry-After 30 s) for 20 minutes: L2 and L3 are reached
    and the first reminder sent meanwhile; afterwards one message per incident, each line in
    its thread once, the resolved state shown."""

    async def down() -> None:
        fakes.slack.rate_limited = 30

    async def up() -> None:
        fakes.slack.rate_limited = None

    outage = Outage(
        "Slack 429 storm (Retry-After 30 s) for 20 min",
        down,
        up,
        lasts=timedelta(minutes=20),
        horizon=timedelta(minutes=35),
        landed="notified",  # the incident's message posted
        catch_up=timedelta(seconds=35),  # the last Retry-After, and the call
    )
    results, back = await put_through(stage, outage)
    calls = len(fakes.slack.requests)
    counts = tally(stage, fakes, outage, results, back)
    record_and_check(outage, counts)
    # The storm was felt: each incident's post was refused and retried every 30 s (a retry
    # first looks for the message in the channel's history) until it was over.
    assert calls > 30 * INCIDENTS


async def test_pagerduty_5xx_for_10_minutes(stage: Stage, fakes: Fakes) -> None:
    """PagerDuty answers 500 for 10 minutes: the incidents escalate to L2 meanwhile; after it
    is back each level's page lands once on its own dedup key."""

    async def down() -> None:
        fakes.pagerduty.outage_status = 500

    async def up() -> None:
        fakes.pagerduty.outage_status = None

    outage = Outage(
        "PagerDuty 5xx for 10 min",
        down,
        up,
        lasts=timedelta(minutes=10),
        horizon=timedelta(minutes=20),
        landed="paged",
        catch_up=RETRY_CEILING,
    )
    results, back = await put_through(stage, outage)
    counts = tally(stage, fakes, outage, results, back)
    record_and_check(outage, counts)
    triggers = Counter(e["dedup_key"] for e in fakes.pagerduty.accepted_events("trigger"))
    assert sorted(triggers.values()) == [1] * 3 * INCIDENTS  # L1, L2 and L3, once each
    refused = len(fakes.pagerduty.events("trigger")) - len(triggers)
    assert refused >= INCIDENTS * 5  # retried through the outage


@pytest.mark.parametrize("how", ["503", "refused"])
async def test_jira_down_for_an_hour(stage: Stage, fakes: Fakes, jira_gate: Gate, how: str) -> None:
    """Jira down for an hour from the incidents' start (every request answered 503, or every
    connection refused): they escalate to L2 (where the ticket is due), L3 and a reminder
    meanwhile; the ticket is opened once when Jira is back, and every line told since L2 is
    commented once."""

    async def down() -> None:
        if how == "503":
            fakes.jira.unavailable = True
        else:
            await jira_gate.refuse()

    async def up() -> None:
        if how == "503":
            fakes.jira.unavailable = False
        else:
            await jira_gate.listen()

    outage = Outage(
        f"Jira down for 1 h ({'503' if how == '503' else 'connection refused'})",
        down,
        up,
        lasts=timedelta(hours=1),
        horizon=timedelta(minutes=75),
        landed="ticket",
        catch_up=RETRY_CEILING,
    )
    results, back = await put_through(stage, outage)
    counts = tally(stage, fakes, outage, results, back)
    record_and_check(outage, counts)
    assert len(fakes.jira.issues) == INCIDENTS
