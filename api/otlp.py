"""POST /v1/traces: OTLP/HTTP traces (protobuf or JSON, gzip or not); GenAI call spans become
call records through the same validation and write path as /v1/llm-calls. Other spans in the
batch are ignored."""

from __future__ import annotations

import base64
import gzip
import json
import zlib
from datetime import UTC, datetime
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
from pydantic import ValidationError

from api.deps import Services, services
from api.ingest import CallIn, require_ingest_key, store_records, to_record
from api.telemetry import REJECTED_REQUESTS
from instrumentation.genai_spans import SpanView, call_fields

router = APIRouter()

PROTOBUF = "application/x-protobuf"
# A gzip bomb must not get past the body limit: cap what a body may inflate to.
INFLATE_FACTOR = 20


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


def _hex_ids_to_base64(node: Any) -> None:
    """OTLP/JSON writes trace and span ids in hex; protobuf's JSON mapping wants base64."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("traceId", "spanId", "parentSpanId") and isinstance(value, str):
                node[key] = base64.b64encode(bytes.fromhex(value)).decode()
            else:
                _hex_ids_to_base64(value)
    elif isinstance(node, list):
        for item in node:
            _hex_ids_to_base64(item)


def _inflate(body: bytes, encoding: str, limit: int) -> bytes:
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, f"Content-Encoding {encoding}")
    decompressor = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        inflated = decompressor.decompress(body, limit + 1)
    except (zlib.error, gzip.BadGzipFile) as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"body: bad {encoding} data") from exc
    if len(inflated) > limit:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, "inflated body too large")
    return inflated


def decode(body: bytes, content_type: str) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    try:
        if content_type.startswith("application/json"):
            data = json.loads(body)
            _hex_ids_to_base64(data)
            json_format.ParseDict(data, request, ignore_unknown_fields=True)
        else:
            request.ParseFromString(body)
    except (ValueError, DecodeError, json_format.ParseError) as exc:
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST, f"body: not an OTLP ExportTraceServiceRequest ({exc})"
        ) from None
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


@router.post("/v1/traces", dependencies=[Depends(require_ingest_key)])
async def receive_traces(request: Request, svc: Annotated[Services, Depends(services)]) -> Response:
    content_type = request.headers.get("content-type", PROTOBUF).lower()
    if not content_type.startswith((PROTOBUF, "application/json")):
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            "send application/x-protobuf or application/json (OTLP/HTTP)",
        )
    limit = svc.settings.ingest_max_body_bytes * INFLATE_FACTOR
    body = _inflate(await request.body(), request.headers.get("content-encoding", ""), limit)
    export = decode(body, content_type)
    salt = svc.settings.user_hash_salt.get_secret_value()
    now = datetime.now(UTC)
    records, problems = [], []
    for view in spans(export):
        fields = call_fields(view)
        if fields is None:
            continue
        try:
            call = CallIn.model_validate(fields)
        except ValidationError as exc:
            problems.append(f"span of trace {view.trace_id}: {exc.errors()[0]['msg']}")
            continue
        record = to_record(call, salt, svc.prices, now)
        record.source = "otlp"
        records.append(record)
    if records:
        await store_records(svc, records, "traces")
    if problems:
        REJECTED_REQUESTS.labels("traces", "invalid_span").inc(len(problems))
    return _answer(content_type, len(problems), "; ".join(problems[:5]))
