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
from datetime import timedelta
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
    from activities.policies import CONTROL_CHANGE, VENDOR_CALL, ActivityPolicy
    from activities.slack import (
        SlackActivities,
        SlackPostRequest,
        SlackReplyRequest,
        SlackUpdateRequest,
    )
    from domain import search_attributes as sa
    from domain.escalation import DEFAULT_POLICIES, EscalationLevel, span
    from domain.incident import (
        ActionRequest,
        Breach,
        BreachReceipt,
        CarriedState,
        IncidentInput,
        IncidentResult,
        IncidentState,
        IncidentStatus,
        LaneAction,
        Recovery,
        Severity,
        SnoozeRequest,
        TimelineEntry,
    )
    from runbooks import runbook_for
    from runbooks.base import RunbookInput, RunbookProgress, RunbookReport
    from runbooks.steps import PROGRESS_SIGNAL
    from workflows.incident_machine import (
        Acknowledge,
        Acknowledged,
        AddNote,
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
        Notify,
        Opened,
        PageCalledOff,
        Paged,
        Policy,
        QuietElapsed,
        RecoveryReported,
        Refresh,
        Resolve,
        Resolved,
        RestartClock,
        RevertRunbookControls,
        RunbookFailed,
        RunbookFinished,
        RunbookProgressed,
        RunbookStarted,
        SeverityRaised,
        Show,
        SlackPosted,
        Snooze,
        Tell,
        TicketOpened,
        VerifiedAwaitingResolve,
        decide,
        next_deadline,
        next_deadline_text,
        refusal,
    )
    from workflows.lanes import Lane, compact
    from workflows.postmortem import postmortem

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
        self._policy = self._policy_for(input)
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
        # The clock starts when the incident does; `run` shows the state first.
        self._apply(Opened(), publish=False)

    def _policy_for(self, input: IncidentInput) -> Policy:
        """Each severity's escalation policy as this incident applies it (the runbook's
        escalation path describes its levels)."""
        runbook, given = self._runbook, input.notify.policies
        policies = {}
        for severity in Severity:
            policy = given.get(severity) or DEFAULT_POLICIES[severity]
            policies[str(severity)] = runbook.policy(policy) if runbook else policy
        return Policy(policies, tuple(input.notify.allowed_slack_users))

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
        self._apply(BreachReported(breach))
        state = self._state
        return BreachReceipt(state.incident_id, state.status, state.breach_count)

    @report_breach.validator
    def _validate_breach(self, breach: Breach) -> None:
        self._refuse(BreachReported(breach))

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

    @workflow.signal(name=PROGRESS_SIGNAL)
    def runbook_progress(self, progress: RunbookProgress) -> None:
        runbook = self._runbook.name if self._runbook else "runbook"
        self._apply(RunbookProgressed(progress.kind, progress.text, runbook))

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
        """What an effect means for each lane (the channels, the runbook's controls)."""
        state = self._state
        match effect:
            case Notify(level, reason):
                self._notify(level, reason)
            case Refresh():
                self._slack.push("update")
            case Tell(entry):
                said = f"by {entry.actor} via {entry.channel}: {entry.text}"
                self._slack.push("reply", text=f"*{entry.kind.replace('_', ' ')}* {said}")
                self._jira.push("comment", text=f"{entry.kind} {said}")
            case Acknowledged(via) if via != "pagerduty":  # never echo PagerDuty's own ack back
                self._pagerduty.push("acknowledge")
            case Resolved(via):
                if via != "pagerduty":
                    self._pagerduty.push("resolve")
                self._jira.push("resolve")
            case SeverityRaised(level) if level.page and not state.paged:
                self._pagerduty.push("trigger", level=level.name)
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
            self._apply(SlackPosted(ref, channel))
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
            self._apply(Paged(await paging, level))
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
                self._apply(PageCalledOff())
                return
        else:
            target = await paging
        self._apply(Paged(target, level))

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
            self._apply(TicketOpened(key))
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

    def _publish(self, state: IncidentState | None = None) -> None:
        """Mirror the state into search attributes (when they change: each upsert is a history
        event) and into the UI's current details."""
        state = state or self._state
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
        level = self._policy.level(state)
        lines = [
            f"**{state.severity} {state.trigger}** on `{state.scope}`: **{state.status}**",
            "",
            f"- level: {level.name} ({level.description})",
            f"- owner: {state.acknowledged_by or 'nobody yet'}",
            f"- next deadline: {next_deadline_text(state)}",
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
