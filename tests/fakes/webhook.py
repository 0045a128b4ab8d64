"""A local Alertmanager webhook receiver (`POST /alerts`), as the Teams / Discord / Opsgenie
bridges written for Alertmanager are.

Checks what such a receiver relies on: a strict-JSON body in Alertmanager's version "4" shape
(422 naming the field otherwise), and, given the secret, pagerloop's signature, verified on the
raw body as the README says (401 when it does not match or is missing). Answers 200 with an
empty body on success. Can be told to fail the next N requests with a status and `Retry-After`.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes.server import FakeServer, NotJSONError, strict_loads

PATH = "/alerts"
TOP_LEVEL = {
    "version": str,
    "groupKey": str,
    "truncatedAlerts": int,
    "status": str,
    "receiver": str,
    "groupLabels": dict,
    "commonLabels": dict,
    "commonAnnotations": dict,
    "externalURL": str,
    "alerts": list,
}
ALERT = {
    "status": str,
    "labels": dict,
    "annotations": dict,
    "startsAt": str,
    "endsAt": str,
    "generatorURL": str,
    "fingerprint": str,
}
STATUSES = {"firing", "resolved"}
# How old a timestamped signature may be.
MAX_AGE_SECONDS = 300


@dataclass
class Delivery:
    """A notification the receiver took (200)."""

    payload: dict[str, Any]
    headers: dict[str, str]
    body: bytes


def shape_errors(payload: object) -> list[str]:
    """What an Alertmanager v4 receiver would choke on."""
    if not isinstance(payload, dict):
        return ["the body is not a JSON object"]
    errors = [
        f"'{name}' is missing or not {kind.__name__}"
        for name, kind in TOP_LEVEL.items()
        if not isinstance(payload.get(name), kind) or isinstance(payload.get(name), bool)
    ]
    if errors:
        return errors
    if payload["version"] != "4":
        errors.append("'version' is not \"4\"")
    if payload["status"] not in STATUSES:
        errors.append("'status' is not firing or resolved")
    for group in ("groupLabels", "commonLabels", "commonAnnotations"):
        if not all(isinstance(v, str) for v in payload[group].values()):
            errors.append(f"'{group}' values must be strings")
    for n, alert in enumerate(payload["alerts"]):
        if not isinstance(alert, dict):
            errors.append(f"'alerts[{n}]' is not an object")
            continue
        for name, kind in ALERT.items():
            if not isinstance(alert.get(name), kind):
                errors.append(f"'alerts[{n}].{name}' is missing or not {kind.__name__}")
        if errors:
            continue
        if alert["status"] not in STATUSES:
            errors.append(f"'alerts[{n}].status' is not firing or resolved")
        for kv in ("labels", "annotations"):
            if not all(isinstance(v, str) for v in alert[kv].values()):
                errors.append(f"'alerts[{n}].{kv}' values must be strings")
        for moment in ("startsAt", "endsAt"):
            try:
                parsed = datetime.fromisoformat(alert[moment])
            except ValueError:
                errors.append(f"'alerts[{n}].{moment}' is not RFC 3339")
                continue
            if parsed.tzinfo is None:
                errors.append(f"'alerts[{n}].{moment}' has no offset")
    return errors


def signature_matches(secret: str, body: bytes, headers: dict[str, str]) -> bool:
    """The README's recipe, both forms: the body's signature, and the timestamped one, fresh."""
    key = secret.encode()
    plain = "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(plain, headers.get("x-pagerloop-signature", "")):
        return False
    timestamp = headers.get("x-pagerloop-timestamp", "")
    if not timestamp.isdigit() or abs(time.time() - int(timestamp)) > MAX_AGE_SECONDS:
        return False
    signed = timestamp.encode() + b"." + body
    stamped = "sha256=" + hmac.new(key, signed, hashlib.sha256).hexdigest()
    return hmac.compare_digest(stamped, headers.get("x-pagerloop-timestamp-signature", ""))


class FakeWebhookReceiver(FakeServer):
    def __init__(self, secret: str | None = None) -> None:
        super().__init__([Route(PATH, self._receive, methods=["POST"])])
        self.secret = secret
        self.faults: deque[tuple[int, dict[str, str]]] = deque()
        self.accepted: list[Delivery] = []

    @property
    def alerts_url(self) -> str:
        return self.url + PATH

    def fail_next(
        self,
        status: int,
        retry_after: str | int | None = None,
        times: int = 1,
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer the next `times` requests with `status` (and `Retry-After`, other headers)."""
        headers = dict(headers or {})
        if retry_after is not None:
            headers["Retry-After"] = str(retry_after)
        with self.lock:
            self.faults.extend([(status, headers)] * times)

    def deliveries(self) -> list[Delivery]:
        with self.lock:
            return list(self.accepted)

    async def _receive(self, request: Request) -> Response:
        body = await request.body()
        headers = dict(request.headers)
        try:
            payload = strict_loads(body)
        except NotJSONError:
            payload = None
        self.record(request, body, payload if isinstance(payload, dict) else {})
        with self.lock:
            fault = self.faults.popleft() if self.faults else None
        if fault is not None:
            status, fault_headers = fault
            return JSONResponse({"error": f"HTTP {status}"}, status, fault_headers)
        if self.secret is not None and not signature_matches(self.secret, body, headers):
            return JSONResponse({"error": "bad signature"}, 401)
        if "json" not in headers.get("content-type", ""):
            return JSONResponse({"error": "expected application/json"}, 415)
        if payload is None:
            return JSONResponse({"error": "invalid JSON"}, 400)
        errors = shape_errors(payload)
        if errors:
            return JSONResponse({"error": "not an Alertmanager webhook", "errors": errors}, 422)
        with self.lock:
            self.accepted.append(Delivery(payload, headers, body))
        return Response(status_code=200)
