"""What `pagerloop simulate` saw happen: its own count of the calls it made, and the last
controls and incidents it read. Written by the traffic and the pollers, read by the display."""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from cli.scenarios import ScenarioSetup

# How a call ended, as counted and shown.
STATUSES = ("success", "cached", "rate_limited", "server_error", "error", "disabled")
RECENT_SECONDS = 15.0  # the window of "recent" latency and requests per model


@dataclass
class Progress:
    """The simulator's own view of its calls, and the last controls and incidents it read."""

    setup: ScenarioSetup
    duration: float
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    phase: str = "starting"
    counts: Counter[str] = field(default_factory=Counter)
    sent: Counter[str] = field(default_factory=Counter)  # HTTP requests per requested model
    served: Counter[str] = field(default_factory=Counter)  # answers per response model
    latencies: list[float] = field(default_factory=list)  # seconds, every finished call
    recent: deque[tuple[float, float]] = field(default_factory=deque)  # (at, seconds)
    recent_sent: deque[tuple[float, str]] = field(default_factory=deque)  # (at, model)
    response_ids: set[str] = field(default_factory=set)
    controls: list[str] | None = None  # None: not read (yet)
    controls_note: str = "not read yet"
    incidents: list[str] | None = None  # None: not known
    incidents_note: str = "not read yet"
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)

    def elapsed(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    def record(self, status: str, seconds: float, served: str | None) -> None:
        now = time.monotonic()
        self.counts[status] += 1
        self.latencies.append(seconds)
        self.recent.append((now, seconds))
        if served:
            self.served[served] += 1
        self._trim(now)

    def request_sent(self, model: str) -> None:
        now = time.monotonic()
        self.sent[model] += 1
        self.recent_sent.append((now, model))
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self.recent and self.recent[0][0] < now - RECENT_SECONDS:
            self.recent.popleft()
        while self.recent_sent and self.recent_sent[0][0] < now - RECENT_SECONDS:
            self.recent_sent.popleft()

    def recent_p95(self) -> float | None:
        self._trim(time.monotonic())
        return percentile([seconds for _, seconds in self.recent], 0.95)

    def recent_models(self) -> Counter[str]:
        self._trim(time.monotonic())
        return Counter(model for _, model in self.recent_sent)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)  # nearest rank
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]
