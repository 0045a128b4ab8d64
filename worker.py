"""The one wiring point: settings → clients → activity instances → Worker, API, dev stack.

`python worker.py` runs a worker (and makes sure the detector runs);
`python worker.py --dev` runs the embedded stack, like `pagerloop dev`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import uvicorn
from fastapi import FastAPI
from slack_sdk import WebClient
from sqlalchemy import Engine
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import Worker

from activities import pagerduty, slack
from activities.incidents import IncidentActivities
from activities.metrics import MetricsActivities
from activities.pagerduty import PagerDutyActivities
from activities.slack import SlackActivities
from api.app import create_app
from api.deps import Services
from cli.devserver import EmbeddedTemporal, answers
from config import Settings, load_settings
from detectors.detector import (
    DetectorConfig,
    DetectorInput,
    DetectorWorkflow,
)
from detectors.naming import detector_workflow_id
from stores.engine import create_schema, make_engine, ping
from workflows import search_attributes as sa
from workflows.incident import IncidentWorkflow
from workflows.incident_types import NotificationPlan

log = logging.getLogger("pagerloop")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

WORKFLOWS: list[type] = [IncidentWorkflow, DetectorWorkflow]


async def connect_temporal(settings: Settings) -> Client:
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        data_converter=pydantic_data_converter,
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


def notification_plan(settings: Settings) -> NotificationPlan:
    return NotificationPlan(
        slack_channel=settings.slack_channel if settings.slack_enabled else None,
        pagerduty=settings.pagerduty_enabled,
        allowed_slack_users=list(settings.slack_allowed_users),
        status_url=f"{settings.api_url}/status",
    )


def build_activities(
    settings: Settings, client: Client, engine: Engine
) -> list[Callable[..., Any]]:
    slack_client = make_slack_client(settings)
    pd_session = (
        pagerduty.make_session(
            settings.pagerduty_routing_key.get_secret_value(), str(settings.pagerduty_events_url)
        )
        if settings.pagerduty_routing_key is not None
        else None
    )
    metrics = MetricsActivities(engine)
    incidents = IncidentActivities(client, settings.task_queue, notification_plan(settings))
    slack_activities = SlackActivities(slack_client)
    pd_activities = PagerDutyActivities(pd_session)
    return [
        metrics.error_rate,
        incidents.open_or_update,
        slack_activities.post_incident,
        slack_activities.update_incident,
        pd_activities.trigger,
        pd_activities.acknowledge,
        pd_activities.resolve,
    ]


def build_worker(settings: Settings, client: Client, engine: Engine) -> Worker:
    return Worker(
        client,
        task_queue=settings.task_queue,
        workflows=WORKFLOWS,
        activities=build_activities(settings, client, engine),
        graceful_shutdown_timeout=timedelta(seconds=5),
    )


async def ensure_detector(client: Client, settings: Settings) -> None:
    """Start the detector once; a running one keeps its state and takes the new settings."""
    config = DetectorConfig(
        interval_seconds=settings.detector_interval_seconds,
        window_seconds=settings.detector_window_seconds,
    )
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


def open_store(settings: Settings) -> Engine:
    engine = make_engine(settings.database_url)
    create_schema(engine)
    return engine


def build_api(settings: Settings, client: Client, engine: Engine) -> FastAPI:
    return create_app(Services(settings, engine, client, make_slack_client(settings)))


class _QuietServer(uvicorn.Server):
    """uvicorn that leaves signal handling to the process that embeds it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def api_server(settings: Settings, app: FastAPI) -> uvicorn.Server:
    config = uvicorn.Config(
        app, host=settings.api_host, port=settings.api_port, log_level="warning", lifespan="off"
    )
    return _QuietServer(config)


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()


async def serve(settings: Settings, *, run_api: bool, run_worker: bool) -> None:
    """Run the API and/or the worker until SIGINT or SIGTERM, then stop them cleanly."""
    client = await connect_temporal(settings)
    engine = open_store(settings)
    tasks: list[asyncio.Task[Any]] = []
    worker = build_worker(settings, client, engine) if run_worker else None
    server = api_server(settings, build_api(settings, client, engine)) if run_api else None
    if worker is not None:
        await register_search_attributes(client, settings.temporal_namespace)
        tasks.append(asyncio.create_task(worker.run()))
        await ensure_detector(client, settings)
    if server is not None:
        if not settings.dev_mode and not settings.user_hash_salt.get_secret_value():
            log.warning(
                "PAGERLOOP_USER_HASH_SALT is empty: end-user ids are hashed without a secret, "
                "so a known id can be matched to its hash"
            )
        tasks.append(asyncio.create_task(server.serve()))
    stopper = asyncio.create_task(_until_signalled())
    done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
    if server is not None:
        server.should_exit = True
    if worker is not None:
        await worker.shutdown()
    await asyncio.gather(*tasks, return_exceptions=True)
    stopper.cancel()
    engine.dispose()
    for task in done:
        if task is not stopper and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


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
        client = await connect_temporal(settings)
        await register_search_attributes(client, settings.temporal_namespace)
        ui = temporal.ui_url if temporal else "(the existing server's UI)"
        print(
            f"pagerloop dev\n  Temporal UI  {ui}\n  API          {settings.api_url}\n"
            f"  Temporal     {settings.temporal_address} (namespace {settings.temporal_namespace})"
            f"\n  stores       {settings.database_url}\n  Ctrl-C stops everything.",
            flush=True,
        )
        await serve(settings, run_api=True, run_worker=True)
    finally:
        if temporal is not None:
            temporal.stop()
        print("pagerloop dev stopped", flush=True)


def main(argv: list[str]) -> None:
    settings = load_settings()
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    if "--dev" in argv:
        asyncio.run(run_dev(settings))
    else:
        asyncio.run(serve(settings, run_api=False, run_worker=True))


if __name__ == "__main__":
    main(sys.argv[1:])
