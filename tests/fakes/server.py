"""A local HTTP server in a background thread that records every request it answers."""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Self
from urllib.parse import parse_qs

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    data: dict[str, Any] = field(default_factory=dict)


class NotJSONError(ValueError):
    """A body a vendor's JSON parser rejects; `body` is set when it was not recorded yet."""

    def __init__(self, reason: str, body: bytes | None = None) -> None:
        super().__init__(reason)
        self.body = body


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def strict_loads(text: str | bytes) -> Any:
    """`json.loads` as a vendor's parser does it: Python's alone would take `NaN` and
    `Infinity`, which no real server accepts."""
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except ValueError as exc:  # also JSONDecodeError and UnicodeDecodeError
        raise NotJSONError(str(exc)) from exc


async def read_body(request: Request) -> tuple[bytes, dict[str, Any]]:
    """The raw body and its fields, whether sent as JSON or as a form; `NotJSONError` (answered
    by the fake's `invalid_json`) for a JSON body no vendor would parse."""
    body = await request.body()
    content_type = request.headers.get("content-type", "")
    if "json" in content_type and body:
        try:
            data = strict_loads(body)
        except NotJSONError as exc:
            exc.body = body
            raise
        return body, data if isinstance(data, dict) else {"_": data}
    if body:
        return body, {key: values[-1] for key, values in parse_qs(body.decode()).items()}
    return body, dict(request.query_params)


class ThreadedServer:
    """An ASGI app served by uvicorn on a free loopback port, in a background thread."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{type(self).__name__} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class FakeServer(ThreadedServer):
    """Subclasses pass their routes; handlers call `self.record(...)`; a body that is not
    strict JSON is recorded and answered by `invalid_json`, in the vendor's own shape."""

    def __init__(self, routes: list[BaseRoute]) -> None:
        super().__init__(
            Starlette(routes=routes, exception_handlers={NotJSONError: self._not_json})
        )
        self.requests: list[Recorded] = []
        self.lock = threading.Lock()

    def invalid_json(self, reason: str) -> Response:
        return JSONResponse({"error": f"invalid JSON: {reason}"}, 400)

    async def _not_json(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, NotJSONError)
        if exc.body is not None:
            self.record(request, exc.body, {})
        return self.invalid_json(str(exc))

    def record(self, request: Request, body: bytes, data: dict[str, Any]) -> None:
        with self.lock:
            self.requests.append(
                Recorded(request.method, request.url.path, dict(request.headers), body, data)
            )

    def received(self, path: str) -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if r.path == path]
