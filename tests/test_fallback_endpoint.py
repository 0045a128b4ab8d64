"""Fallback endpoints: a `reroute` to `model@name` sends the call to the endpoint the app named
(another OpenAI-compatible server, or Azure OpenAI), with the real OpenAI SDK against two local
servers, the controls read from a real store, and the call recorded once."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest
from pagerloop_sdk import Recorder, endpoints, instrument, llm_context, register_endpoint
from pagerloop_sdk import controls as ctl
from pagerloop_sdk.capture import ENDPOINT_KEY
from sqlalchemy import Engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from instrumentation.store_sink import StoreSink
from stores import controls
from tests.fakes.server import ThreadedServer
from tests.helpers import put_control, recorded

CHAT = [{"role": "user", "content": "Summarize the quarterly report"}]
AZURE_VERSION = "2024-10-21"


@dataclass
class Seen:
    path: str
    query: str
    headers: dict[str, str]
    body: dict[str, Any]


class FakeOpenAI(ThreadedServer):
    """Answers chat completions as OpenAI (`/v1/...`) and as Azure OpenAI
    (`/openai/deployments/<deployment>/...`) do; `fail_next` answers that many with a 500."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: list[Seen] = []
        self.fail_next = 0
        self._lock = threading.Lock()
        super().__init__(
            Starlette(
                routes=[
                    Route("/v1/chat/completions", self._chat, methods=["POST"]),
                    Route(
                        "/openai/deployments/{deployment}/chat/completions",
                        self._chat,
                        methods=["POST"],
                    ),
                ]
            )
        )

    async def _chat(self, request: Request) -> Response:
        body = await request.json()
        with self._lock:
            self.seen.append(Seen(request.url.path, request.url.query, dict(request.headers), body))
            failing = self.fail_next > 0
            self.fail_next -= failing
        if failing:
            return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, 500)
        model = request.path_params.get("deployment") or body["model"]
        return JSONResponse(
            {
                "id": f"chatcmpl-{self.name}",
                "object": "chat.completion",
                "created": 1_700_000_000,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": f"from {self.name}"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
            },
            headers={"x-request-id": f"req-{self.name}-{len(self.seen)}"},
        )

    def models(self) -> list[str]:
        return [seen.body["model"] for seen in self.seen]


@pytest.fixture
def primary() -> Iterator[FakeOpenAI]:
    with FakeOpenAI("primary") as server:
        yield server


@pytest.fixture
def backup() -> Iterator[FakeOpenAI]:
    with FakeOpenAI("backup") as server:
        yield server


@pytest.fixture
def recorder(engine: Engine) -> Iterator[Recorder]:
    recorder = Recorder(StoreSink(engine), quality_sample_rate=0.0, flush_interval=0.05)
    yield recorder
    recorder.close()


@pytest.fixture(autouse=True)
def fresh_endpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test names its own endpoints, and sees its own warnings."""
    monkeypatch.setattr(endpoints, "_registered", {})
    monkeypatch.setattr(endpoints, "_clients", {})
    monkeypatch.setattr(ctl, "_warned", set())


def sync_client(server: FakeOpenAI, recorder: Recorder, **options: Any) -> openai.OpenAI:
    return instrument(
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="primary-key", **options),
        recorder=recorder,
    )


def async_client(server: FakeOpenAI, recorder: Recorder) -> openai.AsyncOpenAI:
    return instrument(
        openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="primary-key", max_retries=0),
        recorder=recorder,
    )


def test_a_reroute_to_a_named_endpoint_sends_the_call_there_only(
    primary: FakeOpenAI, backup: FakeOpenAI, recorder: Recorder, engine: Engine
) -> None:
    reroute = put_control(engine, "reroute", "gpt-4.1-mini@backup", model="gpt-4.1")
    register_endpoint("backup", base_url=f"{backup.url}/v1", api_key="backup-key")
    client = sync_client(primary, recorder, max_retries=0)

    with llm_context(feature="chat", metadata={"prompt_version": "v3"}):
        answer = client.chat.completions.create(model="gpt-4.1", messages=CHAT)
    assert answer.choices[0].message.content == "from backup"
    assert (primary.models(), backup.models()) == ([], ["gpt-4.1-mini"])
    [sent] = backup.seen
    assert sent.headers["authorization"] == "Bearer backup-key"  # never the app's own key

    client.chat.completions.create(model="o3", messages=CHAT)  # no control: the app's client
    assert (primary.models(), backup.models()) == (["o3"], ["gpt-4.1-mini"])

    # A body the app reads itself is not recorded, but still goes to the endpoint.
    with client.chat.completions.with_streaming_response.create(
        model="gpt-4.1", messages=CHAT
    ) as raw:
        assert b"from backup" in raw.read()
    assert backup.models() == ["gpt-4.1-mini", "gpt-4.1-mini"]

    rerouted, untouched = recorded(recorder, engine)
    assert (rerouted.model, rerouted.response_model) == ("gpt-4.1", "gpt-4.1-mini")
    assert rerouted.controls == f"reroute#{reroute.id}"
    assert rerouted.metadata_ == {"prompt_version": "v3", ENDPOINT_KEY: "backup"}
    assert (rerouted.status, rerouted.request_id) == ("success", "req-backup-1")
    assert (rerouted.input_tokens, rerouted.output_tokens) == (7, 3)
    assert (untouched.controls, untouched.metadata_) == (None, None)


def test_the_same_model_at_another_endpoint_is_a_reroute_too(
    primary: FakeOpenAI, backup: FakeOpenAI, recorder: Recorder, engine: Engine
) -> None:
    reroute = put_control(engine, "reroute", "gpt-4.1@backup", model="gpt-4.1")
    register_endpoint("backup", base_url=f"{backup.url}/v1", api_key="backup-key")
    sync_client(primary, recorder, max_retries=0).chat.completions.create(
        model="gpt-4.1", messages=CHAT
    )
    assert (primary.models(), backup.models()) == ([], ["gpt-4.1"])
    [row] = recorded(recorder, engine)
    assert row.controls == f"reroute#{reroute.id}"


async def test_an_endpoint_named_in_the_environment_serves_async_clients(
    primary: FakeOpenAI,
    backup: FakeOpenAI,
    recorder: Recorder,
    engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PAGERLOOP_ENDPOINT_BACKUP_EAST_BASE_URL", f"{backup.url}/v1")
    monkeypatch.setenv("PAGERLOOP_ENDPOINT_BACKUP_EAST_API_KEY", "east-key")
    pin = put_control(engine, "pin", "gpt-4.1-mini@backup-east", feature="chat")
    client = async_client(primary, recorder)

    with llm_context(feature="chat"):
        await client.chat.completions.create(model="gpt-4.1", messages=CHAT)
    with llm_context(feature="search"):
        await client.chat.completions.create(model="gpt-4.1", messages=CHAT)
    assert (primary.models(), backup.models()) == (["gpt-4.1"], ["gpt-4.1-mini"])
    assert backup.seen[0].headers["authorization"] == "Bearer east-key"
    pinned, untouched = recorded(recorder, engine)
    assert (pinned.controls, pinned.metadata_) == (f"pin#{pin.id}", {ENDPOINT_KEY: "backup-east"})
    assert untouched.controls is None


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_an_azure_endpoint_is_called_by_deployment_with_its_api_key(
    mode: str, primary: FakeOpenAI, backup: FakeOpenAI, recorder: Recorder, engine: Engine
) -> None:
    azure = backup
    reroute = put_control(engine, "reroute", "mini-deployment@azure-east", model="gpt-4.1")
    register_endpoint(
        "azure-east", base_url=azure.url, api_key="azure-key", api_version=AZURE_VERSION
    )
    if mode == "sync":
        sync_client(primary, recorder, max_retries=0).chat.completions.create(
            model="gpt-4.1", messages=CHAT
        )
    else:
        await async_client(primary, recorder).chat.completions.create(
            model="gpt-4.1", messages=CHAT
        )

    assert primary.seen == []
    [sent] = azure.seen
    assert sent.path == "/openai/deployments/mini-deployment/chat/completions"
    assert sent.query == f"api-version={AZURE_VERSION}"
    assert sent.headers["api-key"] == "azure-key"
    assert "primary-key" not in str(sent.headers)
    [row] = recorded(recorder, engine)
    assert (row.controls, row.response_model) == (f"reroute#{reroute.id}", "mini-deployment")
    assert row.metadata_ == {ENDPOINT_KEY: "azure-east"}


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_an_unknown_endpoint_leaves_the_call_as_the_app_made_it_and_warns_once(
    mode: str,
    primary: FakeOpenAI,
    recorder: Recorder,
    engine: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    reroute = put_control(engine, "reroute", "gpt-4.1-mini@nowhere", model="gpt-4.1")
    with caplog.at_level(logging.WARNING, logger="pagerloop_sdk.controls"):
        for _ in range(2):
            if mode == "sync":
                sync_client(primary, recorder, max_retries=0).chat.completions.create(
                    model="gpt-4.1", messages=CHAT
                )
            else:
                await async_client(primary, recorder).chat.completions.create(
                    model="gpt-4.1", messages=CHAT
                )

    assert primary.models() == ["gpt-4.1", "gpt-4.1"]  # not even the model changed
    warnings = [r.getMessage() for r in caplog.records if "nowhere" in r.getMessage()]
    assert len(warnings) == 1
    assert f"#{reroute.id}" in warnings[0]
    assert "PAGERLOOP_ENDPOINT_NOWHERE_BASE_URL" in warnings[0]
    rows = recorded(recorder, engine)
    assert [(r.controls, r.metadata_) for r in rows] == [(None, None), (None, None)]


def test_a_rerouted_call_retries_and_fails_as_the_apps_client_would(
    primary: FakeOpenAI, backup: FakeOpenAI, recorder: Recorder, engine: Engine
) -> None:
    put_control(engine, "reroute", "gpt-4.1-mini@backup", model="gpt-4.1")
    register_endpoint("backup", base_url=f"{backup.url}/v1", api_key="backup-key")
    backup.fail_next = 5
    patient = sync_client(primary, recorder, max_retries=1)
    with pytest.raises(openai.InternalServerError):
        patient.chat.completions.create(model="gpt-4.1", messages=CHAT)
    assert len(backup.seen) == 2  # the app's client allows one retry: so does the endpoint's
    impatient = sync_client(primary, recorder, max_retries=0)
    with pytest.raises(openai.InternalServerError):
        impatient.chat.completions.create(model="gpt-4.1", messages=CHAT)
    assert len(backup.seen) == 3
    assert primary.seen == []

    first, second = recorded(recorder, engine)  # each failed call recorded once
    assert (first.status, first.http_status, first.retry_count) == ("server_error", 500, 1)
    assert (second.status, second.retry_count) == ("server_error", 0)
    assert first.metadata_ == {ENDPOINT_KEY: "backup"}


def test_a_changed_endpoint_is_used_from_the_next_call(
    primary: FakeOpenAI, backup: FakeOpenAI, recorder: Recorder, engine: Engine
) -> None:
    put_control(engine, "reroute", "gpt-4.1-mini@backup", model="gpt-4.1")
    register_endpoint("backup", base_url=f"{backup.url}/v1", api_key="old")
    client = sync_client(primary, recorder, max_retries=0)
    client.chat.completions.create(model="gpt-4.1", messages=CHAT)
    register_endpoint("backup", base_url=f"{backup.url}/v1", api_key="rotated")
    client.chat.completions.create(model="gpt-4.1", messages=CHAT)
    assert [s.headers["authorization"] for s in backup.seen] == ["Bearer old", "Bearer rotated"]
    assert len(endpoints._clients) == 1  # the old key's client is gone


# --- validation and wording (the server's side) ----------------------------------------------


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("gpt-4.1-mini", None),
        ("gpt-4.1-mini@azure-east", None),
        ("gpt-4.1@backup_2", None),
        ("@azure-east", "needs the model"),
        ("gpt-4.1-mini@", "endpoint (after '@')"),
        ("gpt-4.1-mini@Azure", "endpoint (after '@')"),
        ("gpt-4.1-mini@a@b", "endpoint (after '@')"),
        ("gpt-4.1-mini@" + "a" * 41, "endpoint (after '@')"),
        ("gpt-4.1-mini@east\n", "endpoint (after '@')"),
    ],
)
def test_a_route_names_an_endpoint_after_an_at_sign(value: str, problem: str | None) -> None:
    for kind in ("reroute", "pin"):
        found = controls.validate(kind, value)
        assert (found is None) if problem is None else (found is not None and problem in found)


def test_a_route_to_an_endpoint_says_where() -> None:
    assert (
        controls.describe("reroute", None, "gpt-4.1", "gpt-4.1-mini@azure-east")
        == "reroute gpt-4.1 -> gpt-4.1-mini at endpoint azure-east"
    )
    assert (
        controls.describe("pin", "chat", "gpt-4.1", "gpt-4.1-2025-04-14")
        == "pin gpt-4.1 -> gpt-4.1-2025-04-14 (feature chat)"
    )


def test_an_endpoint_is_checked_where_it_is_registered() -> None:
    with pytest.raises(ValueError, match="endpoint name"):
        register_endpoint("Azure East", base_url="https://example.invalid", api_key="k")
    for url in ("", "example.invalid", "ftp://example.invalid", "http://[::1", "http://h:port"):
        with pytest.raises(ValueError, match="base_url"):
            register_endpoint("east", base_url=url, api_key="k")
    with pytest.raises(ValueError, match="api_key"):
        register_endpoint("east", base_url="https://example.invalid", api_key="")
    assert endpoints.configured("east") is None
    register_endpoint("east", base_url="https://example.invalid", api_key="sk-secret")
    assert "sk-secret" not in repr(endpoints.configured("east"))


@pytest.mark.parametrize(
    "env",
    [
        {"BASE_URL": "http://127.0.0.1:9/v1"},  # no key: never the app's OPENAI_API_KEY
        {"BASE_URL": "not a url", "API_KEY": "k"},
        {"API_KEY": "k"},
    ],
)
def test_an_endpoint_the_environment_gives_half_of_is_no_endpoint(
    env: dict[str, str],
    primary: FakeOpenAI,
    recorder: Recorder,
    engine: Engine,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(f"PAGERLOOP_ENDPOINT_HALF_{name}", value)
    monkeypatch.setenv("OPENAI_API_KEY", "the-apps-openai-key")
    put_control(engine, "reroute", "gpt-4.1-mini@half", model="gpt-4.1")
    sync_client(primary, recorder, max_retries=0).chat.completions.create(
        model="gpt-4.1", messages=CHAT
    )
    assert primary.models() == ["gpt-4.1"]
