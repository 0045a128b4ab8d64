"""Hostile and absurd requests, one regression test per case found: each gets a 4xx naming what
is wrong, nothing of its request is stored, and no other request waits on it. On SQLite and
PostgreSQL (the `store` fixture), since each store refuses different things."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, func
from sqlmodel import Session, select
from temporalio.testing import WorkflowEnvironment

from api.app import create_app
from api.deps import Services
from config import Settings
from stores.llm_calls import LLMCall
from stores.quality import QualityScore
from stores.silences import Silence
from tests.helpers import api_client

INGEST = "ingest-key-1"
OPERATOR = "operator-key-1"
SLACK_SECRET = "slack-signing-secret"
PD_SECRET = "pagerduty-webhook-secret"
APP = {"Authorization": f"Bearer {INGEST}"}
OPS = {"Authorization": f"Bearer {OPERATOR}"}


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "ingest_api_keys": INGEST,
        "operator_api_keys": f"alice:{OPERATOR}",
        "slack_signing_secret": SLACK_SECRET,
        "pagerduty_webhook_secret": PD_SECRET,
        "user_hash_salt": "pepper",
        **overrides,
    }
    return Settings(_env_file=None, **values)


def client_for(env: WorkflowEnvironment, engine: Engine, **overrides: Any) -> httpx.AsyncClient:
    return api_client(settings(**overrides), engine, env.client)


@pytest.fixture
async def api(
    time_skipping_env: WorkflowEnvironment, store: Engine
) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(time_skipping_env, store) as client:
        yield client


def count(engine: Engine, table: Any) -> int:
    with Session(engine) as session:
        return int(session.exec(select(func.count()).select_from(table)).one())


def call(**fields: Any) -> dict[str, Any]:
    return {"model": "gpt-4.1", "status": "success", "latency_ms": 5, **fields}


async def post_raw(api: httpx.AsyncClient, path: str, text: str) -> httpx.Response:
    """Python's json writes Infinity and NaN; so do careless clients. Send the text as is."""
    headers = {**APP, "content-type": "application/json"}
    return await api.post(path, content=text.encode("utf-8", "surrogatepass"), headers=headers)


# --- /v1/llm-calls: every value bounded, the batch all or nothing ---------------------------

A_GOOD_CALL = json.dumps(call())


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ('{"model":"x","status":"success","latency_ms":5,"cost_usd":Infinity}', "cost_usd"),
        ('{"model":"x","status":"success","latency_ms":NaN}', "latency_ms"),
        ('{"model":"x","status":"success","latency_ms":Infinity}', "latency_ms"),
        ('{"model":"x","status":"success","latency_ms":1e999}', "latency_ms"),
        ('{"model":"x","status":"success","latency_ms":5,"input_tokens":18446744073709551616}',
         "input_tokens"),
        ('{"model":"x","status":"success","latency_ms":5,"output_tokens":4294967296}',
         "output_tokens"),
        ('{"model":"x","status":"success","latency_ms":5,"retry_count":2147483648}',
         "retry_count"),
        ('{"model":"x","status":"success","latency_ms":5,"timestamp":"0001-01-01T00:00:00+14:00"}',
         "timestamp"),
        ('{"model":"x","status":"success","latency_ms":5,"timestamp":"9999-12-31T23:59:59Z"}',
         "timestamp"),
        ('{"model":"x","status":"success","latency_ms":5,"feature":"a\\u0000b"}', "feature"),
        ('{"model":"x","status":"success","latency_ms":5,"metadata":{"k":"\\u0000"}}', "metadata"),
        ('{"model":"x","status":"success","latency_ms":5,"metadata":{"k":{"deep":[1]}}}',
         "metadata"),
        ('{"model":"x","status":"success","latency_ms":5,"error_message":"' + "e" * 10_001 + '"}',
         "error_message"),
    ],
)  # fmt: skip
async def test_a_bad_value_gets_its_batch_a_422_naming_it_and_stores_nothing(
    api: httpx.AsyncClient, store: Engine, bad: str, field: str
) -> None:
    response = await post_raw(api, "/v1/llm-calls", f'{{"calls":[{A_GOOD_CALL},{bad}]}}')

    assert response.status_code == 422, response.text
    assert f"calls[1].{field}" in response.json()["detail"]
    assert count(store, LLMCall) == 0


async def test_a_lone_surrogate_is_refused_as_invalid_json(
    api: httpx.AsyncClient, store: Engine
) -> None:
    response = await post_raw(
        api, "/v1/llm-calls", '{"calls":[{"model":"x\\ud800","status":"success","latency_ms":5}]}'
    )
    assert response.status_code == 422
    assert count(store, LLMCall) == 0


async def test_the_largest_values_a_call_may_have_are_stored_exactly(
    api: httpx.AsyncClient, store: Engine
) -> None:
    biggest = call(
        latency_ms=86_400_000,
        input_tokens=1_000_000_000,
        output_tokens=1_000_000_000,
        cost_usd=10_000,
        retry_count=100,
        feature="ü" * 128,
    )
    response = await api.post("/v1/llm-calls", json={"calls": [biggest] * 3}, headers=APP)

    assert response.status_code == 202, response.text
    with Session(store) as session:
        rows = list(session.exec(select(LLMCall)))
    assert [(r.input_tokens, r.cost_usd, r.feature) for r in rows] == [
        (1_000_000_000, 10_000, "ü" * 128)
    ] * 3


async def test_errors_never_echo_the_input_back(api: httpx.AsyncClient) -> None:
    response = await post_raw(api, "/v1/llm-calls", '{"calls":[{"model":"' + "m" * 5000 + '"}]}')
    assert response.status_code == 422
    assert "mmmmmmmmmm" not in response.text
    assert "calls[0].model" in response.json()["detail"]


async def test_a_bad_metadata_key_is_named(api: httpx.AsyncClient) -> None:
    bad = call(metadata={"k" * 65: 1, "ok": "\u0000"})
    response = await api.post("/v1/llm-calls", json={"calls": [bad]}, headers=APP)
    assert response.status_code == 422
    fields = {error["field"] for error in response.json()["errors"]}
    assert "calls[0].metadata.ok" in fields
    assert any(f.startswith("calls[0].metadata.kkkk") for f in fields)


async def test_a_call_id_twice_in_one_batch_is_named(api: httpx.AsyncClient, store: Engine) -> None:
    twice = [call(call_id="0123456789abcdef"), call(), call(call_id="0123456789abcdef")]
    response = await api.post("/v1/llm-calls", json={"calls": twice}, headers=APP)
    assert response.status_code == 422
    assert "calls[2].call_id" in response.json()["detail"]
    assert count(store, LLMCall) == 0


# --- /v1/feedback -------------------------------------------------------------------------


async def test_feedback_lists_are_bounded(api: httpx.AsyncClient, store: Engine) -> None:
    items = [{"call_id": f"{i:032x}", "thumbs": "up"} for i in range(1001)]
    response = await api.post("/v1/feedback", json=items, headers=APP)

    assert response.status_code == 422
    assert "List should have at most 1000 items" in response.text
    assert count(store, QualityScore) == 0


async def test_feedback_with_a_nan_score_is_refused(api: httpx.AsyncClient) -> None:
    response = await post_raw(api, "/v1/feedback", '{"call_id":"abc","score":NaN}')
    assert response.status_code == 422
    assert "score" in response.json()["detail"]


# --- the signed webhooks ------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/slack/interactions", "/pagerduty/webhook"])
async def test_non_ascii_signatures_are_a_401_not_a_traceback(
    api: httpx.AsyncClient, path: str
) -> None:
    now = str(int(time.time())).encode()
    headers = {
        b"X-Slack-Request-Timestamp": now,
        b"X-Slack-Signature": "v0=é".encode("latin-1"),
        b"X-PagerDuty-Signature": "v1=ü".encode("latin-1"),
    }
    response = await api.post(path, content=b"payload=%7B%7D", headers=headers)
    assert response.status_code == 401


def _slack_signed(body: bytes) -> dict[str, str]:
    stamp = str(int(time.time()))
    digest = hmac.new(SLACK_SECRET.encode(), b"v0:" + stamp.encode() + b":" + body, hashlib.sha256)
    return {
        "X-Slack-Request-Timestamp": stamp,
        "X-Slack-Signature": f"v0={digest.hexdigest()}",
        "content-type": "application/x-www-form-urlencoded",
    }


@pytest.mark.parametrize(
    "payload",
    ['{"type":"block_actions","user":"not an object"}', '{"type":"block_actions","actions":5}',
     "[1,2]", '{"type":"block_actions","actions":[{"action_id":7}]}'],
)  # fmt: skip
async def test_signed_but_malformed_slack_payloads_get_a_422(
    api: httpx.AsyncClient, payload: str
) -> None:
    # Each case has a store of its own, so the replay cache never sees a payload twice.
    body = httpx.QueryParams({"payload": payload}).__str__().encode()
    response = await api.post("/slack/interactions", content=body, headers=_slack_signed(body))
    assert response.status_code == 422
    assert response.json()["detail"].startswith("payload")


@pytest.mark.parametrize(
    "body",
    [b'{"event":{"data":[1]}}', b'{"event":{"agent":"x"}}', b"[]", b'{"event":5}', b"\xff"],
)
async def test_signed_but_malformed_pagerduty_webhooks_get_a_422(
    api: httpx.AsyncClient, body: bytes
) -> None:
    signature = hmac.new(PD_SECRET.encode(), body, hashlib.sha256).hexdigest()
    headers = {"X-PagerDuty-Signature": f"v1={signature}"}
    response = await api.post("/pagerduty/webhook", content=body, headers=headers)
    assert response.status_code == 422


# --- operators and apps hold different keys -----------------------------------------------


async def test_an_ingest_key_cannot_silence(api: httpx.AsyncClient, store: Engine) -> None:
    body = {"trigger": "error_rate", "reason": "r"}
    assert (await api.post("/v1/silences", json=body, headers=APP)).status_code == 403
    assert (await api.get("/v1/silences", headers=APP)).status_code == 403
    assert (await api.delete("/v1/silences/1", headers=APP)).status_code == 403
    assert (await api.post("/v1/silences", json=body)).status_code == 401
    assert count(store, Silence) == 0


async def test_the_author_is_the_operator_keys_name(api: httpx.AsyncClient) -> None:
    made = await api.post(
        "/v1/silences", json={"trigger": "error_rate", "reason": "deploy"}, headers=OPS
    )
    assert made.status_code == 201, made.text
    assert made.json()["author"] == "alice"
    forged = await api.post(
        "/v1/silences",
        json={"trigger": "error_rate", "reason": "r", "author": "mallory"},
        headers=OPS,
    )
    assert forged.status_code == 422
    assert "author" in forged.json()["detail"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"reason": "r", "ends_at": "9999-12-31T23:59:59Z"}, "ends_at"),
        ({"trigger": "error_rate", "reason": "r", "ends_at": "9999-12-31T23:59:59Z"}, "ends_at"),
        ({"trigger": "error_rate", "reason": "r", "duration_minutes": 10**9}, "duration_minutes"),
        ({"trigger": "error_rate", "reason": "r", "starts_at": "0001-01-01T00:00:00+14:00"},
         "starts_at"),
        ({"trigger": "error_rate", "reason": "r", "starts_at": "9999-12-31T23:30:00Z"},
         "starts_at"),
        ({"trigger": "error_rate", "reason": "r", "starts_at": "9999-12-31T23:30:00Z",
          "ends_at": "9999-12-31T23:59:00Z"}, "ends_at"),
        ({"trigger": "error_rate", "reason": "r", "ends_at": "2000-01-01T00:00:00Z"}, "ends_at"),
        ({"reason": "everything"}, "match_all"),
        ({"scope": "*", "reason": "everything"}, "match_all"),
        ({"trigger": "error_rate", "scope": "a\u0000", "reason": "r"}, "scope"),
    ],
)  # fmt: skip
async def test_silences_are_bounded(
    api: httpx.AsyncClient, store: Engine, body: dict[str, Any], field: str
) -> None:
    response = await api.post("/v1/silences", json=body, headers=OPS)
    assert response.status_code == 422, response.text
    assert field in response.json()["detail"]
    assert count(store, Silence) == 0


async def test_silencing_everything_needs_the_flag_and_still_ends(
    api: httpx.AsyncClient,
) -> None:
    response = await api.post(
        "/v1/silences", json={"reason": "planned outage", "match_all": True}, headers=OPS
    )
    assert response.status_code == 201, response.text
    ends = datetime.fromisoformat(response.json()["ends_at"])
    assert ends - datetime.now(UTC) <= timedelta(hours=1)


async def test_active_silences_are_capped(
    time_skipping_env: WorkflowEnvironment, store: Engine
) -> None:
    async with client_for(time_skipping_env, store, max_active_silences=3) as api:
        body = {"trigger": "error_rate", "reason": "r"}
        codes = [(await api.post("/v1/silences", json=body, headers=OPS)).status_code]
        codes += [(await api.post("/v1/silences", json=body, headers=OPS)).status_code]
        codes += [(await api.post("/v1/silences", json=body, headers=OPS)).status_code]
        refused = await api.post("/v1/silences", json=body, headers=OPS)
        assert codes == [201, 201, 201]
        assert refused.status_code == 409
        assert "3 silences" in refused.json()["detail"]
        await api.delete("/v1/silences/1", headers=OPS)
        assert (await api.post("/v1/silences", json=body, headers=OPS)).status_code == 201


async def test_concurrent_silences_never_pass_the_cap(
    time_skipping_env: WorkflowEnvironment, store: Engine
) -> None:
    import asyncio

    async with client_for(time_skipping_env, store, max_active_silences=3) as api:
        body = {"trigger": "error_rate", "reason": "r"}
        answers = await asyncio.gather(
            *(api.post("/v1/silences", json=body, headers=OPS) for _ in range(12))
        )
    codes = sorted(answer.status_code for answer in answers)
    assert codes.count(201) == 3
    assert set(codes) <= {201, 409, 503}  # 503: SQLite's write lock was busy; retry later
    assert count(store, Silence) == 3


# --- what answers without a key -------------------------------------------------------------


async def test_informational_endpoints_are_public_only_when_configured(
    time_skipping_env: WorkflowEnvironment, store: Engine
) -> None:
    async with client_for(time_skipping_env, store, public_endpoints="metrics") as api:
        assert (await api.get("/metrics")).status_code == 200
        assert (await api.get("/openapi.json")).status_code == 401
        assert (await api.get("/openapi.json", headers=APP)).status_code == 403
        assert (await api.get("/openapi.json", headers=OPS)).status_code == 200
        assert (await api.get("/docs")).status_code == 401
    async with client_for(time_skipping_env, store, public_endpoints="docs") as api:
        assert (await api.get("/metrics")).status_code == 401
        assert (await api.get("/openapi.json")).status_code == 200
        assert (await api.get("/docs")).status_code == 200


async def test_healthz_says_what_fails_but_not_why(
    time_skipping_env: WorkflowEnvironment, tmp_path: Any
) -> None:
    from stores.engine import make_engine

    dead = make_engine("postgresql+psycopg://nobody:secret-pw@127.0.0.1:1/nowhere")
    async with client_for(time_skipping_env, dead) as api:
        response = await api.get("/healthz")
    assert response.status_code == 503
    assert response.json()["checks"]["store"] == "failing"
    for secret in ("127.0.0.1", "nobody", "nowhere", "Error", "psycopg"):
        assert secret not in response.text


async def test_the_body_is_not_read_before_the_key_is_checked(
    time_skipping_env: WorkflowEnvironment, store: Engine
) -> None:
    app = create_app(Services(settings(), store, time_skipping_env.client, slack=None))
    reads = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal reads
        reads += 1
        return {"type": "http.request", "body": b"x" * 65536, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    for path in ("/v1/llm-calls", "/v1/traces", "/v1/feedback", "/v1/silences"):
        scope = {
            "type": "http",
            "method": "POST",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "headers": [(b"authorization", b"Bearer wrong")],
            "http_version": "1.1",
            "scheme": "http",
            "server": ("test", 80),
            "client": ("test", 1),
            "root_path": "",
        }
        await app(scope, receive, send)
    statuses = [m["status"] for m in sent if m["type"] == "http.response.start"]
    assert statuses == [401, 401, 401, 401]
    assert reads == 0


# --- a store that is locked or down -----------------------------------------------------------


async def test_a_locked_store_is_a_prompt_503_with_retry_after(
    time_skipping_env: WorkflowEnvironment, store: Engine
) -> None:
    import worker

    url = store.url.render_as_string(hide_password=False)
    served = worker.api_engine(settings(database_url=url))
    holder = store.raw_connection()  # another process's long write transaction
    cursor = holder.cursor()
    if store.dialect.name == "sqlite":
        cursor.execute("BEGIN EXCLUSIVE")
    else:
        cursor.execute("LOCK TABLE llm_calls IN ACCESS EXCLUSIVE MODE")
    try:
        async with client_for(time_skipping_env, served) as api:
            started = time.monotonic()
            response = await api.post("/v1/llm-calls", json={"calls": [call()]}, headers=APP)
            took = time.monotonic() - started
    finally:
        holder.rollback()
        holder.close()
        served.dispose()

    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) > 0
    assert took < 2.5  # the lock timeout (1.5 s) and the answer, not SQLite's 30 s
    assert count(store, LLMCall) == 0


async def test_an_unreachable_store_is_a_503_not_a_500(
    time_skipping_env: WorkflowEnvironment,
) -> None:
    import worker

    dead = worker.api_engine(settings(database_url="postgresql+psycopg://x@127.0.0.1:1/none"))
    async with client_for(time_skipping_env, dead) as api:
        response = await api.post("/v1/llm-calls", json={"calls": [call()]}, headers=APP)
        silences = await api.get("/v1/silences", headers=OPS)
    assert response.status_code == 503
    assert silences.status_code == 503
    assert "127.0.0.1" not in response.text


def test_the_cli_keeps_the_same_silence_rules(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    monkeypatch.setenv("PAGERLOOP_DATABASE_URL", f"sqlite:///{tmp_path / 'stores.db'}")
    monkeypatch.setenv("PAGERLOOP_MAX_ACTIVE_SILENCES", "1")
    runner = CliRunner()

    def add(*args: str) -> Any:
        return runner.invoke(app, ["silences", "add", "--reason", "r", *args])

    assert add("--for", "31d", "--trigger", "error_rate").exit_code == 2
    assert add("--for", "99999999999d", "--trigger", "error_rate").exit_code == 2
    assert add("--for", "9999999d", "--trigger", "error_rate").exit_code == 2
    everything = add("--for", "1h")
    assert everything.exit_code == 2
    assert "--match-all" in everything.output
    assert add("--for", "1h", "--match-all").exit_code == 0
    assert add("--for", "1h", "--trigger", "error_rate").exit_code == 1  # the cap of 1


async def test_unpriced_model_names_never_become_metric_labels(
    api: httpx.AsyncClient,
) -> None:
    names = [f"made-up-model-{i}" for i in range(300)]
    batch = [call(model=name, input_tokens=10, output_tokens=1) for name in names]
    assert (await api.post("/v1/llm-calls", json={"calls": batch}, headers=APP)).status_code == 202

    exposition = (await api.get("/metrics")).text
    assert "made-up-model" not in exposition
    assert 'pagerloop_unpriced_calls_total{model="other"}' in exposition
