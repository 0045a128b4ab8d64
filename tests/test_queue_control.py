"""`queue` controls: calls held and released at the control's rate, refused at once past the
waiting room's bound or when their turn falls after their deadline, waiting no longer than their
deadline for a share, and never sent when refused; through the real OpenAI SDK against llmock,
sync and async, with the controls read from a real store (or handed in as shares)."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import httpx2
import openai
import pytest
from llmock.pytest_plugin import LLMock
from pagerloop_sdk import QueueTimeout, Recorder, instrument, queueing
from pagerloop_sdk import controls as ctl
from pagerloop_sdk.context import llm_context
from sqlalchemy import Engine

from api.controls import in_force_for
from instrumentation.store_controls import source_for
from instrumentation.store_sink import StoreSink
from stores import controls
from tests.helpers import put_control, recorded

CHAT = [{"role": "user", "content": "Summarize the weekly report"}]


@pytest.fixture
def recorder(engine: Engine) -> Iterator[Recorder]:
    recorder = Recorder(StoreSink(engine), quality_sample_rate=0.0, flush_interval=0.05)
    yield recorder
    recorder.close()


def sync_client(llmock: LLMock, recorder: Recorder, **options: Any) -> openai.OpenAI:
    return instrument(
        openai.OpenAI(base_url=llmock.base_url(), api_key="k", max_retries=0, **options),
        recorder=recorder,
    )


def async_client(llmock: LLMock, recorder: Recorder, **options: Any) -> openai.AsyncOpenAI:
    return instrument(
        openai.AsyncOpenAI(base_url=llmock.base_url(), api_key="k", max_retries=0, **options),
        recorder=recorder,
    )


class Shares(ctl.ControlSource):
    """Controls as `GET /v1/controls` hands them to one instance: values are its shares."""

    def __init__(self, *rules: ctl.Rule) -> None:
        self.rules = rules
        super().__init__()

    def read(self) -> tuple[ctl.Rule, ...]:
        return ctl.enforceable(self.rules, shares=True)


def gaps(llmock: LLMock) -> list[float]:
    started = sorted(r.started_at for r in llmock.requests)
    return [b - a for a, b in itertools.pairwise(started)]


def behind_schedule(llmock: LLMock, every: float) -> float:
    """How far the earliest request ran ahead of an even schedule (`every` seconds apart from
    the first): about 0 when paced (threads and HTTP add jitter), much more in a burst."""
    started = sorted(r.started_at for r in llmock.requests)
    return max(i * every - (at - started[0]) for i, at in enumerate(started))


# --- released at the rate ------------------------------------------------------------------------


def test_held_calls_are_released_at_the_rate_and_named_on_their_records(
    llmock: LLMock, recorder: Recorder, engine: Engine
) -> None:
    queue = put_control(engine, "queue", "600", feature="digest")  # one every 0.1 s
    client = sync_client(llmock, recorder)

    def one(_: int) -> str:
        with llm_context(feature="digest"):
            answer = client.chat.completions.create(model="gpt-4.1", messages=CHAT)
        return answer.id

    started = time.monotonic()
    with ThreadPoolExecutor(30) as pool:
        answered = list(pool.map(one, range(30)))
    elapsed = time.monotonic() - started

    assert len(answered) == len(llmock.requests) == 30
    spacing = gaps(llmock)
    # 29 gaps of 0.1 s: released evenly, not in a burst.
    assert 2.6 <= elapsed < 4.5
    assert sum(spacing) == pytest.approx(2.9, abs=0.3)
    assert behind_schedule(llmock, 0.1) < 0.1
    rows = recorded(recorder, engine)
    assert {(r.status, r.controls) for r in rows} == {("success", f"queue#{queue.id}")}

    # Another feature is not queued.
    llmock.reset()
    with ThreadPoolExecutor(10) as pool:
        list(
            pool.map(
                lambda _: client.chat.completions.create(model="gpt-4.1", messages=CHAT), range(10)
            )
        )
    assert sum(gaps(llmock)) < 0.5


async def test_async_callers_are_released_at_the_rate_without_blocking_the_loop(
    llmock: LLMock, recorder: Recorder, engine: Engine
) -> None:
    queue = put_control(engine, "queue", "600", model="gpt-4.1")
    client = async_client(llmock, recorder)
    ticks = 0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0.01)

    beat = asyncio.ensure_future(ticker())
    await asyncio.gather(
        *(client.chat.completions.create(model="gpt-4.1", messages=CHAT) for _ in range(30))
    )
    done.set()
    await beat

    assert len(llmock.requests) == 30
    assert sum(gaps(llmock)) == pytest.approx(2.9, abs=0.3)
    assert behind_schedule(llmock, 0.1) < 0.1
    assert ticks >= 150  # ~3 s of waiting, and the loop kept running throughout
    assert {r.controls for r in recorded(recorder, engine)} == {f"queue#{queue.id}"}


# --- refused at once -----------------------------------------------------------------------------


def test_a_full_queue_refuses_at_once_sends_nothing_and_records_a_timeout(
    llmock: LLMock, recorder: Recorder, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAGERLOOP_QUEUE_MAX", "2")
    queue = put_control(engine, "queue", "6", feature="digest")  # one every 10 s
    client = sync_client(llmock, recorder, timeout=30.0)
    source = source_for(engine)

    def one() -> None:
        with llm_context(feature="digest"):
            client.chat.completions.create(model="gpt-4.1", messages=CHAT)

    one()  # its turn is now
    waiting = [threading.Thread(target=one) for _ in range(2)]  # at +10 s and +20 s
    for thread in waiting:
        thread.start()
    room = source.snapshot().pacers[queue.id]
    assert isinstance(room, queueing.Queue)
    deadline = time.monotonic() + 5
    while room.waiting < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert room.waiting == 2

    started = time.monotonic()
    with llm_context(feature="digest"), pytest.raises(openai.APITimeoutError) as raised:
        client.chat.completions.create(model="gpt-4.1", messages=CHAT)
    assert time.monotonic() - started < 0.3
    error = raised.value
    assert isinstance(error, QueueTimeout)
    assert error.control_id == queue.id
    assert "queue is full" in error.message
    assert isinstance(error.request, httpx2.Request)
    assert str(error.request.url) == llmock.base_url().rstrip("/") + "/chat/completions"
    assert len(llmock.requests) == 1  # the refused call was never sent

    # The control goes: the calls it held go at once.
    controls.revert(engine, queue.incident_id, datetime.now(UTC))
    source.refresh()
    for thread in waiting:
        thread.join(timeout=3)
        assert not thread.is_alive()
    assert len(llmock.requests) == 3

    # What the queue held back is not a call OpenAI failed: only the calls sent are recorded.
    rows = recorded(recorder, engine)
    assert [(r.status, r.controls) for r in rows] == [("success", f"queue#{queue.id}")] * 3
    assert {r.feature for r in rows} == {"digest"}


def test_a_turn_past_the_deadline_fails_at_once_and_gives_its_turn_back(
    llmock: LLMock, recorder: Recorder, engine: Engine
) -> None:
    queue = put_control(engine, "queue", "60")  # one a second
    client = sync_client(llmock, recorder)
    client.chat.completions.create(model="gpt-4.1", messages=CHAT)  # its turn is now

    started = time.monotonic()
    with pytest.raises(QueueTimeout) as raised:  # its turn is 1 s away, after its deadline
        client.chat.completions.create(model="gpt-4.1", messages=CHAT, timeout=0.3)
    assert time.monotonic() - started < 0.2
    assert "past its deadline" in raised.value.message

    # The turn given back is the next caller's: 1 s after the first, not 2.
    client.chat.completions.create(model="gpt-4.1", messages=CHAT, timeout=5.0)
    assert len(llmock.requests) == 2
    assert gaps(llmock)[0] == pytest.approx(1.0, abs=0.3)
    statuses = [(r.status, r.controls) for r in recorded(recorder, engine)]
    tag = f"queue#{queue.id}"
    assert statuses == [("success", tag), ("success", tag)]


# --- waiting until the deadline ------------------------------------------------------------------


def test_a_share_of_zero_waits_until_the_calls_own_timeout(
    llmock: LLMock, recorder: Recorder
) -> None:
    source = Shares(ctl.Rule(7, "queue", feature="digest", value="0", incident_id="inc-1"))
    client = instrument(
        openai.OpenAI(base_url=llmock.base_url(), api_key="k", max_retries=0),
        recorder=recorder,
        controls=source,
    )
    started = time.monotonic()
    with llm_context(feature="digest"), pytest.raises(QueueTimeout) as raised:
        client.chat.completions.create(model="gpt-4.1", messages=CHAT, timeout=0.6)
    assert 0.55 <= time.monotonic() - started < 1.2
    assert raised.value.incident_id == "inc-1"
    assert llmock.requests == []
    assert recorder.flush()
    # Another feature is not held.
    client.chat.completions.create(model="gpt-4.1", messages=CHAT)
    assert len(llmock.requests) == 1


def test_the_clients_timeout_bounds_the_wait_and_the_setting_caps_it(
    llmock: LLMock, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    rule = ctl.Rule(8, "queue", value="0")
    client = instrument(
        openai.OpenAI(base_url=llmock.base_url(), api_key="k", max_retries=0, timeout=0.5),
        recorder=recorder,
        controls=Shares(rule),
    )
    started = time.monotonic()
    with pytest.raises(QueueTimeout):
        client.responses.create(model="gpt-4.1", input="hello")
    assert 0.45 <= time.monotonic() - started < 1.1

    monkeypatch.setenv("PAGERLOOP_QUEUE_TIMEOUT", "0.4")
    capped = instrument(
        openai.OpenAI(base_url=llmock.base_url(), api_key="k", max_retries=0),  # 600 s
        recorder=recorder,
        controls=Shares(ctl.Rule(9, "queue", value="0")),
    )
    started = time.monotonic()
    with pytest.raises(QueueTimeout) as raised:
        capped.embeddings.create(model="text-embedding-3-small", input="hello")
    assert 0.35 <= time.monotonic() - started < 1.0
    assert str(raised.value.request.url).endswith("/embeddings")
    assert llmock.requests == []


async def test_async_refusals_and_deadlines(
    llmock: LLMock, recorder: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAGERLOOP_QUEUE_MAX", "1")
    client = instrument(
        openai.AsyncOpenAI(base_url=llmock.base_url(), api_key="k", max_retries=0),
        recorder=recorder,
        controls=Shares(ctl.Rule(11, "queue", value="0")),
    )
    first = asyncio.ensure_future(
        client.chat.completions.create(model="gpt-4.1", messages=CHAT, timeout=0.8)
    )
    await asyncio.sleep(0.1)  # waiting for a share: the room is full
    started = time.monotonic()
    with pytest.raises(QueueTimeout) as full:
        await client.chat.completions.create(model="gpt-4.1", messages=CHAT, timeout=5)
    assert time.monotonic() - started < 0.2
    assert "queue is full" in full.value.message
    with pytest.raises(openai.APITimeoutError):
        await first
    assert time.monotonic() - started < 1.2
    assert llmock.requests == []

    # A cancelled caller leaves the room.
    waiting = asyncio.ensure_future(
        client.chat.completions.create(model="gpt-4.1", messages=CHAT, timeout=5)
    )
    await asyncio.sleep(0.1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    room = (await client._pagerloop_options.controls.snapshot_async()).pacers[11]  # type: ignore[attr-defined]
    assert isinstance(room, queueing.Queue)
    assert room.waiting == 0


# --- pure parts ---------------------------------------------------------------------------------


def test_the_wait_budget_is_the_calls_timeout_else_the_clients_capped() -> None:
    client = openai.OpenAI(api_key="k", timeout=20.0)
    create = client.chat.completions.create
    assert queueing.budget(create, {"timeout": 5}, cap=60) == 5
    assert queueing.budget(create, {"timeout": openai.Timeout(8.0, connect=1.0)}, cap=60) == 8
    assert queueing.budget(create, {}, cap=60) == 20  # the client's
    assert queueing.budget(create, {"timeout": openai.NOT_GIVEN}, cap=60) == 20
    assert queueing.budget(create, {"timeout": None}, cap=60) == 60  # no timeout: the cap
    assert queueing.budget(create, {"timeout": 500}, cap=60) == 60
    default = openai.OpenAI(api_key="k").chat.completions.create  # 600 s read timeout
    assert queueing.budget(default, {}, cap=45) == 45


def test_queue_controls_are_counted_shared_described_and_checked() -> None:
    assert ctl.problem("queue", "120") is None
    assert ctl.problem("queue", "0") is not None  # a whole app's rate is at least 1...
    assert ctl.problem("queue", "0", share=True) is None  # ...an instance's share may be 0
    assert controls.validate("queue", "ten") is not None
    assert controls.describe("queue", "digest", None, "60") == (
        "queue feature digest at 60 requests per minute"
    )
    # The API hands each instance its share of the app's rate, as for rpm.
    row = controls.Control(
        id=3,
        key="i/queue/digest/*",
        kind="queue",
        feature="digest",
        value="60",
        incident_id="i",
        set_by="runbook:test",
        created_at=datetime(2026, 11, 26, tzinfo=UTC),
        updated_at=datetime(2026, 11, 26, tzinfo=UTC),
        expires_at=datetime(2026, 11, 27, tzinfo=UTC),
    )
    early = datetime(2026, 11, 26, 11, tzinfo=UTC)
    live = [("a", early), ("b", early), ("c", early)]
    [shown] = in_force_for([row], "b", live, datetime(2026, 11, 26, 12, tzinfo=UTC)).controls
    assert (shown.value, shown.limit) == ("20", 60)


def test_a_queue_that_goes_lets_its_waiters_through() -> None:
    queue = queueing.Queue(6, max_waiting=5, timeout_cap=30)  # one every 10 s
    assert queue.reserve(1) == 0
    went = threading.Event()

    def waiter() -> None:
        assert (
            queueing.wait([(ctl.Rule(1, "queue", value="6"), queue)], lambda: None, {}, "chat", [])
            is None
        )
        went.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    assert not went.wait(0.3)
    queue.resize(None)  # the control was reverted
    assert went.wait(1.5)
    thread.join()
    assert queue.waiting == 0
