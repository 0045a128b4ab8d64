"""JSON bodies parsed and validated off the event loop, still described in the OpenAPI schema.

FastAPI parses a declared body with `json.loads` and validates it on the event loop, before the
endpoint's own code and after reading it whole: a 5 MB batch would hold every other request
(Slack's 3-second interactions too) for the time it takes. Endpoints that take big bodies read
them only once authenticated, and let pydantic-core parse and validate them in a worker thread.
"""

from __future__ import annotations

import asyncio
from typing import Any, Generic, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import TypeAdapter, ValidationError

T = TypeVar("T")
REF = "#/components/schemas/{model}"


class JsonBody(Generic[T]):
    """One endpoint's body type: `await body.parse(request)` and `openapi_extra=body.openapi`."""

    registered: list[JsonBody[Any]] = []

    def __init__(self, name: str, shape: Any) -> None:
        self.name = name
        self.adapter: TypeAdapter[T] = TypeAdapter(shape)
        JsonBody.registered.append(self)

    @property
    def openapi(self) -> dict[str, Any]:
        schema = {"$ref": REF.format(model=self.name)}
        return {
            "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}
        }

    def components(self) -> dict[str, Any]:
        schema = self.adapter.json_schema(ref_template=REF)
        found = schema.pop("$defs", {})
        found[self.name] = schema
        return dict(found)

    async def parse(self, request: Request) -> T:
        return await self.parse_bytes(await request.body())

    async def parse_bytes(self, raw: bytes) -> T:
        try:
            return await asyncio.to_thread(self.adapter.validate_json, raw)
        except ValidationError as exc:
            errors = [dict(error, loc=("body", *error["loc"])) for error in exc.errors()]
            raise RequestValidationError(errors) from None


def add_components(openapi: dict[str, Any]) -> dict[str, Any]:
    schemas = openapi.setdefault("components", {}).setdefault("schemas", {})
    for body in JsonBody.registered:
        schemas.update(body.components())
    return openapi
