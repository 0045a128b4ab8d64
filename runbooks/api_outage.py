"""API outage (the seed: 5xx rate > 50%): confirm it is the provider, serve cached responses
where the app enabled them, turn off low-priority features, queue the other non-critical ones at
the pace the provider still answers them, and tell the app's users (PAGERLOOP_NOTIFY_USERS_URL).
The cause is OpenAI's: the controls stay while the outage lasts, and a lasting outage still
escalates.

Runs begun before the queue and the users' notice replay without them (patch QUEUE_AND_NOTIFY).
"""

from __future__ import annotations

import math

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.controls import ControlSpec
    from activities.diagnosis import FeatureUsage
    from activities.hooks import NotifyUsers, NotifyUsersResult
    from activities.policies import USER_NOTICE
    from runbooks.base import Priority, RunbookInput, RunbookReport, RunbookSpec
    from runbooks.steps import Steps

QUEUE_AND_NOTIFY = "api-outage-queue-and-notify-users"
# Held back by a queue rather than failed: calls that can wait while the provider recovers.
QUEUED = (Priority.NORMAL, Priority.LOW)
NOTIFIED = "users_notified"  # the timeline entry of the users' notice


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
        disabled = []
        for f in features:
            if f.feature and steps.priority(f.feature) == Priority.LOW:
                await steps.apply(ControlSpec("disable", feature=f.feature))
                disabled.append(f.feature)
        if workflow.patched(QUEUE_AND_NOTIFY):
            queued = []
            for f in features:
                # Nothing of it succeeding: a queue would only hold its calls until they time
                # out (tying up the app's threads meanwhile), so it is left to fail fast.
                if f.feature and steps.priority(f.feature) in QUEUED and f.successes > 0:
                    # A low-priority feature is disabled too; its queue holds it back still
                    # if a person turns it on again before the outage is over.
                    rate = queue_rate(f)
                    await steps.apply(
                        ControlSpec(
                            "queue",
                            feature=f.feature,
                            value=str(rate),
                            reason=f"queue during the outage, {rate}/min (what still succeeds)",
                        )
                    )
                    queued.append(f.feature)
            await notify_users(steps, input, user_message(queued, disabled))
        return await steps.verify()


def queue_rate(feature: FeatureUsage) -> int:
    """Calls per minute a queued feature is released at: the pace its calls still succeeded
    at during the outage, at least one."""
    if feature.calls <= 0:
        return 1
    return max(1, math.floor(feature.calls_per_minute * feature.successes / feature.calls))


def user_message(queued: list[str], disabled: list[str]) -> str:
    """What the app's users are told, in their words: no controls, no model names."""
    effects = ["some answers may come from recent results"]
    waiting = [name for name in queued if name not in disabled]
    if waiting:
        effects.append(f"{_names(waiting)} may take longer to answer")
    if disabled:
        effects.append(f"{_names(disabled)} {'is' if len(disabled) == 1 else 'are'} paused")
    return (
        "Our AI provider is having an outage, so some features are degraded: "
        + "; ".join(effects)
        + ". We will let you know when everything is back to normal."
    )


def _names(features: list[str]) -> str:
    return features[0] if len(features) == 1 else ", ".join(features[:-1]) + f" and {features[-1]}"


async def notify_users(steps: Steps, input: RunbookInput, message: str) -> None:
    """Tell the app's users through its hook (once per incident: the receiver sees one
    idempotency key however often this runs); a hook that fails is reported, never fatal."""
    request = NotifyUsers(
        incident_id=input.incident_id,
        trigger=input.trigger,
        scope=input.scope,
        severity=input.severity,
        summary=input.summary,
        message=message,
    )
    try:
        result: NotifyUsersResult = await workflow.execute_activity(
            "hooks.notify_users",
            request,
            result_type=NotifyUsersResult,
            **USER_NOTICE.options(),
            summary="notify the app's users",
        )
    except ActivityError as err:
        text = f"users could not be notified: {err.cause or err}"
        steps.found(text)
        await steps.tell(NOTIFIED, text)
        return
    if not result.sent:
        steps.found(f"users not notified: {result.detail}")
        return
    text = f"users notified ({result.detail}): {message}"
    steps.found(text)
    await steps.tell(NOTIFIED, text)


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
