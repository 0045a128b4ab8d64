"""A canary on real traffic: an instrumented OpenAI client calls llmock, the runbook reroutes
a third of the sessions, and the `canary.compare` activity reads the call log. A reroute to a
healthy model while gpt-4.1 fails is promoted; a reroute to a failing model is reverted. The
dev server runs in real time, so the window is short (12 s) and the traffic brisk."""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime

import openai
import pytest
from llmock.pytest_plugin import LLMock
from pagerloop_sdk import Recorder, instrument, llm_context
from sqlalchemy import Engine
from sqlmodel import Session, select
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.canary import CanaryActivities
from activities.controls import ControlActivities
from instrumentation.store_sink import StoreSink
from runbooks.base import RunbookInput, RunbookReport
from stores import controls as control_store
from stores.llm_calls import LLMCall
from tests.canary_trial_runbook import CanaryTrialRunbook

THREADS = 6


@contextlib.contextmanager
def traffic(llmock: LLMock, engine: Engine) -> Iterator[None]:
    """Threads calling gpt-4.1 as fast as llmock answers, each call a session of its own."""
    recorder = Recorder(StoreSink(engine), flush_interval=0.05, quality_sample_rate=0)
    client = instrument(
        openai.OpenAI(base_url=llmock.base_url(), api_key="test", max_retries=0),
        recorder=recorder,
    )
    stop = threading.Event()

    def call() -> None:
        while not stop.is_set():
            session = uuid.uuid4().hex
            with (
                llm_context(feature="search", session_id=session),
                contextlib.suppress(openai.APIError),
            ):
                client.chat.completions.create(
                    model="gpt-4.1", messages=[{"role": "user", "content": "find it"}]
                )

    threads = [threading.Thread(target=call, daemon=True) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        recorder.close()


async def run_trial(env: WorkflowEnvironment, engine: Engine, target: str) -> RunbookReport:
    controls = ControlActivities(engine)
    queue = f"canary-trial-{uuid.uuid4().hex[:8]}"
    incident = f"incident-canary-{uuid.uuid4().hex[:8]}"
    async with Worker(
        env.client,
        task_queue=queue,
        workflows=[CanaryTrialRunbook],
        activities=[
            CanaryActivities(engine).compare,
            controls.set,
            controls.revert,
            controls.list_for,
        ],
    ):
        report: RunbookReport = await env.client.execute_workflow(
            CanaryTrialRunbook.run,
            RunbookInput(
                incident_id=incident,
                trigger="error_rate",
                scope="model:gpt-4.1",
                severity="SEV2",
                opened_at=datetime.now(UTC),
                verify_after_seconds=12,
                fallbacks={"gpt-4.1": target},
            ),
            id=f"{incident}-runbook",
            task_queue=queue,
        )
    return report


def canary_calls(engine: Engine) -> list[LLMCall]:
    with Session(engine) as session:
        rows = session.exec(select(LLMCall)).all()
    return [row for row in rows if "canary#" in (row.controls or "")]


@pytest.mark.timeout(180)
async def test_a_canary_onto_a_healthy_model_is_promoted(
    dev_env: WorkflowEnvironment, engine: Engine, llmock: LLMock
) -> None:
    llmock.fail(500, times=None, model="gpt-4.1")  # the model in trouble
    with traffic(llmock, engine):
        report = await run_trial(dev_env, engine, "gpt-4.1-mini")
    [canary] = report.canaries
    assert canary.verdict == "promote", canary
    assert canary.promoted
    assert canary.lines[0].startswith("error rate 0.0% (canary")
    [control] = control_store.active(engine, datetime.now(UTC))
    assert (control.kind, control.value, control.fraction) == ("reroute", "gpt-4.1-mini", None)
    # The slice really went to the other model; the rest kept failing on gpt-4.1.
    tagged = canary_calls(engine)
    assert len(tagged) >= 30
    assert all(row.status == "success" for row in tagged)


@pytest.mark.timeout(180)
async def test_a_canary_onto_a_failing_model_is_reverted(
    dev_env: WorkflowEnvironment, engine: Engine, llmock: LLMock
) -> None:
    llmock.fail(500, times=None, model="gpt-4.1-broken")
    with traffic(llmock, engine):
        report = await run_trial(dev_env, engine, "gpt-4.1-broken")
    [canary] = report.canaries
    assert canary.verdict == "revert", canary
    assert not canary.promoted
    assert "worse on error rate" in canary.reason
    assert control_store.active(engine, datetime.now(UTC)) == []
    assert [ref.kind for ref in report.rolled_back] == ["reroute"]
    tagged = canary_calls(engine)
    assert tagged
    assert all(row.status == "server_error" for row in tagged)
