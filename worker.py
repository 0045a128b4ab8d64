"""The one wiring point: settings → clients → activity instances → Worker, API, dev stack.

`python worker.py` runs a worker (and makes sure the detector runs);
`python worker.py --dev` runs the embedded stack, like `pagerloop dev`.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from datetime import timedelta
from importlib.metadata import version
from typing import Any

from fastapi import FastAPI
from jira import JIRA
from pagerloop_sdk.pricing import PriceTable
from slack_sdk import WebClient
from sqlalchemy import Engine
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleUpdate,
)
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import Worker

import runbooks
from activities import jira, slack
from activities.controls import ControlActivities
from activities.diagnosis import DiagnosisActivities
from activities.incidents import IncidentActivities
from activities.jira import JiraActivities
from activities.metrics import MetricsActivities
from activities.pagerduty import PagerDutyActivities
from activities.retention import RetentionActivities
from activities.slack import SlackActivities
from api.app import create_app
from api.deps import Services
from config import Settings, load_settings
from config.escalation import Escalation, load_escalation
from detectors.config import load_rules
from detectors.detector import (
    DetectorConfig,
    DetectorInput,
    DetectorWorkflow,
)
from detectors.naming import detector_workflow_id
from stores.engine import create_schema, make_engine, ping
from workflows import search_attributes as sa
from workflows.incident import IncidentWorkflow
from workflows.incident_types import NotificationPlan, RunbookPlan
from workflows.retention import RetentionInput, RetentionWorkflow

log = logging.getLogger("pagerloop")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

WORKFLOWS: list[type] = [
    IncidentWorkflow,
    DetectorWorkflow,
    RetentionWorkflow,
    *runbooks.workflows(),
]


async def connect_temporal(settings: Settings, lazy: bool = False) -> Client:
    """A Temporal client; `lazy` ones connect on first use (the API must start, and ingest
    must work, while Temporal is away)."""
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=pydantic_data_converter,
        lazy=lazy,
    )


async def register_search_attributes(client: Client, namespace: str) -> None:
    """Make the contract's search attributes exist on a server pagerloop did not start."""
    existing = await client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=namespace)
    )
    missing = {
        key.name: IndexedValueType.ValueType(key.indexed_value_type.value)
        for key in sa.ALL
        if key.name not in existing.custom_attributes
    }
    if not missing:
        return
    try:
        await client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(search_attributes=missing, namespace=namespace)
        )
    except RPCError as exc:
        if exc.status != RPCStatusCode.ALREADY_EXISTS:
            raise


def make_slack_client(settings: Settings) -> WebClient | None:
    if settings.slack_bot_token is None:
        return None
    return slack.make_client(
        settings.slack_bot_token.get_secret_value(), str(settings.slack_api_url)
    )


def notification_plan(settings: Settings, escalation: Escalation) -> NotificationPlan:
    return NotificationPlan(
        slack_channel=settings.slack_channel if settings.slack_enabled else None,
        pagerduty=settings.pagerduty_enabled or bool(escalation.routing_keys),
        jira=settings.jira_enabled,
        jira_project=settings.jira_project,
        allowed_slack_users=list(settings.slack_allowed_users),
        status_url=f"{settings.api_url}/status",
        policies=dict(escalation.policies),
        runbook=RunbookPlan(
            enabled=settings.runbooks_enabled,
            verify_after_seconds=settings.runbook_verify_seconds,
            diagnosis_window_seconds=settings.runbook_diagnosis_window_seconds,
            feature_priorities=dict(settings.feature_priorities),
        ),
    )


def make_jira_client(settings: Settings) -> JIRA | None:
    if settings.jira_url is None:
        return None
    token = settings.jira_token.get_secret_value() if settings.jira_token else ""
    return jira.make_client(str(settings.jira_url), settings.jira_email, token)


def build_activities(
    settings: Settings, client: Client, engine: Engine
) -> list[Callable[..., Any]]:
    escalation = load_escalation(settings.escalation_policy_file)
    metrics = MetricsActivities(engine, settings.detector_max_scopes)
    plan = notification_plan(settings, escalation)
    incidents = IncidentActivities(client, settings.task_queue, plan, engine)
    slack_activities = SlackActivities(make_slack_client(settings))
    pd_activities = PagerDutyActivities(
        str(settings.pagerduty_events_url), settings.pagerduty_routing_key, escalation
    )
    jira_activities = JiraActivities(make_jira_client(settings), settings.jira_issue_type)
    retention = RetentionActivities(engine)
    controls = ControlActivities(engine)
    diagnosis = DiagnosisActivities(
        engine, load_rules(settings.rules_file), settings.daily_budget_usd
    )
    return [
        retention.purge,
        metrics.window_aggregates,
        incidents.open_or_update,
        incidents.report_recovery,
        slack_activities.post_incident,
        slack_activities.update_incident,
        slack_activities.reply,
        slack_activities.notify,
        pd_activities.trigger,
        pd_activities.acknowledge,
        pd_activities.resolve,
        jira_activities.open_ticket,
        jira_activities.comment,
        jira_activities.resolve,
        controls.set,
        controls.revert,
        controls.extend,
        controls.list_for,
        diagnosis.top_features,
        diagnosis.rate_limits,
        diagnosis.latency,
        diagnosis.recent_errors,
        diagnosis.quality,
        diagnosis.check_signal,
    ]


# After a worker dies, its incidents' next workflow tasks wait this long on its sticky queue
# before any other worker takes them (the SDK's default, 10 s, delays every timer as long).
STICKY_QUEUE_TIMEOUT = timedelta(seconds=3)


def build_worker(settings: Settings, client: Client, engine: Engine) -> Worker:
    return Worker(
        client,
        task_queue=settings.task_queue,
        workflows=WORKFLOWS,
        activities=build_activities(settings, client, engine),
        graceful_shutdown_timeout=timedelta(seconds=5),
        sticky_queue_schedule_to_start_timeout=STICKY_QUEUE_TIMEOUT,
        # Named, not derived: the SDK's default hashes every loaded module (~3 s per start,
        # which a restarted worker adds to every incident's wait).
        build_id=f"pagerloop-{version('pagerloop')}",
    )


def detector_config(settings: Settings) -> DetectorConfig:
    return DetectorConfig(
        interval_seconds=settings.detector_interval_seconds,
        window_seconds=settings.detector_window_seconds,
        daily_budget_usd=settings.daily_budget_usd,
        rules=load_rules(settings.rules_file),
    )


async def ensure_detector(client: Client, settings: Settings) -> None:
    """Start the detector once; a running one keeps its state and takes the new settings."""
    config = detector_config(settings)
    handle = await client.start_workflow(
        DetectorWorkflow.run,
        DetectorInput(config=config),
        id=detector_workflow_id(settings.task_queue),
        task_queue=settings.task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        static_summary="pagerloop detector: LLM golden signals → incidents",
    )
    await handle.signal(DetectorWorkflow.reconfigure, config)


async def check_dependencies(settings: Settings, temporal: bool, store: bool) -> dict[str, str]:
    """What `pagerloop check` and container health checks ask: can we reach our servers?"""
    results: dict[str, str] = {}
    if temporal:
        try:
            client = await asyncio.wait_for(connect_temporal(settings), timeout=5)
            await client.service_client.check_health()
            results["temporal"] = "ok"
        except Exception as exc:
            results["temporal"] = f"failing: {exc}"
    if store:
        engine = make_engine(settings.database_url)
        try:
            await asyncio.to_thread(ping, engine)
            results["store"] = "ok"
        except Exception as exc:
            results["store"] = f"failing: {exc}"
        finally:
            engine.dispose()
    return results


def retention_schedule_id(task_queue: str) -> str:
    return f"retention-{task_queue}"


async def ensure_retention_schedule(client: Client, settings: Settings) -> None:
    """An hourly purge, visible (and pausable) under Schedules in the Temporal UI."""
    schedule = Schedule(
        action=ScheduleActionStartWorkflow(
            RetentionWorkflow.run,
            RetentionInput(settings.retention_days, settings.rollup_retention_days),
            id=f"retention-run-{settings.task_queue}",
            task_queue=settings.task_queue,
        ),
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=timedelta(hours=1))]),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
    )
    schedule_id = retention_schedule_id(settings.task_queue)
    try:
        await client.create_schedule(schedule_id, schedule)
    except ScheduleAlreadyRunningError:
        await client.get_schedule_handle(schedule_id).update(
            lambda _: ScheduleUpdate(schedule=schedule)
        )


def open_store(settings: Settings) -> Engine:
    engine = make_engine(settings.database_url)
    create_schema(engine)
    return engine


# The API answers a locked or unreachable store with 503 + Retry-After within 2 s, instead of
# holding the request (and the client) for the 30 s a background writer may wait.
API_LOCK_TIMEOUT_SECONDS = 1.5


def api_engine(settings: Settings) -> Engine:
    return make_engine(settings.database_url, lock_timeout_seconds=API_LOCK_TIMEOUT_SECONDS)


def build_api(settings: Settings, client: Client, engine: Engine) -> FastAPI:
    prices = PriceTable.from_file(settings.prices_file)
    return create_app(Services(settings, engine, client, make_slack_client(settings), prices))


def main(argv: list[str]) -> None:
    from cli.stack import run_dev, serve

    settings = load_settings()
    logging.basicConfig(level=settings.log_level, format=LOG_FORMAT)
    if "--dev" in argv:
        asyncio.run(run_dev(settings))
    else:
        asyncio.run(serve(settings, run_api=False, run_worker=True))


if __name__ == "__main__":
    main(sys.argv[1:])
