"""Where the wrapper meets the OpenAI SDK's internals: the HTTP response hook that notes each
attempt of the call in progress (status, request id, the SDK's retry count), and the SDK's
raw-response modes (`with_raw_response`, `with_streaming_response`)."""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any

import openai
from openai._constants import RAW_RESPONSE_HEADER

from pagerloop_sdk.capture import PendingCall

# The call the current thread / task is making, for the HTTP response hook.
in_flight: ContextVar[PendingCall | None] = ContextVar("pagerloop_call", default=None)


def note_attempt(response: Any) -> None:
    """Notes the attempt's status and keeps its headers: they are read off the caller's path."""
    call = in_flight.get()
    if call is not None:
        call.note(response)


async def note_attempt_async(response: Any) -> None:
    note_attempt(response)


def hook_responses(client: openai.OpenAI | openai.AsyncOpenAI) -> None:
    """Note every HTTP response of `client` (once, however often it is instrumented)."""
    hook = note_attempt_async if isinstance(client, openai.AsyncOpenAI) else note_attempt
    http_client: Any = client._client
    hooks = http_client.event_hooks
    if hook not in hooks["response"]:
        http_client.event_hooks = {**hooks, "response": [*hooks["response"], hook]}


def raw_mode(kwargs: Mapping[str, Any]) -> str | None:
    """The raw mode of a call: `with_raw_response` is "raw", `with_streaming_response`
    "stream", a plain call None."""
    headers = kwargs.get("extra_headers")
    return headers.get(RAW_RESPONSE_HEADER) if headers else None


def parsed(result: Any) -> Any:
    """The payload of a result; callers of `with_raw_response` get a response to parse."""
    return result.parse() if hasattr(result, "http_response") else result
