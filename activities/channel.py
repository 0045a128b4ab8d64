"""What a notification channel is to an incident.

A channel lives in one module (`activities/<name>.py`): its activity class and client, its
rendering, its error mapping, and a `Channel` object saying what each of the incident's effects
means for it (`react`: the actions it queues on its own lane) and how an action is carried out
(`perform`: the activities it calls, run by the incident workflow). `activities/channels.py`
lists them. The incident workflow gives each channel an `Incident`: the state, the plan, its
lanes and a way to call activities; a channel never holds the workflow itself.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

from temporalio import workflow
from temporalio.types import MethodAsyncSingleParam

from activities.policies import VENDOR_CALL, ActivityPolicy
from domain.escalation import ChannelTarget
from domain.incident import IncidentState, LaneAction, NotificationPlan
from domain.incident_machine import Effect, Event, Policy
from domain.lanes import Lane
from domain.report import ReportText

P = TypeVar("P")
R = TypeVar("R")


class Incident(Protocol):
    """What a channel sees of the incident workflow it serves."""

    @property
    def state(self) -> IncidentState: ...

    @property
    def plan(self) -> NotificationPlan: ...

    @property
    def policy(self) -> Policy: ...

    def lane(self, name: str) -> Lane: ...

    def apply(self, event: Event) -> None:
        """Tell the incident what happened (a message posted, a page accepted...)."""

    def shown(self) -> IncidentState:
        """The state as channels render it: without the timeline (it would grow every
        activity input in the history)."""

    async def call(
        self,
        method: MethodAsyncSingleParam[Any, P, R],
        arg: P,
        *,
        summary: str,
        policy: ActivityPolicy = VENDOR_CALL,
    ) -> R:
        """Run an activity with the incident's cancellation rules."""

    def start(
        self, method: MethodAsyncSingleParam[Any, P, R], arg: P, *, summary: str
    ) -> workflow.ActivityHandle[R]:
        """Start an activity (VENDOR_CALL) the channel waits for on its own terms."""

    def reports(self) -> bool:
        """Whether the incident writes its report when it resolves (then the report is its
        postmortem, posted by `ReportChannel.post_report` once written)."""


class Channel(Protocol):
    name: str

    def enabled(self, plan: NotificationPlan) -> bool:
        """Whether this deployment has the channel at all (its lane drops what is pushed)."""

    def react(self, effect: Effect, incident: Incident, lane: Lane) -> None:
        """Queue on `lane` what `effect` means for this channel, if anything."""

    async def perform(self, action: LaneAction, incident: Incident) -> None:
        """Carry out one queued action (its activities raise ActivityError on failure)."""


class ReportChannel(Protocol):
    """A channel that tells of the incident report once the incident is over (after every
    lane has drained). `report` is None when it could not be written."""

    name: str

    async def post_report(self, report: ReportText | None, incident: Incident) -> None: ...


def reached_targets(incident: Incident, channel: str) -> list[ChannelTarget]:
    """The channel's targets on every level the incident has reached so far."""
    policy = incident.policy.of(incident.state)
    levels = policy.levels[: incident.state.level]
    return [t for level in levels if (t := level.target(channel)) is not None]


def told_before(incident: Incident, channel: str, to: str = "") -> bool:
    """Whether the timeline says this channel delivered (to `to`, when given)."""
    return any(
        entry.kind == "notified"
        and entry.channel == channel
        and (not to or entry.text.endswith(f" {to}"))
        for entry in incident.state.timeline
    )
