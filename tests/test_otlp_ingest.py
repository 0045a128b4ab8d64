"""POST /v1/traces fed by the real `opentelemetry-instrumentation-genai-openai` over OTLP/HTTP,
checked against what pagerloop's own SDK wrapper recorded for the very same calls."""

from __future__ import annotations

import base64
import gzip
import json
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import requests
from google.protobuf import json_format
from llmock.pytest_plugin import LLMock
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.genai.openai import OpenAIInstrumentor
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from pagerloop_sdk import Recorder, instrument
from sqlalchemy import Engine
from sqlmodel import Session, select
from temporalio.testing import WorkflowEnvironment

from api.app import create_app
from api.deps import Services
from config import Settings
from instrumentation.store_sink import StoreSink
from stores.llm_calls import LLMCall
from tests.fakes.server import ThreadedServer

KEY = "otlp-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = [{"role": "user", "content": "How did revenue grow this quarter?"}]


@pytest.fixture
def api(time_skipping_env: WorkflowEnvironment, engine: Engine) -> Iterator[ThreadedServer]:
    settings = Settings(_env_file=None, ingest_api_keys=KEY, user_hash_salt="s")  # type: ignore[call-arg]
    app = create_app(Services(settings, engine, time_skipping_env.client, slack=None))
    with ThreadedServer(app) as server:
        yield server


def rows(engine: Engine, source: str | None = None) -> list[LLMCall]:
    query = select(LLMCall).order_by(LLMCall.ts, LLMCall.id)
    if source:
        query = query.where(LLMCall.source == source)
    with Session(engine) as session:
        return list(session.exec(query))


COMPARED = (
    "operation",
    "model",
    "response_model",
    "status",
    "http_status",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "trace_id",
    "feature",
    "environment",
)


@pytest.fixture
def genai_instrumentation() -> Iterator[TracerProvider]:
    provider = TracerProvider(
        resource=Resource.create(
            {"service.name": "otlp-test", "deployment.environment.name": "prod",
             "pagerloop.feature": "reports"}
        )
    )  # fmt: skip
    instrumentor = OpenAIInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    yield provider
    instrumentor.uninstrument()
    provider.shutdown()


def test_the_real_genai_instrumentation_gives_the_rows_our_wrapper_gives(
    llmock: LLMock,
    api: ThreadedServer,
    engine: Engine,
    genai_instrumentation: TracerProvider,
) -> None:
    provider = genai_instrumentation
    provider.add_span_processor(
        SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"{api.url}/v1/traces", headers=AUTH))
    )
    recorder = Recorder(StoreSink(engine), quality_sample_rate=0)
    client = instrument(
        openai.OpenAI(base_url=llmock.base_url(), api_key="k", max_retries=0, timeout=0.5),
        recorder=recorder,
    )
    from pagerloop_sdk import llm_context

    app = provider.get_tracer("app")
    with llm_context(feature="reports", environment="prod"):
        for scenario in range(9):
            with app.start_as_current_span(f"request {scenario}"):
                _call(client, llmock, scenario)
    assert recorder.flush()
    provider.force_flush()

    sdk, otlp = rows(engine, "sdk"), rows(engine, "otlp")
    assert len(sdk) == len(otlp) == 9
    for index, (ours, theirs) in enumerate(zip(sdk, otlp, strict=True)):
        assert {f: getattr(theirs, f) for f in COMPARED} == {
            f: getattr(ours, f) for f in COMPARED
        }, index
        assert theirs.latency_ms == pytest.approx(ours.latency_ms, abs=50)
    statuses = [row.status for row in otlp]
    assert statuses == [
        "success",  # chat
        "success",  # chat stream
        "success",  # responses
        "success",  # responses stream
        "success",  # embeddings
        "rate_limited",
        "server_error",  # 503
        "timeout",
        "server_error",  # stream dropped mid-way
    ]
    assert otlp[1].ttft_ms is not None
    assert otlp[5].http_status == 429
    assert otlp[6].http_status == 503


def _call(client: openai.OpenAI, llmock: LLMock, scenario: int) -> None:
    if scenario == 0:
        client.chat.completions.create(model="gpt-4.1", messages=CHAT)
    elif scenario == 1:
        # Usage asked for explicitly: a usage chunk our wrapper requests on the caller's behalf
        # is hidden from everything above it, the GenAI instrumentation included.
        usage = {"include_usage": True}
        list(
            client.chat.completions.create(
                model="gpt-4.1-mini", messages=CHAT, stream=True, stream_options=usage
            )
        )
    elif scenario == 2:
        client.responses.create(model="o4-mini", input="revenue?")
    elif scenario == 3:
        list(client.responses.create(model="o3", input="revenue?", stream=True))
    elif scenario == 4:
        client.embeddings.create(model="text-embedding-3-small", input="revenue")
    elif scenario == 5:
        llmock.rate_limit(retry_after=0.01)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="gpt-4.1", messages=CHAT)
    elif scenario == 6:
        llmock.fail(503)
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="gpt-4.1", messages=CHAT)
    elif scenario == 7:
        llmock.delay(2)
        with pytest.raises(openai.APITimeoutError):
            client.chat.completions.create(model="gpt-4.1", messages=CHAT)
    else:
        llmock.disconnect(after_chunks=2)
        stream = client.chat.completions.create(model="gpt-4.1", messages=CHAT, stream=True)
        with pytest.raises(openai.APIConnectionError):
            list(stream)


def otlp_json(body: bytes) -> dict[str, Any]:
    """The OTLP/JSON encoding of a protobuf export: hex ids, integer enums."""
    message = ExportTraceServiceRequest.FromString(body)
    data = json_format.MessageToDict(message, use_integers_for_enums=True)

    def hexify(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("traceId", "spanId", "parentSpanId"):
                    node[key] = base64.b64decode(value).hex()
                else:
                    hexify(value)
        elif isinstance(node, list):
            for item in node:
                hexify(item)

    hexify(data)
    return data


def test_protobuf_json_gzip_and_contract_json_give_the_same_rows(
    llmock: LLMock, api: ThreadedServer, engine: Engine, genai_instrumentation: TracerProvider
) -> None:
    captured: list[bytes] = []

    class Recording(requests.Session):
        def send(self, request: Any, **kwargs: Any) -> Any:
            captured.append(request.body)
            return super().send(request, **kwargs)

    exporter = OTLPSpanExporter(endpoint=f"{api.url}/v1/traces", headers=AUTH, session=Recording())
    genai_instrumentation.add_span_processor(SimpleSpanProcessor(exporter))
    client = openai.OpenAI(base_url=llmock.base_url(), api_key="k", max_retries=0)
    client.chat.completions.create(model="gpt-4.1", messages=CHAT)
    llmock.rate_limit(retry_after=0.01)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="gpt-4.1", messages=CHAT)
    embedded = client.embeddings.create(model="text-embedding-3-small", input="revenue")
    genai_instrumentation.force_flush()
    protobuf_rows = rows(engine, "otlp")
    assert [row.status for row in protobuf_rows] == ["success", "rate_limited", "success"]
    assert protobuf_rows[2].operation == "embeddings"
    assert protobuf_rows[2].input_tokens == embedded.usage.prompt_tokens

    for body in captured:  # the same spans again, as OTLP/JSON and gzipped protobuf
        as_json = httpx.post(f"{api.url}/v1/traces", json=otlp_json(body), headers=AUTH)
        assert as_json.status_code == 200, as_json.text
        zipped = httpx.post(
            f"{api.url}/v1/traces",
            content=gzip.compress(body),
            headers={**AUTH, "Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"},
        )
        assert zipped.status_code == 200
    # Each span's call_id comes from its trace and span ids: sent again, in any encoding, it is
    # the same call, and nothing is written twice.
    assert [row.call_id for row in rows(engine, "otlp")] == [r.call_id for r in protobuf_rows]

    # And as the contract's JSON records (without call_ids: new calls).
    records = [
        {k: v for k, v in _as_json_record(row).items() if v is not None} for row in protobuf_rows
    ]
    posted = httpx.post(f"{api.url}/v1/llm-calls", json={"calls": records}, headers=AUTH)
    assert posted.status_code == 202, posted.text

    everything = rows(engine)
    assert len(everything) == 3 * 2
    by_call: dict[tuple[Any, ...], list[LLMCall]] = {}
    for row in everything:
        key = (row.trace_id, row.model, row.status)
        by_call.setdefault(key, []).append(row)
    assert len(by_call) == 3
    for versions in by_call.values():
        first = _comparable(versions[0])
        assert all(_comparable(v) == first for v in versions[1:])


def _as_json_record(row: LLMCall) -> dict[str, Any]:
    return {
        "timestamp": row.ts.replace(tzinfo=__import__("datetime").UTC).isoformat(),
        "model": row.model,
        "status": row.status,
        "latency_ms": row.latency_ms,
        "operation": row.operation,
        "response_model": row.response_model,
        "http_status": row.http_status,
        "ttft_ms": row.ttft_ms,
        "input_tokens": row.input_tokens,
        "output_tokens": row.output_tokens,
        "cached_input_tokens": row.cached_input_tokens,
        "finish_reason": row.finish_reason,
        "error_type": row.error_type,
        "error_message": row.error_message,
        "trace_id": row.trace_id,
        "feature": row.feature,
        "environment": row.environment,
    }


def _comparable(row: LLMCall) -> dict[str, Any]:
    data = row.model_dump()
    for volatile in ("id", "call_id", "source"):
        data.pop(volatile)
    return data


def test_refusals(api: ThreadedServer, engine: Engine) -> None:
    url = f"{api.url}/v1/traces"
    assert (
        httpx.post(
            url, content=b"\x00", headers={"Content-Type": "application/x-protobuf"}
        ).status_code
        == 401
    )
    garbage = httpx.post(
        url,
        content=b"\xff\xfe not protobuf",
        headers={**AUTH, "Content-Type": "application/x-protobuf"},
    )
    assert garbage.status_code == 400
    assert "ExportTraceServiceRequest" in garbage.json()["detail"]
    assert (
        httpx.post(url, content=b"x", headers={**AUTH, "Content-Type": "text/plain"}).status_code
        == 415
    )
    bad_zip = httpx.post(
        url,
        content=b"not gzip",
        headers={**AUTH, "Content-Type": "application/x-protobuf", "Content-Encoding": "gzip"},
    )
    assert bad_zip.status_code == 400


def test_a_span_that_fails_validation_is_reported_as_a_partial_success(
    api: ThreadedServer, engine: Engine
) -> None:
    span = {
        "traceId": "5b8efff798038103d269b633813fc60c",
        "spanId": "eee19b7ec3c1b174",
        "name": "chat x",
        "kind": 3,
        "startTimeUnixNano": str(AN_HOUR_AGO_NS),
        "endTimeUnixNano": str(AN_HOUR_AGO_NS + 6_046_144),
        "status": {},
    }
    good = {
        **span,
        "attributes": [
            _kv("gen_ai.operation.name", "chat"),
            _kv("gen_ai.request.model", "gpt-4.1"),
        ],
    }
    too_long = {
        **span,
        "attributes": [
            _kv("gen_ai.operation.name", "chat"),
            _kv("gen_ai.request.model", "m" * 300),
        ],
    }
    other = {**span, "name": "GET /", "attributes": [_kv("http.method", "GET")]}
    body = {"resourceSpans": [{"resource": {}, "scopeSpans": [{"spans": [good, too_long, other]}]}]}
    response = httpx.post(f"{api.url}/v1/traces", json=body, headers=AUTH)
    assert response.status_code == 200
    assert response.json()["partialSuccess"]["rejectedSpans"] == "1"
    [row] = rows(engine)
    assert (row.model, row.status, row.latency_ms, row.trace_id) == (
        "gpt-4.1",
        "success",
        pytest.approx(6.046, abs=0.001),
        "5b8efff798038103d269b633813fc60c",
    )


# Records must be recent (README "Limits"): captured spans are moved to an hour ago.
AN_HOUR_AGO_NS = time.time_ns() - 3600 * 10**9


def _an_hour_ago(capture: str) -> str:
    times = [int(t) for t in re.findall(r'UnixNano":"(\d+)"', capture)]
    shift = AN_HOUR_AGO_NS - min(times)
    return re.sub(r'(UnixNano":")(\d+)"', lambda m: f'{m[1]}{int(m[2]) + shift}"', capture)


def _kv(key: str, value: str) -> dict[str, Any]:
    return {"key": key, "value": {"stringValue": value}}


def test_otlp_json_example_of_a_rate_limited_call(api: ThreadedServer, engine: Engine) -> None:
    """What the OTLP/JSON exporter sent for a 429, verbatim: ids in hex, ints as strings."""
    body = json.loads(
        _an_hour_ago(
            """{"resourceSpans":[{"resource":{"attributes":[{"key":"service.name","value":{"stringValue":"otlp-capture"}}]},
 "scopeSpans":[{"scope":{"name":"opentelemetry.instrumentation.genai.openai","version":"1.3b0"},
  "spans":[{"traceId":"ce95ee71db80e5ddcc3a8fc48886cf38","spanId":"a2b14a05e53d6cda","flags":256,
   "name":"chat gpt-4o-mini","kind":3,
   "startTimeUnixNano":"1795719912576767505","endTimeUnixNano":"1795719912579560306",
   "attributes":[{"key":"gen_ai.operation.name","value":{"stringValue":"chat"}},
                 {"key":"gen_ai.provider.name","value":{"stringValue":"openai"}},
                 {"key":"gen_ai.request.model","value":{"stringValue":"gpt-4o-mini"}},
                 {"key":"server.address","value":{"stringValue":"127.0.0.1"}},
                 {"key":"server.port","value":{"intValue":"42263"}},
                 {"key":"error.type","value":{"stringValue":"openai.RateLimitError"}}],
   "status":{"message":"Error code: 429 - Rate limit exceeded.","code":2}}],
  "schemaUrl":"https://opentelemetry.io/schemas/1.37.0"}]}]}"""
        )
    )
    assert httpx.post(f"{api.url}/v1/traces", json=body, headers=AUTH).status_code == 200
    [row] = rows(engine)
    assert (row.status, row.http_status, row.error_type) == (
        "rate_limited",
        429,
        "openai.RateLimitError",
    )
    assert row.trace_id == "ce95ee71db80e5ddcc3a8fc48886cf38"
    assert row.latency_ms == pytest.approx(2.793, abs=0.001)
