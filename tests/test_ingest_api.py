"""POST /v1/llm-calls through the real FastAPI app."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone

import httpx
import pytest
from sqlalchemy import Engine
from sqlmodel import Session, select
from temporalio.testing import WorkflowEnvironment

from config import Settings
from stores.llm_calls import LLMCall
from stores.quality import QualityScore
from tests.helpers import api_client

KEY = "ingest-key-1"


def make_client(env: WorkflowEnvironment, engine: Engine, **settings: object) -> httpx.AsyncClient:
    config = Settings(_env_file=None, user_hash_salt="pepper", **settings)  # type: ignore[call-arg]
    return api_client(config, engine, env.client)


@pytest.fixture
async def api(
    time_skipping_env: WorkflowEnvironment, engine: Engine
) -> AsyncIterator[httpx.AsyncClient]:
    async with make_client(time_skipping_env, engine, ingest_api_keys=KEY) as client:
        yield client


def rows(engine: Engine) -> list[LLMCall]:
    with Session(engine) as session:
        return list(session.exec(select(LLMCall).order_by(LLMCall.id)))


AUTH = {"Authorization": f"Bearer {KEY}"}


async def test_accepts_a_batch_hashes_users_and_prices_calls(
    api: httpx.AsyncClient, engine: Engine
) -> None:
    an_hour_ago = datetime.now(timezone(timedelta(hours=1))) - timedelta(hours=1)
    body = {
        "calls": [
            {
                "model": "gpt-4.1-2025-04-14",
                "status": "success",
                "latency_ms": 847.3,
                "timestamp": an_hour_ago.isoformat(),
                "feature": "chat",
                "user": "customer_42",
                "input_tokens": 1_000_000,
                "output_tokens": 1_000_000,
                "metadata": {"prompt_version": "v7"},
            },
            {"model": "my-finetune", "status": "rate_limited", "latency_ms": 10, "input_tokens": 5},
            {"model": "gpt-4.1", "status": "error", "latency_ms": 10, "cost_usd": 0.5},
        ]
    }
    response = await api.post("/v1/llm-calls", json=body, headers=AUTH)
    assert response.status_code == 202, response.text
    assert response.json() == {"accepted": 3, "duplicates": 0}

    first, unknown, explicit = rows(engine)
    assert first.user_hash is not None
    assert first.user_hash.startswith("user_")
    assert "customer_42" not in first.user_hash
    assert first.cost_usd == pytest.approx(2.00 + 8.00)  # dated snapshot priced as gpt-4.1
    assert first.ts.hour == an_hour_ago.astimezone(UTC).hour  # stored as UTC
    assert first.metadata_ == {"prompt_version": "v7"}
    assert unknown.cost_usd is None  # an unknown model is never priced as gpt-4.1
    assert explicit.cost_usd == 0.5


async def test_the_same_user_gets_the_same_pseudonym(
    api: httpx.AsyncClient, engine: Engine
) -> None:
    call = {"model": "gpt-4.1", "status": "success", "latency_ms": 1, "user": "u42"}
    other = {**call, "user": "u43"}
    await api.post("/v1/llm-calls", json={"calls": [call, call, other]}, headers=AUTH)
    hashes = [row.user_hash for row in rows(engine)]
    assert hashes[0] == hashes[1] != hashes[2]


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}],
)
async def test_requires_a_valid_bearer_key(
    api: httpx.AsyncClient, engine: Engine, headers: dict[str, str]
) -> None:
    call = {"model": "gpt-4.1", "status": "success", "latency_ms": 1}
    response = await api.post("/v1/llm-calls", json={"calls": [call]}, headers=headers)
    assert response.status_code == 401
    assert rows(engine) == []


async def test_without_keys_ingest_is_open_only_in_dev_mode(
    time_skipping_env: WorkflowEnvironment, engine: Engine
) -> None:
    body = {"calls": [{"model": "gpt-4.1", "status": "success", "latency_ms": 1}]}
    async with make_client(time_skipping_env, engine, dev_mode=False) as closed:
        refused = await closed.post("/v1/llm-calls", json=body)
    async with make_client(time_skipping_env, engine, dev_mode=True) as dev:
        accepted = await dev.post("/v1/llm-calls", json=body)
    assert refused.status_code == 401
    assert "PAGERLOOP_INGEST_API_KEYS" in refused.text
    assert accepted.status_code == 202


async def test_a_bad_record_names_field_and_index_and_writes_nothing(
    api: httpx.AsyncClient, engine: Engine
) -> None:
    good = {"model": "gpt-4.1", "status": "success", "latency_ms": 1}
    bad = {"model": "gpt-4.1", "status": "exploded", "latency_ms": 1}
    response = await api.post("/v1/llm-calls", json={"calls": [good, good, bad]}, headers=AUTH)
    assert response.status_code == 422
    assert "calls[2].status" in response.json()["detail"]
    assert rows(engine) == []


@pytest.mark.parametrize(
    ("record", "field"),
    [
        ({"status": "success", "latency_ms": 1}, "calls[0].model"),
        ({"model": "m", "status": "success", "latency_ms": -5}, "calls[0].latency_ms"),
        (
            {"model": "m", "status": "success", "latency_ms": 1, "timestamp": "2026-11-26T12:00"},
            "calls[0].timestamp",
        ),
        ({"model": "m", "status": "success", "latency_ms": 1, "colour": "red"}, "calls[0].colour"),
    ],
)
async def test_validation_messages_name_the_field(
    api: httpx.AsyncClient, record: dict[str, object], field: str
) -> None:
    response = await api.post("/v1/llm-calls", json={"calls": [record]}, headers=AUTH)
    assert response.status_code == 422
    assert field in response.json()["detail"]


async def test_oversized_bodies_get_413(
    time_skipping_env: WorkflowEnvironment, engine: Engine
) -> None:
    call = {"model": "gpt-4.1", "status": "success", "latency_ms": 1, "error_message": "x" * 500}
    body = json.dumps({"calls": [call] * 10}).encode()

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 256):
            yield body[start : start + 256]

    async with make_client(
        time_skipping_env, engine, ingest_api_keys=KEY, ingest_max_body_bytes=2000
    ) as client:
        declared = await client.post("/v1/llm-calls", content=body, headers=AUTH)
        streamed = await client.post("/v1/llm-calls", content=chunks(), headers=AUTH)
    assert declared.status_code == 413
    assert streamed.status_code == 413
    assert rows(engine) == []


async def test_a_recorded_call_id_is_accepted_as_a_duplicate_and_not_written_again(
    api: httpx.AsyncClient, engine: Engine
) -> None:
    call = {"model": "gpt-4.1", "status": "success", "latency_ms": 1, "call_id": "0123456789abcdef"}
    first = await api.post("/v1/llm-calls", json={"calls": [call]}, headers=AUTH)
    assert (first.status_code, first.json()) == (202, {"accepted": 1, "duplicates": 0})
    other = {**call, "call_id": "fedcba9876543210"}
    again = await api.post("/v1/llm-calls", json={"calls": [other, call]}, headers=AUTH)
    assert (again.status_code, again.json()) == (202, {"accepted": 2, "duplicates": 1})
    assert [row.call_id for row in rows(engine)] == ["0123456789abcdef", "fedcba9876543210"]


async def test_feedback_and_eval_scores_attach_to_recorded_calls(
    api: httpx.AsyncClient, engine: Engine
) -> None:
    calls = [
        {"model": "gpt-4.1", "status": "success", "latency_ms": 1, "call_id": "aaaaaaaaaaaaaaaa",
         "feature": "chat"},
        {"model": "gpt-4.1-mini", "status": "success", "latency_ms": 1, "request_id": "req_42"},
    ]  # fmt: skip
    await api.post("/v1/llm-calls", json={"calls": calls}, headers=AUTH)

    thumbs = {"call_id": "aaaaaaaaaaaaaaaa", "thumbs": "down", "comment": "made up a number"}
    response = await api.post("/v1/feedback", json=thumbs, headers=AUTH)
    assert response.status_code == 202, response.text
    evals = [
        {"call_id": "req_42", "score": 0.92, "source": "eval", "evaluator": "faithfulness-v3"},
        {"call_id": "aaaaaaaaaaaaaaaa", "score": 0.4, "source": "eval", "evaluator": "judge"},
    ]
    assert (await api.post("/v1/feedback", json=evals, headers=AUTH)).json() == {"accepted": 2}

    with Session(engine) as session:
        scores = session.exec(select(QualityScore).order_by(QualityScore.id)).all()
    assert [(s.call_id, s.source, s.score, s.label) for s in scores] == [
        ("aaaaaaaaaaaaaaaa", "feedback", 0.0, "down"),
        (rows(engine)[1].call_id, "eval", 0.92, None),
        ("aaaaaaaaaaaaaaaa", "eval", 0.4, None),
    ]
    assert (scores[0].model, scores[0].feature) == ("gpt-4.1", "chat")
    assert scores[1].model == "gpt-4.1-mini"


@pytest.mark.parametrize(
    ("body", "status", "expected"),
    [
        ({"call_id": "nope", "score": 0.5}, 404, "nope"),
        ({"call_id": "aaaaaaaaaaaaaaaa", "score": 1.5}, 422, "score"),
        ({"call_id": "aaaaaaaaaaaaaaaa"}, 422, "exactly one of"),
        ({"call_id": "aaaaaaaaaaaaaaaa", "score": 1, "thumbs": "up"}, 422, "exactly one of"),
    ],
)
async def test_bad_feedback_is_refused_with_a_reason(
    api: httpx.AsyncClient, engine: Engine, body: dict[str, object], status: int, expected: str
) -> None:
    call = {"model": "gpt-4.1", "status": "success", "latency_ms": 1, "call_id": "aaaaaaaaaaaaaaaa"}
    await api.post("/v1/llm-calls", json={"calls": [call]}, headers=AUTH)
    response = await api.post("/v1/feedback", json=body, headers=AUTH)
    assert response.status_code == status
    assert expected in response.json()["detail"]
    with Session(engine) as session:
        assert session.exec(select(QualityScore)).all() == []
