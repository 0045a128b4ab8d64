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
from starlette.routing import BaseRoute


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    data: dict[str, Any] = field(default_factory=dict)


async def read_body(request: Request) -> tuple[bytes, dict[str, Any]]:
    """The raw body and its fields, whether sent as JSON or as a form."""
    body = await request.body()
    content_type = request.headers.get("content-type", "")
    if "json" in content_type and body:
        data = json.loads(body)
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
    """Subclasses pass their routes; handlers call `self.record(...)`."""

    def __init__(self, routes: list[BaseRoute]) -> None:
        super().__init__(Starlette(routes=routes))
        self.requests: list[Recorded] = []
        self.lock = threading.Lock()

    def record(self, request: Request, body: bytes, data: dict[str, Any]) -> None:
        with self.lock:
            self.requests.append(
                Recorded(request.method, request.url.path, dict(request.headers), body, data)
            )

    def received(self, path: str) -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if r.path == path]
