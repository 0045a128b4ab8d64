"""One problem, one incident (issue #17): `pagerloop simulate` drives real traffic through the
instrumented OpenAI client (pagerloop_sdk) against llmock while the worker and the detector run
on the local dev server, Slack, PagerDuty and Jira pointed at the fakes. However many rules the
problem trips on its way (an outage's 5xx are errors first; a cost spike ends up spending the
day's budget), one incident stays open and each channel is told once; any incident opened on
the way is closed as merged into it."""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from pagerloop_sdk.pricing import DEFAULT_PRICES
from rich.console import Console
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

import worker
from activities.incidents import open_incidents_query
from cli import simulate
from cli.scenarios import FEATURE_PRIORITIES, LONG_ANSWER, Scenario, build
from cli.simulate_progress import Progress
from config import Settings
from domain.incident import IncidentState, IncidentStatus, Severity, Trigger
from domain.workflow_names import detector_workflow_id
from tests.conftest import incident_ids
from tests.fakes.jira import FakeJira
from tests.fakes.pagerduty import FakePagerDuty
from tests.fakes.slack import FakeSlack
from tests.helpers import eventually
from workflows.incident import IncidentWorkflow

INTERVAL_SECONDS = 5  # the embedded dev stack's detector interval
WINDOW_SECONDS = 30  # short, so the detector reacts within the run
# After the traffic: time for whatever opened last to be folded into the one incident.
SETTLE_SECONDS = 20
# The outage starts after a tenth of the run (3 s); the error-rate rule trips a couple of
# evaluations later, the outage rule one or two after that (about 15 s): both inside the run.
OUTAGE_RUN_SECONDS = 30
# The spike starts after a tenth of the run; the budget is 80 % spent about SPIKE_TO_BUDGET
# seconds later (cost_rate has fired by then: it needs two evaluations), 95 % a few s after.
SPIKE_RUN_SECONDS = 36
SPIKE_TO_BUDGET_SECONDS = 13


def spike_usd_per_second() -> float:
    """What the cost spike spends, from the scenario: its loops of large gpt-4.1 summaries,
    tokens counted as llmock counts them (4 characters a token), priced as the SDK prices.
    (Measured: about $0.043/s, a little below this, for the overhead of each call.)"""
    setup = build(Scenario.COST_SPIKE)
    [spike] = [t for t in setup.traffic if t.phase == "after_fault"]
    prompt = spike.request(0)["messages"][0]["content"]
    per_call = DEFAULT_PRICES.cost_usd(spike.model, len(prompt) // 4, len(LONG_ANSWER) // 4)
    assert per_call is not None
    delay = float(max(b["seconds"] for b in setup.baseline if b["type"] == "delay"))
    return spike.workers * per_call / (spike.think_seconds + delay)


def scenario_settings(
    settings: Settings, dev_env: WorkflowEnvironment, **changes: object
) -> Settings:
    """The conftest settings (fakes, store, own task queue), as `pagerloop dev` runs the
    detector, with the priorities `pagerloop simulate` asks the worker for."""
    priorities = dict(item.split("=") for item in FEATURE_PRIORITIES.split(","))
    return settings.model_copy(
        update={
            "temporal_address": dev_env.client.service_client.config.target_host,
            "detector_interval_seconds": INTERVAL_SECONDS,
            "detector_window_seconds": WINDOW_SECONDS,
            "feature_priorities": priorities,
            **changes,
        }
    )


@contextlib.asynccontextmanager
async def service(client: Client, settings: Settings) -> AsyncIterator[None]:
    """Worker and detector on the dev server; afterwards the detector and any incident still
    running are terminated (nothing of this test keeps running on the shared server)."""
    engine = worker.open_store(settings)
    try:
        async with worker.build_worker(settings, client, engine):
            await worker.ensure_detector(client, settings)
            try:
                yield
            finally:
                running = await incident_ids(
                    client, settings.task_queue, "AND ExecutionStatus = 'Running'"
                )
                for workflow_id in [detector_workflow_id(settings.task_queue), *running]:
                    with contextlib.suppress(RPCError):
                        await client.get_workflow_handle(workflow_id).terminate("test over")
    finally:
        engine.dispose()


async def simulate_in_thread(scenario: Scenario, seconds: float, settings: Settings) -> Progress:
    """`pagerloop simulate SCENARIO --quiet` (llmock in process), beside the worker."""
    return await asyncio.to_thread(
        simulate.run,
        scenario,
        duration=seconds,
        quiet=True,
        settings=settings,
        console=Console(file=io.StringIO()),
    )


@dataclass
class Seen:
    incident_id: str
    running: bool
    state: IncidentState

    @property
    def open(self) -> bool:
        return self.running and self.state.status != IncidentStatus.RESOLVED

    def line(self, started: datetime) -> str:
        after = (self.state.opened_at - started).total_seconds()
        last = self.state.timeline[-1].text if self.state.timeline else ""
        return (
            f"{self.incident_id}: {self.state.trigger} on {self.state.scope}, "
            f"{self.state.severity}, {self.state.status}"
            f"{'' if self.running else ' (closed)'}, opened {after:+.0f}s after the traffic "
            f"started, last timeline entry {last[:120]!r}"
        )


async def every_incident(client: Client, task_queue: str) -> list[Seen]:
    """Each incident of the task queue, open or not, with its state."""
    seen = []
    for incident_id in await incident_ids(client, task_queue):
        handle = client.get_workflow_handle_for(IncidentWorkflow.run, incident_id)
        described = await handle.describe()
        state = await handle.query(IncidentWorkflow.state)
        seen.append(Seen(incident_id, described.status == WorkflowExecutionStatus.RUNNING, state))
    return sorted(seen, key=lambda s: s.state.opened_at)


@dataclass
class Fakes:
    slack: FakeSlack
    pagerduty: FakePagerDuty
    jira: FakeJira


async def one_open_incident(
    client: Client,
    settings: Settings,
    fakes: Fakes,
    started: datetime,
    progress: Progress,
    trigger: Trigger,
    severity: Severity | None = None,
) -> Seen:
    """The one open incident the problem made, on global, with one page, one Slack message
    and at most one ticket; every other incident closed as merged into it. Raises an
    AssertionError saying what there is otherwise."""
    incidents = await every_incident(client, settings.task_queue)
    query = (
        f"{open_incidents_query(settings.task_queue)} "
        f"AND IncidentStatus != '{IncidentStatus.RESOLVED}'"
    )
    listed = [execution.id async for execution in client.list_workflows(query)]
    paged = {e["dedup_key"] for e in fakes.pagerduty.events("trigger")}
    channel = fakes.slack.channel_id(settings.slack_channel)
    posted = [m for m in fakes.slack.top_level() if m.channel == channel]
    report = "\n  ".join(
        [
            f"after {progress.total} calls ({dict(progress.counts)}):",
            *(seen.line(started) for seen in incidents),
            f"PagerDuty dedup keys triggered: {sorted(paged)} "
            f"(alerts now {dict(fakes.pagerduty.alerts)})",
            f"Slack top-level messages in {settings.slack_channel}: "
            f"{[m.text[:80] for m in posted]}",
            f"Jira issues: {sorted(fakes.jira.issues)}",
        ]
    )
    opened = [seen for seen in incidents if seen.open]
    assert len(opened) == 1, f"not one open incident\n  {report}"
    [one] = opened
    assert one.state.trigger == trigger, report
    assert one.state.scope == "global", report
    if severity is not None:
        assert one.state.severity == severity, report
    assert listed == [one.incident_id], f"visibility lists {listed}\n  {report}"
    # One page: one PagerDuty alert, and it is still up while the problem lasts.
    assert len(paged) == 1, f"not one PagerDuty alert\n  {report}"
    assert fakes.pagerduty.alerts[next(iter(paged))] != "resolved", report
    assert len(posted) == 1, f"not one Slack message\n  {report}"
    assert len(fakes.jira.issues) <= 1, report
    # Whatever opened on the way (none, ideally) is closed, the last word of its timeline
    # pointing at the one incident (its runbook, stopped by the merge, may still report).
    for other in incidents:
        if other is one:
            continue
        assert not other.open, report
        said = [e for e in other.state.timeline if e.channel not in ("runbook", "controls")]
        assert said, report
        assert f"merged into {one.incident_id}" in said[-1].text, report
    print(report)  # the account, shown with `pytest -rP`
    return one


async def settled(probe: Callable[[], Awaitable[Seen]]) -> Seen:
    """The one open incident once merging has had SETTLE_SECONDS; the full account if not."""
    with contextlib.suppress(AssertionError):
        return await eventually(probe, timeout=SETTLE_SECONDS, interval=1.0)
    return await probe()  # raises again, with what there is spelt out


async def test_an_api_outage_is_one_incident_and_one_page_per_channel(
    dev_env: WorkflowEnvironment,
    settings: Settings,
    fake_slack: FakeSlack,
    fake_pagerduty: FakePagerDuty,
    fake_jira: FakeJira,
) -> None:
    client = dev_env.client
    outage = scenario_settings(settings, dev_env)
    fakes = Fakes(fake_slack, fake_pagerduty, fake_jira)
    async with service(client, outage):
        started = datetime.now(UTC)
        progress = await simulate_in_thread(Scenario.API_OUTAGE, OUTAGE_RUN_SECONDS, outage)
        # The outage happened (the runbook's cache and shedding soon answer most calls).
        assert progress.counts["server_error"] >= 10  # the outage rule's min_samples
        await settled(
            lambda: one_open_incident(
                client, outage, fakes, started, progress, Trigger.API_OUTAGE, Severity.SEV1
            )
        )


async def test_a_cost_spike_that_becomes_a_budget_exhaustion_is_one_incident(
    dev_env: WorkflowEnvironment,
    settings: Settings,
    fake_slack: FakeSlack,
    fake_pagerduty: FakePagerDuty,
    fake_jira: FakeJira,
) -> None:
    client = dev_env.client
    # A day's budget the spike spends 80 % of in about SPIKE_TO_BUDGET_SECONDS. Its hourly
    # share (1/24) is far below what any of the traffic spends, so the cost-rate rule fires on
    # global first, and the budget rule some evaluations later. The runbooks are off: the cost
    # runbook would reroute the spike to a cheap model before the budget ran out.
    budget = spike_usd_per_second() * SPIKE_TO_BUDGET_SECONDS / 0.8
    spike = scenario_settings(settings, dev_env, daily_budget_usd=budget, runbooks_enabled=False)
    fakes = Fakes(fake_slack, fake_pagerduty, fake_jira)
    async with service(client, spike):
        started = datetime.now(UTC)
        progress = await simulate_in_thread(Scenario.COST_SPIKE, SPIKE_RUN_SECONDS, spike)
        assert progress.counts["success"] > 0
        one = await settled(
            lambda: one_open_incident(
                client, spike, fakes, started, progress, Trigger.BUDGET_EXHAUSTION
            )
        )
        # The budget running out is what it is about: its runway, under an hour at this burn
        # (the budget_runway rule fires before 80 % is spent), or the 80 % spent.
        metrics = one.state.metrics
        assert (
            metrics.get("budget_runway_hours", 24) < 1
            or metrics.get("budget_consumed_ratio", 0) >= 0.8
        )
