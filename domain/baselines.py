"""Quality baselines (pure): what the drift rule compares the recent quality mean with.

By default the baseline rolls: the mean and standard deviation of a scope's scores over the
7 days before the window, from the hourly sums (count, sum, sum of squares). An operator may set
one by hand for a feature instead (`pagerloop quality baseline set`, the seed's
`set_baseline`): typed in, or measured once over a chosen window; the drift rule reads it until
it is cleared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# The seed's statistical process control: a baseline of at least 30 scores.
BASELINE_MIN_SCORES = 30
TYPED_IN = "set by hand"  # the source of a baseline typed in, not measured


@dataclass(frozen=True)
class QualityBaseline:
    """A baseline set by hand for one feature: the drift rule reads it instead of the rolling
    one. `source` says where it came from: TYPED_IN, or the window it was measured over ("from
    the last 7d")."""

    mean: float
    stddev: float
    source: str = TYPED_IN

    def describe(self) -> str:
        """ "0.820 ± 0.050", "0.820 ± 0.050, from the last 7d"."""
        numbers = f"{self.mean:.3f} ± {self.stddev:.3f}"
        return numbers if self.source == TYPED_IN else f"{numbers}, {self.source}"


def mean_and_stddev(count: int, total: float, squares: float) -> tuple[float, float]:
    """The mean and the sample standard deviation of `count` scores from their sums (count
    above 1). Rounding may leave a tiny negative variance for equal scores: that is 0."""
    mean = total / count
    variance = max(squares / count - mean * mean, 0.0)
    return mean, math.sqrt(variance * count / (count - 1))
