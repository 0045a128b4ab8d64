"""Calls served from the response cache: in the call log, out of the golden signals.

A cache hit never reached OpenAI. Its row stays in `llm_calls` (source "cache", with the
`cache#id` control that served it) so that the call log shows what the control did, but the
rollups, the detectors' window aggregates and the runbooks' diagnosis queries do not count it:
during an outage, answers from the cache must not pass for OpenAI recovering.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import asdict, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import openai
import pytest
from llmock.pytest_plugin import LLMock
from pagerloop_sdk import Recorder, instrument
from pagerloop_sdk.context import llm_context
from sqlalchemy import Engine, func, select
from sqlmodel import Session
from sqlmodel import select as orm_select

from activities.diagnosis import DiagnosisActivities, DiagnosisQuery, SignalCheck
from detectors.config import DetectorRules
from detectors.reading import SignalJudge
from domain.histogram import bucket
from instrumentation.store_controls import StoreControls
from instrumentation.store_sink import StoreSink
from stores import controls, writer
from stores.aggregates import window_aggregates
from stores.llm_calls import (
    CACHE_SOURCE,
    CallRecord,
    LatencyRollup,
    LLMCall,
    UsageRollup,
    new_call_id,
    utc,
)
from stores.quality import QualityScore
from stores.writer import write_calls

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
UNALIGNED = NOW + timedelta(seconds=25, microseconds=500_000)
DAY = timedelta(days=1)
CACHE_TAG = "cache#7"


def sent(ts: datetime, status: str = "success", **extra: Any) -> CallRecord:
    fields: dict[str, Any] = {"model": "gpt-4.1", "latency_ms": 1200.0, **extra}
    return CallRecord(ts=ts, status=status, **fields)


def hit(ts: datetime, **extra: Any) -> CallRecord:
    """A call as the instrumentation records a cache hit: success, no tokens, no cost."""
    fields: dict[str, Any] = {
        "model": "gpt-4.1",
        "latency_ms": 0.05,
        "input_tokens": 0,
        "output_tokens": 0,
        "cached_input_tokens": 0,
        "cost_usd": 0.0,
        "source": CACHE_SOURCE,
        "controls": CACHE_TAG,
        **extra,
    }
    return CallRecord(ts=ts, status="success", **fields)


def usage_totals(engine: Engine) -> dict[str, float]:
    usage = UsageRollup.__table__.c  # type: ignore[attr-defined]
    names = ("calls", "successes", "server_errors", "input_tokens", "cost_usd", "latency_ms_sum")
    with engine.connect() as connection:
        sums = connection.execute(select(*(func.sum(usage[n]) for n in names))).one()
    return {name: float(value or 0) for name, value in zip(names, sums, strict=True)}


def latency_buckets(engine: Engine) -> dict[int, int]:
    lat = LatencyRollup.__table__.c  # type: ignore[attr-defined]
    query = select(lat.bucket, func.sum(lat.calls)).group_by(lat.bucket)
    with engine.connect() as connection:
        return {int(b): int(n) for b, n in connection.execute(query)}


def call_rows(engine: Engine) -> list[LLMCall]:
    with Session(engine) as session:
        return list(session.exec(orm_select(LLMCall).order_by(LLMCall.id)))


# --- the write path --------------------------------------------------------------------------


def test_cache_hits_are_logged_with_their_control_but_not_rolled_up(store: Engine) -> None:
    failing = [sent(NOW - timedelta(seconds=10 + i), "server_error") for i in range(8)]
    answered = [
        sent(NOW - timedelta(seconds=30 + i), input_tokens=100, cost_usd=0.25) for i in range(2)
    ]
    hits = [hit(NOW - timedelta(seconds=5 + i)) for i in range(30)]
    mixed = failing[:4] + hits[:20] + answered + failing[4:]
    random.Random(3).shuffle(mixed)
    write_calls(store, mixed)  # cache hits among calls that were sent
    write_calls(store, hits[20:])  # nothing but cache hits
    write_calls(store, [sent(NOW - timedelta(seconds=50), latency_ms=300.0)])  # none at all

    rows = call_rows(store)
    assert len(rows) == 41
    cached = [r for r in rows if r.source == CACHE_SOURCE]
    assert len(cached) == 30
    assert {(r.status, r.controls, r.input_tokens, r.cost_usd) for r in cached} == {
        ("success", CACHE_TAG, 0, 0.0)
    }
    assert [r.source for r in rows].count("sdk") == 11

    # The rollups hold the 11 calls that were sent, nothing of the 30 answered in-process.
    totals = usage_totals(store)
    assert totals == {
        "calls": 11,
        "successes": 3,
        "server_errors": 8,
        "input_tokens": 200,
        "cost_usd": pytest.approx(0.5),
        "latency_ms_sum": pytest.approx(10 * 1200.0 + 300.0),
    }
    assert latency_buckets(store) == {bucket(1200.0): 10, bucket(300.0): 1}

    found = window_aggregates(store, NOW, 300).scope("global")
    assert (found.calls, found.successes, found.server_errors) == (11, 3, 8)
    assert found.latency_histogram == {bucket(1200.0): 10, bucket(300.0): 1}


def test_the_rollups_of_a_batch_leave_its_cache_hits_out() -> None:
    def rows(records: list[CallRecord]) -> list[tuple[object, ...]]:
        return [writer._call_tuple(record, utc) for record in records]

    batch = rows([sent(NOW), sent(NOW, source="ingest"), sent(NOW, source="otlp")])
    assert not writer.has_cache_hits(batch)
    with_hits = [*batch, *rows([hit(NOW)])]
    assert writer.has_cache_hits(with_hits)

    usage, histogram = writer.rollups(batch)
    assert sum(row[len(writer.ROLLUP_KEYS)] for row in usage) == 3  # calls
    assert writer.rollups(with_hits) == (usage, histogram)


# --- the diagnosis queries and the re-read of a signal ----------------------------------------


def outage_traffic(
    end: datetime, window: int, seed: int
) -> tuple[list[CallRecord], list[CallRecord]]:
    """Mostly 5xx among the calls sent, from 90 s before the window to 60 s after it, and
    cache hits among them, on and beside the window's edges too. Costs are binary fractions and
    latencies whole milliseconds, so that sums do not depend on the order they are added in."""
    rng = random.Random(seed)
    start = end - timedelta(seconds=window)
    span = int((window + 150) * 1_000_000)

    def when() -> datetime:
        return start - timedelta(seconds=90) + timedelta(microseconds=rng.randrange(span))

    models, features = ("gpt-4.1", "o3"), ("chat", "search", None)
    calls = []
    for i in range(300):
        status = rng.choices(
            ("success", "server_error", "rate_limited", "error", "timeout"), (20, 65, 9, 3, 3)
        )[0]
        failed = status != "success"
        calls.append(
            sent(
                when(),
                status,
                model=rng.choice(models),
                feature=rng.choice(features),
                latency_ms=float(rng.randrange(50, 20_000)),
                input_tokens=rng.randrange(10, 20_000),
                output_tokens=None if failed else rng.randrange(1, 800),
                cost_usd=rng.randrange(1, 64) / 1024,
                retry_count=rng.randrange(4) if status == "rate_limited" else 0,
                error_type="APIError" if failed else None,
                error_message=f"{status} #{i}" if failed else None,
            )
        )
    tick = timedelta(microseconds=1)
    edges = [start, start + tick, start - tick, end, end - tick, end + tick]
    hits = [
        hit(ts, model=rng.choice(models), feature=rng.choice(features))
        for ts in [when() for _ in range(600)] + edges * 5
    ]
    return calls, hits


WINDOWS = [
    pytest.param(NOW, 900, id="aligned-15m"),
    pytest.param(UNALIGNED, 900, id="unaligned-15m"),
    pytest.param(UNALIGNED, 45, id="unaligned-45s-no-whole-minute"),
    pytest.param(UNALIGNED, 150, id="unaligned-150s"),
]
TRIGGERS = ("api_outage", "error_rate", "elevated_latency", "rate_limit_exhaustion")


async def answers(store: Engine, end: datetime, window: int) -> dict[str, Any]:
    """Every diagnosis answer and signal reading for the window, timestamps made relative."""
    activities = DiagnosisActivities(store, SignalJudge(DetectorRules(), daily_budget_usd=500.0))
    found: dict[str, Any] = {}
    for scope in ("global", "model:o3", "feature:chat"):
        q = DiagnosisQuery(scope=scope, end=end, window_seconds=window, limit=100)
        found[f"top_features {scope}"] = [asdict(f) for f in await activities.top_features(q)]
        found[f"rate_limits {scope}"] = [asdict(m) for m in await activities.rate_limits(q)]
        found[f"latency {scope}"] = [asdict(m) for m in await activities.latency(q)]
        found[f"recent_errors {scope}"] = [
            {**asdict(e), "last_seen": end - e.last_seen} for e in await activities.recent_errors(q)
        ]
        for trigger in TRIGGERS:
            reading = await activities.check_signal(SignalCheck(trigger, scope, end, 300))
            found[f"check_signal {trigger} {scope}"] = asdict(reading)
    return found


@pytest.mark.parametrize(("end", "window"), WINDOWS)
async def test_cache_hits_change_no_diagnosis_answer(
    store: Engine, end: datetime, window: int
) -> None:
    """The same calls, sent a day apart: today's among cache hits, yesterday's alone. Whole
    minutes (rollups) and partial ones (call rows) must give the same answers both days."""
    calls, hits = outage_traffic(end, window, seed=window)
    half = len(calls) // 2
    first = calls[:half] + hits[:300]
    random.Random(1).shuffle(first)
    write_calls(store, first)
    write_calls(store, hits[300:])
    write_calls(store, calls[half:])
    for batch in (calls[:half], calls[half:]):
        write_calls(store, [replace(c, ts=c.ts - DAY, call_id=new_call_id()) for c in batch])

    today = await answers(store, end, window)
    yesterday = await answers(store, end - DAY, window)
    assert today == yesterday

    # And they are the answers of the calls sent: the cache hits would have changed them.
    start = end - timedelta(seconds=window)
    in_window = [c for c in calls if start < c.ts <= end]
    assert sum(f["calls"] for f in today["top_features global"]) == len(in_window)
    assert sum(m["calls"] for m in today["rate_limits global"]) == len(in_window)
    assert sum(1 for h in hits if start < h.ts <= end) > len(in_window)
    # check_signal reads the whole minutes overlapping the last 300 s, as the detector does.
    first_minute = (end - timedelta(seconds=300)).replace(second=0, microsecond=0)
    judged = [c for c in calls if c.ts >= first_minute and c.ts.replace(second=0) < end]
    outage = today["check_signal api_outage global"]
    assert outage["calls"] == len(judged)
    server_errors = sum(c.status == "server_error" for c in judged)
    assert outage["values"]["server_error_rate"] == pytest.approx(server_errors / len(judged))
    assert outage["breached"]
    assert len(call_rows(store)) == 2 * len(calls) + len(hits)


# --- end to end: an outage served from the cache through the real SDK ------------------------

CHAT = [{"role": "user", "content": "Summarize the quarterly financial report revenue"}]


@pytest.fixture
def recorder(engine: Engine) -> Iterator[Recorder]:
    # Every successful call sampled for quality: cache hits must still not be scored.
    recorder = Recorder(StoreSink(engine), quality_sample_rate=1.0, flush_interval=0.05)
    yield recorder
    recorder.close()


async def test_an_outage_served_from_the_cache_stays_an_outage(
    llmock: LLMock, recorder: Recorder, engine: Engine
) -> None:
    source = StoreControls(engine, ttl=3600)  # refreshed by hand below
    client = instrument(
        openai.OpenAI(base_url=llmock.base_url(), api_key="k", max_retries=0),
        recorder=recorder,
        controls=source,
        response_cache=8,
    )

    def ask(content: str | None = None) -> str | None:
        messages = CHAT if content is None else [{"role": "user", "content": content}]
        with llm_context(feature="faq"):
            answer = client.chat.completions.create(model="gpt-4.1", messages=messages)
        return answer.choices[0].message.content

    def outage_calls(count: int) -> None:
        for i in range(count):
            with pytest.raises(openai.InternalServerError):
                ask(f"question {i} never answered before")

    activities = DiagnosisActivities(engine, SignalJudge(DetectorRules(), daily_budget_usd=500.0))

    async def api_outage() -> tuple[float, int, bool]:
        assert recorder.flush()
        end = datetime.now(UTC) + timedelta(seconds=1)
        reading = await activities.check_signal(SignalCheck("api_outage", "global", end, 300))
        aggregate = window_aggregates(engine, end, 300).scope("global")
        assert aggregate.calls == reading.calls
        return reading.values["server_error_rate"], reading.calls, reading.breached

    before = ask()  # answered, and kept in the cache
    llmock.outage()  # every request 503 from now on
    outage_calls(12)
    level, calls, breached = await api_outage()
    assert (level, calls, breached) == (pytest.approx(12 / 13), 13, True)

    cache = controls.upsert(
        engine,
        incident_id="incident-api_outage-global-1",
        kind="cache",
        feature="faq",
        model=None,
        value="",
        reason="serve cached responses",
        set_by="runbook:api_outage",
        expires_at=datetime.now(UTC) + timedelta(hours=1),
        now=datetime.now(UTC),
    )
    source.refresh()
    for _ in range(40):
        assert ask() == before  # served from the cache: nothing sent
    assert len(llmock.requests) == 13

    # Forty successes answered in-process: the outage is still at its level, and still breached.
    assert await api_outage() == (pytest.approx(12 / 13), 13, True)
    outage_calls(3)
    assert await api_outage() == (pytest.approx(15 / 16), 16, True)
    source.close()

    rows = call_rows(engine)
    assert len(rows) == 56
    cached = [r for r in rows if r.source == CACHE_SOURCE]
    assert len(cached) == 40
    assert {(r.status, r.controls, r.input_tokens, r.output_tokens) for r in cached} == {
        ("success", f"cache#{cache.id}", 0, 0)
    }
    assert {r.source for r in rows if r.source != CACHE_SOURCE} == {"sdk"}
    # Only the answer OpenAI gave was scored for quality, never its copies from the cache.
    with Session(engine) as session:
        scored = list(session.exec(orm_select(QualityScore.call_id)))
    assert scored == [rows[0].call_id]

    # The runbooks' diagnosis reads the 16 calls that reached OpenAI, not the 56 in the log.
    q = DiagnosisQuery(scope="global", end=datetime.now(UTC) + timedelta(seconds=1), limit=10)
    [feature] = await activities.top_features(q)
    assert (feature.feature, feature.calls) == ("faq", 16)
    [model] = await activities.rate_limits(q)
    assert model.calls == 16
    [errors] = await activities.recent_errors(q)
    assert (errors.status, errors.count) == ("server_error", 15)
    [slow] = await activities.latency(q)
    assert slow.calls == 16
