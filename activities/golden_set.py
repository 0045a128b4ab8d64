"""The golden-set hook: before the quality runbook pins a model to an older snapshot, it asks
the SRE's own eval (PAGERLOOP_GOLDEN_SET_URL) how that snapshot does on their golden set.

One JSON POST per candidate pin:

    {"incident_id", "scope", "model", "candidate", "current", "snapshots": [...]}

`model` is the model the app asks for, `candidate` the snapshot the runbook would pin it to,
`current` the snapshot answering now (the degraded one), `snapshots` every snapshot of the
model seen lately (for an eval that compares them). The answer must be JSON:

    {"score": <number>, "passed": <bool>, "details": "<text, optional>"}

`passed: false` keeps the runbook from pinning that snapshot; the score and the details go into
the incident's diagnosis.

The POST is signed as the webhook channel signs its alerts (`activities.webhook.sign`:
`X-Pagerloop-Signature`, `X-Pagerloop-Timestamp`, `X-Pagerloop-Timestamp-Signature`) with
PAGERLOOP_GOLDEN_SET_SECRET (else PAGERLOOP_WEBHOOK_SECRET), and carries
`Idempotency-Key: <incident>/golden-set/<model>/<candidate>`, the same on every attempt: an eval
that caches by it runs once per question, whatever the retries. Answers are treated as the
webhook channel's are (5xx, 408, 425, 429 and network errors retried with the policy's backoff;
any other 4xx or a redirect refused for good), and an answer that is not the JSON above is
refused for good (`GoldenSetAnswerError`): the eval's contract is broken, not its availability.
The URL is a secret (a hosted eval may take its token there): errors and logs name the host only.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
from pydantic import BaseModel, SecretStr, ValidationError, field_validator
from temporalio import activity

from activities.signed_post import signed_post
from activities.webhook import WebhookActivities

_log = logging.getLogger(__name__)

TARGET = "golden-set"  # how errors and logs name the eval (its URL may hold a token)
EVENT = "golden_set"
# Evals run a model over a set of prompts: longer than a webhook answers, shorter than the
# policy's start-to-close (activities.policies.GOLDEN_SET_EVAL).
TIMEOUT_SECONDS = 90.0
ANSWER_MAX_BYTES = 64_000
DETAILS_MAX = 1000


class GoldenSetAnswerError(Exception):
    """The eval answered 2xx with something other than {"score", "passed", "details"}:
    retrying cannot help."""


@dataclass
class GoldenSetRequest:
    incident_id: str
    scope: str
    model: str  # as the app asks for it
    candidate: str  # the snapshot the runbook would pin it to
    current: str = ""  # the snapshot answering now
    snapshots: list[str] = field(default_factory=list)


@dataclass
class GoldenSetVerdict:
    evaluated: bool  # False: no golden set is configured (nothing was asked)
    passed: bool = True
    score: float | None = None
    details: str = ""


class _Answer(BaseModel):
    score: float
    passed: bool
    details: str = ""

    @field_validator("score")
    @classmethod
    def _finite(cls, score: float) -> float:
        if not math.isfinite(score):
            raise ValueError("a finite number")
        return score


def idempotency_key(request: GoldenSetRequest) -> str:
    return f"{request.incident_id}/{TARGET}/{request.model}/{request.candidate}"


def make_client(timeout: float = TIMEOUT_SECONDS) -> httpx.AsyncClient:
    """The client the worker injects: no redirects (the signed body would go to a host nobody
    configured)."""
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout), follow_redirects=False)


def verdict_of(body: bytes) -> GoldenSetVerdict:
    """The eval's answer (pure); GoldenSetAnswerError when it is not the contract's JSON."""
    try:
        answer = _Answer.model_validate_json(body)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        raise GoldenSetAnswerError(
            f'{TARGET} answered something other than {{"score", "passed", "details"}}: '
            f"{problems[:300]}"
        ) from None
    details = " ".join(answer.details.split())
    if len(details) > DETAILS_MAX:
        details = details[: DETAILS_MAX - 1] + "…"
    return GoldenSetVerdict(True, answer.passed, answer.score, details)


class GoldenSetActivities:
    """Registered whether or not an eval is configured: without one the activity answers
    `evaluated=False`."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        url: SecretStr | None,
        secret: SecretStr | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._configured = url is not None
        # The webhook channel's signing and URL handling (its log redaction included).
        self._webhook = WebhookActivities(client, secret, {TARGET: url} if url else {}, clock)

    @activity.defn(name="golden_set.evaluate")
    async def evaluate(self, request: GoldenSetRequest) -> GoldenSetVerdict:
        if not self._configured:
            return GoldenSetVerdict(False, details="PAGERLOOP_GOLDEN_SET_URL is not set")

        async def judged(response: httpx.Response) -> GoldenSetVerdict:
            verdict = verdict_of(await _read(response))
            _log.info(
                "golden set: %s as %s scored %s (passed: %s)",
                request.model,
                request.candidate,
                verdict.score,
                verdict.passed,
            )
            return verdict

        payload = {
            "incident_id": request.incident_id,
            "scope": request.scope,
            "model": request.model,
            "candidate": request.candidate,
            "current": request.current,
            "snapshots": list(request.snapshots),
        }
        return await signed_post(
            self._client,
            self._webhook,
            TARGET,
            EVENT,
            payload,
            idempotency_key(request),
            judged,
            error_type="GoldenSetError",
        )


async def _read(response: httpx.Response) -> bytes:
    """The answer, at most ANSWER_MAX_BYTES (a verdict is a few bytes; anything larger is not
    one)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size > ANSWER_MAX_BYTES:
            raise GoldenSetAnswerError(f"{TARGET} answered more than {ANSWER_MAX_BYTES} bytes")
    return b"".join(chunks)
