"""The pacing of `rpm` and `tpm` controls (pagerloop_sdk.limiter.Pacer): pure timing, no I/O."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from pagerloop_sdk.enforce import estimate_tokens
from pagerloop_sdk.limiter import Pacer, pace, pace_async


def test_reservations_are_spaced_evenly_over_the_minute() -> None:
    pacer = Pacer(600)  # one every 0.1 s
    delays = [pacer.reserve(1) or 0.0 for _ in range(4)]
    assert delays == pytest.approx([0.0, 0.1, 0.2, 0.3], abs=0.01)


def test_idle_time_banks_no_burst() -> None:
    pacer = Pacer(600)
    pacer.reserve(1)
    time.sleep(0.35)  # three and a half slots idle
    assert pacer.reserve(1) == 0
    second = pacer.reserve(1)
    assert second == pytest.approx(0.1, abs=0.01)  # not three more at once


def test_a_share_of_zero_waits_for_a_share() -> None:
    pacer = Pacer(0)
    assert pacer.reserve(1) is None
    went = threading.Event()
    waiter = threading.Thread(target=lambda: (pace([(pacer, 1)]), went.set()))
    waiter.start()
    assert not went.wait(0.7)
    pacer.resize(60)
    assert went.wait(2)
    waiter.join()


def test_a_control_that_goes_releases_its_waiters() -> None:
    pacer = Pacer(1)  # one a minute
    pacer.reserve(1)
    started = time.monotonic()
    waiter = threading.Thread(target=pace, args=([(pacer, 1)],))
    waiter.start()
    time.sleep(0.2)
    pacer.resize(None)
    waiter.join(timeout=5)
    assert not waiter.is_alive()
    assert time.monotonic() - started < 2  # not the minute it had reserved


async def test_async_callers_are_paced_without_blocking_the_loop() -> None:
    pacer = Pacer(1200)  # one every 0.05 s
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    beat = asyncio.create_task(ticker())
    started = time.monotonic()
    await asyncio.gather(*(pace_async([(pacer, 1)]) for _ in range(5)))
    elapsed = time.monotonic() - started
    beat.cancel()
    assert 0.18 <= elapsed < 0.6  # the fifth waited four slots
    assert ticks >= 10  # the loop kept running meanwhile


def test_a_token_estimate_is_settled_when_the_call_ends() -> None:
    pacer = Pacer(6000)  # 100 tokens a second
    assert pacer.reserve(100) == 0  # the schedule moves 1 s on
    pacer.settle(100, actual=10, output=5)  # it used 10: 0.9 s given back
    assert pacer.reserve(1) == pytest.approx(0.1, abs=0.02)
    assert pacer.typical_output < 256  # later estimates learn from it


def test_a_call_is_estimated_from_its_prompt_and_output_limit() -> None:
    messages = [{"role": "user", "content": "x" * 400}]
    with_limit = estimate_tokens({"messages": messages, "max_tokens": 50}, typical_output=300)
    assert 100 + 50 <= with_limit < 100 + 50 + 20  # ~4 characters a token, plus the limit
    without = estimate_tokens({"messages": messages}, typical_output=300)
    assert without == pytest.approx(with_limit - 50 + 300)
    assert estimate_tokens({"input": "y" * 40}, typical_output=7) == 17


def test_a_larger_share_shortens_the_waits_already_reserved() -> None:
    pacer = Pacer(1)  # one a minute: the second caller is a minute away
    pacer.reserve(1)
    waiter = threading.Thread(target=pace, args=([(pacer, 1)],))
    started = time.monotonic()
    waiter.start()
    time.sleep(0.2)
    pacer.resize(6000)  # the share grew: a new schedule
    waiter.join(timeout=5)
    assert not waiter.is_alive()
    assert time.monotonic() - started < 2


def test_a_share_dropping_to_zero_stops_the_backlog() -> None:
    pacer = Pacer(600)
    for _ in range(5):
        pacer.reserve(1)  # half a second of backlog
    went = threading.Event()
    waiter = threading.Thread(target=lambda: (pace([(pacer, 1)]), went.set()))
    waiter.start()
    pacer.resize(0)  # another replica joined: this one's share is 0 for now
    assert not went.wait(1.2)  # the backlog does not drain at the old rate
    pacer.resize(600)
    assert went.wait(2)
    waiter.join()


def test_one_call_takes_at_most_a_minute_of_the_schedule() -> None:
    pacer = Pacer(100)  # a small tpm share
    assert pacer.reserve(4_000) == 0  # 40 minutes' worth of tokens
    second = pacer.reserve(10)
    assert second is not None
    assert second <= 60.0
