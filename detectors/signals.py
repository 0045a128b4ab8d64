"""The golden signals, from additive aggregates.

The stores answer with sums per scope for the window (calls by status, tokens, cost, a latency
histogram, quality sums): global, the busiest models and features, and one `<kind>:(other)`
scope per dimension holding the rest, so the answer has a bounded size however many distinct
names the traffic carries. Everything here is arithmetic on those sums: global minus some
scopes of one kind is global minus their sum.

Results recorded before scopes were folded carry sums per (model, feature) cell instead; they
still evaluate as they did then, so a running detector's history replays.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields, replace
from datetime import datetime

from stores import latency

GLOBAL = "global"
SCOPE_KINDS = ("global", "model", "feature")
DIMENSIONS = ("model", "feature")
OTHER = "(other)"
SCOPE_NAME_MAX = 140
_UNSAFE = re.compile(r"[^A-Za-z0-9._:/@+-]")


def scope_name(kind: str, value: str = "") -> str:
    """`global`, `model:<name>`, `feature:<name>`; odd characters become `_` so that a scope is
    always safe in a visibility query and a workflow id."""
    if kind == GLOBAL:
        return GLOBAL
    return f"{kind}:{_UNSAFE.sub('_', value)[:SCOPE_NAME_MAX] or '_'}"


def folded_scope(kind: str) -> str:
    """`model:(other)` / `feature:(other)`: the names beyond the top ones, summed. Unlike a
    name from the traffic, its parentheses stay, so it cannot be mistaken for one."""
    return f"{kind}:{OTHER}"


def kind_of(scope: str) -> str:
    return GLOBAL if scope == GLOBAL else scope.partition(":")[0]


@dataclass
class Aggregate:
    """Additive sums for one scope over the window (and quality history for drift)."""

    calls: int = 0
    successes: int = 0
    errors: int = 0
    timeouts: int = 0
    rate_limited: int = 0
    server_errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    latency_histogram: dict[int, int] = field(default_factory=dict)
    quality_count: int = 0
    quality_sum: float = 0.0
    baseline_count: int = 0
    baseline_sum: float = 0.0
    baseline_sumsq: float = 0.0

    def add(self, other: Aggregate, sign: int = 1) -> None:
        for f in fields(self):
            if f.name == "latency_histogram":
                for bucket, count in other.latency_histogram.items():
                    merged = self.latency_histogram.get(bucket, 0) + sign * count
                    if merged:
                        self.latency_histogram[bucket] = merged
                    else:
                        self.latency_histogram.pop(bucket, None)
            else:
                setattr(self, f.name, getattr(self, f.name) + sign * getattr(other, f.name))


@dataclass
class ScopeSums:
    """One scope's sums as the activity result carries them: the latency histogram as the
    counts of consecutive buckets from `latency_from` on, which takes half the bytes of a
    bucket -> count mapping (and histograms are most of the result)."""

    sums: Aggregate  # its latency_histogram empty
    latency_from: int = 0
    latency: list[int] = field(default_factory=list)

    @classmethod
    def pack(cls, aggregate: Aggregate) -> ScopeSums:
        histogram = aggregate.latency_histogram
        sums = replace(aggregate, latency_histogram={})
        if not histogram:
            return cls(sums)
        first, last = min(histogram), max(histogram)
        return cls(sums, first, [histogram.get(b, 0) for b in range(first, last + 1)])

    def unpack(self) -> Aggregate:
        histogram = {self.latency_from + i: n for i, n in enumerate(self.latency) if n}
        return replace(self.sums, latency_histogram=histogram)


@dataclass
class FoldedInfo:
    """The names of one dimension summed into its `(other)` scope."""

    values: int = 0  # distinct names
    calls: int = 0  # their calls in the window
    top: int = 0  # how many names had scopes of their own at most


@dataclass
class WindowAggregates:
    """What the stores say about one window: per-scope sums, and today's spend."""

    end: datetime
    window_seconds: float  # from the start of the first minute counted to `end`
    # Results recorded before the folding: model -> feature -> sums ("" for no feature).
    cells: dict[str, dict[str, Aggregate]] = field(default_factory=dict)
    cost_today_usd: float = 0.0
    # Scope name -> sums; always holds `global`, so an empty dict means a per-cell result.
    by_scope: dict[str, ScopeSums] = field(default_factory=dict)
    folded: dict[str, FoldedInfo] = field(default_factory=dict)  # by dimension

    @classmethod
    def of_scopes(
        cls,
        end: datetime,
        window_seconds: float,
        scopes: dict[str, Aggregate],
        cost_today_usd: float = 0.0,
        folded: dict[str, FoldedInfo] | None = None,
    ) -> WindowAggregates:
        packed = {name: ScopeSums.pack(aggregate) for name, aggregate in scopes.items()}
        packed.setdefault(GLOBAL, ScopeSums(Aggregate()))
        return cls(
            end=end,
            window_seconds=window_seconds,
            cost_today_usd=cost_today_usd,
            by_scope=packed,
            folded=dict(folded or {}),
        )

    def scope(self, name: str) -> Aggregate:
        if self.by_scope:
            packed = self.by_scope.get(name)
            return packed.unpack() if packed is not None else Aggregate()
        total = Aggregate()
        for model, features in self.cells.items():
            for feature, cell in features.items():
                if _in_scope(name, model, feature):
                    total.add(cell)
        return total

    def scopes(self, kinds: tuple[str, ...] | list[str] = SCOPE_KINDS) -> dict[str, Aggregate]:
        found: dict[str, Aggregate] = {}
        if GLOBAL in kinds:
            found[GLOBAL] = self.scope(GLOBAL)
        if self.by_scope:
            for name in self.by_scope:
                if name != GLOBAL and kind_of(name) in kinds:
                    found[name] = self.scope(name)
            return found
        for model, features in self.cells.items():
            for feature, cell in features.items():
                names = []
                if "model" in kinds:
                    names.append(scope_name("model", model))
                if "feature" in kinds and feature:
                    names.append(scope_name("feature", feature))
                for name in names:
                    found.setdefault(name, Aggregate()).add(cell)
        return found

    def global_without(self, scopes: list[str]) -> Aggregate:
        """Global minus these scopes. Per-scope sums can only take away scopes that do not
        overlap: scopes of one kind (which is what the inhibition asks about)."""
        if self.by_scope:
            names = list(dict.fromkeys(scopes))
            if GLOBAL in names:
                return Aggregate()
            if len({kind_of(name) for name in names}) > 1:
                raise ValueError(f"scopes of one kind only, not {names}")
            total = self.scope(GLOBAL)
            for name in names:
                total.add(self.scope(name), sign=-1)
            return total
        total = Aggregate()
        for model, features in self.cells.items():
            for feature, cell in features.items():
                if not any(_in_scope(name, model, feature) for name in scopes):
                    total.add(cell)
        return total


def _in_scope(name: str, model: str, feature: str) -> bool:
    if name == GLOBAL:
        return True
    kind = name.partition(":")[0]
    if kind == "model":
        return scope_name("model", model) == name
    if kind == "feature":
        return bool(feature) and scope_name("feature", feature) == name
    return False


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole else None


def values(
    aggregate: Aggregate,
    window_seconds: float,
    *,
    scope: str,
    daily_budget_usd: float,
    cost_today_usd: float,
    tpm_quota: float | None,
) -> dict[str, float | None]:
    """Every signal of one scope; None where there is nothing to measure."""
    a = aggregate
    minutes = max(window_seconds, 1.0) / 60
    histogram = a.latency_histogram
    found: dict[str, float | None] = {
        "calls": float(a.calls),
        "latency_p50_ms": latency.percentile(histogram, 0.50),
        "latency_p95_ms": latency.percentile(histogram, 0.95),
        "latency_p99_ms": latency.percentile(histogram, 0.99),
        # 429s have a signal of their own (rate_limit_rate), so they are not errors here.
        "error_rate": _ratio(a.errors + a.timeouts + a.server_errors, a.calls),
        "rate_limit_rate": _ratio(a.rate_limited, a.calls),
        "server_error_rate": _ratio(a.server_errors, a.calls),
        "timeout_rate": _ratio(a.timeouts, a.calls),
        "tokens_per_minute": (a.input_tokens + a.output_tokens) / minutes,
        "cost_usd_per_hour": a.cost_usd / (minutes / 60),
        "quality_mean": _ratio(a.quality_sum, a.quality_count),
        "quality_scores": float(a.quality_count),
    }
    tpm = found["tokens_per_minute"]
    found["tpm_quota_ratio"] = tpm / tpm_quota if tpm_quota and tpm is not None else None
    hourly_budget = daily_budget_usd / 24
    cost_rate = found["cost_usd_per_hour"]
    found["cost_rate_ratio"] = cost_rate / hourly_budget if cost_rate is not None else None
    found["budget_consumed_ratio"] = cost_today_usd / daily_budget_usd if scope == GLOBAL else None
    found["quality_drift_z"] = _drift(a)
    return found


# The seed's statistical process control: recent mean against a baseline of at least 30.
BASELINE_MIN_SCORES = 30


def _drift(a: Aggregate) -> float | None:
    """How many baseline standard deviations the recent quality mean lies from the baseline."""
    if a.quality_count == 0 or a.baseline_count < BASELINE_MIN_SCORES:
        return None
    mean = a.baseline_sum / a.baseline_count
    variance = max(a.baseline_sumsq / a.baseline_count - mean * mean, 0.0)
    sd = math.sqrt(variance * a.baseline_count / (a.baseline_count - 1))
    recent = a.quality_sum / a.quality_count
    if sd == 0:  # a perfectly steady baseline: any move is far off, but stays a finite number
        return 0.0 if recent == mean else math.copysign(1e9, recent - mean)
    return (recent - mean) / sd
