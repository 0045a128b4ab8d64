"""Cost spike (the seed: hourly cost > 1.5x budget/24): which feature spiked and how, then
reroute it to the cheapest viable model, cap its tokens and throttle it."""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.controls import ControlSpec
    from runbooks.base import Priority, RunbookInput, RunbookReport, RunbookSpec
    from runbooks.models import CHEAPEST, MINI, family
    from runbooks.steps import Steps

MAX_TOKENS_CAP = 512


@workflow.defn
class CostSpikeRunbook:
    @workflow.run
    async def run(self, input: RunbookInput) -> RunbookReport:
        steps = Steps(SPEC, input)
        # The incident's own scope: a feature's spike is that feature's, whatever else spends.
        features = await steps.top_features(input.scope)
        for f in features[:3]:
            per_call = f.tokens / f.calls if f.calls else 0
            steps.found(
                f"{f.feature or '(no feature)'}: ${f.cost_usd:.2f} "
                f"({f.share_of_cost:.0%} of cost), {f.calls} calls, "
                f"{per_call:,.0f} tokens per call, models {', '.join(f.models)}"
            )
        await steps.tell_diagnosis()
        if not steps.may_mitigate:
            return steps.report

        offender = next((f for f in features if f.feature), None)
        if offender is None:
            return steps.report  # no feature to act on: people decide
        critical = steps.priority(offender.feature) == Priority.CRITICAL
        for model in offender.models:
            # A critical feature keeps a capable model: mini, not nano.
            cheaper = (MINI if critical else CHEAPEST).get(family(model))
            if cheaper is not None and cheaper != model:
                await steps.apply(
                    ControlSpec("reroute", feature=offender.feature, model=model, value=cheaper)
                )
        await steps.apply(
            ControlSpec("max_tokens", feature=offender.feature, value=str(MAX_TOKENS_CAP))
        )
        limit = max(1, int(offender.concurrency / 2))
        await steps.apply(ControlSpec("concurrency", feature=offender.feature, value=str(limit)))
        return await steps.verify()


SPEC = RunbookSpec(
    name="cost_spike",
    workflow=CostSpikeRunbook,
    triggers=("cost_spike", "budget_exhaustion"),
    verify_on=(("budget_exhaustion", "cost_spike"),),
    mitigate_before_ack=True,
    expected_resolution_minutes=10,
    escalation_path=(
        "On-call engineer: immediate cost reduction",
        "Finance and engineering: assess the damage, set a hard cap",
        "Leadership: approve emergency spending or shut down",
    ),
)
