"""The toolkit a runbook is written with: diagnosis queries, controls, telling the incident,
and verify-or-roll-back. Runs inside the runbook's workflow (every call is an activity or a
timer, so the whole runbook is in the incident's history)."""

from __future__ import annotations

from datetime import datetime, timedelta

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
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
    from domain.scopes import OTHER
    from runbooks.base import (
        Priority,
        RunbookInput,
        RunbookProgress,
        RunbookReport,
        RunbookSpec,
        Verification,
    )

PROGRESS_SIGNAL = "runbook_progress"


class Steps:
    def __init__(self, spec: RunbookSpec, input: RunbookInput) -> None:
        self.spec = spec
        self.input = input
        self.report = RunbookReport(runbook=spec.name)
        self._applied_at: datetime | None = None

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
        return result

    def found(self, finding: str) -> None:
        self.report.findings.append(finding)

    def priority(self, feature: str) -> Priority:
        value = self.input.feature_priorities.get(feature, Priority.NORMAL)
        return Priority(value) if value in Priority.__members__.values() else Priority.NORMAL

    async def tell_diagnosis(self) -> None:
        findings = self.report.findings or ["nothing stood out"]
        await self.tell("diagnosis", "\n".join(f"• {line}" for line in findings))

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
        if all(known.key != ref.key for known in self.report.actions):
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


def _next_minute(at: datetime) -> datetime:
    return at.replace(second=0, microsecond=0) + timedelta(minutes=1)
