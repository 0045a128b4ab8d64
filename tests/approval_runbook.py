"""A runbook that asks a person before its one risky step, for tests/test_approvals.py: a
test registers it for the error_rate trigger (no shipped runbook has that trigger).

It caps tokens unasked, then asks before rerouting all of gpt-4.1 to gpt-4.1-mini: at SEV1 and
SEV2 (SEV1 goes ahead when nobody answers in time, SEV2 does not); SEV3 and SEV4 never ask."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.controls import ControlSpec
    from runbooks.base import RunbookInput, RunbookReport, RunbookSpec
    from runbooks.steps import Steps

REROUTE_ALL = "Reroute all traffic to gpt-4.1-mini"
APPROVAL_TIMEOUT = timedelta(minutes=15)


@workflow.defn
class AskingRunbook:
    @workflow.run
    async def run(self, input: RunbookInput) -> RunbookReport:
        steps = Steps(SPEC, input)
        steps.found("gpt-4.1 spends most of the budget")
        await steps.tell_diagnosis()
        if not steps.may_mitigate:
            return steps.report
        await steps.apply(ControlSpec("max_tokens", feature="chat", value="512"))
        on_timeout = "proceed" if input.severity == "SEV1" else "deny"
        if await steps.approve(
            REROUTE_ALL, step="reroute_all", timeout=APPROVAL_TIMEOUT, on_timeout=on_timeout
        ):
            await steps.apply(ControlSpec("reroute", model="gpt-4.1", value="gpt-4.1-mini"))
        return await steps.verify()


SPEC = RunbookSpec(
    name="asking",
    workflow=AskingRunbook,
    triggers=("error_rate",),
    mitigate_before_ack=True,
    expected_resolution_minutes=10,
    approvals=(("reroute_all", ("SEV1", "SEV2")),),
)
