"""Latency histograms with a stated error bound.

A call's latency falls in a log-spaced bucket: bucket 0 is [0, 1 ms), bucket b >= 1 is
[1.05^(b-1), 1.05^b) ms, up to one hour (later latencies share the last bucket). A percentile
read from merged buckets is the geometric middle of the bucket holding the rank-ceil(p*n)
sample, so it is within sqrt(1.05) - 1 < 2.5 % of the exact (nearest-rank) percentile, for
latencies from 1 ms to 1 hour. Histograms add up, so per-minute rollups merge into any window.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

GROWTH = 1.05
RELATIVE_ERROR = math.sqrt(GROWTH) - 1  # 0.0247
_LOG_GROWTH = math.log(GROWTH)
LAST_BUCKET = math.ceil(math.log(3_600_000) / _LOG_GROWTH) + 1  # 1 hour


def bucket(latency_ms: float) -> int:
    if latency_ms < 1:
        return 0
    return min(int(math.log(latency_ms) / _LOG_GROWTH) + 1, LAST_BUCKET)


def representative(index: int) -> float:
    """The value a bucket stands for: its geometric middle (0.5 ms for bucket 0)."""
    if index <= 0:
        return 0.5
    if index >= LAST_BUCKET:
        return GROWTH ** (LAST_BUCKET - 1)
    return float(GROWTH ** (index - 0.5))


def percentile(histogram: Mapping[int, int], q: float) -> float | None:
    """The q-quantile (0 < q <= 1) of a bucket -> count histogram; None when it is empty."""
    total = sum(histogram.values())
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for index in sorted(histogram):
        seen += histogram[index]
        if seen >= rank:
            return representative(index)
    return representative(max(histogram))


def exact_percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: what `percentile` estimates."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]
