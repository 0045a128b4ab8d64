"""Cost spike (the seed: hourly cost > 1.5x budget/24): which feature spiked and how, then the
seed's four steps: route all the scope's traffic to the cheapest viable model (on a canary
slice first, all traffic once it proves cheaper and no worse, with a person's approval), serve
repeated requests from cache, shed the features marked low priority (approved too), and cap the
offender's tokens and pace. Retry amplification is looked for in the diagnosis.

Critical features keep a capable model: their own reroute to the mini sibling is more specific
than the scope's, so it wins for them (on the same canary slice: one incident's slices pick the
same sessions). Runs begun before the canary took the old path: the offender's models rerouted
at once (patch SEED_STEPS).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.controls import ControlSpec
    from activities.diagnosis import FeatureUsage
    from runbooks.base import Priority, RunbookInput, RunbookReport, RunbookSpec
    from runbooks.models import CHEAPEST, MINI, family
    from runbooks.retries import retry_amplification
    from runbooks.steps import Steps

MAX_TOKENS_CAP = 512
SEED_STEPS = "cost-canary-cache-shed"
EVERY_SEVERITY = ("SEV1", "SEV2", "SEV3", "SEV4")


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
        seed_steps = workflow.patched(SEED_STEPS)
        if seed_steps:
            for line in retry_amplification(features):
                steps.found(line)
        await steps.tell_diagnosis()
        if not steps.may_mitigate:
            return steps.report

        offender = next((f for f in features if f.feature), None)
        if not seed_steps:
            return await _reroute_offender(steps, offender)
        # SEV1 is a budget about to run out: no answer means go ahead.
        on_timeout: Literal["deny", "proceed"] = "proceed" if input.severity == "SEV1" else "deny"
        routes = cheapest_routes(input.scope, features, input.feature_priorities)
        if routes:
            await steps.canary(
                routes,
                approval="reroute_all",
                on_approval_timeout=on_timeout,
                if_too_little_traffic="promote",
            )
        # After the canary: answers from the cache never reach OpenAI and are left out of the
        # comparison, so a cache first could leave the canary nothing to compare.
        if offender is not None:
            await steps.apply(ControlSpec("cache", feature=offender.feature))
        low = [
            f.feature for f in features if f.feature and steps.priority(f.feature) == Priority.LOW
        ]
        if low and await steps.approve(
            f"Disable the low-priority features {', '.join(low)}",
            step="disable_features",
            on_timeout=on_timeout,
        ):
            for feature in low:
                await steps.apply(ControlSpec("disable", feature=feature))
        if offender is not None:
            await _cap_offender(steps, offender)
        return await steps.verify()


def cheapest_routes(
    scope: str, features: list[FeatureUsage], priorities: Mapping[str, str]
) -> list[ControlSpec]:
    """The scope's models rerouted to their cheapest viable sibling, then, for every feature
    declared critical (whether or not it is among the top spenders), the same models to their
    mini sibling: more specific, so it wins for that feature. The first route carries the
    scope's target, which the canary compares on."""
    kind, _, name = scope.partition(":")
    on_feature = name if kind == "feature" else None
    models = [name] if kind == "model" else []
    for f in features:
        models += [m for m in f.models if m not in models]
    critical = sorted(f for f, level in priorities.items() if level == Priority.CRITICAL)
    # A critical feature's own incident reroutes it to mini, not nano.
    table = MINI if on_feature in critical else CHEAPEST
    routes = []
    for model in models:
        cheaper = table.get(family(model))
        if cheaper is not None and cheaper != model:
            routes.append(ControlSpec("reroute", feature=on_feature, model=model, value=cheaper))
    if on_feature is not None:
        return routes  # one feature's scope: no other feature is touched
    scope_wide = list(routes)
    for feature in critical:
        for route in scope_wide:
            capable = MINI.get(family(route.model or ""))
            if capable is not None and capable != route.model:
                routes.append(
                    ControlSpec("reroute", feature=feature, model=route.model, value=capable)
                )
    return routes


async def _cap_offender(steps: Steps, offender: FeatureUsage) -> None:
    await steps.apply(
        ControlSpec("max_tokens", feature=offender.feature, value=str(MAX_TOKENS_CAP))
    )
    limit = max(1, int(offender.concurrency / 2))
    await steps.apply(ControlSpec("concurrency", feature=offender.feature, value=str(limit)))


async def _reroute_offender(steps: Steps, offender: FeatureUsage | None) -> RunbookReport:
    """The path of runs begun before SEED_STEPS: the offender's models rerouted at once."""
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
    await _cap_offender(steps, offender)
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
    # Every user of the scope gets a cheaper model, or loses a feature: a person says yes.
    approvals=(("reroute_all", EVERY_SEVERITY), ("disable_features", EVERY_SEVERITY)),
)
