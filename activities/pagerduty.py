"""PagerDuty Events API v2: trigger, acknowledge and resolve, keyed by the incident id.

Each escalation level may page its own service (a routing key per level in the escalation
policy file, kept here in the worker: keys never enter workflow history); a level paging the
default key shares the incident id as dedup key, another service gets `<incident id>/<level>`.
`pdpyras` stays behind this module so that moving to the `pagerduty` package is a one-file change.
"""

from __future__ import annotations

import asyncio
import contextlib
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from pydantic import SecretStr
from temporalio import activity, workflow
from temporalio.exceptions import ActivityError

from activities.vendor_http import VendorErrors, request_unencodable

with warnings.catch_warnings():
    # pdpyras announces its deprecation on import; the swap is tracked, not news per process.
    warnings.simplefilter("ignore")
    import pdpyras

from activities.channel import Incident
from activities.finite import json_safe
from config.escalation import Escalation
from domain.incident import IncidentState, LaneAction, NotificationPlan, PagedTarget, Severity
from domain.incident_machine import (
    Acknowledged,
    Effect,
    Merged,
    Notify,
    PageCalledOff,
    Paged,
    Resolved,
    SeverityRaised,
)
from domain.lanes import Lane

# PagerDuty's payload.severity values for our severities.
PD_SEVERITY = {
    Severity.SEV1: "critical",
    Severity.SEV2: "error",
    Severity.SEV3: "warning",
    Severity.SEV4: "info",
}


class PagerDutyPermanentError(Exception):
    """PagerDuty rejected the event (bad routing key, invalid event), or it could not even be
    encoded: retrying cannot help."""


ERRORS = VendorErrors("PagerDuty", PagerDutyPermanentError, default_retry_after=5)


def make_session(routing_key: str, events_url: str) -> pdpyras.EventsAPISession:
    session = pdpyras.EventsAPISession(routing_key)
    session.url = events_url.rstrip("/")
    # One immediate attempt per activity try: Temporal's retry policy owns the backoff,
    # and pdpyras would otherwise sleep in the worker thread forever on a 429.
    session.retry = {429: 1, 500: 1, 502: 1, 503: 1, 504: 1}
    session.sleep_timer = 0.0
    session.max_network_attempts = 0
    # Shorter than the activity's timeout: a hung call must not outlive its attempt in a thread.
    session.timeout = 10
    return session


def _translate(exc: pdpyras.PDClientError, what: str) -> Exception:
    cause = exc.__cause__
    # pdpyras reports every requests error as a network error, including requests' refusal to
    # encode the body (`allow_nan=False`); only a bad response body is worth another try.
    if request_unencodable(cause):
        return ERRORS.unencodable(what, cause)
    response = getattr(exc, "response", None)
    if response is None:
        return ERRORS.answer(what, 0, detail=str(exc))
    return ERRORS.answer(
        what, response.status_code, response.headers.get("Retry-After"), detail=str(exc)
    )


@dataclass
class PageRequest:
    incident_id: str
    level: str
    severity: Severity
    summary: str
    source: str
    custom_details: dict[str, Any] = field(default_factory=dict)
    links: list[dict[str, str]] = field(default_factory=list)
    # Alerts taken over from merged incidents: one on the same PagerDuty service is triggered
    # again (same dedup key) instead of opening a PagerDuty incident of its own.
    adopted: list[PagedTarget] = field(default_factory=list)


@dataclass
class PageUpdate:
    targets: list[PagedTarget]


class PagerDutyActivities:
    """Registered even when PagerDuty is off, so its steps fail cleanly onto the timeline."""

    def __init__(
        self,
        events_url: str,
        default_key: SecretStr | None,
        escalation: Escalation | None = None,
    ) -> None:
        self._events_url = events_url
        self._default_key = default_key
        self._escalation = escalation or Escalation()
        self._sessions: dict[str, pdpyras.EventsAPISession] = {}

    def _key(self, severity: str, level: str) -> SecretStr:
        key = self._escalation.routing_key(severity, level, self._default_key)
        if key is None:
            raise PagerDutyPermanentError(
                "PagerDuty is off: PAGERLOOP_PAGERDUTY_ROUTING_KEY is not set"
            )
        return key

    def _session(self, key: SecretStr) -> pdpyras.EventsAPISession:
        secret = key.get_secret_value()
        if secret not in self._sessions:
            self._sessions[secret] = make_session(secret, self._events_url)
        return self._sessions[secret]

    def target(self, incident_id: str, severity: str, level: str) -> PagedTarget:
        key = self._key(severity, level)
        shared = self._default_key is not None and key == self._default_key
        dedup_key = incident_id if shared else f"{incident_id}/{level}"
        return PagedTarget(dedup_key, severity, level)

    @activity.defn(name="pagerduty.trigger")
    async def trigger(self, request: PageRequest) -> PagedTarget:
        target = self.target(request.incident_id, str(request.severity), request.level)
        routing = self._key(target.severity, target.level)
        for adopted in request.adopted:
            if self._key(adopted.severity, adopted.level) == routing:
                target = PagedTarget(adopted.dedup_key, target.severity, target.level)
                break
        session = self._session(routing)

        def send() -> None:
            try:
                session.trigger(
                    summary=request.summary[:1024],
                    source=request.source,
                    dedup_key=target.dedup_key,
                    severity=PD_SEVERITY[request.severity],
                    # Whatever the stores say (an infinite cost), the page must be valid JSON.
                    custom_details=json_safe(request.custom_details),
                    links=json_safe(request.links) or None,
                )
            except pdpyras.PDClientError as exc:
                raise _translate(exc, "trigger") from exc
            except (TypeError, ValueError) as exc:  # building or encoding the event
                raise ERRORS.unencodable("trigger", exc) from exc

        await asyncio.to_thread(send)
        return target

    @activity.defn(name="pagerduty.acknowledge")
    async def acknowledge(self, update: PageUpdate) -> None:
        await self._send_all(update, "acknowledge")

    @activity.defn(name="pagerduty.resolve")
    async def resolve(self, update: PageUpdate) -> None:
        await self._send_all(update, "resolve")

    async def _send_all(self, update: PageUpdate, action: str) -> None:
        for target in update.targets:
            session = self._session(self._key(target.severity, target.level))

            def send(
                session: pdpyras.EventsAPISession = session, key: str = target.dedup_key
            ) -> None:
                try:
                    session.send_event(action, dedup_key=key)
                except pdpyras.PDClientError as exc:
                    raise _translate(exc, action) from exc
                except (TypeError, ValueError) as exc:
                    raise ERRORS.unencodable(action, exc) from exc

            await asyncio.to_thread(send)


# --- the channel: what the incident's effects mean for PagerDuty -------------------------------


class PagerDutyChannel:
    """A page when a level that pages is reached (or a worse severity's level pages), and
    PagerDuty told of acknowledgements and the resolve it did not send itself."""

    name = "pagerduty"

    def enabled(self, plan: NotificationPlan) -> bool:
        return plan.pagerduty

    def react(self, effect: Effect, incident: Incident, lane: Lane) -> None:
        match effect:
            case Notify(level) if level.target(self.name) is not None:
                lane.push("trigger", level=level.name)
            case SeverityRaised(level) if level.target(self.name) and not incident.state.paged:
                lane.push("trigger", level=level.name)
            case Acknowledged(via) if via != self.name:  # never echo PagerDuty's own ack back
                lane.push("acknowledge")
            case Resolved(via) if via != self.name:
                lane.push("resolve")
            case Merged():
                # The incident it joined pages for the problem now: what was not handed over
                # (a page that landed after the merge) is resolved, a page in flight called off.
                lane.push("resolve")

    async def perform(self, action: LaneAction, incident: Incident) -> None:
        state = incident.state
        if action.kind == "trigger":
            if state.merged_into:
                return
            await self._page(action.level, incident)
        elif action.kind in ("acknowledge", "resolve") and (targets := _own(state)):
            method = (
                PagerDutyActivities.acknowledge
                if action.kind == "acknowledge"
                else PagerDutyActivities.resolve
            )
            await incident.call(method, PageUpdate(targets), summary=f"PagerDuty: {action.kind}")

    async def _page(self, level: str, incident: Incident) -> None:
        """Trigger PagerDuty, unless the incident is resolved while PagerDuty still refuses the
        page: then stop trying (the queued resolve still goes out, in case a try got through)."""
        state, plan = incident.state, incident.plan
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
            links=page_links(state, plan),
            adopted=[t for t in state.paged if not _is_own(t.dedup_key, state.incident_id)],
        )
        paging = incident.start(
            PagerDutyActivities.trigger,
            request,
            summary=f"PagerDuty: trigger {state.incident_id} at {level}",
        )
        lane = incident.lane(self.name)
        try:
            await workflow.wait_condition(lambda: paging.done() or lane.queued("resolve"))
        except asyncio.CancelledError:  # handed over to a fresh run: it pages unless this did
            paging.cancel()
            incident.apply(Paged(await paging, level))
            return
        if not paging.done():
            # A try in flight usually lands in a moment; only a failing PagerDuty is given up on.
            with contextlib.suppress(asyncio.TimeoutError):
                await workflow.wait_condition(
                    paging.done,
                    timeout=timedelta(seconds=plan.page_grace_seconds),
                    timeout_summary="page in flight",
                )
        if not paging.done():
            paging.cancel()
            try:
                target = await paging
            except (ActivityError, asyncio.CancelledError):
                incident.apply(PageCalledOff())
                return
        else:
            target = await paging
        incident.apply(Paged(target, level))


def page_links(state: IncidentState, plan: NotificationPlan) -> list[dict[str, str]]:
    """The event's `links` (Events API v2: `{href, text}` each, shown on the PagerDuty
    incident): the runbook first, the one thing a paged responder opens, then the status page."""
    links = [{"href": state.runbook_url, "text": "Runbook"}] if state.runbook_url else []
    if plan.status_url:
        links.append({"href": plan.status_url, "text": "pagerloop status"})
    return links


def _is_own(dedup_key: str, incident_id: str) -> bool:
    return dedup_key == incident_id or dedup_key.startswith(f"{incident_id}/")


def _own(state: IncidentState) -> list[PagedTarget]:
    """The alerts this incident answers for: not those it handed over to the incident it was
    merged into (a page landing late on the same dedup key is that incident's alert)."""
    handed = {t.dedup_key for t in state.handed_over.paged} if state.handed_over else set()
    return [t for t in state.paged if t.dedup_key not in handed]


PAGERDUTY = PagerDutyChannel()
