"""The runbooks' diagnosis queries and the re-read of a breached signal, on SQLite and PostgreSQL.

Expected answers are computed here from the records written, by brute force over the rows, so
the rollup + partial-minute arithmetic of the stores is checked against the plain definition.
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine
from temporalio import activity
from temporalio.contrib.pydantic import pydantic_data_converter

from activities.diagnosis import (
    DiagnosisActivities,
    DiagnosisQuery,
    ErrorGroup,
    FeatureUsage,
    ModelLatency,
    ModelQuality,
    ModelRateLimits,
    SignalCheck,
    SignalReading,
)
from detectors.config import DetectorRules
from detectors.reading import SignalJudge
from detectors.rules import DEFAULT_RULES, Rule
from domain.histogram import RELATIVE_ERROR, exact_percentile
from domain.scopes import scope_name
from stores.llm_calls import CallRecord, utc
from stores.quality import ScoreRecord, write_scores
from stores.writer import write_calls

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
UNALIGNED = NOW + timedelta(seconds=25, microseconds=500_000)
ODD_MODEL = "ft:gpt-4.1:acme/support v2"  # its scope name replaces the space
ODD_FEATURE = "weird feature!"
MODELS = ("gpt-4.1", "o3", ODD_MODEL)
FEATURES = ("chat", "search", "summarize", ODD_FEATURE, None)
BANDS = (
    ("<1k", 0, 1_000),
    ("1k-4k", 1_000, 4_000),
    ("4k-16k", 4_000, 16_000),
    (">=16k", 16_000, math.inf),
)
TOLERANCE = RELATIVE_ERROR * 1.0001


def diagnosis(store: Engine, rules: DetectorRules | None = None) -> DiagnosisActivities:
    return DiagnosisActivities(store, SignalJudge(rules or DetectorRules(), daily_budget_usd=500.0))


def query(
    scope: str = "global", end: datetime = NOW, window: int = 900, limit: int = 100
) -> DiagnosisQuery:
    return DiagnosisQuery(scope=scope, end=end, window_seconds=window, limit=limit)


def call(ts: datetime, status: str = "success", **extra: object) -> CallRecord:
    fields: dict[str, object] = {"model": "gpt-4.1", "latency_ms": 100.0, **extra}
    return CallRecord(ts=ts, status=status, **fields)  # type: ignore[arg-type]


def ago(seconds: float, end: datetime = NOW) -> datetime:
    return end - timedelta(seconds=seconds)


# --- the reference: the definitions, by brute force over the records ------------------------


def in_window(records: list[CallRecord], end: datetime, window: float) -> list[CallRecord]:
    start = end - timedelta(seconds=window)
    return [r for r in records if start < r.ts <= end]


def in_scope(scope: str, record: CallRecord) -> bool:
    if scope == "global":
        return True
    if scope.startswith("model:"):
        return scope_name("model", record.model) == scope
    return record.feature is not None and scope_name("feature", record.feature) == scope


def selected(
    records: list[CallRecord], scope: str, end: datetime, window: float
) -> list[CallRecord]:
    return [r for r in in_window(records, end, window) if in_scope(scope, r)]


def close(estimate: float | None, exact: float) -> bool:
    return estimate is not None and abs(estimate - exact) <= TOLERANCE * exact


def random_calls(seed: int, end: datetime, window: int) -> list[CallRecord]:
    """Calls from 150 s before the window to 120 s after it, plus calls on and beside both
    edges, over models and features with odd names, every status, some without tokens."""
    rng = random.Random(seed)
    start = end - timedelta(seconds=window)
    span = int((window + 270) * 1_000_000)
    times = [
        start - timedelta(seconds=150) + timedelta(microseconds=rng.randrange(span))
        for _ in range(500)
    ]
    tick = timedelta(microseconds=1)
    edges = [start, start + tick, start - tick, end, end - tick, end + tick]
    times += edges * 3
    records = []
    for i, ts in enumerate(times):
        # Calls sharing a timestamp: only one may carry a message, so "the latest" is one.
        quiet = i >= 500 + len(edges)
        status = rng.choices(
            ("success", "error", "timeout", "rate_limited", "server_error"), (70, 8, 4, 12, 6)
        )[0]
        tokens = None if rng.random() < 0.15 else int(rng.lognormvariate(7, 1.5))
        failed = status != "success"
        records.append(
            call(
                ts,
                status,
                model=rng.choice(MODELS),
                feature=rng.choice(FEATURES),
                latency_ms=max(1.0, rng.lognormvariate(6, 1)),
                input_tokens=tokens,
                output_tokens=None if tokens is None or failed else rng.randrange(1, 800),
                cost_usd=None if tokens is None else tokens * 2e-6 * rng.uniform(1, 3),
                retry_count=rng.randrange(4) if status == "rate_limited" else 0,
                error_type=rng.choice(("RateLimitError", "APIError", None)) if failed else None,
                error_message=f"{status} #{i}"
                if failed and not quiet and rng.random() < 0.7
                else None,
            )
        )
    return records


WINDOWS = [
    pytest.param(NOW, 900, id="aligned-15m"),
    pytest.param(UNALIGNED, 900, id="unaligned-15m"),
    pytest.param(UNALIGNED, 45, id="unaligned-45s-no-whole-minute"),
    pytest.param(NOW, 60, id="aligned-1m"),
    pytest.param(UNALIGNED, 150, id="unaligned-150s"),
]
SCOPES = (
    "global",
    "model:o3",
    scope_name("model", ODD_MODEL),
    "feature:chat",
    scope_name("feature", ODD_FEATURE),
)


@pytest.mark.parametrize(("end", "window"), WINDOWS)
async def test_every_query_matches_the_rows_of_its_window_and_scope(
    store: Engine, end: datetime, window: int
) -> None:
    records = random_calls(seed=window, end=end, window=window)
    write_calls(store, records)
    activities = diagnosis(store)
    assert scope_name("model", ODD_MODEL) != f"model:{ODD_MODEL}"  # the scope is sanitised
    for scope in SCOPES:
        rows = selected(records, scope, end, window)
        assert rows, scope  # every scope has calls in every window
        q = query(scope, end, window, limit=1000)

        features = await activities.top_features(q)
        by_feature: dict[str, list[CallRecord]] = defaultdict(list)
        for r in rows:
            by_feature[r.feature or ""].append(r)
        assert {f.feature for f in features} == set(by_feature), scope
        total_cost = sum(r.cost_usd or 0 for r in rows)
        for f in features:
            mine = by_feature[f.feature]
            assert f.calls == len(mine)
            assert f.tokens == sum((r.input_tokens or 0) + (r.output_tokens or 0) for r in mine)
            assert f.cost_usd == pytest.approx(sum(r.cost_usd or 0 for r in mine))
            assert f.rate_limited == sum(r.status == "rate_limited" for r in mine)
            assert f.share_of_cost == pytest.approx(f.cost_usd / total_cost)
            flowing_ms = (utc(end) - min(r.ts for r in mine)).total_seconds() * 1000
            in_flight = sum(r.latency_ms for r in mine) / flowing_ms
            assert f.concurrency == pytest.approx(in_flight)
            counts = Counter(r.model for r in mine)
            assert f.models == sorted(counts, key=lambda m: (-counts[m], m))
        ranking = [(f.cost_usd, f.tokens) for f in features]
        assert ranking == sorted(ranking, reverse=True)

        limits = await activities.rate_limits(q)
        by_model: dict[str, list[CallRecord]] = defaultdict(list)
        for r in rows:
            by_model[r.model].append(r)
        assert {m.model for m in limits} == set(by_model)
        for m in limits:
            mine = by_model[m.model]
            assert m.calls == len(mine)
            assert m.rate_limited == sum(r.status == "rate_limited" for r in mine)
            assert m.share == pytest.approx(m.rate_limited / m.calls)
            assert m.retries == sum(r.retry_count for r in mine)
        assert [m.share for m in limits] == sorted((m.share for m in limits), reverse=True)

        latencies = await activities.latency(q)
        assert {m.model for m in latencies} == set(by_model)
        for m in latencies:
            mine = by_model[m.model]
            times = [r.latency_ms for r in mine]
            assert m.calls == len(mine)
            assert close(m.p50_ms, exact_percentile(times, 0.5))
            assert close(m.p95_ms, exact_percentile(times, 0.95))
            sized = [r for r in mine if r.input_tokens is not None]
            if sized:
                average = sum(r.input_tokens or 0 for r in sized) / len(sized)
                assert m.avg_input_tokens == pytest.approx(average)
            else:
                assert m.avg_input_tokens is None
            expected_bands = {}
            for band, low, high in BANDS:
                band_times = [r.latency_ms for r in sized if low <= (r.input_tokens or 0) < high]
                if band_times:
                    expected_bands[band] = exact_percentile(band_times, 0.95)
            assert m.p95_by_prompt_size.keys() == expected_bands.keys()
            for band, exact in expected_bands.items():
                assert close(m.p95_by_prompt_size[band], exact), (m.model, band)

        errors = await activities.recent_errors(q)
        groups: dict[tuple[str, str, str, str], list[CallRecord]] = defaultdict(list)
        for r in rows:
            if r.status != "success":
                groups[(r.model, r.feature or "", r.status, r.error_type or "")].append(r)
        assert {(e.model, e.feature, e.status, e.error_type) for e in errors} == set(groups)
        for e in errors:
            mine = groups[(e.model, e.feature, e.status, e.error_type)]
            assert e.count == len(mine)
            assert e.last_seen == max(r.ts for r in mine)
            messages = sorted((r.ts, r.error_message) for r in mine if r.error_message)
            assert e.sample_message == (messages[-1][1] if messages else "")
        seen = [e.last_seen for e in errors]
        assert seen == sorted(seen, reverse=True)


async def test_top_features_rank_by_cost_then_tokens(store: Engine) -> None:
    records = (
        # chat: the most cost, on two models (gpt-4.1 more often), with 429s
        [
            call(
                ago(10 + i),
                model="gpt-4.1",
                feature="chat",
                cost_usd=0.5,
                input_tokens=100,
                latency_ms=1500,
            )
            for i in range(4)
        ]
        + [call(ago(20), "rate_limited", model="gpt-4.1", feature="chat", latency_ms=30)]
        + [
            call(ago(30 + i), model="o3", feature="chat", cost_usd=0.25, input_tokens=100)
            for i in range(2)
        ]
        # search and summarize cost the same: search uses more tokens
        + [
            call(
                ago(40 + i),
                model="gpt-4.1-mini",
                feature="search",
                cost_usd=0.1,
                input_tokens=3000,
                output_tokens=100,
            )
            for i in range(10)
        ]
        + [
            call(
                ago(60 + i),
                model="gpt-4.1-mini",
                feature="summarize",
                cost_usd=0.25,
                input_tokens=500,
                output_tokens=100,
            )
            for i in range(4)
        ]
        + [call(ago(90), model="gpt-4.1", cost_usd=0.01, input_tokens=10)]  # no feature
    )
    write_calls(store, records)
    found = await diagnosis(store).top_features(query(window=300, limit=3))
    assert [f.feature for f in found] == ["chat", "search", "summarize"]  # "" is cut by the limit
    chat = found[0]
    assert (chat.calls, chat.rate_limited) == (7, 1)
    assert chat.cost_usd == pytest.approx(4 * 0.5 + 2 * 0.25)
    assert chat.models == ["gpt-4.1", "o3"]
    total = sum(r.cost_usd or 0 for r in records)
    assert chat.share_of_cost == pytest.approx(chat.cost_usd / total)
    # Little's law: 4 calls of 1.5 s, one of 30 ms and two of 100 ms over the 31 s since chat's
    # first call (not over the 300 s window: it was not idle before it started).
    assert chat.concurrency == pytest.approx((4 * 1500 + 30 + 2 * 100) / 31_000)
    assert found[1].cost_usd == pytest.approx(found[2].cost_usd)
    assert found[1].tokens > found[2].tokens

    only_mini = await diagnosis(store).top_features(query("model:gpt-4.1-mini", window=300))
    assert [(f.feature, f.share_of_cost) for f in only_mini] == [
        ("search", pytest.approx(0.5)),
        ("summarize", pytest.approx(0.5)),
    ]
    assert await diagnosis(store).top_features(query("feature:nothing", window=300)) == []


async def test_rate_limits_worst_share_first_with_retries(store: Engine) -> None:
    records = (
        [call(ago(5 + i), "rate_limited", model="o3", retry_count=3) for i in range(6)]
        + [call(ago(30 + i), model="o3") for i in range(4)]
        + [call(ago(50 + i), "rate_limited", model="gpt-4.1", retry_count=1) for i in range(2)]
        + [call(ago(60 + i), model="gpt-4.1", retry_count=1) for i in range(18)]
        + [call(ago(100 + i), model="gpt-4.1-mini") for i in range(5)]
        + [call(ago(400), "rate_limited", model="gpt-4.1-mini")]  # before the window
    )
    write_calls(store, records)
    found = await diagnosis(store).rate_limits(query(window=300))
    assert [(m.model, m.calls, m.rate_limited, m.retries) for m in found] == [
        ("o3", 10, 6, 18),
        ("gpt-4.1", 20, 2, 20),
        ("gpt-4.1-mini", 5, 0, 0),
    ]
    assert [m.share for m in found] == [pytest.approx(0.6), pytest.approx(0.1), 0.0]
    assert [m.model for m in await diagnosis(store).rate_limits(query(window=300, limit=1))] == [
        "o3"
    ]


async def test_latency_by_model_and_prompt_size(store: Engine) -> None:
    rng = random.Random(7)
    small = [
        call(
            ago(i * 3),
            model="gpt-4.1",
            input_tokens=rng.randrange(50, 999),
            latency_ms=rng.uniform(150, 400),
        )
        for i in range(40)
    ]
    large = [
        call(
            ago(i * 5 + 1),
            model="gpt-4.1",
            input_tokens=rng.randrange(16_000, 90_000),
            latency_ms=rng.uniform(4_000, 9_000),
        )
        for i in range(20)
    ]
    # o3 never reports tokens: it has latencies, no prompt sizes
    untokened = [
        call(ago(i * 7 + 2), model="o3", latency_ms=rng.uniform(100, 200)) for i in range(10)
    ]
    write_calls(store, small + large + untokened)
    found = await diagnosis(store).latency(query(window=600))
    assert [m.model for m in found] == ["gpt-4.1", "o3"]  # the slowest p95 first
    gpt, o3 = found
    both = small + large
    assert gpt.calls == 60
    assert close(gpt.p95_ms, exact_percentile([r.latency_ms for r in both], 0.95))
    assert gpt.avg_input_tokens == pytest.approx(sum(r.input_tokens or 0 for r in both) / len(both))
    assert list(gpt.p95_by_prompt_size) == ["<1k", ">=16k"]
    assert close(
        gpt.p95_by_prompt_size["<1k"],
        exact_percentile([r.latency_ms for r in small], 0.95),
    )
    assert close(
        gpt.p95_by_prompt_size[">=16k"],
        exact_percentile([r.latency_ms for r in large], 0.95),
    )
    assert (o3.calls, o3.avg_input_tokens, o3.p95_by_prompt_size) == (10, None, {})
    assert close(o3.p50_ms, exact_percentile([r.latency_ms for r in untokened], 0.5))
    assert await diagnosis(store).latency(query(window=600, end=NOW - timedelta(hours=1))) == []


async def test_recent_errors_grouped_most_recent_first(store: Engine) -> None:
    records = [
        call(
            ago(200),
            "server_error",
            model="o3",
            feature="chat",
            error_type="InternalServerError",
            error_message="upstream 500 (older)",
        ),
        call(
            ago(100),
            "server_error",
            model="o3",
            feature="chat",
            error_type="InternalServerError",
            error_message="upstream 502 (newest with a message)",
        ),
        call(ago(50), "server_error", model="o3", feature="chat", error_type="InternalServerError"),
        call(
            ago(80),
            "rate_limited",
            model="gpt-4.1",
            error_type="RateLimitError",
            error_message="429 Too Many Requests",
        ),
        call(ago(150), "timeout", model="gpt-4.1", feature="search"),
        call(ago(10), model="o3", feature="chat"),  # a success is no error
        call(ago(1000), "error", model="o3", feature="chat", error_message="too old"),
    ]
    write_calls(store, records)
    found = await diagnosis(store).recent_errors(query(window=900))
    assert found == [
        ErrorGroup(
            "o3",
            "chat",
            "server_error",
            "InternalServerError",
            3,
            ago(50),
            "upstream 502 (newest with a message)",
        ),
        ErrorGroup(
            "gpt-4.1", "", "rate_limited", "RateLimitError", 1, ago(80), "429 Too Many Requests"
        ),
        ErrorGroup("gpt-4.1", "search", "timeout", "", 1, ago(150), ""),
    ]
    assert len(await diagnosis(store).recent_errors(query(window=900, limit=2))) == 2
    by_feature = await diagnosis(store).recent_errors(query("feature:search", window=900))
    assert [(e.model, e.status) for e in by_feature] == [("gpt-4.1", "timeout")]


OLD_SNAPSHOT, NEW_SNAPSHOT = "gpt-4.1-2025-04-14", "gpt-4.1-2026-11-01"


async def test_quality_by_requested_model_and_snapshot(store: Engine) -> None:
    start = NOW - timedelta(seconds=900)
    cases: list[tuple[CallRecord, list[tuple[datetime, float]]]] = []

    def scored(record: CallRecord, *scores: tuple[datetime, float]) -> None:
        cases.append((record, list(scores)))

    for i in range(6):
        t = ago(800 - i * 10)
        scored(call(t, model="gpt-4.1", response_model=OLD_SNAPSHOT, feature="chat"), (t, 0.9))
    for i in range(4):
        t = ago(300 - i * 10)
        scored(call(t, model="gpt-4.1", response_model=NEW_SNAPSHOT, feature="chat"), (t, 0.3))
    for i in range(3):
        t = ago(500 - i)
        scored(call(t, model="o3", response_model="o3-2025-04-16", feature="search"), (t, 0.7))
    # user feedback later on a call that reported no snapshot; and scores on the window's edges
    scored(call(ago(400), model="o3", feature="search"), (ago(100), 0.2))
    scored(
        call(ago(950), model="gpt-4.1", response_model=NEW_SNAPSHOT, feature="chat"),
        (start, 0.0),  # on the window's start: outside
        (start + timedelta(microseconds=1), 0.1),
        (NOW, 0.2),
        (NOW + timedelta(microseconds=1), 0.0),
    )
    write_calls(store, [record for record, _ in cases])
    scores = [
        ScoreRecord(
            record.call_id,
            ts,
            "scorer",
            value,
            model=record.response_model or record.model,
            feature=record.feature,
        )
        for record, marks in cases
        for ts, value in marks
    ]
    # an eval score on a call the log does not have: it counts under the model it names
    scores.append(ScoreRecord("external-1", ago(60), "eval", 0.5, model="gpt-4o"))
    write_scores(store, scores)

    expected: dict[tuple[str, str], list[tuple[datetime, float]]] = defaultdict(list)
    for record, marks in cases:
        for ts, value in marks:
            if start < ts <= NOW:
                expected[(record.model, record.response_model or "")].append((ts, value))
    expected[("gpt-4o", "")].append((ago(60), 0.5))

    def answer(keys: set[tuple[str, str]]) -> list[tuple[object, ...]]:
        rows = [
            (
                model,
                snapshot,
                len(marks),
                round(sum(v for _, v in marks) / len(marks), 9),
                min(t for t, _ in marks),
                max(t for t, _ in marks),
            )
            for (model, snapshot), marks in expected.items()
            if (model, snapshot) in keys
        ]
        return sorted(rows, key=lambda row: row[3])  # type: ignore[arg-type, return-value]

    def rows(found: list[ModelQuality]) -> list[tuple[object, ...]]:
        return [
            (m.model, m.response_model, m.scores, round(m.mean, 9), m.first_seen, m.last_seen)
            for m in found
        ]

    activities = diagnosis(store)
    everything = await activities.quality(query())
    assert rows(everything) == answer(set(expected))
    assert len({m.mean for m in everything}) == len(everything)  # the order is not by chance
    new = next(m for m in everything if m.response_model == NEW_SNAPSHOT)
    # the edge scores: the one on the start is out, the one on the end is in
    assert (new.scores, new.first_seen, new.last_seen) == (
        6,
        start + timedelta(microseconds=1),
        NOW,
    )
    gpt = {("gpt-4.1", OLD_SNAPSHOT), ("gpt-4.1", NEW_SNAPSHOT)}
    # A snapshot's scope (as the detector names it, from the score) shows the model's snapshots.
    assert rows(await activities.quality(query(f"model:{NEW_SNAPSHOT}"))) == answer(gpt)
    assert rows(await activities.quality(query("model:gpt-4.1"))) == answer(gpt)
    assert rows(await activities.quality(query("feature:search"))) == answer(
        {("o3", "o3-2025-04-16"), ("o3", "")}
    )
    assert rows(await activities.quality(query("model:gpt-4o"))) == answer({("gpt-4o", "")})
    assert len(await activities.quality(query(limit=2))) == 2


# --- check_signal --------------------------------------------------------------------------


def rule(name: str) -> Rule:
    return next(r for r in DEFAULT_RULES if r.name == name)


async def check(store: Engine, trigger: str, scope: str = "global") -> SignalReading:
    return await diagnosis(store).check_signal(SignalCheck(trigger, scope, NOW, 300))


def traffic(n: int, status_of: dict[int, str] | None = None, **extra: object) -> list[CallRecord]:
    status_of = status_of or {}
    return [call(ago(1 + i * 250 / n), status_of.get(i, "success"), **extra) for i in range(n)]


@pytest.mark.parametrize(
    ("calls", "limited", "breached", "recovered"),
    [
        pytest.param(100, 8, True, False, id="8%-over-critical"),
        pytest.param(200, 3, True, False, id="1.5%-over-warning"),
        pytest.param(1000, 9, False, False, id="0.9%-between-clear-line-and-warning"),
        pytest.param(250, 1, False, True, id="0.4%-past-clear-line"),
        pytest.param(10, 5, False, False, id="too-few-calls"),
    ],
)
async def test_check_signal_rate_limit(
    store: Engine, calls: int, limited: int, breached: bool, recovered: bool
) -> None:
    write_calls(store, traffic(calls, dict.fromkeys(range(limited), "rate_limited")))
    reading = await check(store, "rate_limit_exhaustion")
    assert (reading.breached, reading.recovered) == (breached, recovered)
    assert reading.calls == calls
    assert reading.values == {"calls": calls, "rate_limit_rate": pytest.approx(limited / calls)}
    assert f"{limited / calls:.1%}" in reading.summary
    assert f"{calls} calls" in reading.summary
    limit_rule = rule("rate_limit")
    if calls < limit_rule.min_samples:
        assert "too few samples" in reading.summary
    elif not breached:
        assert f"clear line {limit_rule.clear_line():.1%}" in reading.summary


async def test_check_signal_reads_its_scope_only(store: Engine) -> None:
    write_calls(
        store,
        traffic(50, dict.fromkeys(range(10), "rate_limited"), model="o3")
        + traffic(950, model="gpt-4.1"),
    )
    narrow, wide = (
        await check(store, "rate_limit_exhaustion", "model:o3"),
        await check(store, "rate_limit_exhaustion"),
    )
    assert (narrow.breached, narrow.calls, narrow.values["rate_limit_rate"]) == (True, 50, 0.2)
    # 10 of 1000 is 1.0 %: on the warning line, not over it, and not back past the clear line
    assert (wide.breached, wide.recovered, wide.calls) == (False, False, 1000)
    # calls before the 5-minute window do not count
    write_calls(store, [call(ago(400), "rate_limited", model="o3") for _ in range(100)])
    assert (await check(store, "rate_limit_exhaustion", "model:o3")).calls == 50


@pytest.mark.parametrize(
    ("fast", "slow", "slow_ms", "breached", "recovered"),
    [
        pytest.param(0, 40, 9_000, True, False, id="p50-and-p95-over"),
        pytest.param(36, 4, 9_000, True, False, id="p95-over"),
        pytest.param(36, 4, 7_000, False, False, id="p95-between-clear-line-and-warning"),
        pytest.param(40, 0, 0, False, True, id="both-past-clear-lines"),
        pytest.param(0, 5, 9_000, False, False, id="too-few-calls"),
    ],
)
async def test_check_signal_latency(
    store: Engine, fast: int, slow: int, slow_ms: float, breached: bool, recovered: bool
) -> None:
    write_calls(
        store,
        traffic(fast, latency_ms=300.0)
        + [call(ago(5 + i), latency_ms=slow_ms) for i in range(slow)],
    )
    reading = await check(store, "elevated_latency")
    assert (reading.breached, reading.recovered) == (breached, recovered)
    times = [300.0] * fast + [slow_ms] * slow
    assert close(reading.values["latency_p95_ms"], exact_percentile(times, 0.95))
    assert close(reading.values["latency_p50_ms"], exact_percentile(times, 0.5))
    assert "p95 latency" in reading.summary
    assert "p50 latency" in reading.summary
    if breached:
        assert " > " in reading.summary
    if recovered:
        assert reading.summary.count("clear line") == 2


def quality_scores(n: int, value: float | list[float], seconds_ago: float = 0) -> list[ScoreRecord]:
    values = value if isinstance(value, list) else [value] * n
    return [
        ScoreRecord(
            f"c{seconds_ago}-{i}",
            ago(seconds_ago + 1 + i * 5),
            "scorer",
            values[i],
            model="gpt-4.1",
            feature="chat",
        )
        for i in range(n)
    ]


@pytest.mark.parametrize(
    ("recent", "baseline", "breached", "recovered"),
    [
        pytest.param(0.4, None, True, False, id="mean-under-critical"),
        pytest.param(0.9, None, False, True, id="mean-good-without-baseline"),
        pytest.param(0.8, 0.95, True, False, id="drifted-from-baseline"),
        pytest.param(0.95, 0.95, False, True, id="mean-and-drift-good"),
        pytest.param(0.66, None, True, False, id="mean-under-warning"),
    ],
)
async def test_check_signal_quality(
    store: Engine, recent: float, baseline: float | None, breached: bool, recovered: bool
) -> None:
    scores = quality_scores(25, recent)
    if baseline is not None:
        # 40 scores two to three hours ago, a spread of 0.02 around the baseline mean
        spread = [baseline + (0.02 if i % 2 else -0.02) for i in range(40)]
        scores += quality_scores(40, spread, seconds_ago=2 * 3600)
    write_scores(store, scores)
    reading = await check(store, "quality_degradation", "model:gpt-4.1")
    assert (reading.breached, reading.recovered) == (breached, recovered)
    assert reading.values["quality_mean"] == pytest.approx(recent)
    assert reading.values["quality_scores"] == 25
    if baseline is None:
        assert "quality_drift_z" not in reading.values
        assert "quality drift not measured" in reading.summary
    else:
        sd = math.sqrt(0.02**2 * 40 / 39)
        assert reading.values["quality_drift_z"] == pytest.approx((recent - baseline) / sd)
    assert "25 quality scores" in reading.summary


async def test_check_signal_quality_with_too_few_scores(store: Engine) -> None:
    write_scores(store, quality_scores(5, 0.1))
    reading = await check(store, "quality_degradation", "feature:chat")
    assert (reading.breached, reading.recovered) == (False, False)
    assert reading.values["quality_scores"] == 5
    assert f"5 of {rule('quality').min_samples} quality scores" in reading.summary


async def test_check_signal_without_a_rule_judges_nothing(store: Engine) -> None:
    write_calls(store, traffic(100, dict.fromkeys(range(50), "rate_limited")))
    # The budget rule watches global only; disabled rules do not count.
    budget = await check(store, "budget_exhaustion", "model:gpt-4.1")
    assert (budget.breached, budget.recovered) == (False, False)
    assert "no enabled rule" in budget.summary
    disabled = DetectorRules(rules=tuple(replace(r, enabled=False) for r in DEFAULT_RULES))
    reading = await diagnosis(store, disabled).check_signal(
        SignalCheck("rate_limit_exhaustion", "global", NOW, 300)
    )
    assert (reading.breached, reading.recovered, reading.calls) == (False, False, 100)


# --- the activity interface ----------------------------------------------------------------


def test_activity_names() -> None:
    names = {
        activity._Definition.must_from_callable(method).name  # type: ignore[attr-defined]
        for method in (
            DiagnosisActivities.top_features,
            DiagnosisActivities.rate_limits,
            DiagnosisActivities.latency,
            DiagnosisActivities.recent_errors,
            DiagnosisActivities.quality,
            DiagnosisActivities.check_signal,
        )
    }
    assert names == {
        "diagnosis.top_features",
        "diagnosis.rate_limits",
        "diagnosis.latency",
        "diagnosis.recent_errors",
        "diagnosis.quality",
        "diagnosis.check_signal",
    }


def test_answers_survive_the_data_converter() -> None:
    converter = pydantic_data_converter.payload_converter
    answers: list[object] = [
        [FeatureUsage("chat", 3, 10, 0.5, 1, 1.0, 0.2, ["gpt-4.1"])],
        [ModelRateLimits("o3", 10, 6, 0.6, 18)],
        [ModelLatency("o3", 10, 150.0, None, None, {"<1k": 200.0})],
        [ErrorGroup("o3", "", "timeout", "", 1, NOW, "")],
        [ModelQuality("gpt-4.1", NEW_SNAPSHOT, 4, 0.3, ago(60), NOW)],
        SignalReading("elevated_latency", "global", {"calls": 3.0}, 3, False, True, "ok"),
        query(end=UNALIGNED),
        SignalCheck("elevated_latency", "model:o3", UNALIGNED),
    ]
    hints: list[type] = [
        list[FeatureUsage],
        list[ModelRateLimits],
        list[ModelLatency],
        list[ErrorGroup],
        list[ModelQuality],
        SignalReading,
        DiagnosisQuery,
        SignalCheck,
    ]
    payloads = converter.to_payloads(answers)
    assert converter.from_payloads(payloads, hints) == answers
