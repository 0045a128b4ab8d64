"""The simulated application of `pagerloop simulate`: its instrumented OpenAI client, and the
loops of calls each feature makes (`Traffic` in `cli/scenarios.py`), counted in `Progress`."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import openai
from pagerloop_sdk import FeatureDisabled, Recorder, instrument, llm_context
from pagerloop_sdk.classify import classify_exception

from cli.fault_server import API_KEY
from cli.scenarios import Traffic
from cli.simulate_progress import STATUSES, Progress

RESPONSE_CACHE_SIZE = 256
CALL_TIMEOUT_SECONDS = 30.0
DISABLED_PAUSE_SECONDS = 1.0
MIN_CALL_SECONDS = 0.05


def make_client(base_url: str, progress: Progress, recorder: Recorder) -> openai.AsyncOpenAI:
    """The application's client: no retries of its own (backoff comes from the controls),
    instrumented with a response cache (what a `cache` control serves from)."""

    async def count_request(request: Any) -> None:
        try:
            model = json.loads(request.content).get("model")
        except (ValueError, AttributeError, TypeError):
            return
        if isinstance(model, str):
            progress.request_sent(model)

    http_client = openai.DefaultAsyncHttpxClient(event_hooks={"request": [count_request]})
    client = openai.AsyncOpenAI(
        base_url=base_url,
        api_key=API_KEY,
        max_retries=0,
        timeout=CALL_TIMEOUT_SECONDS,
        http_client=http_client,
    )
    return instrument(client, recorder=recorder, response_cache=RESPONSE_CACHE_SIZE)


def _status(exc: BaseException) -> str:
    status = classify_exception(exc)[0]
    return status if status in STATUSES else "error"


async def one_call(
    client: openai.AsyncOpenAI,
    traffic: Traffic,
    worker_index: int,
    call_number: int,
    progress: Progress,
) -> tuple[str, float]:
    kwargs = traffic.request(call_number)
    started = time.perf_counter()
    served: str | None = None
    with llm_context(
        feature=traffic.feature,
        team="simulate",
        environment="simulate",
        user_id=f"sim-user-{worker_index % 7}",
        session_id=f"sim-{traffic.feature}-{worker_index}",
    ):
        try:
            response_id: str | None = None
            if kwargs.get("stream"):
                stream = await client.chat.completions.create(**kwargs)
                async for chunk in stream:
                    served = chunk.model or served
                    response_id = chunk.id or response_id
            else:
                response = await client.chat.completions.create(**kwargs)
                served, response_id = response.model, response.id
            # A response seen before came from the response cache (llmock's ids are unique).
            status = "cached" if response_id in progress.response_ids else "success"
            if response_id:
                progress.response_ids.add(response_id)
        except FeatureDisabled:
            status = "disabled"
        except Exception as exc:
            status = _status(exc)
    seconds = time.perf_counter() - started
    progress.record(status, seconds, served)
    return status, seconds


async def sleep_until(progress: Progress, at: float) -> None:
    """Sleep until `at` seconds into the run."""
    delay = at - progress.elapsed()
    if delay > 0:
        await asyncio.sleep(delay)


async def traffic_loop(
    client: openai.AsyncOpenAI,
    traffic: Traffic,
    worker_index: int,
    start: float,
    end: float,
    progress: Progress,
) -> None:
    await sleep_until(progress, start)
    call_number = worker_index  # loops of one feature start on different prompts
    while progress.elapsed() < end:
        status, seconds = await one_call(client, traffic, worker_index, call_number, progress)
        call_number += 1
        pause = traffic.think_seconds
        if status == "disabled":
            pause = max(pause, DISABLED_PAUSE_SECONDS)  # the app shows "unavailable" a while
        elif seconds < MIN_CALL_SECONDS:
            pause = max(pause, MIN_CALL_SECONDS)  # instant failures: no busy loop
        await asyncio.sleep(min(pause, max(0.0, end - progress.elapsed())))
