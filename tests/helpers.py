"""Small helpers the tests share."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import httpx
import openai
from llmock.pytest_plugin import LLMock
from pagerloop_sdk import instrument, llm_context
from pagerloop_sdk.recorder import Recorder
from sqlalchemy import Engine
from sqlmodel import Session, col, select
from temporalio.client import (
    Client,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowUpdateFailedError,
)
from temporalio.service import RPCError

from api.app import create_app
from api.deps import Services
from config import Settings
from domain.incident import ActionRequest
from instrumentation.store_sink import StoreSink
from stores import controls
from stores.llm_calls import LLMCall
from workflows.incident import IncidentWorkflow

T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T] | T], timeout: float = 20.0, interval: float = 0.1
) -> T:
    """Poll until `probe` returns something truthy (or stops raising AssertionError)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            result = probe()
            if asyncio.iscoroutine(result) or isinstance(result, Awaitable):
                result = await result  # type: ignore[misc]
            if result:
                return result  # type: ignore[return-value]
            last = result
        except AssertionError as error:
            last = error
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout}s: {last!r}")
        await asyncio.sleep(interval)


def now() -> datetime:
    return datetime.now(UTC)


async def close_incidents(handles: list[WorkflowHandle]) -> None:
    """Resolve a test's open incidents and let them finish. Left running on the shared
    time-skipping server, their timers would fire with no worker while the next test skips
    time; terminated with an activity in flight, they stop the server from skipping at all."""
    for handle in handles:
        with contextlib.suppress(WorkflowUpdateFailedError, RPCError):
            await handle.execute_update(IncidentWorkflow.resolve, ActionRequest("pytest", "cli"))
        try:
            await asyncio.wait_for(handle.result(), timeout=15)
        except (TimeoutError, WorkflowFailureError, RPCError):
            with contextlib.suppress(RPCError):
                await handle.terminate("test over")


def recorded(recorder: Recorder, engine: Engine) -> list[LLMCall]:
    """Every call record in the store once the recorder has written what it was given."""
    assert recorder.flush()
    with Session(engine) as session:
        return list(session.exec(select(LLMCall).order_by(col(LLMCall.id))))


def put_control(
    engine: Engine,
    kind: str,
    value: str = "",
    *,
    feature: str | None = None,
    model: str | None = None,
    incident: str = "incident-error_rate-global-1",
    now: datetime | None = None,
    ttl: timedelta = timedelta(hours=1),
    reason: str = "test",
    set_by: str = "runbook:test",
) -> controls.Control:
    """A control as a runbook sets it, in force for `ttl` from `now`."""
    now = now or datetime.now(UTC)
    return controls.upsert(
        engine,
        incident_id=incident,
        kind=kind,
        feature=feature,
        model=model,
        value=value,
        reason=reason,
        set_by=set_by,
        expires_at=now + ttl,
        now=now,
    )


def api_client(
    settings: Settings, engine: Engine, client: Client, slack: object = None
) -> httpx.AsyncClient:
    """The API app in this process over `engine`, for httpx (no server, no port)."""
    app = create_app(Services(settings, engine, client, slack))  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@contextlib.asynccontextmanager
async def running_service(client: Client, settings: Settings) -> AsyncIterator[Client]:
    """The worker and the detector as worker.py wires them, over the settings' stores, until
    the block ends (the detector is then terminated: it would outlive the test)."""
    import worker
    from domain.workflow_names import detector_workflow_id

    engine = worker.open_store(settings)
    try:
        async with worker.build_worker(settings, client, engine):
            await worker.ensure_detector(client, settings)
            yield client
            await client.get_workflow_handle(detector_workflow_id(settings.task_queue)).terminate()
    finally:
        engine.dispose()


class FeatureTraffic:
    """One thread per name in `features`, each calling gpt-4.1 on llmock for that feature as
    fast as it is let, through the instrumented client, recorded into `engine`'s stores."""

    def __init__(self, llmock: LLMock, engine: Engine, features: list[str], prompt: str) -> None:
        self.recorder = Recorder(StoreSink(engine), flush_interval=0.05, quality_sample_rate=0)
        self.client = instrument(
            openai.OpenAI(base_url=llmock.base_url(), api_key="test", max_retries=0),
            recorder=self.recorder,
        )
        self.prompt = prompt
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._run, args=(name,), daemon=True) for name in features
        ]

    def _run(self, feature: str) -> None:
        while not self.stop.is_set():
            with llm_context(feature=feature), contextlib.suppress(openai.APIError):
                self.client.chat.completions.create(
                    model="gpt-4.1", messages=[{"role": "user", "content": self.prompt}]
                )

    def __enter__(self) -> FeatureTraffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)
        self.recorder.close()
