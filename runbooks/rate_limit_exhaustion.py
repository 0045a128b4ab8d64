"""Rate limit exhaustion (the seed: 429 rate > 5%): find who spends the quota, halve their
concurrency, back off on 429s, shed the lowest-priority features."""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.controls import ControlSpec
    from runbooks.base import Priority, RunbookInput, RunbookReport, RunbookSpec
    from runbooks.steps import Steps

BACKOFF_ATTEMPTS = 5


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
                f"{f.rate_limited} 429s, ~{f.concurrency:.1f} calls in flight"
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
        for f in hitting[:3]:
            limit = max(1, int(f.concurrency / 2))
            await steps.apply(ControlSpec("concurrency", feature=f.feature, value=str(limit)))
        if not hitting:
            for m in limits[:3]:
                await steps.apply(ControlSpec("concurrency", model=m.model, value="2"))
        # B. Back off (with jitter, honouring Retry-After) instead of failing on a 429.
        for m in limits[:3]:
            await steps.apply(ControlSpec("backoff", model=m.model, value=str(BACKOFF_ATTEMPTS)))
        # D. Shed the features that matter least.
        for f in shed:
            await steps.apply(ControlSpec("disable", feature=f.feature))
        return await steps.verify()


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
