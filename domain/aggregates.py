"""Additive aggregates: what the stores say about one window, per scope, for the detectors.

The stores answer with sums per scope for the window (calls by status, tokens, cost, a latency
histogram, quality sums): global, the busiest models and features, and one `<kind>:(other)`
scope per dimension holding the rest. Sums add up, so global minus some scopes of one kind is
global minus their sum.

Rules may read windows of their own (2, 5, 10 minutes): one result then carries the widest
window's sums and, beside them, the same scopes' sums over each narrower window (`over()`).

Results recorded before scopes were folded carry sums per (model, feature) cell instead; they
still read as they did then, so a running detector's history replays.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields, replace
from datetime import datetime

from domain.baselines import QualityBaseline
from domain.scopes import GLOBAL, SCOPE_KINDS, in_scope, kind_of, scope_name
from domain.usage import SignalCounters


@dataclass
class Aggregate(SignalCounters):
    """Additive sums for one scope over the window (and quality history for drift)."""

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
class WindowSums:
    """A narrower window read with a result: the same scopes' sums over it (a scope without
    data in it is left out; `global` is always there)."""

    window_seconds: float  # from the start of its first minute counted to the result's `end`
    by_scope: dict[str, ScopeSums] = field(default_factory=dict)

    @classmethod
    def of_scopes(cls, window_seconds: float, scopes: dict[str, Aggregate]) -> WindowSums:
        packed = {name: ScopeSums.pack(aggregate) for name, aggregate in scopes.items()}
        packed.setdefault(GLOBAL, ScopeSums(Aggregate()))
        return cls(window_seconds, packed)


@dataclass
class WindowAggregates:
    """What the stores say about one window: per-scope sums, and today's spend; and, for rules
    with windows of their own, the same scopes over narrower windows ending at the same time."""

    end: datetime
    window_seconds: float  # from the start of the first minute counted to `end`
    # Results recorded before the folding: model -> feature -> sums ("" for no feature).
    cells: dict[str, dict[str, Aggregate]] = field(default_factory=dict)
    cost_today_usd: float = 0.0
    # Scope name -> sums; always holds `global`, so an empty dict means a per-cell result.
    by_scope: dict[str, ScopeSums] = field(default_factory=dict)
    folded: dict[str, FoldedInfo] = field(default_factory=dict)  # by dimension
    # Narrower windows by the length asked for (seconds): the same scopes, ranked and folded
    # over this window (the widest), summed over each. Empty: the one window.
    windows: dict[int, WindowSums] = field(default_factory=dict)
    # Quality baselines set by hand, by scope (feature scopes of this result only): the drift
    # rule reads them instead of the rolling sums. Not sums: a scope's own, in every window.
    baselines: dict[str, QualityBaseline] = field(default_factory=dict)

    @classmethod
    def of_scopes(
        cls,
        end: datetime,
        window_seconds: float,
        scopes: dict[str, Aggregate],
        cost_today_usd: float = 0.0,
        folded: dict[str, FoldedInfo] | None = None,
        windows: dict[int, WindowSums] | None = None,
        baselines: dict[str, QualityBaseline] | None = None,
    ) -> WindowAggregates:
        return cls(
            end=end,
            window_seconds=window_seconds,
            cost_today_usd=cost_today_usd,
            by_scope=WindowSums.of_scopes(window_seconds, scopes).by_scope,
            folded=dict(folded or {}),
            windows=dict(windows or {}),
            baselines=dict(baselines or {}),
        )

    def lacks(self, lengths: Iterable[int]) -> list[int]:
        """The narrower windows asked for (lengths in seconds) that this result does not hold:
        a worker from before per-rule windows answers with the widest window alone, and
        `over()` would show it under a narrower window's name."""
        return sorted({int(s) for s in lengths} - self.windows.keys())

    def over(self, seconds: int) -> WindowAggregates:
        """The result seen over the narrower window of this length (its sums; the same end,
        spend today and fold); this window itself for any length not among `windows` (the
        widest; a narrower window the result lacks too: check `lacks()` first)."""
        narrower = self.windows.get(seconds)
        if narrower is None:
            return self
        return replace(
            self, window_seconds=narrower.window_seconds, by_scope=narrower.by_scope, windows={}
        )

    def scope(self, name: str) -> Aggregate:
        if self.by_scope:
            packed = self.by_scope.get(name)
            return packed.unpack() if packed is not None else Aggregate()
        total = Aggregate()
        for model, features in self.cells.items():
            for feature, cell in features.items():
                if in_scope(name, model, feature):
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
                if not any(in_scope(name, model, feature) for name in scopes):
                    total.add(cell)
        return total
