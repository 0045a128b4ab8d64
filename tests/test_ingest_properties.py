"""Property tests of record validation (hypothesis): whatever JSON a client sends for a call,
each value drawn from the whole range its JSON type allows (huge, negative, non-finite,
NUL, surrogates, far-off timestamps), the batch is either stored exactly or refused with a
4xx, with nothing stored; never a 5xx, never half a batch. On SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, delete
from sqlmodel import Session, select
from temporalio.testing import WorkflowEnvironment

from api.app import create_app
from api.deps import Services
from config import Settings
from stores.llm_calls import ERROR_MESSAGE_MAX, LatencyRollup, LLMCall, UsageRollup, utc

KEY = "property-key"
NOW = datetime.now(UTC)

# Any JSON number: plausible ones (so that many batches are stored and compared), at the
# bounds, past them, past 64 bits, and non-finite.
numbers = st.one_of(
    st.integers(min_value=0, max_value=599),
    st.floats(min_value=0, max_value=1e6),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, 100, 101, 2**31, 2**63, 10**9, 10**9 + 1, 86_400_000, 10_000]),
    st.floats(allow_nan=True, allow_infinity=True),
)
texts = st.one_of(
    st.text(
        alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=64
    ),
    st.text(max_size=140),
    st.text(alphabet=st.characters(codec=None), max_size=10),  # NUL and surrogates too
    st.sampled_from(["", "a\x00b", "\ud800", "x" * 129, "ü" * 128]),
)
timestamps = st.one_of(
    st.datetimes(
        min_value=datetime(1, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.timezones() | st.just(UTC),
    ).map(datetime.isoformat),
    st.integers(min_value=-3600 * 24 * 10, max_value=600).map(
        lambda s: (NOW + timedelta(seconds=s)).isoformat()
    ),
    texts,
)
metadata = st.dictionaries(
    texts, st.one_of(texts, numbers, st.booleans(), st.none(), st.lists(st.integers())), max_size=4
)
OPTIONAL: dict[str, st.SearchStrategy[Any]] = {
    "timestamp": timestamps,
    "feature": texts,
    "team": texts,
    "environment": texts,
    "session_id": texts,
    "user": texts,
    "http_status": numbers,
    "ttft_ms": numbers,
    "input_tokens": numbers,
    "output_tokens": numbers,
    "cached_input_tokens": numbers,
    "cost_usd": numbers,
    "error_type": texts,
    "error_message": st.one_of(texts, st.just("e" * 600)),
    "retry_count": numbers,
    "finish_reason": texts,
    "request_id": texts,
    "trace_id": texts,
    "metadata": metadata,
}


@st.composite
def calls(draw: st.DrawFn) -> dict[str, Any]:
    record: dict[str, Any] = {
        "model": draw(st.one_of(st.sampled_from(["gpt-4.1", "gpt-4.1-mini", "custom"]), texts)),
        "status": draw(st.sampled_from(["success", "error", "rate_limited", "bogus"])),
        "latency_ms": draw(numbers),
    }
    for name in draw(st.sets(st.sampled_from(sorted(OPTIONAL)), max_size=6)):
        record[name] = draw(OPTIONAL[name])
    return record


@pytest.fixture
async def api(
    time_skipping_env: WorkflowEnvironment, store: Engine
) -> AsyncIterator[httpx.AsyncClient]:
    config = Settings(_env_file=None, ingest_api_keys=KEY)  # type: ignore[call-arg]
    app = create_app(Services(config, store, time_skipping_env.client, slack=None))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        yield client


def _stored(engine: Engine) -> list[LLMCall]:
    with Session(engine) as session:
        return list(session.exec(select(LLMCall).order_by(LLMCall.id)))  # type: ignore[arg-type]


def _clear(engine: Engine) -> None:
    with Session(engine) as session:
        for table in (LLMCall, UsageRollup, LatencyRollup):
            session.exec(delete(table))  # type: ignore[call-overload]
        session.commit()


def _same(sent: dict[str, Any], row: LLMCall) -> None:
    assert row.model == sent["model"]
    assert row.status == sent["status"]
    assert row.latency_ms == sent["latency_ms"]
    if "timestamp" in sent:
        assert utc(row.ts) == datetime.fromisoformat(sent["timestamp"]).astimezone(UTC)
    for name in ("feature", "team", "environment", "session_id", "error_type", "finish_reason",
                 "request_id", "trace_id", "http_status", "ttft_ms", "input_tokens",
                 "output_tokens", "cached_input_tokens"):  # fmt: skip
        assert getattr(row, name) == sent.get(name), name
    assert row.retry_count == sent.get("retry_count", 0)
    if "cost_usd" in sent:
        assert row.cost_usd == sent["cost_usd"]
    if "error_message" in sent:
        assert row.error_message == sent["error_message"][:ERROR_MESSAGE_MAX]
    assert (row.user_hash is None) == ("user" not in sent)
    assert row.metadata_ == sent.get("metadata")


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(calls(), min_size=1, max_size=3))
async def test_a_batch_is_stored_exactly_or_refused_with_a_4xx(
    api: httpx.AsyncClient, store: Engine, batch: list[dict[str, Any]]
) -> None:
    _clear(store)
    body = json.dumps({"calls": batch}).encode("utf-8", "surrogatepass")
    response = await api.post(
        "/v1/llm-calls",
        content=body,
        headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"},
    )

    assert response.status_code in (202, 409, 413, 422), response.text
    event(f"HTTP {response.status_code}")
    rows = _stored(store)
    if response.status_code != 202:
        assert rows == []
        return
    assert len(rows) == len(batch)
    for sent, row in zip(batch, rows, strict=True):
        _same(sent, row)
