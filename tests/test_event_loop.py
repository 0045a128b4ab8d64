"""The event loop never waits on a big request: while the largest accepted batch is parsed,
validated and written, Slack's interactions and the health check still answer within 1 s
(the bound the issue states; Slack itself gives up after 3 s)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy import Engine, func
from sqlmodel import Session, select
from temporalio.testing import WorkflowEnvironment

from api.bounds import MAX_CALLS_PER_BATCH
from config import Settings
from stores.llm_calls import LLMCall
from tests.conftest import free_port, serving_api

KEY = "loop-key"


@pytest.fixture
async def api_url(time_skipping_env: WorkflowEnvironment, engine: Engine) -> AsyncIterator[str]:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        api_port=free_port(),
        ingest_api_keys=KEY,
        slack_signing_secret="loop-secret",
    )
    async with serving_api(settings, time_skipping_env.client, engine) as url:
        yield url


def largest_batch(limit: int) -> bytes:
    """As many calls as a batch may hold, each as large as the body limit then allows."""
    call = {
        "model": "gpt-4.1",
        "status": "error",
        "latency_ms": 1234.5,
        "feature": "f" * 128,
        "input_tokens": 1000,
        "output_tokens": 200,
        "metadata": {"k": "v"},
        "error_message": "",
    }
    room = limit // MAX_CALLS_PER_BATCH - len(json.dumps(call)) - 4
    call["error_message"] = "e" * max(room, 0)
    body = json.dumps({"calls": [call] * MAX_CALLS_PER_BATCH}).encode()
    assert limit * 0.9 < len(body) <= limit
    return body


def empty_objects(limit: int) -> bytes:
    """A body as large as accepted, of a million and a half calls that are all empty."""
    return b'{"calls":[' + b",".join([b"{}"] * ((limit - 20) // 3)) + b"]}"


LIMIT = Settings(_env_file=None).ingest_max_body_bytes  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("body", "stored"),
    [(largest_batch(LIMIT), MAX_CALLS_PER_BATCH), (empty_objects(LIMIT), 0)],
    ids=["largest-batch", "million-empty-objects"],
)
async def test_slack_and_healthz_answer_within_a_second_during_a_big_request(
    api_url: str, engine: Engine, body: bytes, stored: int
) -> None:
    probes: list[float] = []
    async with (
        httpx.AsyncClient(base_url=api_url, timeout=30) as big,
        httpx.AsyncClient(base_url=api_url, timeout=5) as small,
    ):
        upload = asyncio.create_task(
            big.post(
                "/v1/llm-calls",
                content=body,
                headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"},
            )
        )
        while not upload.done():
            for path in ("/slack/interactions", "/healthz"):
                started = time.monotonic()
                answer = (
                    await small.post(path) if path.startswith("/slack") else await small.get(path)
                )
                probes.append(time.monotonic() - started)
                assert answer.status_code in (200, 401, 503)
            await asyncio.sleep(0.01)
        response = await upload

    assert response.status_code == (202 if stored else 422), response.text[:300]
    with Session(engine) as session:
        assert session.exec(select(func.count()).select_from(LLMCall)).one() == stored
    assert probes  # the request was probed while in flight
    assert max(probes) < 1.0, probes
