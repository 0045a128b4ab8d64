"""`canary.compare`: the canary slice of a runbook's control against the rest of its target,
over the window since it reached the clients, judged by `domain.canary`.

Every measure with data is compared (error rate, 429 rate, latency of successful calls, mean
cost per call, mean quality score); the incident's trigger says which one the canary must
improve (`domain.canary.primary_measure`), and the others are guards it must not make worse.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Engine
from temporalio import activity

from domain import canary as stats
from domain.incident import Trigger
from stores import canary as store


@dataclass
class CanaryCheck:
    trigger: str
    control_ids: list[int]
    feature: str | None  # the controls' target: None for any feature
    models: list[str | None]  # None in the list: any model
    start: datetime
    end: datetime
    window_over: bool = True  # False: a look before the end, which may only revert
    min_samples: int = stats.MIN_SAMPLES


@dataclass
class CanaryResult:
    verdict: str  # promote | revert | inconclusive (domain.canary.Verdict)
    reason: str
    lines: list[str] = field(default_factory=list)  # one per measure, the primary first
    canary_calls: int = 0
    rest_calls: int = 0
    too_few: bool = False  # the primary measure had too few samples to judge


def comparisons(
    canary: store.Side, rest: store.Side, min_n: int = stats.MIN_SAMPLES
) -> list[stats.Comparison]:
    """Every measure the two sides have numbers for."""
    found = [
        stats.two_proportion(canary.errors, canary.calls, rest.errors, rest.calls, min_n=min_n),
        stats.two_proportion(
            canary.rate_limited,
            canary.calls,
            rest.rate_limited,
            rest.calls,
            measure=stats.Measure.RATE_LIMITED,
            min_n=min_n,
        ),
        stats.rank_test_histograms(canary.latency, rest.latency, min_n=min_n),
    ]
    if canary.costed or rest.costed:
        found.append(
            stats.mean_difference(
                canary.cost_sum,
                canary.cost_sumsq,
                canary.costed,
                rest.cost_sum,
                rest.cost_sumsq,
                rest.costed,
                measure=stats.Measure.COST,
                min_n=min_n,
            )
        )
    if canary.scores or rest.scores:
        found.append(
            stats.mean_difference(
                canary.score_sum,
                canary.score_sumsq,
                canary.scores,
                rest.score_sum,
                rest.score_sumsq,
                rest.scores,
                min_n=min_n,
            )
        )
    return found


def judge(
    trigger: str, canary: store.Side, rest: store.Side, *, window_over: bool, min_n: int
) -> CanaryResult:
    """The verdict on two sides (pure). A trigger without a measure of its own (token quota)
    is judged on its error rate: a canary that only must not hurt."""
    primary = stats.Measure.ERROR_RATE
    if trigger in Trigger.__members__.values():
        primary = stats.primary_measure(Trigger(trigger)) or primary
    found = comparisons(canary, rest, min_n)
    if primary not in {c.measure for c in found}:  # no costs or scores recorded at all
        found.append(_nothing(primary, canary, rest))
    decision = stats.decide(found, primary=primary, window_over=window_over)
    main = next(c for c in found if c.measure is primary)
    return CanaryResult(
        verdict=str(decision.verdict),
        reason=decision.reason,
        lines=list(decision.lines),
        canary_calls=canary.calls,
        rest_calls=rest.calls,
        too_few=main.finding() is stats.Finding.TOO_FEW_SAMPLES,
    )


def _nothing(measure: stats.Measure, canary: store.Side, rest: store.Side) -> stats.Comparison:
    return stats.Comparison(
        measure,
        "no data",
        0,
        0,
        None,
        None,
        0.0,
        1.0,
        1.0,
        too_few=f"no {measure} recorded for {canary.calls + rest.calls:,} calls",
    )


class CanaryActivities:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @activity.defn(name="canary.compare")
    async def compare(self, check: CanaryCheck) -> CanaryResult:
        target = store.target_of(check.control_ids, check.feature, check.models)
        canary, rest = await asyncio.to_thread(
            store.sides, self._engine, target, check.start, check.end
        )
        return judge(
            check.trigger,
            canary,
            rest,
            window_over=check.window_over,
            min_n=check.min_samples,
        )
