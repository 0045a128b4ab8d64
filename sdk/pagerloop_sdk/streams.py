"""Streams are recorded when they end, when the caller closes them early, or when they break.

The SDK's own Stream object is kept (isinstance checks and its methods still work): only its
item iterator and its `close` are wrapped.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from pagerloop_sdk.capture import PendingCall

CLIENT_CLOSED = "client_closed"


def _observer(call: PendingCall) -> Callable[[Any, float], None]:
    return call.observe_chunk if call.operation == "chat" else call.observe_event


def _hidden(call: PendingCall, item: Any) -> bool:
    """The usage chunk we asked for on the caller's behalf: they never see it."""
    return call.hide_usage_chunk and not item.choices and item.usage is not None


def track_stream(stream: Any, call: PendingCall, done: Callable[[], None]) -> Any:
    source: Iterator[Any] = stream._iterator
    observe = _observer(call)
    finished = False

    def finish() -> None:
        nonlocal finished
        if not finished:
            finished = True
            call.ended = time.perf_counter()
            done()

    def iterate() -> Iterator[Any]:
        try:
            for item in source:
                observe(item, time.perf_counter())
                if not _hidden(call, item):
                    yield item
        except GeneratorExit:
            call.finish_reason = call.finish_reason or CLIENT_CLOSED
            finish()
            raise
        except Exception as exc:
            call.fail(exc, time.perf_counter())
            finish()
            raise
        finish()

    original_close = stream.close

    def close() -> None:
        try:
            original_close()
        finally:
            if not finished:
                call.finish_reason = call.finish_reason or CLIENT_CLOSED
                finish()

    stream._iterator = iterate()
    stream.close = close
    return stream


def track_async_stream(stream: Any, call: PendingCall, done: Callable[[], None]) -> Any:
    source: AsyncIterator[Any] = stream._iterator
    observe = _observer(call)
    finished = False

    def finish() -> None:
        nonlocal finished
        if not finished:
            finished = True
            call.ended = time.perf_counter()
            done()

    async def iterate() -> AsyncIterator[Any]:
        try:
            async for item in source:
                observe(item, time.perf_counter())
                if not _hidden(call, item):
                    yield item
        except GeneratorExit:
            call.finish_reason = call.finish_reason or CLIENT_CLOSED
            finish()
            raise
        except Exception as exc:
            call.fail(exc, time.perf_counter())
            finish()
            raise
        finish()

    original_close: Callable[[], Awaitable[None]] = stream.close

    async def close() -> None:
        try:
            await original_close()
        finally:
            if not finished:
                call.finish_reason = call.finish_reason or CLIENT_CLOSED
                finish()

    stream._iterator = iterate()
    stream.close = close
    return stream
