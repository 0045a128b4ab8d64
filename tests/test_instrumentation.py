"""The OpenAI SDK wrapper against llmock: real SDK, real HTTP, scripted faults, real store."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
from llmock.pytest_plugin import LLMock
from pagerloop_sdk import Recorder, instrument, llm_context
from pagerloop_sdk.pricing import DEFAULT_PRICES
from sqlalchemy import Engine
from sqlmodel import Session, select

from instrumentation.store_sink import StoreSink
from stores.llm_calls import CallRecord, LLMCall
from stores.quality import QualityScore, ScoreRecord
from tests.conftest import INGEST_KEY
from tests.fakes.server import ThreadedServer
from tests.helpers import recorded

SALT = "test-salt"
RAW_USER = "customer_42@example.com"


@pytest.fixture
def recorder(engine: Engine) -> Iterator[Recorder]:
    recorder = Recorder(StoreSink(engine), salt=SALT, quality_sample_rate=1.0, flush_interval=0.05)
    yield recorder
    recorder.close()


@pytest.fixture
def client(llmock: LLMock, recorder: Recorder) -> openai.OpenAI:
    return instrument(
        openai.OpenAI(base_url=llmock.base_url(), api_key="test", max_retries=2),
        recorder=recorder,
    )


def scores(engine: Engine) -> list[QualityScore]:
    with Session(engine) as session:
        return list(session.exec(select(QualityScore)))


CHAT = [{"role": "user", "content": "Summarize the quarterly financial report revenue"}]


def test_a_plain_chat_call_is_recorded_with_usage_cost_and_context(
    client: openai.OpenAI, recorder: Recorder, engine: Engine, llmock: LLMock
) -> None:
    with llm_context(
        feature="summarizer",
        team="content",
        environment="prod",
        user_id=RAW_USER,
        session_id="sess_1",
        metadata={"prompt_version": "v7"},
    ):
        response = client.chat.completions.create(model="gpt-4.1", messages=CHAT)

    [row] = recorded(recorder, engine)
    usage = response.usage
    assert usage is not None
    assert (row.operation, row.model, row.response_model) == ("chat", "gpt-4.1", response.model)
    assert (row.status, row.http_status, row.retry_count) == ("success", 200, 0)
    assert (row.input_tokens, row.output_tokens) == (usage.prompt_tokens, usage.completion_tokens)
    assert row.cost_usd == pytest.approx(
        (usage.prompt_tokens * 2.00 + usage.completion_tokens * 8.00) / 1e6
    )
    assert row.request_id == response._request_id
    assert row.finish_reason == "stop"
    assert row.ttft_ms is None
    assert row.latency_ms > 0
    assert (row.feature, row.team, row.environment, row.session_id) == (
        "summarizer",
        "content",
        "prod",
        "sess_1",
    )
    assert row.metadata_ == {"prompt_version": "v7"}
    assert row.user_hash is not None
    assert RAW_USER not in row.user_hash
    assert row.source == "sdk"

    # The request carried the hashed user and the attribution metadata (the seed's
    # TraceableRequest), for the OpenAI dashboard.
    body = llmock.last_request.body
    assert body["user"] == row.user_hash
    assert body["metadata"] == {
        "feature": "summarizer",
        "team": "content",
        "environment": "prod",
        "session_id": "sess_1",
        "prompt_version": "v7",
    }
    [score] = scores(engine)
    assert score.call_id == row.call_id
    assert score.source == "scorer"
    assert 0 <= score.score <= 1
    assert score.relevance is not None


def test_the_callers_own_user_and_metadata_win(
    client: openai.OpenAI, recorder: Recorder, engine: Engine, llmock: LLMock
) -> None:
    with llm_context(feature="chat", user_id=RAW_USER):
        client.chat.completions.create(
            model="gpt-4.1", messages=CHAT, user="their-own", metadata={"feature": "theirs"}
        )
    body = llmock.last_request.body
    assert body["user"] == "their-own"
    assert body["metadata"]["feature"] == "theirs"


def test_a_stream_is_recorded_with_ttft_and_usage_the_caller_never_sees(
    client: openai.OpenAI, recorder: Recorder, engine: Engine, llmock: LLMock
) -> None:
    llmock.slow_first_token(0.3)
    stream = client.chat.completions.create(model="gpt-4.1-mini", messages=CHAT, stream=True)
    assert isinstance(stream, openai.Stream)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)

    assert all(chunk.choices for chunk in chunks)  # the usage chunk we asked for is hidden
    assert llmock.last_request.body["stream_options"] == {"include_usage": True}
    [row] = recorded(recorder, engine)
    assert row.status == "success"
    assert row.finish_reason == "stop"
    assert row.ttft_ms is not None
    assert 300 <= row.ttft_ms <= row.latency_ms
    assert row.input_tokens is not None
    assert row.output_tokens is not None
    assert row.output_tokens > 0
    assert row.cost_usd == pytest.approx(
        DEFAULT_PRICES.cost_usd("gpt-4.1-mini", row.input_tokens, row.output_tokens)
    )
    [score] = scores(engine)
    assert score.call_id == row.call_id
    assert text


def test_a_caller_asking_for_usage_sees_the_usage_chunk(
    client: openai.OpenAI, recorder: Recorder, engine: Engine
) -> None:
    chunks = list(
        client.chat.completions.create(
            model="gpt-4.1",
            messages=CHAT,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage is not None
    assert chunks[-1].choices == []
    [row] = recorded(recorder, engine)
    assert row.output_tokens == chunks[-1].usage.completion_tokens


def test_rate_limits_exhaust_retries_and_are_rate_limited(
    client: openai.OpenAI, recorder: Recorder, engine: Engine, llmock: LLMock
) -> None:
    llmock.rate_limit(times=3, retry_after=0.05)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="gpt-4.1", messages=CHAT)
    [row] = recorded(recorder, engine)
    assert (row.status, row.http_status, row.retry_count) == ("rate_limited", 429, 2)
    assert row.error_type == "RateLimitError"
    assert row.error_message
    assert row.latency_ms >= 100  # two Retry-After waits
    assert row.cost_usd is None
    assert scores(engine) == []


def test_a_call_that_succeeds_after_a_retry_counts_it(
    client: openai.OpenAI, recorder: Recorder, engine: Engine, llmock: LLMock
) -> None:
    llmock.rate_limit(times=1, retry_after=0.05)
    client.chat.completions.create(model="gpt-4.1", messages=CHAT)
    [row] = recorded(recorder, engine)
    assert (row.status, row.retry_count) == ("success", 1)


@pytest.mark.parametrize(
    ("status", "expected"), [(503, "server_error"), (500, "server_error"), (400, "error")]
)
def test_http_errors(
    llmock: LLMock, recorder: Recorder, engine: Engine, status: int, expected: str
) -> None:
    client = instrument(
        openai.OpenAI(base_url=llmock.base_url(), api_key="k", max_retries=0), recorder=recorder
    )
    llmock.fail(status)
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(model="gpt-4.1", messages=CHAT)
    assert raised.value.status_code == status
    [row] = recorded(recorder, engine)
    assert (row.status, row.http_status) == (expected, status)


def test_timeouts_are_timeout(llmock: LLMock, recorder: Recorder, engine: Engine) -> None:
    client = instrument(
        openai.OpenAI(base_url=llmock.base_url(), api_key="k", max_retries=0, timeout=0.3),
        recorder=recorder,
    )
    llmock.delay(2)
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model="gpt-4.1", messages=CHAT)
    [row] = recorded(recorder, engine)
    assert (row.status, row.http_status, row.error_type) == ("timeout", None, "APITimeoutError")
    assert 250 <= row.latency_ms < 2000


def test_latency_is_measured(
    client: openai.OpenAI, recorder: Recorder, engine: Engine, llmock: LLMock
) -> None:
    llmock.delay(0.25)
    client.chat.completions.create(model="gpt-4.1", messages=CHAT)
    [row] = recorded(recorder, engine)
    assert row.latency_ms >= 250


def test_broken_streams_are_recorded_when_they_break(
    client: openai.OpenAI, recorder: Recorder, engine: Engine, llmock: LLMock
) -> None:
    llmock.disconnect(after_chunks=2)
    received: list[Any] = []
    stream = client.chat.completions.create(model="gpt-4.1", messages=CHAT, stream=True)
    with pytest.raises(openai.APIConnectionError):
        received.extend(stream)
    llmock.truncate(after_chunks=2)
    truncated = list(client.chat.completions.create(model="gpt-4.1", messages=CHAT, stream=True))

    disconnected, cut_short = recorded(recorder, engine)
    assert received
    assert (disconnected.status, disconnected.error_type) == ("server_error", "APIConnectionError")
    assert disconnected.ttft_ms is not None
    assert truncated  # the SDK says nothing about a truncated stream; the record does
    assert (cut_short.status, cut_short.error_type) == ("error", "IncompleteStream")
    assert cut_short.finish_reason is None


def test_a_stream_closed_early_is_recorded_once(
    client: openai.OpenAI, recorder: Recorder, engine: Engine
) -> None:
    with client.chat.completions.create(model="gpt-4.1", messages=CHAT, stream=True) as stream:
        for chunk in stream:
            if chunk.choices[0].delta.content:
                break  # the caller has what they wanted and stops reading
    stream.close()
    [row] = recorded(recorder, engine)
    assert (row.status, row.finish_reason) == ("success", "client_closed")
    assert row.ttft_ms is not None


def test_responses_and_embeddings(
    client: openai.OpenAI, recorder: Recorder, engine: Engine, llmock: LLMock
) -> None:
    plain = client.responses.create(model="o4-mini", input="Explain the revenue growth")
    events = list(client.responses.create(model="o3", input="Stream the revenue", stream=True))
    embedded = client.embeddings.create(model="text-embedding-3-small", input="revenue")

    responses, streamed, embeddings = recorded(recorder, engine)
    assert plain.usage is not None
    assert (responses.operation, responses.status, responses.finish_reason) == (
        "responses",
        "success",
        "completed",
    )
    assert (responses.input_tokens, responses.output_tokens) == (
        plain.usage.input_tokens,
        plain.usage.output_tokens,
    )
    assert responses.cost_usd == pytest.approx(
        DEFAULT_PRICES.cost_usd("o4-mini", plain.usage.input_tokens, plain.usage.output_tokens)
    )
    completed = next(e for e in events if e.type == "response.completed")
    assert streamed.output_tokens == completed.response.usage.output_tokens
    assert streamed.ttft_ms is not None
    assert (embeddings.operation, embeddings.input_tokens) == (
        "embeddings",
        embedded.usage.prompt_tokens,
    )
    assert "metadata" not in llmock.last_request.body  # embeddings take no metadata


def test_raw_response_callers_and_copies_are_recorded(
    client: openai.OpenAI, recorder: Recorder, engine: Engine
) -> None:
    raw = client.chat.completions.with_raw_response.create(model="gpt-4.1", messages=CHAT)
    assert raw.http_response.status_code == 200
    assert raw.parse().choices
    client.with_options(timeout=5).chat.completions.create(model="gpt-4.1-nano", messages=CHAT)
    assert [row.model for row in recorded(recorder, engine)] == ["gpt-4.1", "gpt-4.1-nano"]


async def test_async_client_plain_stream_and_errors(
    llmock: LLMock, recorder: Recorder, engine: Engine
) -> None:
    client = instrument(
        openai.AsyncOpenAI(base_url=llmock.base_url(), api_key="k", max_retries=0),
        recorder=recorder,
    )
    await client.chat.completions.create(model="gpt-4.1", messages=CHAT)
    stream = await client.chat.completions.create(model="gpt-4.1", messages=CHAT, stream=True)
    assert isinstance(stream, openai.AsyncStream)
    chunks = [chunk async for chunk in stream]
    llmock.rate_limit(times=1, retry_after=0.01)
    with pytest.raises(openai.RateLimitError):
        await client.responses.create(model="o3", input="hi")

    plain, streamed, limited = recorded(recorder, engine)
    assert plain.status == "success"
    assert plain.input_tokens
    assert streamed.ttft_ms is not None
    assert streamed.output_tokens
    assert all(chunk.choices for chunk in chunks)
    assert (limited.operation, limited.status) == ("responses", "rate_limited")


async def test_contexts_stay_with_their_tasks_and_threads(
    llmock: LLMock, recorder: Recorder, engine: Engine
) -> None:
    async_client = instrument(
        openai.AsyncOpenAI(base_url=llmock.base_url(), api_key="k"), recorder=recorder
    )
    sync_client = instrument(
        openai.OpenAI(base_url=llmock.base_url(), api_key="k"), recorder=recorder
    )

    async def task(feature: str) -> None:
        with llm_context(feature=feature):
            await asyncio.sleep(0.01)
            await async_client.chat.completions.create(model=f"model-{feature}", messages=CHAT)

    def thread(feature: str) -> None:
        with llm_context(feature=feature, team="threads"):
            sync_client.chat.completions.create(model=f"model-{feature}", messages=CHAT)

    with llm_context(feature="outer"):
        await asyncio.gather(*(task(f"t{i}") for i in range(5)))
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(thread, [f"th{i}" for i in range(4)]))
        await async_client.embeddings.create(model="text-embedding-3-small", input="x")

    rows = recorded(recorder, engine)
    by_model = {row.model: row for row in rows}
    for i in range(5):
        assert by_model[f"model-t{i}"].feature == f"t{i}"
    for i in range(4):
        assert (by_model[f"model-th{i}"].feature, by_model[f"model-th{i}"].team) == (
            f"th{i}",
            "threads",
        )
    assert by_model["text-embedding-3-small"].feature == "outer"


class BlockedSink:
    def __init__(self) -> None:
        self.release = threading.Event()
        self.written: list[CallRecord] = []

    def write(self, calls: Sequence[CallRecord], scores: Sequence[ScoreRecord]) -> None:
        self.release.wait(10)
        self.written.extend(calls)


def test_a_full_queue_drops_and_counts_and_never_blocks_the_app(llmock: LLMock) -> None:
    sink = BlockedSink()
    recorder = Recorder(sink, max_queue=5, batch_size=1, flush_interval=0.01)
    client = instrument(openai.OpenAI(base_url=llmock.base_url(), api_key="k"), recorder=recorder)
    try:
        for _ in range(20):
            client.embeddings.create(model="text-embedding-3-small", input="x")
        stats = recorder.stats()
        assert stats.dropped >= 14  # one in the blocked sink, five queued, the rest dropped
        assert stats.submitted + stats.dropped == 20
    finally:
        sink.release.set()
        recorder.close()
    assert len(sink.written) == 20 - stats.dropped


def test_a_failing_store_never_reaches_the_app(
    llmock: LLMock, caplog: pytest.LogCaptureFixture
) -> None:
    class BrokenSink:
        def write(self, calls: Sequence[CallRecord], scores: Sequence[ScoreRecord]) -> None:
            raise OSError("disk full")

    recorder = Recorder(BrokenSink(), flush_interval=0.01)
    client = instrument(openai.OpenAI(base_url=llmock.base_url(), api_key="k"), recorder=recorder)
    client.chat.completions.create(model="gpt-4.1", messages=CHAT)
    recorder.close(timeout=0.5)  # retried meanwhile; without a spool, dropped at close
    assert recorder.stats().dropped == 1
    assert "disk full" in caplog.text


def test_one_json_log_line_per_call_and_no_raw_user_anywhere(
    client: openai.OpenAI,
    recorder: Recorder,
    engine: Engine,
    llmock: LLMock,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    caplog.set_level(logging.INFO, logger="pagerloop.llm_calls")
    with llm_context(feature="chat", user_id=RAW_USER, metadata={"ab": "b"}):
        client.chat.completions.create(model="gpt-4.1", messages=CHAT)
        llmock.rate_limit(times=3, retry_after=0.01)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="gpt-4.1", messages=CHAT)
    rows = recorded(recorder, engine)

    records = [r for r in caplog.records if r.name == "pagerloop.llm_calls"]
    assert [r.levelno for r in records] == [logging.INFO, logging.WARNING]
    lines = [json.loads(r.getMessage()) for r in records]
    assert lines[0]["event"] == "llm_call_success"
    assert lines[0]["model"] == "gpt-4.1"
    assert lines[0]["latency_ms"] == rows[0].latency_ms
    assert lines[0]["total_tokens"] == rows[0].input_tokens + rows[0].output_tokens
    assert lines[0]["metadata"] == {"ab": "b"}  # nested; everything else is top level
    assert not any(isinstance(v, dict) for k, v in lines[0].items() if k != "metadata")
    assert lines[1]["status"] == "rate_limited"

    assert RAW_USER not in caplog.text
    engine.dispose()
    for path in tmp_path.iterdir():
        assert RAW_USER.encode() not in path.read_bytes(), path


def test_records_queued_at_exit_are_flushed(
    llmock: LLMock, ingest_api: ThreadedServer, engine: Engine
) -> None:
    """An app that exits right after its calls: the atexit hook delivers what is queued."""
    import subprocess
    import sys

    script = f"""
import openai
from pagerloop_sdk import instrument, llm_context
client = instrument(openai.OpenAI(base_url={llmock.base_url()!r}, api_key="k"))
with llm_context(feature="batch-job"):
    for _ in range(25):
        client.chat.completions.create(model="gpt-4.1", messages=[{{"role": "user", "content": "x"}}])
"""  # noqa: E501
    env = {
        "PATH": "/usr/bin:/bin",
        "PAGERLOOP_URL": ingest_api.url,
        "PAGERLOOP_API_KEY": INGEST_KEY,
        "PAGERLOOP_QUALITY_SAMPLE_RATE": "0",
    }
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=60)
    with Session(engine) as session:
        rows = session.exec(select(LLMCall)).all()
    assert len(rows) == 25
    assert {row.feature for row in rows} == {"batch-job"}
    assert {row.source for row in rows} == {"sdk"}


def payload_of(record: Any) -> dict[str, Any]:
    return dict(record.attributes or {})


def test_spans_and_genai_metrics_when_otel_is_configured(
    llmock: LLMock, recorder: Recorder, engine: Engine
) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind, StatusCode

    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    client = instrument(
        openai.OpenAI(base_url=llmock.base_url(), api_key="k", max_retries=0),
        recorder=recorder,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
    )
    app_tracer = tracer_provider.get_tracer("app")
    with app_tracer.start_as_current_span("handle_request") as parent:
        client.chat.completions.create(model="gpt-4.1", messages=CHAT)
        llmock.rate_limit(times=1, retry_after=0.01)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="gpt-4.1", messages=CHAT)

    finished = [s for s in spans.get_finished_spans() if s.name.startswith("chat")]
    ok, limited = finished
    assert ok.name == "chat gpt-4.1"
    assert ok.kind == SpanKind.CLIENT
    assert ok.parent is not None
    assert ok.parent.span_id == parent.get_span_context().span_id
    attributes = dict(ok.attributes or {})
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.provider.name"] == "openai"
    assert attributes["gen_ai.request.model"] == "gpt-4.1"
    assert attributes["gen_ai.usage.input_tokens"] > 0
    assert attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert attributes["server.address"] == "127.0.0.1"
    assert limited.status.status_code == StatusCode.ERROR
    assert dict(limited.attributes or {})["error.type"] == "RateLimitError"

    rows = recorded(recorder, engine)
    assert rows[0].trace_id == format(parent.get_span_context().trace_id, "032x")

    metrics = {
        m.name: m
        for rm in reader.get_metrics_data().resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    duration = metrics["gen_ai.client.operation.duration"]
    assert duration.unit == "s"
    assert sum(p.count for p in duration.data.data_points) == 2
    token_types = {
        p.attributes["gen_ai.token.type"]
        for p in metrics["gen_ai.client.token.usage"].data.data_points
    }
    assert token_types == {"input", "output"}
