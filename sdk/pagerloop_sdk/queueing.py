"""`queue` controls: hold the calls of a feature (or model) and release them at `value` requests
per minute, this process's share of the whole app's rate, instead of failing them.

A queue is the `Pacer` of rpm controls (calls spaced evenly over the minute) with a waiting room
in front and a deadline behind:
- at most PAGERLOOP_QUEUE_MAX calls (1000) wait per control and process: one more is refused
  at once, since the room is a bound on the memory and threads an overloaded app ties up;
- no call waits past its deadline: its own `timeout`, else its client's, capped by
  PAGERLOOP_QUEUE_TIMEOUT (60 s). A call whose turn on the schedule falls after its deadline is
  refused at once and gives its turn back (waiting would only delay the same failure, and the
  calls behind it would wait for a slot nobody uses); a process whose share is 0 (more replicas
  than the rate) waits for a share until the deadline.

Refused or late, the call raises `QueueTimeout`, an `openai.APITimeoutError`: the exception the
OpenAI SDK raises on its own timeouts, so the app's existing timeout handling covers it. Nothing
is sent and nothing recorded, as for a disabled call: a timeout in the call log would count in
the golden signals as OpenAI failing, and would make the mitigation's verification read its own
refusals. A queue control that goes
(reverted, expired) lets its waiting calls through at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import httpx2
import openai

from pagerloop_sdk.limiter import IDLE_RECHECK, Pacer

log = logging.getLogger(__name__)

QUEUE_MAX_ENV = "PAGERLOOP_QUEUE_MAX"
QUEUE_TIMEOUT_ENV = "PAGERLOOP_QUEUE_TIMEOUT"
DEFAULT_QUEUE_MAX = 1000
DEFAULT_QUEUE_TIMEOUT = 60.0
# The endpoint each operation would have called, for the request the timeout error carries.
PATHS = {"chat": "chat/completions", "responses": "responses", "embeddings": "embeddings"}
DEFAULT_BASE_URL = "https://api.openai.com/v1/"


def _setting(name: str, default: float) -> float:
    """A positive number from the environment; the default (with a warning) when it is not."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        log.warning("%s=%r is not a positive number: using %s", name, raw, default)
        return default
    return value


class Rule(Protocol):
    """A queue control as `pagerloop_sdk.controls.Rule` has it (which imports this module)."""

    @property
    def id(self) -> int: ...

    @property
    def incident_id(self) -> str: ...

    @property
    def tag(self) -> str: ...


class Queue(Pacer):
    """A pacer (one request per turn) with a bounded waiting room."""

    def __init__(
        self,
        per_minute: int | None,
        *,
        max_waiting: int | None = None,
        timeout_cap: float | None = None,
    ) -> None:
        super().__init__(per_minute)
        self.max_waiting = (
            max_waiting
            if max_waiting is not None
            else int(_setting(QUEUE_MAX_ENV, DEFAULT_QUEUE_MAX))
        )
        self.timeout_cap = (
            timeout_cap
            if timeout_cap is not None
            else _setting(QUEUE_TIMEOUT_ENV, DEFAULT_QUEUE_TIMEOUT)
        )
        self.waiting = 0

    def enter(self) -> bool:
        """Take a place in the waiting room; False when it is full."""
        with self._lock:
            if self.waiting >= self.max_waiting:
                return False
            self.waiting += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.waiting -= 1


class QueueTimeout(openai.APITimeoutError):
    """A queue control held the call and could not release it in time: nothing was sent.

    An `openai.APITimeoutError`, so an app that already handles the OpenAI SDK's timeouts
    (a retry later, a fallback, an error page) handles this one the same way."""

    def __init__(self, request: httpx2.Request, rule: Rule, why: str) -> None:
        by = f"incident {rule.incident_id}" if rule.incident_id else "a control set by hand"
        message = f"Request timed out: held by queue control #{rule.id} ({by}): {why}"
        openai.APIConnectionError.__init__(self, message=message, request=request)
        self.control_id = rule.id
        self.incident_id = rule.incident_id
        self.why = why


class _TooLateError(Exception):
    """The call's turn cannot come before its deadline."""


class _Turn:
    """One call's place on a queue's schedule."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue
        self.held = False  # a reservation on the schedule that is not used yet
        self._take()

    def _take(self) -> None:
        self.delay, self.generation = self.queue.turn(1.0)
        self.at = time.monotonic()
        self.held = self.delay is not None

    def pause(self, deadline: float) -> float | None:
        """How long to sleep before looking again, or None: go now. Raises _TooLateError."""
        queue = self.queue
        if queue.per_minute is None:  # the control is gone: everyone goes
            self.held = False
            return None
        if self.delay is None or queue.generation != self.generation:
            self._take()  # no share yet, or a new schedule: a turn on it
        now = time.monotonic()
        if self.delay is None:
            if now >= deadline:
                raise _TooLateError("no share of the rate came before the deadline")
            return min(IDLE_RECHECK, deadline - now)
        due = self.at + self.delay
        if due <= now:
            self.held = False
            return None
        if due > deadline:
            self.give_back()
            raise _TooLateError(f"its turn was {due - self.at:.1f} s away, past its deadline")
        # Looked at again every IDLE_RECHECK: a control that goes or a share that grows
        # releases it sooner.
        return min(due - now, IDLE_RECHECK)

    def pauses(self, deadline: float) -> Iterator[float]:
        while (pause := self.pause(deadline)) is not None:
            yield pause

    def give_back(self) -> None:
        if self.held:
            self.held = False
            self.queue.give_back(1.0, self.generation)


def _seconds(timeout: Any) -> float | None:
    """A timeout as the OpenAI SDK takes it (seconds, or an httpx Timeout) in seconds; None
    for no timeout or one not given."""
    if isinstance(timeout, bool):
        return None
    if isinstance(timeout, int | float):
        return float(timeout)
    if isinstance(timeout, httpx2.Timeout):
        # The read timeout is how long the SDK waits for an answer: what a caller means.
        parts = [timeout.read, timeout.write, timeout.pool, timeout.connect]
        given = [part for part in parts if part is not None]
        return float(given[0]) if given else None
    return None


def _client(original: Callable[..., Any]) -> Any:
    # The wrapped method is bound to an OpenAI resource (client.chat.completions), which
    # holds its client.
    return getattr(getattr(original, "__self__", None), "_client", None)


def budget(original: Callable[..., Any], kwargs: Mapping[str, Any], cap: float) -> float:
    """How long the call may wait: its own `timeout`, else its client's, at most `cap`."""
    given = kwargs.get("timeout", openai.NOT_GIVEN)
    if isinstance(given, openai.NotGiven | openai.Omit):
        given = getattr(_client(original), "timeout", None)
    seconds = _seconds(given)
    return cap if seconds is None else max(0.0, min(seconds, cap))


def _request(original: Callable[..., Any], operation: str) -> httpx2.Request:
    """The request the call would have sent, as the SDK's own timeout errors carry it."""
    base = getattr(_client(original), "base_url", None)
    if not isinstance(base, httpx2.URL):
        base = httpx2.URL(DEFAULT_BASE_URL)
    return httpx2.Request("POST", base.join(PATHS.get(operation, operation)))


Queues = Sequence[tuple[Rule, Queue]]


def _enter(queues: Queues) -> tuple[list[Queue], tuple[Rule, str] | None]:
    entered: list[Queue] = []
    for rule, queue in queues:
        if not queue.enter():
            return entered, (rule, f"its queue is full ({queue.max_waiting} calls waiting)")
        entered.append(queue)
    return entered, None


def _leave(entered: list[Queue]) -> None:
    for queue in entered:
        queue.leave()


@contextlib.contextmanager
def _lined_up(
    queues: Queues,
    original: Callable[..., Any],
    kwargs: Mapping[str, Any],
    operation: str,
    tags: list[str],
) -> Iterator[tuple[QueueTimeout | None, float]]:
    """In every queue's waiting room for the wait (the refusal when one is full) and its
    deadline; out of them all afterwards."""
    tags.extend(rule.tag for rule, _ in queues)
    entered, full = _enter(queues)
    try:
        if full is not None:
            yield QueueTimeout(_request(original, operation), *full), 0.0
        else:
            cap = min(q.timeout_cap for _, q in queues)
            yield None, time.monotonic() + budget(original, kwargs, cap)
    finally:
        _leave(entered)


def wait(
    queues: Queues,
    original: Callable[..., Any],
    kwargs: Mapping[str, Any],
    operation: str,
    tags: list[str],
) -> QueueTimeout | None:
    """Wait for the call's turn on every queue, in order (by control id); None when it may
    go, else the error to raise (nothing sent)."""
    with _lined_up(queues, original, kwargs, operation, tags) as (refused, deadline):
        if refused is not None:
            return refused
        for rule, queue in queues:
            turn = _Turn(queue)
            try:
                for pause in turn.pauses(deadline):
                    time.sleep(pause)
            except _TooLateError as late:
                return QueueTimeout(_request(original, operation), rule, str(late))
            except BaseException:
                turn.give_back()
                raise
    return None


async def wait_async(
    queues: Queues,
    original: Callable[..., Any],
    kwargs: Mapping[str, Any],
    operation: str,
    tags: list[str],
) -> QueueTimeout | None:
    """`wait` for async clients: the event loop keeps running meanwhile; a cancelled call
    gives its turn back."""
    with _lined_up(queues, original, kwargs, operation, tags) as (refused, deadline):
        if refused is not None:
            return refused
        for rule, queue in queues:
            turn = _Turn(queue)
            try:
                for pause in turn.pauses(deadline):
                    await asyncio.sleep(pause)
            except _TooLateError as late:
                return QueueTimeout(_request(original, operation), rule, str(late))
            except BaseException:
                turn.give_back()
                raise
    return None
