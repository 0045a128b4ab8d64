"""Rules with windows of their own (2, 5, 10 minutes): one scan of the widest window in the store
answers every window as its own read would (SQLite and PostgreSQL), the activity result stays
below Temporal's 2 MB payload limit with the most windows and scopes the bounds allow, and the
detector asks for the windows of its rules behind the `per-rule-windows` patch."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import pytest
from sqlalchemy import Engine
from temporalio import activity
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer, Worker

from activities.diagnosis import SignalCheck
from activities.incidents import (
    OpenIncidentRequest,
    OpenIncidentResult,
    RecoveryReport,
    RecoveryResults,
)
from activities.metrics import WindowQuery
from detectors.config import MAX_RULE_WINDOWS, DetectorRules
from detectors.detector import (
    PER_RULE_WINDOWS_PATCH,
    PER_SCOPE_PATCH,
    DetectorConfig,
    DetectorInput,
    DetectorWorkflow,
)
from detectors.reading import read_signal
from domain.aggregates import Aggregate, FoldedInfo, WindowAggregates, WindowSums
from domain.histogram import LAST_BUCKET
from stores.aggregates import window_aggregates
from stores.llm_calls import CallRecord
from stores.quality import ScoreRecord, write_scores
from stores.writer import write_calls

PAYLOAD_LIMIT = 2 * 1024 * 1024
NOW = datetime(2026, 11, 26, 12, 0, 45, tzinfo=UTC)  # 45 s into a minute


def size(result: WindowAggregates) -> int:
    [payload] = pydantic_data_converter.payload_converter.to_payloads([result])
    return payload.ByteSize()


def traffic(store: Engine) -> None:
    """Calls and scores spread over the last 12 minutes, two models, three features."""
    calls = []
    for age in range(5, 720, 7):
        model = "gpt-4.1" if age % 2 else "o3"
        feature = ("chat", "search", None)[age % 3]
        status = "error" if age % 5 == 0 else "success"
        for i in range(age % 4 + 1):
            calls.append(CallRecord(
                ts=NOW - timedelta(seconds=age), model=model, feature=feature, status=status,
                latency_ms=100.0 * (1 + age % 17) + i, input_tokens=100 + age, output_tokens=10,
                cost_usd=0.001,
            ))  # fmt: skip
    write_calls(store, calls)
    scores = [
        ScoreRecord(f"q{age}", NOW - timedelta(seconds=age), "eval", (age % 10) / 10,
                    model="o3", feature="chat")
        for age in range(3, 700, 11)
    ] + [
        ScoreRecord(f"b{i}", NOW - timedelta(hours=3), "eval", 0.9, model="o3", feature="chat")
        for i in range(40)
    ]  # fmt: skip
    write_scores(store, scores)


def same(found: WindowAggregates, expected: WindowAggregates) -> None:
    """The same scopes with the same sums (floating-point sums added in another order)."""
    assert found.window_seconds == expected.window_seconds
    assert set(found.by_scope) == set(expected.by_scope)
    for scope in expected.by_scope:
        got, want = asdict(found.scope(scope)), asdict(expected.scope(scope))
        assert got.pop("latency_histogram") == want.pop("latency_histogram"), scope
        assert got == pytest.approx(want, rel=1e-9), scope


def test_the_widest_window_is_the_read_it_was_before(store: Engine) -> None:
    traffic(store)
    found = window_aggregates(store, NOW, 600, windows=[120, 300], max_scopes=1)
    alone = window_aggregates(store, NOW, 600, max_scopes=1)
    assert sorted(found.windows) == [120, 300]
    same(found, alone)
    assert found.folded == alone.folded
    assert found.folded["feature"].values == 1
    assert found.cost_today_usd == alone.cost_today_usd


@pytest.mark.parametrize("seconds", [120, 300])
def test_each_narrower_window_sums_what_its_own_read_does(store: Engine, seconds: int) -> None:
    traffic(store)
    found = window_aggregates(store, NOW, 600, windows=[120, 300])
    alone = window_aggregates(store, NOW, seconds)
    narrower = found.over(seconds)
    assert narrower.window_seconds == seconds + 45
    same(narrower, alone)
    assert narrower.scope("global").calls < found.scope("global").calls
    assert found.over(600) is found


def test_histograms_only_for_the_windows_that_read_them(store: Engine) -> None:
    traffic(store)
    found = window_aggregates(store, NOW, 600, windows=[120, 300], latency_windows=[120])
    assert found.over(120).scope("global").latency_histogram
    assert found.over(300).scope("global").latency_histogram == {}
    assert found.scope("global").latency_histogram == {}
    alone = window_aggregates(store, NOW, 120)
    assert (
        found.over(120).scope("model:o3").latency_histogram
        == alone.scope("model:o3").latency_histogram
    )
    none = window_aggregates(store, NOW, 600, windows=[300], latency_windows=[])
    assert none.scope("global").calls == found.scope("global").calls
    assert none.scope("global").latency_histogram == {}


def test_a_narrower_window_must_be_narrower(store: Engine) -> None:
    with pytest.raises(ValueError, match="narrower"):
        window_aggregates(store, NOW, 300, windows=[600])
    with pytest.raises(ValueError, match="per scope"):
        window_aggregates(store, NOW, 600, windows=[300], per_scope=False)


def test_the_most_windows_and_scopes_stay_below_the_payload_limit() -> None:
    """100 models and 100 features with the longest names, their (other) scopes and global,
    every latency bucket and large sums; the detector's window and MAX_RULE_WINDOWS more, the
    latency rules' two (at most) with histograms."""
    full = Aggregate(
        calls=10**9, successes=10**9, errors=10**8, timeouts=10**8, rate_limited=10**8,
        server_errors=10**8, input_tokens=10**13, output_tokens=10**13, cost_usd=123456.789012,
        latency_histogram={b: 98_765_432 for b in range(LAST_BUCKET + 1)},
        quality_count=10**8, quality_sum=65432.1098765, baseline_count=10**9,
        baseline_sum=123456789.123456, baseline_sumsq=98765432.987654,
    )  # fmt: skip
    bare = replace(full, latency_histogram={})
    names = ["global", "model:(other)", "feature:(other)"]
    names += [f"{kind}:{i:03d}{'x' * 125}" for kind in ("model", "feature") for i in range(100)]

    def worst(lengths: list[int], with_histograms: int) -> WindowAggregates:
        return WindowAggregates.of_scopes(
            NOW,
            lengths[-1],
            {name: full for name in names},
            cost_today_usd=123456.789,
            folded={k: FoldedInfo(10**9, 10**12, 100) for k in ("model", "feature")},
            windows={
                seconds: WindowSums.of_scopes(
                    seconds, {name: full if i < with_histograms else bare for name in names}
                )
                for i, seconds in enumerate(lengths[:-1])
            },
        )

    # The seed's windows, the latency rules on one of them: 914,977 bytes when written.
    assert size(worst([120, 300, 600], with_histograms=0)) < 0.5 * PAYLOAD_LIMIT
    # The most windows the rules file allows, p50 and p95 on windows of their own: 1,714,753.
    most = worst([60, 120, 300, 600, 900, 3600][: MAX_RULE_WINDOWS + 1], with_histograms=1)
    assert len(most.windows) == MAX_RULE_WINDOWS
    assert size(most) < 0.85 * PAYLOAD_LIMIT
    [payload] = pydantic_data_converter.payload_converter.to_payloads([most])
    [back] = pydantic_data_converter.payload_converter.from_payloads([payload], [WindowAggregates])
    assert back == most  # the windows' lengths come back as numbers


# --- the detector ---------------------------------------------------------------------------


def patches(history: WorkflowHistory) -> list[str]:
    """The patches a run took, in the order it took them."""
    found = []
    for event in history.events:
        details = event.marker_recorded_event_attributes.details
        if event.HasField("marker_recorded_event_attributes") and "patch-data" in details:
            found.append(json.loads(details["patch-data"].payloads[0].data)["id"])
    return found


def result(end: datetime, errors_recent: int) -> WindowAggregates:
    recent = Aggregate(calls=100, successes=100 - errors_recent, errors=errors_recent)
    older = Aggregate(calls=1000, successes=1000 - errors_recent, errors=errors_recent)
    return WindowAggregates.of_scopes(
        end,
        630,
        {"global": older},
        windows={
            120: WindowSums.of_scopes(150, {"global": recent}),
            300: WindowSums.of_scopes(330, {"global": older}),
        },
    )


class DetectorRun(NamedTuple):
    queries: list[WindowQuery]
    opened: list[OpenIncidentRequest]
    metadata: WorkflowMetadata
    status: Any
    history: WorkflowHistory


async def run_detector(
    env: WorkflowEnvironment,
    task_queue: str,
    answer: Callable[[WindowQuery], WindowAggregates],
) -> DetectorRun:
    """A detector run of a minute on the time-skipping server, its store answering `answer`."""
    queries: list[WindowQuery] = []
    opened: list[OpenIncidentRequest] = []

    @activity.defn(name="metrics.window_aggregates")
    async def window_aggregates(query: WindowQuery) -> WindowAggregates:
        queries.append(query)
        return answer(query)

    @activity.defn(name="incidents.open_or_update")
    async def open_or_update(requests: list[OpenIncidentRequest]) -> list[OpenIncidentResult]:
        opened.extend(requests)
        return [OpenIncidentResult(r.known_id or r.proposed_id, opened=True) for r in requests]

    @activity.defn(name="incidents.report_recovery")
    async def report_recovery(reports: list[RecoveryReport]) -> RecoveryResults:
        return RecoveryResults()

    client = env.client
    config = DetectorConfig(interval_seconds=30, window_seconds=300)
    activities: list[Callable[..., Any]] = [window_aggregates, open_or_update, report_recovery]
    async with Worker(
        client, task_queue=task_queue, workflows=[DetectorWorkflow], activities=activities
    ):
        handle = await client.start_workflow(
            DetectorWorkflow.run, DetectorInput(config), id=task_queue, task_queue=task_queue
        )
        try:
            await env.sleep(60)
            metadata = await handle.query(
                "__temporal_workflow_metadata", result_type=WorkflowMetadata
            )
            status = await handle.query(DetectorWorkflow.status)
        finally:
            await handle.terminate("test over")
        history = await handle.fetch_history()
    return DetectorRun(queries, opened, metadata, status, history)


async def replays(history: WorkflowHistory) -> bool:
    replayer = Replayer(workflows=[DetectorWorkflow], data_converter=pydantic_data_converter)
    replayed = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    return replayed.replay_failure is None


async def test_the_detector_reads_each_rules_window_behind_a_patch(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    queries, opened, metadata, status, history = await run_detector(
        time_skipping_env, task_queue, lambda query: result(query.end, errors_recent=7)
    )
    first = queries[0]
    assert (first.window_seconds, first.windows, first.latency_windows) == (600, [120, 300], [300])
    assert first.per_scope
    [request, *_] = opened
    assert request.breach.summary == "error rate 7.0% > 5.0% over 2 min (100 calls)"
    assert "over 2 min, 5 min, 10 min" in metadata.current_details
    assert status.windows == [120, 300, 600]
    assert patches(history)[:2] == [PER_SCOPE_PATCH, PER_RULE_WINDOWS_PATCH]
    # What it recorded replays on today's code.
    assert await replays(history)


def test_a_result_tells_which_asked_windows_it_lacks() -> None:
    end = datetime(2026, 11, 26, 12, 0, 30, tzinfo=UTC)
    assert result(end, errors_recent=7).lacks([120, 300]) == []
    assert result(end, errors_recent=7).lacks([60, 120]) == [60]
    alone = WindowAggregates.of_scopes(end, 630, {"global": Aggregate(calls=5)})
    assert alone.lacks([120, 300]) == [120, 300]
    assert alone.lacks([]) == []


async def test_an_old_workers_one_window_is_read_as_one_window(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    """A rolling deploy: a worker from before per-rule windows serves the activity, ignores
    the windows asked for and answers with the widest alone. Every rule reads that window, as
    a run begun before does: no finding says "over 2 min" of ten minutes' numbers."""

    def widest_alone(query: WindowQuery) -> WindowAggregates:
        failing = Aggregate(calls=1000, successes=930, errors=70)  # 7 % over ten minutes
        return WindowAggregates.of_scopes(query.end, 630, {"global": failing})

    queries, opened, metadata, status, history = await run_detector(
        time_skipping_env, task_queue, widest_alone
    )
    assert (queries[0].window_seconds, queries[0].windows) == (600, [120, 300])
    [request, *_] = opened
    assert request.breach.summary == "error rate 7.0% > 5.0% (1000 calls)"
    assert status.windows == [600]
    assert "over 10 min" in metadata.current_details
    assert (
        "every rule read over 10 min: the worker that read the signals predates per-rule "
        "windows" in metadata.current_details
    )
    assert patches(history)[:2] == [PER_SCOPE_PATCH, PER_RULE_WINDOWS_PATCH]
    assert await replays(history)


# --- the runbooks' re-read --------------------------------------------------------------------


def check(trigger: str, scope: str, aggregates: WindowAggregates, rules: DetectorRules) -> Any:
    return read_signal(SignalCheck(trigger, scope, aggregates.end, 180), aggregates, rules, 500)


def test_the_re_read_judges_the_quota_and_leaves_the_tokens_trend_out() -> None:
    """One window (the traffic since the mitigation): the quota's share decides; the runway, a
    trend of two windows, neither breaches nor holds the recovery back, whatever the calls."""
    rules = DetectorRules(tpm_quota={"gpt-4.1": 100_000})
    calm = Aggregate(calls=5, successes=5, input_tokens=3 * 50_000)  # 50k/min over 3 min
    seen = WindowAggregates.of_scopes(NOW, 180, {"global": calm, "model:gpt-4.1": calm})
    reading = check("token_quota", "model:gpt-4.1", seen, rules)
    assert (reading.breached, reading.recovered) == (False, True)
    assert reading.summary == (
        "tokens/min of quota 50.0% (clear line 64.0%); tokens/min reach the quota not measured "
        "(a trend, not one window), 5 calls in 3 min"
    )


def test_the_re_read_dates_the_budget_runway_from_its_end() -> None:
    rules = DetectorRules()
    burning = Aggregate(calls=30, successes=30, cost_usd=25.0)  # $500/h over 3 min
    seen = WindowAggregates.of_scopes(NOW, 180, {"global": burning}, cost_today_usd=100.0)
    reading = check("budget_exhaustion", "global", seen, rules)
    assert reading.breached
    assert reading.values["budget_runway_hours"] == pytest.approx(0.8)
    assert "daily budget runs out in 48 min (at 12:48 UTC) < 1.0 h" in reading.summary
