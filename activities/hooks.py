"""Hooks out of the runbooks: telling the app's users (PAGERLOOP_NOTIFY_USERS_URL) that the
service is degraded, for the app's own banner, status page or email to pick up.

One JSON POST per incident:

    {"incident_id", "trigger", "scope", "severity", "summary", "message",
     "status_page_url"?}

`message` is written for end users; `status_page_url` is PAGERLOOP_STATUS_PAGE_URL when set.
The POST is signed as the webhook channel signs its alerts (`activities.webhook.sign`:
`X-Pagerloop-Signature`, `X-Pagerloop-Timestamp`, `X-Pagerloop-Timestamp-Signature`) with
PAGERLOOP_NOTIFY_USERS_SECRET (else PAGERLOOP_WEBHOOK_SECRET), and carries
`Idempotency-Key: <incident id>/notify-users`: the same on every attempt and every run of the
runbook, so a receiver that keeps the keys it has seen tells its users once, whatever the
retries. Answers are treated as the webhook channel's are (2xx delivered; 5xx, 408, 425, 429
and network errors retried; any other 4xx or a redirect refused for good).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx
from pydantic import SecretStr
from temporalio import activity

from activities.signed_post import signed_post
from activities.webhook import WebhookActivities

_log = logging.getLogger(__name__)

EVENT = "notify_users"
TARGET = "notify-users"  # how errors and logs name the receiver (its URL may hold a token)


@dataclass
class NotifyUsers:
    incident_id: str
    trigger: str
    scope: str
    severity: str
    summary: str
    message: str  # for end users


@dataclass
class NotifyUsersResult:
    sent: bool  # False: no receiver is configured
    detail: str


def idempotency_key(incident_id: str) -> str:
    return f"{incident_id}/{TARGET}"


class HookActivities:
    """Registered whether or not a receiver is configured: without one the activity answers
    `sent=False`, so a runbook needs no configuration of its own to know."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        url: SecretStr | None,
        secret: SecretStr | None,
        status_page_url: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._configured = url is not None
        # The webhook channel's signing and URL handling (its log redaction included).
        self._webhook = WebhookActivities(client, secret, {TARGET: url} if url else {}, clock)
        self._status_page_url = status_page_url

    def payload(self, request: NotifyUsers) -> dict[str, str]:
        payload = {
            "incident_id": request.incident_id,
            "trigger": request.trigger,
            "scope": request.scope,
            "severity": request.severity,
            "summary": request.summary,
            "message": request.message,
        }
        if self._status_page_url:
            payload["status_page_url"] = self._status_page_url
        return payload

    @activity.defn(name="hooks.notify_users")
    async def notify_users(self, request: NotifyUsers) -> NotifyUsersResult:
        if not self._configured:
            return NotifyUsersResult(False, "PAGERLOOP_NOTIFY_USERS_URL is not set")

        async def told(response: httpx.Response) -> NotifyUsersResult:
            _log.info("users told of %s (HTTP %s)", request.incident_id, response.status_code)
            return NotifyUsersResult(True, f"HTTP {response.status_code}")

        return await signed_post(
            self._client,
            self._webhook,
            TARGET,
            EVENT,
            self.payload(request),
            idempotency_key(request.incident_id),
            told,
            error_type="WebhookError",
        )
