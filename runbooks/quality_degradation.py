"""Quality degradation (the seed: composite score < 0.5): compare the snapshots that answered,
pin the last known-good one, and reroute critical features to a model that still scores well.
It waits for an acknowledgement before changing models: quality calls need a person's eye."""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.controls import ControlSpec
    from activities.diagnosis import ModelQuality
    from runbooks.base import Priority, RunbookInput, RunbookReport, RunbookSpec
    from runbooks.steps import Steps

GOOD_SCORE = 0.7  # the detector's quality warning line


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
        return await steps.verify()


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
