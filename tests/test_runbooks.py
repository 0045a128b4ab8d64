"""The seed's five runbooks, each run by the test kit in the time-skipping server from a
synthetic metrics snapshot, with the real controls store."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine
from temporalio.testing import WorkflowEnvironment

from activities.controls import ControlRef
from activities.diagnosis import (
    ErrorGroup,
    FeatureUsage,
    ModelLatency,
    ModelQuality,
    ModelRateLimits,
    SignalCheck,
    SignalReading,
)
from runbooks import (
    RUNBOOKS,
    api_outage,
    cost_spike,
    elevated_latency,
    quality_degradation,
    rate_limit_exhaustion,
    runbook_for,
)
from runbooks.base import Verification
from runbooks.testing import (
    RunbookKit,
    Snapshot,
    canary_verdict,
    never_recovers,
    reading,
    recovered_if,
)

NOW = datetime(2026, 11, 26, 12, tzinfo=UTC)


def feature(
    name: str,
    *,
    cost: float = 1.0,
    share: float = 0.2,
    rate_limited: int = 0,
    concurrency: float = 2.0,
    models: tuple[str, ...] = ("gpt-4.1",),
    calls_per_minute: float = 40.0,
    tokens_per_minute: float = 20_000.0,
    answered_per_minute: float = 30.0,
) -> FeatureUsage:
    return FeatureUsage(
        feature=name,
        calls=400,
        tokens=200_000,
        cost_usd=cost,
        rate_limited=rate_limited,
        share_of_cost=share,
        concurrency=concurrency,
        models=list(models),
        calls_per_minute=calls_per_minute,
        tokens_per_minute=tokens_per_minute,
        answered_per_minute=answered_per_minute,
    )


def has(kind: str) -> Callable[[list[ControlRef]], bool]:
    """The signal recovers once a control of this kind is in force."""
    return lambda controls: any(c.kind == kind for c in controls)


# --- rate limit exhaustion -----------------------------------------------------------------

RATE_LIMITED = Snapshot(
    rate_limits=[ModelRateLimits("gpt-4.1", calls=1000, rate_limited=300, share=0.3, retries=80)],
    features=[
        feature(
            "search",
            rate_limited=220,
            concurrency=6.4,
            calls_per_minute=301.0,
            answered_per_minute=135.0,
        ),
        feature("chat", rate_limited=60, concurrency=1.5),
        feature("summaries", rate_limited=20),
        feature("embeddings-batch", rate_limited=0, concurrency=9.0),
    ],
)


async def test_rate_limit_halves_requests_per_minute_backs_off_and_sheds_low_priority(
    time_skipping_env: WorkflowEnvironment, engine: Engine
) -> None:
    kit = RunbookKit(
        time_skipping_env.client, engine, RATE_LIMITED, after=recovered_if(has("backoff"))
    )
    run = await kit.run(
        rate_limit_exhaustion.SPEC, feature_priorities={"summaries": "low", "chat": "critical"}
    )

    assert run.report.verification == Verification.RECOVERED
    # 301 a minute, of which 45 % answered: 90 % of those (121), less than half (150).
    assert run.control("rpm", feature="search").value == "121"
    # chat is critical: it keeps its pace while search can give.
    assert [c.feature for c in run.controls if c.kind == "rpm"] == ["search"]
    assert not [c for c in run.controls if c.kind == "concurrency"]
    assert run.control("backoff", model="gpt-4.1").value == "5"
    # Low priority: queued at half the pace it was answered at (30 a minute), not paced as
    # one to blame; and a feature that was not rate-limited is left alone.
    assert run.control("queue", feature="summaries").value == "15"
    assert [c.kind for c in run.controls if c.feature == "summaries"] == ["queue"]
    assert all(c.feature != "embeddings-batch" for c in run.controls)
    assert any("30.0% of 1000 calls rate-limited" in line for line in run.report.findings)
    assert run.queries == ["rate_limits", "top_features"]
    [in_force_when_checked] = run.checks
    assert {c.kind for c in in_force_when_checked} >= {"backoff", "rpm"}
    # Verified on whole minutes after the change: from a minute boundary, for 180 s.
    [check] = run.signal_checks
    assert check.trigger == "rate_limit_exhaustion"
    assert (check.end.second, check.end.microsecond, check.window_seconds) == (0, 0, 179)


async def test_an_exhausted_token_quota_halves_tokens_per_minute(
    time_skipping_env: WorkflowEnvironment, engine: Engine
) -> None:
    kit = RunbookKit(
        time_skipping_env.client, engine, RATE_LIMITED, after=recovered_if(has("backoff"))
    )
    run = await kit.run(rate_limit_exhaustion.SPEC, trigger="token_quota")

    assert run.control("tpm", feature="search").value == "10000"  # 20,000 a minute, halved
    assert not [c for c in run.controls if c.kind in ("rpm", "concurrency")]


async def test_a_quota_incident_the_request_quota_fired_halves_requests_per_minute(
    time_skipping_env: WorkflowEnvironment, engine: Engine
) -> None:
    kit = RunbookKit(
        time_skipping_env.client, engine, RATE_LIMITED, after=recovered_if(has("backoff"))
    )
    metrics = {"rpm_quota_ratio": 0.97, "tpm_quota_ratio": 0.41}
    run = await kit.run(rate_limit_exhaustion.SPEC, trigger="token_quota", metrics=metrics)

    assert run.control("rpm", feature="search").value == "121"  # as for 429s, not tokens
    assert not [c for c in run.controls if c.kind in ("tpm", "concurrency")]


def test_the_nearer_quota_is_the_one_paced() -> None:
    assert rate_limit_exhaustion.requests_ran_out({"rpm_quota_ratio": 0.9})
    assert rate_limit_exhaustion.requests_ran_out({"rpm_quota_ratio": 0.9, "tpm_quota_ratio": 0.8})
    assert not rate_limit_exhaustion.requests_ran_out(
        {"rpm_quota_ratio": 0.5, "tpm_quota_ratio": 0.96}
    )
    assert not rate_limit_exhaustion.requests_ran_out({"tpm_quota_ratio": 0.96})


async def test_without_a_feature_to_hold_back_the_model_is_paced_per_minute(
    time_skipping_env: WorkflowEnvironment, engine: Engine
) -> None:
    quiet_features = Snapshot(
        rate_limits=RATE_LIMITED.rate_limits,
        features=[feature("chat", rate_limited=0), feature("search", rate_limited=0)],
    )
    kit = RunbookKit(
        time_skipping_env.client, engine, quiet_features, after=recovered_if(has("backoff"))
    )
    run = await kit.run(rate_limit_exhaustion.SPEC)

    # 1,000 calls (300 rate-limited) in the 15-minute window: 66.7 a minute, 46.7 answered;
    # half the pace (33), under 90 % of what got through (42). Not an app-wide concurrency of
    # 2, which would leave most replicas nothing.
    assert run.control("rpm", model="gpt-4.1").value == "33"
    assert not [c for c in run.controls if c.kind == "concurrency"]


async def test_a_diagnosis_without_the_pace_falls_back_to_calls_in_flight(
    time_skipping_env: WorkflowEnvironment, engine: Engine
) -> None:
    unmeasured = Snapshot(
        rate_limits=RATE_LIMITED.rate_limits,
        features=[feature("search", rate_limited=220, concurrency=6.4, calls_per_minute=0.0)],
    )
    kit = RunbookKit(
        time_skipping_env.client, engine, unmeasured, after=recovered_if(has("backoff"))
    )
    run = await kit.run(rate_limit_exhaustion.SPEC)

    assert run.control("concurrency", feature="search").value == "3"  # not 1 request a minute
    assert not [c for c in run.controls if c.kind == "rpm"]


async def test_a_mitigation_that_does_not_help_is_rolled_back(
    time_skipping_env: WorkflowEnvironment, engine: Engine
) -> None:
    kit = RunbookKit(time_skipping_env.client, engine, RATE_LIMITED, after=never_recovers)
    run = await kit.run(rate_limit_exhaustion.SPEC, feature_priorities={"summaries": "low"})

    assert run.report.verification == Verification.NOT_RECOVERED
    assert run.controls == []  # nothing left in force
    assert run.report.actions == []
    assert sorted(ref.kind for ref in run.report.rolled_back) == [
        "backoff", "queue", "rpm", "rpm",
    ]  # fmt: skip
    # While checking, the controls were in force.
    assert len(run.checks[0]) == 4


async def test_better_but_not_recovered_is_checked_twice_then_kept_as_inconclusive(
    time_skipping_env: WorkflowEnvironment, engine: Engine
) -> None:
    def improving(controls: list[ControlRef], check: SignalCheck) -> SignalReading:
        return reading(check, recovered=False, breached=False)

    kit = RunbookKit(time_skipping_env.client, engine, RATE_LIMITED, after=improving)
    run = await kit.run(rate_limit_exhaustion.SPEC)

    assert run.report.verification == Verification.INCONCLUSIVE
    assert len(run.signal_checks) == 2
    assert run.signal_checks[1].window_seconds == 2 * 180 - 1  # the same start, twice as long
    assert run.report.rolled_back == []
    assert run.kinds  # kept for the responders to judge


async def test_without_leave_to_mitigate_a_runbook_only_diagnoses(
    time_skipping_env: WorkflowEnvironment, engine: Engine
) -> None:
    kit = RunbookKit(time_skipping_env.client, engine, RATE_LIMITED)
    run = await kit.run(rate_limit_exhaustion.SPEC, may_mitigate=False)

    assert run.report.findings
    assert run.controls == []
    assert run.checks == []
    assert run.report.verification == Verification.NOT_CHECKED


async def test_a_folded_scope_is_only_diagnosed(
    time_skipping_env: WorkflowEnvironment, engine: Engine
) -> None:
    """`feature:(other)` sums thousands of small features: no control fits them all."""
    kit = RunbookKit(time_skipping_env.client, engine, RATE_LIMITED)
    run = await kit.run(rate_limit_exhaustion.SPEC, scope="feature:(other)")

    assert run.report.findings
    assert run.controls == []
    assert run.report.verification == Verification.NOT_CHECKED


# --- elevated latency ----------------------------------------------------------------------


async def test_latency_caps_tokens_and_reroutes_the_slow_model_to_mini(
    time_skipping_env: WorkflowEnvironment, engine: Engine
) -> None:
    snapshot = Snapshot(
        latency=[
            ModelLatency(
                "gpt-4.1", 500, 6100.0, 16800.0, 9000.0, {"<1k": 4200.0, ">=16k": 17900.0}
            ),
            ModelLatency("gpt-4.1-mini", 300, 700.0, 1900.0, 800.0, {"<1k": 1900.0}),
        ],
        errors=[ErrorGroup("gpt-4.1", "chat", "timeout", "APITimeoutError", 12, NOW, "timed out")],
    )
    kit = RunbookKit(time_skipping_env.client, engine, snapshot, after=recovered_if(has("reroute")))
    run = await kit.run(elevated_latency.SPEC)

    assert run.report.verification == Verification.RECOVERED
    assert run.control("reroute", model="gpt-4.1").value == "gpt-4.1-mini"
    assert run.control("max_tokens", model="gpt-4.1").value == "512"
    assert all(c.model != "gpt-4.1-mini" for c in run.controls)  # the fast model is left alone
    assert any(">=16k: 17.9s" in line for line in run.report.findings)
    assert any("12 timeouts" in line for line in run.report.findings)


async def test_latency_tries_the_fallback_endpoint_on_a_canary_and_asks_before_promoting(
    time_skipping_env: WorkflowEnvironment, engine: Engine
) -> None:
    snapshot = Snapshot(latency=[ModelLatency("gpt-4.1", 500, 6100.0, 16800.0, 9000.0, {})])
    kit = RunbookKit(
        time_skipping_env.client,
        engine,
        snapshot,
        after=recovered_if(has("reroute")),
        canary=canary_verdict("promote"),
    )
    run = await kit.run(elevated_latency.SPEC, fallbacks={"gpt-4.1": "gpt-4.1@azure-east"})

    assert run.control("reroute", model="gpt-4.1").value == "gpt-4.1@azure-east"
    halfway, check = run.canary_checks
    assert (check.trigger, check.models) == ("elevated_latency", ["gpt-4.1", "gpt-4.1"])
    assert (halfway.window_over, check.window_over) == (False, True)
    assert check.end - check.start == timedelta(seconds=180)
    # Another provider: a person approves the promotion.
    [ask] = run.asked
    assert "Promote to all traffic" in ask.text
    assert "azure-east" in ask.text


async def test_a_latency_canary_that_is_slower_is_reverted_before_the_window_ends(
    time_skipping_env: WorkflowEnvironment, engine: Engine
) -> None:
    snapshot = Snapshot(latency=[ModelLatency("gpt-4.1", 500, 6100.0, 16800.0, 9000.0, {})])
    kit = RunbookKit(time_skipping_env.client, engine, snapshot, canary=canary_verdict("revert"))
    run = await kit.run(elevated_latency.SPEC)

    assert run.controls == []
    assert sorted(ref.kind for ref in run.report.rolled_back) == ["max_tokens", "reroute"]
    # Harm is not waited out: the look halfway through the window reverted it.
    [check] = run.canary_checks
    assert not check.window_over
    assert run.report.verification == Verification.NOT_CHECKED
    assert run.signal_checks == []


# --- quality degradation -------------------------------------------------------------------


def quality(model: str, snapshot: str, mean: float, hours_ago: float) -> ModelQuality:
    last = NOW - timedelta(hours=hours_ago)
    first = last - timedelta(hours=6)
    return ModelQuality(model, snapshot, scores=200, mean=mean, first_seen=first, last_seen=last)


async def test_quality_pins_the_last_known_good_snapshot(
    time_skipping_env: WorkflowEnvironment, engine: Engine
) -> None:
    snapshot = Snapshot(
        quality=[
            quality("gpt-4.1", "gpt-4.1-2025-01-01", 0.88, hours_ago=20),
            quality("gpt-4.1", "gpt-4.1-2025-04-14", 0.86, hours_ago=3),
            quality("gpt-4.1", "gpt-4.1-2025-09-01", 0.41, hours_ago=0),
        ],
        features=[feature("chat")],
    )
    kit = RunbookKit(time_skipping_env.client, engine, snapshot, after=recovered_if(has("pin")))
    run = await kit.run(quality_degradation.SPEC, scope="model:gpt-4.1")

    assert run.control("pin", model="gpt-4.1").value == "gpt-4.1-2025-04-14"
    assert run.report.verification == Verification.RECOVERED
    assert any("a model update is the likely cause" in line for line in run.report.findings)


async def test_quality_without_a_model_change_reroutes_critical_features(
    time_skipping_env: WorkflowEnvironment, engine: Engine
) -> None:
    snapshot = Snapshot(
        quality=[
            quality("gpt-4.1", "gpt-4.1-2025-04-14", 0.45, hours_ago=0),
            quality("gpt-4.1-mini", "gpt-4.1-mini-2025-04-14", 0.85, hours_ago=0),
            quality("gpt-4o", "gpt-4o-2024-11-20", 0.83, hours_ago=0),
        ],
        features=[feature("chat", models=("gpt-4.1", "gpt-4.1-mini")), feature("search")],
    )
    kit = RunbookKit(time_skipping_env.client, engine, snapshot, after=recovered_if(has("reroute")))
    run = await kit.run(quality_degradation.SPEC, feature_priorities={"chat": "critical"})

    # Only chat's degraded model moves, to the best-scoring healthy snapshot; search is not
    # critical and chat's gpt-4.1-mini is fine where it is.
    assert run.kinds == ["reroute"]
    reroute = run.control("reroute", feature="chat", model="gpt-4.1")
    assert reroute.value == "gpt-4.1-mini-2025-04-14"
    assert any("check recent prompt template changes" in line for line in run.report.findings)


def test_quality_waits_for_an_acknowledgement() -> None:
    assert quality_degradation.SPEC.mitigate_before_ack is False
    assert rate_limit_exhaustion.SPEC.mitigate_before_ack is True


# --- cost spike ----------------------------------------------------------------------------


async def test_cost_spike_routes_the_scope_to_the_cheapest_model_once_its_canary_is_cheaper(
    time_skipping_env: WorkflowEnvironment, engine: Engine
) -> None:
    snapshot = Snapshot(
        features=[
            feature("summaries", cost=41.0, share=0.82, concurrency=8.0),
            feature("chat", cost=6.0, share=0.12, models=("gpt-4.1", "gpt-4o")),
            feature("digest", cost=2.0, share=0.04),
        ]
    )
    kit = RunbookKit(
        time_skipping_env.client,
        engine,
        snapshot,
        after=recovered_if(has("reroute")),
        canary=canary_verdict("promote"),
    )
    run = await kit.run(cost_spike.SPEC, feature_priorities={"digest": "low"})

    assert run.report.verification == Verification.RECOVERED
    # The seed's "route all traffic": every model of the scope, every feature.
    reroutes = {
        (c.feature, c.model): (c.value, c.fraction) for c in run.controls if c.kind == "reroute"
    }
    assert reroutes == {
        (None, "gpt-4.1"): ("gpt-4.1-nano", None),
        (None, "gpt-4o"): ("gpt-4o-mini", None),
    }
    # Tried on a tenth of the traffic first, then promoted: the same controls.
    check = run.canary_checks[-1]
    assert sorted(check.control_ids) == sorted(c.id for c in run.controls if c.kind == "reroute")
    assert (check.feature, check.trigger) == (None, "cost_spike")
    [canary] = run.report.canaries
    assert canary.promoted
    assert canary.fraction == 0.1
    assert run.control("cache", feature="summaries").value == ""
    assert run.control("disable", feature="digest")
    assert run.control("max_tokens", feature="summaries").value == "512"
    assert run.control("concurrency", feature="summaries").value == "4"
    assert any("82% of cost" in line for line in run.report.findings)
    # Both the promotion and the shedding were asked for.
    assert [ask.text.split(":")[0] for ask in run.asked] == [
        "Promote to all traffic",
        "Disable the low-priority features digest",
    ]


async def test_a_cost_canary_that_is_not_cheaper_is_reverted_and_the_rest_still_applies(
    time_skipping_env: WorkflowEnvironment, engine: Engine
) -> None:
    snapshot = Snapshot(features=[feature("summaries", cost=41.0, share=0.82, concurrency=8.0)])
    kit = RunbookKit(
        time_skipping_env.client,
        engine,
        snapshot,
        after=recovered_if(has("max_tokens")),
        canary=canary_verdict("revert"),
    )
    run = await kit.run(cost_spike.SPEC)

    assert "reroute" not in run.kinds
    assert [ref.kind for ref in run.report.rolled_back] == ["reroute"]
    assert not run.report.canaries[0].promoted
    assert run.asked == []  # nothing to promote: nobody is asked
    assert run.control("max_tokens", feature="summaries").value == "512"


async def test_a_denied_promotion_reverts_the_canary(
    time_skipping_env: WorkflowEnvironment, engine: Engine
) -> None:
    snapshot = Snapshot(features=[feature("summaries", cost=41.0, share=0.82)])
    kit = RunbookKit(
        time_skipping_env.client,
        engine,
        snapshot,
        canary=canary_verdict("promote"),
        approvals=lambda action: False,
    )
    run = await kit.run(cost_spike.SPEC)

    assert "reroute" not in run.kinds
    assert "not approved" in run.report.canaries[0].reason


async def test_cost_spike_keeps_a_capable_model_for_a_critical_feature(
    time_skipping_env: WorkflowEnvironment, engine: Engine
) -> None:
    snapshot = Snapshot(
        features=[feature("summaries", cost=30.0, share=0.7), feature("chat", cost=10.0)]
    )
    kit = RunbookKit(
        time_skipping_env.client,
        engine,
        snapshot,
        after=recovered_if(has("reroute")),
        canary=canary_verdict("promote"),
    )
    # checkout spends too little to be among the top features: critical all the same.
    priorities = {"chat": "critical", "checkout": "critical"}
    run = await kit.run(cost_spike.SPEC, feature_priorities=priorities)
    assert run.control("reroute", feature=None, model="gpt-4.1").value == "gpt-4.1-nano"
    # More specific, so chat and checkout keep mini; on the same canary slice, promoted with it.
    assert run.control("reroute", feature="chat").value == "gpt-4.1-mini"
    assert run.control("reroute", feature="checkout").value == "gpt-4.1-mini"
    assert len(run.controls) == len({(c.kind, c.feature, c.model) for c in run.controls})
    alone = await kit.run(
        cost_spike.SPEC, scope="feature:chat", feature_priorities={"chat": "critical"}
    )
    assert alone.control("reroute", feature="chat").value == "gpt-4.1-mini"


async def test_cost_spike_acts_on_the_incident_scope_not_the_top_spender(
    time_skipping_env: WorkflowEnvironment, engine: Engine
) -> None:
    snapshot = Snapshot(
        features=[
            feature("chat", cost=30.0, share=0.6),
            feature("summaries", cost=10.0, share=0.2, concurrency=4.0),
        ]
    )
    kit = RunbookKit(time_skipping_env.client, engine, snapshot, after=recovered_if(has("reroute")))
    run = await kit.run(cost_spike.SPEC, scope="feature:summaries")

    assert {c.feature for c in run.controls} == {"summaries"}
    assert run.control("reroute", feature="summaries").value == "gpt-4.1-nano"
    assert run.control("concurrency", feature="summaries").value == "2"


async def test_a_budget_incident_is_verified_on_the_cost_rate(
    time_skipping_env: WorkflowEnvironment, engine: Engine
) -> None:
    snapshot = Snapshot(features=[feature("summaries", cost=41.0, share=0.82)])
    kit = RunbookKit(time_skipping_env.client, engine, snapshot, after=recovered_if(has("reroute")))
    run = await kit.run(cost_spike.SPEC, trigger="budget_exhaustion")

    # Today's spend never falls back; what the mitigation changes is the rate.
    assert [check.trigger for check in run.signal_checks] == ["cost_spike"]
    assert run.report.verification == Verification.RECOVERED


# --- api outage ----------------------------------------------------------------------------


async def test_outage_serves_cache_sheds_low_priority_and_keeps_them_while_it_lasts(
    time_skipping_env: WorkflowEnvironment, engine: Engine
) -> None:
    snapshot = Snapshot(
        errors=[
            ErrorGroup("gpt-4.1", "chat", "server_error", "InternalServerError", 300, NOW, "503"),
            ErrorGroup(
                "gpt-4.1-mini", "search", "server_error", "InternalServerError", 90, NOW, "503"
            ),
        ],
        features=[feature("chat"), feature("summaries")],
    )
    kit = RunbookKit(time_skipping_env.client, engine, snapshot, after=never_recovers)
    run = await kit.run(api_outage.SPEC, feature_priorities={"summaries": "low"})

    assert run.report.verification == Verification.NOT_RECOVERED
    # Kept: the cause is the provider's. Nothing of either feature succeeds: none is queued
    # (test_outage_hooks queues those that still get answers).
    assert sorted(run.kinds) == ["cache", "disable"]
    assert run.control("disable", feature="summaries")
    assert run.report.rolled_back == []
    assert any("2 models failing at once" in line for line in run.report.findings)


# --- the registry --------------------------------------------------------------------------


def test_every_trigger_with_a_seed_runbook_finds_it() -> None:
    assert runbook_for("rate_limit_exhaustion") is rate_limit_exhaustion.SPEC
    assert runbook_for("elevated_latency") is elevated_latency.SPEC
    assert runbook_for("quality_degradation") is quality_degradation.SPEC
    assert runbook_for("cost_spike") is cost_spike.SPEC
    assert runbook_for("api_outage") is api_outage.SPEC
    assert runbook_for("error_rate") is None
    names = [spec.name for spec in RUNBOOKS]
    assert len(names) == len(set(names))
    triggers = [t for spec in RUNBOOKS for t in spec.triggers]
    assert len(triggers) == len(set(triggers)), "two runbooks claim the same trigger"


def test_a_runbook_relabels_the_escalation_levels() -> None:
    from domain.escalation import DEFAULT_POLICIES

    policy = rate_limit_exhaustion.SPEC.policy(DEFAULT_POLICIES["SEV2"])
    assert policy.level(2).description == "Platform team: request an emergency quota increase"
    assert (
        policy.level(2).ack_timeout_seconds == DEFAULT_POLICIES["SEV2"].level(2).ack_timeout_seconds
    )


def test_the_expected_resolution_is_the_paging_severities_l1_resolve_deadline() -> None:
    from domain.escalation import DEFAULT_POLICIES

    for spec in RUNBOOKS:
        for severity in ("SEV1", "SEV2"):
            policy = spec.policy(DEFAULT_POLICIES[severity], severity)
            assert policy.level(1).resolve_timeout_seconds == spec.expected_resolution_minutes * 60
            # Only L1's: the escalations keep the time the severity gives them.
            given = DEFAULT_POLICIES[severity].level(2)
            assert policy.level(2).resolve_timeout_seconds == given.resolve_timeout_seconds
        # A ticket keeps its days; a run begun before the deadline existed keeps the severity's.
        for severity, asked in (("SEV4", "SEV4"), ("SEV1", None)):
            kept = spec.policy(DEFAULT_POLICIES[severity], asked).level(1).resolve_timeout_seconds
            assert kept == DEFAULT_POLICIES[severity].level(1).resolve_timeout_seconds


async def test_a_canary_worse_on_a_guard_is_reverted_even_with_too_few_samples_to_judge(
    time_skipping_env: WorkflowEnvironment, engine: Engine
) -> None:
    # Latency too sparse to judge, but errors significantly worse: never handed to `verify`.
    snapshot = Snapshot(latency=[ModelLatency("gpt-4.1", 500, 6100.0, 16800.0, 9000.0, {})])
    worse = canary_verdict("revert", too_few=True)
    kit = RunbookKit(time_skipping_env.client, engine, snapshot, canary=worse)
    run = await kit.run(elevated_latency.SPEC)

    assert run.controls == []
    assert not run.report.canaries[0].promoted
