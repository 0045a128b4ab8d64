"""What the wrapper notes about one call on the caller's path, and how the recorder turns it
into a stored record off that path.

The caller's path only takes timestamps and references (the parsed response, the headers of
the last HTTP attempt, the OpenTelemetry context); reading usage and headers, pricing, hashing,
the call id, scoring and logging all happen in the recorder's thread (`finalize`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pagerloop_sdk.classify import classify_exception
from pagerloop_sdk.context import LLMContext
from pagerloop_sdk.pricing import PriceTable
from pagerloop_sdk.privacy import hash_user_id
from pagerloop_sdk.records import CACHE_SOURCE, ERROR_MESSAGE_MAX, CallRecord

RETRY_COUNT_HEADER = "x-stainless-retry-count"
ENDPOINT_KEY = "pagerloop_endpoint"  # in a record's metadata


@dataclass(slots=True)
class PendingCall:
    operation: str  # chat | responses | embeddings
    model: str
    started: float  # perf_counter at the call
    ts: datetime
    context: LLMContext
    stream: bool = False
    hide_usage_chunk: bool = False
    score_quality: bool = False
    expected_format: str = "text"
    prompt: Any = None  # messages / input, kept only when the call is sampled for quality
    ended: float = 0.0
    first_token: float | None = None
    status: str = "success"
    http_status: int | None = None
    error_type: str | None = None
    error_message: str | None = None
    retry_count: int = 0
    request_id: str | None = None
    response: Any = None  # the parsed response of a non-streamed call
    response_model: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cached_input_tokens: int | None = None
    finish_reason: str | None = None
    output_parts: list[str] = field(default_factory=list)
    trace_id: str | None = None
    controls: str | None = None  # the runbook controls that changed the call: "reroute#3"
    endpoint: str | None = None  # the fallback endpoint a `model@endpoint` route sent it to
    # Served from the response cache: nothing reached OpenAI and no tokens were spent. Its
    # record has source "cache", which keeps it out of the rollups and the diagnosis queries.
    cache_hit: bool = False
    # Never sent: a queue control gave up on it. Like a disabled call it is not recorded, so
    # that what a mitigation held back never reads as OpenAI failing (the golden signals); it
    # is counted in pagerloop_control_actions_total{kind="queue"}.
    unsent: bool = False
    # Why the answer returned failed its validate control (pagerloop_sdk.validation): the
    # recorder sends it as a quality score of 0.
    invalid: str | None = None
    # The last HTTP attempt's (response headers, request headers), read in `finalize` (or at
    # once when `eager`: runbook controls read the retry count on the caller's path).
    headers: Any = None
    eager: bool = False
    otel_context: Any = None  # the app's OpenTelemetry context, when it has one

    def note(self, response: Any) -> None:
        """An HTTP attempt of the call answered (the client's response hook)."""
        self.http_status = response.status_code
        if self.headers is not None:
            self.read_headers()  # a retry: the earlier attempt's request id stays the fallback
        self.headers = (response.headers, response.request.headers)
        if self.eager:
            self.read_headers()

    def read_headers(self, request_id: str | None = None) -> None:
        """The request id (unless the parsed response gave it) and the SDK's retry count, from
        the last attempt's headers."""
        headers, self.headers = self.headers, None
        if headers is not None:
            self.request_id = request_id or headers[0].get("x-request-id") or self.request_id
            self.retry_count = _int(headers[1].get(RETRY_COUNT_HEADER, "0"))

    def fail(self, exc: BaseException, ended: float) -> None:
        self.read_headers()
        self.ended = ended
        self.status, self.http_status = classify_exception(exc)
        self.error_type = type(exc).__name__
        self.error_message = str(getattr(exc, "message", None) or exc)[:ERROR_MESSAGE_MAX]
        request = getattr(exc, "request", None)
        response = getattr(exc, "response", None)
        if response is not None:
            self.request_id = response.headers.get("x-request-id") or self.request_id
            request = getattr(response, "request", request)
        if request is not None:
            self.retry_count = _int(request.headers.get(RETRY_COUNT_HEADER))

    def observe_chunk(self, chunk: Any, now: float) -> None:
        """A chat.completions stream chunk."""
        if self.response_model is None:
            self.response_model = getattr(chunk, "model", None)
        usage = getattr(chunk, "usage", None)
        if usage is not None:
            self._chat_usage(usage)
        for choice in chunk.choices or ():
            delta = choice.delta
            if delta is not None and (delta.content or delta.tool_calls or delta.refusal):
                if self.first_token is None:
                    self.first_token = now
                if self.score_quality and delta.content:
                    self.output_parts.append(delta.content)
            if choice.finish_reason:
                self.finish_reason = choice.finish_reason

    def observe_event(self, event: Any, now: float) -> None:
        """A responses stream event."""
        kind = getattr(event, "type", "")
        if kind == "response.output_text.delta" or kind.endswith("arguments.delta"):
            if self.first_token is None:
                self.first_token = now
            if self.score_quality and kind == "response.output_text.delta":
                self.output_parts.append(event.delta)
        elif kind in ("response.completed", "response.incomplete", "response.failed"):
            self._response(event.response)
            if kind == "response.failed":
                error = getattr(event.response, "error", None)
                self.status = "error"
                self.error_type = getattr(error, "code", None) or "ResponseFailed"
                self.error_message = str(getattr(error, "message", "") or "")[:ERROR_MESSAGE_MAX]
        elif kind == "response.created":
            self.response_model = getattr(event.response, "model", None)
        elif kind == "error":
            self.status = "error"
            self.error_type = getattr(event, "code", None) or "StreamError"
            self.error_message = str(getattr(event, "message", "") or "")[:ERROR_MESSAGE_MAX]

    def _chat_usage(self, usage: Any) -> None:
        self.input_tokens = usage.prompt_tokens
        self.output_tokens = usage.completion_tokens
        details = getattr(usage, "prompt_tokens_details", None)
        self.cached_input_tokens = getattr(details, "cached_tokens", None) or 0

    def _response(self, response: Any) -> None:
        """Usage, model and finish reason of a complete response object."""
        self.response_model = getattr(response, "model", None) or self.response_model
        usage = getattr(response, "usage", None)
        if self.operation == "chat":
            if usage is not None:
                self._chat_usage(usage)
            choices = getattr(response, "choices", None) or ()
            if choices:
                self.finish_reason = choices[0].finish_reason
        elif self.operation == "responses":
            if usage is not None:
                self.input_tokens = usage.input_tokens
                self.output_tokens = usage.output_tokens
                details = getattr(usage, "input_tokens_details", None)
                self.cached_input_tokens = getattr(details, "cached_tokens", None) or 0
            details = getattr(response, "incomplete_details", None)
            status = getattr(response, "status", None)
            self.finish_reason = getattr(details, "reason", None) or status
        elif usage is not None:  # embeddings
            self.input_tokens = usage.prompt_tokens
            self.output_tokens = 0

    def output_text(self) -> str:
        if self.output_parts:
            return "".join(self.output_parts)
        response = self.response
        if response is None:
            return ""
        if self.operation == "chat" and response.choices:
            return response.choices[0].message.content or ""
        if self.operation == "responses":
            return str(getattr(response, "output_text", "") or "")
        return ""


def _otel_trace_id(context: Any) -> str | None:
    """The trace id of the current span of an OpenTelemetry context, if it has a valid one."""
    from opentelemetry import trace  # only set when OpenTelemetry is there

    current = trace.get_current_span(context).get_span_context()
    return format(current.trace_id, "032x") if current.is_valid else None


def _int(value: str | None) -> int:
    return int(value) if value and value.isdigit() else 0


def prompt_text(prompt: Any) -> str:
    """The last user message of a chat, or a responses `input`, as plain text."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        for message in reversed(prompt):
            role = message.get("role") if isinstance(message, dict) else None
            if role == "user":
                content = message.get("content")
                if isinstance(content, str):
                    return content
                if isinstance(content, list):
                    return " ".join(
                        str(part.get("text", "")) for part in content if isinstance(part, dict)
                    )
    return ""


def _metadata(ctx: LLMContext, endpoint: str | None) -> dict[str, Any] | None:
    """The context's metadata; a rerouted call's also names the endpoint that answered (a
    metadata key, so the call log's schema stays as it is)."""
    metadata = dict(ctx.metadata)
    if endpoint is not None:
        metadata[ENDPOINT_KEY] = endpoint
    return metadata or None


def call_cost(call: PendingCall, prices: PriceTable) -> float | None:
    """The SDK's price of a finished call (a cache hit, its tokens zeroed, costs nothing); None
    without tokens or without a price for its model."""
    if call.cache_hit:
        return 0.0
    if call.input_tokens is None:
        return None
    return prices.cost_usd(
        call.response_model or call.model,
        call.input_tokens,
        call.output_tokens or 0,
        call.cached_input_tokens or 0,
    )


def finalize(call: PendingCall, salt: str, prices: PriceTable) -> CallRecord:
    """The stored record of a finished call (runs in the recorder's thread)."""
    if call.headers is not None:
        # The OpenAI SDK set the parsed response's `_request_id` from the same header: one
        # header lookup less (a scan of the header list each).
        call.read_headers(getattr(call.response, "_request_id", None))
    if call.trace_id is None and call.otel_context is not None:
        call.trace_id = _otel_trace_id(call.otel_context)
    if call.response is not None:
        call._response(call.response)
        if call.cache_hit:
            call.input_tokens = call.output_tokens = call.cached_input_tokens = 0
        elif call.request_id is None:
            call.request_id = getattr(call.response, "_request_id", None)
    if call.stream and call.status == "success" and call.finish_reason is None:
        # Ended without a finish reason (or `response.completed`): the answer is cut short.
        call.status = "error"
        call.error_type = call.error_type or "IncompleteStream"
    ctx = call.context
    cost = call_cost(call, prices)
    ttft = None
    if call.first_token is not None:
        ttft = round((call.first_token - call.started) * 1000, 3)
    return CallRecord(
        ts=call.ts,
        operation=call.operation,
        model=call.model,
        response_model=call.response_model,
        status=call.status,
        http_status=call.http_status,
        latency_ms=round((call.ended - call.started) * 1000, 3),
        ttft_ms=ttft,
        input_tokens=call.input_tokens,
        output_tokens=call.output_tokens,
        cached_input_tokens=call.cached_input_tokens,
        cost_usd=cost,
        feature=ctx.feature,
        team=ctx.team,
        environment=ctx.environment,
        session_id=ctx.session_id,
        user_hash=hash_user_id(ctx.user_id, salt) if ctx.user_id else None,
        error_type=call.error_type,
        error_message=call.error_message,
        retry_count=call.retry_count,
        finish_reason=call.finish_reason,
        request_id=call.request_id,
        trace_id=call.trace_id or ctx.trace_id,
        source=CACHE_SOURCE if call.cache_hit else "sdk",
        metadata=_metadata(ctx, call.endpoint),
        controls=call.controls,
    )
