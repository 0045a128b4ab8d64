"""The concurrency slots of `concurrency` controls: at most `limit` calls in flight per
control, first come first served, shared by threads and any number of event loops."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable, Sequence


class _Waiter:
    __slots__ = ("granted", "wake")

    def __init__(self, wake: Callable[[], None]) -> None:
        self.granted = False
        self.wake = wake


class Limiter:
    """At most `limit` holders at once, first come first served, shared by threads and any
    number of event loops (async waiters never block their loop)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self._lock = threading.Lock()
        self._waiters: deque[_Waiter] = deque()

    def _take(self) -> bool:
        if self.in_flight < self.limit and not self._waiters:
            self.in_flight += 1
            return True
        return False

    def acquire(self) -> None:
        with self._lock:
            if self._take():
                return
            event = threading.Event()
            self._waiters.append(_Waiter(event.set))
        event.wait()

    async def acquire_async(self) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._take():
                return
            future: asyncio.Future[None] = loop.create_future()

            def wake() -> None:
                loop.call_soon_threadsafe(_resolve, future)

            waiter = _Waiter(wake)
            self._waiters.append(waiter)
        try:
            await future
        except asyncio.CancelledError:
            with self._lock:
                if waiter.granted:
                    self._release_locked()
                else:
                    self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        with self._lock:
            self._release_locked()

    def resize(self, limit: int) -> None:
        with self._lock:
            self.limit = limit
            self._grant_locked()

    def _release_locked(self) -> None:
        self.in_flight -= 1
        self._grant_locked()

    def _grant_locked(self) -> None:
        while self._waiters and self.in_flight < self.limit:
            waiter = self._waiters.popleft()
            waiter.granted = True
            self.in_flight += 1
            try:
                waiter.wake()
            except RuntimeError:  # its event loop is closed: nobody will use the slot
                self.in_flight -= 1


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Held:
    """The slots one call holds; released once, however many paths end the call."""

    __slots__ = ("_limiters",)

    def __init__(self, limiters: list[Limiter]) -> None:
        self._limiters: list[Limiter] | None = limiters

    def release(self) -> None:
        limiters, self._limiters = self._limiters, None
        for limiter in reversed(limiters or ()):
            limiter.release()


def acquire(limits: Sequence[tuple[object, Limiter]]) -> Held:
    """A slot of every (control, limiter) pair, taken in the order given: always by control
    id, so two calls under the same controls cannot deadlock."""
    taken: list[Limiter] = []
    for _, limiter in limits:
        limiter.acquire()
        taken.append(limiter)
    return Held(taken)


async def acquire_async(limits: Sequence[tuple[object, Limiter]]) -> Held:
    taken: list[Limiter] = []
    try:
        for _, limiter in limits:
            await limiter.acquire_async()
            taken.append(limiter)
    except BaseException:
        Held(taken).release()
        raise
    return Held(taken)
