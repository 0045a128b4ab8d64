"""The Temporal dev server SIGKILLed mid-incident and started again on its database file, as
`pagerloop dev` starts it (`worker.EmbeddedTemporal`: `temporal server start-dev --db-filename
...` with pagerloop's search attributes). The worker, in a process of its own, and this test's
client are left alone: both must find the server again by themselves.

The incident is an error-rate breach (SEV2, no runbook): L1 pages at once and has 8 s to
acknowledge; L2 pages its own PagerDuty service and opens the Jira ticket. The server dies 2 s
before L1's deadline and stays down 6 s, so that the deadline passes while it is away, and
PagerDuty holds back its answer to the L1 page until the server is gone: the worker learns that
the page went through while it cannot tell the server. After the restart: the timer fires, L2
is paged and ticketed, the incident takes an acknowledgement and a resolve from the same
client, and every vendor call was made once; the search attributes came back with the database
(nobody registers them again).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

import worker
from config.escalation import load_escalation
from domain import search_attributes as sa
from domain.incident import ActionRequest, Breach, IncidentState, IncidentStatus, Severity, Trigger
from tests.chaos import ledger
from tests.chaos.processes import TemporalServer, WorkerProcess
from tests.chaos.test_worker_kill import (
    Crash,
    Outcome,
    SlowPagerDuty,
    Timer,
    chaos_settings,
    escalation_timers_acted,
    open_incident,
    vendor_counts,
)
from tests.fakes.jira import FakeJira
from tests.fakes.slack import FakeSlack
from tests.helpers import eventually
from workflows.incident import IncidentWorkflow

L1_ACK_SECONDS = 8
POLICY = f"""
[severities.SEV2]
repeat_interval_seconds = 600
[[severities.SEV2.levels]]
name = "L1"
description = "On-call"
ack_timeout_seconds = {L1_ACK_SECONDS}
resolve_timeout_seconds = 600
[[severities.SEV2.levels]]
name = "L2"
description = "Platform"
ack_timeout_seconds = 600
resolve_timeout_seconds = 1200
pagerduty_routing_key = "{"K" * 32}"
jira_project = "OPS"
"""
KILL_BEFORE_DEADLINE = 2.0  # seconds
DOWN_FOR = 6.0  # seconds
# Once the server answers again, the timer fires at once and the worker's pollers, which backed
# off (up to about 10 s between tries) while it was away, come back: this long at most.
BACK_WITHIN_SECONDS = 12.0
EXPECTED_KINDS = ("opened", "breach", "notified", "paged", "escalated", "ticket",
                  "acknowledged", "resolved")  # fmt: skip


@pytest.fixture
async def temporal(tmp_path: Path) -> AsyncIterator[TemporalServer]:
    server = TemporalServer(tmp_path / "temporal.db", tmp_path / "temporal.log")
    server.start()
    try:
        await server.healthy()
        yield server
    finally:
        server.stop()


async def test_the_temporal_server_killed_and_restarted_on_its_database_loses_nothing(
    temporal: TemporalServer, tmp_path: Path
) -> None:
    fault = "Temporal dev server SIGKILL, restarted on its db file"
    try:
        outcome = await _restart_mid_incident(temporal, tmp_path)
    except BaseException:
        ledger.record(fault, runs=1, incidents_lost=1)
        raise
    ledger.record(
        fault,
        runs=1,
        incidents_lost=int(bool(outcome.lost)),
        duplicates=outcome.duplicates,
        worst_timer_delay_s=outcome.worst_timer_delay_s,
        records_lost=0,  # no call records go through these faults
    )
    print(f"\n{outcome.summary()}")
    assert outcome.lost == [], outcome.summary()
    assert outcome.slack_posts == 1, outcome.summary()
    keys = {outcome.incident_id, f"{outcome.incident_id}/L2"}
    assert outcome.pagerduty_triggers == dict.fromkeys(keys, 1), outcome.summary()
    assert (outcome.jira_tickets, outcome.jira_creates) == (1, 1), outcome.summary()
    assert outcome.postmortems == 1, outcome.summary()
    assert outcome.duplicates == 0, outcome.summary()
    assert [timer.what for timer in outcome.timers] == ["L1: acknowledged"], outcome.summary()
    late = [timer for timer in outcome.timers if timer.late_s > timer.allowed_s]
    assert not late, outcome.summary()


async def _restart_mid_incident(temporal: TemporalServer, base: Path) -> Outcome:
    client = await Client.connect(temporal.address, data_converter=pydantic_data_converter)
    with contextlib.ExitStack() as stack:
        slack = stack.enter_context(FakeSlack())
        pagerduty = stack.enter_context(SlowPagerDuty())
        jira = stack.enter_context(FakeJira())
        settings = chaos_settings(base, temporal.address, slack, pagerduty, jira, POLICY)
        engine = worker.open_store(settings)
        stack.callback(engine.dispose)
        process = WorkerProcess(settings, base / "worker.log")
        stack.callback(process.stop)
        await process.start()
        await process.ready()

        plan = worker.notification_plan(settings, load_escalation(settings.escalation_policy_file))
        breach = Breach(
            Trigger.ERROR_RATE,
            "global",
            Severity.SEV2,
            datetime.now(UTC),
            "error rate 40.0% > 5% (20/50 calls in 300s)",
            {"error_rate": 0.4, "calls": 50.0, "errors": 20.0},
        )
        # PagerDuty answers the L1 page once the server is down (the client waits up to 10 s).
        pagerduty.delay_next("trigger", L1_ACK_SECONDS - KILL_BEFORE_DEADLINE + 1)
        handle = await open_incident(client, settings, plan, engine, breach)
        await eventually(lambda: pagerduty.events("trigger") and slack.posts(), timeout=30)
        state: IncidentState = await handle.query(IncidentWorkflow.state)
        assert state.ack_by is not None

        # Down from 2 s before L1's acknowledge deadline until 4 s after it.
        kill_at = state.ack_by - timedelta(seconds=KILL_BEFORE_DEADLINE)
        await asyncio.sleep(max((kill_at - datetime.now(UTC)).total_seconds(), 0.0))
        killed = datetime.now(UTC)
        temporal.kill()
        await asyncio.sleep(DOWN_FOR)
        temporal.start()
        started_at = time.monotonic()
        await temporal.healthy()
        back = killed + timedelta(seconds=DOWN_FOR + time.monotonic() - started_at)

        # The same client, the worker on its own: L2 is paged and ticketed.
        async def at_l2_with_ticket() -> bool:
            current: IncidentState = await handle.query(IncidentWorkflow.state)
            return current.level == 2 and current.jira_issue is not None

        await eventually(at_l2_with_ticket, timeout=60)
        await eventually(lambda: len(pagerduty.events("trigger")) >= 2, timeout=60)

        # The search attributes came back with the database file, and still find the incident.
        listed = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=client.namespace)
        )
        missing = [key.name for key in sa.ALL if key.name not in listed.custom_attributes]
        assert missing == [], f"search attributes lost in the restart: {missing}"
        query = (
            f"TaskQueue = '{settings.task_queue}' AND IncidentStatus = 'detected' "
            "AND IncidentLevel = 2"
        )

        async def listed_at_l2() -> list[str]:
            return [execution.id async for execution in client.list_workflows(query)]

        assert await eventually(listed_at_l2, timeout=30) == [handle.id]

        await handle.execute_update(
            IncidentWorkflow.acknowledge, ActionRequest("U0ALICE00", "slack")
        )
        await handle.execute_update(IncidentWorkflow.resolve, ActionRequest("U0ALICE00", "slack"))
        result = await asyncio.wait_for(handle.result(), timeout=60)

        outcome = Outcome("temporal restart", handle.id, [Crash(killed, back)])
        if result.status != IncidentStatus.RESOLVED:
            outcome.lost.append(f"ended {result.status}")
        kinds = {entry.kind for entry in result.timeline}
        outcome.lost += [
            f"no {kind} on the timeline" for kind in EXPECTED_KINDS if kind not in kinds
        ]
        outcome.lost += [
            f"{entry.kind}: {entry.text}"
            for entry in result.timeline
            if entry.kind in ("notification_failed", "not_paged")
        ]
        vendor_counts(outcome, result.timeline, slack, pagerduty, jira, ("L1", "L2"))
        history = await handle.fetch_history()
        clock_started, acted = escalation_timers_acted(history.events)
        due = clock_started + timedelta(seconds=L1_ACK_SECONDS)
        allowed = max((back - due).total_seconds(), 0.0) + BACK_WITHIN_SECONDS
        outcome.timers = [
            Timer(summary.split(" by ")[0], due, began, allowed) for summary, began in acted
        ]
        return outcome
