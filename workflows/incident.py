"""IncidentWorkflow: one durable incident, from detection to resolution, escalating L1 -> L3.

Updates change state and return at once (Slack wants an answer within 3 s); the side effects
they imply go through one ordered lane per channel (Slack, PagerDuty, Jira), each drained by
its own coroutine, so one vendor's outage never holds back another. The escalation clock is a
durable timer on the earliest pending deadline of the current level.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.exceptions import (
    ActivityError,
    CancelledError,
    ChildWorkflowError,
    WorkflowAlreadyStartedError,
)
from temporalio.types import MethodAsyncSingleParam
from temporalio.workflow import ActivityCancellationType

with workflow.unsafe.imports_passed_through():
    from activities.controls import (
        ControlActivities,
        ControlList,
        ExtendControls,
        RevertControls,
    )
    from activities.jira import JiraActivities, JiraComment, JiraResolution, JiraTicket
    from activities.pagerduty import PagerDutyActivities, PageRequest, PageUpdate
    from activities.slack import (
        SlackActivities,
        SlackPostRequest,
        SlackReplyRequest,
        SlackUpdateRequest,
    )
    from runbooks import runbook_for
    from runbooks.base import RunbookInput, RunbookProgress, RunbookReport, Verification
    from runbooks.steps import PROGRESS_SIGNAL
    from workflows import search_attributes as sa
    from workflows.escalation import (
        DEFAULT_POLICIES,
        Deadlines,
        EscalationLevel,
        EscalationPolicy,
        enter_level,
        snooze,
        span,
    )
    from workflows.incident_types import (
        ActionRequest,
        Breach,
        BreachReceipt,
        CarriedState,
        IncidentInput,
        IncidentResult,
        IncidentState,
        IncidentStatus,
        LaneAction,
        PagedTarget,
        Recovery,
        SnoozeRequest,
        TimelineEntry,
        severity_rank,
    )
    from workflows.lanes import Lane, compact
    from workflows.policies import CONTROL_CHANGE, VENDOR_CALL, ActivityPolicy
    from workflows.postmortem import postmortem

MAX_SNOOZE_MINUTES = 24 * 60
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
# How often an open incident pushes back the expiry of its runbook's controls.
CONTROLS_KEEPALIVE = timedelta(hours=1)
ZERO = timedelta(0)
# Timeline kinds told in the Slack thread and on the Jira ticket.
TOLD = {"acknowledged", "escalated", "reminder", "snoozed", "note", "severity_raised",
        "recovered", "resolved", "diagnosis", "mitigation", "verified", "verification",
        "rolled_back", "controls_reverted", "controls_kept", "runbook_failed",
        "proposed"}  # fmt: skip

P = TypeVar("P")
R = TypeVar("R")


@workflow.defn
class IncidentWorkflow:
    @workflow.init
    def __init__(self, input: IncidentInput) -> None:
        self._input = input
        plan = input.notify
        self._slack = Lane("slack", plan.slack_channel is not None)
        self._pagerduty = Lane("pagerduty", plan.pagerduty)
        self._jira = Lane("jira", plan.jira)
        # Incidents started before runbooks existed replay without one.
        with_runbooks = plan.runbook.enabled and workflow.patched("runbooks")
        self._hand_over = workflow.patched(HAND_OVER_LANES)
        self._grace_over = False
        self._grace: asyncio.Task[None] | None = None
        self._runbook = runbook_for(input.trigger) if with_runbooks else None
        self._controls = Lane("controls", self._runbook is not None)
        self._lanes = (self._slack, self._pagerduty, self._jira, self._controls)
        self._runbook_active = False
        self._child: workflow.ChildWorkflowHandle[Any, RunbookReport] | None = None
        self._updates = 0
        self._changed = False
        self._published: tuple[object, ...] = ()
        self._remind_for = ""
        if input.carried is not None:
            self._state = input.carried.state
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
        )
        self._record("opened", f"{input.severity} {input.trigger} on {input.scope}")
        self._enter_level(1, workflow.now(), reason="")  # the clock starts when the incident does

    @workflow.run
    async def run(self, input: IncidentInput) -> IncidentResult:
        self._publish()
        lanes = [
            asyncio.create_task(self._drain(lane, perform))
            for lane, perform in (
                (self._slack, self._slack_action),
                (self._pagerduty, self._pagerduty_action),
                (self._jira, self._jira_action),
                (self._controls, self._controls_action),
            )
        ]
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
            workflow.continue_as_new(replace(input, carried=carried))
        await self._tell_detector()
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
        state = self._state
        state.breach_count += 1
        state.last_breach_at = breach.observed_at
        state.metrics = dict(breach.metrics)
        state.summary = breach.summary
        if state.breach_count == 1:
            self._record("breach", breach.summary, actor="detector", channel="detector")
        elif state.recovered_at is not None:
            self._record("breach", f"breaching again: {breach.summary}", "detector", "detector")
        state.recovered_at = None
        if severity_rank(breach.severity) > severity_rank(state.severity):
            self._record(
                "severity_raised",
                f"{state.severity} -> {breach.severity}: {breach.summary}",
                actor="detector",
                channel="detector",
            )
            state.severity = breach.severity
            self._slack.push("update")
            # A worse severity may page where the milder one did not.
            level = self._policy().level(state.level)
            if level.page and not state.paged:
                self._pagerduty.push("trigger", level=level.name)
            self._changed = True
        self._publish()
        return BreachReceipt(state.incident_id, state.status, state.breach_count)

    @report_breach.validator
    def _validate_breach(self, breach: Breach) -> None:
        self._reject_if_resolved()

    @workflow.update
    def report_recovery(self, recovery: Recovery) -> IncidentState:
        self._updates += 1
        state = self._state
        if state.recovered_at is None:
            state.recovered_at = recovery.observed_at
            text = recovery.summary or f"{recovery.trigger} back to normal on {recovery.scope}"
            self._record("recovered", text, actor="detector", channel="detector")
            self._slack.push("update")
            self._publish()
        return self._answer()

    @report_recovery.validator
    def _validate_recovery(self, recovery: Recovery) -> None:
        self._reject_if_resolved()

    @workflow.update
    def acknowledge(self, request: ActionRequest) -> IncidentState:
        self._updates += 1
        state = self._state
        if state.status == IncidentStatus.DETECTED:
            state.status = IncidentStatus.ACKNOWLEDGED
        state.acknowledged_by = request.user
        state.acknowledged_at = workflow.now()
        state.ack_by = None
        if self._remind_for == "acknowledged":
            state.remind_at, self._remind_for = None, ""
        self._record("acknowledged", request.note or "acknowledged", request.user, request.channel)
        self._slack.push("update")
        if request.channel != "pagerduty":  # never echo PagerDuty's own ack back to it
            self._pagerduty.push("acknowledge")
        self._changed = True
        self._publish()
        return self._answer()

    @acknowledge.validator
    def _validate_acknowledge(self, request: ActionRequest) -> None:
        self._reject_if_resolved()
        self._reject_if_not_allowed(request)
        state = self._state
        if state.acknowledged_by is not None and state.acknowledged_at is not None:
            raise ValueError(
                f"{state.incident_id} was already acknowledged by {state.acknowledged_by} "
                f"at {state.acknowledged_at:%Y-%m-%d %H:%M:%S} UTC"
            )

    @workflow.update
    def resolve(self, request: ActionRequest) -> IncidentState:
        self._updates += 1
        self._resolve(request)
        return self._answer()

    def _resolve(self, request: ActionRequest) -> None:
        state = self._state
        state.status = IncidentStatus.RESOLVED
        state.resolved_by = request.user
        state.resolved_at = workflow.now()
        state.ack_by = state.resolve_by = state.remind_at = None
        self._record("resolved", request.note or "resolved", request.user, request.channel)
        self._slack.push("update")
        if request.channel != "pagerduty":
            self._pagerduty.push("resolve")
        self._jira.push("resolve")
        if self._child is not None:
            self._child.cancel()  # its controls are reverted below once it has stopped
        if request.keep_controls and state.controls:
            self._record("controls_kept", ", ".join(state.controls), request.user, request.channel)
        elif self._runbook is not None:
            self._controls.push("revert", text=f"resolved by {request.user}")
        self._changed = True
        self._publish()

    @resolve.validator
    def _validate_resolve(self, request: ActionRequest) -> None:
        self._reject_if_resolved()
        self._reject_if_not_allowed(request)

    @workflow.update
    def escalate(self, request: ActionRequest) -> IncidentState:
        self._updates += 1
        reason = f"escalated by {request.user}" + (f": {request.note}" if request.note else "")
        self._escalate(reason, actor=request.user, channel=request.channel)
        return self._answer()

    @escalate.validator
    def _validate_escalate(self, request: ActionRequest) -> None:
        self._reject_if_resolved()
        self._reject_if_not_allowed(request)

    @workflow.update
    def snooze(self, request: SnoozeRequest) -> IncidentState:
        self._updates += 1
        state = self._state
        now = workflow.now()
        pushed = snooze(self._deadlines(), now, request.minutes)
        state.ack_by, state.resolve_by, state.remind_at = (
            pushed.ack_by,
            pushed.resolve_by,
            pushed.remind_at,
        )
        text = f"snoozed {request.minutes} min: next deadline {self._next_text()}"
        self._record("snoozed", text, request.user, request.channel)
        self._slack.push("update")
        self._changed = True
        self._publish()
        return self._answer()

    @snooze.validator
    def _validate_snooze(self, request: SnoozeRequest) -> None:
        self._reject_if_resolved()
        self._reject_if_not_allowed(ActionRequest(request.user, request.channel))
        if not 1 <= request.minutes <= MAX_SNOOZE_MINUTES:
            raise ValueError(f"snooze between 1 and {MAX_SNOOZE_MINUTES} minutes")

    @workflow.update
    def add_note(self, request: ActionRequest) -> IncidentState:
        self._updates += 1
        self._record("note", request.note, request.user, request.channel)
        self._publish()
        return self._answer()

    @add_note.validator
    def _validate_note(self, request: ActionRequest) -> None:
        self._reject_if_resolved()
        self._reject_if_not_allowed(request)
        if not request.note.strip():
            raise ValueError("a note needs some text")

    @workflow.signal(name=PROGRESS_SIGNAL)
    def runbook_progress(self, progress: RunbookProgress) -> None:
        runbook = self._runbook.name if self._runbook else "runbook"
        if progress.kind == "diagnosis":
            self._state.diagnosis = progress.text
        elif progress.kind == "mitigation":  # one "• control" per line
            self._state.controls = [line.removeprefix("• ") for line in progress.text.splitlines()]
            self._slack.push("update")
        elif progress.kind == "rolled_back":
            self._state.controls = []
            self._slack.push("update")
        self._record(progress.kind, progress.text, actor=f"runbook:{runbook}", channel="runbook")
        self._publish()

    @workflow.query
    def state(self) -> IncidentState:
        return replace(self._state, timeline=list(self._state.timeline))

    def _answer(self) -> IncidentState:
        """What an update answers with: the state and the timeline's last entries. Every
        answer is written to the history; a whole timeline in each would grow it with the
        square of the updates (the `state` query has it all)."""
        return replace(self._state, timeline=self._state.timeline[-TIMELINE_IN_ANSWERS:])

    def _without_timeline(self) -> IncidentState:
        """The state a Slack message renders, which shows no timeline."""
        return replace(self._state, timeline=[])

    @workflow.query
    def timeline(self) -> list[TimelineEntry]:
        return list(self._state.timeline)

    # --- validation ------------------------------------------------------------------------

    def _reject_if_resolved(self) -> None:
        state = self._state
        if state.status == IncidentStatus.RESOLVED and state.resolved_at is not None:
            raise ValueError(
                f"{state.incident_id} is already resolved (by {state.resolved_by} "
                f"at {state.resolved_at:%Y-%m-%d %H:%M:%S} UTC)"
            )

    def _reject_if_not_allowed(self, request: ActionRequest) -> None:
        allowed = self._input.notify.allowed_slack_users
        if request.channel == "slack" and allowed and request.user not in allowed:
            raise ValueError(
                f"<@{request.user}> is not allowed to act on incidents "
                "(PAGERLOOP_SLACK_ALLOWED_USERS)"
            )

    # --- escalation ------------------------------------------------------------------------

    def _policy(self) -> EscalationPolicy:
        severity = str(self._state.severity)
        policy = self._input.notify.policies.get(severity) or DEFAULT_POLICIES[severity]
        return self._runbook.policy(policy) if self._runbook else policy

    def _deadlines(self) -> Deadlines:
        state = self._state
        return Deadlines(state.opened_at, state.ack_by, state.resolve_by, state.remind_at)

    def _next_text(self) -> str:
        upcoming = self._deadlines().next()
        if upcoming is None:
            return "none"
        at, what = upcoming
        return f"{what} by {at:%H:%M} UTC"

    def _enter_level(self, number: int, at: datetime, reason: str) -> None:
        """Move to level `number` and tell its targets."""
        state = self._state
        level = self._policy().level(number)
        state.level, state.level_name = number, level.name
        deadlines = enter_level(level, at, acknowledged=state.acknowledged_by is not None)
        state.ack_by, state.resolve_by, state.remind_at = (
            deadlines.ack_by,
            deadlines.resolve_by,
            None,
        )
        self._remind_for = ""
        if reason:
            self._record("escalated", f"to {level.name} ({level.description}): {reason}")
        self._notify(level, reason or "")

    def _notify(self, level: EscalationLevel, reason: str) -> None:
        state = self._state
        if level.slack:
            if state.slack_message is None and not self._slack.underway("post"):
                self._slack.push("post")
            else:
                self._slack.push("update")
            channel = level.slack_channel
            if channel and channel != self._input.notify.slack_channel:
                self._slack.push("notify", text=reason or state.summary, level=channel)
        if level.page:
            self._pagerduty.push("trigger", level=level.name)
        if level.jira and state.jira_issue is None and not self._jira.underway("open"):
            self._jira.push("open", text=level.jira_project or self._input.notify.jira_project)

    def _escalate(self, reason: str, actor: str = "pagerloop", channel: str = "workflow") -> None:
        state = self._state
        policy = self._policy()
        now = workflow.now()
        if state.level < policy.top:
            self._enter_level(state.level + 1, now, reason)
        else:
            self._remind(reason, actor, channel)
        self._changed = True
        self._publish()

    def _remind(self, reason: str, actor: str = "pagerloop", channel: str = "workflow") -> None:
        """At the top level: tell its targets again, and again after the repeat interval."""
        state = self._state
        policy = self._policy()
        now = workflow.now()
        self._remind_for = "acknowledged" if state.acknowledged_by is None else "resolved"
        state.ack_by = state.resolve_by = None
        state.remind_at = now + timedelta(seconds=policy.repeat_interval_seconds)
        self._record("reminder", f"still not {self._remind_for} at {state.level_name}: {reason}",
                     actor, channel)  # fmt: skip
        self._notify(policy.level(state.level), reason)

    async def _escalation_clock(self) -> None:
        while not self._finished():
            upcoming = self._deadlines().next()
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
                self._deadline_passed(what)

    def _deadline_passed(self, what: str) -> None:
        state = self._state
        level = self._policy().level(state.level)
        if what == "reminder":
            self._remind("reminder interval elapsed")
            self._publish()
            return
        timeout = (
            level.ack_timeout_seconds if what == "acknowledged" else level.resolve_timeout_seconds
        )
        self._escalate(f"not {what} within {span(timeout)} at {state.level_name}")

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
        spec, state = self._runbook, self._state
        if spec is None:
            return
        if state.runbook_phase == "done":
            if state.verified_at is not None and state.status != IncidentStatus.RESOLVED:
                await self._auto_resolve()  # carried over from the previous run
            return
        if state.runbook_phase == "":
            if state.status == IncidentStatus.RESOLVED:
                return
            may = spec.mitigate_before_ack or state.acknowledged_by is not None
            report = await self._runbook_child(may_mitigate=may)
            if report is None:
                return
            if may:
                await self._conclude(report)
                return
            state.runbook_phase = "diagnosed"
        await workflow.wait_condition(lambda: state.acknowledged_by is not None or self._finished())
        # Never start a child once a fresh run is due: the lanes may already have stopped.
        if (
            state.acknowledged_by is None
            or state.status == IncidentStatus.RESOLVED
            or self._time_for_a_fresh_run()
        ):
            return  # resolved, or due for a fresh run that waits again
        report = await self._runbook_child(may_mitigate=True)
        if report is not None:
            await self._conclude(report)

    async def _runbook_child(self, may_mitigate: bool) -> RunbookReport | None:
        spec, state, plan = self._runbook, self._state, self._input.notify.runbook
        assert spec is not None
        state.runbook_runs += 1
        state.runbook_phase = "running"
        if may_mitigate:
            state.status = IncidentStatus.MITIGATING
            state.mitigation_started_at = workflow.now()
            self._slack.push("update")
            self._publish()
        runbook_input = RunbookInput(
            incident_id=state.incident_id,
            trigger=str(state.trigger),
            scope=state.scope,
            severity=str(state.severity),
            opened_at=state.opened_at,
            metrics=dict(state.metrics),
            summary=state.summary,
            feature_priorities=dict(plan.feature_priorities),
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
            if state.status == IncidentStatus.RESOLVED:  # resolved while it was starting
                self._child.cancel()
            report: RunbookReport = await self._child
        except (ChildWorkflowError, WorkflowAlreadyStartedError, asyncio.CancelledError) as err:
            state.runbook_phase = "done"
            self._step_back()
            if state.status != IncidentStatus.RESOLVED:
                cause = err.cause if isinstance(err, ChildWorkflowError) else None
                self._record("runbook_failed", f"{spec.name}: {cause or err}")
                # Whatever it had put in force before failing is taken out again.
                self._controls.push("revert", text=f"{spec.name} failed")
            return None
        finally:
            self._runbook_active = False
            self._child = None
        state.controls = [ref.description for ref in report.actions]
        state.controls_kept_at = workflow.now()
        return report

    async def _conclude(self, report: RunbookReport) -> None:
        state = self._state
        state.runbook_phase = "done"
        state.verification = str(report.verification)
        if report.verification != Verification.RECOVERED and not report.actions:
            self._step_back()  # nothing in force any more: no longer mitigating
        if state.status == IncidentStatus.RESOLVED:
            return
        if report.verification == Verification.NOT_RECOVERED:
            summary = report.reading.summary if report.reading else "signal still breached"
            self._escalate(f"the runbook's mitigation did not help ({summary})")
            return
        if report.verification != Verification.RECOVERED:
            self._slack.push("update")
            self._publish()
            return
        state.verified_at = workflow.now()
        self._slack.push("update")
        self._publish()
        await self._auto_resolve()

    async def _keep_controls_alive(self) -> None:
        """Controls expire by themselves (so none outlives a lost incident), but not while
        their incident is open: every hour it pushes their expiry back."""
        if self._runbook is None:
            return
        state = self._state
        await workflow.wait_condition(lambda: bool(state.controls) or self._finished())
        across_runs = not self._finished() and workflow.patched(KEEPALIVE_ACROSS_RUNS)
        while not self._finished():
            wait = CONTROLS_KEEPALIVE
            if across_runs and state.controls_kept_at is not None:
                wait = max(state.controls_kept_at + CONTROLS_KEEPALIVE - workflow.now(), ZERO)
            try:
                await workflow.wait_condition(
                    self._finished,
                    timeout=wait,
                    timeout_summary="keep the runbook's controls in force",
                )
            except TimeoutError:
                if state.controls and not self._controls.underway("extend"):
                    self._controls.push("extend")
                    state.controls_kept_at = workflow.now()

    def _step_back(self) -> None:
        """Mitigation is over without a verified recovery: back to where the incident was."""
        state = self._state
        if state.status == IncidentStatus.MITIGATING:
            acked = state.acknowledged_by is not None
            state.status = IncidentStatus.ACKNOWLEDGED if acked else IncidentStatus.DETECTED
            self._publish()

    async def _auto_resolve(self) -> None:
        """Resolve once the signal has been quiet (no breach reported) for the policy's quiet
        period after a verified mitigation; without one, the resolve is left to a person."""
        quiet_seconds = self._policy().auto_resolve_quiet_seconds
        state = self._state
        if quiet_seconds is None:
            if not any(entry.kind == "proposed" for entry in state.timeline):
                self._record("proposed", "mitigation verified: resolve when satisfied")
            return
        quiet = timedelta(seconds=quiet_seconds)
        while True:
            seen = state.last_breach_at
            last = max(state.verified_at or state.opened_at, seen or state.opened_at)
            try:
                await workflow.wait_condition(
                    lambda seen=seen: state.last_breach_at != seen or self._finished(),  # type: ignore[misc]
                    timeout=max(last + quiet - workflow.now(), timedelta(0)),
                    timeout_summary=f"auto-resolve after {span(quiet_seconds)} quiet",
                )
            except TimeoutError:
                if state.status == IncidentStatus.RESOLVED:
                    return
                # The controls are what keeps the signal quiet: reverting them now would bring
                # the breach straight back. They stay until they expire or someone reverts them.
                note = (
                    f"auto-resolved: mitigation verified, quiet for {span(quiet_seconds)}; "
                    "controls kept until they expire (pagerloop controls revert ID)"
                )
                self._resolve(
                    ActionRequest("pagerloop", channel="workflow", note=note, keep_controls=True)
                )
                return
            if self._finished():
                return  # resolved by a person, or a fresh run carries on waiting

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
                reason = f"{lane.name} {action.kind} failed: {err.cause or err}"
                self._record("notification_failed", reason, channel=lane.name)
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

    async def _slack_action(self, action: LaneAction) -> None:
        channel = self._input.notify.slack_channel
        state = self._state
        if channel is None:
            return
        if action.kind == "post":
            ref = await self._activity(
                SlackActivities.post_incident,
                SlackPostRequest(channel=channel, state=self._without_timeline()),
                summary=f"Slack: post incident to {channel}",
            )
            state.slack_message = ref
            self._record("notified", f"Slack message posted to {channel}", channel="slack")
        elif action.kind == "update":
            if self._slack.queued("update") or state.slack_message is None:
                return  # a later update renders the same state: one call is enough
            await self._activity(
                SlackActivities.update_incident,
                SlackUpdateRequest(message=state.slack_message, state=self._without_timeline()),
                summary=f"Slack: show {state.status} at {state.level_name}",
            )
        elif action.kind == "reply" and state.slack_message is not None:
            await self._activity(
                SlackActivities.reply,
                SlackReplyRequest(message=state.slack_message, text=action.text),
                summary="Slack: thread reply",
            )
        elif action.kind == "notify":
            await self._activity(
                SlackActivities.notify,
                SlackPostRequest(
                    channel=action.level, state=self._without_timeline(), note=action.text
                ),
                summary=f"Slack: tell {action.level}",
            )

    async def _pagerduty_action(self, action: LaneAction) -> None:
        state = self._state
        if action.kind == "trigger":
            await self._page(action.level)
        elif action.kind in ("acknowledge", "resolve") and state.paged:
            method = (
                PagerDutyActivities.acknowledge
                if action.kind == "acknowledge"
                else PagerDutyActivities.resolve
            )
            await self._activity(
                method, PageUpdate(list(state.paged)), summary=f"PagerDuty: {action.kind}"
            )

    async def _page(self, level: str) -> None:
        """Trigger PagerDuty, unless the incident is resolved while PagerDuty still refuses the
        page: then stop trying (the queued resolve still goes out, in case a try got through)."""
        state = self._state
        request = PageRequest(
            incident_id=state.incident_id,
            level=level,
            severity=state.severity,
            summary=f"[{state.severity}] {state.summary or state.trigger} ({level})",
            source=f"pagerloop/{state.scope}",
            custom_details={
                "incident_id": state.incident_id,
                "trigger": str(state.trigger),
                "scope": state.scope,
                "level": level,
                **state.metrics,
            },
            links=[{"href": self._input.notify.status_url, "text": "pagerloop status"}]
            if self._input.notify.status_url
            else [],
        )
        paging = workflow.start_activity_method(
            PagerDutyActivities.trigger,
            request,
            start_to_close_timeout=VENDOR_CALL.start_to_close,
            schedule_to_close_timeout=VENDOR_CALL.schedule_to_close,
            retry_policy=VENDOR_CALL.retry,
            cancellation_type=self._cancellation(),
            summary=f"PagerDuty: trigger {state.incident_id} at {level}",
        )
        try:
            await workflow.wait_condition(
                lambda: paging.done() or self._pagerduty.queued("resolve")
            )
        except asyncio.CancelledError:  # handed over to a fresh run: it pages unless this did
            paging.cancel()
            self._paged(await paging, level)
            return
        if not paging.done():
            # A try in flight usually lands in a moment; only a failing PagerDuty is given up on.
            with contextlib.suppress(asyncio.TimeoutError):
                await workflow.wait_condition(
                    paging.done,
                    timeout=timedelta(seconds=self._input.notify.page_grace_seconds),
                    timeout_summary="page in flight",
                )
        if not paging.done():
            paging.cancel()
            try:
                target = await paging
            except (ActivityError, asyncio.CancelledError):
                self._record("not_paged", "resolved before PagerDuty accepted the page")
                return
        else:
            target = await paging
        self._paged(target, level)

    def _paged(self, target: PagedTarget, level: str) -> None:
        state = self._state
        if all(known.dedup_key != target.dedup_key for known in state.paged):
            state.paged.append(target)
        self._record("paged", f"PagerDuty triggered at {level}", channel="pagerduty")

    async def _jira_action(self, action: LaneAction) -> None:
        state = self._state
        if action.kind == "open":
            key = await self._activity(
                JiraActivities.open_ticket,
                JiraTicket(
                    incident_id=state.incident_id,
                    project=action.text,
                    summary=f"[{state.severity}] {state.trigger} on {state.scope}",
                    description=(
                        f"{state.summary}\n\nOpened by pagerloop at L{state.level}."
                        + (f"\n\nRunbook diagnosis:\n{state.diagnosis}" if state.diagnosis else "")
                    ),
                ),
                summary=f"Jira: open a ticket in {action.text}",
            )
            state.jira_issue = key
            self._record("ticket", f"Jira ticket {key}", channel="jira")
        elif action.kind == "comment" and state.jira_issue is not None:
            await self._activity(
                JiraActivities.comment,
                JiraComment(state.jira_issue, action.text),
                summary=f"Jira: comment on {state.jira_issue}",
            )
        elif action.kind == "resolve" and state.jira_issue is not None:
            await self._activity(
                JiraActivities.resolve,
                JiraResolution(state.jira_issue, postmortem(self.state())),
                summary=f"Jira: postmortem and done on {state.jira_issue}",
            )

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
        state.controls = []
        if reverted.controls:
            text = ", ".join(ref.description for ref in reverted.controls)
            self._record("controls_reverted", text, channel="controls")

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

    async def _tell_detector(self) -> None:
        detector = self._input.detector_workflow_id
        if detector is None:
            return
        try:
            await workflow.get_external_workflow_handle(detector).signal(
                "incident_closed", self._state.incident_id
            )
        except Exception as err:  # the detector is optional; the incident is over regardless
            workflow.logger.info("detector %s not told: %s", detector, err)

    # --- bookkeeping -----------------------------------------------------------------------

    def _record(
        self, kind: str, text: str, actor: str = "pagerloop", channel: str = "workflow"
    ) -> None:
        now: datetime = workflow.now()
        self._state.timeline.append(
            TimelineEntry(at=now, kind=kind, text=text, actor=actor, channel=channel)
        )
        if kind in TOLD:
            line = f"*{kind.replace('_', ' ')}* by {actor} via {channel}: {text}"
            self._slack.push("reply", text=line)
            self._jira.push("comment", text=f"{kind} by {actor} via {channel}: {text}")

    def _publish(self) -> None:
        """Mirror the state into search attributes (when they change: each upsert is a history
        event) and into the UI's current details."""
        state = self._state
        published = (state.status, state.severity, state.trigger, state.scope, state.level)
        if published != self._published:
            self._published = published
            workflow.upsert_search_attributes(
                [
                    sa.INCIDENT_STATUS.value_set(str(state.status)),
                    sa.INCIDENT_SEVERITY.value_set(str(state.severity)),
                    sa.INCIDENT_TRIGGER.value_set(str(state.trigger)),
                    sa.INCIDENT_SCOPE.value_set(state.scope),
                    sa.INCIDENT_LEVEL.value_set(state.level),
                ]
            )
        level = self._policy().level(state.level)
        lines = [
            f"**{state.severity} {state.trigger}** on `{state.scope}`: **{state.status}**",
            "",
            f"- level: {level.name} ({level.description})",
            f"- owner: {state.acknowledged_by or 'nobody yet'}",
            f"- next deadline: {self._next_text()}",
            f"- opened: {state.opened_at:%Y-%m-%d %H:%M:%S} UTC",
        ]
        if state.resolved_by:
            lines.append(f"- resolved by {state.resolved_by}")
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
