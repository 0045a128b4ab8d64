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
from temporalio.exceptions import ApplicationError

from activities.webhook import (
    WebhookActivities,
    WebhookPermanentError,
    _failure,
    _reason,
    encode,
)

_log = logging.getLogger(__name__)

IDEMPOTENCY_HEADER = "Idempotency-Key"
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
        url = self._webhook._url(TARGET)
        body = encode(self.payload(request))
        key = idempotency_key(request.incident_id)
        headers = self._webhook.headers(body, EVENT, key)
        headers[IDEMPOTENCY_HEADER] = key
        try:
            async with self._client.stream(
                "POST", url, content=body, headers=headers, follow_redirects=False
            ) as response:
                if response.is_success:
                    _log.info(
                        "users told of %s (HTTP %s)", request.incident_id, response.status_code
                    )
                    return NotifyUsersResult(True, f"HTTP {response.status_code}")
                reason = await _reason(response)
        except (httpx.UnsupportedProtocol, httpx.InvalidURL):
            raise WebhookPermanentError(f"{TARGET} is not a usable URL") from None
        except httpx.TimeoutException as exc:
            raise ApplicationError(
                f"{TARGET} did not answer in time ({type(exc).__name__})", type="WebhookError"
            ) from None
        except httpx.TransportError as exc:
            # The exception's text may quote the URL: name the kind only.
            raise ApplicationError(
                f"{TARGET} unreachable ({type(exc).__name__})", type="WebhookError"
            ) from None
        if response.is_redirect:
            raise WebhookPermanentError(
                f"{TARGET} answered HTTP {response.status_code} (a redirect, not followed)"
            )
        raise _failure(response.status_code, response.headers, reason, TARGET)
