"""The outage runbook's queue and its notice to the app's users: the runbook in the test kit
(time-skipping server, real controls store), the notice POSTed by the real hook activity to a
local receiver that fails, throttles or refuses on request."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import Engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment

from activities.diagnosis import ErrorGroup, FeatureUsage
from activities.hooks import HookActivities, NotifyUsers, idempotency_key
from activities.webhook import SIGNATURE_HEADER, TIMESTAMP_HEADER, TIMESTAMP_SIGNATURE_HEADER
from runbooks import api_outage
from runbooks.base import Verification
from runbooks.testing import RunbookKit, Snapshot, never_recovers
from tests.fakes.server import ThreadedServer

NOW = datetime(2026, 11, 26, 12, tzinfo=UTC)
SECRET = "users-hook-secret"
STATUS_PAGE = "https://status.example.com"


class Receiver(ThreadedServer):
    """The app's side of the hook: answers `answers` in turn (then 200), and tells its users
    once per idempotency key, as a receiver should."""

    def __init__(self, answers: list[int] | None = None) -> None:
        self.answers = list(answers or [])
        self.posts: list[tuple[dict[str, str], bytes]] = []
        self.told: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        super().__init__(Starlette(routes=[Route("/hooks/outage", self._post, methods=["POST"])]))

    async def _post(self, request: Request) -> Response:
        body = await request.body()
        with self._lock:
            self.posts.append((dict(request.headers), body))
            status = self.answers.pop(0) if self.answers else 200
            if status == 200:
                self.told.setdefault(request.headers["idempotency-key"], json.loads(body))
        headers = {"Retry-After": "1"} if status == 429 else None
        return JSONResponse({"status": status}, status, headers=headers)

    @property
    def hook_url(self) -> str:
        return f"{self.url}/hooks/outage"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as server:
        yield server


def hooks(receiver: Receiver, secret: str | None = SECRET) -> HookActivities:
    return HookActivities(
        httpx.AsyncClient(timeout=5),
        SecretStr(receiver.hook_url),
        SecretStr(secret) if secret else None,
        STATUS_PAGE,
    )


def feature(
    name: str, *, calls: int = 400, per_minute: float = 40.0, ok: int = 100
) -> FeatureUsage:
    return FeatureUsage(
        feature=name,
        calls=calls,
        tokens=100_000,
        cost_usd=1.0,
        rate_limited=0,
        share_of_cost=0.25,
        concurrency=2.0,
        models=["gpt-4.1"],
        calls_per_minute=per_minute,
        successes=ok,
    )


OUTAGE = Snapshot(
    errors=[
        ErrorGroup("gpt-4.1", "chat", "server_error", "InternalServerError", 300, NOW, "503"),
        ErrorGroup("gpt-4.1-mini", "search", "server_error", "InternalServerError", 90, NOW, "503"),
    ],
    features=[
        feature("chat"),  # critical: never held back
        feature("search", per_minute=40.0, ok=100),  # a quarter still succeeds: 10/min
        feature("reports", per_minute=3.0, ok=20),  # 0.15/min: at least 1
        feature("summaries", ok=0),  # low, nothing succeeding: disabled, not queued
    ],
)
PRIORITIES = {"chat": "critical", "summaries": "low", "reports": "high"}


def verified(receiver: Receiver, headers: dict[str, str], body: bytes) -> bool:
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    stamped = headers[TIMESTAMP_HEADER.lower()].encode() + b"." + body
    expected_ts = "sha256=" + hmac.new(SECRET.encode(), stamped, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, headers[SIGNATURE_HEADER.lower()]) and hmac.compare_digest(
        expected_ts, headers[TIMESTAMP_SIGNATURE_HEADER.lower()]
    )


async def test_the_outage_runbook_queues_the_non_critical_features_and_tells_users_once(
    time_skipping_env: WorkflowEnvironment, engine: Engine, receiver: Receiver
) -> None:
    receiver.answers = [500]  # the first attempt fails: the activity's retry delivers
    kit = RunbookKit(
        time_skipping_env.client, engine, OUTAGE, after=never_recovers, hooks=hooks(receiver)
    )
    run = await kit.run(api_outage.SPEC, feature_priorities=PRIORITIES)

    queued = {ref.feature: ref.value for ref in run.controls if ref.kind == "queue"}
    # Normal and low with calls still succeeding; not high or critical, not a feature whose
    # every call fails (a queue would only hold its calls until they time out).
    assert queued == {"search": "10"}
    assert run.control("disable", feature="summaries")
    assert run.control("cache")
    assert run.report.verification == Verification.NOT_RECOVERED
    assert run.report.rolled_back == []  # kept while the outage lasts

    # Two attempts, one notice: the same key, body and (valid) signature on both.
    assert len(receiver.posts) == 2
    (first_headers, first_body), (headers, body) = receiver.posts
    assert first_body == body
    key = idempotency_key(kit.incident_id)
    assert key == f"{kit.incident_id}/notify-users"
    assert first_headers["idempotency-key"] == headers["idempotency-key"] == key
    assert verified(receiver, headers, body)
    assert list(receiver.told) == [key]
    notice = receiver.told[key]
    assert notice == {
        "incident_id": kit.incident_id,
        "trigger": "api_outage",
        "scope": "global",
        "severity": "SEV2",
        "summary": "synthetic api_outage on global",
        "message": notice["message"],
        "status_page_url": STATUS_PAGE,
    }
    assert "search may take longer" in notice["message"]
    assert "summaries is paused" in notice["message"]
    assert "chat" not in notice["message"]
    assert any(line.startswith("users notified (HTTP 200)") for line in run.report.findings)


async def test_without_a_hook_the_runbook_says_users_were_not_told(
    time_skipping_env: WorkflowEnvironment, engine: Engine
) -> None:
    kit = RunbookKit(time_skipping_env.client, engine, OUTAGE, after=never_recovers)
    run = await kit.run(api_outage.SPEC, feature_priorities=PRIORITIES)
    assert sorted(run.kinds) == ["cache", "disable", "queue"]
    assert "users not notified: no hook in the runbook kit" in run.report.findings


async def test_a_hook_that_refuses_is_reported_and_the_mitigation_stands(
    time_skipping_env: WorkflowEnvironment, engine: Engine, receiver: Receiver
) -> None:
    receiver.answers = [404]  # permanent: not retried
    kit = RunbookKit(
        time_skipping_env.client, engine, OUTAGE, after=never_recovers, hooks=hooks(receiver)
    )
    run = await kit.run(api_outage.SPEC, feature_priorities=PRIORITIES)
    assert len(receiver.posts) == 1
    assert receiver.told == {}
    [failed] = [line for line in run.report.findings if "could not be notified" in line]
    assert "HTTP 404" in failed
    assert "notify-users" in failed
    assert receiver.hook_url not in failed  # the URL may hold the receiver's token
    assert sorted(run.kinds) == ["cache", "disable", "queue"]


async def test_a_runbook_without_leave_to_mitigate_neither_queues_nor_tells(
    time_skipping_env: WorkflowEnvironment, engine: Engine, receiver: Receiver
) -> None:
    kit = RunbookKit(
        time_skipping_env.client, engine, OUTAGE, after=never_recovers, hooks=hooks(receiver)
    )
    run = await kit.run(api_outage.SPEC, feature_priorities=PRIORITIES, may_mitigate=False)
    assert run.controls == []
    assert receiver.posts == []


# --- the activity on its own ---------------------------------------------------------------------


REQUEST = NotifyUsers("incident-api_outage-global-1", "api_outage", "global", "SEV1", "s", "m")


async def test_an_unconfigured_hook_sends_nothing() -> None:
    activities = HookActivities(httpx.AsyncClient(), None, SecretStr(SECRET))
    result = await ActivityEnvironment().run(activities.notify_users, REQUEST)
    assert (result.sent, result.detail) == (False, "PAGERLOOP_NOTIFY_USERS_URL is not set")


async def test_without_a_secret_the_notice_goes_unsigned_and_without_a_status_page(
    receiver: Receiver,
) -> None:
    activities = HookActivities(httpx.AsyncClient(), SecretStr(receiver.hook_url), None)
    result = await ActivityEnvironment().run(activities.notify_users, REQUEST)
    assert result.sent
    [(headers, body)] = receiver.posts
    assert SIGNATURE_HEADER.lower() not in headers
    assert headers["content-type"] == "application/json"
    assert "status_page_url" not in json.loads(body)


@pytest.mark.parametrize(
    ("status", "error_type", "retryable"),
    [
        (500, "WebhookError", True),
        (429, "WebhookThrottled", True),
        (408, "WebhookError", True),
        (400, "WebhookPermanentError", False),
        (410, "WebhookPermanentError", False),
    ],
)
async def test_a_failed_notice_is_retried_unless_refused(
    receiver: Receiver, status: int, error_type: str, retryable: bool
) -> None:
    from activities.policies import USER_NOTICE

    receiver.answers = [status]
    with pytest.raises(Exception) as raised:  # noqa: PT011 (the type is the point)
        await ActivityEnvironment().run(hooks(receiver).notify_users, REQUEST)
    error = raised.value
    kind = getattr(error, "type", None) or type(error).__name__
    assert kind == error_type
    assert (kind in USER_NOTICE.retry.non_retryable_error_types) != retryable
    assert receiver.hook_url not in str(error)
