"""One call under runbook controls, as `instrument()` makes it: refused (disable) or rewritten
(reroute, pin, max_tokens) before it is sent; then served from the response cache (cache),
or sent in its turn under every matching rpm and tpm control (paced evenly over the minute),
holding a slot of every matching concurrency control, its 429s retried with backoff (backoff).
A queue control holds the call first until its turn, or fails it as a timeout without sending
it (`pagerloop_sdk.queueing`); a validate control checks the answer and sends the request once
more when it fails (`pagerloop_sdk.validation`).
The record names each control that changed the call (`controls`, "kind#id"), after the
canaries whose slice the call is in ("canary#id"), whether or not they changed it.

Which controls apply is `pagerloop_sdk.controls`' decision; this module only carries it out.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field, replace
from typing import Any

from pagerloop_sdk import backoff, endpoints, limiter, queueing, validation
from pagerloop_sdk.capture import PendingCall
from pagerloop_sdk.controls import (
    Decision,
    FeatureDisabled,
    _warn_once,
    count_actions,
    label,
    rewrite,
)
from pagerloop_sdk.openai_hooks import in_flight, parsed
from pagerloop_sdk.response_cache import ResponseCache
from pagerloop_sdk.streams import track_async_stream, track_stream


@dataclass(slots=True)
class Plan:
    """The controls acting on one call."""

    decision: Decision
    tags: list[str]  # kind#id of each control that changed the call, in the order they did
    cache_key: str | None = None  # set when the client keeps a response cache and may use it
    retries: int = 0  # requests of the attempts before the last (429s backed off)
    estimates: list[tuple[limiter.Pacer, float]] = field(default_factory=list)  # tpm reserved
    endpoint: endpoints.Endpoint | None = None  # where a `model@endpoint` route sends it


def refuse(decision: Decision, feature: str | None, model: str) -> None:
    """Raise FeatureDisabled when a control disabled the call."""
    rule = decision.disabled
    if rule is not None:
        raise FeatureDisabled(
            feature, rule.reason, rule.incident_id, model=model, control_id=rule.id
        )


def plan(
    operation: str,
    kwargs: MutableMapping[str, Any],
    decision: Decision,
    feature: str | None,
    model: str,
) -> Plan:
    """Refuse the call or rewrite its request (`kwargs`, in place); what remains to do."""
    if decision.disabled is not None:
        count_actions([decision.disabled.tag])
        refuse(decision, feature, model)
    # The canary tags first: the label is cut at CONTROLS_MAX, and they must survive it.
    tags = [rule.canary_tag for rule in decision.canary]
    decision, endpoint = routed(decision)
    tags.extend(rewrite(decision, operation, kwargs))
    return Plan(decision, tags, endpoint=endpoint)


def routed(decision: Decision) -> tuple[Decision, endpoints.Endpoint | None]:
    """The endpoint the decision's route sends the call to (None: the app's own client). A
    route to an endpoint this process was not given is not followed at all (warned once): the
    call goes out as the app made it, never broken by a name only the server knew."""
    route = decision.route
    name = None if route is None else endpoints.split_route(route.value)[1]
    if route is None or name is None:
        return decision, None
    endpoint = endpoints.configured(name)
    if endpoint is None:
        _warn_once(
            f"endpoint:{route.id}:{name}",
            "ignoring control #%s: no endpoint %r in this process (set %sBASE_URL, an http(s) "
            "URL, and %sAPI_KEY, or call pagerloop_sdk.register_endpoint)",
            route.id,
            name,
            endpoints.env_prefix(name),
            endpoints.env_prefix(name),
        )
        return replace(decision, route=None), None
    return decision, endpoint


def call_sync(
    original: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    call: PendingCall,
    plan: Plan,
    cache: ResponseCache | None,
    done: Callable[[], None],
) -> Any:
    hit = _cached(plan, cache)
    if hit is not None:
        return _serve_cached(call, plan, hit, done)
    if plan.decision.queues:
        late = queueing.wait(plan.decision.queues, original, kwargs, call.operation, plan.tags)
        if late is not None:
            raise _gave_up(late, call, plan, done)
    limiter.pace(_reservations(plan, kwargs))
    held = limiter.acquire(plan.decision.limits)
    plan.tags.extend(rule.tag for rule, _ in plan.decision.limits)
    finish = _closer(call, plan, held, done)
    token = in_flight.set(call)
    try:
        attempt = 1
        while True:
            try:
                result = original(*args, **kwargs)
                break
            except Exception as exc:
                delay = _retry_delay(exc, attempt, call, plan)
                if delay is None:
                    raise
                time.sleep(delay)
                limiter.pace(_retry_reservations(plan))
                attempt += 1
        if plan.decision.validate is not None:
            result = validation.checked_sync(result, call, plan, lambda: original(*args, **kwargs))
    except Exception as exc:
        call.fail(exc, time.perf_counter())
        finish()
        raise
    except BaseException:
        held.release()
        raise
    finally:
        in_flight.reset(token)
    return _settle(result, call, plan, cache, held, finish, track_stream)


async def call_async(
    original: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    call: PendingCall,
    plan: Plan,
    cache: ResponseCache | None,
    done: Callable[[], None],
) -> Any:
    hit = _cached(plan, cache)
    if hit is not None:
        return _serve_cached(call, plan, hit, done)
    if plan.decision.queues:
        late = await queueing.wait_async(
            plan.decision.queues, original, kwargs, call.operation, plan.tags
        )
        if late is not None:
            raise _gave_up(late, call, plan, done)
    await limiter.pace_async(_reservations(plan, kwargs))
    held = await limiter.acquire_async(plan.decision.limits)
    plan.tags.extend(rule.tag for rule, _ in plan.decision.limits)
    finish = _closer(call, plan, held, done)
    token = in_flight.set(call)
    try:
        attempt = 1
        while True:
            try:
                result = await original(*args, **kwargs)
                break
            except Exception as exc:
                delay = _retry_delay(exc, attempt, call, plan)
                if delay is None:
                    raise
                await asyncio.sleep(delay)
                await limiter.pace_async(_retry_reservations(plan))
                attempt += 1
        if plan.decision.validate is not None:
            result = await validation.checked_async(
                result, call, plan, lambda: original(*args, **kwargs)
            )
    except Exception as exc:
        call.fail(exc, time.perf_counter())
        finish()
        raise
    except BaseException:
        held.release()
        raise
    finally:
        in_flight.reset(token)
    return _settle(result, call, plan, cache, held, finish, track_async_stream)


OUTPUT_LIMITS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
CHARS_PER_TOKEN = 4  # OpenAI's rule of thumb for English text


def _reservations(plan: Plan, kwargs: Mapping[str, Any]) -> list[tuple[limiter.Pacer, float]]:
    """What the call takes off each pacer's schedule: one request, or its tokens as
    estimated (settled when the call ends)."""
    reservations = []
    for rule, pacer in plan.decision.paces:
        if rule.kind == "rpm":
            units = 1.0
        else:
            units = estimate_tokens(kwargs, pacer.typical_output)
            plan.estimates.append((pacer, units))
        reservations.append((pacer, units))
        plan.tags.append(rule.tag)
    return reservations


def _retry_reservations(plan: Plan) -> list[tuple[limiter.Pacer, float]]:
    """A retried request counts against the requests per minute like the first (its tokens
    are the call's, already reserved)."""
    return [(pacer, 1.0) for rule, pacer in plan.decision.paces if rule.kind == "rpm"]


def estimate_tokens(kwargs: Mapping[str, Any], typical_output: float) -> float:
    """A call's tokens before it is sent: its prompt's characters / 4, plus its output limit
    (or the typical output so far). Cheap on purpose: the call settles the difference."""
    prompt = kwargs.get("messages", kwargs.get("input", ""))
    size = len(prompt) if isinstance(prompt, str) else len(repr(prompt))
    limit = next(
        (v for name in OUTPUT_LIMITS if isinstance(v := kwargs.get(name), int)),
        None,
    )
    return size / CHARS_PER_TOKEN + (limit if limit is not None else typical_output)


def _usage(call: PendingCall) -> tuple[int, int]:
    """(total, output) tokens of the finished call."""
    usage = getattr(call.response, "usage", None)
    total = getattr(usage, "total_tokens", None)
    output = call.output_tokens
    if output is None:
        output = getattr(usage, "completion_tokens", None) or getattr(usage, "output_tokens", 0)
    if not isinstance(total, int):
        total = (call.input_tokens or 0) + (output or 0)
    return total, int(output or 0)


def _cached(plan: Plan, cache: ResponseCache | None) -> Any | None:
    """The cached answer to serve: only while a cache control matches the call."""
    if plan.decision.cache is None or plan.cache_key is None or cache is None:
        return None
    return cache.get(plan.cache_key)


def _closer(
    call: PendingCall, plan: Plan, held: limiter.Held, done: Callable[[], None]
) -> Callable[[], None]:
    def finish() -> None:
        held.release()
        if plan.estimates:
            used, output = _usage(call)
            for pacer, estimated in plan.estimates:
                pacer.settle(estimated, used, output)
        call.retry_count += plan.retries
        call.controls = label(plan.tags)
        count_actions(plan.tags)
        done()

    return finish


def _gave_up(exc: Exception, call: PendingCall, plan: Plan, done: Callable[[], None]) -> Exception:
    """End a call that was never sent (a queue let it wait no longer), unrecorded: the error
    to raise."""
    call.unsent = True
    call.fail(exc, time.perf_counter())
    _closer(call, plan, limiter.Held([]), done)()
    return exc


def _serve_cached(call: PendingCall, plan: Plan, response: Any, done: Callable[[], None]) -> Any:
    """Answer from the cache. The record (source "cache", zero tokens, its `cache#id` tag)
    stays in the call log but out of the golden signals: this call never reached OpenAI."""
    assert plan.decision.cache is not None
    call.cache_hit = True
    call.score_quality = False  # scored when it was first answered
    call.ended = time.perf_counter()
    call.response = response
    plan.tags.append(plan.decision.cache.tag)
    _closer(call, plan, limiter.Held([]), done)()
    return response


def _retry_delay(exc: Exception, attempt: int, call: PendingCall, plan: Plan) -> float | None:
    """How long to wait before attempt `attempt + 1`, or None to give up."""
    rule = plan.decision.backoff
    if rule is None or attempt >= rule.number or not backoff.is_rate_limit(exc):
        return None
    delay = backoff.backoff_delay(attempt, backoff.retry_after(exc))
    if delay is None:
        return None
    plan.retries += call.retry_count + 1  # this attempt's first request and the SDK's retries
    if rule.tag not in plan.tags:
        plan.tags.append(rule.tag)
    return delay


def _settle(
    result: Any,
    call: PendingCall,
    plan: Plan,
    cache: ResponseCache | None,
    held: limiter.Held,
    finish: Callable[[], None],
    track: Callable[[Any, PendingCall, Callable[[], None]], Any],
) -> Any:
    payload = parsed(result)
    if call.stream:
        track(payload, call, finish)
        # A stream the app drops without reading or closing must not keep its slot.
        with contextlib.suppress(TypeError):  # not weak-referenceable: released at its end
            weakref.finalize(payload, held.release)
        return result
    call.ended = time.perf_counter()
    call.response = payload
    if plan.cache_key is not None and cache is not None:
        cache.put(plan.cache_key, payload)
    finish()
    return result
