"""The runbook test kit: run a runbook in Temporal's time-skipping server against a synthetic
metrics snapshot, with the real controls store, and look at what it did.

    helps = recovered_if(lambda controls: any(c.kind == "backoff" for c in controls))
    kit = RunbookKit(env.client, engine, Snapshot(rate_limits=[...], features=[...]), after=helps)
    run = await kit.run(rate_limit_exhaustion.SPEC, scope="global")
    assert run.report.verification == Verification.RECOVERED
    assert run.control("concurrency", feature="search").value == "3"

The diagnosis activities answer from the snapshot; the control activities are the real ones,
on the store you pass (a temporary SQLite file will do), so what the runbook leaves in force is
what `pagerloop controls list` would show. `after` decides what the re-read signal says, from
the controls in force at that moment: that is how a test says which mitigation helps.
`hooks` are the real hook activities (`HookActivities` pointed at a local receiver); without
them the users' notice answers "not configured".
`golden_set` is the real golden-set activity (`GoldenSetActivities` pointed at a local eval);
without it the quality runbook is told no golden set is configured.
`approvals` answers the steps that ask a person first (`Steps.approve`): by default it
approves them all; `lambda action: None` never answers (the ask times out).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine
from temporalio import activity
from temporalio.client import Client
from temporalio.worker import Worker

from activities.canary import CanaryCheck, CanaryResult
from activities.controls import ControlActivities, ControlRef
from activities.diagnosis import (
    DiagnosisQuery,
    ErrorGroup,
    FeatureUsage,
    ModelLatency,
    ModelQuality,
    ModelRateLimits,
    SignalCheck,
    SignalReading,
)
from activities.golden_set import GoldenSetActivities, GoldenSetRequest, GoldenSetVerdict
from activities.hooks import HookActivities, NotifyUsers, NotifyUsersResult
from domain.incident import ApprovalDecision
from runbooks.base import RunbookInput, RunbookProgress, RunbookReport, RunbookSpec
from runbooks.steps import APPROVAL_SIGNAL, KIT_APPROVAL_ACTIVITY

Judge = Callable[[list[ControlRef], SignalCheck], SignalReading]
# What a canary comparison finds, from the controls in force when it is asked.
CanaryJudge = Callable[[list[ControlRef], CanaryCheck], CanaryResult]


@dataclass
class Snapshot:
    """What the stores would answer to the runbook's diagnosis queries."""

    features: list[FeatureUsage] = field(default_factory=list)
    rate_limits: list[ModelRateLimits] = field(default_factory=list)
    latency: list[ModelLatency] = field(default_factory=list)
    errors: list[ErrorGroup] = field(default_factory=list)
    quality: list[ModelQuality] = field(default_factory=list)


def reading(check: SignalCheck, *, recovered: bool, breached: bool | None = None) -> SignalReading:
    breached = not recovered if breached is None else breached
    verdict = "recovered" if recovered else ("still breached" if breached else "in between")
    return SignalReading(
        trigger=check.trigger,
        scope=check.scope,
        values={},
        calls=100,
        breached=breached,
        recovered=recovered,
        summary=f"{check.trigger} {verdict} (synthetic)",
    )


def recovered_if(helps: Callable[[list[ControlRef]], bool]) -> Judge:
    """The signal recovers when `helps(controls in force)`, and stays breached otherwise."""
    return lambda controls, check: reading(check, recovered=helps(controls))


def never_recovers(controls: list[ControlRef], check: SignalCheck) -> SignalReading:
    return reading(check, recovered=False)


def canary_verdict(verdict: str, *, too_few: bool = False) -> CanaryJudge:
    """Every canary comparison finds `verdict` (promote | revert | inconclusive); as the
    real one, it promotes only once the window is over."""

    def judge(controls: list[ControlRef], check: CanaryCheck) -> CanaryResult:
        found = "inconclusive" if verdict == "promote" and not check.window_over else verdict
        return CanaryResult(
            found, f"{found} (synthetic)", [f"synthetic {found}"], 100, 900, too_few
        )

    return judge


too_little_traffic = canary_verdict("inconclusive", too_few=True)

# A person's answer to a step's ask (`Steps.approve`), from what the step will do: True
# approves, False denies, None never answers (the ask times out).
Approver = Callable[[str], bool | None]
KIT_APPROVER = "runbook-kit"


def approve_all(action: str) -> bool:
    return True


@dataclass
class RunbookRun:
    report: RunbookReport
    controls: list[ControlRef]  # in force in the store after the run
    checks: list[list[ControlRef]]  # the controls in force at each re-read of the signal
    signal_checks: list[SignalCheck]  # what each re-read asked for (trigger, window)
    queries: list[str]  # the diagnosis activities the runbook called, in order
    canary_checks: list[CanaryCheck] = field(default_factory=list)  # each canary comparison
    asked: list[RunbookProgress] = field(default_factory=list)  # each ask for approval

    def control(self, kind: str, **target: str | None) -> ControlRef:
        """The control of that kind in force (matching feature= / model= when given)."""
        for ref in self.controls:
            if ref.kind == kind and all(getattr(ref, k) == v for k, v in target.items()):
                return ref
        raise AssertionError(f"no {kind} control {target or ''} in force; in force: {self.kinds}")

    @property
    def kinds(self) -> list[str]:
        return [ref.kind for ref in self.controls]


class RunbookKit:
    def __init__(
        self,
        client: Client,
        engine: Engine,
        snapshot: Snapshot,
        after: Judge = never_recovers,
        canary: CanaryJudge = too_little_traffic,
        approvals: Approver = approve_all,
        hooks: HookActivities | None = None,
        golden_set: GoldenSetActivities | None = None,
    ) -> None:
        self.golden_set = golden_set
        # The real hook activities (pointed at a local receiver), or none configured.
        self.hooks = hooks
        self.approvals = approvals
        self._asked: list[RunbookProgress] = []
        self.client = client
        self.snapshot = snapshot
        self.after = after
        self.canary = canary
        self._canary_checks: list[CanaryCheck] = []
        self.controls = ControlActivities(engine)
        self.incident_id = ""
        self._checks: list[list[ControlRef]] = []
        self._signal_checks: list[SignalCheck] = []
        self._queries: list[str] = []

    def activities(self) -> list[Callable[..., Any]]:
        """The kit's diagnosis activities and the real control activities."""
        snap = self.snapshot

        def answer(name: str, rows: list[Any]) -> Callable[..., Any]:
            @activity.defn(name=f"diagnosis.{name}")
            async def query(q: DiagnosisQuery) -> list[Any]:
                self._queries.append(name)
                return [row for row in rows if _in_scope(row, q.scope)][: q.limit]

            return query

        @activity.defn(name="diagnosis.check_signal")
        async def check_signal(check: SignalCheck) -> SignalReading:
            in_force = (await self.controls.list_for(self.incident_id)).controls
            self._checks.append(in_force)
            self._signal_checks.append(check)
            return self.after(in_force, check)

        @activity.defn(name="canary.compare")
        async def compare(check: CanaryCheck) -> CanaryResult:
            in_force = (await self.controls.list_for(self.incident_id)).controls
            self._canary_checks.append(check)
            return self.canary(in_force, check)

        @activity.defn(name=KIT_APPROVAL_ACTIVITY)
        async def approval_asked(ask: RunbookProgress) -> None:
            """The runbook has no incident to ask: `approvals` answers, by the signal a
            person's answer reaches a runbook by."""
            self._asked.append(ask)
            answer = self.approvals(ask.text)
            if answer is None:
                return
            decision = ApprovalDecision(ask.approval_id, answer, KIT_APPROVER, channel="kit")
            asking = activity.info().workflow_id
            assert asking is not None  # only runbook workflows ask
            handle = self.client.get_workflow_handle(asking)
            await handle.signal(APPROVAL_SIGNAL, decision)

        @activity.defn(name="hooks.notify_users")
        async def no_hooks(request: NotifyUsers) -> NotifyUsersResult:
            return NotifyUsersResult(False, "no hook in the runbook kit")

        @activity.defn(name="golden_set.evaluate")
        async def no_golden_set(request: GoldenSetRequest) -> GoldenSetVerdict:
            return GoldenSetVerdict(False, details="no golden set in the runbook kit")

        return [
            self.hooks.notify_users if self.hooks is not None else no_hooks,
            self.golden_set.evaluate if self.golden_set is not None else no_golden_set,
            approval_asked,
            compare,
            answer("top_features", snap.features),
            answer("rate_limits", snap.rate_limits),
            answer("latency", snap.latency),
            answer("recent_errors", snap.errors),
            answer("quality", snap.quality),
            check_signal,
            self.controls.set,
            self.controls.revert,
            self.controls.extend,
            self.controls.list_for,
        ]

    async def run(
        self,
        spec: RunbookSpec,
        *,
        trigger: str | None = None,
        scope: str = "global",
        severity: str = "SEV2",
        may_mitigate: bool = True,
        feature_priorities: dict[str, str] | None = None,
        metrics: dict[str, float] | None = None,
        fallbacks: dict[str, str] | None = None,
        output_checks: dict[str, str] | None = None,
    ) -> RunbookRun:
        self.incident_id = f"incident-test-{uuid.uuid4().hex[:8]}"
        self._checks, self._signal_checks, self._queries = [], [], []
        self._canary_checks = []
        self._asked = []
        queue = f"runbook-kit-{uuid.uuid4().hex[:8]}"
        runbook_input = RunbookInput(
            incident_id=self.incident_id,
            trigger=trigger or spec.triggers[0],
            scope=scope,
            severity=severity,
            opened_at=datetime.now(UTC),
            metrics=metrics or {},
            summary=f"synthetic {trigger or spec.triggers[0]} on {scope}",
            feature_priorities=feature_priorities or {},
            may_mitigate=may_mitigate,
            fallbacks=fallbacks or {},
            output_checks=output_checks or {},
            golden_set=self.golden_set is not None,
        )
        async with Worker(
            self.client, task_queue=queue, workflows=[spec.workflow], activities=self.activities()
        ):
            report: RunbookReport = await self.client.execute_workflow(
                spec.workflow.run,
                runbook_input,
                id=f"{self.incident_id}-runbook",
                task_queue=queue,
            )
        in_force = (await self.controls.list_for(self.incident_id)).controls
        return RunbookRun(
            report,
            in_force,
            list(self._checks),
            list(self._signal_checks),
            list(self._queries),
            list(self._canary_checks),
            list(self._asked),
        )


def _in_scope(row: Any, scope: str) -> bool:
    """Whether a snapshot row belongs to the scope the runbook asked about, as the stores
    would answer it."""
    kind, _, name = scope.partition(":")
    if kind == "feature" and hasattr(row, "feature"):
        return bool(row.feature == name)
    if kind == "model":
        if hasattr(row, "models"):
            return name in row.models
        if hasattr(row, "model"):
            return bool(row.model == name)
    return True
