"""A local PagerDuty Events API v2 (`POST /v2/enqueue`).

Answers as PagerDuty does: 202 `{"status": "success", "message": "Event processed",
"dedup_key": …}`, 400 `{"status": "invalid event", "message": …, "errors": […]}` for a bad event,
and 429 when throttled. Tracks each alert's state by dedup_key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import uuid
from collections import deque
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes.server import FakeServer, read_body

SEVERITIES = {"critical", "error", "warning", "info"}
STATE_AFTER = {"trigger": "triggered", "acknowledge": "acknowledged", "resolve": "resolved"}


def event_errors(event: dict[str, Any]) -> list[str]:
    errors = []
    if not event.get("routing_key"):
        errors.append("'routing_key' is missing or blank")
    action = event.get("event_action")
    if action not in STATE_AFTER:
        errors.append("'event_action' is invalid (must be trigger, acknowledge or resolve)")
    dedup_key = event.get("dedup_key")
    if dedup_key is not None and (not isinstance(dedup_key, str) or len(dedup_key) > 255):
        errors.append("'dedup_key' must be a string of at most 255 characters")
    if action in ("acknowledge", "resolve") and not dedup_key:
        errors.append(f"'dedup_key' is required for event_action={action}")
    if action == "trigger":
        payload = event.get("payload") or {}
        if not payload.get("summary"):
            errors.append("'payload.summary' is missing or blank")
        elif len(payload["summary"]) > 1024:
            errors.append("'payload.summary' is longer than 1024 characters")
        if not payload.get("source"):
            errors.append("'payload.source' is missing or blank")
        if payload.get("severity") not in SEVERITIES:
            errors.append("'payload.severity' is invalid")
    return errors


class FakePagerDuty(FakeServer):
    def __init__(self) -> None:
        super().__init__([Route("/v2/enqueue", self._enqueue, methods=["POST"])])
        self.invalid_routing_keys: set[str] = set()
        self.faults: deque[tuple[int, dict[str, str]]] = deque()
        self.alerts: dict[str, str] = {}
        # An outage: every event answered with this 5xx status until set back to None.
        self.outage_status: int | None = None
        self.accepted: list[dict[str, Any]] = []  # the events answered 202, in order

    def fail_next(self, status: int, retry_after: int | None = None) -> None:
        self.faults.append((status, {"Retry-After": str(retry_after)} if retry_after else {}))

    def accepted_events(self, action: str | None = None) -> list[dict[str, Any]]:
        """The events PagerDuty processed (202), not those it refused or failed."""
        with self.lock:
            found = list(self.accepted)
        return [e for e in found if action is None or e.get("event_action") == action]

    def invalid_json(self, reason: str) -> Response:
        return self.invalid_event([f"Malformed JSON: {reason}"])

    @staticmethod
    def invalid_event(errors: list[str]) -> Response:
        body = {"status": "invalid event", "message": "Event object is invalid", "errors": errors}
        return JSONResponse(body, 400)

    def events(self, action: str | None = None) -> list[dict[str, Any]]:
        found = [r.data for r in self.received("/v2/enqueue")]
        return [e for e in found if action is None or e.get("event_action") == action]

    async def _enqueue(self, request: Request) -> Response:
        body, event = await read_body(request)
        self.record(request, body, event)
        if self.outage_status is not None:
            return JSONResponse(
                {"status": "error", "message": "Internal error"}, self.outage_status
            )
        with self.lock:
            fault = self.faults.popleft() if self.faults else None
        if fault is not None:
            status, headers = fault
            if status == 400:
                return self.invalid_event(["Event object is invalid"])
            message = "Too many requests" if status == 429 else "Internal error"
            return JSONResponse({"status": "error", "message": message}, status, headers)
        errors = event_errors(event)
        if event.get("routing_key") in self.invalid_routing_keys:
            errors.append("Invalid routing key")
        if errors:
            return self.invalid_event(errors)
        dedup_key = event.get("dedup_key") or uuid.uuid4().hex
        action = event["event_action"]
        with self.lock:
            # As PagerDuty: ack/resolve of an unknown key is accepted and does nothing.
            if action == "trigger" or dedup_key in self.alerts:
                self.alerts[dedup_key] = STATE_AFTER[action]
            self.accepted.append(event)
        return JSONResponse(
            {"status": "success", "message": "Event processed", "dedup_key": dedup_key}, 202
        )


def webhook(
    event_type: str, incident_key: str, secret: str, agent: str = "Dana On-Call"
) -> tuple[bytes, dict[str, str]]:
    """A signed v3 webhook as PagerDuty sends it when someone acts on an incident there."""
    status = event_type.removeprefix("incident.")
    event = {
        "event": {
            "id": f"01{uuid.uuid4().hex[:24].upper()}",
            "event_type": event_type,
            "resource_type": "incident",
            "occurred_at": "2026-11-26T12:00:00.000Z",
            "agent": {
                "html_url": "https://acme.pagerduty.com/users/PLH1HKV",
                "id": "PLH1HKV",
                "self": "https://api.pagerduty.com/users/PLH1HKV",
                "summary": agent,
                "type": "user_reference",
            },
            "client": None,
            "data": {
                "id": "PGR0VU2",
                "type": "incident",
                "self": "https://api.pagerduty.com/incidents/PGR0VU2",
                "html_url": "https://acme.pagerduty.com/incidents/PGR0VU2",
                "number": 2,
                "status": status,
                "incident_key": incident_key,
                "created_at": "2026-11-26T11:58:00Z",
                "title": "[SEV2] error_rate on global",
                "urgency": "high",
                "priority": None,
                "resolve_reason": None,
            },
        }
    }
    body = json.dumps(event).encode()
    signature = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return body, {"Content-Type": "application/json", "X-PagerDuty-Signature": f"v1={signature}"}
