"""Every recorded history replays on today's workflow code: an incident open during a deploy
carries on where it was. The histories come from real runs (`tests/histories/record.py`) and
are kept for every later change; the last tests show that a change to the command sequence
without `workflow.patched` is caught, and the same change behind a patch is not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.worker import Replayer, WorkflowReplayResult

import worker
from tests.histories.record import ON_DEV_SERVER, ON_TIME_SKIPPING
from tests.replay_variants import KeepaliveBehindAPatch, ThanksPatched, ThanksUnpatched

HISTORIES = Path(__file__).parent / "histories"
RECORDED = sorted(HISTORIES.glob("*.json"))
# Recorded on the code before this project patched the keep-alive (see the tests below).
KEPT_ALIVE = HISTORIES / "runbook_controls_kept_alive@774e461.json"


def history(path: Path) -> WorkflowHistory:
    return WorkflowHistory.from_json(workflow_id(path), path.read_text())


def workflow_id(path: Path) -> str:
    """The id the workflow ran under, where its code reads it: a runbook's is its incident's
    id and `-runbook-<n>` (its approvals are named after it); others replay under the file's
    name."""
    text = path.read_text()
    name = path.stem.split("@")[0]
    runbook = name.rpartition(".")[2]
    if not runbook.startswith("runbook-"):
        return path.stem
    start = json.loads(text)["events"][0]["workflowExecutionStartedEventAttributes"]
    return f"{start['parentWorkflowExecution']['workflowId']}-{runbook}"


async def replay(path: Path, workflows: list[type] | None = None) -> WorkflowReplayResult:
    replayer = Replayer(
        workflows=workflows or worker.WORKFLOWS, data_converter=pydantic_data_converter
    )
    return await replayer.replay_workflow(history(path), raise_on_replay_failure=False)


@pytest.mark.parametrize("path", RECORDED, ids=[path.stem for path in RECORDED])
async def test_a_recorded_history_replays_on_todays_code(path: Path) -> None:
    result = await replay(path)
    assert result.replay_failure is None, f"{path.name}: {result.replay_failure}"


def test_every_path_has_a_recorded_history() -> None:
    recorded = {path.name.split("@")[0].split(".")[0] for path in RECORDED}
    assert set(ON_TIME_SKIPPING) | set(ON_DEV_SERVER) <= recorded


def test_the_histories_hold_what_they_are_named_for() -> None:
    kept_alive = KEPT_ALIVE.read_text()
    assert '"controls.extend"' in kept_alive  # the keep-alive hour passed with controls in force
    continued = next(HISTORIES.glob("continued_as_new.run1@*.json")).read_text()
    assert "EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW" in continued
    merged = next(HISTORIES.glob("correlated.error_rate@*.json")).read_text()
    assert '"merge_into"' in merged  # taken in by the api_outage incident
    approved = next(HISTORIES.glob("cost_canary_approved@*.json")).read_text()
    assert '"decide_approval"' in approved  # the promotion approved from Slack
    assert '"reports.build"' in approved  # resolved, then reported
    canary = next(HISTORIES.glob("cost_canary_approved.runbook-1@*.json")).read_text()
    assert canary.count('"canary.compare"') == 2  # the look halfway, then the window's end
    reverted = next(HISTORIES.glob("latency_canary_reverted.runbook-1@*.json")).read_text()
    assert '"controls.revert"' in reverted
    reopened = next(HISTORIES.glob("reopened.error_rate.run2@*.json")).read_text()
    assert '"reopen"' in reopened  # the resolved incident's new run, back within the cooldown
    assert '"pagerduty.trigger"' in reopened  # paged again


# --- what the replay catches ----------------------------------------------------------------


async def test_an_unpatched_change_to_the_command_sequence_fails_replay() -> None:
    result = await replay(KEPT_ALIVE, [ThanksUnpatched, *worker.WORKFLOWS[1:]])
    assert result.replay_failure is not None
    assert "nondeterminism" in str(result.replay_failure).lower()


async def test_the_same_change_behind_a_patch_replays() -> None:
    result = await replay(KEPT_ALIVE, [ThanksPatched, *worker.WORKFLOWS[1:]])
    assert result.replay_failure is None


async def test_putting_the_shipped_keepalive_behind_a_patch_would_freeze_open_incidents() -> None:
    result = await replay(KEPT_ALIVE, [KeepaliveBehindAPatch, *worker.WORKFLOWS[1:]])
    assert result.replay_failure is not None
