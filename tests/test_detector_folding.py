"""The detector with folded scopes: what was folded shows in its details, its status query and
`pagerloop detector status`; a firing scope is kept out of the fold; and results recorded
before the folding (per (model, feature) cell) still evaluate, and replay, as they did."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from temporalio import activity
from temporalio.api.common.v1 import Payload
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer, Worker
from typer.testing import CliRunner

import cli.detector
from activities.incidents import (
    OpenIncidentRequest,
    OpenIncidentResult,
    RecoveryReport,
    RecoveryResults,
)
from activities.metrics import WindowQuery
from cli.main import app
from detectors.config import DetectorRules
from detectors.detector import DetectorConfig, DetectorInput, DetectorStatus, DetectorWorkflow
from detectors.evaluation import Evaluation, evaluate
from detectors.rules import RuleState
from domain.aggregates import Aggregate, FoldedInfo, WindowAggregates
from stores.aggregates import window_aggregates
from stores.llm_calls import CallRecord
from stores.writer import write_calls

END = datetime(2026, 11, 26, 12, tzinfo=UTC)
HISTORY = Path(__file__).parent / "histories" / "detector_per_cell_result.json"


def recorded_results() -> Iterator[WindowAggregates]:
    """The metrics activity's results in a history recorded before the folding."""
    for event in json.loads(HISTORY.read_text())["events"]:
        completed = event.get("activityTaskCompletedEventAttributes")
        if completed is None or "cells" not in (raw := _data(completed)):
            continue
        payload = Payload(metadata={"encoding": b"json/plain"}, data=raw.encode())
        [found] = pydantic_data_converter.payload_converter.from_payloads(
            [payload], [WindowAggregates]
        )
        yield found


def _data(completed: dict[str, Any]) -> str:
    return base64.b64decode(completed["result"]["payloads"][0]["data"]).decode()


def run(aggregates: list[WindowAggregates]) -> list[Evaluation]:
    states: dict[str, RuleState] = {}
    found = []
    for window in aggregates:
        evaluation = evaluate(DetectorRules(), window, states, daily_budget_usd=500)
        states = evaluation.rule_states
        found.append(evaluation)
    return found


def test_an_old_per_cell_result_still_evaluates_as_it_did() -> None:
    first = next(recorded_results())
    assert set(first.cells) == {"gpt-4.1", "o3"}
    assert first.by_scope == {}
    assert first.folded == {}
    evaluation = run([first, first])[-1]
    # What the detector decided on these results before the folding (recorded in the history).
    assert sorted(f"{f.trigger}|{f.scope}" for f in evaluation.firing) == [
        "elevated_latency|model:o3",
        "error_rate|feature:a_b",
        "error_rate|feature:checkout",
        "error_rate|model:gpt-4.1",
    ]
    assert evaluation.inhibited == ["error_rate|global"]


def test_per_scope_sums_evaluate_like_the_cells_they_add_up_to() -> None:
    old = list(recorded_results())
    new = [
        WindowAggregates.of_scopes(w.end, w.window_seconds, w.scopes(), w.cost_today_usd)
        for w in old
    ]
    assert len(old) > 5
    for before, after in zip(run(old), run(new), strict=True):
        assert after == before


async def test_a_history_recorded_with_per_cell_results_replays() -> None:
    history = WorkflowHistory.from_json("detector-per-cell", HISTORY.read_text())
    replayer = Replayer(workflows=[DetectorWorkflow], data_converter=pydantic_data_converter)
    result = await replayer.replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is None


def busy_and_folded(errors: int) -> WindowAggregates:
    checkout = Aggregate(
        calls=400, successes=400 - errors, errors=errors, latency_histogram={120: 400}
    )
    other = Aggregate(calls=98_000, successes=98_000, latency_histogram={110: 98_000})
    everything = Aggregate()
    everything.add(checkout)
    everything.add(other)
    return WindowAggregates.of_scopes(
        end=END,
        window_seconds=330,
        scopes={
            "global": everything,
            "model:gpt-4.1": everything,
            "feature:checkout": checkout,
            "feature:(other)": other,
        },
        folded={"feature": FoldedInfo(values=12_345, calls=98_000, top=50)},
    )


async def test_the_detector_shows_the_fold_and_keeps_a_firing_scope_out_of_it(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    queries: list[WindowQuery] = []

    @activity.defn(name="metrics.window_aggregates")
    async def window_aggregates(query: WindowQuery) -> WindowAggregates:
        queries.append(query)
        return busy_and_folded(errors=200)

    @activity.defn(name="incidents.open_or_update")
    async def open_or_update(requests: list[OpenIncidentRequest]) -> list[OpenIncidentResult]:
        return [OpenIncidentResult(r.known_id or r.proposed_id, opened=True) for r in requests]

    @activity.defn(name="incidents.report_recovery")
    async def report_recovery(reports: list[RecoveryReport]) -> RecoveryResults:
        return RecoveryResults()

    client = time_skipping_env.client
    config = DetectorConfig(interval_seconds=30, window_seconds=300)
    activities: list[Callable[..., Any]] = [window_aggregates, open_or_update, report_recovery]
    async with Worker(
        client, task_queue=task_queue, workflows=[DetectorWorkflow], activities=activities
    ):
        handle = await client.start_workflow(
            DetectorWorkflow.run, DetectorInput(config), id=task_queue, task_queue=task_queue
        )
        try:
            await time_skipping_env.sleep(100)
            status: DetectorStatus = await handle.query(DetectorWorkflow.status)
            metadata = await handle.query(
                "__temporal_workflow_metadata", result_type=WorkflowMetadata
            )
        finally:
            await handle.terminate("test over")
    line = "feature: 12,345 values beyond the top 50 folded into feature:(other) (98,000 calls)"
    assert status.folded == {"feature": FoldedInfo(values=12_345, calls=98_000, top=50)}
    assert "error_rate|feature:checkout" in status.firing
    assert line in metadata.current_details
    assert queries[0].keep == []
    assert queries[-1].keep == ["feature:checkout"]
    assert all(query.per_scope for query in queries)  # a new run asks for the small shape


def test_the_per_cell_shape_for_runs_begun_before_evaluates_the_same(store: Engine) -> None:
    """While workers of both versions run, a detector run begun on the old code asks for (and
    evaluates) per-cell results: the same decisions as the per-scope ones."""
    now = datetime.now(UTC)
    records = [
        CallRecord(ts=now, model=model, feature=feature, status=status, latency_ms=900.0)
        for model in ("gpt-4.1", "o3")
        for feature, status in (("chat", "error"), ("search", "success"), (None, "success"))
        for _ in range(30)
    ]
    write_calls(store, records)
    cells = window_aggregates(store, now, 300, per_scope=False)
    scoped = window_aggregates(store, now, 300)
    assert cells.cells
    assert not cells.by_scope

    [old], [new] = run([cells]), run([scoped])
    assert old.verdicts == new.verdicts
    assert [(f.trigger, f.scope) for f in old.firing] == [(f.trigger, f.scope) for f in new.firing]


def test_detector_status_prints_what_was_folded(monkeypatch: pytest.MonkeyPatch) -> None:
    found = DetectorStatus(
        config=DetectorConfig(interval_seconds=30, window_seconds=300),
        paused=False,
        evaluations=3,
        last_evaluated_at=None,
        rule_states={},
        trigger_states={},
        last_verdicts={},
        firing=[],
        inhibited=[],
        folded={
            "feature": FoldedInfo(values=12_345, calls=98_000, top=50),
            "model": FoldedInfo(values=3, calls=7, top=50),
        },
    )

    class Handle:
        async def query(self, _query: object) -> DetectorStatus:
            return found

    async def handle() -> Handle:
        return Handle()

    monkeypatch.setattr(cli.detector, "_handle", handle)
    result = CliRunner().invoke(app, ["detector", "status"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert (
        "feature: 12,345 values beyond the top 50 folded into feature:(other) (98,000 calls)"
        in result.output
    )
    assert "model: 3 values beyond the top 50 folded into model:(other) (7 calls)" in result.output
