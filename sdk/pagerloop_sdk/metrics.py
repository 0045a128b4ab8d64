"""The SDK's Prometheus counters, when the app has `prometheus_client` (the SDK does not
depend on it): they then appear on the app's own /metrics. Without it they count nothing, and
`Recorder.stats()` still tells what became of the records."""

from __future__ import annotations

from typing import Any


class _Unexported:
    """A counter or gauge nobody can scrape: every method is a no-op."""

    def labels(self, *_: object, **__: object) -> _Unexported:
        return self

    def inc(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass


def counter(name: str, documentation: str, labels: tuple[str, ...] = ()) -> Any:
    try:
        from prometheus_client import Counter
    except ImportError:
        return _Unexported()
    return Counter(name, documentation, list(labels))


def gauge(name: str, documentation: str) -> Any:
    try:
        from prometheus_client import Gauge
    except ImportError:
        return _Unexported()
    return Gauge(name, documentation)
