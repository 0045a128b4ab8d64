"""OpenTelemetry GenAI spans (as `opentelemetry-instrumentation-genai-openai` and other GenAI
semantic-convention instrumentations emit them) read as LLM call records.

What a span cannot say is left empty: no request id or retry count unless the app's HTTP
hooks added `openai.request.id` / `http.request.resend_count`; the HTTP status only from the
SDK's "Error code: NNN" message. A stream the caller stopped reading and one the provider cut
short look alike on a span (no finish reason, no error); both are taken as successes.

A span's record has a call_id made from its trace and span ids (`span_call_id`): an exporter
that sends the same span again writes nothing twice.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pagerloop_sdk.classify import status_for_error_type, status_for_http

GENAI_OPERATIONS = {"chat", "embeddings", "text_completion", "generate_content"}
_HTTP_CODE = re.compile(r"^Error code: (\d{3})")
ABANDONED = ("_OTHER", "abandoned stream")
_INT64 = 2**63


class InvalidSpanError(ValueError):
    """A GenAI call span whose values cannot make a call record (refused alone, not its batch)."""


@dataclass(frozen=True)
class SpanView:
    """The parts of an OTLP span the mapping needs, decoded from protobuf or JSON."""

    trace_id: str
    start_ns: int
    end_ns: int
    error: bool
    status_message: str
    attributes: Mapping[str, Any]
    resource: Mapping[str, Any]
    span_id: str = ""


def span_call_id(trace_id: str, span_id: str, start_ns: int) -> str | None:
    """The call_id of a span's record, the same each time the span is sent: 32 hex digits,
    the span's start in milliseconds (12 digits, so that ids grow with time as new_call_id's
    do and the unique index is appended to) and a digest of its trace and span ids (20). None
    when the span has no ids to make it from."""
    if not trace_id or not span_id:
        return None
    millis = max(0, start_ns // 1_000_000) % (1 << 48)
    digest = hashlib.blake2b(f"{trace_id}:{span_id}".encode(), digest_size=10).hexdigest()
    return f"{millis:012x}{digest}"


def _first(attributes: Mapping[str, Any], resource: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if attributes.get(key) is not None:
            return attributes[key]
    for key in keys:
        if resource.get(key) is not None:
            return resource[key]
    return None


def _kind(value: Any) -> str:
    # What the value is, never the value: a refusal must not echo the sender's text back.
    return type(value).__name__


def _whole(attrs: Mapping[str, Any], key: str) -> int | None:
    """An integer attribute; senders also write them as whole doubles or digit strings."""
    value = attrs.get(key)
    if value is None:
        return None
    number = None
    whole = isinstance(value, float) and value.is_integer()
    digits = isinstance(value, str) and value.isascii() and value.isdigit() and len(value) < 19
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif whole or digits:
        number = int(value)
    if number is None or not -_INT64 <= number < _INT64:
        raise InvalidSpanError(f"{key} is not a 64-bit integer ({_kind(value)})")
    return number


def _seconds(attrs: Mapping[str, Any], key: str) -> float | None:
    value = attrs.get(key)
    if value is None:
        return None
    seconds = math.nan
    if isinstance(value, int | float | str) and not isinstance(value, bool):
        with suppress(ValueError, OverflowError):
            seconds = float(value)
    if not math.isfinite(seconds):
        raise InvalidSpanError(f"{key} is not a finite number of seconds ({_kind(value)})")
    return seconds


def _first_reason(value: Any) -> str | None:
    if not value:
        return None
    if isinstance(value, list):
        return str(value[0])
    if isinstance(value, str):  # a sender that flattened the array
        return value
    raise InvalidSpanError(f"gen_ai.response.finish_reasons is not a list ({_kind(value)})")


def _start(span: SpanView) -> datetime:
    try:
        return datetime.fromtimestamp(span.start_ns / 1e9, UTC)
    except (OverflowError, OSError, ValueError):
        raise InvalidSpanError(f"start time out of range: {span.start_ns}") from None


def call_fields(span: SpanView) -> dict[str, Any] | None:
    """The `/v1/llm-calls` record of a GenAI call span; None for any other span. InvalidSpanError
    for a GenAI call span whose attributes have the wrong types (the rest is left to the
    validation of the record)."""
    attrs = span.attributes
    operation_name = attrs.get("gen_ai.operation.name")
    model = attrs.get("gen_ai.request.model")
    if not isinstance(operation_name, str) or operation_name not in GENAI_OPERATIONS or not model:
        return None
    if operation_name == "embeddings":
        operation = "embeddings"
    else:
        operation = "responses" if attrs.get("openai.api.type") == "responses" else "chat"

    finish_reason = _first_reason(attrs.get("gen_ai.response.finish_reasons"))
    http_status = _whole(attrs, "http.response.status_code")
    error_type = attrs.get("error.type")
    error_message = None
    if span.error and (error_type, span.status_message) == ABANDONED:
        status, finish_reason, error_type = "success", "client_closed", None
    elif span.error:
        match = _HTTP_CODE.match(span.status_message)
        if match:
            http_status = int(match.group(1))
        if http_status is not None and http_status >= 400:
            status = status_for_http(http_status)
        else:
            status, code = status_for_error_type(str(error_type or "error"))
            http_status = http_status or code
        error_message = span.status_message or None
    else:
        status = "success"
        http_status = http_status or 200

    input_tokens = _whole(attrs, "gen_ai.usage.input_tokens")
    output_tokens = _whole(attrs, "gen_ai.usage.output_tokens")
    if operation == "embeddings" and input_tokens is not None and output_tokens is None:
        output_tokens = 0
    cached = _whole(attrs, "gen_ai.usage.cache_read.input_tokens")
    ttft = _seconds(attrs, "gen_ai.response.time_to_first_chunk")
    fields: dict[str, Any] = {
        "timestamp": _start(span),
        "operation": operation,
        "model": model,
        "response_model": attrs.get("gen_ai.response.model"),
        "status": status,
        "http_status": http_status,
        "latency_ms": round(max(span.end_ns - span.start_ns, 0) / 1e6, 3),
        "ttft_ms": round(ttft * 1000, 3) if ttft is not None else None,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cached_input_tokens": cached
        if cached is not None or operation == "embeddings"
        else (0 if input_tokens is not None else None),
        "finish_reason": finish_reason,
        "error_type": str(error_type)[:128] if error_type else None,
        "error_message": error_message,
        "retry_count": _whole(attrs, "http.request.resend_count") or 0,
        "request_id": attrs.get("openai.request.id"),
        "trace_id": span.trace_id or None,
        "call_id": span_call_id(span.trace_id, span.span_id, span.start_ns),
        "feature": _first(attrs, span.resource, "pagerloop.feature"),
        "team": _first(attrs, span.resource, "pagerloop.team"),
        "environment": _first(
            attrs, span.resource, "deployment.environment.name", "deployment.environment"
        ),
        "session_id": _first(attrs, span.resource, "session.id", "gen_ai.conversation.id"),
        "user": _first(attrs, span.resource, "user.id", "enduser.id"),
    }
    return {key: value for key, value in fields.items() if value is not None}
