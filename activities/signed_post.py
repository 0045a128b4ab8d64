"""One signed JSON POST to a hook the SRE configured (the notify-users hook, the golden-set
eval): signed and answered as the webhook channel's alerts are, plus an `Idempotency-Key`.

The hooks differ only in what a 2xx means (`on_success`, called with the streamed response
still open, so it may read a bounded answer) and in the error type their retryable failures
carry (`error_type`); the rest (no redirects, timeouts and transport errors named by kind only,
the refusal's reason, Retry-After) is the webhook channel's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import httpx
from temporalio.exceptions import ApplicationError

from activities.webhook import WebhookActivities, WebhookPermanentError, _failure, _reason, encode

IDEMPOTENCY_HEADER = "Idempotency-Key"

T = TypeVar("T")


async def signed_post(
    client: httpx.AsyncClient,
    webhook: WebhookActivities,
    target: str,
    event: str,
    payload: Mapping[str, Any],
    key: str,
    on_success: Callable[[httpx.Response], Awaitable[T]],
    error_type: str,
) -> T:
    """POST `payload` to `webhook`'s receiver `target` (a name: its URL may hold a token, so
    errors name `target` only); `key` is both the delivery id and the Idempotency-Key."""
    url = webhook._url(target)
    body = encode(payload)
    headers = webhook.headers(body, event, key)
    headers[IDEMPOTENCY_HEADER] = key
    try:
        async with client.stream(
            "POST", url, content=body, headers=headers, follow_redirects=False
        ) as response:
            if response.is_success:
                return await on_success(response)
            reason = await _reason(response)
    except (httpx.UnsupportedProtocol, httpx.InvalidURL):
        raise WebhookPermanentError(f"{target} is not a usable URL") from None
    except httpx.TimeoutException as exc:
        raise ApplicationError(
            f"{target} did not answer in time ({type(exc).__name__})", type=error_type
        ) from None
    except httpx.TransportError as exc:
        # The exception's text may quote the URL: name the kind only.
        raise ApplicationError(
            f"{target} unreachable ({type(exc).__name__})", type=error_type
        ) from None
    if response.is_redirect:
        raise WebhookPermanentError(
            f"{target} answered HTTP {response.status_code} (a redirect, not followed)"
        )
    # The answer's own failures (5xx, 429, other 4xx) are typed as the webhook channel's.
    raise _failure(response.status_code, response.headers, reason, target)
