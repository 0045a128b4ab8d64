"""API outage (the seed: 5xx rate > 50%): confirm it is the provider, serve cached responses
where the app enabled them, and turn off non-critical features. The cause is OpenAI's: the
controls stay while the outage lasts, and a lasting outage still escalates."""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.controls import ControlSpec
    from runbooks.base import Priority, RunbookInput, RunbookReport, RunbookSpec
    from runbooks.steps import Steps


@workflow.defn
class ApiOutageRunbook:
    @workflow.run
    async def run(self, input: RunbookInput) -> RunbookReport:
        steps = Steps(SPEC, input)
        errors = await steps.recent_errors()
        features = await steps.top_features()
        server_errors = [e for e in errors if e.status in ("server_error", "timeout")]
        for e in server_errors[:4]:
            steps.found(
                f"{e.model} / {e.feature or '(no feature)'}: {e.count} x {e.error_type} "
                f"({e.status}), last {e.last_seen:%H:%M:%S} UTC: {e.sample_message[:120]}"
            )
        models = {e.model for e in server_errors}
        if len(models) > 1:
            steps.found(f"{len(models)} models failing at once: a provider outage, not a model")
        steps.found("check https://status.openai.com")
        await steps.tell_diagnosis()
        if not steps.may_mitigate:
            return steps.report

        await steps.apply(ControlSpec("cache", reason="serve cached answers during the outage"))
        for f in features:
            if f.feature and steps.priority(f.feature) == Priority.LOW:
                await steps.apply(ControlSpec("disable", feature=f.feature))
        return await steps.verify()


SPEC = RunbookSpec(
    name="api_outage",
    workflow=ApiOutageRunbook,
    triggers=("api_outage",),
    mitigate_before_ack=True,
    expected_resolution_minutes=60,
    escalation_path=(
        "On-call engineer: serve cached responses, queue requests",
        "Platform team: activate the DR plan",
        "Leadership: notify users",
    ),
    roll_back_on_failure=False,
)
