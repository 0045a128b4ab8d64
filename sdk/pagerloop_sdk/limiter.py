"""The mechanics of the limits: the slots of `concurrency` controls (at most `limit` calls in
flight per control, first come first served, shared by threads and any number of event loops),
and the pacing of `rpm` and `tpm` controls (calls spaced evenly over the minute, not let
through in bursts: OpenAI counts its own limits per minute but enforces them over shorter
spans, so a burst of a minute's worth is refused all the same)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence


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


# A pacer whose share is 0 (more app instances than the limit) lets nothing through; its
# waiters look again this often, for a share.
IDLE_RECHECK = 0.5


class Pacer:
    """`per_minute` units (requests, or tokens) per minute, spaced evenly: each reservation
    takes the next free moment on a schedule (GCRA's virtual time), so calls go one every
    60/per_minute seconds rather than all at the start of a minute. Idle time banks nothing.
    `per_minute` None: no limit (the control is gone).

    A new rate (this process's share changed, or the control did) starts a new schedule: the
    callers already waiting take their turn again on it, so a smaller share stops the backlog
    at once and a larger one shortens the waits."""

    def __init__(self, per_minute: int | None) -> None:
        self.per_minute = per_minute
        self.generation = 0  # one more at each resize: waiters on an older schedule re-reserve
        self._lock = threading.Lock()
        self._next = 0.0  # time.monotonic() at which the next unit may go
        # Tokens are known only after the call: a call reserves an estimate (its prompt's
        # size, plus its output limit or the typical output of the calls before it) and
        # settles the difference when it ends.
        self.typical_output = 256.0

    def resize(self, per_minute: int | None) -> None:
        with self._lock:
            self.per_minute = per_minute
            self.generation += 1
            self._next = time.monotonic()

    def reserve(self, units: float) -> float | None:
        """Take `units` off the schedule: how long to wait before going (0: now), or None
        when nothing may go now (a share of 0): ask again after IDLE_RECHECK. One call takes
        at most a minute of the schedule: a call bigger than a minute's tokens goes once a
        minute rather than holding everyone behind it for longer."""
        return self.turn(units)[0]

    def turn(self, units: float) -> tuple[float | None, int]:
        """`reserve`, and the schedule's generation it was reserved on."""
        with self._lock:
            rate = self.per_minute
            if rate is None:
                return 0.0, self.generation
            if rate <= 0:
                return None, self.generation
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + min(units * 60.0 / rate, 60.0)
            return start - now, self.generation

    def give_back(self, units: float, generation: int) -> None:
        """Return a reservation that will not be used (a queued call gave up its turn), so the
        calls behind it do not wait for an empty slot; a schedule renewed since owes nothing."""
        with self._lock:
            rate = self.per_minute
            if rate and generation == self.generation:
                self._next -= min(units * 60.0 / rate, 60.0)

    def settle(self, estimated: float, actual: float, output: float) -> None:
        """Correct a reservation made on an estimate (tokens are known after the call)."""
        with self._lock:
            rate = self.per_minute
            if rate:
                self._next += min((actual - estimated) * 60.0 / rate, 60.0)
            self.typical_output += (output - self.typical_output) / 8


def _waits(reservations: Sequence[tuple[Pacer, float]]) -> Iterator[float]:
    """The sleeps until every (pacer, units) pair has its place on its schedule; again on the
    new schedule when the pacer is resized meanwhile, and none once its control goes."""
    for pacer, units in reservations:
        delay, generation = pacer.turn(units)
        while delay is None or delay > 0:
            yield IDLE_RECHECK if delay is None else min(delay, IDLE_RECHECK)
            if pacer.per_minute is None:
                break
            if delay is None or pacer.generation != generation:
                delay, generation = pacer.turn(units)
            else:
                delay -= IDLE_RECHECK


def pace(reservations: Sequence[tuple[Pacer, float]]) -> None:
    """Wait for a place on the schedule of every (pacer, units) pair (`_waits`)."""
    for seconds in _waits(reservations):
        time.sleep(seconds)


async def pace_async(reservations: Sequence[tuple[Pacer, float]]) -> None:
    for seconds in _waits(reservations):
        await asyncio.sleep(seconds)
