"""Runbook controls: the store (SQLite and PostgreSQL), the activities, the decision logic, and
their enforcement by the instrumentation against llmock with the real OpenAI SDK."""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import openai
import pytest
from llmock.pytest_plugin import LLMock
from pagerloop_sdk import (
    FeatureDisabled,
    Recorder,
    backoff,
    instrument,
    openai_client,
    response_cache,
)
from pagerloop_sdk import controls as ctl
from pagerloop_sdk.context import llm_context
from pagerloop_sdk.limiter import Limiter
from sqlalchemy import Engine, event, text
from sqlmodel import Session, select
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.controls import (
    ControlActivities,
    ControlSpec,
    RevertControls,
    SetControl,
)
from instrumentation.store_controls import StoreControls, source_for
from instrumentation.store_sink import StoreSink
from stores import controls
from stores.engine import create_schema, make_engine
from stores.llm_calls import CallRecord, LLMCall
from stores.writer import write_calls
from tests.helpers import put_control, recorded

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
CHAT = [{"role": "user", "content": "Summarize the quarterly financial report revenue"}]


# --- the store ---------------------------------------------------------------------------


def test_setting_a_control_again_refreshes_the_same_one(store: Engine) -> None:
    first = put_control(store, "reroute", "gpt-4.1-mini", model="gpt-4.1", now=NOW)
    later = NOW + timedelta(minutes=5)
    again = put_control(
        store, "reroute", "gpt-4.1-nano", model="gpt-4.1", now=later, reason="cheaper"
    )

    assert again.id == first.id
    assert again.key == "incident-error_rate-global-1/reroute/*/gpt-4.1"
    assert (again.value, again.reason) == ("gpt-4.1-nano", "cheaper")
    assert controls.utc(again.created_at) == NOW
    assert controls.utc(again.updated_at) == later
    assert controls.utc(again.expires_at) == later + timedelta(hours=1)
    assert [c.id for c in controls.active(store, later)] == [first.id]
    # Another target is another control.
    other = put_control(store, "reroute", "gpt-4.1-mini", model="o3", now=NOW)
    assert other.id != first.id


def test_revert_reports_each_control_once_and_setting_brings_it_back(store: Engine) -> None:
    throttle = put_control(store, "concurrency", "4", feature="chat", now=NOW)
    cap = put_control(store, "max_tokens", "512", now=NOW)
    put_control(store, "disable", feature="search", incident="incident-other", now=NOW)
    later = NOW + timedelta(minutes=1)

    reverted = controls.revert(
        store, "incident-error_rate-global-1", later, reverted_by="alice", reason="fixed"
    )
    assert [c.id for c in reverted] == [throttle.id, cap.id]
    assert all(c.reverted_by == "alice" and c.revert_reason == "fixed" for c in reverted)
    assert controls.revert(store, "incident-error_rate-global-1", later) == []
    assert [c.kind for c in controls.active(store, later)] == ["disable"]

    back = put_control(store, "concurrency", "2", feature="chat", now=later)
    assert back.id == throttle.id
    assert back.reverted_at is None
    assert back.value == "2"
    assert [c.id for c in controls.active(store, later, "incident-error_rate-global-1")] == [
        throttle.id
    ]


def test_revert_by_keys_and_by_id(store: Engine) -> None:
    a = put_control(store, "cache", feature="faq", now=NOW)
    b = put_control(store, "backoff", "5", now=NOW)
    [only] = controls.revert(store, a.incident_id, NOW, keys=[a.key])
    assert only.id == a.id
    assert controls.revert(store, a.incident_id, NOW, keys=[]) == []

    assert b.id is not None
    found = controls.revert_id(store, b.id, NOW, reverted_by="bob")
    assert found is not None
    assert found[1] is True
    again = controls.revert_id(store, b.id, NOW, reverted_by="bob")
    assert again is not None
    assert again[1] is False
    assert controls.revert_id(store, 9999, NOW, reverted_by="bob") is None


def test_expired_controls_stop_applying_but_stay_listed(store: Engine) -> None:
    lasting = put_control(store, "pin", "gpt-4.1-2025-04-14", model="gpt-4.1", now=NOW)
    put_control(store, "max_tokens", "256", now=NOW, ttl=timedelta(minutes=10))
    after = NOW + timedelta(minutes=30)

    assert [c.id for c in controls.active(store, after)] == [lasting.id]
    assert len(controls.listed(store, after, include_past=True)) == 2
    assert [c.id for c in controls.listed(store, after)] == [lasting.id]
    # Reverting the incident's controls reports only the one still in force.
    reverted = controls.revert(store, lasting.incident_id, after)
    assert [c.id for c in reverted] == [lasting.id]


def test_extending_pushes_back_only_the_incidents_controls_in_force(store: Engine) -> None:
    short = put_control(store, "max_tokens", "256", now=NOW, ttl=timedelta(minutes=10))
    long = put_control(
        store, "pin", "gpt-4.1-2025-04-14", model="gpt-4.1", now=NOW, ttl=timedelta(hours=9)
    )
    gone = put_control(store, "disable", feature="summaries", now=NOW)
    controls.revert(store, gone.incident_id, NOW, keys=[gone.key])
    other = put_control(
        store, "backoff", "5", model="gpt-4.1", incident="incident-other-1", now=NOW
    )

    later = NOW + timedelta(minutes=5)
    until = later + timedelta(hours=4)
    extended = controls.extend(store, short.incident_id, later, until)

    expiry = {
        c.id: controls.utc(c.expires_at) for c in controls.listed(store, later, include_past=True)
    }
    assert [c.id for c in extended] == [short.id, long.id]
    assert expiry[short.id] == until
    assert expiry[long.id] == NOW + timedelta(hours=9)  # never shortened
    assert expiry[gone.id] == NOW + timedelta(hours=1)  # reverted stays reverted
    assert expiry[other.id] == NOW + timedelta(hours=1)  # another incident's
    # Expired ones are not brought back.
    assert controls.extend(store, short.incident_id, NOW + timedelta(hours=10), until) == []


def test_the_call_log_names_the_controls_on_both_write_paths(store: Engine) -> None:
    records = [
        CallRecord(ts=NOW, model="gpt-4.1", status="success", latency_ms=5.0, controls=tag)
        for tag in ("reroute#3,max_tokens#5", None)
    ]
    write_calls(store, records)
    with Session(store) as session:
        rows = list(session.exec(select(LLMCall).order_by(LLMCall.id)))
    assert [r.controls for r in rows] == ["reroute#3,max_tokens#5", None]


# --- the activities ------------------------------------------------------------------------


async def test_control_activities_set_list_and_revert_idempotently(store: Engine) -> None:
    env = ActivityEnvironment()
    activities = ControlActivities(store)
    request = SetControl(
        "incident-rate_limit_exhaustion-model:gpt-4.1-1",
        ControlSpec("reroute", model="gpt-4.1", value="gpt-4.1-mini", reason="429s"),
        set_by="runbook:rate_limit_exhaustion",
    )
    ref = await env.run(activities.set, request)
    retried = await env.run(activities.set, request)
    assert retried == ref
    assert ref.key == "incident-rate_limit_exhaustion-model:gpt-4.1-1/reroute/*/gpt-4.1"
    assert ref.description == "reroute gpt-4.1 -> gpt-4.1-mini"
    throttle = await env.run(
        activities.set,
        SetControl(request.incident_id, ControlSpec("concurrency", feature="chat", value="4"), "x"),
    )
    assert "4" in throttle.description
    assert "chat" in throttle.description

    listed = await env.run(activities.list_for, request.incident_id)
    assert [c.id for c in listed.controls] == [ref.id, throttle.id]
    assert (await env.run(activities.list_for, "incident-unrelated")).controls == []

    reverted = await env.run(
        activities.revert, RevertControls(request.incident_id, keys=[ref.key], reason="ok")
    )
    assert [c.id for c in reverted.controls] == [ref.id]
    reverted = await env.run(activities.revert, RevertControls(request.incident_id))
    assert [c.id for c in reverted.controls] == [throttle.id]
    assert (await env.run(activities.revert, RevertControls(request.incident_id))).controls == []
    assert (await env.run(activities.list_for, request.incident_id)).controls == []

    # Setting it again after the revert puts the same control back in force.
    back = await env.run(activities.set, request)
    assert back.id == ref.id
    assert [c.id for c in (await env.run(activities.list_for, request.incident_id)).controls] == [
        ref.id
    ]


@pytest.mark.parametrize(
    "spec",
    [
        ControlSpec("throttle", value="4"),
        ControlSpec("concurrency", value="many"),
        ControlSpec("max_tokens", value="0"),
        ControlSpec("reroute", model="gpt-4.1"),
        ControlSpec("cache", ttl_seconds=0),
    ],
)
async def test_a_control_that_cannot_be_enforced_is_refused_for_good(
    tmp_path: Path, spec: ControlSpec
) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'stores.db'}")
    create_schema(engine)
    with pytest.raises(ApplicationError) as raised:
        await ActivityEnvironment().run(
            ControlActivities(engine).set, SetControl("incident-x", spec, "runbook:test")
        )
    assert raised.value.non_retryable
    assert controls.listed(engine, NOW, include_past=True) == []


# --- the decisions (pure) ----------------------------------------------------------------


def rule(id: int, kind: str, value: str = "", **target: Any) -> ctl.Rule:
    return ctl.Rule(id, kind, value=value, incident_id="inc", reason="r", **target)


def test_the_most_specific_then_newest_route_wins() -> None:
    rules = [
        rule(1, "reroute", "gpt-4.1-mini"),
        rule(2, "reroute", "gpt-4.1-nano", model="gpt-4.1"),
        rule(3, "pin", "gpt-4.1-2025-04-14", model="gpt-4.1", feature="chat"),
        rule(4, "reroute", "o4-mini", model="gpt-4.1"),
    ]
    route = ctl.decide(rules, {}, {}, "chat", "chat", "gpt-4.1")
    assert route is not None
    assert route.route == rules[2]
    route = ctl.decide(rules, {}, {}, "chat", "search", "gpt-4.1")
    assert route is not None
    assert route.route == rules[3]
    route = ctl.decide(rules, {}, {}, "responses", None, "o3")
    assert route is not None
    assert route.route == rules[0]
    # Embeddings are never rerouted to a chat model.
    assert ctl.decide(rules, {}, {}, "embeddings", None, "text-embedding-3-small") is None


def test_the_tightest_token_cap_applies_and_unmatched_calls_have_no_decision() -> None:
    rules = [
        rule(1, "max_tokens", "512"),
        rule(2, "max_tokens", "128", feature="summarizer"),
        rule(3, "disable", feature="beta"),
    ]
    decision = ctl.decide(rules, {}, {}, "chat", "summarizer", "gpt-4.1")
    assert decision is not None
    assert decision.cap == rules[1]
    assert decision.disabled is None
    decision = ctl.decide(rules, {}, {}, "chat", "beta", "gpt-4.1")
    assert decision is not None
    assert decision.disabled == rules[2]
    assert ctl.decide(rules[2:], {}, {}, "chat", "chat", "gpt-4.1") is None


@pytest.mark.parametrize(
    ("operation", "given", "cap", "sent", "changed"),
    [
        ("chat", {"max_tokens": 2000}, 256, {"max_tokens": 256}, True),
        ("chat", {"max_tokens": 100}, 256, {"max_tokens": 100}, False),
        ("chat", {}, 256, {"max_completion_tokens": 256}, True),
        ("chat", {"max_completion_tokens": 900}, 256, {"max_completion_tokens": 256}, True),
        ("chat", {"max_tokens": None}, 64, {"max_tokens": None, "max_completion_tokens": 64}, True),
        ("responses", {"max_output_tokens": 4000}, 300, {"max_output_tokens": 300}, True),
        ("responses", {}, 300, {"max_output_tokens": 300}, True),
        ("embeddings", {}, 300, {}, False),
    ],
)
def test_token_caps(
    operation: str, given: dict[str, Any], cap: int, sent: dict[str, Any], changed: bool
) -> None:
    kwargs = dict(given)
    assert ctl.cap_tokens(operation, kwargs, cap) is changed
    assert kwargs == sent


def test_identical_requests_share_a_cache_key() -> None:
    key = response_cache.cache_key
    one = key("chat", {"model": "gpt-4.1", "messages": CHAT, "temperature": 0})
    two = key("chat", {"temperature": 0, "messages": CHAT, "model": "gpt-4.1"})
    assert one == two
    assert one != key("chat", {"model": "gpt-4.1", "messages": CHAT, "temperature": 1})
    assert one != key("responses", {"model": "gpt-4.1", "messages": CHAT})


def test_backoff_is_full_jitter_under_an_exponential_ceiling_and_honors_retry_after() -> None:
    assert backoff.backoff_delay(1, None, rand=lambda: 0.0) == 0.0
    assert backoff.backoff_delay(1, None, rand=lambda: 1.0) == backoff.BACKOFF_BASE
    assert backoff.backoff_delay(3, None, rand=lambda: 1.0) == 4 * backoff.BACKOFF_BASE
    assert backoff.backoff_delay(30, None, rand=lambda: 1.0) == backoff.BACKOFF_CAP
    assert backoff.backoff_delay(1, 7.5, rand=lambda: 0.5) == 7.5
    assert backoff.backoff_delay(1, backoff.RETRY_AFTER_MAX + 1) is None


def test_a_limiter_hands_slots_in_order_and_widens_when_resized() -> None:
    limiter = Limiter(1)
    limiter.acquire()
    order: list[int] = []

    def wait(n: int) -> None:
        limiter.acquire()
        order.append(n)

    threads = [threading.Thread(target=wait, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)  # queue them in a known order
    assert order == []
    limiter.release()
    time.sleep(0.05)
    assert order == [0]
    limiter.resize(3)  # both others at once: they may finish in any order
    for thread in threads:
        thread.join(2)
    assert order[0] == 0
    assert sorted(order) == [0, 1, 2]
    assert limiter.in_flight == 3


async def test_an_async_waiter_that_gives_up_leaves_no_slot_behind() -> None:
    limiter = Limiter(1)
    await limiter.acquire_async()
    waiting = asyncio.ensure_future(limiter.acquire_async())
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    limiter.release()
    assert limiter.in_flight == 0
    await asyncio.wait_for(limiter.acquire_async(), 1)
    assert limiter.in_flight == 1


# --- enforcement through the real SDK against llmock ---------------------------------------


@pytest.fixture
def recorder(engine: Engine) -> Iterator[Recorder]:
    recorder = Recorder(StoreSink(engine), quality_sample_rate=0.0, flush_interval=0.05)
    yield recorder
    recorder.close()


def client_for(llmock: LLMock, recorder: Recorder, **options: Any) -> openai.OpenAI:
    """An instrumented client reading the controls of the recorder's store (the default)."""
    return instrument(
        openai.OpenAI(base_url=llmock.base_url(), api_key="k", max_retries=0),
        recorder=recorder,
        **options,
    )


def test_reroute_sends_the_other_model_and_the_record_names_the_control(
    llmock: LLMock, recorder: Recorder, engine: Engine
) -> None:
    reroute = put_control(engine, "reroute", "gpt-4.1-mini", model="gpt-4.1")
    client = client_for(llmock, recorder)

    answer = client.chat.completions.create(model="gpt-4.1", messages=CHAT)
    assert llmock.last_request.body["model"] == "gpt-4.1-mini"
    client.chat.completions.create(model="o3", messages=CHAT)
    assert llmock.last_request.body["model"] == "o3"

    # Calls whose body the app reads itself are not recorded, but still rerouted.
    with client.chat.completions.with_streaming_response.create(
        model="gpt-4.1", messages=CHAT
    ) as raw:
        raw.read()
    assert llmock.last_request.body["model"] == "gpt-4.1-mini"

    rerouted, untouched = recorded(recorder, engine)
    assert (rerouted.model, rerouted.response_model) == ("gpt-4.1", answer.model)
    assert rerouted.controls == f"reroute#{reroute.id}"
    assert untouched.controls is None


def test_pin_applies_to_its_feature_only(
    llmock: LLMock, recorder: Recorder, engine: Engine
) -> None:
    pin = put_control(engine, "pin", "gpt-4.1-2025-04-14", model="gpt-4.1", feature="summarizer")
    client = client_for(llmock, recorder)

    with llm_context(feature="summarizer"):
        client.responses.create(model="gpt-4.1", input="Summarize the report")
    assert llmock.last_request.body["model"] == "gpt-4.1-2025-04-14"
    with llm_context(feature="chat"):
        client.responses.create(model="gpt-4.1", input="Summarize the report")
    assert llmock.last_request.body["model"] == "gpt-4.1"
    assert [r.controls for r in recorded(recorder, engine)] == [f"pin#{pin.id}", None]


def test_max_tokens_caps_chat_and_responses(
    llmock: LLMock, recorder: Recorder, engine: Engine
) -> None:
    cap = put_control(engine, "max_tokens", "64")
    client = client_for(llmock, recorder)

    client.chat.completions.create(model="gpt-4.1", messages=CHAT, max_tokens=2000)
    assert llmock.last_request.body["max_tokens"] == 64
    client.chat.completions.create(model="gpt-4.1", messages=CHAT)
    assert llmock.last_request.body["max_completion_tokens"] == 64
    client.chat.completions.create(model="gpt-4.1", messages=CHAT, max_tokens=10)
    assert llmock.last_request.body["max_tokens"] == 10
    client.responses.create(model="gpt-4.1", input="hello", max_output_tokens=500)
    assert llmock.last_request.body["max_output_tokens"] == 64

    tag = f"max_tokens#{cap.id}"
    assert [r.controls for r in recorded(recorder, engine)] == [tag, tag, None, tag]


def test_a_disabled_feature_raises_and_sends_nothing(
    llmock: LLMock, recorder: Recorder, engine: Engine
) -> None:
    disable = put_control(engine, "disable", feature="beta", reason="quality collapse")
    client = client_for(llmock, recorder)

    with llm_context(feature="beta"), pytest.raises(FeatureDisabled) as raised:
        client.chat.completions.create(model="gpt-4.1", messages=CHAT)
    error = raised.value
    assert (error.feature, error.reason, error.incident_id) == (
        "beta",
        "quality collapse",
        disable.incident_id,
    )
    assert error.control_id == disable.id
    assert isinstance(error, openai.OpenAIError)  # an app's OpenAI fallback catches it too
    assert llmock.requests == []

    with llm_context(feature="chat"):
        client.chat.completions.create(model="gpt-4.1", messages=CHAT)
    assert len(llmock.requests) == 1
    assert [r.feature for r in recorded(recorder, engine)] == ["chat"]


def test_cache_serves_identical_requests_where_the_app_enabled_it(
    llmock: LLMock, recorder: Recorder, engine: Engine
) -> None:
    cache = put_control(engine, "cache", feature="faq")
    client = client_for(llmock, recorder, response_cache=16)

    with llm_context(feature="faq", session_id="s1", user_id="u1"):
        first = client.chat.completions.create(model="gpt-4.1", messages=CHAT, temperature=0)
    with llm_context(feature="faq", session_id="s2", user_id="u2"):
        second = client.chat.completions.create(temperature=0, messages=CHAT, model="gpt-4.1")
        client.chat.completions.create(model="gpt-4.1", messages=CHAT, temperature=1)
        list(client.chat.completions.create(model="gpt-4.1", messages=CHAT, stream=True))
    assert len(llmock.requests) == 3  # the repeat was served from the cache, nothing else
    assert second.choices[0].message.content == first.choices[0].message.content
    assert second is not first

    rows = recorded(recorder, engine)
    assert [r.controls for r in rows] == [None, f"cache#{cache.id}", None, None]
    hit = rows[1]
    assert (hit.status, hit.input_tokens, hit.output_tokens) == ("success", 0, 0)
    assert hit.cost_usd == 0
    assert rows[0].input_tokens

    # Copies share the cache; a client without a cache of its own sends every request.
    with llm_context(feature="faq"):
        client.with_options(timeout=30).chat.completions.create(
            model="gpt-4.1", messages=CHAT, temperature=0
        )
        assert len(llmock.requests) == 3
        plain = client_for(llmock, recorder)
        plain.chat.completions.create(model="gpt-4.1", messages=CHAT, temperature=0)
        assert len(llmock.requests) == 4


def test_answers_kept_before_an_outage_are_served_once_a_cache_control_is_set(
    llmock: LLMock, recorder: Recorder, engine: Engine
) -> None:
    """The api_outage runbook's "serve cached responses": the cache fills while no control is
    in force, and serves only under a cache control, whichever incident set it."""
    source = StoreControls(engine, ttl=3600)  # refreshed by hand below
    client = client_for(llmock, recorder, controls=source, response_cache=4)
    other = [{"role": "user", "content": "Which regions saw the largest growth?"}]

    def ask(messages: list[dict[str, str]] = CHAT, feature: str = "faq") -> str | None:
        with llm_context(feature=feature):
            answer = client.chat.completions.create(model="gpt-4.1", messages=messages)
        return answer.choices[0].message.content

    before = ask()
    assert ask() == before
    assert len(llmock.requests) == 2  # kept, but not served: no cache control yet

    llmock.outage()  # every request 503 from now on
    with pytest.raises(openai.InternalServerError):
        ask()
    first = put_control(engine, "cache", feature="faq", incident="incident-api_outage-global-1")
    source.refresh()
    assert ask() == before  # served from the cache: nothing sent
    assert len(llmock.requests) == 3
    with pytest.raises(openai.InternalServerError):
        ask(other)  # never answered: nothing to serve
    with pytest.raises(openai.InternalServerError):
        ask(feature="search")  # the control does not match the call
    assert len(llmock.requests) == 5

    # The next incident's control serves the same answers: the key names no control.
    controls.revert(engine, first.incident_id, datetime.now(UTC))
    second = put_control(engine, "cache", incident="incident-api_outage-global-2")
    source.refresh()
    assert ask() == before
    assert len(llmock.requests) == 5
    source.close()

    rows = recorded(recorder, engine)
    assert [(r.status, r.controls) for r in rows] == [
        ("success", None),
        ("success", None),
        ("server_error", None),
        ("success", f"cache#{first.id}"),
        ("server_error", None),
        ("server_error", None),
        ("success", f"cache#{second.id}"),
    ]
    assert (rows[3].input_tokens, rows[3].output_tokens, rows[3].cost_usd) == (0, 0, 0)


async def test_async_clients_keep_and_serve_answers_too(
    llmock: LLMock, recorder: Recorder, engine: Engine
) -> None:
    source = StoreControls(engine, ttl=3600)
    client = instrument(
        openai.AsyncOpenAI(base_url=llmock.base_url(), api_key="k", max_retries=0),
        recorder=recorder,
        controls=source,
        response_cache=2,
    )
    before = await client.responses.create(model="gpt-4.1", input="Summarize the report")
    llmock.outage()
    cache = put_control(engine, "cache", model="gpt-4.1")
    source.refresh()
    served = await client.responses.create(model="gpt-4.1", input="Summarize the report")
    assert served.output_text == before.output_text
    assert len(llmock.requests) == 1
    source.close()
    assert [r.controls for r in recorded(recorder, engine)] == [None, f"cache#{cache.id}"]


def test_the_response_cache_keeps_the_last_answers_for_max_age() -> None:
    now = 0.0
    cache = response_cache.ResponseCache(2, max_age=60, clock=lambda: now)
    cache.put("a", {"answer": ["a"]})
    cache.put("b", {"answer": ["b"]})
    served = cache.get("a")
    assert served == {"answer": ["a"]}
    served["answer"].append("changed by the caller")  # a copy: the cache is unchanged
    assert cache.get("a") == {"answer": ["a"]}
    cache.put("c", {"answer": ["c"]})  # "b" is the least recently used
    assert cache.get("b") is None
    assert len(cache) == 2

    now = 61.0  # "a" and "c" were answered too long ago to be served
    assert cache.get("a") is None
    cache.put("d", {"answer": ["d"]})
    assert cache.get("d") == {"answer": ["d"]}
    assert cache.get("c") is None
    assert len(cache) == 1
    cache.put("e", lambda: "not picklable")  # not kept, and no error for the call
    assert cache.get("e") is None

    small = response_cache.ResponseCache(8, max_bytes=300)
    small.put("a", "x" * 100)
    small.put("b", "y" * 100)
    small.put("c", "z" * 100)  # over the byte bound: "a" goes
    assert [small.get(k) is not None for k in "abc"] == [False, True, True]
    small.put("d", "w" * 1000)  # larger than the whole cache: not kept, nothing pushed out
    assert [small.get(k) is not None for k in "bcd"] == [True, True, False]


def test_clients_without_a_response_cache_never_compute_a_key(
    llmock: LLMock, recorder: Recorder, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: Any) -> str:
        raise AssertionError("a cache key was computed")

    monkeypatch.setattr(openai_client, "cache_key", boom)
    put_control(engine, "cache")
    client = client_for(llmock, recorder)
    client.chat.completions.create(model="gpt-4.1", messages=CHAT)
    client.chat.completions.create(model="gpt-4.1", messages=CHAT)
    assert len(llmock.requests) == 2


def test_backoff_retries_429s_honoring_retry_after(
    llmock: LLMock, recorder: Recorder, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backoff, "BACKOFF_BASE", 0.01)
    retrying = put_control(engine, "backoff", "4", model="gpt-4.1")
    client = client_for(llmock, recorder)

    llmock.rate_limit(times=2, retry_after=0.2)
    client.chat.completions.create(model="gpt-4.1", messages=CHAT)
    attempts = llmock.requests
    assert [r.status for r in attempts] == [429, 429, 200]
    gaps = [b.started_at - a.ended_at for a, b in itertools.pairwise(attempts)]
    assert min(gaps) >= 0.19  # never sooner than Retry-After

    llmock.reset().rate_limit(times=10, retry_after=0.01)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="gpt-4.1", messages=CHAT)
    assert len(llmock.requests) == 4  # the control's attempts, then the 429 reaches the app

    llmock.reset().rate_limit(times=1, retry_after=0.01)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="o3", messages=CHAT)  # not under the control
    assert len(llmock.requests) == 1

    succeeded, exhausted, other = recorded(recorder, engine)
    assert (succeeded.status, succeeded.retry_count) == ("success", 2)
    assert (exhausted.status, exhausted.http_status, exhausted.retry_count) == (
        "rate_limited",
        429,
        3,
    )
    assert succeeded.controls == exhausted.controls == f"backoff#{retrying.id}"
    assert (other.status, other.retry_count, other.controls) == ("rate_limited", 0, None)


def in_flight_peak(llmock: LLMock) -> int:
    events = sorted(
        [(r.started_at, 1) for r in llmock.requests] + [(r.ended_at, -1) for r in llmock.requests]
    )
    peak = level = 0
    for _, step in events:
        level += step
        peak = max(peak, level)
    return peak


def test_concurrency_limits_calls_in_flight_across_threads(
    llmock: LLMock, recorder: Recorder, engine: Engine
) -> None:
    throttle = put_control(engine, "concurrency", "2", feature="batch")
    client = client_for(llmock, recorder)
    llmock.delay(0.2, times=None)

    def one(feature: str) -> None:
        with llm_context(feature=feature):
            client.chat.completions.create(model="gpt-4.1", messages=CHAT)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, ["batch"] * 8))
    assert len(llmock.requests) == 8
    assert in_flight_peak(llmock) == 2

    llmock.reset().delay(0.2, times=None)
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(one, ["chat"] * 6))  # another feature: not throttled
    assert in_flight_peak(llmock) > 2

    rows = recorded(recorder, engine)
    assert [r.controls for r in rows].count(f"concurrency#{throttle.id}") == 8


async def test_async_callers_wait_for_a_slot_without_blocking_the_loop(
    llmock: LLMock, recorder: Recorder, engine: Engine
) -> None:
    put_control(engine, "concurrency", "1", model="gpt-4.1")
    client = instrument(
        openai.AsyncOpenAI(base_url=llmock.base_url(), api_key="k", max_retries=0),
        recorder=recorder,
    )
    llmock.delay(0.15, times=None)
    ticks = 0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0.01)

    beat = asyncio.ensure_future(ticker())
    await asyncio.gather(
        *(client.chat.completions.create(model="gpt-4.1", messages=CHAT) for _ in range(4))
    )
    done.set()
    await beat
    assert in_flight_peak(llmock) == 1
    assert ticks >= 30  # ~0.6 s of waiting, and the loop kept running throughout


async def test_async_clients_are_refused_rerouted_and_backed_off_too(
    llmock: LLMock, recorder: Recorder, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(backoff, "BACKOFF_BASE", 0.01)
    put_control(engine, "disable", feature="beta")
    put_control(engine, "reroute", "gpt-4.1-mini", model="gpt-4.1")
    put_control(engine, "backoff", "3")
    client = instrument(
        openai.AsyncOpenAI(base_url=llmock.base_url(), api_key="k", max_retries=0),
        recorder=recorder,
    )
    with llm_context(feature="beta"), pytest.raises(FeatureDisabled):
        await client.chat.completions.create(model="gpt-4.1", messages=CHAT)
    assert llmock.requests == []
    llmock.rate_limit(times=1, retry_after=0.01)
    stream = await client.chat.completions.create(model="gpt-4.1", messages=CHAT, stream=True)
    assert [chunk async for chunk in stream]
    assert [r.status for r in llmock.requests] == [429, 200]
    assert llmock.last_request.body["model"] == "gpt-4.1-mini"
    [row] = recorded(recorder, engine)
    assert (row.status, row.retry_count) == ("success", 1)
    assert row.controls is not None
    assert row.controls.startswith("reroute#")


def test_a_stream_holds_its_slot_until_it_ends(
    llmock: LLMock, recorder: Recorder, engine: Engine
) -> None:
    throttle = put_control(engine, "concurrency", "1")
    client = client_for(llmock, recorder)
    source = source_for(engine)

    stream = client.chat.completions.create(model="gpt-4.1", messages=CHAT, stream=True)
    limiter = source.snapshot().limiters[throttle.id]
    assert limiter.in_flight == 1
    list(stream)
    assert limiter.in_flight == 0
    abandoned = client.chat.completions.create(model="gpt-4.1", messages=CHAT, stream=True)
    assert limiter.in_flight == 1
    del abandoned  # never read nor closed: its slot comes back when it is collected
    gc.collect()
    assert limiter.in_flight == 0


def test_a_control_set_from_another_connection_applies_within_the_ttl(
    llmock: LLMock, store: Engine
) -> None:
    """The service's engine writes; the app's own engine (another pool, another process in
    real life) reads. Both backends."""
    app_engine = make_engine(store.url.render_as_string(hide_password=False))
    recorder = Recorder(StoreSink(app_engine), quality_sample_rate=0.0, flush_interval=0.05)
    client = client_for(llmock, recorder)

    def sent_model() -> str:
        client.chat.completions.create(model="gpt-4.1", messages=CHAT)
        return str(llmock.last_request.body["model"])

    try:
        assert sent_model() == "gpt-4.1"
        reroute = put_control(store, "reroute", "gpt-4.1-mini", model="gpt-4.1")
        set_at = time.monotonic()
        while sent_model() != "gpt-4.1-mini":
            assert time.monotonic() - set_at < ctl.DEFAULT_TTL + 1.0
            time.sleep(0.05)

        controls.revert(store, reroute.incident_id, datetime.now(UTC))
        reverted_at = time.monotonic()
        while sent_model() != "gpt-4.1":
            assert time.monotonic() - reverted_at < ctl.DEFAULT_TTL + 1.0
            time.sleep(0.05)
        rows = recorded(recorder, app_engine)
        assert f"reroute#{reroute.id}" in {r.controls for r in rows}
    finally:
        source_for(app_engine).close()
        recorder.close()
        app_engine.dispose()


def test_the_store_is_read_once_per_ttl_whatever_the_traffic(
    llmock: LLMock, recorder: Recorder, engine: Engine
) -> None:
    reads = 0

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        nonlocal reads
        if "FROM controls" in statement:
            reads += 1

    event.listen(engine, "before_cursor_execute", count)
    put_control(engine, "max_tokens", "100")
    source = StoreControls(engine, ttl=0.5)
    client = client_for(llmock, recorder, controls=source)
    started = time.monotonic()
    for _ in range(60):
        client.chat.completions.create(model="gpt-4.1", messages=CHAT)
    elapsed = time.monotonic() - started
    source.close()
    assert llmock.last_request.body["max_completion_tokens"] == 100
    assert 1 <= reads <= 2 + elapsed / 0.5


def test_a_failing_store_keeps_the_last_known_controls_and_logs_once(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    reroute = put_control(engine, "reroute", "gpt-4.1-mini")
    source = StoreControls(engine, ttl=3600)  # refreshed by hand below
    assert [r.id for r in source.refresh().rules] == [reroute.id]

    with engine.begin() as connection:
        connection.execute(text("ALTER TABLE controls RENAME TO controls_gone"))
    with caplog.at_level(logging.WARNING, logger="pagerloop_sdk.controls"):
        for _ in range(3):
            assert [r.id for r in source.refresh().rules] == [reroute.id]
    assert len([r for r in caplog.records if "runbook controls" in r.message]) == 1
    source.close()


def test_no_store_means_no_controls(llmock: LLMock, engine: Engine) -> None:
    class Nowhere:
        def write(self, calls: Any, scores: Any) -> None:
            pass

    put_control(engine, "disable")
    recorder = Recorder(Nowhere(), quality_sample_rate=0.0)
    client = client_for(llmock, recorder)
    client.chat.completions.create(model="gpt-4.1", messages=CHAT)
    off = client_for(llmock, Recorder(StoreSink(engine)), controls=False)
    off.chat.completions.create(model="gpt-4.1", messages=CHAT)
    assert len(llmock.requests) == 2
    # Named explicitly, the store's disable applies.
    on = client_for(llmock, recorder, controls=source_for(engine))
    with pytest.raises(FeatureDisabled):
        on.chat.completions.create(model="gpt-4.1", messages=CHAT)
