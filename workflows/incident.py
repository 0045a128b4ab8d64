"""IncidentWorkflow: one durable incident, from detection to resolution.

Updates change state and return at once (Slack wants an answer within 3 s); the side effects
they imply (Slack message, PagerDuty events) are queued and sent by one lane per channel, so a
Slack outage never holds back the page.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.exceptions import ActivityError
from temporalio.types import MethodAsyncSingleParam

with workflow.unsafe.imports_passed_through():
    from activities.pagerduty import PagerDutyActivities, PagerDutyTrigger
    from activities.slack import SlackActivities, SlackPostRequest, SlackUpdateRequest
    from workflows import search_attributes as sa
    from workflows.incident_types import (
        ActionRequest,
        Breach,
        BreachReceipt,
        CarriedState,
        IncidentInput,
        IncidentResult,
        IncidentState,
        IncidentStatus,
        Recovery,
        TimelineEntry,
        severity_rank,
    )
    from workflows.policies import VENDOR_CALL, ActivityPolicy

# After a resolve, how long a page still being retried may go on before it is called off.
PAGE_GRACE = timedelta(seconds=30)

P = TypeVar("P")
R = TypeVar("R")


class _Lane:
    """An ordered queue of side effects for one channel, drained by its own coroutine."""

    def __init__(self, name: str, enabled: bool) -> None:
        self.name = name
        self.enabled = enabled
        self.pending: deque[str] = deque()

    def push(self, action: str) -> None:
        if self.enabled:
            self.pending.append(action)


@workflow.defn
class IncidentWorkflow:
    @workflow.init
    def __init__(self, input: IncidentInput) -> None:
        self._input = input
        self._slack = _Lane("slack", enabled=input.notify.slack_channel is not None)
        self._pagerduty = _Lane("pagerduty", enabled=input.notify.pagerduty)
        self._updates = 0
        self._published: tuple[object, ...] = ()
        if input.carried is not None:
            self._state = input.carried.state
            self._slack.pending.extend(input.carried.pending_slack)
            self._pagerduty.pending.extend(input.carried.pending_pagerduty)
            return
        self._state = IncidentState(
            incident_id=input.incident_id,
            trigger=input.trigger,
            scope=input.scope,
            severity=input.severity,
            status=IncidentStatus.DETECTED,
            opened_at=input.opened_at,
        )
        self._record("opened", f"{input.severity} {input.trigger} on {input.scope}")
        self._slack.push("post")
        self._pagerduty.push("trigger")

    @workflow.run
    async def run(self, input: IncidentInput) -> IncidentResult:
        self._publish()
        await asyncio.gather(
            self._drain(self._slack, self._slack_action),
            self._drain(self._pagerduty, self._pagerduty_action),
        )
        await workflow.wait_condition(workflow.all_handlers_finished)
        if self._state.status != IncidentStatus.RESOLVED:
            # The lanes stopped for a fresh run: carry the state and whatever is still queued.
            carried = CarriedState(
                state=self._state,
                pending_slack=list(self._slack.pending),
                pending_pagerduty=list(self._pagerduty.pending),
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
        self._publish()
        return BreachReceipt(state.incident_id, state.status, state.breach_count)

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
        return self.state()

    @report_recovery.validator
    def _validate_recovery(self, recovery: Recovery) -> None:
        self._reject_if_resolved()

    @report_breach.validator
    def _validate_breach(self, breach: Breach) -> None:
        self._reject_if_resolved()

    @workflow.update
    def acknowledge(self, request: ActionRequest) -> IncidentState:
        self._updates += 1
        state = self._state
        state.status = IncidentStatus.ACKNOWLEDGED
        state.acknowledged_by = request.user
        state.acknowledged_at = workflow.now()
        self._record("acknowledged", request.note or "acknowledged", request.user, request.channel)
        self._slack.push("update")
        self._pagerduty.push("acknowledge")
        self._publish()
        return self.state()

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
        state = self._state
        state.status = IncidentStatus.RESOLVED
        state.resolved_by = request.user
        state.resolved_at = workflow.now()
        self._record("resolved", request.note or "resolved", request.user, request.channel)
        self._slack.push("update")
        self._pagerduty.push("resolve")
        self._publish()
        return self.state()

    @resolve.validator
    def _validate_resolve(self, request: ActionRequest) -> None:
        self._reject_if_resolved()
        self._reject_if_not_allowed(request)

    @workflow.query
    def state(self) -> IncidentState:
        return replace(self._state, timeline=list(self._state.timeline))

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

    # --- side effects ----------------------------------------------------------------------

    def _time_for_a_fresh_run(self) -> bool:
        return (
            self._updates >= self._input.updates_per_run
            or workflow.info().is_continue_as_new_suggested()
        )

    async def _drain(self, lane: _Lane, perform: Callable[[str], Awaitable[None]]) -> None:
        """Perform the lane's actions in order; stop once resolved (or due for a fresh run)
        with nothing left to do."""
        while True:
            await workflow.wait_condition(
                lambda: (
                    bool(lane.pending)
                    or self._state.status == IncidentStatus.RESOLVED
                    or self._time_for_a_fresh_run()
                )
            )
            if not lane.pending:
                return
            action = lane.pending.popleft()
            try:
                await perform(action)
            except ActivityError as err:
                cause = err.cause or err
                self._record(
                    "notification_failed",
                    f"{lane.name} {action} failed: {cause}",
                    channel=lane.name,
                )

    async def _slack_action(self, action: str) -> None:
        channel = self._input.notify.slack_channel
        if channel is None:
            return
        if action == "post":
            ref = await self._activity(
                SlackActivities.post_incident,
                SlackPostRequest(channel=channel, state=self.state()),
                summary=f"Slack: post incident to {channel}",
            )
            self._state.slack_message = ref
            self._record("notified", f"Slack message posted to {channel}", channel="slack")
            return
        if self._slack.pending.count("update"):
            return  # a later update renders the same state: one call is enough
        message = self._state.slack_message
        if message is None:
            return
        await self._activity(
            SlackActivities.update_incident,
            SlackUpdateRequest(message=message, state=self.state()),
            summary=f"Slack: show {self._state.status} on the incident message",
        )

    async def _pagerduty_action(self, action: str) -> None:
        state = self._state
        if action == "trigger":
            await self._page()
        elif action == "acknowledge":
            await self._activity(
                PagerDutyActivities.acknowledge,
                state.incident_id,
                summary="PagerDuty: acknowledge",
            )
        elif action == "resolve":
            await self._activity(
                PagerDutyActivities.resolve, state.incident_id, summary="PagerDuty: resolve"
            )

    async def _page(self) -> None:
        """Trigger PagerDuty, unless the incident is resolved while PagerDuty still refuses the
        page: then stop trying (the queued resolve still goes out, in case a try got through)."""
        state = self._state
        event = PagerDutyTrigger(
            dedup_key=state.incident_id,
            summary=f"[{state.severity}] {state.summary or state.trigger}",
            source=f"pagerloop/{state.scope}",
            severity=state.severity,
            custom_details={
                "incident_id": state.incident_id,
                "trigger": str(state.trigger),
                "scope": state.scope,
                **state.metrics,
            },
            links=[{"href": self._input.notify.status_url, "text": "pagerloop status"}]
            if self._input.notify.status_url
            else [],
        )
        paging = workflow.start_activity_method(
            PagerDutyActivities.trigger,
            event,
            start_to_close_timeout=VENDOR_CALL.start_to_close,
            schedule_to_close_timeout=VENDOR_CALL.schedule_to_close,
            retry_policy=VENDOR_CALL.retry,
            summary=f"PagerDuty: trigger {state.incident_id}",
        )
        await workflow.wait_condition(lambda: paging.done() or "resolve" in self._pagerduty.pending)
        if not paging.done():
            paging.cancel()
            with contextlib.suppress(ActivityError, asyncio.CancelledError):
                await paging
            self._record("not_paged", "resolved before PagerDuty accepted the page")
            return
        await paging
        self._record("paged", "PagerDuty incident triggered", channel="pagerduty")

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
            summary=summary,
        )

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
        lines = [
            f"**{state.severity} {state.trigger}** on `{state.scope}`: **{state.status}**",
            "",
            f"- level: L{state.level}",
            f"- opened: {state.opened_at:%Y-%m-%d %H:%M:%S} UTC",
        ]
        if state.acknowledged_by:
            lines.append(f"- acknowledged by {state.acknowledged_by}")
        if state.resolved_by:
            lines.append(f"- resolved by {state.resolved_by}")
        if state.recovered_at:
            lines.append(f"- signal recovered at {state.recovered_at:%H:%M:%S} UTC")
        if state.metrics:
            lines.append("")
            lines += [f"- {name}: {value:.4g}" for name, value in state.metrics.items()]
        workflow.set_current_details("\n".join(lines))
