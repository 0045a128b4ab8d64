"""PagerDuty Events API v2: trigger, acknowledge and resolve, keyed by the incident id.

`pdpyras` stays behind this module so that moving to the `pagerduty` package is a one-file change.
"""

from __future__ import annotations

import asyncio
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

with warnings.catch_warnings():
    # pdpyras announces its deprecation on import; the swap is tracked, not news per process.
    warnings.simplefilter("ignore")
    import pdpyras

from workflows.incident_types import Severity

# PagerDuty's payload.severity values for our severities.
PD_SEVERITY = {
    Severity.SEV1: "critical",
    Severity.SEV2: "error",
    Severity.SEV3: "warning",
    Severity.SEV4: "info",
}


class PagerDutyPermanentError(Exception):
    """PagerDuty rejected the event (bad routing key, invalid event): retrying cannot help."""


def make_session(routing_key: str, events_url: str) -> pdpyras.EventsAPISession:
    session = pdpyras.EventsAPISession(routing_key)
    session.url = events_url.rstrip("/")
    # One immediate attempt per activity try: Temporal's retry policy owns the backoff,
    # and pdpyras would otherwise sleep in the worker thread forever on a 429.
    session.retry = {429: 1, 500: 1, 502: 1, 503: 1, 504: 1}
    session.sleep_timer = 0.0
    session.max_network_attempts = 0
    # Shorter than the activity's 30 s: a hung call must not outlive its attempt in a thread.
    session.timeout = 10
    return session


def _translate(exc: pdpyras.PDClientError, what: str) -> Exception:
    response = getattr(exc, "response", None)
    status = response.status_code if response is not None else 0
    if status == 429:
        retry_after = int(response.headers.get("Retry-After", "5")) if response is not None else 5
        return ApplicationError(
            f"PagerDuty throttled {what}; retrying after {retry_after}s",
            type="PagerDutyThrottled",
            next_retry_delay=timedelta(seconds=retry_after),
        )
    if status in (400, 401, 403, 404):
        return PagerDutyPermanentError(f"PagerDuty rejected {what} (HTTP {status}): {exc}")
    return ApplicationError(f"PagerDuty failed {what}: {exc}", type="PagerDutyError")


@dataclass
class PagerDutyTrigger:
    dedup_key: str
    summary: str
    source: str
    severity: Severity
    custom_details: dict[str, Any] = field(default_factory=dict)
    links: list[dict[str, str]] = field(default_factory=list)


def trigger(session: pdpyras.EventsAPISession, event: PagerDutyTrigger) -> str:
    try:
        dedup_key: str = session.trigger(
            summary=event.summary[:1024],
            source=event.source,
            dedup_key=event.dedup_key,
            severity=PD_SEVERITY[event.severity],
            custom_details=event.custom_details,
            links=event.links or None,
        )
    except pdpyras.PDClientError as exc:
        raise _translate(exc, "trigger") from exc
    return dedup_key


def acknowledge(session: pdpyras.EventsAPISession, dedup_key: str) -> None:
    try:
        session.acknowledge(dedup_key)
    except pdpyras.PDClientError as exc:
        raise _translate(exc, "acknowledge") from exc


def resolve(session: pdpyras.EventsAPISession, dedup_key: str) -> None:
    try:
        session.resolve(dedup_key)
    except pdpyras.PDClientError as exc:
        raise _translate(exc, "resolve") from exc


class PagerDutyActivities:
    """Registered even when PagerDuty is off, so its steps fail cleanly onto the timeline."""

    def __init__(self, session: pdpyras.EventsAPISession | None) -> None:
        self._session = session

    def _require_session(self) -> pdpyras.EventsAPISession:
        if self._session is None:
            raise PagerDutyPermanentError(
                "PagerDuty is off: PAGERLOOP_PAGERDUTY_ROUTING_KEY is not set"
            )
        return self._session

    @activity.defn(name="pagerduty.trigger")
    async def trigger(self, event: PagerDutyTrigger) -> str:
        return await asyncio.to_thread(trigger, self._require_session(), event)

    @activity.defn(name="pagerduty.acknowledge")
    async def acknowledge(self, dedup_key: str) -> None:
        await asyncio.to_thread(acknowledge, self._require_session(), dedup_key)

    @activity.defn(name="pagerduty.resolve")
    async def resolve(self, dedup_key: str) -> None:
        await asyncio.to_thread(resolve, self._require_session(), dedup_key)
