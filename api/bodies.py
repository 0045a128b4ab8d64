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

    def __init__(self, name: str, shape: Any, media_type: str = "application/json") -> None:
        self.name = name
        self.media_type = media_type
        self.adapter: TypeAdapter[T] = TypeAdapter(shape)
        JsonBody.registered.append(self)

    @staticmethod
    def openapi_of(*bodies: JsonBody[Any]) -> dict[str, Any]:
        """`openapi_extra` of an endpoint taking any of `bodies`, each under its media type."""
        content = {
            body.media_type: {"schema": {"$ref": REF.format(model=body.name)}} for body in bodies
        }
        return {"requestBody": {"required": True, "content": content}}

    @property
    def openapi(self) -> dict[str, Any]:
        return JsonBody.openapi_of(self)

    def components(self) -> dict[str, Any]:
        schema = self.adapter.json_schema(ref_template=REF)
        found = schema.pop("$defs", {})
        found[self.name] = schema
        return dict(found)

    async def parse(self, request: Request) -> T:
        return await asyncio.to_thread(self.validate, await request.body())

    def validate(self, raw: bytes) -> T:
        """The body, or RequestValidationError (a 422 naming the field). CPU bound."""
        try:
            return self.adapter.validate_json(raw)
        except ValidationError as exc:
            errors = [dict(error, loc=("body", *error["loc"])) for error in exc.errors()]
            raise RequestValidationError(errors) from None


def add_components(openapi: dict[str, Any]) -> dict[str, Any]:
    schemas = openapi.setdefault("components", {}).setdefault("schemas", {})
    for body in JsonBody.registered:
        schemas.update(body.components())
    return openapi
