"""`instrument(client)`: record every chat.completions, responses and embeddings call of an
`OpenAI` or `AsyncOpenAI` client, plain or streamed, without changing what the caller sees.

The methods of this one client (and of the copies `with_options()` makes) are wrapped; other
clients are left alone. The call itself goes through the SDK untouched (so other instrumentation
layers see what they always see); a response hook on the client's HTTP client notes each
attempt's status, request id and retry count for the call in progress. Exceptions reach the
caller unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import openai
from openai._constants import RAW_RESPONSE_HEADER
from opentelemetry.metrics import MeterProvider
from opentelemetry.trace import TracerProvider

from instrumentation.capture import PendingCall
from instrumentation.context import EMPTY, LLMContext, current
from instrumentation.privacy import hash_user_id
from instrumentation.recorder import Recorder
from instrumentation.streams import track_async_stream, track_stream
from instrumentation.telemetry import Telemetry

C = TypeVar("C", openai.OpenAI, openai.AsyncOpenAI)

OPERATIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("chat", ("chat", "completions")),
    ("responses", ("responses",)),
    ("embeddings", ("embeddings",)),
)
# OpenAI's request metadata: at most 16 pairs, keys up to 64 and values up to 512 characters.
METADATA_PAIRS, METADATA_KEY, METADATA_VALUE = 16, 64, 512
RETRY_COUNT_HEADER = "x-stainless-retry-count"

# The call the current thread / task is making, for the HTTP response hook.
_in_flight: ContextVar[PendingCall | None] = ContextVar("pagerloop_call", default=None)


def _note_attempt(response: Any) -> None:
    call = _in_flight.get()
    if call is not None:
        call.http_status = response.status_code
        call.request_id = response.headers.get("x-request-id") or call.request_id
        retries = response.request.headers.get(RETRY_COUNT_HEADER, "0")
        call.retry_count = int(retries) if retries.isdigit() else 0


async def _note_attempt_async(response: Any) -> None:
    _note_attempt(response)


def _hook_responses(client: openai.OpenAI | openai.AsyncOpenAI) -> None:
    hook = _note_attempt_async if isinstance(client, openai.AsyncOpenAI) else _note_attempt
    http_client: Any = client._client
    hooks = http_client.event_hooks
    if hook not in hooks["response"]:
        http_client.event_hooks = {**hooks, "response": [*hooks["response"], hook]}


@dataclass(frozen=True)
class _Options:
    recorder: Recorder
    telemetry: Telemetry
    send_user: bool
    send_metadata: bool
    server: tuple[str, int] | None


def instrument(
    client: C,
    *,
    recorder: Recorder | None = None,
    send_user: bool = True,
    send_metadata: bool = True,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
) -> C:
    """Instrument `client` in place and return it.

    `send_user` passes the hashed user id of `llm_context` as the request's `user`, and
    `send_metadata` passes feature, team, environment, session and the context's metadata as
    the request's `metadata` (the caller's own values win), for the OpenAI dashboard.
    Spans and GenAI metrics go to the given OpenTelemetry providers, else to the global ones
    when the app has configured them.
    """
    if getattr(client, "_pagerloop_options", None) is not None:
        return client
    if recorder is None:
        from instrumentation.defaults import default_recorder

        recorder = default_recorder()
    telemetry = Telemetry(tracer_provider, meter_provider)
    options = _Options(recorder, telemetry, send_user, send_metadata, _server(client))
    is_async = isinstance(client, openai.AsyncOpenAI)
    _hook_responses(client)
    for operation, path in OPERATIONS:
        resource: Any = client
        for name in path:
            resource = getattr(resource, name)
        wrap = _wrap_async if is_async else _wrap_sync
        resource.create = wrap(operation, resource.create, options)

    original_copy = client.copy

    def copy(*args: Any, **kwargs: Any) -> Any:
        return instrument(
            original_copy(*args, **kwargs),
            recorder=options.recorder,
            send_user=send_user,
            send_metadata=send_metadata,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
        )

    client.copy = copy  # type: ignore[method-assign]
    client.with_options = copy  # type: ignore[method-assign]
    setattr(client, "_pagerloop_options", options)  # noqa: B010
    return client


def _server(client: openai.OpenAI | openai.AsyncOpenAI) -> tuple[str, int] | None:
    url = client.base_url
    if not url.host:
        return None
    return url.host, url.port or (443 if url.scheme == "https" else 80)


def _expected_format(operation: str, kwargs: Mapping[str, Any]) -> str:
    if operation == "chat":
        kind = (kwargs.get("response_format") or {}).get("type")
    else:
        kind = ((kwargs.get("text") or {}).get("format") or {}).get("type")
    return "json" if kind in ("json_object", "json_schema") else "text"


def _request_metadata(ctx: LLMContext, given: Any) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for key, value in (
        ("feature", ctx.feature),
        ("team", ctx.team),
        ("environment", ctx.environment),
        ("session_id", ctx.session_id),
        *ctx.metadata.items(),
    ):
        if value is not None and len(pairs) < METADATA_PAIRS:
            pairs[str(key)[:METADATA_KEY]] = str(value)[:METADATA_VALUE]
    if isinstance(given, Mapping):
        pairs.update(given)
    return dict(list(pairs.items())[:METADATA_PAIRS])


def _begin(
    operation: str, kwargs: dict[str, Any], options: _Options
) -> tuple[PendingCall, dict[str, Any]]:
    ctx = current()
    sampled = operation != "embeddings" and options.recorder.sample_quality()
    call = PendingCall(
        operation=operation,
        model=str(kwargs.get("model", "")),
        started=time.perf_counter(),
        ts=datetime.now(UTC),
        context=ctx,
        stream=bool(kwargs.get("stream")),
        score_quality=sampled,
    )
    if sampled:
        call.expected_format = _expected_format(operation, kwargs)
        call.prompt = kwargs.get("messages") if operation == "chat" else kwargs.get("input")
    if options.send_user and ctx.user_id and "user" not in kwargs:
        kwargs["user"] = hash_user_id(ctx.user_id, options.recorder.salt)
    if options.send_metadata and operation != "embeddings" and ctx is not EMPTY:
        kwargs["metadata"] = _request_metadata(ctx, kwargs.get("metadata"))
    if call.stream and operation == "chat" and "stream_options" not in kwargs:
        # Usage arrives only when asked for; the extra chunk is hidden from the caller.
        kwargs["stream_options"] = {"include_usage": True}
        call.hide_usage_chunk = True
    return call, kwargs


def _raw_mode(kwargs: Mapping[str, Any]) -> str | None:
    headers = kwargs.get("extra_headers")
    return headers.get(RAW_RESPONSE_HEADER) if headers else None


def _finisher(call: PendingCall, span: Any, options: _Options) -> Callable[[], None]:
    def done() -> None:
        options.telemetry.finish(call, span)
        options.recorder.submit(call)

    return done


def _parsed(result: Any) -> Any:
    """The payload of a result; callers of `with_raw_response` get a response to parse."""
    return result.parse() if hasattr(result, "http_response") else result


def _wrap_sync(
    operation: str, original: Callable[..., Any], options: _Options
) -> Callable[..., Any]:
    def create(*args: Any, **kwargs: Any) -> Any:
        if _raw_mode(kwargs) == "stream":  # with_streaming_response: the body is theirs to read
            return original(*args, **kwargs)
        call, kwargs = _begin(operation, kwargs, options)
        span = options.telemetry.start(call, options.server)
        done = _finisher(call, span, options)
        token = _in_flight.set(call)
        try:
            result = original(*args, **kwargs)
        except Exception as exc:
            call.fail(exc, time.perf_counter())
            done()
            raise
        finally:
            _in_flight.reset(token)
        payload = _parsed(result)
        if call.stream:
            track_stream(payload, call, done)
        else:
            call.ended = time.perf_counter()
            call.response = payload
            done()
        return result

    create.__wrapped__ = original  # type: ignore[attr-defined]
    return create


def _wrap_async(
    operation: str, original: Callable[..., Any], options: _Options
) -> Callable[..., Any]:
    async def create(*args: Any, **kwargs: Any) -> Any:
        if _raw_mode(kwargs) == "stream":
            return await original(*args, **kwargs)
        call, kwargs = _begin(operation, kwargs, options)
        span = options.telemetry.start(call, options.server)
        done = _finisher(call, span, options)
        token = _in_flight.set(call)
        try:
            result = await original(*args, **kwargs)
        except Exception as exc:
            call.fail(exc, time.perf_counter())
            done()
            raise
        finally:
            _in_flight.reset(token)
        payload = _parsed(result)
        if call.stream:
            track_async_stream(payload, call, done)
        else:
            call.ended = time.perf_counter()
            call.response = payload
            done()
        return result

    create.__wrapped__ = original  # type: ignore[attr-defined]
    return create
