"""Canary comparison: the two sides read from the call log (SQLite and PostgreSQL), and the
verdict the `canary.compare` activity gives on them."""

from __future__ import annotations

import random
from collections import Counter
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine
from sqlmodel import Session

from activities.canary import CanaryActivities, CanaryCheck, judge
from domain.histogram import bucket
from stores import canary as sides_store
from stores.llm_calls import CACHE_SOURCE, LLMCall
from stores.quality import QualityScore

T0 = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
STATUSES = ("success", "success", "success", "error", "timeout", "rate_limited", "server_error")


def _rows(seed: int) -> tuple[list[LLMCall], list[QualityScore]]:
    """Calls around a 5-minute window: tagged and not, in and out of the target, some served
    from cache, a `canary#12` that must not count as `canary#1`."""
    rng = random.Random(seed)
    calls, scores = [], []
    for i in range(600):
        tag = rng.choice([None, "canary#1", "reroute#1,canary#1", "canary#12", "max_tokens#3"])
        call = LLMCall(
            call_id=f"c{seed}-{i}",
            ts=T0 + timedelta(seconds=rng.uniform(-60, 360)),
            model=rng.choice(["gpt-4.1", "gpt-4.1", "gpt-4o"]),
            feature=rng.choice(["search", "search", "chat"]),
            status=rng.choice(STATUSES),
            latency_ms=(ms := rng.uniform(100, 9000)),
            latency_bucket=bucket(ms),
            cost_usd=rng.choice([None, rng.uniform(0.001, 0.02)]),
            controls=tag,
            source=CACHE_SOURCE if rng.random() < 0.05 else "sdk",
        )
        calls.append(call)
        if rng.random() < 0.3:
            scores.append(
                QualityScore(
                    call_id=call.call_id, ts=call.ts, source="scorer", score=rng.uniform(0, 1)
                )
            )
    return calls, scores


def _brute(
    calls: list[LLMCall], scores: list[QualityScore], target: sides_store.Target
) -> list[dict]:  # type: ignore[type-arg]
    end = T0 + timedelta(minutes=5)
    sides: list[dict] = [Counter(), Counter()]  # type: ignore[type-arg]
    latency: list[Counter[int]] = [Counter(), Counter()]
    by_call = {s.call_id: s.score for s in scores}
    for c in calls:
        if not (T0 <= c.ts < end) or c.source == CACHE_SOURCE:
            continue
        tags = (c.controls or "").split(",")
        canary = any(t in tags for t in target.tags)
        in_target = (target.feature is None or c.feature == target.feature) and (
            not target.models or c.model in target.models
        )
        if not canary and not in_target:
            continue
        side = sides[0 if canary else 1]
        side["calls"] += 1
        side["errors"] += c.status in ("error", "timeout", "server_error")
        side["rate_limited"] += c.status == "rate_limited"
        if c.status == "success":
            latency[0 if canary else 1][bucket(c.latency_ms)] += 1
        if c.cost_usd is not None:
            side["costed"] += 1
            side["cost_sum"] += c.cost_usd
        if c.call_id in by_call:
            side["scores"] += 1
            side["score_sum"] += by_call[c.call_id]
    for side, hist in zip(sides, latency, strict=True):
        side["latency"] = hist
    return sides


def test_the_two_sides_are_the_tagged_calls_and_the_rest_of_the_target(store: Engine) -> None:
    calls, scores = _rows(7)
    with Session(store, expire_on_commit=False) as session:
        session.add_all(calls)
        session.add_all(scores)
        session.commit()
    for target in (
        sides_store.target_of([1], "search", ["gpt-4.1"]),
        sides_store.target_of([1], None, [None]),
        sides_store.target_of([1, 12], "chat", ["gpt-4.1", "gpt-4o"]),
    ):
        canary, rest = sides_store.sides(store, target, T0, T0 + timedelta(minutes=5))
        expected = _brute(calls, scores, target)
        for got, want in ((canary, expected[0]), (rest, expected[1])):
            assert (got.calls, got.errors, got.rate_limited, got.costed, got.scores) == (
                want["calls"],
                want["errors"],
                want["rate_limited"],
                want["costed"],
                want["scores"],
            )
            assert got.latency == want["latency"]
            assert abs(got.cost_sum - want["cost_sum"]) < 1e-9
            assert abs(got.score_sum - want["score_sum"]) < 1e-9
        assert canary.calls > 50
        assert rest.calls > 50


def _side(calls: int, errors: int, *, latency_ms: float = 500.0) -> sides_store.Side:
    side = sides_store.Side(calls=calls, errors=errors)
    side.latency[bucket(latency_ms)] = calls - errors
    return side


def test_a_canary_that_fails_less_is_promoted_and_one_that_fails_more_reverted() -> None:
    better = judge("error_rate", _side(60, 1), _side(600, 300), window_over=True, min_n=30)
    assert better.verdict == "promote", better.reason
    assert better.lines[0].startswith("error rate 1.7% (canary, 60 calls) vs 50.0% (rest, 600)")
    worse = judge("error_rate", _side(100, 40), _side(600, 6), window_over=False, min_n=30)
    assert worse.verdict == "revert"
    assert "worse on error rate" in worse.reason
    few = judge("error_rate", _side(10, 0), _side(600, 300), window_over=True, min_n=30)
    assert few.verdict == "inconclusive"
    assert few.too_few


def test_a_cost_canary_without_costs_recorded_is_too_few_to_judge() -> None:
    result = judge("cost_spike", _side(100, 0), _side(900, 0), window_over=True, min_n=30)
    assert result.verdict == "inconclusive"
    assert result.too_few
    assert "no cost recorded for 1,000 calls" in result.lines[0]


async def test_the_activity_reads_the_store_and_judges(engine: Engine) -> None:
    rows = []
    for i in range(400):
        canary = i % 5 == 0  # 80 canary calls, all answered; the rest fail half the time
        status = "success" if canary or i % 2 else "server_error"
        rows.append(
            LLMCall(
                ts=T0 + timedelta(seconds=i * 0.5),
                model="gpt-4.1",
                status=status,
                latency_ms=400.0,
                latency_bucket=bucket(400.0),
                controls="reroute#5,canary#5" if canary else None,
            )
        )
    with Session(engine) as session:
        session.add_all(rows)
        session.commit()
    check = CanaryCheck(
        trigger="api_outage",
        control_ids=[5],
        feature=None,
        models=["gpt-4.1"],
        start=T0,
        end=T0 + timedelta(minutes=4),
    )
    result = await CanaryActivities(engine).compare(check)
    assert (result.verdict, result.canary_calls, result.rest_calls) == ("promote", 80, 320)
