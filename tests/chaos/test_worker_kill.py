"""SIGKILL of the worker at each step of an incident, on a real Temporal dev server, with the
worker in an OS process of its own (tests/chaos/processes.py) and the Slack, PagerDuty and Jira
fakes, served from this process, counting every call.

The incident is what the detector opens for a quality breach (SEV2 `quality_degradation` on
`global`): its runbook diagnoses at once and, once acknowledged, pins the last known-good model
snapshot and verifies that the scores came back. The escalation policy is short: L1 pages and
has 6 s to acknowledge; L2 pages its own PagerDuty service, opens the Jira ticket, and from 4 s
after it is reached reminds (pages again) every 5 s until resolved, so that escalation timers
fall due while the worker is down. The steps, in the order an incident takes them:

    opened                      killed as soon as the update-with-start returns
    first page in flight        PagerDuty takes the L1 trigger and holds its answer back
    acknowledged                killed as soon as the acknowledge update returns
    runbook applying controls   the stores' write lock is held: the pin (controls.set) waits
    verifying                   killed once the mitigation is on the timeline
    resolving                   the stores locked again: the revert (controls.revert) waits

Each step is a scenario of its own (its own task queue, store, fakes and worker process), killed
once at that step and started again. They run side by side, so that the suite pays for the
slowest (the verification waits for the first whole minute after the controls reached the
clients, and an activity cut off by the kill is retried only when its start-to-close timeout
expires), not for their sum. Afterwards each incident must be resolved with its whole story on
its timeline, one Slack message, one PagerDuty alert per dedup key (never re-opened after its
resolve), one Jira ticket, its runbook's control reverted, and every escalation timer acted on
no later than the downtime allows (measured on the workflow history, in server time: after a
crash the first workflow task runs with a stale `workflow.now()`, so timeline timestamps written
then are earlier than the moment they describe).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from starlette.requests import Request
from starlette.responses import Response
from temporalio.api.enums.v1 import PendingActivityState
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client, WorkflowHandle
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

import worker
from activities.incidents import IncidentActivities, OpenIncidentRequest
from config import Settings
from config.escalation import load_escalation
from domain.incident import (
    ActionRequest,
    Breach,
    IncidentResult,
    IncidentState,
    IncidentStatus,
    NotificationPlan,
    Severity,
    TimelineEntry,
    Trigger,
)
from domain.incident_machine import TOLD
from stores import controls
from stores.llm_calls import CallRecord
from stores.quality import ScoreRecord, write_scores
from stores.writer import write_calls
from tests.chaos import ledger
from tests.chaos.processes import WorkerProcess
from tests.fakes.jira import FakeJira
from tests.fakes.pagerduty import FakePagerDuty
from tests.fakes.slack import FakeSlack
from tests.helpers import eventually
from workflows.incident import IncidentWorkflow

STEPS = (
    "opened",
    "first page in flight",
    "acknowledged",
    "runbook applying controls",
    "verifying",
    "resolving",
)
# Not a step of its own: the kill lands while a Slack thread reply and a Jira comment are in
# flight: both are retried after the kill and must find what the first attempt posted).
REPLY_IN_FLIGHT = "thread reply and ticket comment in flight"

L1_ACK_SECONDS = 6
L2_RESOLVE_SECONDS = 4
REMIND_EVERY_SECONDS = 5
L2_KEY = "K" * 32
POLICY = f"""
[severities.SEV2]
repeat_interval_seconds = {REMIND_EVERY_SECONDS}
[[severities.SEV2.levels]]
name = "L1"
description = "On-call"
ack_timeout_seconds = {L1_ACK_SECONDS}
resolve_timeout_seconds = 3600
[[severities.SEV2.levels]]
name = "L2"
description = "Platform"
ack_timeout_seconds = 3600
resolve_timeout_seconds = {L2_RESOLVE_SECONDS}
pagerduty_routing_key = "{L2_KEY}"
jira_project = "OPS"
"""
# The runbook re-reads the signal this long after the first whole minute that began once its
# controls had reached the clients (the settings' floor is 10 s; the plan takes any).
VERIFY_SECONDS = 3
# A vendor holds its answer back this long after doing the work: shorter than the clients' own
# timeouts (10 s), so only the kill keeps the worker from hearing back.
ANSWER_DELAY = 8.0
MODEL = "gpt-4.1"
GOOD_SNAPSHOT = "gpt-4.1-2025-04-14"
BAD_SNAPSHOT = "gpt-4.1-2025-09-01"
RESPONDER = "U0ALICE00"
# After a kill, a workflow task goes to the dead worker's sticky queue while the server still
# counts that worker as a recent poller, and reaches the new worker when the queue's
# schedule-to-start timeout (the SDK's default, 10 s) expires; a task the dead worker had
# started waits out the workflow task timeout (10 s) the same way.
STICKY_QUEUE_SECONDS = 10.0
TIMER_SLACK_SECONDS = 5.0
EXPECTED_KINDS = (
    "opened",
    "breach",
    "notified",
    "paged",
    "diagnosis",
    "escalated",
    "ticket",
    "acknowledged",
    "mitigation",
    "verified",
    "proposed",
    "resolved",
    "controls_reverted",
)


# --- fakes that can also keep the caller waiting -------------------------------------------


class SlowPagerDuty(FakePagerDuty):
    """The PagerDuty fake, which can also take an event and then keep the caller waiting (as
    the Slack fake's `delay_next` does): the worker dies before it hears back."""

    def __init__(self) -> None:
        super().__init__()
        self.delays: dict[str, float] = {}  # event_action -> seconds, once

    def delay_next(self, action: str, seconds: float) -> None:
        self.delays[action] = seconds

    async def _enqueue(self, request: Request) -> Response:
        answer = await super()._enqueue(request)
        try:
            action = str(json.loads(await request.body()).get("event_action"))
        except (ValueError, AttributeError):
            return answer
        with self.lock:
            delay = self.delays.pop(action, 0.0)
        if delay:
            await asyncio.sleep(delay)
        return answer


class SlowJira(FakeJira):
    """The Jira fake, which can also hold back its answer to a new comment (`delay_next(
    "comment", s)`), as it does for a create."""

    async def _comment(self, request: Request) -> Response:
        answer = await super()._comment(request)
        if request.method == "POST":
            with self.lock:
                delay = self.delays.pop("comment", 0.0)
            if delay:
                await asyncio.sleep(delay)
        return answer


# --- what a scenario measured ----------------------------------------------------------------


@dataclass
class Crash:
    killed: datetime
    polling: datetime  # the new worker polls again

    @property
    def downtime_s(self) -> float:
        return (self.polling - self.killed).total_seconds()


@dataclass
class Timer:
    what: str
    due: datetime
    acted: datetime  # the workflow task that acted on it began (server time)
    allowed_s: float

    @property
    def late_s(self) -> float:
        return (self.acted - self.due).total_seconds()


def allowed_delay(due: datetime, crashes: Sequence[Crash]) -> float:
    """A deadline with a worker up all along is met; one due after a kill may be late by the
    rest of the downtime, or by the sticky queue's timeout while the dead worker still counts
    as a recent poller."""
    allowed = 0.0
    for crash in crashes:
        if due < crash.killed - timedelta(seconds=1):
            continue
        sticky = due <= crash.killed + timedelta(seconds=STICKY_QUEUE_SECONDS + 1)
        rest = (crash.polling - due).total_seconds()
        allowed = max(allowed, rest, STICKY_QUEUE_SECONDS if sticky else 0.0)
    return allowed + TIMER_SLACK_SECONDS


_ESCALATION_TIMER = re.compile(r"^(L\d+): (acknowledged|resolved|reminder) by ")


def escalation_timers_acted(
    events: Sequence[HistoryEvent],
) -> tuple[datetime, list[tuple[str, datetime]]]:
    """From a run's history: when its first workflow task began (the escalation clock's start),
    and for each escalation timer that fired, in order, its summary ("L1: acknowledged by
    ...") and when the workflow task that acted on it began. Server time throughout."""
    summaries: dict[str, str] = {}
    started: dict[int, datetime] = {}
    fired: list[str] = []
    acted: list[tuple[str, datetime]] = []
    for event in events:
        at = event.event_time.ToDatetime(tzinfo=UTC)
        if event.HasField("workflow_task_started_event_attributes"):
            started[event.event_id] = at
        elif event.HasField("timer_started_event_attributes"):
            payload = event.user_metadata.summary
            summary = str(json.loads(payload.data)) if payload.data else ""
            summaries[event.timer_started_event_attributes.timer_id] = summary
        elif event.HasField("timer_fired_event_attributes"):
            summary = summaries.get(event.timer_fired_event_attributes.timer_id, "")
            if _ESCALATION_TIMER.match(summary):
                fired.append(summary)
        elif event.HasField("workflow_task_completed_event_attributes") and fired:
            began = started[event.workflow_task_completed_event_attributes.started_event_id]
            acted += [(summary, began) for summary in fired]
            fired = []
    return min(started.values()), acted


@dataclass
class Outcome:
    step: str
    incident_id: str
    crashes: list[Crash]
    lost: list[str] = field(default_factory=list)  # why the incident is not done, if it is not
    slack_posts: int = 0
    pagerduty_triggers: dict[str, int] = field(default_factory=dict)  # dedup key -> events
    pagerduty_extra_keys: int = 0
    pagerduty_reopened: int = 0  # triggers after a resolve of the same dedup key
    jira_tickets: int = 0
    jira_creates: int = 0
    postmortems: int = 0
    timers: list[Timer] = field(default_factory=list)
    # At-least-once side effects (not among the three the table counts as duplicates).
    duplicate_replies: int = 0
    duplicate_comments: int = 0

    @property
    def downtime_s(self) -> float:
        return sum(crash.downtime_s for crash in self.crashes)

    @property
    def duplicates(self) -> int:
        """Slack messages, PagerDuty alerts (dedup keys) and Jira tickets beyond one each."""
        return (
            max(self.slack_posts - 1, 0)
            + self.pagerduty_extra_keys
            + self.pagerduty_reopened
            + max(self.jira_tickets - 1, 0)
        )

    @property
    def worst_timer_delay_s(self) -> float:
        return max((timer.late_s for timer in self.timers), default=0.0)

    def summary(self) -> str:
        late = ", ".join(f"{t.what} {t.late_s:+.1f}s (<={t.allowed_s:.0f})" for t in self.timers)
        return (
            f"{self.step}: lost={self.lost or 0} downtime={self.downtime_s:.1f}s "
            f"slack_posts={self.slack_posts} pd_triggers={self.pagerduty_triggers} "
            f"pd_reopened={self.pagerduty_reopened} jira_tickets={self.jira_tickets} "
            f"(creates {self.jira_creates}) postmortems={self.postmortems} "
            f"replies_twice={self.duplicate_replies} comments_twice={self.duplicate_comments}"
            f"\n  timers: {late}"
        )


def told_twice(text: str, timeline: Sequence[TimelineEntry], line: Callable[..., str]) -> int:
    """How many timeline lines `text` (a thread, a ticket's comments) holds more often than
    the timeline told them."""
    told = Counter(line(e.kind, e.actor, e.channel, e.text) for e in timeline if e.kind in TOLD)
    return sum(max(text.count(said) - times, 0) for said, times in told.items())


def slack_line(kind: str, actor: str, channel: str, text: str) -> str:
    return f"*{kind.replace('_', ' ')}* by {actor} via {channel}: {text}"


def jira_line(kind: str, actor: str, channel: str, text: str) -> str:
    return f"{kind} by {actor} via {channel}: {text}"


def vendor_counts(
    outcome: Outcome,
    timeline: Sequence[TimelineEntry],
    slack: FakeSlack,
    pagerduty: FakePagerDuty,
    jira: FakeJira,
    paged_levels: Sequence[str],
) -> None:
    """Fill `outcome` from what the fakes saw: one Slack message showing the end, one alert per
    dedup key, never re-opened, resolved; one Jira ticket, Done, with one postmortem."""
    incident_id = outcome.incident_id
    outcome.slack_posts = len(slack.posts())
    messages = slack.top_level()
    if not messages or "is resolved" not in messages[-1].text:
        outcome.lost.append("the Slack message does not show the incident resolved")
    thread = "\n".join(reply for message in messages for reply in message.replies)
    outcome.duplicate_replies = told_twice(thread, timeline, slack_line)

    # The default service shares the incident id as dedup key; another service gets id/level.
    expected = {
        incident_id if level == "L1" else f"{incident_id}/{level}" for level in paged_levels
    }
    events = pagerduty.events()
    triggers = Counter(e["dedup_key"] for e in events if e["event_action"] == "trigger")
    outcome.pagerduty_triggers = dict(triggers)
    outcome.pagerduty_extra_keys = len(set(triggers) - expected)
    for key in sorted(expected):
        actions = [e["event_action"] for e in events if e.get("dedup_key") == key]
        if "resolve" in actions:
            outcome.pagerduty_reopened += actions[actions.index("resolve") :].count("trigger")
        if pagerduty.alerts.get(key) != "resolved":
            outcome.lost.append(f"PagerDuty alert {key} is {pagerduty.alerts.get(key)}")

    label = f"pagerloop:{incident_id}"
    tickets = [i for i in jira.issues.values() if label in i["fields"].get("labels", [])]
    outcome.jira_tickets = len(tickets)
    outcome.jira_creates = sum(r.method == "POST" for r in jira.received("/rest/api/2/issue"))
    for ticket in tickets:
        if ticket["status"] != "Done":
            outcome.lost.append(f"Jira {ticket['key']} is {ticket['status']}")
        bodies = [str(comment["body"]) for comment in ticket["comments"]]
        outcome.postmortems += sum(body.startswith("h3. Postmortem") for body in bodies)
        outcome.duplicate_comments += told_twice("\n".join(bodies), timeline, jira_line)


# --- one scenario ----------------------------------------------------------------------------


def chaos_settings(
    base: Path,
    target_host: str,
    slack: FakeSlack,
    pagerduty: FakePagerDuty,
    jira: FakeJira,
    policy: str,
) -> Settings:
    """A deployment of its own: task queue, SQLite store, the fakes, the escalation policy."""
    base.mkdir(parents=True, exist_ok=True)
    policy_file = base / "escalation.toml"
    policy_file.write_text(policy)
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        data_dir=base / ".pagerloop",
        database_url=f"sqlite:///{base / 'stores.db'}",
        temporal_address=target_host,
        task_queue=f"chaos-{uuid.uuid4().hex[:12]}",
        log_level="WARNING",
        slack_bot_token="xoxb-chaos",
        slack_api_url=slack.api_url,
        pagerduty_routing_key="R" * 32,
        pagerduty_events_url=pagerduty.url,
        jira_url=jira.url,
        jira_token="jira-chaos-token",
        escalation_policy_file=policy_file,
    )


async def open_incident(
    client: Client, settings: Settings, plan: NotificationPlan, engine: Engine, breach: Breach
) -> WorkflowHandle[IncidentWorkflow, IncidentResult]:
    """What the detector does on a breach: update-with-start, with the worker's plan."""
    incident_id = f"incident-{breach.trigger}-{breach.scope}-{uuid.uuid4().hex[:8]}"
    opener = IncidentActivities(client, settings.task_queue, plan, engine)
    [opened] = await opener.open_or_update([OpenIncidentRequest(breach, proposed_id=incident_id)])
    assert (opened.opened, opened.incident_id) == (True, incident_id), opened
    return client.get_workflow_handle_for(IncidentWorkflow.run, incident_id)


class Scenario:
    """One incident on its own task queue, store, fakes and worker process."""

    def __init__(self, step: str, client: Client, target_host: str, base: Path) -> None:
        self.step = step
        self.client = client
        self.target_host = target_host
        self.base = base
        self.slack = FakeSlack()
        self.pagerduty = SlowPagerDuty()
        self.jira = SlowJira()
        self.stack = contextlib.AsyncExitStack()
        self.crashes: list[Crash] = []
        self._writing: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Scenario:
        for fake in (self.slack, self.pagerduty, self.jira):
            self.stack.enter_context(fake)
        self.settings = chaos_settings(
            self.base, self.target_host, self.slack, self.pagerduty, self.jira, POLICY
        )
        self.engine = worker.open_store(self.settings)
        self.stack.callback(self.engine.dispose)
        await asyncio.to_thread(seed_quality_history, self.engine)
        self.worker = WorkerProcess(self.settings, self.base / "worker.log")
        self.stack.callback(self.worker.stop)
        await self.worker.start()
        await self.worker.ready()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._writing is not None:
            self._writing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writing
        await self.stack.aclose()

    def plan(self) -> NotificationPlan:
        """What the detector's opener passes (worker.notification_plan), verifying sooner."""
        escalation = load_escalation(self.settings.escalation_policy_file)
        plan = worker.notification_plan(self.settings, escalation)
        return replace(plan, runbook=replace(plan.runbook, verify_after_seconds=VERIFY_SECONDS))

    async def crash(self, meanwhile: Callable[[], object] | None = None) -> None:
        """SIGKILL the worker now, and start a new one."""
        killed = datetime.now(UTC)
        killed_at, polling_at = await self.worker.restart(meanwhile)
        self.crashes.append(Crash(killed, killed + timedelta(seconds=polling_at - killed_at)))

    def write_good_scores(self) -> None:
        """From now on the pinned snapshot answers, and scores well."""

        async def write() -> None:
            while True:
                now = datetime.now(UTC)
                batch = [
                    ScoreRecord(f"good-{uuid.uuid4().hex}", now, "eval", 0.95, model=GOOD_SNAPSHOT)
                    for _ in range(10)
                ]
                await asyncio.to_thread(write_scores, self.engine, batch)
                await asyncio.sleep(0.2)

        self._writing = asyncio.create_task(write())

    @contextlib.contextmanager
    def store_locked(self) -> Iterator[None]:
        """Hold the stores' write lock: a control being set waits for it, in flight."""
        database = make_url(self.settings.database_url).database
        assert database is not None
        connection = sqlite3.connect(database, isolation_level=None, timeout=30)
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            connection.rollback()
            connection.close()

    async def activity_running(self, workflow_id: str, activity: str) -> bool:
        try:
            described = await self.client.get_workflow_handle(workflow_id).describe()
        except RPCError:
            return False
        started = PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
        return any(
            pending.activity_type.name == activity and pending.state == started
            for pending in described.raw_description.pending_activities
        )

    async def play(self) -> Outcome:
        step = self.step
        if step == "first page in flight":
            self.pagerduty.delay_next("trigger", ANSWER_DELAY)
        breach = Breach(
            Trigger.QUALITY_DEGRADATION,
            "global",
            Severity.SEV2,
            datetime.now(UTC),
            "quality 0.41 < 0.5 (40 scores in 300s)",
            {"quality_mean": 0.41, "quality_scores": 40.0},
        )
        handle = await open_incident(self.client, self.settings, self.plan(), self.engine, breach)
        self.incident_id = handle.id
        if step == "opened":
            await self.crash()
        if step == "first page in flight":
            await eventually(lambda: self.pagerduty.events("trigger"), timeout=30)
            await self.crash()

        async def state() -> IncidentState:
            return await handle.query(IncidentWorkflow.state)

        def has(kind: str) -> Callable[[], Any]:
            async def probe() -> bool:
                return any(entry.kind == kind for entry in (await state()).timeline)

            return probe

        # Nobody acknowledged at L1 within 6 s: L2, which opens the ticket.
        async def at_l2_with_ticket() -> bool:
            current = await state()
            return current.level == 2 and current.jira_issue is not None

        await eventually(at_l2_with_ticket, timeout=90)
        ticket = (await state()).jira_issue
        posted, commented = self.told(ticket)
        if step == REPLY_IN_FLIGHT:
            self.slack.delay_next("chat.postMessage", ANSWER_DELAY)
            self.jira.delay_next("comment", ANSWER_DELAY)
        with contextlib.ExitStack() as held:
            if step == "runbook applying controls":
                held.enter_context(self.store_locked())
            ack = ActionRequest(RESPONDER, "slack", note="looking")
            await handle.execute_update(IncidentWorkflow.acknowledge, ack)
            if step == "acknowledged":
                await self.crash()
            if step == REPLY_IN_FLIGHT:
                # The acknowledgement's thread reply and ticket comment are held back.
                await eventually(
                    lambda: all(
                        now > then
                        for now, then in zip(self.told(ticket), (posted, commented), strict=True)
                    ),
                    timeout=30,
                )
                await self.crash()
            if step == "runbook applying controls":
                # The pin waits for the stores' lock: the worker dies with it in flight.
                runbook = await eventually(
                    lambda: self._running_runbook(handle), timeout=60, interval=0.05
                )
                await eventually(
                    lambda: self.activity_running(runbook, "controls.set"),
                    timeout=60,
                    interval=0.05,
                )
                await self.crash(meanwhile=held.close)
        await eventually(has("mitigation"), timeout=90)
        self.write_good_scores()
        if step == "verifying":
            await self.crash()
        await eventually(has("proposed"), timeout=150)
        with contextlib.ExitStack() as held:
            if step == "resolving":
                held.enter_context(self.store_locked())
            resolve = ActionRequest(RESPONDER, "slack", note="scores are back")
            await handle.execute_update(IncidentWorkflow.resolve, resolve)
            if step == "resolving":
                # Reverting the pin waits for the stores' lock: the worker dies with it (and
                # whatever else of the resolve is still under way) in flight.
                await eventually(
                    lambda: self.activity_running(handle.id, "controls.revert"),
                    timeout=30,
                    interval=0.05,
                )
                await self.crash(meanwhile=held.close)
        try:
            result = await asyncio.wait_for(handle.result(), timeout=120)
        except TimeoutError:
            current = await state()
            return await self.measure(handle, current.timeline, [f"not over: {current.status}"])
        lost = [] if result.status == IncidentStatus.RESOLVED else [f"ended {result.status}"]
        return await self.measure(handle, result.timeline, lost)

    def told(self, ticket: str | None) -> tuple[int, int]:
        """Slack chat.postMessage calls, and comments posted on `ticket`, so far."""
        comments = self.jira.received(f"/rest/api/2/issue/{ticket}/comment")
        return (
            len(self.slack.calls("chat.postMessage")),
            sum(request.method == "POST" for request in comments),
        )

    async def _running_runbook(self, handle: WorkflowHandle[Any, Any]) -> str | None:
        state: IncidentState = await handle.query(IncidentWorkflow.state)
        if state.runbook_phase == "running" and state.runbook_runs >= 2:
            return f"{state.incident_id}-runbook-{state.runbook_runs}"
        return None

    async def measure(
        self, handle: WorkflowHandle[Any, Any], timeline: list[TimelineEntry], lost: list[str]
    ) -> Outcome:
        outcome = Outcome(self.step, self.incident_id, self.crashes, lost=list(lost))
        kinds = {entry.kind for entry in timeline}
        outcome.lost += [
            f"no {kind} on the timeline" for kind in EXPECTED_KINDS if kind not in kinds
        ]
        outcome.lost += [
            f"{entry.kind}: {entry.text}"
            for entry in timeline
            if entry.kind in ("notification_failed", "runbook_failed", "not_paged")
        ]
        paged = {entry.text for entry in timeline if entry.kind == "paged"}
        outcome.lost += [
            f"never paged at {level}"
            for level in ("L1", "L2")
            if f"PagerDuty triggered at {level}" not in paged
        ]
        vendor_counts(outcome, timeline, self.slack, self.pagerduty, self.jira, ("L1", "L2"))

        # The runbook's one control, the pin: set once (a retry lands on the same key),
        # reverted on resolve.
        now = datetime.now(UTC)
        mine = [c for c in controls.listed(self.engine, now, True) if c.incident_id == handle.id]
        if [control.kind for control in mine] != ["pin"]:
            outcome.lost.append(f"controls set: {[control.description for control in mine]}")
        if controls.active(self.engine, now, handle.id):
            outcome.lost.append("the runbook's controls are still in force")

        history = await handle.fetch_history()
        outcome.timers = self.timers(*escalation_timers_acted(history.events))
        return outcome

    def timers(self, clock_started: datetime, acted: list[tuple[str, datetime]]) -> list[Timer]:
        """Each escalation deadline, from when the one before it was acted on: L1's acknowledge
        deadline, then L2's resolve deadline, then each reminder interval."""
        found = []
        due = clock_started + timedelta(seconds=L1_ACK_SECONDS)
        for summary, began in acted:
            what = summary.split(" by ")[0]
            found.append(Timer(what, due, began, allowed_delay(due, self.crashes)))
            wait = L2_RESOLVE_SECONDS if what == "L1: acknowledged" else REMIND_EVERY_SECONDS
            due = began + timedelta(seconds=wait)
        return found


def seed_quality_history(engine: Engine) -> None:
    """gpt-4.1 answered well as its April snapshot until three hours ago; the September one
    answering for the last five minutes scores 0.41: what the runbook diagnoses and pins."""
    now = datetime.now(UTC)
    calls, scores = [], []
    for i in range(40):
        for snapshot, ts, score in (
            (GOOD_SNAPSHOT, now - timedelta(hours=3, seconds=i * 30), 0.82 + (i % 9) / 100),
            (BAD_SNAPSHOT, now - timedelta(seconds=300 - i * 7), 0.41),
        ):
            call = CallRecord(
                ts=ts,
                model=MODEL,
                response_model=snapshot,
                status="success",
                latency_ms=800.0,
                feature="chat",
                input_tokens=500,
                output_tokens=200,
            )
            calls.append(call)
            scores.append(ScoreRecord(call.call_id, ts, "eval", score, model=snapshot))
    write_calls(engine, calls)
    write_scores(engine, scores)


# --- the scenarios, side by side -------------------------------------------------------------


def _selected(request: pytest.FixtureRequest, module: ModuleType) -> list[str]:
    """The scenarios the session's tests in this module ask for."""
    wanted = []
    for item in request.session.items:
        if getattr(item, "module", None) is not module:
            continue
        callspec = getattr(item, "callspec", None)
        wanted.append(str(callspec.params["step"]) if callspec else REPLY_IN_FLIGHT)
    return wanted


async def _run(step: str, client: Client, target_host: str, base: Path) -> Outcome:
    started = time.monotonic()
    async with Scenario(step, client, target_host, base) as scenario:
        outcome = await scenario.play()
    print(f"\n[{time.monotonic() - started:.0f}s] {outcome.summary()}")
    return outcome


@pytest.fixture(scope="module")
async def campaign(
    request: pytest.FixtureRequest,
    dev_env: WorkflowEnvironment,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[dict[str, asyncio.Task[Outcome]]]:
    """Every selected scenario, started at once; each test awaits its own."""
    target_host = dev_env.client.service_client.config.target_host
    base = tmp_path_factory.mktemp("worker-kill")
    tasks = {
        step: asyncio.create_task(
            _run(step, dev_env.client, target_host, base / re.sub(r"\W+", "-", step))
        )
        for step in _selected(request, request.module)
    }
    yield tasks
    for task in tasks.values():
        task.cancel()
    await asyncio.gather(*tasks.values(), return_exceptions=True)


async def _outcome(campaign: dict[str, asyncio.Task[Outcome]], step: str) -> Outcome:
    try:
        return await campaign[step]
    except BaseException:
        ledger.record(f"worker SIGKILL at: {step}", runs=1, incidents_lost=1)
        raise


@pytest.mark.parametrize("step", STEPS)
async def test_a_worker_killed_at_each_step_loses_and_repeats_nothing(
    step: str, campaign: dict[str, asyncio.Task[Outcome]]
) -> None:
    outcome = await _outcome(campaign, step)
    ledger.record(
        f"worker SIGKILL at: {step}",
        runs=1,
        incidents_lost=int(bool(outcome.lost)),
        duplicates=outcome.duplicates,
        worst_timer_delay_s=outcome.worst_timer_delay_s,
        records_lost=0,  # no call records go through these faults
    )
    assert outcome.lost == [], outcome.summary()
    assert outcome.slack_posts == 1, outcome.summary()
    keys = {outcome.incident_id, f"{outcome.incident_id}/L2"}
    assert set(outcome.pagerduty_triggers) == keys, outcome.summary()
    assert outcome.pagerduty_reopened == 0, outcome.summary()
    assert (outcome.jira_tickets, outcome.jira_creates) == (1, 1), outcome.summary()
    assert outcome.postmortems == 1, outcome.summary()
    assert outcome.duplicates == 0, outcome.summary()
    late = [timer for timer in outcome.timers if timer.late_s > timer.allowed_s]
    assert outcome.timers, outcome.summary()
    assert not late, outcome.summary()


async def test_a_thread_reply_and_a_ticket_comment_in_flight_are_not_told_twice(
    campaign: dict[str, asyncio.Task[Outcome]],
) -> None:
    outcome = await _outcome(campaign, REPLY_IN_FLIGHT)
    twice = outcome.duplicate_replies + outcome.duplicate_comments
    ledger.record(
        f"worker SIGKILL at: {REPLY_IN_FLIGHT} (duplicates: replies and comments)",
        runs=1,
        incidents_lost=int(bool(outcome.lost)),
        duplicates=outcome.duplicates + twice,
        worst_timer_delay_s=outcome.worst_timer_delay_s,
        records_lost=0,  # no call records go through these faults
    )
    assert outcome.lost == [], outcome.summary()
    assert outcome.duplicates == 0, outcome.summary()
    assert (outcome.duplicate_replies, outcome.duplicate_comments) == (0, 0), outcome.summary()
