"""Retry amplification (pure): clients that retry every failure multiply the requests they send
just when the API is struggling, and the extra requests are billed and counted against the
quota like the first. Judged on the diagnosis rows that carry retries: per model
(`ModelRateLimits`) and per feature (`FeatureUsage`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

# Retries per call above which the retries are a storm: more retries than calls (the seed's
# cost scenario), i.e. more than twice the requests the app meant to make.
STORM = 1.0
# Above this, worth a warning: half of all calls retried once more.
WARNING = 0.5
# Fewer calls than this say nothing about a client's habits.
MIN_CALLS = 10


class Retried(Protocol):
    @property
    def calls(self) -> int: ...

    @property
    def retries(self) -> int: ...


def retry_amplification(rows: Iterable[Retried], *, min_calls: int = MIN_CALLS) -> list[str]:
    """A finding per feature or model whose retries per call exceed WARNING, storms first, the
    worst ratio first within each."""
    judged = []
    for row in rows:
        if row.calls < max(min_calls, 1) or row.retries <= 0:
            continue
        ratio = row.retries / row.calls
        if ratio > WARNING:
            judged.append((ratio > STORM, ratio, _name(row), row))
    judged.sort(key=lambda found: (not found[0], -found[1], found[2]))
    findings = []
    for storm, ratio, name, row in judged:
        verdict = "retry storm" if storm else "retry amplification (warning)"
        findings.append(
            f"{verdict}: {name} retried {row.retries} times for {row.calls} calls "
            f"({ratio:.2f} retries per call, {1 + ratio:.1f}x the requests and their cost)"
        )
    return findings


def _name(row: Retried) -> str:
    feature = getattr(row, "feature", None)
    if feature is not None:
        return f"feature {feature}" if feature else "calls without a feature"
    return f"model {getattr(row, 'model', '?')}"
