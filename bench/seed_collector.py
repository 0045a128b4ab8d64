"""The seed's MetricsCollector approach, as the baseline of P3 (not used by pagerloop).

It mirrors the article's sketch: every sample kept in memory as (timestamp, value) pairs, the
window filtered with a list comprehension per metric, percentiles by sorting the window's
samples. Two changes so it can run on the benchmark's data: timestamps come from the calls
(not the wall clock), and the deques are uncapped (the sketch's 10,000-sample cap would keep
1 % of a 1,000,000-call window).
"""

from __future__ import annotations

from collections import deque


class SeedMetricsCollector:
    def __init__(self, window_seconds: int) -> None:
        self.window_seconds = window_seconds
        self.latencies: deque[tuple[float, float]] = deque()
        self.errors: deque[tuple[float, int]] = deque()
        self.tokens: deque[tuple[float, int]] = deque()
        self.costs: deque[tuple[float, float]] = deque()
        self.p95_latency_warn, self.p95_latency_crit = 8.0, 15.0
        self.error_rate_warn, self.error_rate_crit = 0.02, 0.05
        self.cost_hourly_warn, self.cost_hourly_crit = 50.0, 100.0

    def record_call(
        self, at: float, latency_s: float, tokens: int, cost_usd: float, is_error: bool
    ) -> None:
        self.latencies.append((at, latency_s))
        self.tokens.append((at, tokens))
        self.costs.append((at, cost_usd))
        self.errors.append((at, 1 if is_error else 0))

    def _window_values(
        self, data: deque[tuple[float, float]] | deque[tuple[float, int]], now: float
    ) -> list[float]:
        cutoff = now - self.window_seconds
        return [v for t, v in data if t > cutoff]

    def get_latency_percentiles(self, now: float) -> dict[str, float]:
        values = self._window_values(self.latencies, now)
        if not values:
            return {"p50": 0, "p95": 0, "p99": 0, "count": 0}
        ordered = sorted(values)
        n = len(ordered)
        return {
            "p50": ordered[int(n * 0.50)],
            "p95": ordered[int(n * 0.95)] if n > 20 else ordered[-1],
            "p99": ordered[int(n * 0.99)] if n > 100 else ordered[-1],
            "count": n,
        }

    def get_error_rate(self, now: float) -> float:
        values = self._window_values(self.errors, now)
        return sum(values) / len(values) if values else 0.0

    def get_cost_rate(self, now: float) -> float:
        values = self._window_values(self.costs, now)
        return sum(values) / (self.window_seconds / 3600.0) if values else 0.0

    def evaluate_alerts(self, now: float) -> list[tuple[str, str, str]]:
        alerts = []
        p95 = self.get_latency_percentiles(now)["p95"]
        if p95 > self.p95_latency_crit:
            alerts.append(("p95_latency", "critical", f"p95={p95:.1f}s"))
        elif p95 > self.p95_latency_warn:
            alerts.append(("p95_latency", "warning", f"p95={p95:.1f}s"))
        error_rate = self.get_error_rate(now)
        if error_rate > self.error_rate_crit:
            alerts.append(("error_rate", "critical", f"{error_rate:.1%}"))
        elif error_rate > self.error_rate_warn:
            alerts.append(("error_rate", "warning", f"{error_rate:.1%}"))
        cost = self.get_cost_rate(now)
        if cost > self.cost_hourly_crit:
            alerts.append(("cost_rate", "critical", f"${cost:.2f}/h"))
        elif cost > self.cost_hourly_warn:
            alerts.append(("cost_rate", "warning", f"${cost:.2f}/h"))
        return alerts
