"""A runbook that only canaries: it reroutes gpt-4.1 to its fallback target on a third of the
traffic and lets the comparison decide (for tests/test_canary_llmock.py)."""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.controls import ControlSpec
    from runbooks.base import RunbookInput, RunbookReport, RunbookSpec
    from runbooks.steps import Steps

FRACTION = 0.3  # a third: enough canary calls within seconds


@workflow.defn
class CanaryTrialRunbook:
    @workflow.run
    async def run(self, input: RunbookInput) -> RunbookReport:
        steps = Steps(SPEC, input)
        target = input.fallbacks["gpt-4.1"]
        await steps.canary(ControlSpec("reroute", model="gpt-4.1", value=target), fraction=FRACTION)
        return steps.report


SPEC = RunbookSpec(
    name="canary_trial",
    workflow=CanaryTrialRunbook,
    triggers=("error_rate",),
    mitigate_before_ack=True,
    expected_resolution_minutes=10,
)
