"""Elevated latency (the seed: p95 > 15 s): latency by model and prompt size, then cap
max_tokens and reroute the slow model to its fallback target (`PAGERLOOP_FALLBACK_TARGETS`:
another model, or a model at another endpoint such as an Azure OpenAI deployment) or else its
mini sibling: on a canary slice first, on all the traffic once the slice proves faster and no
worse. Another endpoint is another provider: its promotion needs a person's approval.

Runs begun before the canary applied both at once to all traffic (patch CANARY_FIRST)."""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from activities.controls import ControlSpec
    from runbooks.base import RunbookInput, RunbookReport, RunbookSpec
    from runbooks.models import MINI, fallback_for, family
    from runbooks.steps import Steps

MAX_TOKENS_CAP = 512
SLOW_P95_MS = 8000.0  # the detector's p95 warning line
CANARY_FIRST = "latency-canary-and-fallback"


@workflow.defn
class ElevatedLatencyRunbook:
    @workflow.run
    async def run(self, input: RunbookInput) -> RunbookReport:
        steps = Steps(SPEC, input)
        by_model = await steps.latency()
        errors = await steps.recent_errors()
        for m in by_model[:4]:
            bands = ", ".join(
                f"{band}: {ms / 1000:.1f}s" for band, ms in m.p95_by_prompt_size.items()
            )
            steps.found(
                f"{m.model}: p50 {_s(m.p50_ms)}, p95 {_s(m.p95_ms)} over {m.calls} calls, "
                f"avg prompt {m.avg_input_tokens or 0:,.0f} tokens"
                + (f" (p95 by prompt size: {bands})" if bands else "")
            )
        timeouts = sum(e.count for e in errors if e.status == "timeout")
        if timeouts:
            steps.found(f"{timeouts} timeouts in the window")
        steps.found("check https://status.openai.com for a provider-side slowdown")
        await steps.tell_diagnosis()
        if not steps.may_mitigate:
            return steps.report

        slow = [m for m in by_model if (m.p95_ms or 0) >= SLOW_P95_MS] or by_model[:1]
        if workflow.patched(CANARY_FIRST):
            for m in slow:
                cap = ControlSpec("max_tokens", model=m.model, value=str(MAX_TOKENS_CAP))
                target = fallback_for(m.model, input.fallbacks) or MINI.get(family(m.model))
                trial = [cap]
                if target is not None and target != m.model:
                    trial.append(ControlSpec("reroute", model=m.model, value=target))
                await steps.canary(
                    trial,
                    # `model@endpoint`: another provider.
                    approval="fallback_provider" if "@" in (target or "") else None,
                    if_too_little_traffic="promote",
                )
            return await steps.verify()
        for m in slow:
            await steps.apply(ControlSpec("max_tokens", model=m.model, value=str(MAX_TOKENS_CAP)))
            faster = MINI.get(family(m.model))
            if faster is not None:
                await steps.apply(ControlSpec("reroute", model=m.model, value=faster))
        return await steps.verify()


def _s(ms: float | None) -> str:
    return "n/a" if ms is None else f"{ms / 1000:.1f}s"


SPEC = RunbookSpec(
    name="elevated_latency",
    workflow=ElevatedLatencyRunbook,
    triggers=("elevated_latency",),
    mitigate_before_ack=True,
    expected_resolution_minutes=20,
    approvals=(("fallback_provider", ("SEV1", "SEV2", "SEV3", "SEV4")),),
    escalation_path=(
        "On-call engineer: reduce max_tokens, route to mini",
        "Platform team: switch to the fallback provider",
        "Engineering leadership: decide on degraded mode",
    ),
)
