"""`instrument(client)`: record every chat.completions, responses and embeddings call of an
`OpenAI` or `AsyncOpenAI` client, plain or streamed, without changing what the caller sees.

The methods of this one client (and of the copies `with_options()` makes) are wrapped; other
clients are left alone. The call itself goes through the SDK untouched (so other instrumentation
layers see what they always see); a response hook on the client's HTTP client notes each
attempt's status, request id and retry count for the call in progress (pagerloop_sdk.openai_hooks).
Exceptions reach the caller unchanged.

Runbook controls are enforced on every call: `pagerloop_sdk.controls` decides which apply,
`pagerloop_sdk.enforce` carries a call under controls out (refuse, rewrite, serve from the
response cache, hold a concurrency slot, back off 429s); calls under no control take the plain
path here. The record's `model` stays the model the app asked for; `response_model` is the one
that answered, and `controls` names the controls that changed the call. A route to
`model@endpoint` sends the call through the same resource of that endpoint's own client
(pagerloop_sdk.endpoints), still recorded here, once, its metadata naming the endpoint.

With `response_cache=N`, every successful non-streamed response is kept for a `cache` control
to serve later (pagerloop_sdk.response_cache).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import openai

from pagerloop_sdk import controls as ctl
from pagerloop_sdk import endpoints, enforce
from pagerloop_sdk.capture import PendingCall
from pagerloop_sdk.context import EMPTY, LLMContext, current
from pagerloop_sdk.openai_hooks import hook_responses, in_flight, parsed, raw_mode
from pagerloop_sdk.privacy import hash_user_id
from pagerloop_sdk.recorder import Recorder
from pagerloop_sdk.response_cache import DEFAULT_MAX_AGE, ResponseCache, cache_key
from pagerloop_sdk.streams import track_async_stream, track_stream

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

    from pagerloop_sdk.pricing import PriceTable

C = TypeVar("C", openai.OpenAI, openai.AsyncOpenAI)

OPERATIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("chat", ("chat", "completions")),
    ("responses", ("responses",)),
    ("embeddings", ("embeddings",)),
)
PATHS = dict(OPERATIONS)
# OpenAI's request metadata: at most 16 pairs, keys up to 64 and values up to 512 characters.
METADATA_PAIRS, METADATA_KEY, METADATA_VALUE = 16, 64, 512


@dataclass(frozen=True)
class _Options:
    recorder: Recorder
    telemetry: Any  # pagerloop_sdk.telemetry.Telemetry, or _NoTelemetry without OpenTelemetry
    send_user: bool
    send_metadata: bool
    server: tuple[str, int] | None
    controls: ctl.ControlSource | None = None
    cache: ResponseCache | None = None


def instrument(
    client: C,
    *,
    url: str | None = None,
    api_key: str | None = None,
    recorder: Recorder | None = None,
    send_user: bool = True,
    send_metadata: bool = True,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
    controls: ctl.ControlSource | Literal[False] | None = None,
    response_cache: int = 0,
    response_cache_max_age: float = DEFAULT_MAX_AGE,
) -> C:
    """Instrument `client` in place and return it.

    Records go in batches to the pagerloop API at `url` with `api_key` (by default
    `PAGERLOOP_URL` and `PAGERLOOP_API_KEY`; see `pagerloop_sdk.defaults`), or to `recorder`.
    Nothing here blocks the call or raises into it: records are queued, and delivered (or
    spooled) by a background thread.

    `send_user` passes the hashed user id of `llm_context` as the request's `user`, and
    `send_metadata` passes feature, team, environment, session and the context's metadata as
    the request's `metadata` (the caller's own values win), for the OpenAI dashboard.
    With the `otel` extra, spans and GenAI metrics go to the given OpenTelemetry providers,
    else to the global ones when the app has configured them.

    `controls`: where the runbook controls to enforce come from. By default where the
    recorder delivers (the API's `GET /v1/controls`, polled every 2 s); a `ControlSource` to
    choose, False for none.

    `response_cache`: how many responses this client keeps (0: none, and `cache` controls do
    nothing here). Every successful non-streamed response is kept (the least recently used
    out, 64 MiB at most); they are served only while a `cache` control matching the call is
    in force (say during an OpenAI outage), and only those answered less than
    `response_cache_max_age` seconds ago (24 h by default).
    """
    if getattr(client, "_pagerloop_options", None) is not None:
        return client
    if recorder is None:
        from pagerloop_sdk.defaults import http_recorder

        recorder = http_recorder(url, api_key)
    source = _control_source(controls, recorder)
    options = _Options(
        recorder,
        _telemetry(tracer_provider, meter_provider, recorder.prices),
        send_user,
        send_metadata,
        _server(client),
        source,
        ResponseCache(response_cache, response_cache_max_age) if response_cache > 0 else None,
    )
    if source is not None:
        source.start()  # the first read is usually done before the first call needs it
    return _apply(client, options)


def _apply(client: C, options: _Options) -> C:
    is_async = isinstance(client, openai.AsyncOpenAI)
    hook_responses(client)
    # A call sent to a fallback endpoint gives up when this client would have.
    limits = (client.timeout, client.max_retries)
    for operation, path in OPERATIONS:
        resource: Any = client
        for name in path:
            resource = getattr(resource, name)
        wrap = _wrap_async if is_async else _wrap_sync
        resource.create = wrap(operation, resource.create, options, limits)

    original_copy = client.copy

    def copy(*args: Any, **kwargs: Any) -> Any:
        # Copies share everything but the server: recorder, telemetry, controls, cache.
        copied = original_copy(*args, **kwargs)
        return _apply(copied, replace(options, server=_server(copied)))

    client.copy = copy  # type: ignore[method-assign]
    client.with_options = copy  # type: ignore[method-assign]
    setattr(client, "_pagerloop_options", options)  # noqa: B010
    return client


def _control_source(
    controls: ctl.ControlSource | Literal[False] | None, recorder: Recorder
) -> ctl.ControlSource | None:
    if controls is False:
        return None
    if isinstance(controls, ctl.ControlSource):
        return controls
    own = getattr(recorder.sink, "controls", None)  # a sink may say where its controls are
    source = own() if own is not None else None
    return source if isinstance(source, ctl.ControlSource) else None


class _NoTelemetry:
    """Without the `otel` extra: no spans, no GenAI metrics."""

    def start(self, call: PendingCall, server: tuple[str, int] | None) -> None:
        return None

    def finish(self, call: PendingCall, span: object) -> None:
        return None


def _telemetry(
    tracer_provider: TracerProvider | None,
    meter_provider: MeterProvider | None,
    prices: PriceTable,
) -> Any:
    try:
        from pagerloop_sdk.telemetry import Telemetry
    except ImportError:  # opentelemetry is not installed
        return _NoTelemetry()
    return Telemetry(tracer_provider, meter_provider, prices)


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
    operation: str, kwargs: dict[str, Any], options: _Options, snap: ctl.Snapshot
) -> tuple[PendingCall, dict[str, Any], enforce.Plan | None, str | None]:
    """The call to record, the request to send, the controls acting on it (None: none) and
    its response cache key (None: not cached)."""
    ctx = current()
    model = str(kwargs.get("model", ""))
    plan = None
    if snap.rules:
        decision = snap.decide(operation, ctx.feature, model)
        if decision is not None:
            plan = enforce.plan(operation, kwargs, decision, ctx.feature, model)
    key = None
    if options.cache is not None and not kwargs.get("stream") and raw_mode(kwargs) is None:
        # The request as the controls left it, before our user / metadata: they vary per
        # session while the answer does not.
        key = cache_key(operation, kwargs)
        if plan is not None:
            plan.cache_key = key
    sampled = operation != "embeddings" and options.recorder.sample_quality()
    call = PendingCall(
        operation=operation,
        model=model,
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
    return call, kwargs, plan, key


def _unrecorded(
    kwargs: dict[str, Any], operation: str, snap: ctl.Snapshot
) -> endpoints.Endpoint | None:
    """`with_streaming_response` calls are not recorded, but still rerouted, capped or
    refused; the endpoint a route sends it to (None: the app's client)."""
    if snap.rules:
        ctx = current()
        model = str(kwargs.get("model", ""))
        decision = snap.decide(operation, ctx.feature, model)
        if decision is not None:
            enforce.refuse(decision, ctx.feature, model)
            decision, endpoint = enforce.routed(decision)
            ctl.rewrite(decision, operation, kwargs)
            return endpoint
    return None


def _sender(
    original: Callable[..., Any],
    operation: str,
    endpoint: endpoints.Endpoint | None,
    is_async: bool,
    limits: tuple[Any, int],
) -> tuple[Callable[..., Any], Any]:
    """The `create` to call, and its client when it is a fallback endpoint's (else None): the
    same resource of the endpoint's client, unwrapped, since this wrapper records the call."""
    if endpoint is None:
        return original, None
    client = endpoints.client_for(endpoint, is_async, *limits)
    resource = client
    for name in PATHS[operation]:
        resource = getattr(resource, name)
    return resource.create, client


def _routed_to(call: PendingCall, client: Any, options: _Options, plan: enforce.Plan) -> Any:
    """The server the call goes to (for its span); the record names the endpoint."""
    if client is None or plan.endpoint is None:
        return options.server
    call.endpoint = plan.endpoint.name
    return _server(client)


def _keep(call: PendingCall, payload: Any) -> None:
    """The response, for the recorder's thread to read. An embeddings response (its vectors may
    be megabytes) is read now and not kept: the queue may hold many while the store is away."""
    if call.operation == "embeddings":
        call._response(payload)
        call.request_id = call.request_id or getattr(payload, "_request_id", None)
    else:
        call.response = payload


def _finisher(call: PendingCall, span: Any, options: _Options) -> Callable[[], None]:
    def done() -> None:
        options.telemetry.finish(call, span)
        if not call.unsent:
            options.recorder.submit(call)

    return done


def _wrap_sync(
    operation: str,
    original: Callable[..., Any],
    options: _Options,
    limits: tuple[Any, int],
) -> Callable[..., Any]:
    source = options.controls
    cache = options.cache

    def create(*args: Any, **kwargs: Any) -> Any:
        snap = ctl.EMPTY if source is None else source.snapshot()
        mode = raw_mode(kwargs)
        if mode == "stream":  # with_streaming_response: the body is theirs to read
            endpoint = _unrecorded(kwargs, operation, snap)
            send, _ = _sender(original, operation, endpoint, False, limits)
            return send(*args, **kwargs)
        call, kwargs, plan, key = _begin(operation, kwargs, options, snap)
        if plan is not None:
            send, routed = _sender(original, operation, plan.endpoint, False, limits)
            span = options.telemetry.start(call, _routed_to(call, routed, options, plan))
            done = _finisher(call, span, options)
            call.eager = True  # the controls read its retry count as it goes
            return enforce.call_sync(send, args, kwargs, call, plan, cache, done)
        span = options.telemetry.start(call, options.server)
        done = _finisher(call, span, options)
        token = in_flight.set(call)
        try:
            result = original(*args, **kwargs)
        except Exception as exc:
            call.fail(exc, time.perf_counter())
            done()
            raise
        finally:
            in_flight.reset(token)
        payload = result if mode is None else parsed(result)
        if call.stream:
            track_stream(payload, call, done)
        else:
            call.ended = time.perf_counter()
            _keep(call, payload)
            if key is not None and cache is not None:
                cache.put(key, payload)
            done()
        return result

    create.__wrapped__ = original  # type: ignore[attr-defined]
    return create


def _wrap_async(
    operation: str,
    original: Callable[..., Any],
    options: _Options,
    limits: tuple[Any, int],
) -> Callable[..., Any]:
    source = options.controls
    cache = options.cache

    async def create(*args: Any, **kwargs: Any) -> Any:
        snap = ctl.EMPTY if source is None else await source.snapshot_async()
        mode = raw_mode(kwargs)
        if mode == "stream":
            endpoint = _unrecorded(kwargs, operation, snap)
            send, _ = _sender(original, operation, endpoint, True, limits)
            return await send(*args, **kwargs)
        call, kwargs, plan, key = _begin(operation, kwargs, options, snap)
        if plan is not None:
            send, routed = _sender(original, operation, plan.endpoint, True, limits)
            span = options.telemetry.start(call, _routed_to(call, routed, options, plan))
            done = _finisher(call, span, options)
            call.eager = True
            return await enforce.call_async(send, args, kwargs, call, plan, cache, done)
        span = options.telemetry.start(call, options.server)
        done = _finisher(call, span, options)
        token = in_flight.set(call)
        try:
            result = await original(*args, **kwargs)
        except Exception as exc:
            call.fail(exc, time.perf_counter())
            done()
            raise
        finally:
            in_flight.reset(token)
        payload = result if mode is None else parsed(result)
        if call.stream:
            track_async_stream(payload, call, done)
        else:
            call.ended = time.perf_counter()
            _keep(call, payload)
            if key is not None and cache is not None:
                cache.put(key, payload)
            done()
        return result

    create.__wrapped__ = original  # type: ignore[attr-defined]
    return create
