"""Rate limit exhaustion (the seed: 429 rate > 5%): find who spends the quota, halve their
pace, back off on 429s, hold back the lowest-priority features.

OpenAI counts its limits per minute, so the pace halved is per minute: requests per minute
(`rpm`), and tokens per minute (`tpm`) when the token quota is what ran out. Both are limits of
the whole application, shared out among its replicas. Runs started before this were halving
calls in flight (`concurrency`) and keep doing so (patch PER_MINUTE_LIMITS).

Low-priority features are queued rather than disabled (patch QUEUE_LOW_PRIORITY; runs begun
before keep disabling them): a `queue` control at half the pace the feature got answered at
leaves the other half of its share of the quota to the features that matter, and its calls
wait their turn instead of failing (low-priority work is usually background work that can
wait: summaries, batch enrichment). A call that cannot get a turn within its own timeout (or
a full waiting room) fails at once as the OpenAI SDK's own timeout, which the app already
handles. A feature with nothing answered in the window keeps the disable: there is no pace to
halve, and a queue at none would hold every call until it timed out, a slow way of refusing it.
Whether the queue helped is judged like every other control: the 429 rate is re-read, and a
mitigation that did not help is rolled back as a whole.
"""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.controls import ControlSpec
    from activities.diagnosis import FeatureUsage, ModelRateLimits
    from runbooks.base import Priority, RunbookInput, RunbookReport, RunbookSpec
    from runbooks.steps import Steps

BACKOFF_ATTEMPTS = 5
PER_MINUTE_LIMITS = "rate-limits-per-minute"
QUEUE_LOW_PRIORITY = "rate-limits-queue-low-priority"
# A quota incident the request quota fired paces requests, not tokens (runs begun before the
# request quota existed were all the tokens').
REQUEST_QUOTA = "quota-incident-paces-what-ran-out"
GOT_THROUGH_SHARE = 0.9
# A token limit below this starves a feature of a single large call.
MIN_TPM = 1_000


@workflow.defn
class RateLimitExhaustionRunbook:
    @workflow.run
    async def run(self, input: RunbookInput) -> RunbookReport:
        steps = Steps(SPEC, input)
        limits = [m for m in await steps.rate_limits() if m.rate_limited]
        features = await steps.top_features(limit=20)
        for m in limits[:3]:
            steps.found(
                f"{m.model}: {m.share:.1%} of {m.calls} calls rate-limited, {m.retries} retries"
            )
            if m.calls and m.retries > m.calls:
                steps.found(f"{m.model}: more retries than calls: a retry storm amplifies it")
        for f in features[:3]:
            steps.found(
                f"{f.feature or '(no feature)'}: {f.tokens:,} tokens, ${f.cost_usd:.2f}, "
                f"{f.rate_limited} 429s of {f.calls} calls, ~{f.calls_per_minute:.0f} a minute, "
                f"~{f.concurrency:.1f} in flight"
            )
        await steps.tell_diagnosis()
        if not steps.may_mitigate:
            return steps.report

        shed = [f for f in features if f.feature and steps.priority(f.feature) == Priority.LOW]
        # A. Halve the concurrency of those hitting the limit (and not about to be shed).
        hitting = sorted(
            (f for f in features if f.rate_limited and f.feature and f not in shed),
            key=lambda f: -f.rate_limited,
        )
        # Critical features keep their pace while others can give.
        spared = [f for f in hitting if steps.priority(f.feature) != Priority.CRITICAL]
        hitting = spared or hitting
        if workflow.patched(PER_MINUTE_LIMITS):
            trigger = input.trigger
            if requests_ran_out(input.metrics) and workflow.patched(REQUEST_QUOTA):
                trigger = "rate_limit_exhaustion"  # the requests per minute are what to halve
            for f in hitting[:3]:
                await steps.apply(halved_pace(trigger, f))
            if not hitting:
                minutes = max(input.diagnosis_window_seconds / 60, 1.0)
                for m in limits[:3]:
                    await steps.apply(model_pace(m, minutes))
        else:
            for f in hitting[:3]:
                limit = max(1, int(f.concurrency / 2))
                await steps.apply(ControlSpec("concurrency", feature=f.feature, value=str(limit)))
            if not hitting:
                for m in limits[:3]:
                    await steps.apply(ControlSpec("concurrency", model=m.model, value="2"))
        # B. Back off (with jitter, honouring Retry-After) instead of failing on a 429.
        for m in limits[:3]:
            await steps.apply(ControlSpec("backoff", model=m.model, value=str(BACKOFF_ATTEMPTS)))
        # D. Hold back the features that matter least.
        queue_them = bool(shed) and workflow.patched(QUEUE_LOW_PRIORITY)
        for f in shed:
            if queue_them:
                await steps.apply(held_back(f))
            else:
                await steps.apply(ControlSpec("disable", feature=f.feature))
        return await steps.verify()


def held_back(f: FeatureUsage) -> ControlSpec:
    """A low-priority feature queued at half the pace it got answered at; disabled when nothing
    of it got answered (no pace to halve)."""
    if f.answered_per_minute > 0:
        pace = max(1, int(f.answered_per_minute / 2))
        return ControlSpec("queue", feature=f.feature, value=str(pace))
    return ControlSpec("disable", feature=f.feature)


def requests_ran_out(metrics: dict[str, float]) -> bool:
    """Whether the request quota, not the token quota, is the nearer one in a quota
    incident's metrics (each is there only where its quota is set)."""
    requests = metrics.get("rpm_quota_ratio")
    return requests is not None and requests >= metrics.get("tpm_quota_ratio", 0.0)


def halved_pace(trigger: str, f: FeatureUsage) -> ControlSpec:
    """Half the feature's requests per minute, and never more than 90 % of those that got
    through (the quota it had: half of a demand six times the quota is still three times
    it); half its tokens per minute (only answered calls spend tokens) when the token quota
    is what ran out."""
    if f.calls_per_minute <= 0:  # diagnosed before the pace was measured: calls in flight
        limit = max(1, int(f.concurrency / 2))
        return ControlSpec("concurrency", feature=f.feature, value=str(limit))
    if trigger == "token_quota":
        tpm = max(MIN_TPM, int(f.tokens_per_minute / 2))
        return ControlSpec("tpm", feature=f.feature, value=str(tpm))
    return ControlSpec(
        "rpm", feature=f.feature, value=str(per_minute(f.calls_per_minute, f.answered_per_minute))
    )


def per_minute(calls: float, answered: float) -> int:
    """Half the pace, and no more than 90 % of what got through, when anything did."""
    pace = calls / 2
    if answered > 0:
        pace = min(pace, GOT_THROUGH_SHARE * answered)
    return max(1, int(pace))


def model_pace(m: ModelRateLimits, minutes: float) -> ControlSpec:
    """No feature to hold back: the model's requests per minute, the same way, over the
    diagnosis window (an app-wide concurrency of 2 would leave most replicas with nothing)."""
    calls, answered = m.calls / minutes, (m.calls - m.rate_limited) / minutes
    return ControlSpec("rpm", model=m.model, value=str(per_minute(calls, answered)))


SPEC = RunbookSpec(
    name="rate_limit_exhaustion",
    workflow=RateLimitExhaustionRunbook,
    triggers=("rate_limit_exhaustion", "token_quota"),
    mitigate_before_ack=True,
    expected_resolution_minutes=15,
    escalation_path=(
        "On-call engineer: apply mitigation actions",
        "Platform team: request an emergency quota increase",
        "Account manager: negotiate a higher tier",
    ),
)
