"""POST /v1/traces: OTLP/HTTP traces (protobuf or JSON, gzip or not); GenAI call spans become
call records through the same validation and write path as /v1/llm-calls. Other spans in the
batch are ignored. A span's record has a call_id made from its trace and span ids, so an export
sent again (an exporter's retry after a timeout) writes nothing twice."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Status
from pagerloop_sdk.pricing import PriceTable
from pydantic import ValidationError

from api.auth import require_ingest_key
from api.deps import Services, services
from api.errors import INGEST_ERRORS
from api.ingest import columns_of, store_records, to_rows
from api.ingest_types import CallIn
from api.otlp_limits import (
    MAX_DEPTH,
    MAX_INFLATED_BYTES,
    ExportRefusedError,
    check_protobuf,
    inflate,
    load_json,
    malformed,
)
from api.telemetry import REJECTED_REQUESTS
from instrumentation.genai_spans import InvalidSpanError, SpanView, call_fields

router = APIRouter()

PROTOBUF = "application/x-protobuf"
_REASONS = {400: "malformed", 413: "too_large", 415: "unsupported"}
# Decoding runs off the event loop, two exports at a time: each may take a second of CPU and
# a few hundred MB at the budget, and the next ones wait their turn without holding either.
_DECODERS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="otlp-decode")


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    if kind is None:
        return None
    return getattr(value, kind)


def _attributes(pairs: Any) -> dict[str, Any]:
    found: dict[str, Any] = {}
    pair: KeyValue
    for pair in pairs:
        found[pair.key] = _value(pair.value)
    return found


def _listed(node: Any, key: str) -> list[Any]:
    value = node.get(key) if isinstance(node, dict) else None
    return value if isinstance(value, list) else []  # a wrong type is ParseDict's to report


def _id_holders(data: dict[str, Any]) -> Iterator[Any]:
    for resource_spans in _listed(data, "resourceSpans"):
        for scope_spans in _listed(resource_spans, "scopeSpans"):
            for span in _listed(scope_spans, "spans"):
                yield span
                yield from _listed(span, "links")


def _hex_ids_to_base64(data: dict[str, Any]) -> None:
    """OTLP/JSON writes trace and span ids in hex; protobuf's JSON mapping wants base64."""
    for node in _id_holders(data):
        for key in ("traceId", "spanId", "parentSpanId"):
            value = node.get(key) if isinstance(node, dict) else None
            if isinstance(value, str):
                try:
                    node[key] = base64.b64encode(bytes.fromhex(value)).decode()
                except ValueError:
                    raise ExportRefusedError(400, f"body: {key} is not hex") from None


def decode(body: bytes, content_type: str) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    try:
        if content_type.startswith("application/json"):
            data = load_json(body)
            if not isinstance(data, dict):
                raise ExportRefusedError(400, "body: OTLP/JSON must be an object")
            _hex_ids_to_base64(data)
            json_format.ParseDict(
                data, request, ignore_unknown_fields=True, max_recursion_depth=MAX_DEPTH
            )
        else:
            check_protobuf(body)
            request.ParseFromString(body)
    # TypeError: ParseDict given a list or a number where it expects an object.
    except (ValueError, TypeError, DecodeError, json_format.ParseError) as exc:
        raise malformed(exc) from None
    return request


def spans(request: ExportTraceServiceRequest) -> list[SpanView]:
    found = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                found.append(
                    SpanView(
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        error=span.status.code == Status.STATUS_CODE_ERROR,
                        status_message=span.status.message,
                        attributes=_attributes(span.attributes),
                        resource=resource,
                    )
                )
    return found


def _answer(content_type: str, rejected: int, message: str) -> Response:
    answer = ExportTraceServiceResponse()
    if rejected:
        answer.partial_success.rejected_spans = rejected
        answer.partial_success.error_message = message
    if content_type.startswith("application/json"):
        return Response(json_format.MessageToJson(answer), media_type="application/json")
    return Response(answer.SerializeToString(), media_type=PROTOBUF)


def calls(
    body: bytes,
    *,
    encoding: str,
    content_type: str,
    limit: int,
    salt: str,
    prices: PriceTable,
    now: datetime,
) -> tuple[list[tuple[Any, ...]], list[str]]:
    """The stored rows of the export's GenAI spans and why each refused span was refused. CPU
    bound, for a second at the budget: run it off the event loop."""
    export = decode(inflate(body, encoding, limit), content_type)
    calls, problems = [], []
    for view in spans(export):
        try:
            fields = call_fields(view)
            if fields is None:
                continue
            calls.append(CallIn.model_validate(fields))
        except InvalidSpanError as exc:
            problems.append(f"span of trace {view.trace_id}: {exc}")
        except ValidationError as exc:
            problems.append(f"span of trace {view.trace_id}: {exc.errors()[0]['msg']}")
    columns = columns_of(calls)
    columns["source"] = ["otlp"] * len(calls)
    rows, _ = to_rows(columns, salt, prices, now)  # spans carry no scorer verdict
    return rows, problems


_ERRORS: dict[int | str, dict[str, Any]] = {
    **INGEST_ERRORS,
    400: {"description": "not an OTLP ExportTraceServiceRequest (or bad gzip)"},
    413: {"description": "body over the size limit, or more than 10,000 spans"},
    415: {"description": "neither application/x-protobuf nor application/json"},
}


@router.post("/v1/traces", dependencies=[Depends(require_ingest_key)], responses=_ERRORS)
async def receive_traces(request: Request, svc: Annotated[Services, Depends(services)]) -> Response:
    content_type = request.headers.get("content-type", PROTOBUF).lower()
    if not content_type.startswith((PROTOBUF, "application/json")):
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            "send application/x-protobuf or application/json (OTLP/HTTP)",
        )
    work = partial(
        calls,
        await request.body(),
        encoding=request.headers.get("content-encoding", "").strip().lower(),
        content_type=content_type,
        # An uncompressed body may already be as large as the body limit.
        limit=max(MAX_INFLATED_BYTES, svc.settings.ingest_max_body_bytes),
        salt=svc.settings.user_hash_salt.get_secret_value(),
        prices=svc.prices,
        now=datetime.now(UTC),
    )
    try:
        rows, problems = await asyncio.get_running_loop().run_in_executor(_DECODERS, work)
    except ExportRefusedError as exc:
        REJECTED_REQUESTS.labels("traces", _REASONS.get(exc.status, "refused")).inc()
        raise HTTPException(exc.status, exc.message) from None
    if rows:
        await store_records(svc, rows, "traces")
    if problems:
        REJECTED_REQUESTS.labels("traces", "invalid_span").inc(len(problems))
    return _answer(content_type, len(problems), "; ".join(problems[:5]))
