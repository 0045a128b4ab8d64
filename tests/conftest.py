"""Shared test ground: Temporal servers, a real PostgreSQL, stores, and the vendor fakes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

import worker
from activities.incidents import IncidentActivities
from api.app import create_app
from api.deps import Services
from config import Settings
from config.escalation import load_escalation
from domain import search_attributes as sa
from domain.workflow_names import detector_workflow_id
from stores import schema
from stores.engine import create_schema, make_engine
from tests import postgres
from tests.fakes.jira import FakeJira
from tests.fakes.pagerduty import FakePagerDuty
from tests.fakes.server import ThreadedServer
from tests.fakes.slack import FakeSlack
from workflows.incident import IncidentWorkflow

# pytest-xdist's workers run with COLUMNS=80, which a rich Console created at import fixes as its
# width for good: the CLI tests choose their own width per invocation.
os.environ.pop("COLUMNS", None)
os.environ.pop("LINES", None)

BIN = Path(sys.executable).parent


def _binary(name: str) -> str:
    beside = BIN / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is missing: run the tests with `uv run pytest`")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def postgres_required() -> bool:
    return bool(os.environ.get("CI") or os.environ.get("PAGERLOOP_REQUIRE_POSTGRES"))


# --- Temporal -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
async def time_skipping_env() -> AsyncIterator[WorkflowEnvironment]:
    """The time-skipping test server, with the contract's search attributes registered."""
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=_binary("temporal-test-server"),
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
    yield env
    await env.shutdown()


@pytest.fixture(scope="session")
async def dev_env() -> AsyncIterator[WorkflowEnvironment]:
    """The local dev server (real time, visibility, schedules) with the search attributes."""
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=_binary("temporal"),
        data_converter=pydantic_data_converter,
        search_attributes=list(sa.ALL),
        dev_server_extra_args=["--ui-disable-news-fetch", "--headless"],
    )
    yield env
    await env.shutdown()


@pytest.fixture
def task_queue() -> str:
    """Each test its own queue, so tests sharing a server never see each other's work."""
    return f"test-{uuid.uuid4().hex[:12]}"


# --- PostgreSQL and the stores ---------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A database of its own on a real PostgreSQL, dropped after the run."""
    admin = postgres.configured_url()
    cluster: postgres.OwnCluster | None = None
    if not postgres.answers(admin):
        cluster = postgres.OwnCluster()
        if not cluster.available:
            reason = f"no PostgreSQL answers at {admin} and no server binaries to start one"
            if postgres_required():
                pytest.fail(reason)
            pytest.skip(reason)
        admin = cluster.start()
    name = f"pagerloop_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    url = postgres.create_database(admin, name)
    yield url.render_as_string(hide_password=False)
    postgres.drop_database(admin, name)
    if cluster is not None:
        cluster.stop()


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    """Empty stores in a SQLite file of the test's own."""
    engine = make_engine(f"sqlite:///{tmp_path / 'stores.db'}")
    create_schema(engine)
    yield engine
    engine.dispose()


INGEST_KEY = "sdk-ingest-key"


@pytest.fixture
def ingest_api(time_skipping_env: WorkflowEnvironment, engine: Engine) -> Iterator[ThreadedServer]:
    """The real API app (ingest and controls) on a port of its own, over the test's stores;
    apps authenticate with INGEST_KEY."""
    settings = Settings(_env_file=None, ingest_api_keys=INGEST_KEY, user_hash_salt="s")  # type: ignore[call-arg]
    app = create_app(Services(settings, engine, time_skipping_env.client, slack=None))
    with ThreadedServer(app) as server:
        yield server


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """The stores on SQLite and on PostgreSQL, empty for each test."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'stores.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    engine = make_engine(url)
    schema.downgrade(engine, "base")
    create_schema(engine)
    yield engine
    schema.downgrade(engine, "base")
    engine.dispose()


# --- vendor fakes --------------------------------------------------------------------------


@pytest.fixture
def fake_slack() -> Iterator[FakeSlack]:
    with FakeSlack() as server:
        yield server


@pytest.fixture
def fake_pagerduty() -> Iterator[FakePagerDuty]:
    with FakePagerDuty() as server:
        yield server


@pytest.fixture
def fake_jira() -> Iterator[FakeJira]:
    with FakeJira() as server:
        yield server


# --- the whole service, wired as `pagerloop dev` wires it ------------------------------------

SIGNING_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
INGEST_KEY = "test-ingest-key"
OPERATOR_KEY = "operator-test-key"


@pytest.fixture
def settings(
    tmp_path: Path,
    task_queue: str,
    fake_slack: FakeSlack,
    fake_pagerduty: FakePagerDuty,
    fake_jira: FakeJira,
) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=f"sqlite:///{tmp_path / 'stores.db'}",
        task_queue=task_queue,
        api_port=free_port(),
        detector_interval_seconds=1,
        ingest_api_keys=INGEST_KEY,
        operator_api_keys=f"alice:{OPERATOR_KEY}",
        slack_bot_token="xoxb-test",
        slack_signing_secret=SIGNING_SECRET,
        slack_api_url=fake_slack.api_url,
        pagerduty_routing_key="R" * 32,
        pagerduty_events_url=fake_pagerduty.url,
        jira_url=fake_jira.url,
        jira_token="jira-test-token",
    )


@contextlib.asynccontextmanager
async def incident_worker(client: Client, settings: Settings) -> AsyncIterator[Engine]:
    """A worker running IncidentWorkflow with every activity, wired as worker.py wires them,
    on the settings' task queue; yields its stores."""
    engine = worker.open_store(settings)
    try:
        async with Worker(
            client,
            task_queue=settings.task_queue,
            workflows=[IncidentWorkflow],
            activities=worker.build_activities(settings, client, engine),
        ):
            yield engine
    finally:
        engine.dispose()


@contextlib.asynccontextmanager
async def incident_opener(client: Client, settings: Settings) -> AsyncIterator[IncidentActivities]:
    """The detector's activity that opens incidents, with an incident worker behind it; the
    incidents it leaves running are ended afterwards."""
    async with incident_worker(client, settings) as engine:
        plan = worker.notification_plan(settings, load_escalation(settings.escalation_policy_file))
        yield IncidentActivities(client, settings.task_queue, plan, engine)
        await terminate_incidents(client, settings.task_queue)


@contextlib.asynccontextmanager
async def serving_api(settings: Settings, client: Client, engine: Engine) -> AsyncIterator[str]:
    """The real API server (uvicorn) on settings.api_url, until the block ends."""
    server = worker.api_server(settings, worker.build_api(settings, client, engine))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.02)
    try:
        yield settings.api_url
    finally:
        server.should_exit = True
        await serving


@pytest.fixture
async def running(dev_env: WorkflowEnvironment, settings: Settings) -> AsyncIterator[Client]:
    """Worker, detector and API on the local dev server, serving on settings.api_url."""
    client = dev_env.client
    engine = worker.open_store(settings)
    async with worker.build_worker(settings, client, engine):
        await worker.ensure_detector(client, settings)
        async with serving_api(settings, client, engine):
            yield client
        await client.get_workflow_handle(detector_workflow_id(settings.task_queue)).terminate()
    engine.dispose()


async def terminate_incidents(client: Client, task_queue: str) -> None:
    """End every incident of the task queue still running (a failed test leaves some)."""
    query = f"WorkflowType = 'IncidentWorkflow' AND TaskQueue = '{task_queue}'"
    async for execution in client.list_workflows(query):
        if execution.status == WorkflowExecutionStatus.RUNNING:
            with contextlib.suppress(RPCError):  # it may have ended since it was listed
                await client.get_workflow_handle(execution.id).terminate("test over")


async def incident_ids(client: Client, task_queue: str, where: str = "") -> list[str]:
    query = f"WorkflowType = 'IncidentWorkflow' AND TaskQueue = '{task_queue}' {where}"
    return [execution.id async for execution in client.list_workflows(query)]
