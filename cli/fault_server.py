"""The fault-injecting OpenAI-compatible server `pagerloop simulate` calls: llmock, either in a
thread of this process or a running one (`llmock serve`), scripted with the behaviours of each
phase of a scenario (`cli/scenarios.py`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol

import httpx
from llmock.ratelimit import LimitSettings
from llmock.scenarios import behavior_from_dict
from llmock.testing import LLMockServer

from cli.scenarios import ScenarioSetup

# The key the simulated application calls with: llmock counts its quota per key.
API_KEY = "pagerloop-simulate"


class FaultServer(Protocol):
    base_url: str

    def apply(self, setup: ScenarioSetup, faulty: bool) -> None:
        """Script the behaviours of this phase of the scenario (replacing those before)."""


class ResolveAliases:
    """ASGI middleware answering for an alias with the dated snapshot it points to (the
    response's `model`), as OpenAI does; llmock answers with the requested name. The snapshot
    is chosen when the request arrives, as llmock chooses its answer."""

    def __init__(self, app: Any, aliases: Callable[[], dict[str, str]]) -> None:
        self.app = app
        self.aliases = aliases

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        aliases = self.aliases()
        if scope["type"] != "http" or not aliases:
            await self.app(scope, receive, send)
            return
        start: dict[str, Any] | None = None
        chunks: list[bytes] = []

        async def rewrite(message: dict[str, Any]) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                types = [v for k, v in message.get("headers", []) if k == b"content-type"]
                if types and types[0].startswith(b"application/json"):
                    start = message  # held until the body is complete
                    return
            elif message["type"] == "http.response.body" and start is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body"):
                    return
                body = _resolve_model(b"".join(chunks), aliases)
                kept = [(k, v) for k, v in start.get("headers", []) if k != b"content-length"]
                kept.append((b"content-length", str(len(body)).encode()))
                await send({**start, "headers": kept})
                message = {"type": "http.response.body", "body": body}
            await send(message)

        await self.app(scope, receive, rewrite)


def _resolve_model(body: bytes, aliases: dict[str, str]) -> bytes:
    try:
        data = json.loads(body)
    except ValueError:
        return body
    if not isinstance(data, dict) or data.get("model") not in aliases:
        return body
    data["model"] = aliases[data["model"]]
    return json.dumps(data).encode()


class InProcessLlmock:
    """llmock in a thread of this process: its scenario queue, error rates, quota and the
    snapshots its aliases answer as set directly."""

    def __init__(self, port: int, rpm: int | None) -> None:
        self.aliases: dict[str, str] = {}
        self.server = LLMockServer(port=port)
        self.server.app.add_middleware(ResolveAliases, aliases=lambda: self.aliases)
        self.server.start()
        self.base_url = self.server.base_url("openai")
        if rpm is not None:
            limiter = self.server.state.limiter
            limiter.configure(LimitSettings(rpm=rpm))
            # Start with this minute's quota spent, as a busy application would.
            for _ in range(rpm):
                limiter.admit("openai", f"Bearer {API_KEY}", 0)

    def apply(self, setup: ScenarioSetup, faulty: bool) -> None:
        state = self.server.state
        state.chaos.error_rates = dict(setup.error_rates) if faulty else {}
        self.aliases = setup.served_as(faulty)
        state.scenarios.clear()
        state.scenarios.add(*(behavior_from_dict(b) for b in setup.behaviors(faulty)))

    def stop(self) -> None:
        # Do not wait for the answers still being delayed: nobody is waiting for them.
        uvicorn_server = getattr(self.server, "_server", None)
        if uvicorn_server is not None:
            uvicorn_server.force_exit = True
        self.server.stop()


class RemoteLlmock:
    """A running llmock (`llmock serve`), scripted through its `/_llmock/scenario` API. What
    it cannot do as the in-process one does is added to `notes`, for the display."""

    def __init__(self, base_url: str, notes: list[str]) -> None:
        self.base_url = base_url.rstrip("/")
        root = self.base_url.removesuffix("/v1")
        self.admin = f"{root}/_llmock/scenario"
        self.notes = notes

    def apply(self, setup: ScenarioSetup, faulty: bool) -> None:
        behaviors = setup.behaviors(faulty)
        if setup.served_as(faulty) and not self.notes:
            self.notes.append(
                "this llmock answers as the model requested: the runbook finds no earlier "
                "snapshot to pin (the in-process llmock answers as the snapshots)"
            )
        if faulty and setup.error_rates:
            # Error rates are set when llmock starts; over its API, the errors are scripted.
            rates = " ".join(f"--error-rate {s}={r}" for s, r in setup.error_rates)
            self.notes.append(
                f"every request fails here: `llmock serve {rates}` fails only some of them"
            )
            fails = [{"type": "fail", "status": s, "times": None} for s, _ in setup.error_rates]
            behaviors = [*fails, *behaviors]
        try:
            httpx.delete(self.admin, timeout=5).raise_for_status()
            if behaviors:
                httpx.post(self.admin, json={"behaviors": behaviors}, timeout=5).raise_for_status()
        except httpx.HTTPError as exc:
            self.notes.append(f"could not script the faults at {self.admin}: {exc}")

    def stop(self) -> None:
        pass
