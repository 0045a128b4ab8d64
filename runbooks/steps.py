"""The toolkit a runbook is written with: diagnosis queries, controls, telling the incident,
and verify-or-roll-back. Runs inside the runbook's workflow (every call is an activity or a
timer, so the whole runbook is in the incident's history)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Literal

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from activities.canary import CanaryCheck, CanaryResult
    from activities.controls import (
        ControlList,
        ControlRef,
        ControlSpec,
        RevertControls,
        SetControl,
    )
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
    from activities.policies import CONTROL_CHANGE, STORE_QUERY
    from domain.incident import Approval, ApprovalDecision
    from domain.scopes import OTHER
    from domain.waterfall import TracedCall, traces_finding, worst_traces
    from runbooks.base import (
        CanaryOutcome,
        Priority,
        RunbookInput,
        RunbookProgress,
        RunbookReport,
        RunbookSpec,
        Verification,
    )
    from stores.controls import describe

PROGRESS_SIGNAL = "runbook_progress"
# How long a step waits for a person by default, and what the answer arrives by.
APPROVAL_TIMEOUT = timedelta(minutes=15)
APPROVAL_SIGNAL = "approval_decided"
# Asks made by a runbook run on its own (no incident): only the test kit registers it.
KIT_APPROVAL_ACTIVITY = "runbook_kit.approval_asked"
# Runs begun before `approve` existed went ahead with the step unasked.
RUNBOOK_APPROVALS = "runbook-approvals"
# A canary's slice: enough traffic to compare within minutes, little enough to limit the harm.
CANARY_FRACTION = 0.1


class Steps:
    def __init__(self, spec: RunbookSpec, input: RunbookInput) -> None:
        self.spec = spec
        self.input = input
        self.report = RunbookReport(runbook=spec.name)
        self._applied_at: datetime | None = None
        # The worst calls' traces the diagnosis queries found, in the order asked.
        self._traces: list[TracedCall] = []

    # --- diagnosis -----------------------------------------------------------------------

    def query(self, scope: str | None = None, limit: int = 5) -> DiagnosisQuery:
        return DiagnosisQuery(
            scope=scope or self.input.scope,
            end=workflow.now(),
            window_seconds=self.input.diagnosis_window_seconds,
            limit=limit,
        )

    async def top_features(
        self, scope: str | None = "global", limit: int = 5
    ) -> list[FeatureUsage]:
        query = self.query(scope, limit)
        return await self._read("diagnosis.top_features", query, list[FeatureUsage])

    async def rate_limits(self, scope: str | None = "global") -> list[ModelRateLimits]:
        return await self._read("diagnosis.rate_limits", self.query(scope), list[ModelRateLimits])

    async def latency(self, scope: str | None = None) -> list[ModelLatency]:
        return await self._read("diagnosis.latency", self.query(scope), list[ModelLatency])

    async def recent_errors(self, scope: str | None = None) -> list[ErrorGroup]:
        return await self._read("diagnosis.recent_errors", self.query(scope), list[ErrorGroup])

    async def quality(self, scope: str | None = None) -> list[ModelQuality]:
        # Every snapshot, not the worst few: the known-good ones are what a pin needs.
        query = self.query(scope, limit=500)
        # Quality needs a longer memory than traffic: the last known-good snapshot may have
        # answered hours ago.
        query.window_seconds = max(query.window_seconds, 24 * 3600)
        return await self._read("diagnosis.quality", query, list[ModelQuality])

    async def _read(self, activity: str, query: DiagnosisQuery, result_type: type) -> list:  # type: ignore[type-arg]
        result: list = await workflow.execute_activity(  # type: ignore[type-arg]
            activity,
            query,
            result_type=result_type,
            **STORE_QUERY.options(),
            summary=f"{activity} on {query.scope}",
        )
        for row in result:
            self._traces += getattr(row, "traces", None) or []
        return result

    def found(self, finding: str) -> None:
        self.report.findings.append(finding)

    def priority(self, feature: str) -> Priority:
        value = self.input.feature_priorities.get(feature, Priority.NORMAL)
        return Priority(value) if value in Priority.__members__.values() else Priority.NORMAL

    async def tell_diagnosis(self) -> None:
        # Where to look next: the traces of the worst calls the diagnosis read (no query of its
        # own: the rows carry them, so the runbook's commands stay as they were).
        lines = list(self.report.findings) or ["nothing stood out"]
        traces = traces_finding(worst_traces(self._traces))
        if traces is not None and traces not in lines:
            lines.append(traces)
            self.found(traces)
        await self.tell("diagnosis", "\n".join(f"• {line}" for line in lines))

    # --- mitigation ----------------------------------------------------------------------

    @property
    def may_mitigate(self) -> bool:
        # A folded scope (`feature:(other)`) stands for many small features: no control fits
        # them all, so its runbook diagnoses and the people decide.
        return self.input.may_mitigate and not self.input.scope.endswith(f":{OTHER}")

    async def apply(self, spec: ControlSpec) -> ControlRef:
        """Put a control in force (idempotent: a retry or a rerun finds the same control)."""
        if not spec.reason:
            spec.reason = f"{self.spec.name}: {self.input.summary or self.input.trigger}"
        ref: ControlRef = await workflow.execute_activity(
            "controls.set",
            SetControl(self.input.incident_id, spec, set_by=f"runbook:{self.spec.name}"),
            result_type=ControlRef,
            # Cancelled (the incident resolved), it still lands before the runbook stops, so
            # the incident's revert comes after it and not before.
            cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
            **CONTROL_CHANGE.options(),
            summary=f"control: {spec.kind} {spec.feature or spec.model or 'all'}",
        )
        # Set again (a canary promoted): the same control, as it is now.
        self.report.actions = [known for known in self.report.actions if known.key != ref.key]
        self.report.actions.append(ref)
        self._applied_at = workflow.now()
        return ref

    async def roll_back(self, refs: list[ControlRef], reason: str) -> None:
        if not refs:
            return
        await workflow.execute_activity(
            "controls.revert",
            RevertControls(
                self.input.incident_id,
                keys=[ref.key for ref in refs],
                reason=reason,
                reverted_by=f"runbook:{self.spec.name}",
            ),
            result_type=ControlList,
            cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
            **CONTROL_CHANGE.options(),
            summary=f"roll back {len(refs)} control(s)",
        )
        gone = {ref.key for ref in refs}
        self.report.actions = [ref for ref in self.report.actions if ref.key not in gone]
        self.report.rolled_back += refs

    # --- verification --------------------------------------------------------------------

    async def verify(self) -> RunbookReport:
        """Wait, re-read the breached signal on traffic after the mitigation, and conclude:
        recovered -> keep the controls; still breached -> roll them back."""
        report = self.report
        if not report.actions or self._applied_at is None:
            return report
        await self.tell("mitigation", "\n".join(f"• {ref.description}" for ref in report.actions))
        # The rollups count whole minutes: judge only minutes that began after the change had
        # reached the clients (a runbook begun before this rule replays on the old start).
        reached = self._applied_at
        if workflow.patched(VERIFY_AFTER_PROPAGATION):
            reached += CONTROLS_REACH_CLIENTS
        start = _next_minute(reached)
        wait = timedelta(seconds=self.input.verify_after_seconds)
        reading = await self._reading_at(start, start + wait)
        if not reading.recovered and not reading.breached:
            # Better but not back yet (or too little traffic to tell): one more interval.
            reading = await self._reading_at(start, start + 2 * wait)
        report.reading = reading
        if reading.recovered:
            report.verification = Verification.RECOVERED
            await self.tell("verified", f"mitigation worked: {reading.summary}")
            return report
        if not reading.breached:
            report.verification = Verification.INCONCLUSIVE
            await self.tell("verification", f"inconclusive, controls kept: {reading.summary}")
            return report
        report.verification = Verification.NOT_RECOVERED
        if not self.spec.roll_back_on_failure:
            await self.tell("verification", f"no recovery, controls kept: {reading.summary}")
            return report
        undone = list(report.actions)
        await self.roll_back(undone, f"did not help: {reading.summary}")
        lines = ", ".join(ref.description for ref in undone)
        await self.tell("rolled_back", f"no recovery ({reading.summary}); rolled back: {lines}")
        return report

    async def _reading_at(self, start: datetime, end: datetime) -> SignalReading:
        await workflow.sleep(
            max(end - workflow.now(), timedelta(0)),
            summary=f"verify {self.input.trigger} at {end:%H:%M:%S} UTC",
        )
        check = SignalCheck(
            trigger=self.spec.verified_by(self.input.trigger),
            scope=self.input.scope,
            end=end,
            window_seconds=max(int((end - start).total_seconds()) - 1, 1),
        )
        reading: SignalReading = await workflow.execute_activity(
            "diagnosis.check_signal",
            check,
            result_type=SignalReading,
            **STORE_QUERY.options(),
            summary=f"re-read {self.input.trigger} on {self.input.scope}",
        )
        return reading

    # --- canary --------------------------------------------------------------------------

    async def canary(
        self,
        controls: ControlSpec | Sequence[ControlSpec],
        *,
        fraction: float = CANARY_FRACTION,
        approval: str | None = None,
        on_approval_timeout: Literal["deny", "proceed"] = "deny",
        if_too_little_traffic: Literal["revert", "promote"] = "revert",
    ) -> CanaryOutcome:
        """Put `controls` in force on `fraction` of their traffic (the same sessions for each),
        compare that slice with the rest over the verification window, and promote them to
        all the traffic only when the slice is better on what the incident is about and worse
        on nothing; else revert them. A look halfway reverts early on harm. `approval`: the
        step name whose approval (`approve`, per the spec's severities) the promotion needs.
        Too little traffic to judge after two windows: revert, or (`"promote"`) hand them to
        the whole-traffic verification, which rolls back what does not help."""
        specs = [controls] if isinstance(controls, ControlSpec) else list(controls)
        refs = []
        for spec in specs:
            spec.fraction = fraction
            refs.append(await self.apply(spec))
        described = [describe(ref.kind, ref.feature, ref.model, ref.value) for ref in refs]
        await self.tell(
            "canary", f"canary on {fraction:.0%} of the traffic: {'; '.join(described)}"
        )
        assert self._applied_at is not None
        # Raw call rows, not minute rollups: the window starts the moment the clients have it.
        start = self._applied_at + CONTROLS_REACH_CLIENTS
        wait = timedelta(seconds=self.input.verify_after_seconds)
        check = CanaryCheck(
            trigger=self.input.trigger,
            control_ids=[ref.id for ref in refs],
            feature=specs[0].feature,
            models=[spec.model for spec in specs],
            start=start,
            end=start + wait / 2,
            window_over=False,
        )
        result = await self._compare(check)
        if result.verdict != "revert":
            check.end, check.window_over = start + wait, True
            result = await self._compare(check)
            if result.too_few:  # a second window, as `verify` gives an unclear reading
                check.end = start + 2 * wait
                result = await self._compare(check)
        outcome = CanaryOutcome(
            controls=described,
            fraction=fraction,
            verdict=result.verdict,
            reason=result.reason,
            lines=list(result.lines),
            canary_calls=result.canary_calls,
            rest_calls=result.rest_calls,
        )
        self.report.canaries.append(outcome)
        numbers = "\n".join(f"• {line}" for line in result.lines)
        # Too little traffic to judge the measure it is for, and worse on nothing.
        unjudged = result.verdict == "inconclusive" and result.too_few
        promote = result.verdict == "promote" or (unjudged and if_too_little_traffic == "promote")
        if promote and approval is not None:
            asked = f"Promote to all traffic: {'; '.join(described)}"
            if not await self.approve(asked, step=approval, on_timeout=on_approval_timeout):
                promote = False
                outcome.reason = f"{result.reason}; the promotion was not approved"
        if not promote:
            await self.roll_back(refs, f"canary: {outcome.reason}")
            await self.tell("canary", f"canary reverted: {outcome.reason}\n{numbers}")
            return outcome
        for spec in specs:
            spec.fraction = None  # the same controls (same keys), on all the traffic
            await self.apply(spec)
        outcome.promoted = True
        if result.verdict != "promote":
            outcome.reason = f"{result.reason}: promoted to all traffic, the verification judges it"
        await self.tell("canary", f"canary promoted: {outcome.reason}\n{numbers}")
        return outcome

    async def _compare(self, check: CanaryCheck) -> CanaryResult:
        await workflow.sleep(
            max(check.end - workflow.now(), timedelta(0)),
            summary=f"canary window until {check.end:%H:%M:%S} UTC",
        )
        result: CanaryResult = await workflow.execute_activity(
            "canary.compare",
            check,
            result_type=CanaryResult,
            **STORE_QUERY.options(),
            summary=f"compare the canary of {len(check.control_ids)} control(s)",
        )
        return result

    # --- approval ------------------------------------------------------------------------

    async def approve(
        self,
        action: str,
        *,
        step: str,
        timeout: timedelta = APPROVAL_TIMEOUT,  # noqa: ASYNC109 (a durable timer, not asyncio's)
        on_timeout: Literal["deny", "proceed"] = "deny",
    ) -> bool:
        """Ask a person before a risky step, when the spec's `approvals` list `step` at the
        incident's severity: Approve / Deny buttons in the incident's Slack thread, or
        `pagerloop incidents approve|deny`. Whether the step may go ahead; no answer within
        `timeout` means `on_timeout`. A step not listed goes ahead at once, unasked. The ask,
        the answer and who gave it are on the incident's timeline and in the report."""
        if not self.spec.needs_approval(step, self.input.severity):
            return True
        if not self.may_mitigate:
            return False  # nothing may change yet, approved or not
        if not workflow.patched(RUNBOOK_APPROVALS):
            return True  # begun before runbooks asked: the step went ahead unasked
        desk = self._approval_desk()
        desk.asked += 1
        approval_id = f"{workflow.info().workflow_id}/approval-{desk.asked}"
        now = workflow.now()
        approval = Approval(
            approval_id,
            action,
            asked_at=now,
            expires_at=now + timeout,
            step=step,
            on_timeout=on_timeout,
        )
        self.report.approvals.append(approval)
        ask = RunbookProgress(
            "approval",
            action,
            approval_id=approval_id,
            timeout_seconds=int(timeout.total_seconds()),
            on_timeout=on_timeout,
            step=step,
            expires_at=approval.expires_at,
        )
        await self._ask(ask)
        try:
            await workflow.wait_condition(
                lambda: approval_id in desk.decisions,
                timeout=timeout,
                timeout_summary=f"approval of {step}: no answer means {on_timeout}",
            )
        except TimeoutError:
            approval.outcome, approval.approved = "expired", on_timeout == "proceed"
            approval.decided_at = workflow.now()
            if workflow.info().parent is not None:  # the kit's record is the report
                expired = replace(ask, kind="approval_expired")
                await self._signal_parent(expired)
            return approval.approved
        decision = desk.decisions[approval_id]
        approval.outcome = "approved" if decision.approved else "denied"
        approval.approved = decision.approved
        approval.decided_by, approval.reason = decision.decided_by, decision.reason
        approval.decided_at = workflow.now()
        return decision.approved

    def _approval_desk(self) -> _ApprovalDesk:
        """This run's asks and answers, kept by its signal handler (registered on the first
        ask), so that every `Steps` of the run shares one count of asks."""
        handler = workflow.get_signal_handler(APPROVAL_SIGNAL)
        if handler is None:
            desk = _ApprovalDesk()
            workflow.set_signal_handler(APPROVAL_SIGNAL, desk.decided)
            return desk
        owner = getattr(handler, "__self__", None)
        assert isinstance(owner, _ApprovalDesk), f"{APPROVAL_SIGNAL} is taken by {handler}"
        return owner

    async def _ask(self, ask: RunbookProgress) -> None:
        """The incident posts the ask and forwards the answer. Run on its own (the test kit),
        the kit's activity answers instead, by the same signal."""
        if workflow.info().parent is not None:
            await self._signal_parent(ask)
            return
        # Once: a runbook started by hand outside the kit has nobody to ask, and fails at once
        # rather than retrying an activity no worker has.
        await workflow.execute_activity(
            KIT_APPROVAL_ACTIVITY,
            ask,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=RetryPolicy(maximum_attempts=1),
        )

    async def _signal_parent(self, progress: RunbookProgress) -> None:
        parent = workflow.info().parent
        assert parent is not None
        await workflow.get_external_workflow_handle(parent.workflow_id).signal(
            PROGRESS_SIGNAL, progress
        )

    # --- telling the incident ------------------------------------------------------------

    async def tell(self, kind: str, text: str) -> None:
        """Into the incident's timeline (and so its Slack thread and Jira ticket)."""
        parent = workflow.info().parent
        if parent is None:  # run on its own (the test kit): the report is the record
            return
        await workflow.get_external_workflow_handle(parent.workflow_id).signal(
            PROGRESS_SIGNAL, RunbookProgress(kind, text)
        )


# Instrumented clients re-read the controls every 2 s (pagerloop_sdk.controls.DEFAULT_TTL);
# the rest is room for a slow poll. Calls made before then still ran without the controls.
CONTROLS_REACH_CLIENTS = timedelta(seconds=10)
VERIFY_AFTER_PROPAGATION = "verify-after-controls-reach-clients"


class _ApprovalDesk:
    def __init__(self) -> None:
        self.asked = 0
        self.decisions: dict[str, ApprovalDecision] = {}

    def decided(self, decision: ApprovalDecision) -> None:
        # The first answer counts: a second click, or one after the timeout, changes nothing.
        self.decisions.setdefault(decision.approval_id, decision)


def _next_minute(at: datetime) -> datetime:
    return at.replace(second=0, microsecond=0) + timedelta(minutes=1)
