"""Quality degradation (the seed: composite score < 0.5): compare the snapshots that answered,
pin the last known-good one, and reroute critical features to a model that still scores well.
It waits for an acknowledgement before changing models: quality calls need a person's eye.

With a golden set configured (PAGERLOOP_GOLDEN_SET_URL, activities.golden_set), every snapshot
the runbook would pin to is first evaluated there; its score goes into the diagnosis, and one
that fails is not pinned (a critical feature may then be rerouted instead). An eval that cannot
be reached is said in the diagnosis and does not stop the pin: the person who acknowledges
decides with that in view. Then, for the critical features of the scope that the app declared a
check for (PAGERLOOP_OUTPUT_CHECKS, `feature=check`), a `validate` control checks each answer
and retries it once when it fails. Runs begun before these steps replay without them (patch
GOLDEN_SET_AND_CHECKS).
"""

from __future__ import annotations

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.controls import ControlSpec
    from activities.diagnosis import ModelQuality
    from activities.golden_set import GoldenSetRequest, GoldenSetVerdict
    from activities.policies import GOLDEN_SET_EVAL
    from runbooks.base import Priority, RunbookInput, RunbookReport, RunbookSpec
    from runbooks.steps import Steps

GOOD_SCORE = 0.7  # the detector's quality warning line
GOLDEN_SET_AND_CHECKS = "quality-golden-set-and-output-checks"


@workflow.defn
class QualityDegradationRunbook:
    @workflow.run
    async def run(self, input: RunbookInput) -> RunbookReport:
        steps = Steps(SPEC, input)
        rows = await steps.quality()
        features = await steps.top_features(input.scope)
        by_model: dict[str, list[ModelQuality]] = {}
        for row in rows:
            by_model.setdefault(row.model, []).append(row)
        pins: dict[str, str] = {}
        degraded: set[str] = set()
        for model, snapshots in by_model.items():
            snapshots.sort(key=lambda s: s.last_seen)
            current = snapshots[-1]
            steps.found(
                f"{model} answered by {current.response_model}: quality {current.mean:.2f} "
                f"over {current.scores} scores"
            )
            if current.mean >= GOOD_SCORE:
                continue
            degraded.add(model)
            # A score without its call names no snapshot: nothing to pin to.
            good = [s for s in snapshots[:-1] if s.mean >= GOOD_SCORE and s.response_model]
            if good:
                last_good = good[-1]
                steps.found(
                    f"{model}: {last_good.response_model} scored {last_good.mean:.2f} until "
                    f"{last_good.last_seen:%H:%M} UTC: a model update is the likely cause"
                )
                pins[model] = last_good.response_model
            else:
                steps.found(f"{model}: no snapshot change: check recent prompt template changes")
        if pins and input.golden_set and workflow.patched(GOLDEN_SET_AND_CHECKS):
            for model, snapshot in list(pins.items()):
                if not await golden_set_passes(steps, model, snapshot, by_model[model]):
                    del pins[model]
        await steps.tell_diagnosis()
        if not steps.may_mitigate:
            return steps.report

        # A. Pin the last known-good snapshot.
        for model, snapshot in pins.items():
            await steps.apply(ControlSpec("pin", model=model, value=snapshot))
        # D. Route critical paths to a known-good model when no pin could help them.
        healthy = sorted(
            (
                r
                for r in rows
                if r.mean >= GOOD_SCORE and r.model not in degraded and r.response_model
            ),
            key=lambda r: -r.mean,
        )
        for f in features:
            if not f.feature or steps.priority(f.feature) != Priority.CRITICAL:
                continue
            for model in f.models:
                if model not in degraded or model in pins or not healthy:
                    continue
                spec = ControlSpec("reroute", feature=f.feature, model=model)
                spec.value = healthy[0].response_model
                await steps.apply(spec)
        # E. Check the answers of critical features the app declared a check for.
        if input.output_checks and workflow.patched(GOLDEN_SET_AND_CHECKS):
            for f in features:
                check = input.output_checks.get(f.feature or "")
                if f.feature and check and steps.priority(f.feature) == Priority.CRITICAL:
                    await steps.apply(ControlSpec("validate", feature=f.feature, value=check))
        return await steps.verify()


async def golden_set_passes(
    steps: Steps, model: str, candidate: str, snapshots: list[ModelQuality]
) -> bool:
    """Ask the golden set about pinning `model` to `candidate` (findings say what it answered);
    False only when it answered that the candidate fails."""
    request = GoldenSetRequest(
        incident_id=steps.input.incident_id,
        scope=steps.input.scope,
        model=model,
        candidate=candidate,
        current=snapshots[-1].response_model,
        snapshots=[s.response_model for s in snapshots if s.response_model],
    )
    try:
        verdict: GoldenSetVerdict = await workflow.execute_activity(
            "golden_set.evaluate",
            request,
            result_type=GoldenSetVerdict,
            **GOLDEN_SET_EVAL.options(),
            summary=f"golden set: {model} as {candidate}",
        )
    except ActivityError as err:
        cause = getattr(err.cause, "message", None) or str(err.cause or err)
        steps.found(f"golden set: could not evaluate {candidate} ({cause}); pinned unevaluated")
        return True
    if not verdict.evaluated:
        steps.found(f"golden set: {candidate} not evaluated ({verdict.details})")
        return True
    said = f": {verdict.details}" if verdict.details else ""
    score = f"{verdict.score:.2f}" if verdict.score is not None else "?"
    if verdict.passed:
        steps.found(f"golden set: {candidate} passes for {model}, score {score}{said}")
        return True
    steps.found(f"golden set: {candidate} fails for {model}, score {score}{said}: not pinned")
    return False


SPEC = RunbookSpec(
    name="quality_degradation",
    workflow=QualityDegradationRunbook,
    triggers=("quality_degradation",),
    mitigate_before_ack=False,
    expected_resolution_minutes=30,
    escalation_path=(
        "ML engineer: diagnose the prompt or model issue",
        "Product team: assess user impact, communicate",
        "Leadership: decide on a feature flag rollback",
    ),
)
