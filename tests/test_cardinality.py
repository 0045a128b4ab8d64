"""High cardinality is a normal day: the detector's window folds the names beyond the busiest
into `<kind>:(other)` in the store (SQLite and PostgreSQL), its activity result stays far below
Temporal's 2 MB payload limit, a breach on a busy name is still found, and the unpriced-calls
counter takes no label values from callers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from pagerloop_sdk.recorder import count_unpriced
from prometheus_client import REGISTRY
from sqlalchemy import Engine
from temporalio.contrib.pydantic import pydantic_data_converter

from detectors.config import DetectorRules
from detectors.evaluation import Evaluation, evaluate
from detectors.rules import RuleState
from domain.aggregates import Aggregate, FoldedInfo, WindowAggregates
from domain.histogram import LAST_BUCKET
from stores.aggregates import window_aggregates
from stores.llm_calls import CallRecord
from stores.quality import ScoreRecord, write_scores
from stores.writer import write_calls

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
PAYLOAD_LIMIT = 2 * 1024 * 1024


def calls(
    count: int,
    feature: str | None,
    model: str = "gpt-4.1",
    status: str = "success",
    latency_ms: float = 400.0,
) -> list[CallRecord]:
    return [
        CallRecord(
            ts=NOW - timedelta(seconds=5 + i % 250),
            model=model,
            status=status,
            latency_ms=latency_ms + i,
            feature=feature,
        )
        for i in range(count)
    ]


def size(result: WindowAggregates) -> int:
    [payload] = pydantic_data_converter.payload_converter.to_payloads([result])
    return payload.ByteSize()


def test_the_quiet_names_fold_into_other_in_the_store(store: Engine) -> None:
    write_calls(
        store,
        calls(30, "search")
        + calls(20, "chat", status="error")
        + calls(5, "tagging", model="o3")
        + calls(3, "a b", model="o4-mini", latency_ms=9000)
        + calls(4, "(other)", model="o4-mini")  # a name that looks like the fold: it folds
        + calls(7, None, model="o3"),  # no feature: global and its model only
    )
    scores = [ScoreRecord(f"q{i}", NOW - timedelta(seconds=i), "eval", 0.2, model="o3",
                          feature="tagging") for i in range(4)]  # fmt: skip
    baseline = [ScoreRecord(f"b{i}", NOW - timedelta(hours=2), "eval", 0.9, model="o4-mini",
                            feature="a b") for i in range(6)]  # fmt: skip
    write_scores(store, scores + baseline)

    found = window_aggregates(store, NOW, 300, max_scopes=2)

    assert set(found.by_scope) == {
        "global",
        "model:gpt-4.1", "model:o3", "model:(other)",
        "feature:search", "feature:chat", "feature:(other)",
    }  # fmt: skip
    other = found.scope("feature:(other)")
    assert (other.calls, other.errors) == (5 + 3 + 4, 0)
    assert sum(other.latency_histogram.values()) == 12
    assert max(other.latency_histogram) >= 180  # the 9 s calls of "a b" are in it
    assert other.quality_count == 4
    assert other.quality_sum == pytest.approx(0.8)
    assert other.baseline_count == 6
    assert other.baseline_sum == pytest.approx(5.4)
    assert found.scope("feature:chat").errors == 20
    assert found.scope("model:(other)").calls == 7
    assert found.scope("model:o3").calls == 12
    assert found.scope("global").calls == 69
    assert found.scope("global").quality_count == 4
    assert found.folded == {
        "feature": FoldedInfo(values=3, calls=12, top=2),
        "model": FoldedInfo(values=1, calls=7, top=2),
    }
    # Scopes of one kind do not overlap: what is left of global is the feature-less calls.
    assert found.global_without(["feature:search", "feature:chat", "feature:(other)"]).calls == 7
    with pytest.raises(ValueError, match="one kind"):
        found.global_without(["feature:chat", "model:o3"])


def test_enough_room_keeps_every_name_and_odd_ones_read_as_before(store: Engine) -> None:
    write_calls(store, calls(3, "a b") + calls(2, "chat", model="o3"))
    found = window_aggregates(store, NOW, 300)
    assert found.folded == {}
    assert set(found.by_scope) == {"global", "model:gpt-4.1", "model:o3", "feature:a_b",
                                   "feature:chat"}  # fmt: skip
    assert found.scope("feature:a_b").calls == 3


def test_a_kept_scope_stays_out_of_the_fold_while_it_has_calls(store: Engine) -> None:
    write_calls(store, calls(30, "search") + calls(20, "chat") + calls(2, "checkout"))
    found = window_aggregates(
        store, NOW, 300, max_scopes=2, keep=["feature:checkout", "feature:gone", "global"]
    )
    assert {"feature:checkout", "feature:search", "feature:(other)"} <= set(found.by_scope)
    assert found.scope("feature:checkout").calls == 2
    assert found.folded["feature"] == FoldedInfo(values=1, calls=20, top=2)


def test_a_kept_scope_with_a_cleaned_up_name_stays_out_of_the_fold(store: Engine) -> None:
    """`feature:checkout_flow` is made of "checkout flow" and "checkout#flow" (and of
    "checkout_flow", none here); "checkoutXflow" is another name."""
    write_calls(
        store,
        calls(30, "search") + calls(20, "chat") + calls(2, "checkout flow")
        + calls(1, "checkout#flow") + calls(1, "checkoutXflow"),
    )  # fmt: skip
    found = window_aggregates(store, NOW, 300, max_scopes=3, keep=["feature:checkout_flow"])

    assert found.scope("feature:checkout_flow").calls == 3
    assert found.folded["feature"] == FoldedInfo(values=2, calls=21, top=3)


def twice(config: DetectorRules, aggregates: WindowAggregates) -> Evaluation:
    states: dict[str, RuleState] = {}
    for _ in range(config.rules[0].for_evaluations):
        evaluation = evaluate(config, aggregates, states, daily_budget_usd=1e9)
        states = evaluation.rule_states
    return evaluation


def test_twenty_thousand_features_fold_and_the_busy_breach_is_found(store: Engine) -> None:
    busy = calls(1000, "checkout", status="error") + calls(1000, "checkout")
    quiet = [
        record
        for i in range(20_000)
        for record in calls(1 + i % 3, f"feature-{i:05d}", latency_ms=100 + i % 2000)
    ]
    write_calls(store, busy + quiet)

    found = window_aggregates(store, NOW, 300, max_scopes=50)
    everything = window_aggregates(store, NOW, 300, max_scopes=100_000)  # as before: a scope each

    assert len(found.by_scope) == 1 + 1 + 51  # global, the one model, 50 features + (other)
    assert found.folded["feature"] == FoldedInfo(values=20_000 - 49, calls=39_999 - 49 * 3, top=50)
    assert size(found) < 200_000 < PAYLOAD_LIMIT / 10
    assert size(everything) > PAYLOAD_LIMIT  # what made Temporal refuse the result
    evaluation = twice(DetectorRules(), found)
    firing = {(str(f.trigger), f.scope) for f in evaluation.firing}
    assert ("error_rate", "feature:checkout") in firing
    assert not any(scope == "feature:(other)" for _, scope in firing)
    # Global breaches too (1,000 errors in 41,999 calls), but the rest of the traffic is
    # healthy: the problem is checkout's alone.
    assert "error_rate|global" in evaluation.inhibited


def test_the_worst_case_result_stays_far_below_the_payload_limit() -> None:
    """100 models and 100 features (the largest PAGERLOOP_DETECTOR_MAX_SCOPES) with the longest
    names, their (other) scopes and global, each with every latency bucket and large sums."""
    full = Aggregate(
        calls=10**9, successes=10**9, errors=10**8, timeouts=10**8, rate_limited=10**8,
        server_errors=10**8, input_tokens=10**13, output_tokens=10**13, cost_usd=123456.789012,
        latency_histogram={b: 98_765_432 for b in range(LAST_BUCKET + 1)},
        quality_count=10**8, quality_sum=65432.1098765, baseline_count=10**9,
        baseline_sum=123456789.123456, baseline_sumsq=98765432.987654,
    )  # fmt: skip
    names = ["global", "model:(other)", "feature:(other)"]
    names += [f"{kind}:{i:03d}{'x' * 125}" for kind in ("model", "feature") for i in range(100)]
    worst = WindowAggregates.of_scopes(
        NOW,
        300,
        {name: full for name in names},
        cost_today_usd=123456.789,
        folded={k: FoldedInfo(10**9, 10**12, 100) for k in ("model", "feature")},
    )
    assert len(worst.by_scope) == 203
    assert size(worst) < 0.4 * PAYLOAD_LIMIT  # 685,015 bytes when written


@pytest.mark.parametrize(
    ("model", "label"),
    [
        ("gpt-4.1", "gpt-4.1"),
        ("gpt-4.1-2025-04-14", "gpt-4.1"),
        ("o4-mini", "o4-mini"),
        ("my-finetune-42", "other"),
        ("gpt-4.1-2025-04-14-x", "other"),
    ],
)
def test_unpriced_calls_are_counted_under_known_models_or_other(model: str, label: str) -> None:
    def counted(value: str) -> float:
        sample = REGISTRY.get_sample_value("pagerloop_unpriced_calls_total", {"model": value})
        return sample or 0.0

    before = counted(label)
    count_unpriced(model)
    assert counted(label) == before + 1
    if label != model:
        assert counted(model) == 0.0
