"""POST /v1/traces under hostile or broken exports: bombs are refused early and cheaply, the
event loop keeps answering while the biggest accepted export is decoded, malformed bodies get
a 4xx, and spans with impossible values are refused one by one."""

from __future__ import annotations

import base64
import gzip
import json
import math
import os
import threading
import time
import tracemalloc
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import cache
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from pagerloop_sdk.pricing import DEFAULT_PRICES
from pydantic import ValidationError
from sqlalchemy import Engine, func
from sqlmodel import Session, select
from temporalio.testing import WorkflowEnvironment

from api.app import create_app
from api.deps import Services
from api.ingest import columns_of, to_rows
from api.ingest_types import CallIn
from api.otlp import calls
from api.otlp_limits import (
    MAX_INFLATED_BYTES,
    MAX_SPANS_PER_REQUEST,
    TOO_MANY_ITEMS,
    TOO_MANY_SPANS,
    ExportRefusedError,
)
from config import Settings
from instrumentation.genai_spans import InvalidSpanError, SpanView, call_fields
from stores.llm_calls import LLMCall
from stores.writer import CALL_COLUMNS
from tests.fakes.server import ThreadedServer

KEY = "otlp-limits-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROTOBUF = {**AUTH, "Content-Type": "application/x-protobuf"}
GZIP_PROTOBUF = {**PROTOBUF, "Content-Encoding": "gzip"}
JSON = {**AUTH, "Content-Type": "application/json"}
GZIP_JSON = {**JSON, "Content-Encoding": "gzip"}


@pytest.fixture
def api(time_skipping_env: WorkflowEnvironment, engine: Engine) -> Iterator[ThreadedServer]:
    settings = Settings(_env_file=None, ingest_api_keys=KEY, user_hash_salt="s")
    app = create_app(Services(settings, engine, time_skipping_env.client, slack=None))

    # The cheapest request the event loop can answer: what waits here waits on the loop.
    @app.get("/ping")
    async def ping() -> dict[str, bool]:
        return {"ok": True}

    with ThreadedServer(app) as server:
        yield server


def stored(engine: Engine) -> int:
    with Session(engine) as session:
        return int(session.exec(select(func.count()).select_from(LLMCall)).one())


# --- building exports ---------------------------------------------------------------------


def any_value(value: Any) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, list):
        return AnyValue(array_value=ArrayValue(values=[any_value(item) for item in value]))
    if isinstance(value, dict):
        return AnyValue(kvlist_value=KeyValueList(values=key_values(value)))
    return AnyValue(string_value=value)


def key_values(attributes: dict[str, Any]) -> list[KeyValue]:
    return [KeyValue(key=key, value=any_value(value)) for key, value in attributes.items()]


def genai_attributes(index: int = 0) -> dict[str, Any]:
    """What opentelemetry-instrumentation-genai-openai puts on a chat call span."""
    return {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4.1-mini",
        "gen_ai.request.max_tokens": 512,
        "gen_ai.request.temperature": 0.2,
        "server.address": "api.openai.com",
        "server.port": 443,
        "gen_ai.response.model": "gpt-4.1-mini-2025-04-14",
        "gen_ai.response.id": f"chatcmpl-{index:024x}",
        "gen_ai.response.finish_reasons": ["stop"],
        "gen_ai.usage.input_tokens": 1200 + index % 100,
        "gen_ai.usage.output_tokens": 321,
        "openai.request.id": f"req_{index:032x}",
        "gen_ai.openai.response.service_tier": "default",
    }


def span(attributes: dict[str, Any], start_ns: int | None = None, error: bool = False) -> Span:
    start = time.time_ns() - 60_000_000_000 if start_ns is None else start_ns
    return Span(
        trace_id=os.urandom(16),
        span_id=os.urandom(8),
        name="chat gpt-4.1-mini",
        kind=Span.SPAN_KIND_CLIENT,
        start_time_unix_nano=start,
        end_time_unix_nano=min(start + 812_000_000, 2**64 - 1),
        attributes=key_values(attributes),
        status=Status(code=Status.STATUS_CODE_ERROR if error else Status.STATUS_CODE_UNSET),
    )


def export(spans: list[Span]) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.attributes.extend(
        key_values({"service.name": "reports-api", "deployment.environment.name": "prod"})
    )
    scope_spans = resource_spans.scope_spans.add()
    scope_spans.scope.name = "opentelemetry.instrumentation.genai.openai"
    scope_spans.spans.extend(spans)
    return request


def as_json(request: ExportTraceServiceRequest) -> bytes:
    """OTLP/JSON: ids in hex, enums as integers."""
    data = json_format.MessageToDict(request, use_integers_for_enums=True)
    for resource_spans in data["resourceSpans"]:
        for scope_spans in resource_spans["scopeSpans"]:
            for item in scope_spans["spans"]:
                for key in ("traceId", "spanId"):
                    item[key] = base64.b64decode(item[key]).hex()
    return json.dumps(data).encode()


@cache
def largest_export(count: int = MAX_SPANS_PER_REQUEST) -> ExportTraceServiceRequest:
    return export([span(genai_attributes(index)) for index in range(count)])


def field_header(field: int, size: int) -> bytes:
    """The key and length of a length-delimited protobuf field of `size` bytes."""
    header = bytearray([field << 3 | 2])
    while size >= 0x80:
        header.append(size & 0x7F | 0x80)
        size >>= 7
    header.append(size)
    return bytes(header)


def length_delimited(field: int, payload: bytes) -> bytes:
    return field_header(field, len(payload)) + payload


def nested_headers(fields: list[int], size: int) -> bytes:
    """The headers that wrap `size` bytes in the fields given, innermost last."""
    headers = b""
    for field in reversed(fields):
        headers = field_header(field, size) + headers
        size += len(field_header(field, size))
    return headers


# --- bombs -------------------------------------------------------------------------------

# Millions of empty items from ~10-20 KB of gzip: protobuf and JSON would build every one.
EMPTY_SPANS = b"\x0a\x04\x12\x02\x12\x00"  # resource_spans { scope_spans { spans {} } }
EMPTY_SCOPE_SPANS = b"\x0a\x02\x12\x00"  # resource_spans { scope_spans {} }
# name: (prefix, unit repeated, times, suffix, headers, what the refusal says)
BOMBS: dict[str, tuple[bytes, bytes, int, bytes, dict[str, str], str]] = {
    "empty spans": (b"", EMPTY_SPANS, 2_000_000, b"", GZIP_PROTOBUF, TOO_MANY_SPANS),
    "empty scope_spans": (b"", EMPTY_SCOPE_SPANS, 4_000_000, b"", GZIP_PROTOBUF, TOO_MANY_ITEMS),
    "empty attributes of one span": (
        nested_headers([1, 2, 2], 2 * 8_000_000),  # resource_spans.scope_spans.spans
        b"\x4a\x00",
        8_000_000,
        b"",
        GZIP_PROTOBUF,
        TOO_MANY_ITEMS,
    ),
    "100 MB of empty spans": (
        b"",
        EMPTY_SPANS,
        17_000_000,
        b"",
        GZIP_PROTOBUF,
        "inflates to more than",
    ),
    "JSON empty spans": (
        b'{"resourceSpans":[{"scopeSpans":[{"spans":[',
        b"{},",
        4_000_000,
        b"{}]}]}]}",
        GZIP_JSON,
        TOO_MANY_ITEMS,
    ),
    "JSON empty lists": (b'{"x":[', b"[],", 4_000_000, b"[]]}", GZIP_JSON, TOO_MANY_ITEMS),
    "JSON numbers": (b'{"x":[', b"0,", 6_000_000, b"0]}", GZIP_JSON, TOO_MANY_ITEMS),
}


@cache
def gzipped(name: str) -> bytes:
    """The bomb, compressed a piece at a time (the 100 MB one is never whole in memory)."""
    prefix, unit, times, suffix, _, _ = BOMBS[name]
    packer = zlib.compressobj(9, wbits=31)
    parts = [packer.compress(prefix)]
    piece = unit * 100_000
    parts += [packer.compress(piece) for _ in range(times // 100_000)]
    parts += [packer.compress(unit * (times % 100_000) + suffix), packer.flush()]
    return b"".join(parts)


@pytest.mark.parametrize("name", BOMBS)
def test_a_gzip_bomb_is_refused_in_a_moment(api: ThreadedServer, engine: Engine, name: str) -> None:
    *_, headers, message = BOMBS[name]
    body = gzipped(name)
    assert len(body) < 200_000
    started = time.perf_counter()
    response = httpx.post(f"{api.url}/v1/traces", content=body, headers=headers, timeout=30)
    elapsed = time.perf_counter() - started
    assert response.status_code == 413, response.text
    assert message in response.json()["detail"]
    assert "send smaller batches" in response.json()["detail"]
    assert elapsed < 2.0
    assert stored(engine) == 0


@pytest.mark.parametrize("name", ["empty spans", "empty scope_spans", "JSON empty spans"])
def test_a_bomb_is_refused_before_it_takes_memory(name: str) -> None:
    *_, headers, _ = BOMBS[name]
    body = gzipped(name)
    tracemalloc.start()
    try:
        with pytest.raises(ExportRefusedError) as refused:
            calls(
                body,
                encoding="gzip",
                content_type=headers["Content-Type"],
                limit=MAX_INFLATED_BYTES,
                salt="s",
                prices=DEFAULT_PRICES,
                now=datetime.now(UTC),
            )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert refused.value.status == 413
    # The inflated body (at most 20 MiB) and what was counted before the budget ran out;
    # protobuf would have taken gigabytes.
    assert peak < 100 * 2**20


# --- the budget ----------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["protobuf", "json"])
def test_an_export_at_the_span_budget_is_accepted_and_one_more_span_is_not(
    api: ThreadedServer, engine: Engine, encoding: str
) -> None:
    def body(request: ExportTraceServiceRequest) -> bytes:
        raw = request.SerializeToString() if encoding == "protobuf" else as_json(request)
        return gzip.compress(raw)

    headers = GZIP_PROTOBUF if encoding == "protobuf" else GZIP_JSON
    url = f"{api.url}/v1/traces"
    over = export([*largest_export().resource_spans[0].scope_spans[0].spans, span({})])
    refused = httpx.post(url, content=body(over), headers=headers, timeout=60)
    assert refused.status_code == 413
    assert refused.json()["detail"] == TOO_MANY_SPANS

    accepted = httpx.post(url, content=body(largest_export()), headers=headers, timeout=60)
    assert accepted.status_code == 200, accepted.text
    assert stored(engine) == MAX_SPANS_PER_REQUEST


def test_the_event_loop_answers_while_the_largest_export_is_decoded(
    api: ThreadedServer, engine: Engine
) -> None:
    # JSON is the slower of the two encodings (protobuf's JSON parser is pure Python).
    body = gzip.compress(as_json(largest_export()))
    answers: list[httpx.Response] = []
    sending = threading.Thread(
        target=lambda: answers.append(
            httpx.post(f"{api.url}/v1/traces", content=body, headers=GZIP_JSON, timeout=120)
        )
    )
    waits: list[float] = []
    with httpx.Client(base_url=api.url) as client:
        export_started = time.perf_counter()
        sending.start()
        while sending.is_alive():
            started = time.perf_counter()
            assert client.get("/ping").status_code == 200
            waits.append(time.perf_counter() - started)
            time.sleep(0.02)
        export_took = time.perf_counter() - export_started
    sending.join()
    assert answers[0].status_code == 200, answers[0].text
    assert stored(engine) == MAX_SPANS_PER_REQUEST
    assert len(waits) >= 10, "the export was answered too fast to measure anything"
    # Decoding on the loop would hold one ping for about the whole export. Relative, because
    # a loaded 2-core machine stalls any thread now and then (a full GC of the decoded export
    # stops every thread), which an absolute bound took for a blocked loop.
    assert max(waits) < export_took / 2, (export_took, sorted(waits)[-5:])


# --- malformed bodies ----------------------------------------------------------------------


def _nested_protobuf(depth: int) -> bytes:
    """An export of one span whose attribute is a map of a map of ... `depth` deep (built by
    hand: protobuf's own constructors refuse to nest that deep)."""
    value = b"\x0a\x01x"  # AnyValue(string_value="x")
    for _ in range(depth):
        pair = length_delimited(1, b"n") + length_delimited(2, value)
        value = length_delimited(6, length_delimited(1, pair))  # kvlist_value.values
    attribute = length_delimited(1, b"deep") + length_delimited(2, value)
    return length_delimited(
        1, length_delimited(2, length_delimited(2, length_delimited(9, attribute)))
    )


def _nested_json(depth: int) -> bytes:
    value: dict[str, Any] = {"stringValue": "x"}
    for _ in range(depth):
        value = {"kvlistValue": {"values": [{"key": "n", "value": value}]}}
    return _json_span(attributes=[{"key": "deep", "value": value}])


def _json_span(**fields: Any) -> bytes:
    item = {
        "traceId": "5b8efff798038103d269b633813fc60c",
        "spanId": "eee19b7ec3c1b174",
        "name": "chat",
        **fields,
    }
    return json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [item]}]}]}).encode()


VALID = export([span(genai_attributes())]).SerializeToString()
MALFORMED: dict[str, tuple[bytes, dict[str, str], int]] = {
    "bad gzip": (b"not gzip", GZIP_PROTOBUF, 400),
    "truncated gzip": (gzip.compress(VALID)[:-12], GZIP_PROTOBUF, 400),
    "unknown content encoding": (VALID, {**PROTOBUF, "Content-Encoding": "br"}, 415),
    "truncated protobuf": (VALID[:-3], PROTOBUF, 400),
    "garbage protobuf": (b"\xff\xfe not protobuf", PROTOBUF, 400),
    "length past the end": (b"\x0a\xff\xff\x03\x12\x00", PROTOBUF, 400),
    "varint too long": (b"\x08" + b"\xff" * 11, PROTOBUF, 400),
    "protobuf group": (b"\x0b\x0c", PROTOBUF, 400),
    "invalid UTF-8 in a protobuf string": (
        length_delimited(1, length_delimited(2, length_delimited(2, b"\x2a\x02\xff\xfe"))),
        PROTOBUF,
        400,
    ),
    "protobuf attribute nested 15 deep": (_nested_protobuf(15), PROTOBUF, 400),
    "protobuf attribute nested 1000 deep": (_nested_protobuf(1000), PROTOBUF, 400),
    "JSON attribute nested 15 deep": (_nested_json(15), JSON, 400),
    "JSON attribute nested 200 deep": (_nested_json(200), JSON, 400),
    "JSON arrays nested 100,000 deep": (
        b'{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        JSON,
        400,
    ),
    "not JSON": (b"{", JSON, 400),
    "JSON not UTF-8": (b'{"resourceSpans": "\xff"}', JSON, 400),
    "JSON array": (b"[]", JSON, 400),
    "JSON number": (b"5", JSON, 400),
    "JSON string": (b'"resourceSpans"', JSON, 400),
    "JSON null": (b"null", JSON, 400),
    "JSON resourceSpans a number": (b'{"resourceSpans": 5}', JSON, 400),
    "JSON resourceSpans of numbers": (b'{"resourceSpans": [5]}', JSON, 400),
    "JSON span name a number": (_json_span(name=5), JSON, 400),
    "JSON start time negative": (_json_span(startTimeUnixNano=-1), JSON, 400),
    "JSON start time 1e30": (_json_span(startTimeUnixNano="1e30"), JSON, 400),
    "JSON traceId not hex": (_json_span(traceId="zz"), JSON, 400),
    "JSON spanId odd length": (_json_span(spanId="abc"), JSON, 400),
    "JSON lone surrogate": (b'{"resourceSpans": [{"schemaUrl": "\\ud800"}]}', JSON, 400),
    "JSON intValue not a number": (
        _json_span(attributes=[{"key": "a", "value": {"intValue": "abc"}}]),
        JSON,
        400,
    ),
    "JSON attributes not a list": (_json_span(attributes={"key": "a"}), JSON, 400),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_a_malformed_export_gets_a_readable_4xx(
    api: ThreadedServer, engine: Engine, name: str
) -> None:
    body, headers, expected = MALFORMED[name]
    response = httpx.post(f"{api.url}/v1/traces", content=body, headers=headers, timeout=30)
    assert response.status_code == expected, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str)
    assert 0 < len(detail) <= 400
    assert stored(engine) == 0


# --- spans refused one by one --------------------------------------------------------------

GOOD = genai_attributes()
NAN = float("nan")
BAD_SPANS: dict[str, tuple[dict[str, Any], int | None, bool]] = {
    "start at 2^64-1": (GOOD, 2**64 - 1, False),
    "start at the epoch": (GOOD, 0, False),
    "input tokens a word": ({**GOOD, "gen_ai.usage.input_tokens": "abc"}, None, False),
    "input tokens a fraction": ({**GOOD, "gen_ai.usage.input_tokens": 1.5}, None, False),
    "input tokens NaN": ({**GOOD, "gen_ai.usage.input_tokens": NAN}, None, False),
    "input tokens negative": ({**GOOD, "gen_ai.usage.input_tokens": -5}, None, False),
    "input tokens 2^63-1": ({**GOOD, "gen_ai.usage.input_tokens": 2**63 - 1}, None, False),
    "output tokens a list": ({**GOOD, "gen_ai.usage.output_tokens": [1]}, None, False),
    "resend count a word": ({**GOOD, "http.request.resend_count": "abc"}, None, False),
    "resend count inf": ({**GOOD, "http.request.resend_count": math.inf}, None, False),
    "time to first chunk NaN": ({**GOOD, "gen_ai.response.time_to_first_chunk": NAN}, None, False),
    "time to first chunk inf": (
        {**GOOD, "gen_ai.response.time_to_first_chunk": math.inf},
        None,
        False,
    ),
    "time to first chunk a map": (
        {**GOOD, "gen_ai.response.time_to_first_chunk": {"a": 1}},
        None,
        False,
    ),
    "finish reasons a map": ({**GOOD, "gen_ai.response.finish_reasons": {"a": "b"}}, None, False),
    "status code a word": ({**GOOD, "http.response.status_code": "abc"}, None, True),
    "status code 2^40": ({**GOOD, "http.response.status_code": 2**40}, None, True),
    "model a number": ({**GOOD, "gen_ai.request.model": 5}, None, False),
    "model a map": ({**GOOD, "gen_ai.request.model": {"a": "b"}}, None, False),
    "model with NUL": ({**GOOD, "gen_ai.request.model": "gpt\x00"}, None, False),
    "model 300 characters": ({**GOOD, "gen_ai.request.model": "m" * 300}, None, False),
}


def test_spans_with_impossible_values_are_refused_one_by_one(
    api: ThreadedServer, engine: Engine
) -> None:
    bad = [span(attrs, start, error) for attrs, start, error in BAD_SPANS.values()]
    not_genai = span({"gen_ai.operation.name": {"chat": 1}, "gen_ai.request.model": "m"})
    nested = {**GOOD, "app.context": {"route": {"path": "/reports", "tags": ["a", 1, 2.5]}}}
    body = export([span(nested), *bad, not_genai]).SerializeToString()
    url = f"{api.url}/v1/traces"

    as_protobuf = httpx.post(url, content=body, headers=PROTOBUF)
    assert as_protobuf.status_code == 200, as_protobuf.text
    answer = ExportTraceServiceResponse.FromString(as_protobuf.content).partial_success
    assert answer.rejected_spans == len(BAD_SPANS)
    assert answer.error_message.startswith("span of trace ")

    again = as_json(ExportTraceServiceRequest.FromString(body))
    as_otlp_json = httpx.post(url, content=again, headers=JSON)
    assert as_otlp_json.status_code == 200, as_otlp_json.text
    assert as_otlp_json.json()["partialSuccess"]["rejectedSpans"] == str(len(BAD_SPANS))
    assert stored(engine) == 1  # the good span; sent again, it is the same call


# --- the span mapping never raises anything but InvalidSpanError ---------------------------

ODD_VALUES: list[Any] = [
    None, "", "abc", "12", " 12", "1" * 30, "١٢", 0, -1, 2**63, -(2**63) - 1, 1.5, 12.0, 1e300,
    NAN, math.inf, -math.inf, True, False, [], ["stop"], [[1], {"a": 1}], {}, {"a": {"b": [1]}},
    b"\xff\xfe", "gpt\x00", "\ud800", "x" * 10_000,
]  # fmt: skip
READ_KEYS = [
    "gen_ai.operation.name", "gen_ai.request.model", "openai.api.type",
    "gen_ai.response.finish_reasons", "http.response.status_code", "error.type",
    "gen_ai.usage.input_tokens", "gen_ai.usage.output_tokens",
    "gen_ai.usage.cache_read.input_tokens", "gen_ai.response.time_to_first_chunk",
    "gen_ai.response.model", "http.request.resend_count", "openai.request.id",
    "pagerloop.feature", "pagerloop.team", "deployment.environment.name", "session.id",
    "user.id",
]  # fmt: skip


@pytest.mark.parametrize("key", READ_KEYS)
def test_the_span_mapping_refuses_odd_values_without_crashing(key: str) -> None:
    now = datetime.now(UTC)
    start = time.time_ns() - 60_000_000_000
    for value in ODD_VALUES:
        for error, message in ((False, ""), (True, "Error code: 429"), (True, "Error code: 999")):
            for operation in ("chat", "embeddings"):
                attributes = {"gen_ai.operation.name": operation, "gen_ai.request.model": "m"}
                view = SpanView(
                    trace_id="ab" * 16,
                    start_ns=start,
                    end_ns=start + 1_000_000,
                    error=error,
                    status_message=message,
                    attributes={**attributes, key: value},
                    resource={key: value},
                )
                try:
                    fields = call_fields(view)
                    if fields is None:
                        continue
                    call = CallIn.model_validate(fields)
                    [row], _ = to_rows(columns_of([call]), "s", DEFAULT_PRICES, now)
                    record = SimpleNamespace(**dict(zip(CALL_COLUMNS, row, strict=True)))
                except (InvalidSpanError, ValidationError):
                    continue
                # What passes is a call both stores take: finite, bounded, storable text.
                for name in ("latency_ms", "ttft_ms", "cost_usd"):
                    number = getattr(record, name)
                    assert number is None or 0 <= number < 1e8, (key, value, name)
                for name in ("input_tokens", "output_tokens", "retry_count", "http_status"):
                    number = getattr(record, name)
                    assert number is None or 0 <= number <= 1_000_000_000, (key, value, name)
                for name in ("model", "feature", "team", "session_id", "error_type"):
                    text = getattr(record, name)
                    assert text is None or ("\x00" not in text and len(text) <= 128), (key, value)


@pytest.mark.parametrize("start_ns", [0, 1, 2**53, 2**63 - 1, 2**63, 2**64 - 1])
@pytest.mark.parametrize("end_ns", [0, 2**64 - 1])
def test_the_span_mapping_refuses_absurd_times_without_crashing(start_ns: int, end_ns: int) -> None:
    view = SpanView("ab" * 16, start_ns, end_ns, False, "", GOOD, {})
    try:
        fields = call_fields(view)
        assert fields is not None
        CallIn.model_validate(fields)
    except (InvalidSpanError, ValidationError):
        return
    pytest.fail("a call of 1970 or of the 23rd century was accepted")
