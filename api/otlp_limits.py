"""The bounds of one OTLP/HTTP trace export, enforced while the body is decoded.

A 10 KB gzip can hold millions of empty spans (or empty scope_spans, or empty attributes):
protobuf and json would build every one of them, for seconds and gigabytes, before anything
could count them. So the export is counted first, cheaply, and refused past the budget.
Refusals are 400 or 413: the OTLP/HTTP spec has exporters retry only 429, 502, 503 and 504,
so a refused export is not sent again and again.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from api.errors import printable

# Like the 10,000-call batch of /v1/llm-calls; exporters send 512 spans a batch by default.
MAX_SPANS_PER_REQUEST = 10_000
# Every protobuf message of the export (in JSON: every object and number; arrays are bounded
# apart). A GenAI span of the OpenAI instrumentation is 31 (33 in JSON): the span, and a
# key-value and a value per attribute; 64 a span on average leaves room for events and links.
MAX_ITEMS_PER_REQUEST = 64 * MAX_SPANS_PER_REQUEST
# Message nesting: request, resource_spans, scope_spans, span, key-value, value are 6; the
# rest is for attributes holding lists and maps. Python code walks these values recursively.
MAX_DEPTH = 32
# The OTLP/HTTP spec's recommended limit on a body, inflated or not.
MAX_INFLATED_BYTES = 20 * 1024 * 1024

TOO_MANY_SPANS = f"more than {MAX_SPANS_PER_REQUEST} spans in one request; send smaller batches"
TOO_MANY_ITEMS = (
    f"more than {MAX_ITEMS_PER_REQUEST} items (resource and scope spans, spans, attributes, "
    "events, links, values) in one request; send smaller batches"
)


class ExportRefusedError(Exception):
    """The export as a whole cannot be taken; `status` is the HTTP answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def malformed(why: object) -> ExportRefusedError:
    # Parser messages may quote the body: keep them short and encodable (no lone surrogate).
    text = printable(why, 300)
    return ExportRefusedError(400, f"body: not an OTLP ExportTraceServiceRequest ({text})")


def inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """The body without its Content-Encoding, refused once it inflates past `limit`."""
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise ExportRefusedError(415, f"Content-Encoding {encoding} is not supported (send gzip)")
    decompressor = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        inflated = decompressor.decompress(body, limit + 1)
    except zlib.error as exc:
        raise ExportRefusedError(400, f"body: bad {encoding} data ({exc})") from None
    if len(inflated) > limit:
        raise ExportRefusedError(
            413, f"body inflates to more than {limit} bytes; send smaller batches"
        )
    if not decompressor.eof:
        raise ExportRefusedError(400, f"body: truncated {encoding} data")
    return inflated


class _Budget:
    __slots__ = ("items", "spans")

    def __init__(self) -> None:
        self.items = 0
        self.spans = 0

    def add_items(self, count: int) -> None:
        self.items += count
        if self.items > MAX_ITEMS_PER_REQUEST:
            raise ExportRefusedError(413, TOO_MANY_ITEMS)

    def add_spans(self, count: int) -> None:
        self.spans += count
        if self.spans > MAX_SPANS_PER_REQUEST:
            raise ExportRefusedError(413, TOO_MANY_SPANS)


# --- protobuf: walk the wire format, counting every message, before ParseFromString -------

_Schema = dict[str, dict[int, str]]


def _schema(descriptor: Descriptor, found: _Schema) -> _Schema:
    """For each message type reachable from `descriptor`: field number -> message type."""
    children: dict[int, str] = {}
    found[descriptor.full_name] = children
    for field in descriptor.fields:
        child = field.message_type
        if field.type == FieldDescriptor.TYPE_MESSAGE and child is not None:
            children[field.number] = child.full_name
            if child.full_name not in found:
                _schema(child, found)
    return found


_SCHEMA = _schema(ExportTraceServiceRequest.DESCRIPTOR, {})
_REQUEST = ExportTraceServiceRequest.DESCRIPTOR.full_name
_SPAN = Span.DESCRIPTOR.full_name
_TRUNCATED = "truncated"


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while pos < end:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift >= 64:
            raise malformed("varint longer than 10 bytes")
    raise malformed(_TRUNCATED)


def _walk(data: bytes, pos: int, end: int, message: str, depth: int, budget: _Budget) -> None:
    children = _SCHEMA[message]
    while pos < end:
        key = data[pos]
        if key < 0x80:
            pos += 1
        else:
            key, pos = _varint(data, pos, end)
        wire = key & 7
        if wire == 2:
            length, pos = _varint(data, pos, end)
            stop = pos + length
            if stop > end:
                raise malformed(_TRUNCATED)
            child = children.get(key >> 3)
            if child is not None:
                budget.add_items(1)
                if child == _SPAN:
                    budget.add_spans(1)
                if depth >= MAX_DEPTH:
                    raise malformed(f"messages nested more than {MAX_DEPTH} deep")
                _walk(data, pos, stop, child, depth + 1, budget)
            pos = stop
        elif wire == 0:
            _, pos = _varint(data, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:  # groups: deprecated, never OTLP, and unbounded in depth
            raise malformed(f"wire type {wire}")
    if pos != end:
        raise malformed(_TRUNCATED)


def check_protobuf(data: bytes) -> None:
    """Refuse an export past the span, item or depth budget, before protobuf builds it."""
    _walk(data, 0, len(data), _REQUEST, 0, _Budget())


# --- JSON: json.loads with hooks that count what it builds --------------------------------


def load_json(data: bytes) -> Any:
    """The parsed OTLP/JSON document, refused past the span or item budget while parsing."""
    # No hook sees an array: their number is bounded from above by the brackets in the text.
    if data.count(b"[") > MAX_ITEMS_PER_REQUEST:
        raise ExportRefusedError(413, TOO_MANY_ITEMS)
    budget = _Budget()

    def on_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        budget.add_items(1)
        for key, value in pairs:
            if key == "spans" and isinstance(value, list):
                budget.add_spans(len(value))
        return dict(pairs)

    def on_int(text: str) -> int:
        budget.add_items(1)
        return int(text)

    def on_float(text: str) -> float:
        budget.add_items(1)
        return float(text)

    try:
        return json.loads(data, object_pairs_hook=on_object, parse_int=on_int, parse_float=on_float)
    except RecursionError:
        raise malformed("JSON nested too deep") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, int() of 5000 digits
        raise malformed(f"invalid JSON: {exc}") from None
