"""Diagnosis queries for runbooks (store reads), and the re-read of a breached signal.

The runbooks ask these before and after a mitigation: which features spend, which models get
429s, which are slow and for which prompt sizes, what fails, which snapshot answers badly; and
whether the signal that opened the incident is still over its line: the detector's own
aggregates, judged by the detector's own rules (`detectors.reading`, given by the worker).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from urllib.parse import quote

from sqlalchemy import Engine
from temporalio import activity

from domain.aggregates import WindowAggregates
from domain.histogram import percentile
from domain.usage import UsageCounters
from domain.waterfall import TracedCall
from stores import diagnosis as queries
from stores.aggregates import window_aggregates


@dataclass
class DiagnosisQuery:
    """What to look at: calls in (end - window_seconds, end] within `scope`
    (`global`, `model:<name>`, `feature:<name>`)."""

    scope: str
    end: datetime
    window_seconds: int = 900
    limit: int = 5


@dataclass
class FeatureUsage:
    feature: str  # "" for calls without a feature
    calls: int
    tokens: int
    cost_usd: float
    rate_limited: int
    share_of_cost: float  # 0..1 of the scope's cost in the window
    # Average calls in flight (Little's law): sum of latency / the time since its first call
    # in the window.
    concurrency: float
    models: list[str] = field(default_factory=list)  # models it called, most calls first
    # Its pace over the same time, per minute (what OpenAI's own limits count)...
    calls_per_minute: float = 0.0
    tokens_per_minute: float = 0.0
    # ...and the calls that were not rate-limited, over one minute at least: a quota per
    # minute lets a burst through at first, which is not the pace it allows.
    answered_per_minute: float = 0.0
    # Requests beyond each call's first (the SDK's retries, 429s backed off): more retries
    # than calls is a retry storm (runbooks.retries).
    retries: int = 0
    successes: int = 0  # calls answered (what still gets through an outage)
    # Its costliest calls' traces (the first TRACED_ROWS features only).
    traces: list[TracedCall] = field(default_factory=list)


@dataclass
class ModelRateLimits:
    model: str
    calls: int
    rate_limited: int
    share: float  # rate_limited / calls
    retries: int  # sum of retry_count: request amplification
    traces: list[TracedCall] = field(default_factory=list)  # its latest 429s' traces


@dataclass
class ModelLatency:
    model: str
    calls: int
    p50_ms: float | None
    p95_ms: float | None
    avg_input_tokens: float | None
    # p95 latency per prompt-size band ("<1k", "1k-4k", "4k-16k", ">=16k" input tokens)
    p95_by_prompt_size: dict[str, float] = field(default_factory=dict)
    traces: list[TracedCall] = field(default_factory=list)  # its slowest calls' traces


@dataclass
class ErrorGroup:
    model: str
    feature: str
    status: str
    error_type: str
    count: int
    last_seen: datetime
    sample_message: str
    traces: list[TracedCall] = field(default_factory=list)  # its latest calls' traces


@dataclass
class ModelQuality:
    model: str  # the model the app asked for
    response_model: str  # the dated snapshot that answered
    scores: int
    mean: float
    first_seen: datetime
    last_seen: datetime
    traces: list[TracedCall] = field(default_factory=list)  # its lowest-scored calls' traces


@dataclass
class SignalCheck:
    trigger: str
    scope: str
    end: datetime
    window_seconds: int = 300


@dataclass
class SignalReading:
    """The trigger's signals for the scope now, judged by the detector's own rules."""

    trigger: str
    scope: str
    values: dict[str, float]
    calls: int
    breached: bool  # over a warning or critical threshold of one of the trigger's rules
    recovered: bool  # every one of the trigger's rules past its clear line, with enough samples
    summary: str


# How a signal's re-read is judged: the detector's rules on the window's aggregates (the
# worker gives `detectors.reading.SignalJudge`).
JudgeReading = Callable[[SignalCheck, WindowAggregates], SignalReading]


class DiagnosisActivities:
    """Read-only store queries; every answer is for (end - window_seconds, end] in one scope.

    The first TRACED_ROWS rows of an answer carry the traces of their worst calls (slowest,
    failed, rate-limited, costliest, lowest-scored), with their waterfall's URL when the API's
    public URL is known (PAGERLOOP_PUBLIC_URL): the runbook's diagnosis links them."""

    def __init__(self, engine: Engine, judge: JudgeReading, public_url: str = "") -> None:
        self._engine = engine
        self._judge = judge
        self._public_url = public_url

    @activity.defn(name="diagnosis.top_features")
    async def top_features(self, q: DiagnosisQuery) -> list[FeatureUsage]:
        """The features spending most (cost, then tokens), at most q.limit."""
        return await asyncio.to_thread(top_features, self._engine, q, self._public_url)

    @activity.defn(name="diagnosis.rate_limits")
    async def rate_limits(self, q: DiagnosisQuery) -> list[ModelRateLimits]:
        """Share of 429s per model, the worst first, at most q.limit."""
        return await asyncio.to_thread(rate_limits, self._engine, q, self._public_url)

    @activity.defn(name="diagnosis.latency")
    async def latency(self, q: DiagnosisQuery) -> list[ModelLatency]:
        """Latency per model and prompt size, the slowest p95 first, at most q.limit."""
        return await asyncio.to_thread(latency, self._engine, q, self._public_url)

    @activity.defn(name="diagnosis.recent_errors")
    async def recent_errors(self, q: DiagnosisQuery) -> list[ErrorGroup]:
        """Non-success calls per model, feature, status and error type, the most recent first."""
        return await asyncio.to_thread(recent_errors, self._engine, q, self._public_url)

    @activity.defn(name="diagnosis.quality")
    async def quality(self, q: DiagnosisQuery) -> list[ModelQuality]:
        """Quality per requested model and answering snapshot, the worst mean first."""
        return await asyncio.to_thread(quality, self._engine, q, self._public_url)

    @activity.defn(name="diagnosis.check_signal")
    async def check_signal(self, c: SignalCheck) -> SignalReading:
        # The scope under verification is always read, however many others are busier.
        aggregates = await asyncio.to_thread(
            partial(window_aggregates, keep=[c.scope]), self._engine, c.end, c.window_seconds
        )
        return self._judge(c, aggregates)


# --- the queries, shaped for the runbooks (run in a worker thread) ---------------------------

# Rows of an answer whose worst calls' traces are looked up (a query each): the diagnosis
# links a few traces, from the rows ranked worst.
TRACED_ROWS = 3


def waterfall_url(public_url: str, trace_id: str) -> str:
    """The trace's waterfall over HTTP (operator key); "" when the API's address is unknown."""
    if not public_url:
        return ""
    return f"{public_url.rstrip('/')}/v1/waterfall/{quote(trace_id, safe='')}"


def _linked(found: list[queries.Traced], why: str, public_url: str) -> list[TracedCall]:
    return [
        TracedCall(
            trace_id=t.trace_id,
            why=why,
            model=t.model,
            status=t.status,
            latency_ms=t.latency_ms,
            cost_usd=t.cost_usd,
            url=waterfall_url(public_url, t.trace_id),
        )
        for t in found
    ]


def top_features(engine: Engine, q: DiagnosisQuery, public_url: str = "") -> list[FeatureUsage]:
    window = queries.Window.of(q.end, q.window_seconds)
    cells = queries.usage(engine, window, q.scope)
    total_cost = sum(cell.cost_usd for cell in cells.values())
    features: dict[str, UsageCounters] = {}
    models: dict[str, Counter[str]] = {}
    for (model, feature), cell in cells.items():
        features.setdefault(feature, UsageCounters()).add(cell)
        models.setdefault(feature, Counter())[model] += cell.calls
    first = queries.first_calls(engine, window, q.scope)
    retries = queries.retries_by_feature(engine, window, q.scope)

    def flowing_ms(feature: str) -> float:
        # The time the feature's traffic has flowed, not the whole window: a feature that
        # started a minute ago is not idle for the other fourteen.
        since = max(first.get(feature, window.start), window.start)
        return (window.end - since).total_seconds() * 1000

    def per_ms(feature: str, amount: float) -> float:
        flowing = flowing_ms(feature)
        return amount / flowing if flowing > 0 else 0.0

    found = [
        FeatureUsage(
            feature=feature,
            calls=sums.calls,
            tokens=sums.input_tokens + sums.output_tokens,
            cost_usd=sums.cost_usd,
            rate_limited=sums.rate_limited,
            share_of_cost=sums.cost_usd / total_cost if total_cost else 0.0,
            concurrency=per_ms(feature, sums.latency_ms_sum),  # Little's law
            models=[m for m, _ in sorted(models[feature].items(), key=lambda mc: (-mc[1], mc[0]))],
            calls_per_minute=per_ms(feature, sums.calls) * 60_000,
            tokens_per_minute=per_ms(feature, sums.input_tokens + sums.output_tokens) * 60_000,
            answered_per_minute=(sums.calls - sums.rate_limited)
            / max(flowing_ms(feature) / 60_000, 1.0),
            retries=retries.get(feature, 0),
            successes=sums.successes,
        )
        for feature, sums in features.items()
    ]
    # Costs are sums of floats: ranked to the micro-dollar, so equal spend ties on tokens.
    found.sort(key=lambda f: (-round(f.cost_usd, 6), -f.tokens, -f.calls, f.feature))
    found = found[: max(q.limit, 0)]
    for f in found[:TRACED_ROWS]:
        match = {"feature": f.feature or None}
        costliest = queries.worst_calls(engine, window, q.scope, "costliest", match)
        f.traces = _linked(costliest, "costliest", public_url)
    return found


def rate_limits(engine: Engine, q: DiagnosisQuery, public_url: str = "") -> list[ModelRateLimits]:
    window = queries.Window.of(q.end, q.window_seconds)
    per_model = queries.rate_limits(engine, window, q.scope)
    found = [
        ModelRateLimits(
            model=model,
            calls=sums.calls,
            rate_limited=sums.rate_limited,
            share=sums.rate_limited / sums.calls if sums.calls else 0.0,
            retries=sums.retries,
        )
        for model, sums in per_model.items()
    ]
    found.sort(key=lambda m: (-m.share, -m.rate_limited, -m.calls, m.model))
    found = found[: max(q.limit, 0)]
    for m in [m for m in found if m.rate_limited][:TRACED_ROWS]:
        limited = queries.worst_calls(engine, window, q.scope, "rate_limited", {"model": m.model})
        m.traces = _linked(limited, "rate_limited", public_url)
    return found


def latency(engine: Engine, q: DiagnosisQuery, public_url: str = "") -> list[ModelLatency]:
    window = queries.Window.of(q.end, q.window_seconds)
    histograms = queries.latency_histograms(engine, window, q.scope)
    sizes = queries.prompt_sizes(engine, window, q.scope)
    found = []
    for model, histogram in histograms.items():
        sized = sizes.get(model, queries.PromptSizes())
        bands = {}
        for band, _ in queries.PROMPT_SIZE_BANDS:
            p95 = percentile(sized.histograms.get(band, {}), 0.95)
            if p95 is not None:
                bands[band] = p95
        found.append(
            ModelLatency(
                model=model,
                calls=sum(histogram.values()),
                p50_ms=percentile(histogram, 0.50),
                p95_ms=percentile(histogram, 0.95),
                avg_input_tokens=sized.input_tokens / sized.calls if sized.calls else None,
                p95_by_prompt_size=bands,
            )
        )
    found.sort(key=lambda m: (m.p95_ms is None, -(m.p95_ms or 0.0), -m.calls, m.model))
    found = found[: max(q.limit, 0)]
    for m in found[:TRACED_ROWS]:
        slowest = queries.worst_calls(engine, window, q.scope, "slowest", {"model": m.model})
        m.traces = _linked(slowest, "slowest", public_url)
    return found


def recent_errors(engine: Engine, q: DiagnosisQuery, public_url: str = "") -> list[ErrorGroup]:
    window = queries.Window.of(q.end, q.window_seconds)
    found = []
    for index, group in enumerate(queries.recent_errors(engine, window, q.scope, q.limit)):
        traces: list[TracedCall] = []
        if index < TRACED_ROWS:
            match = {
                "model": group.model,
                "feature": group.feature,
                "status": group.status,
                "error_type": group.error_type,
            }
            failed = queries.worst_calls(engine, window, q.scope, "failed", match)
            traces = _linked(failed, "failed", public_url)
        found.append(
            ErrorGroup(
                model=group.model,
                feature=group.feature or "",
                status=group.status,
                error_type=group.error_type or "",
                count=group.count,
                last_seen=group.last_seen,
                sample_message=group.sample_message or "",
                traces=traces,
            )
        )
    return found


def quality(engine: Engine, q: DiagnosisQuery, public_url: str = "") -> list[ModelQuality]:
    window = queries.Window.of(q.end, q.window_seconds)
    groups = queries.quality(engine, window, q.scope)
    found = [
        ModelQuality(
            model=group.model,
            response_model=group.response_model,
            scores=group.scores,
            mean=group.score_sum / group.scores,
            first_seen=group.first_seen,
            last_seen=group.last_seen,
        )
        for group in groups
        if group.scores
    ]
    found.sort(key=lambda m: (m.mean, -m.scores, m.model, m.response_model))
    found = found[: max(q.limit, 0)]
    for m in found[:TRACED_ROWS]:
        lowest = queries.lowest_scored_calls(engine, window, q.scope, m.model, m.response_model)
        m.traces = _linked(lowest, "lowest_quality", public_url)
    return found
