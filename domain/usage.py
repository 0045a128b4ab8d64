"""The usage counters: what each call to OpenAI adds to its minute (and model, feature, team,
environment) in the `usage_rollup` table.

Defined here once, as fields; everything else is made from them: the table's columns
(`stores.llm_calls.UsageRollup`), the writer's sums (`stores.writer`), the detectors' sums per
scope (`domain.aggregates.Aggregate` carries the signal counters) and the runbooks' usage per
feature (`stores.diagnosis.usage`). A new counter is a field here, its migration, and what a
call adds to it in the writer and in the runbooks' read of the call rows.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import get_type_hints


@dataclass
class SignalCounters:
    """The counters the golden signals are computed from (calls by status, tokens, cost)."""

    calls: int = 0
    successes: int = 0
    errors: int = 0
    timeouts: int = 0
    rate_limited: int = 0
    server_errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0


@dataclass
class UsageCounters(SignalCounters):
    """Every counter of the usage rollup: the signal counters and the rest."""

    cached_input_tokens: int = 0
    unpriced_calls: int = 0  # tokens known, but a model without a price
    latency_ms_sum: float = 0.0  # time in flight (calls in flight, by Little's law)

    def add(self, other: UsageCounters) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))


SIGNAL_COUNTERS: tuple[str, ...] = tuple(f.name for f in fields(SignalCounters))
USAGE_COUNTERS: tuple[str, ...] = tuple(f.name for f in fields(UsageCounters))
FLOAT_COUNTERS: frozenset[str] = frozenset(
    name for name, kind in get_type_hints(UsageCounters).items() if kind is float
)

# The counter a call's status adds one to, besides `calls`; any other status counts as an error.
STATUS_COUNTERS: dict[str, str] = {
    "success": "successes",
    "timeout": "timeouts",
    "rate_limited": "rate_limited",
    "server_error": "server_errors",
}
ERROR_COUNTER = "errors"
