"""IncidentWorkflow: one durable incident, from detection to resolution, escalating L1 -> L3.

The shell around `domain.incident_machine.decide`: it turns updates, timers and the runbook
child's results into events, lets `decide` change the state, and carries out the effects.
Updates return at once (Slack wants an answer within 3 s); what they imply for each channel
(`activities/channels.py`) and for the runbook's controls goes through one ordered lane each,
drained by its own coroutine, so one vendor's outage never holds back another. The escalation
clock is a durable timer on the earliest pending deadline of the current level.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import timedelta
from functools import partial
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.common import SearchAttributeUpdate
from temporalio.exceptions import (
    ActivityError,
    CancelledError,
    ChildWorkflowError,
    WorkflowAlreadyStartedError,
)
from temporalio.types import MethodAsyncSingleParam
from temporalio.workflow import ActivityCancellationType

with workflow.unsafe.imports_passed_through():
    from activities.channels import CHANNELS, REPORTS_TO
    from activities.controls import (
        ControlActivities,
        ControlList,
        ExtendControls,
        RevertControls,
    )
    from activities.policies import CONTROL_CHANGE, STORE_QUERY, VENDOR_CALL, ActivityPolicy
    from activities.reports import ReportActivities, ReportRequest
    from domain import search_attributes as sa
    from domain.escalation import DEFAULT_POLICIES, span
    from domain.incident import (
        ActionRequest,
        Approval,
        ApprovalDecision,
        Breach,
        BreachReceipt,
        CarriedState,
        Handover,
        IncidentInput,
        IncidentResult,
        IncidentState,
        IncidentStatus,
        LaneAction,
        MergeRequest,
        NotificationPlan,
        Recovery,
        ReopenRequest,
        Severity,
        SnoozeRequest,
        TimelineEntry,
    )
    from domain.incident_machine import (
        Absorbed,
        Acknowledge,
        AddNote,
        ApprovalDecided,
        ApprovalExpired,
        ApprovalRequested,
        BreachReported,
        CancelRunbook,
        ChannelFailed,
        ControlsExtended,
        ControlsReverted,
        DeadlinePassed,
        Effect,
        Escalate,
        Event,
        ExtendRunbookControls,
        ForwardApproval,
        MergedInto,
        Opened,
        Policy,
        QuietElapsed,
        RecoveryReported,
        RelatedBreach,
        Reopened,
        Resolve,
        RestartClock,
        RevertRunbookControls,
        RunbookFailed,
        RunbookFinished,
        RunbookProgressed,
        RunbookStarted,
        Show,
        Snooze,
        VerifiedAwaitingResolve,
        adopt,
        decide,
        next_deadline,
        next_deadline_text,
        refusal,
        reopen_refusal,
    )
    from domain.lanes import Lane, compact
    from domain.report import ReportText
    from domain.workflow_names import REOPEN
    from runbooks import runbook_for
    from runbooks.base import RunbookInput, RunbookProgress, RunbookReport, runbook_link
    from runbooks.steps import APPROVAL_SIGNAL, PROGRESS_SIGNAL

TIMELINE_IN_ANSWERS = 10
# Changes to the command sequence, each behind its patch so that runs begun before it replay
# as they ran (README "Changing workflow code"):
# a run due for a fresh one hands its queued and in-flight channel work over instead of
# waiting for a vendor that may be down for hours; piled-up replies go out merged.
HAND_OVER_LANES = "hand-over-lanes-to-the-next-run"
HAND_OVER_GRACE = timedelta(seconds=10)
# The controls keep-alive counts from when they were last extended, across runs, instead of
# restarting its hour with each run (a run shorter than an hour never extended them).
KEEPALIVE_ACROSS_RUNS = "controls-keepalive-across-runs"
# L1's resolve deadline is the runbook's expected resolution time, not the severity's.
RUNBOOK_RESOLVE_DEADLINE = "runbook-expected-resolution-deadline"
# Once resolved (every lane drained, the controls reverted), the incident writes its report,
# then posts it: the Jira postmortem (the resolve no longer posts one) and the Slack summary.
INCIDENT_REPORT = "incident-report"
# A reopening run waits this long for its `reopen` update (started with it: a refused one
# leaves the run nothing to do).
REOPEN_WAIT = timedelta(minutes=1)
# How often an open incident pushes back the expiry of its runbook's controls.
CONTROLS_KEEPALIVE = timedelta(hours=1)
ZERO = timedelta(0)

P = TypeVar("P")
R = TypeVar("R")


@workflow.defn
class IncidentWorkflow:
    @workflow.init
    def __init__(self, input: IncidentInput) -> None:
        self._input = input
        plan = input.notify
        self._channels = [
            (channel, Lane(name, channel.enabled(plan))) for name, channel in CHANNELS.items()
        ]
        self._view = _ChannelView(self)
        # Incidents started before runbooks existed replay without one.
        with_runbooks = plan.runbook.enabled and workflow.patched("runbooks")
        self._hand_over = workflow.patched(HAND_OVER_LANES)
        self._grace_over = False
        self._grace: asyncio.Task[None] | None = None
        self._runbook = runbook_for(input.trigger) if with_runbooks else None
        self._controls = Lane("controls", self._runbook is not None)
        self._lanes = (*(lane for _, lane in self._channels), self._controls)
        self._runbook_active = False
        self._child: workflow.ChildWorkflowHandle[Any, RunbookReport] | None = None
        self._forwards: list[ApprovalDecision] = []
        self._updates = 0
        self._changed = False
        self._published: tuple[object, ...] = ()
        self._policy = self._policy_for(input)
        # A resolved incident's new run: it comes back once the `reopen` update is taken.
        self._awaiting_reopen = input.reopen
        if input.carried is not None:
            self._state = input.carried.state
            if self._runbook is not None and self._state.runbook is None:
                # Opened before runbooks existed, continued on code that has them: this run's
                # runbook, and so its controls' revert at resolve, are the incident's.
                self._state = replace(self._state, runbook=self._runbook.name)
            for lane in self._lanes:
                lane.pending.extend(input.carried.pending.get(lane.name, []))
            return
        self._state = IncidentState(
            incident_id=input.incident_id,
            trigger=input.trigger,
            scope=input.scope,
            severity=input.severity,
            status=IncidentStatus.DETECTED,
            opened_at=input.opened_at,
            runbook=self._runbook.name if self._runbook else None,
            runbook_url=runbook_link(None, self._runbook, plan.status_url),  # a rule's: on breach
        )
        for handover in input.absorbs:
            adopt(self._state, handover)  # opening then updates their message, pages their alert
        # The clock starts when the incident does; `run` shows the state first.
        self._apply(Opened(), publish=False)
        for handover in input.absorbs:
            self._apply(Absorbed(handover), publish=False)

    def _policy_for(self, input: IncidentInput) -> Policy:
        """Each severity's escalation policy as this incident applies it (the runbook's
        escalation path describes its levels)."""
        runbook, given = self._runbook, input.notify.policies
        deadline = runbook is not None and workflow.patched(RUNBOOK_RESOLVE_DEADLINE)
        policies = {}
        for severity in Severity:
            policy = given.get(severity) or DEFAULT_POLICIES[severity]
            if runbook is not None:
                policy = runbook.policy(policy, str(severity) if deadline else None)
            policies[str(severity)] = policy
        return Policy(policies, tuple(input.notify.allowed_slack_users))

    @workflow.run
    async def run(self, input: IncidentInput) -> IncidentResult:
        if input.reopen:
            await workflow.wait_condition(
                lambda: not self._awaiting_reopen,
                timeout=REOPEN_WAIT,
                timeout_summary="the breach that reopens this incident",
            )
            if self._awaiting_reopen:  # refused: still the resolved incident, told of nothing
                return self._result()
        self._publish()
        lanes = [
            asyncio.create_task(self._drain(lane, partial(channel.perform, incident=self._view)))
            for channel, lane in self._channels
        ]
        lanes.append(asyncio.create_task(self._drain(self._controls, self._controls_action)))
        runbook = asyncio.create_task(self._run_runbook())
        keepalive = asyncio.create_task(self._keep_controls_alive())
        await self._escalation_clock()
        if self._hand_over and self._state.status != IncidentStatus.RESOLVED:
            # Working vendors finish their queues in a moment; a failing one is not waited for.
            # Not awaited: once the queues are empty, this run ends with the timer pending.
            self._grace = asyncio.create_task(self._hand_over_after_grace())
        await runbook
        await keepalive
        await asyncio.gather(*lanes)
        await workflow.wait_condition(workflow.all_handlers_finished)
        if self._state.status != IncidentStatus.RESOLVED:
            # Due for a fresh run: carry the state and whatever is still queued.
            carried = CarriedState(
                state=self._state,
                pending={
                    lane.name: compact(lane.pending) if self._hand_over else list(lane.pending)
                    for lane in self._lanes
                },
            )
            workflow.continue_as_new(replace(input, carried=carried, absorbs=[], reopen=False))
        reporting = self._reports()
        report = await self._write_report() if reporting else None
        await self._tell_detector()
        if reporting:
            await self._post_report(report)
        return self._result()

    def _result(self) -> IncidentResult:
        state = self._state
        return IncidentResult(
            incident_id=state.incident_id,
            status=state.status,
            opened_at=state.opened_at,
            acknowledged_at=state.acknowledged_at,
            resolved_at=state.resolved_at,
            resolved_by=state.resolved_by,
            timeline=state.timeline,
        )

    # --- updates and queries -------------------------------------------------------------

    @workflow.update
    def report_breach(self, breach: Breach) -> BreachReceipt:
        self._updates += 1
        self._apply(BreachReported(breach))
        state = self._state
        return BreachReceipt(state.incident_id, state.status, state.breach_count, state.reopened)

    @report_breach.validator
    def _validate_breach(self, breach: Breach) -> None:
        self._refuse(BreachReported(breach))

    @workflow.update(name=REOPEN)
    def reopen(self, request: ReopenRequest) -> BreachReceipt:
        self._updates += 1
        self._awaiting_reopen = False
        self._apply(Reopened(request.breach))
        state = self._state
        return BreachReceipt(state.incident_id, state.status, state.breach_count, state.reopened)

    @reopen.validator
    def _validate_reopen(self, request: ReopenRequest) -> None:
        if not self._awaiting_reopen:
            raise ValueError(f"{self._state.incident_id}: this run was not started to reopen it")
        # Judged at the breach's time, as the detector's activity judged it before starting
        # this run (not seconds later, which could fall past the cooldown).
        state, breach = self._state, request.breach
        reason = reopen_refusal(state, breach, request.cooldown_seconds, breach.observed_at)
        if reason is not None:
            raise ValueError(reason)

    @workflow.update
    def report_recovery(self, recovery: Recovery) -> IncidentState:
        self._updates += 1
        self._apply(RecoveryReported(recovery))
        return self._answer()

    @report_recovery.validator
    def _validate_recovery(self, recovery: Recovery) -> None:
        self._refuse(RecoveryReported(recovery))

    @workflow.update
    def acknowledge(self, request: ActionRequest) -> IncidentState:
        self._updates += 1
        self._apply(Acknowledge(request))
        return self._answer()

    @acknowledge.validator
    def _validate_acknowledge(self, request: ActionRequest) -> None:
        self._refuse(Acknowledge(request))

    @workflow.update
    def resolve(self, request: ActionRequest) -> IncidentState:
        self._updates += 1
        self._apply(Resolve(request))
        return self._answer()

    @resolve.validator
    def _validate_resolve(self, request: ActionRequest) -> None:
        self._refuse(Resolve(request))

    @workflow.update
    def escalate(self, request: ActionRequest) -> IncidentState:
        self._updates += 1
        self._apply(Escalate(request))
        return self._answer()

    @escalate.validator
    def _validate_escalate(self, request: ActionRequest) -> None:
        self._refuse(Escalate(request))

    @workflow.update
    def snooze(self, request: SnoozeRequest) -> IncidentState:
        self._updates += 1
        self._apply(Snooze(request))
        return self._answer()

    @snooze.validator
    def _validate_snooze(self, request: SnoozeRequest) -> None:
        self._refuse(Snooze(request))

    @workflow.update
    def add_note(self, request: ActionRequest) -> IncidentState:
        self._updates += 1
        self._apply(AddNote(request))
        return self._answer()

    @add_note.validator
    def _validate_note(self, request: ActionRequest) -> None:
        self._refuse(AddNote(request))

    @workflow.update
    def merge_into(self, request: MergeRequest) -> Handover:
        self._updates += 1
        self._apply(MergedInto(request))
        return self._state.handover(request.hand_over)

    @merge_into.validator
    def _validate_merge(self, request: MergeRequest) -> None:
        self._refuse(MergedInto(request))

    @workflow.update
    def absorb(self, handover: Handover) -> IncidentState:
        self._updates += 1
        self._apply(Absorbed(handover))
        return self._answer()

    @absorb.validator
    def _validate_absorb(self, handover: Handover) -> None:
        self._refuse(Absorbed(handover))

    @workflow.update
    def report_related(self, breach: Breach) -> BreachReceipt:
        self._updates += 1
        self._apply(RelatedBreach(breach))
        state = self._state
        return BreachReceipt(state.incident_id, state.status, state.breach_count, state.reopened)

    @report_related.validator
    def _validate_related(self, breach: Breach) -> None:
        self._refuse(RelatedBreach(breach))

    @workflow.update
    async def decide_approval(self, decision: ApprovalDecision) -> IncidentState:
        """A person approves or denies a runbook step that asked (Slack buttons, the CLI); the
        runbook waiting for it hears the answer."""
        self._updates += 1
        self._apply(ApprovalDecided(decision))
        await self._forward_approvals()
        return self._answer()

    @decide_approval.validator
    def _validate_approval(self, decision: ApprovalDecision) -> None:
        self._refuse(ApprovalDecided(decision))
        approval = self._state.approval(decision.approval_id)
        if approval is not None and approval.pending and workflow.now() >= approval.expires_at:
            # The runbook has stopped waiting: an answer now would be shown and then ignored.
            raise ValueError(
                f"{decision.approval_id}: too late, the ask expired at "
                f"{approval.expires_at:%H:%M:%S} UTC ({approval.on_timeout})"
            )
        if self._child is None:
            raise ValueError(f"{self._state.incident_id}: no runbook is running to ask")

    @workflow.signal(name=PROGRESS_SIGNAL)
    def runbook_progress(self, progress: RunbookProgress) -> None:
        runbook = self._runbook.name if self._runbook else "runbook"
        if progress.kind == "approval":
            asked_at = workflow.now()
            approval = Approval(
                progress.approval_id,
                progress.text,
                asked_at=asked_at,
                expires_at=progress.expires_at
                or asked_at + timedelta(seconds=progress.timeout_seconds),
                step=progress.step,
                on_timeout=progress.on_timeout or "deny",
            )
            self._apply(ApprovalRequested(approval, runbook))
        elif progress.kind == "approval_expired":
            self._apply(ApprovalExpired(progress.approval_id))
        else:
            self._apply(RunbookProgressed(progress.kind, progress.text, runbook))

    @workflow.query
    def state(self) -> IncidentState:
        return replace(self._state, timeline=list(self._state.timeline))

    def _answer(self) -> IncidentState:
        """What an update answers with: the state and the timeline's last entries. Every
        answer is written to the history; a whole timeline in each would grow it with the
        square of the updates (the `state` query has it all)."""
        return replace(self._state, timeline=self._state.timeline[-TIMELINE_IN_ANSWERS:])

    @workflow.query
    def timeline(self) -> list[TimelineEntry]:
        return list(self._state.timeline)

    # --- decisions -------------------------------------------------------------------------

    def _apply(self, event: Event, publish: bool = True) -> None:
        """Decide, then carry out the effects in order, and show the state that results."""
        self._state, effects = decide(self._state, event, self._policy, workflow.now())
        for effect in effects:
            self._perform(effect)
        if publish:
            self._publish()

    def _refuse(self, event: Event) -> None:
        reason = refusal(self._state, event, self._policy)
        if reason is not None:
            raise ValueError(reason)

    def _perform(self, effect: Effect) -> None:
        """What an effect means for each channel's lane, then for the incident itself."""
        for channel, lane in self._channels:
            if lane.enabled:
                channel.react(effect, self._view, lane)
        match effect:
            case Show(shown):
                self._publish(shown)
            case RestartClock():
                self._changed = True
            case CancelRunbook() if self._child is not None:
                self._child.cancel()  # its controls are reverted once it has stopped
            case RevertRunbookControls(reason):
                self._controls.push("revert", text=reason)
            case ExtendRunbookControls():
                self._controls.push("extend")
            case ForwardApproval(decision):
                self._forwards.append(decision)

    async def _forward_approvals(self) -> None:
        """Tell the running runbook the answers just decided (a runbook that has ended since
        has nothing left to hear)."""
        while self._forwards:
            decision = self._forwards.pop(0)
            if self._child is None:
                continue
            try:
                await self._child.signal(APPROVAL_SIGNAL, decision)
            except Exception as err:  # the child ended meanwhile: its approvals are withdrawn
                workflow.logger.info("approval %s not forwarded: %s", decision.approval_id, err)

    async def _escalation_clock(self) -> None:
        while not self._finished():
            upcoming = next_deadline(self._state)
            self._changed = False
            if upcoming is None:
                await workflow.wait_condition(lambda: self._changed or self._finished())
                continue
            at, what = upcoming
            level = self._state.level_name
            try:
                await workflow.wait_condition(
                    lambda: self._changed or self._finished(),
                    timeout=max(at - workflow.now(), timedelta(0)),
                    timeout_summary=f"{level}: {what} by {at:%H:%M:%S} UTC",
                )
            except TimeoutError:
                self._apply(DeadlinePassed(what))

    def _finished(self) -> bool:
        return self._state.status == IncidentStatus.RESOLVED or self._time_for_a_fresh_run()

    def _handing_over(self) -> bool:
        """Due for a fresh run and past the grace: the next run takes over the channel work
        not done yet."""
        return (
            self._grace_over
            and self._state.status != IncidentStatus.RESOLVED
            and self._time_for_a_fresh_run()
        )

    async def _hand_over_after_grace(self) -> None:
        await workflow.sleep(HAND_OVER_GRACE, summary="hand the channel work over to a fresh run")
        self._grace_over = True

    def _time_for_a_fresh_run(self) -> bool:
        if self._runbook_active:  # a running child would be cut off with this run
            return False
        return (
            self._updates >= self._input.updates_per_run
            or workflow.info().is_continue_as_new_suggested()
        )

    # --- the runbook -----------------------------------------------------------------------

    async def _run_runbook(self) -> None:
        """Diagnose at once; mitigate at once when the runbook may act before an ack, else
        once acknowledged; then act on the verification: keep, or escalate."""
        spec = self._runbook
        if spec is None:
            return
        if self._state.runbook_phase == "done":
            if self._state.verified_at is not None and not self._resolved():
                await self._auto_resolve()  # carried over from the previous run
            return
        if self._state.runbook_phase == "":
            if self._resolved():
                return
            may = spec.mitigate_before_ack or self._state.acknowledged_by is not None
            if not await self._runbook_child(may_mitigate=may):
                return
            if may:
                await self._after_verification()
                return
        await workflow.wait_condition(
            lambda: self._state.acknowledged_by is not None or self._finished()
        )
        # Never start a child once a fresh run is due: the lanes may already have stopped.
        if self._state.acknowledged_by is None or self._resolved() or self._time_for_a_fresh_run():
            return  # resolved, or due for a fresh run that waits again
        if await self._runbook_child(may_mitigate=True):
            await self._after_verification()

    async def _runbook_child(self, may_mitigate: bool) -> bool:
        """Run the runbook as a child workflow; whether it reported (rather than failed)."""
        spec, plan = self._runbook, self._input.notify.runbook
        assert spec is not None
        self._apply(RunbookStarted(may_mitigate))
        state = self._state
        runbook_input = RunbookInput(
            incident_id=state.incident_id,
            trigger=str(state.trigger),
            scope=state.scope,
            severity=str(state.severity),
            opened_at=state.opened_at,
            metrics=dict(state.metrics),
            summary=state.summary,
            feature_priorities=dict(plan.feature_priorities),
            fallbacks=dict(plan.fallbacks),
            output_checks=dict(plan.output_checks),
            golden_set=plan.golden_set,
            may_mitigate=may_mitigate,
            verify_after_seconds=plan.verify_after_seconds,
            diagnosis_window_seconds=plan.diagnosis_window_seconds,
        )
        self._runbook_active = True
        try:
            self._child = await workflow.start_child_workflow(
                spec.workflow.run,
                runbook_input,
                id=f"{state.incident_id}-runbook-{state.runbook_runs}",
                static_summary=f"{spec.name} for {state.incident_id}",
            )
            if self._resolved():  # resolved while it was starting
                self._child.cancel()
            report: RunbookReport = await self._child
        except (ChildWorkflowError, WorkflowAlreadyStartedError, asyncio.CancelledError) as err:
            cause = err.cause if isinstance(err, ChildWorkflowError) else None
            self._apply(RunbookFailed(spec.name, str(cause or err)))
            return False
        finally:
            self._runbook_active = False
            self._child = None
        self._apply(
            RunbookFinished(
                controls=tuple(ref.description for ref in report.actions),
                verification=str(report.verification) if may_mitigate else None,
                reading=report.reading.summary if report.reading else "",
            )
        )
        return True

    async def _after_verification(self) -> None:
        """A verified mitigation waits to be resolved: by itself after a quiet period, or by
        a person."""
        if self._state.verified_at is not None and not self._resolved():
            await self._auto_resolve()

    async def _keep_controls_alive(self) -> None:
        """Controls expire by themselves (so none outlives a lost incident), but not while
        their incident is open: every hour it pushes their expiry back."""
        if self._runbook is None:
            return
        await workflow.wait_condition(lambda: bool(self._state.controls) or self._finished())
        across_runs = not self._finished() and workflow.patched(KEEPALIVE_ACROSS_RUNS)
        while not self._finished():
            wait = CONTROLS_KEEPALIVE
            kept_at = self._state.controls_kept_at
            if across_runs and kept_at is not None:
                wait = max(kept_at + CONTROLS_KEEPALIVE - workflow.now(), ZERO)
            try:
                await workflow.wait_condition(
                    self._finished,
                    timeout=wait,
                    timeout_summary="keep the runbook's controls in force",
                )
            except TimeoutError:
                if self._state.controls and not self._controls.underway("extend"):
                    self._apply(ControlsExtended())

    async def _auto_resolve(self) -> None:
        """Resolve once the signal has been quiet (no breach reported) for the policy's quiet
        period after a verified mitigation; without one, the resolve is left to a person."""
        quiet_seconds = self._policy.of(self._state).auto_resolve_quiet_seconds
        if quiet_seconds is None:
            self._apply(VerifiedAwaitingResolve())
            return
        quiet = timedelta(seconds=quiet_seconds)
        while True:
            state = self._state
            seen = state.last_breach_at
            last = max(state.verified_at or state.opened_at, seen or state.opened_at)
            try:
                await workflow.wait_condition(
                    lambda seen=seen: self._state.last_breach_at != seen or self._finished(),  # type: ignore[misc]
                    timeout=max(last + quiet - workflow.now(), timedelta(0)),
                    timeout_summary=f"auto-resolve after {span(quiet_seconds)} quiet",
                )
            except TimeoutError:
                self._apply(QuietElapsed(quiet_seconds))
                return
            if self._finished():
                return  # resolved by a person, or a fresh run carries on waiting

    def _resolved(self) -> bool:
        return self._state.status == IncidentStatus.RESOLVED

    # --- side effects ----------------------------------------------------------------------

    async def _drain(self, lane: Lane, perform: Callable[[LaneAction], Awaitable[None]]) -> None:
        """Perform the lane's actions in order; stop once finished with nothing left to do."""
        while True:
            await workflow.wait_condition(lambda: bool(lane.pending) or self._finished())
            if not lane.pending or self._handing_over():
                return
            action = lane.in_flight = lane.take() if self._hand_over else lane.pending.popleft()
            try:
                if not self._hand_over:
                    await perform(action)
                elif not await self._unless_handing_over(perform(action)):
                    lane.put_back(action)
            except ActivityError as err:
                self._apply(ChannelFailed(lane.name, action.kind, str(err.cause or err)))
            finally:
                lane.in_flight = None

    async def _unless_handing_over(self, work: Awaitable[None]) -> bool:
        """Do `work`, unless a fresh run becomes due first: then call it off (an attempt in
        flight may still land) and say whether it happened."""
        task = asyncio.ensure_future(work)
        await workflow.wait_condition(lambda: task.done() or self._handing_over())
        if not task.done():
            task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return False
        except ActivityError as err:
            if isinstance(err.cause, CancelledError):
                return False
            raise
        return True

    async def _controls_action(self, action: LaneAction) -> None:
        state = self._state
        if action.kind == "extend":
            await self._activity(
                ControlActivities.extend,
                ExtendControls(state.incident_id),
                summary="keep the runbook's controls in force",
                policy=CONTROL_CHANGE,
            )
            return
        if action.kind != "revert":
            return
        # A runbook still changing controls finishes (or is cancelled) first.
        await workflow.wait_condition(lambda: not self._runbook_active)
        reverted: ControlList = await self._activity(
            ControlActivities.revert,
            RevertControls(state.incident_id, reason=action.text),
            summary="revert the runbook's controls",
            policy=CONTROL_CHANGE,
        )
        self._apply(ControlsReverted(tuple(ref.description for ref in reverted.controls)))

    async def _activity(
        self,
        method: MethodAsyncSingleParam[Any, P, R],
        arg: P,
        *,
        summary: str,
        policy: ActivityPolicy = VENDOR_CALL,
    ) -> R:
        return await workflow.execute_activity_method(
            method,
            arg,
            start_to_close_timeout=policy.start_to_close,
            schedule_to_close_timeout=policy.schedule_to_close,
            retry_policy=policy.retry,
            cancellation_type=self._cancellation(),
            summary=summary,
        )

    def _cancellation(self) -> ActivityCancellationType:
        """Handing over waits to learn whether an attempt in flight landed, so the next run
        neither repeats it nor drops it."""
        if self._hand_over:
            return ActivityCancellationType.WAIT_CANCELLATION_COMPLETED
        return ActivityCancellationType.TRY_CANCEL

    def _reports(self) -> bool:
        """Whether this incident writes its report at resolve: the deployment has the report
        activity, and the run decides on code that writes one (a run that resolved before
        replays without). Decided once per run (the patch's answer is kept)."""
        return self._input.notify.report and workflow.patched(INCIDENT_REPORT)

    async def _write_report(self) -> ReportText | None:
        """Figures from the stores, saved with the incident; a report that cannot be written
        is noted on the timeline and never keeps the incident from ending."""
        try:
            text: ReportText = await self._activity(
                ReportActivities.build,
                ReportRequest(self._state),
                summary="write the incident report",
                policy=STORE_QUERY,
            )
        except ActivityError as err:
            self._apply(ChannelFailed("report", "build", str(err.cause or err)))
            return None
        return text

    async def _post_report(self, report: ReportText | None) -> None:
        """The report where people followed the incident, each channel on its own (one that is
        down holds back no other). A merged incident has none: the one it joined tells."""
        if self._state.merged_into:
            return

        async def post(name: str) -> None:
            try:
                await REPORTS_TO[name].post_report(report, self._view)
            except ActivityError as err:
                self._apply(ChannelFailed(name, "report", str(err.cause or err)))

        lanes = [lane for _, lane in self._channels if lane.enabled]
        await asyncio.gather(*(post(lane.name) for lane in lanes if lane.name in REPORTS_TO))

    async def _tell_detector(self) -> None:
        detector = self._input.detector_workflow_id
        if detector is None:
            return
        try:
            await workflow.get_external_workflow_handle(detector).signal(
                "incident_closed", self._state.episode_key
            )
        except Exception as err:  # the detector is optional; the incident is over regardless
            workflow.logger.info("detector %s not told: %s", detector, err)

    # --- bookkeeping -----------------------------------------------------------------------

    def _publish(self, state: IncidentState | None = None) -> None:
        """Mirror the state into search attributes (when they change: each upsert is a history
        event) and into the UI's current details."""
        state = state or self._state
        published: tuple[object, ...] = (
            state.status,
            state.severity,
            state.trigger,
            state.scope,
            state.level,
        )
        if state.merged_into:
            published += (state.merged_into,)
        if published != self._published:
            self._published = published
            updates: list[SearchAttributeUpdate[Any]] = [
                sa.INCIDENT_STATUS.value_set(str(state.status)),
                sa.INCIDENT_SEVERITY.value_set(str(state.severity)),
                sa.INCIDENT_TRIGGER.value_set(str(state.trigger)),
                sa.INCIDENT_SCOPE.value_set(state.scope),
                sa.INCIDENT_LEVEL.value_set(state.level),
            ]
            if state.merged_into:
                updates.append(sa.INCIDENT_MERGED_INTO.value_set(state.merged_into))
            workflow.upsert_search_attributes(updates)
        level = self._policy.level(state)
        lines = [
            f"**{state.severity} {state.trigger}** on `{state.scope}`: **{state.status}**",
            "",
            f"- level: {level.name} ({level.description})",
            f"- owner: {state.acknowledged_by or 'nobody yet'}",
            f"- next deadline: {next_deadline_text(state)}",
            f"- opened: {state.opened_at:%Y-%m-%d %H:%M:%S} UTC",
        ]
        if state.resolved_by and not state.merged_into:
            lines.append(f"- resolved by {state.resolved_by}")
        lines += [f"- {line}" for line in state.correlation_lines()]
        if state.recovered_at:
            lines.append(f"- signal recovered at {state.recovered_at:%H:%M:%S} UTC")
        if state.jira_issue:
            lines.append(f"- ticket: {state.jira_issue}")
        if state.runbook:
            verdict = f", {state.verification}" if state.verification else ""
            lines.append(
                f"- runbook: {state.runbook} ({state.runbook_phase or 'starting'}{verdict})"
            )
            lines += [f"  - in force: {control}" for control in state.controls]
        if state.metrics:
            lines.append("")
            lines += [f"- {name}: {value:.4g}" for name, value in state.metrics.items()]
        workflow.set_current_details("\n".join(lines))


class _ChannelView:
    """What a channel sees of the incident it serves (`activities.channel.Incident`)."""

    def __init__(self, workflow_: IncidentWorkflow) -> None:
        self._workflow = workflow_

    @property
    def state(self) -> IncidentState:
        return self._workflow._state

    @property
    def plan(self) -> NotificationPlan:
        return self._workflow._input.notify

    @property
    def policy(self) -> Policy:
        return self._workflow._policy

    def lane(self, name: str) -> Lane:
        return next(lane for lane in self._workflow._lanes if lane.name == name)

    def apply(self, event: Event) -> None:
        self._workflow._apply(event)

    def shown(self) -> IncidentState:
        return replace(self._workflow._state, timeline=[])

    async def call(
        self,
        method: MethodAsyncSingleParam[Any, P, R],
        arg: P,
        *,
        summary: str,
        policy: ActivityPolicy = VENDOR_CALL,
    ) -> R:
        return await self._workflow._activity(method, arg, summary=summary, policy=policy)

    def reports(self) -> bool:
        return self._workflow._reports()

    def start(
        self, method: MethodAsyncSingleParam[Any, P, R], arg: P, *, summary: str
    ) -> workflow.ActivityHandle[R]:
        return workflow.start_activity_method(
            method,
            arg,
            **VENDOR_CALL.options(),
            cancellation_type=self._workflow._cancellation(),
            summary=summary,
        )
