"""Record the workflow histories the replay tests keep: `uv run python -m tests.histories.record`.

Each scenario drives one path of a workflow for real (the worker as worker.py wires it, the
vendor fakes over HTTP, the runbook test kit's snapshots for diagnosis, real control and store
activities) and saves every run it made, children included, as
`tests/histories/<scenario>.<run>@<commit>.json`. Files are never overwritten: a history
recorded on an older commit stays, so CI replays every shape an open incident can have.

    uv run python -m tests.histories.record                 # every scenario
    uv run python -m tests.histories.record acknowledged    # some of them
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from sqlalchemy import Engine
from temporalio import activity
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.client import Client, WorkflowHandle
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

import worker
from activities.diagnosis import ModelLatency
from activities.incidents import IncidentActivities, OpenIncidentRequest
from config import Settings
from detectors.detector import DetectorWorkflow
from domain import search_attributes as sa
from domain.incident import (
    ActionRequest,
    ApprovalDecision,
    Breach,
    IncidentInput,
    IncidentState,
    Severity,
    SnoozeRequest,
    Trigger,
)
from domain.workflow_names import detector_workflow_id
from runbooks.testing import (
    CanaryJudge,
    Judge,
    RunbookKit,
    Snapshot,
    canary_verdict,
    never_recovers,
    recovered_if,
    too_little_traffic,
)
from stores.engine import create_schema, make_engine
from stores.llm_calls import CallRecord
from stores.writer import write_calls
from tests.fakes.jira import FakeJira
from tests.fakes.pagerduty import FakePagerDuty
from tests.fakes.slack import FakeSlack
from tests.fakes.webhook import FakeWebhookReceiver
from tests.helpers import eventually
from tests.test_email import Mailbox, serve
from tests.test_runbooks import RATE_LIMITED, feature, quality
from workflows.incident import IncidentWorkflow
from workflows.retention import RetentionInput, RetentionWorkflow

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
BIN = Path(sys.executable).parent

# gpt-4.1 moved to a worse snapshot three hours ago.
MODEL_UPDATE = Snapshot(
    quality=[
        quality("gpt-4.1", "gpt-4.1-2025-04-14", 0.86, hours_ago=3),
        quality("gpt-4.1", "gpt-4.1-2025-09-01", 0.41, hours_ago=0),
    ],
    features=[feature("chat")],
)
BACKOFF_HELPS = recovered_if(lambda controls: any(c.kind == "backoff" for c in controls))
PIN_HELPS = recovered_if(lambda controls: any(c.kind == "pin" for c in controls))
ONCALL = ActionRequest("U024BE7LH", "slack")
EMAIL_FROM = "pagerloop@example.com"
EMAIL_TO = "oncall@example.com"
WEBHOOK_SECRET = "record-webhook-secret"


def commit() -> str:
    """The commit the workflow code comes from, marked when that code has uncommitted changes."""

    def git(*args: str) -> str:
        # From the repository's root: the paths below are relative to git's working directory.
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT).stdout

    changed = git(
        "status", "--porcelain", "--", "workflows", "runbooks", "detectors", "domain"
    ).strip()
    return git("rev-parse", "--short=7", "HEAD").strip() + ("-dirty" if changed else "")


def activity_name(fn: Callable[..., Any]) -> str:
    definition = activity._Definition.from_callable(fn)
    assert definition is not None
    assert definition.name is not None
    return definition.name


@dataclass
class Stage:
    """One scenario's world: a Temporal server, the stores, the fakes and the settings."""

    env: WorkflowEnvironment
    settings: Settings
    engine: Engine
    slack: FakeSlack
    started: list[str] = field(default_factory=list)

    @property
    def client(self) -> Client:
        return self.env.client

    @contextlib.asynccontextmanager
    async def worker(self, kit: RunbookKit | None = None) -> AsyncIterator[None]:
        """The worker as worker.py builds it; the kit's snapshot answers the diagnosis."""
        activities = worker.build_activities(self.settings, self.client, self.engine)
        if kit is not None:
            replaced = {activity_name(fn) for fn in kit.activities()}
            activities = [fn for fn in activities if activity_name(fn) not in replaced]
            activities += kit.activities()
        async with Worker(
            self.client,
            task_queue=self.settings.task_queue,
            workflows=worker.WORKFLOWS,
            activities=activities,
        ):
            yield

    @contextlib.asynccontextmanager
    async def incident(
        self,
        trigger: Trigger,
        severity: Severity,
        snapshot: Snapshot | None = None,
        after: Judge = never_recovers,
        updates_per_run: int | None = None,
        canary: CanaryJudge = too_little_traffic,
    ) -> AsyncIterator[Incident]:
        """An incident opened as the detector opens one, with a worker until the block ends."""
        kit = RunbookKit(self.client, self.engine, snapshot or Snapshot(), after, canary)
        incident_id = f"incident-{trigger}-global-{uuid.uuid4().hex[:8]}"
        kit.incident_id = incident_id
        plan = worker.notification_plan(
            self.settings, worker.load_escalation(self.settings.escalation_policy_file)
        )
        opener = IncidentActivities(self.client, self.settings.task_queue, plan, self.engine)
        async with self.worker(kit):
            breach = Breach(
                trigger=trigger,
                scope="global",
                severity=severity,
                observed_at=datetime.now(UTC),
                summary=f"synthetic {trigger}",
                metrics={"calls": 1000},
            )
            if updates_per_run is None:
                await opener.open_or_update(
                    [OpenIncidentRequest(breach, proposed_id=incident_id, known_id=incident_id)]
                )
            else:  # what the opener starts, with a short run before continuing as new
                await self.client.start_workflow(
                    IncidentWorkflow.run,
                    IncidentInput(
                        incident_id,
                        trigger,
                        "global",
                        severity,
                        breach.observed_at,
                        notify=plan,
                        updates_per_run=updates_per_run,
                    ),
                    id=incident_id,
                    task_queue=self.settings.task_queue,
                )
            self.started.append(incident_id)
            handle = self.client.get_workflow_handle_for(IncidentWorkflow.run, incident_id)
            yield Incident(handle, self.env)
            await handle.result()

    async def save(self, scenario: str, into: Path) -> list[Path]:
        """Every run of every workflow the scenario started, children included."""
        saved = []
        for workflow_id in self.started:
            runs = await all_runs(self.client, workflow_id)
            # Several workflows: each named by its kind (detector, or the incident's trigger).
            kind = "" if len(self.started) == 1 else f".{workflow_id.split('-')[0]}"
            if kind == ".incident":
                kind = f".{workflow_id.split('-')[1]}"
            for number, handle in enumerate(runs, start=1):
                history = await handle.fetch_history()
                label = kind + ("" if len(runs) == 1 else f".run{number}")
                saved.append(write(into, f"{scenario}{label}", history.to_json()))
                for child in children(history.to_json_dict()):
                    child_history = await self.client.get_workflow_handle(child).fetch_history()
                    kind = child.rsplit("-", 2)[-2:]
                    saved.append(write(into, f"{scenario}{label}.{'-'.join(kind)}",
                                       child_history.to_json()))  # fmt: skip
        return saved


@dataclass
class Incident:
    handle: WorkflowHandle[IncidentWorkflow, Any]
    env: WorkflowEnvironment

    async def state(self) -> IncidentState:
        return await self.handle.query(IncidentWorkflow.state)

    async def reaches(self, kind: str, timeout: float = 30) -> None:
        async def seen() -> bool:
            return any(entry.kind == kind for entry in (await self.state()).timeline)

        await eventually(seen, timeout=timeout)

    async def sleep(self, minutes: float) -> None:
        await self.env.sleep(timedelta(minutes=minutes))

    async def update(self, method: Any, request: Any) -> None:
        await self.handle.execute_update(method, request)

    async def approve(self, approved: bool = True) -> None:
        """Answer the runbook's ask waiting now, as the Slack button does."""

        async def asked() -> bool:
            return bool((await self.state()).pending_approvals())

        await eventually(asked, timeout=30)
        [ask] = (await self.state()).pending_approvals()
        decision = ApprovalDecision(ask.approval_id, approved, ONCALL.user, channel="slack")
        await self.update(IncidentWorkflow.decide_approval, decision)


def write(into: Path, name: str, history: str) -> Path:
    path = into / f"{name}@{commit()}.json"
    if path.exists():
        raise SystemExit(f"{path} exists: histories are kept, not re-recorded")
    path.write_text(history + "\n")
    return path


def children(history: dict[str, Any]) -> Iterator[str]:
    for event in history["events"]:
        started = event.get("childWorkflowExecutionStartedEventAttributes")
        if started:
            yield started["workflowExecution"]["workflowId"]


async def all_runs(client: Client, workflow_id: str) -> list[WorkflowHandle[Any, Any]]:
    """The runs of a workflow id, first to last: every execution under it (a reopened incident
    is a new one), where the server lists them; else the last one's continue-as-new chain."""
    try:
        listed = [e async for e in client.list_workflows(f"WorkflowId = '{workflow_id}'")]
    except RPCError:  # the time-skipping server lists nothing by id
        listed = []
    if len(listed) > 1:
        listed.sort(key=lambda execution: execution.start_time)
        return [client.get_workflow_handle(workflow_id, run_id=e.run_id) for e in listed]
    first = client.get_workflow_handle(workflow_id)
    run_id = (await first.describe()).raw_description.workflow_execution_info
    handle = client.get_workflow_handle(workflow_id, run_id=run_id.first_run_id or None)
    runs = [handle]
    while True:
        history = await runs[-1].fetch_history()
        last = history.events[-1]
        if not last.HasField("workflow_execution_continued_as_new_event_attributes"):
            return runs
        new_run = last.workflow_execution_continued_as_new_event_attributes.new_execution_run_id
        runs.append(client.get_workflow_handle(workflow_id, run_id=new_run))


# --- the scenarios -----------------------------------------------------------------------------


async def acknowledged(stage: Stage) -> None:
    """Diagnosed, acknowledged from Slack, mitigated (pinned), verified, resolved by a person."""
    async with stage.incident(
        Trigger.QUALITY_DEGRADATION, Severity.SEV2, MODEL_UPDATE, PIN_HELPS
    ) as incident:
        await incident.reaches("diagnosis")
        await incident.update(IncidentWorkflow.acknowledge, ONCALL)
        await incident.reaches("mitigation")
        await incident.sleep(4)
        await incident.reaches("proposed")
        await incident.update(IncidentWorkflow.add_note, ActionRequest("U024BE7LH", "slack", "ok"))
        await incident.update(IncidentWorkflow.resolve, ONCALL)


async def escalated_to_l3_and_reminded(stage: Stage) -> None:
    """Nobody answers: L1 -> L2 -> L3 on the ack deadlines, a reminder, a snooze, a resolve."""
    async with stage.incident(Trigger.ERROR_RATE, Severity.SEV1) as incident:
        await incident.reaches("paged")
        await incident.sleep(6)
        await incident.reaches("escalated")
        await incident.sleep(11)
        await eventually(lambda: _level(incident, 3))
        await incident.sleep(16)
        await incident.reaches("reminder")
        await incident.update(IncidentWorkflow.snooze, SnoozeRequest("U024BE7LH", 30, "slack"))
        await incident.update(IncidentWorkflow.acknowledge, ONCALL)
        await incident.update(IncidentWorkflow.resolve, ONCALL)


async def _level(incident: Incident, level: int) -> bool:
    return (await incident.state()).level == level


async def runbook_controls_kept_alive(stage: Stage) -> None:
    """Controls in force (verified, SEV2 left open for a person) across two keep-alive hours."""
    async with stage.incident(
        Trigger.RATE_LIMIT_EXHAUSTION, Severity.SEV2, RATE_LIMITED, BACKOFF_HELPS
    ) as incident:
        await incident.reaches("mitigation")
        await incident.sleep(4)
        await incident.reaches("proposed")
        await incident.update(IncidentWorkflow.acknowledge, ONCALL)
        await incident.sleep(125)
        await incident.update(IncidentWorkflow.resolve, ONCALL)


async def rolled_back_and_escalated(stage: Stage) -> None:
    """The mitigation does not help: rolled back, escalated to L2, acknowledged, resolved."""
    async with stage.incident(
        Trigger.RATE_LIMIT_EXHAUSTION, Severity.SEV2, RATE_LIMITED, never_recovers
    ) as incident:
        await incident.reaches("mitigation")
        await incident.sleep(4)
        await incident.reaches("escalated")
        await incident.update(IncidentWorkflow.acknowledge, ONCALL)
        await incident.update(IncidentWorkflow.resolve, ONCALL)


async def auto_resolved(stage: Stage) -> None:
    """SEV3 verified by its runbook, then quiet for 15 minutes: resolved by pagerloop."""
    async with stage.incident(
        Trigger.RATE_LIMIT_EXHAUSTION, Severity.SEV3, RATE_LIMITED, BACKOFF_HELPS
    ) as incident:
        await incident.reaches("mitigation")
        await incident.sleep(4)
        await incident.reaches("verified")
        await incident.sleep(16)


async def continued_as_new(stage: Stage) -> None:
    """Two updates per run: the acknowledgement ends a run, the next one mitigates and resolves."""
    async with stage.incident(
        Trigger.QUALITY_DEGRADATION, Severity.SEV2, MODEL_UPDATE, never_recovers, updates_per_run=2
    ) as incident:
        await incident.reaches("diagnosis")
        await incident.update(IncidentWorkflow.add_note, ActionRequest("U024BE7LH", "cli", "hm"))
        await incident.update(IncidentWorkflow.acknowledge, ONCALL)
        await incident.reaches("mitigation")
        await incident.sleep(4)
        await incident.reaches("rolled_back")
        await incident.update(IncidentWorkflow.resolve, ONCALL)


async def handed_over(stage: Stage) -> None:
    """Slack down while notes end two runs: each hands its unsent Slack work to the next,
    which sends it merged once Slack is back."""
    async with stage.incident(
        Trigger.RATE_LIMIT_EXHAUSTION, Severity.SEV2, RATE_LIMITED, BACKOFF_HELPS, updates_per_run=4
    ) as incident:
        await incident.reaches("mitigation")
        stage.slack.unavailable = True
        for n in range(8):
            await incident.update(IncidentWorkflow.add_note, ActionRequest("U1", "cli", f"#{n}"))
            await incident.sleep(1)
        stage.slack.unavailable = False
        await incident.sleep(10)
        await incident.update(IncidentWorkflow.resolve, ONCALL)


async def emailed_and_alerted(stage: Stage) -> None:
    """SEV4 with no runbook, by email (a real SMTP server in-process) and an Alertmanager
    webhook: opened (email, firing alert at L1), escalated to L2 when its day to acknowledge
    passes (a second firing alert), resolved by a person (email, resolved alert)."""
    mailbox = Mailbox()
    with (
        contextlib.contextmanager(serve)(mailbox) as smtp_port,
        FakeWebhookReceiver(secret=WEBHOOK_SECRET) as receiver,
    ):
        stage.settings = stage.settings.model_copy(
            update={
                "smtp_host": "127.0.0.1",
                "smtp_port": smtp_port,
                "smtp_starttls": False,  # the plain test server offers no STARTTLS
                "email_from": EMAIL_FROM,
                "email_to": [EMAIL_TO],
                "webhook_urls": [SecretStr(receiver.alerts_url)],
                "webhook_secret": SecretStr(WEBHOOK_SECRET),
                "runbooks_enabled": False,
            }
        )

        def emails() -> list[str | None]:
            return [m.header("X-Pagerloop-Event") for m in list(mailbox.received)]

        def alerts() -> list[tuple[str, str]]:
            return [
                (d.payload["status"], d.payload["commonLabels"].get("level", ""))
                for d in receiver.deliveries()
            ]

        async with stage.incident(Trigger.COST_SPIKE, Severity.SEV4) as incident:
            await eventually(lambda: emails() == ["opened"] and alerts() == [("firing", "L1")])
            await incident.sleep(24 * 60 + 1)  # L1 has a day to acknowledge
            await eventually(lambda: _level(incident, 2))
            await eventually(lambda: alerts() == [("firing", "L1"), ("firing", "L2")])
            await incident.update(IncidentWorkflow.resolve, ONCALL)
        sent = (emails(), [status for status, _ in alerts()])
        if sent != (["opened", "resolved"], ["firing", "firing", "resolved"]):
            raise AssertionError(f"emails and alerts sent: {sent}")


async def retention(stage: Stage) -> None:
    """One hourly purge."""
    workflow_id = f"retention-{uuid.uuid4().hex[:8]}"
    async with stage.worker():
        await stage.client.execute_workflow(
            RetentionWorkflow.run,
            RetentionInput(retention_days=30, rollup_retention_days=90),
            id=workflow_id,
            task_queue=stage.settings.task_queue,
        )
    stage.started.append(workflow_id)


async def detector(stage: Stage) -> None:
    """On the dev server, in real time: quiet evaluations, a breach that opens an incident,
    the incident resolved, the detector told, quiet again."""
    settings = stage.settings
    async with worker.build_worker(settings, stage.client, stage.engine):
        await worker.ensure_detector(stage.client, settings)
        handle = stage.client.get_workflow_handle_for(
            DetectorWorkflow.run, detector_workflow_id(settings.task_queue)
        )

        async def evaluations() -> int:
            return (await handle.query(DetectorWorkflow.status)).evaluations

        await eventually(lambda: _at_least(evaluations, 2))
        now = datetime.now(UTC)
        failed = [
            CallRecord(ts=now, model="gpt-4.1", status="error", latency_ms=800, error_type="api")
            for _ in range(60)
        ]
        write_calls(stage.engine, failed)

        async def opened() -> str:
            query = f"WorkflowType = 'IncidentWorkflow' AND TaskQueue = '{settings.task_queue}'"
            return next(iter([w.id async for w in stage.client.list_workflows(query)]), "")

        incident_id = await eventually(opened, timeout=30)
        incident = stage.client.get_workflow_handle_for(IncidentWorkflow.run, incident_id)
        await incident.execute_update(IncidentWorkflow.resolve, ActionRequest("pytest", "cli"))
        await incident.result()
        done = await evaluations()
        await eventually(lambda: _at_least(evaluations, done + 2))
        await handle.terminate("recorded")
        stage.started.append(handle.id)


async def reopened(stage: Stage) -> None:
    """On the dev server, in real time: failed calls open an error_rate incident; resolved
    from Slack while they still fail, the detector's next evaluation reopens it (a new run of
    the same id, within the rule's cooldown); the detector paused, it is resolved again."""
    settings = stage.settings.model_copy(update={"runbooks_enabled": False})
    async with worker.build_worker(settings, stage.client, stage.engine):
        await worker.ensure_detector(stage.client, settings)
        now = datetime.now(UTC)
        write_calls(stage.engine, [
            CallRecord(ts=now, model="gpt-4.1", status="error", latency_ms=800, error_type="api")
            for _ in range(60)
        ])  # fmt: skip

        async def opened() -> str:
            query = f"WorkflowType = 'IncidentWorkflow' AND TaskQueue = '{settings.task_queue}'"
            return next(iter([w.id async for w in stage.client.list_workflows(query)]), "")

        incident_id = await eventually(opened, timeout=30)
        incident = stage.client.get_workflow_handle_for(IncidentWorkflow.run, incident_id)
        await incident.execute_update(IncidentWorkflow.resolve, ONCALL)
        await incident.result()

        async def back() -> bool:
            state = await incident.query(IncidentWorkflow.state)
            return state.reopened == 1 and state.slack_message is not None

        await eventually(back, timeout=30)
        detector = stage.client.get_workflow_handle(detector_workflow_id(settings.task_queue))
        await detector.signal(DetectorWorkflow.pause)
        await incident.execute_update(IncidentWorkflow.resolve, ActionRequest("pytest", "cli"))
        await incident.result()
        await detector.terminate("recorded")
        stage.started += [detector.id, incident_id]


async def correlated(stage: Stage) -> None:
    """On the dev server, in real time: failed calls open an error_rate incident; then an
    outage's 5xx open api_outage, which takes the error_rate incident in (its Slack message,
    its page); the outage resolved by a person."""
    settings = stage.settings.model_copy(update={"runbooks_enabled": False})
    async with worker.build_worker(settings, stage.client, stage.engine):
        await worker.ensure_detector(stage.client, settings)

        async def incident(trigger: Trigger) -> str:
            query = (
                f"WorkflowType = 'IncidentWorkflow' AND TaskQueue = '{settings.task_queue}' "
                f"AND IncidentTrigger = '{trigger}'"
            )
            return next(iter([w.id async for w in stage.client.list_workflows(query)]), "")

        def calls(status: str, http_status: int, n: int) -> None:
            now = datetime.now(UTC)
            write_calls(stage.engine, [
                CallRecord(ts=now, model="gpt-4.1", status=status, latency_ms=800,
                           error_type="api", http_status=http_status)
                for _ in range(n)
            ])  # fmt: skip

        calls("error", 400, 60)
        errors = await eventually(lambda: incident(Trigger.ERROR_RATE), timeout=30)
        calls("server_error", 503, 200)
        outage = await eventually(lambda: incident(Trigger.API_OUTAGE), timeout=30)
        merged = await stage.client.get_workflow_handle_for(IncidentWorkflow.run, errors).result()
        if merged.timeline[-1].kind != "merged":
            raise AssertionError(f"{errors} not merged: {merged.timeline[-1]}")
        handle = stage.client.get_workflow_handle_for(IncidentWorkflow.run, outage)
        await handle.execute_update(IncidentWorkflow.resolve, ActionRequest("pytest", "cli"))
        await handle.result()
        detector = stage.client.get_workflow_handle(detector_workflow_id(settings.task_queue))
        await detector.terminate("recorded")
        stage.started += [detector.id, errors, outage]


SPENDING = Snapshot(
    features=[
        feature("summaries", cost=41.0, share=0.82, concurrency=8.0),
    ]
)
REROUTE_HELPS = recovered_if(lambda controls: any(c.kind == "reroute" for c in controls))


async def cost_canary_approved(stage: Stage) -> None:
    """Cost: cache, a canary promoted once approved from Slack, verified, resolved by a person,
    the report written and posted."""
    async with stage.incident(
        Trigger.COST_SPIKE, Severity.SEV2, SPENDING, REROUTE_HELPS, canary=canary_verdict("promote")
    ) as incident:
        await incident.reaches("canary")
        await incident.sleep(4)
        await incident.approve()
        await incident.sleep(4)
        await incident.reaches("proposed")
        await incident.update(IncidentWorkflow.resolve, ONCALL)


async def latency_canary_reverted(stage: Stage) -> None:
    """Latency: the canary is worse at the look halfway, reverted; the incident escalates on
    its ack deadline, is acknowledged and resolved."""
    slow = Snapshot(latency=[ModelLatency("gpt-4.1", 500, 6100.0, 16800.0, 9000.0, {})])
    async with stage.incident(
        Trigger.ELEVATED_LATENCY, Severity.SEV2, slow, canary=canary_verdict("revert")
    ) as incident:
        await incident.reaches("canary")
        await incident.sleep(12)  # past L1's 10-minute ack deadline
        await incident.reaches("escalated")
        await incident.update(IncidentWorkflow.acknowledge, ONCALL)
        await incident.update(IncidentWorkflow.resolve, ONCALL)


async def _at_least(count: Callable[[], Awaitable[int]], n: int) -> bool:
    return await count() >= n


ON_TIME_SKIPPING: dict[str, Callable[[Stage], Awaitable[None]]] = {
    "acknowledged": acknowledged,
    "escalated_to_l3_and_reminded": escalated_to_l3_and_reminded,
    "runbook_controls_kept_alive": runbook_controls_kept_alive,
    "rolled_back_and_escalated": rolled_back_and_escalated,
    "auto_resolved": auto_resolved,
    "continued_as_new": continued_as_new,
    "cost_canary_approved": cost_canary_approved,
    "latency_canary_reverted": latency_canary_reverted,
    "handed_over": handed_over,
    "emailed_and_alerted": emailed_and_alerted,
    "retention": retention,
}
ON_DEV_SERVER = {"detector": detector, "correlated": correlated, "reopened": reopened}


# --- the ground they run on --------------------------------------------------------------------


def settings_for(workdir: Path, slack: FakeSlack, pd: FakePagerDuty, jira: FakeJira) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=f"sqlite:///{workdir / 'stores.db'}",
        task_queue=f"record-{uuid.uuid4().hex[:8]}",
        detector_interval_seconds=1,
        slack_bot_token="xoxb-record",
        slack_signing_secret="record-signing-secret",
        slack_api_url=slack.api_url,
        pagerduty_routing_key="R" * 32,
        pagerduty_events_url=pd.url,
        jira_url=jira.url,
        jira_token="jira-record-token",
    )


async def time_skipping() -> WorkflowEnvironment:
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=str(BIN / "temporal-test-server"),
        data_converter=pydantic_data_converter,
    )
    await env.client.operator_service.add_search_attributes(
        AddSearchAttributesRequest(
            namespace=env.client.namespace,
            search_attributes={
                key.name: IndexedValueType.ValueType(key.indexed_value_type.value) for key in sa.ALL
            },
        )
    )
    return env


async def dev_server() -> WorkflowEnvironment:
    return await WorkflowEnvironment.start_local(
        dev_server_existing_path=str(BIN / "temporal"),
        data_converter=pydantic_data_converter,
        search_attributes=list(sa.ALL),
        dev_server_extra_args=["--ui-disable-news-fetch", "--headless"],
    )


async def record(names: list[str], into: Path = HERE) -> list[Path]:
    saved: list[Path] = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        FakeSlack() as slack,
        FakePagerDuty() as pd,
        FakeJira() as jira,
    ):
        for kind, scenarios, start in (
            ("time-skipping", ON_TIME_SKIPPING, time_skipping),
            ("dev", ON_DEV_SERVER, dev_server),
        ):
            chosen = [name for name in names if name in scenarios]
            if not chosen:
                continue
            env = await start()
            try:
                for name in chosen:
                    workdir = Path(tmp) / name
                    workdir.mkdir()
                    settings = settings_for(workdir, slack, pd, jira)
                    engine = make_engine(settings.database_url)
                    create_schema(engine)
                    stage = Stage(env, settings, engine, slack)
                    await scenarios[name](stage)
                    saved += await stage.save(name, into)
                    engine.dispose()
                    print(f"recorded {name} ({kind})", flush=True)
            finally:
                await env.shutdown()
    return saved


def main() -> None:
    everything = [*ON_TIME_SKIPPING, *ON_DEV_SERVER]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("scenarios", nargs="*", help=f"some of: {', '.join(everything)}")
    names = parser.parse_args().scenarios or everything
    if unknown := set(names) - set(everything):
        parser.error(f"no scenario {', '.join(sorted(unknown))}: choose from {everything}")
    for path in asyncio.run(record(names)):
        events = len(json.loads(path.read_text())["events"])
        print(f"  {path.relative_to(HERE.parent.parent)}: {events} events")


if __name__ == "__main__":
    main()
