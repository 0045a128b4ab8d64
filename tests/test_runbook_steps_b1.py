"""The runbook steps built on the queue and validate controls and the golden-set hook: the rate
limit runbook queues low-priority features (disabling only those with nothing answered), the
quality runbook puts a validate control on critical features the app declared a check for,
and asks a golden set (a local eval, signed requests) before it pins a snapshot. Run by the
runbook kit in the time-skipping server, with the real controls store."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from llmock.pytest_plugin import LLMock
from pydantic import SecretStr
from sqlalchemy import Engine
from sqlmodel import Session, select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from temporalio.client import Client
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment

import worker
from activities import golden_set
from activities.diagnosis import FeatureUsage, ModelQuality, ModelRateLimits
from activities.golden_set import GoldenSetActivities, GoldenSetAnswerError, GoldenSetRequest
from config import Settings
from domain.incident import ActionRequest, IncidentStatus
from runbooks import quality_degradation, rate_limit_exhaustion
from runbooks.base import Verification
from runbooks.testing import RunbookKit, Snapshot, recovered_if
from stores import controls
from stores.llm_calls import LLMCall
from tests.conftest import incident_ids
from tests.fakes.server import ThreadedServer
from tests.helpers import FeatureTraffic, eventually, running_service
from workflows.incident import IncidentWorkflow

NOW = datetime(2026, 11, 26, 12, tzinfo=UTC)
SECRET = "golden-secret"


def feature(
    name: str,
    *,
    rate_limited: int = 0,
    models: tuple[str, ...] = ("gpt-4.1",),
    calls_per_minute: float = 40.0,
    answered_per_minute: float = 30.0,
) -> FeatureUsage:
    return FeatureUsage(
        feature=name,
        calls=400,
        tokens=200_000,
        cost_usd=1.0,
        rate_limited=rate_limited,
        share_of_cost=0.2,
        concurrency=2.0,
        models=list(models),
        calls_per_minute=calls_per_minute,
        tokens_per_minute=20_000.0,
        answered_per_minute=answered_per_minute,
    )


def quality(model: str, snapshot: str, mean: float, hours_ago: float) -> ModelQuality:
    seen = NOW - timedelta(hours=hours_ago)
    return ModelQuality(model, snapshot, 200, mean, seen - timedelta(hours=1), seen)


# --- rate limit: queue the low-priority features ------------------------------------------


async def test_rate_limit_queues_low_priority_features_at_half_their_answered_pace(
    time_skipping_env: WorkflowEnvironment, engine: Engine
) -> None:
    snapshot = Snapshot(
        rate_limits=[
            ModelRateLimits("gpt-4.1", calls=1000, rate_limited=300, share=0.3, retries=0)
        ],
        features=[
            feature("search", rate_limited=220, calls_per_minute=301.0, answered_per_minute=135),
            feature("digest", rate_limited=40, calls_per_minute=90.0, answered_per_minute=61.0),
            # Nothing of it got through: no pace to halve.
            feature("enrich", rate_limited=80, calls_per_minute=20.0, answered_per_minute=0.0),
        ],
    )
    helps = recovered_if(lambda controls: any(c.kind == "queue" for c in controls))
    kit = RunbookKit(time_skipping_env.client, engine, snapshot, after=helps)
    run = await kit.run(
        rate_limit_exhaustion.SPEC, feature_priorities={"digest": "low", "enrich": "low"}
    )

    assert run.report.verification == Verification.RECOVERED
    queue = run.control("queue", feature="digest")
    assert queue.value == "30"  # half of the 61 a minute answered
    assert queue.description == "queue feature digest at 30 requests per minute"
    assert run.control("disable", feature="enrich")
    assert not any(c.kind == "disable" and c.feature == "digest" for c in run.controls)
    assert run.control("rpm", feature="search").value == "121"  # the normal feature as before


# --- quality: validate critical outputs --------------------------------------------------------

DEGRADED = Snapshot(
    quality=[
        quality("gpt-4.1", "gpt-4.1-2025-04-14", 0.86, hours_ago=6),
        quality("gpt-4.1", "gpt-4.1-2025-06-01", 0.41, hours_ago=0),
    ],
    features=[
        feature("extract"),
        feature("chat"),
        feature("search"),
    ],
)


async def test_quality_validates_critical_features_with_a_declared_check(
    time_skipping_env: WorkflowEnvironment, engine: Engine
) -> None:
    kit = RunbookKit(
        time_skipping_env.client,
        engine,
        DEGRADED,
        after=recovered_if(lambda controls: any(c.kind == "pin" for c in controls)),
    )
    run = await kit.run(
        quality_degradation.SPEC,
        feature_priorities={"extract": "critical", "chat": "critical", "search": "normal"},
        # chat is critical but declared no check; search declared one but is not critical.
        output_checks={"extract": "schema:invoice", "search": "json"},
    )

    assert run.report.verification == Verification.RECOVERED
    assert run.control("pin", model="gpt-4.1").value == "gpt-4.1-2025-04-14"
    check = run.control("validate", feature="extract")
    assert check.value == "schema:invoice"
    assert check.description == (
        "validate output of feature extract with check schema:invoice, retry once"
    )
    assert sorted(run.kinds) == ["pin", "validate"]


# --- the golden set -------------------------------------------------------------------------


@dataclass
class Eval:
    """A local golden-set eval: verifies pagerloop's signature, records what it was asked, and
    answers the verdicts it is given per candidate (passed by default)."""

    verdicts: dict[str, dict[str, Any]] = field(default_factory=dict)
    asked: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    fail_next: int = 0  # answer 503 to this many requests first

    def app(self) -> Starlette:
        async def evaluate(request: Request) -> Response:
            body = await request.body()
            expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
            if not hmac.compare_digest(expected, request.headers.get("x-pagerloop-signature", "")):
                return JSONResponse({"error": "bad signature"}, status_code=401)
            self.headers.append(dict(request.headers))
            if self.fail_next:
                self.fail_next -= 1
                return JSONResponse({"error": "busy"}, status_code=503)
            asked = json.loads(body)
            self.asked.append(asked)
            default = {"score": 0.9, "passed": True, "details": "48/50 golden prompts ok"}
            return JSONResponse(self.verdicts.get(asked["candidate"], default))

        return Starlette(routes=[Route("/eval", evaluate, methods=["POST"])])


@pytest.fixture
def golden_eval() -> Iterator[tuple[Eval, ThreadedServer]]:
    fake = Eval()
    with ThreadedServer(fake.app()) as server:
        yield fake, server


def golden_activities(server: ThreadedServer) -> GoldenSetActivities:
    return GoldenSetActivities(
        golden_set.make_client(10), SecretStr(f"{server.url}/eval"), SecretStr(SECRET)
    )


async def test_a_failing_golden_set_keeps_the_runbook_from_pinning(
    time_skipping_env: WorkflowEnvironment,
    engine: Engine,
    golden_eval: tuple[Eval, ThreadedServer],
) -> None:
    fake, server = golden_eval
    fake.verdicts["gpt-4.1-2025-04-14"] = {
        "score": 0.52,
        "passed": False,
        "details": "refund prompts regress",
    }
    kit = RunbookKit(
        time_skipping_env.client, engine, DEGRADED, golden_set=golden_activities(server)
    )
    run = await kit.run(quality_degradation.SPEC)

    assert not any(c.kind == "pin" for c in run.controls)
    [asked] = fake.asked
    assert asked == {
        "incident_id": kit.incident_id,
        "scope": "global",
        "model": "gpt-4.1",
        "candidate": "gpt-4.1-2025-04-14",
        "current": "gpt-4.1-2025-06-01",
        "snapshots": ["gpt-4.1-2025-04-14", "gpt-4.1-2025-06-01"],
    }
    key = f"{kit.incident_id}/golden-set/gpt-4.1/gpt-4.1-2025-04-14"
    assert fake.headers[0]["idempotency-key"] == key
    assert any(
        "gpt-4.1-2025-04-14 fails for gpt-4.1, score 0.52: refund prompts regress: not pinned"
        in line
        for line in run.report.findings
    )


async def test_a_passing_golden_set_lets_the_pin_through_after_retries(
    time_skipping_env: WorkflowEnvironment,
    engine: Engine,
    golden_eval: tuple[Eval, ThreadedServer],
) -> None:
    fake, server = golden_eval
    fake.fail_next = 2  # busy twice: the activity policy retries with backoff
    kit = RunbookKit(
        time_skipping_env.client,
        engine,
        DEGRADED,
        after=recovered_if(lambda controls: any(c.kind == "pin" for c in controls)),
        golden_set=golden_activities(server),
    )
    run = await kit.run(quality_degradation.SPEC)

    assert run.control("pin", model="gpt-4.1").value == "gpt-4.1-2025-04-14"
    assert len(fake.headers) == 3
    assert len(fake.asked) == 1
    assert any(
        "gpt-4.1-2025-04-14 passes for gpt-4.1, score 0.90: 48/50 golden prompts ok" in line
        for line in run.report.findings
    )


async def test_without_a_golden_set_nothing_is_asked(
    time_skipping_env: WorkflowEnvironment, engine: Engine
) -> None:
    kit = RunbookKit(
        time_skipping_env.client,
        engine,
        DEGRADED,
        after=recovered_if(lambda controls: any(c.kind == "pin" for c in controls)),
    )
    run = await kit.run(quality_degradation.SPEC)
    assert run.control("pin", model="gpt-4.1").value == "gpt-4.1-2025-04-14"
    assert not any("golden set" in line for line in run.report.findings)


async def test_the_golden_set_activity_refuses_answers_outside_the_contract(
    golden_eval: tuple[Eval, ThreadedServer],
) -> None:
    fake, server = golden_eval
    request = GoldenSetRequest("inc-1", "global", "gpt-4.1", "gpt-4.1-2025-04-14")
    env = ActivityEnvironment()
    fake.verdicts["gpt-4.1-2025-04-14"] = {"score": "high", "passed": "maybe"}
    with pytest.raises(GoldenSetAnswerError, match="score"):
        await env.run(golden_activities(server).evaluate, request)
    unconfigured = GoldenSetActivities(golden_set.make_client(), None, None)
    verdict = await env.run(unconfigured.evaluate, request)
    assert not verdict.evaluated
    assert verdict.passed  # nothing asked blocks nothing
    # A wrong secret is refused by the eval (401): for good, not retried.
    wrong = GoldenSetActivities(
        golden_set.make_client(), SecretStr(f"{server.url}/eval"), SecretStr("wrong")
    )
    with pytest.raises(Exception, match="401") as refused:
        await env.run(wrong.evaluate, request)
    assert type(refused.value).__name__ == "WebhookPermanentError"
    assert server.url.split("//")[1] not in str(refused.value)  # the URL is not quoted


# --- the whole incident: a low-priority feature queued, and the app's client obeying ----------

RPM = 120  # llmock's quota: 2 requests a second
LATENCY = 0.5


@pytest.fixture
def loop_settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "detector_window_seconds": 30,
            "runbook_verify_seconds": 30,
            "feature_priorities": {"search": "normal", "digest": "low"},
        }
    )


@pytest.fixture
async def service(dev_env: WorkflowEnvironment, loop_settings: Settings) -> AsyncIterator[Client]:
    async with running_service(dev_env.client, loop_settings) as client:
        yield client


def queue_controls(engine: Engine, incident_id: str) -> list[controls.Control]:
    return [c for c in controls.active(engine, datetime.now(UTC), incident_id) if c.kind == "queue"]


async def test_a_rate_limit_incident_queues_the_low_priority_feature_and_the_app_obeys(
    service: Client, loop_settings: Settings, llmock: LLMock
) -> None:
    client = service
    llmock.limits(rpm=RPM).delay(LATENCY, times=None)
    engine = worker.open_store(loop_settings)
    try:
        with FeatureTraffic(llmock, engine, ["search"] * 4 + ["digest"] * 3, "go"):
            [incident_id] = await eventually(
                lambda: incident_ids(client, loop_settings.task_queue), timeout=90
            )
            handle = client.get_workflow_handle_for(IncidentWorkflow.run, incident_id)
            [queue] = await eventually(lambda: queue_controls(engine, incident_id), timeout=60)
            assert queue.feature == "digest"
            rate = int(queue.value)
            assert rate >= 1

            async def mitigating() -> bool:
                state = await handle.query(IncidentWorkflow.state)
                return any(entry.kind == "mitigation" for entry in state.timeline)

            await eventually(mitigating, timeout=60)
            state = await handle.query(IncidentWorkflow.state)
            [told] = [e.text for e in state.timeline if e.kind == "mitigation"]
            assert f"queue feature digest at {rate} requests per minute" in told

            await asyncio.sleep(4)  # the clients have read the control (every 2 s)
            sent = len(llmock.requests)
            await asyncio.sleep(12)
            window = llmock.requests[sent:]
            digest = [
                r for r in window if (r.body.get("metadata") or {}).get("feature") == "digest"
            ]
            # Released at the queue's pace (one may be in its turn at either end), while search
            # keeps calling.
            assert len(digest) <= rate * 12 / 60 + 2
            assert any((r.body.get("metadata") or {}).get("feature") == "search" for r in window)
            with Session(engine) as session:
                tagged = session.exec(
                    select(LLMCall).where(LLMCall.controls == f"queue#{queue.id}")
                ).all()
            assert tagged
            assert {row.feature for row in tagged} == {"digest"}

            await handle.execute_update(IncidentWorkflow.resolve, ActionRequest("oncall", "cli"))
            result = await asyncio.wait_for(handle.result(), timeout=60)
            assert result.status == IncidentStatus.RESOLVED
        assert queue_controls(engine, incident_id) == []  # reverted with the incident
    finally:
        engine.dispose()
