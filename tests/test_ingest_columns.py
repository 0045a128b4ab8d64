"""The columnar body of `POST /v1/llm-calls` (api/columns.py), the form the SDK sends: the same
calls sent as rows and as columns are accepted or refused alike and store the same rows, rollups
and quality verdicts; a refusal names the column and the index and stores nothing; the SDK's
HttpSink sends only this form, and what it sends lands. On SQLite and PostgreSQL."""

from __future__ import annotations

import gzip
import json
import re
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from fastapi.exceptions import RequestValidationError
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from pagerloop_sdk import Recorder
from pagerloop_sdk.capture import PendingCall
from pagerloop_sdk.context import LLMContext
from pagerloop_sdk.http_sink import COLUMNS_TYPE, HttpSink, encode
from pagerloop_sdk.privacy import hash_user_id
from pagerloop_sdk.quality import score as heuristic_score
from pagerloop_sdk.records import CallRecord, ScoreRecord
from sqlalchemy import Engine, delete
from sqlmodel import Session, select
from temporalio.testing import WorkflowEnvironment

from api.bounds import MAX_CLOCK_SKEW, MAX_RECORD_AGE
from api.errors import MAX_ERRORS_SHOWN
from api.ingest_types import CallIn
from config import Settings
from stores.llm_calls import (
    ERROR_MESSAGE_MAX,
    LatencyRollup,
    LLMCall,
    UsageRollup,
    new_call_id,
    utc,
)
from stores.quality import QualityRollup, QualityScore
from tests.conftest import INGEST_KEY
from tests.fakes.server import ThreadedServer
from tests.helpers import api_client
from tests.test_ingest_properties import OPTIONAL, calls, numbers, texts

PATH = "/v1/llm-calls"
KEY = "columns-key"
SALT = "columns-salt"
AUTH = {"Authorization": f"Bearer {KEY}"}
FIELDS = tuple(CallIn.model_fields)
REQUIRED = ("model", "status", "latency_ms")
OPTIONAL_FIELDS = tuple(name for name in FIELDS if name not in REQUIRED)
HEX = re.compile(r"^[0-9a-f]{32}$")

# --- the API over the test's stores ----------------------------------------------------------


def _client(env: WorkflowEnvironment, engine: Engine) -> httpx.AsyncClient:
    config = Settings(_env_file=None, ingest_api_keys=KEY, user_hash_salt=SALT)
    return api_client(config, engine, env.client)


@pytest.fixture
async def api(
    time_skipping_env: WorkflowEnvironment, store: Engine
) -> AsyncIterator[httpx.AsyncClient]:
    """The API over `store`: SQLite and PostgreSQL."""
    async with _client(time_skipping_env, store) as client:
        yield client


@pytest.fixture
async def sqlite_api(
    time_skipping_env: WorkflowEnvironment, engine: Engine
) -> AsyncIterator[httpx.AsyncClient]:
    """The API over SQLite alone: for refusals, decided before anything reaches a store."""
    async with _client(time_skipping_env, engine) as client:
        yield client


def _dumps(body: Any) -> bytes:
    return json.dumps(body).encode("utf-8", "surrogatepass")


async def post_rows(api: httpx.AsyncClient, batch: Sequence[dict[str, Any]]) -> httpx.Response:
    headers = {**AUTH, "Content-Type": "application/json"}
    return await api.post(PATH, content=_dumps({"calls": list(batch)}), headers=headers)


async def post_columns(
    api: httpx.AsyncClient, columns: dict[str, Any], *, gzipped: bool = False
) -> httpx.Response:
    return await post_body(api, {"columns": columns}, gzipped=gzipped)


async def post_body(api: httpx.AsyncClient, body: Any, *, gzipped: bool = False) -> httpx.Response:
    raw = _dumps(body)
    headers = {**AUTH, "Content-Type": COLUMNS_TYPE}
    if gzipped:
        raw = gzip.compress(raw)
        headers["Content-Encoding"] = "gzip"
    return await api.post(PATH, content=raw, headers=headers)


def as_columns(batch: Sequence[dict[str, Any]], also: Sequence[str] = ()) -> dict[str, list[Any]]:
    """The batch in columns: a column per field some call has (and per name in `also`), null
    where a call leaves the field out."""
    names = [name for name in FIELDS if name in also or any(name in call for call in batch)]
    return {name: [call.get(name) for call in batch] for name in names}


# --- what the stores hold ----------------------------------------------------------------------


def stored_calls(engine: Engine) -> list[LLMCall]:
    with Session(engine) as session:
        return list(session.exec(select(LLMCall).order_by(LLMCall.id)))  # type: ignore[arg-type]


def stored_scores(engine: Engine) -> list[QualityScore]:
    with Session(engine) as session:
        return list(session.exec(select(QualityScore).order_by(QualityScore.id)))  # type: ignore[arg-type]


def clear(engine: Engine) -> None:
    with Session(engine) as session:
        for table in (LLMCall, UsageRollup, LatencyRollup, QualityScore, QualityRollup):
            session.exec(delete(table))
        session.commit()


def nothing_stored(engine: Engine) -> bool:
    with Session(engine) as session:
        return not any(
            session.exec(select(table)).first()
            for table in (LLMCall, UsageRollup, LatencyRollup, QualityScore)
        )


def _sums(engine: Engine, table: Any, keys: Sequence[str], by_minute: bool) -> dict[Any, Any]:
    """The rollup's sums per key, `(minute?, *keys, sum name)`; minutes merged unless
    `by_minute` (a call without a timestamp lands in the minute it arrived in)."""
    sums: dict[tuple[Any, ...], Any] = {}
    names = [n for n in table.model_fields if n != "minute" and n not in keys]
    with Session(engine) as session:
        for row in session.exec(select(table)):
            minute = utc(row.minute) if by_minute else None
            for name in names:
                key = (minute, *(getattr(row, k) for k in keys), name)
                sums[key] = sums.get(key, 0) + getattr(row, name)
    return sums


DIMENSIONS = ("model", "feature", "team", "environment")


def snapshot(engine: Engine, batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What the batch left in the stores, without what differs between two sendings of it: row
    ids, the call_ids the API made up and the arrival time of calls without a timestamp."""
    rows = stored_calls(engine)
    assert len(rows) == len(batch)
    index_of = {row.call_id: index for index, row in enumerate(rows)}
    calls_ = []
    for sent, row in zip(batch, rows, strict=True):
        data = row.model_dump(exclude={"id"})
        data["ts"] = utc(row.ts) if sent.get("timestamp") is not None else None
        if sent.get("call_id") is None:
            assert HEX.match(row.call_id), row.call_id
            data["call_id"] = None
        calls_.append(data)
    scores = []
    for score in stored_scores(engine):
        data = score.model_dump(exclude={"id"})
        data["call_id"] = index_of[score.call_id]
        if batch[data["call_id"]].get("timestamp") is None:
            data["ts"] = None
        else:
            data["ts"] = utc(score.ts)
        scores.append(data)
    by_minute = all(call.get("timestamp") is not None for call in batch)
    return {
        "calls": calls_,
        "scores": sorted(scores, key=lambda s: (s["call_id"], s["score"])),
        "usage": _sums(engine, UsageRollup, DIMENSIONS, by_minute),
        "latency": _sums(engine, LatencyRollup, (*DIMENSIONS, "bucket"), by_minute),
    }


def assert_same_stores(columns: dict[str, Any], rows: dict[str, Any]) -> None:
    assert columns["calls"] == rows["calls"]
    assert columns["scores"] == rows["scores"]
    assert columns["latency"] == rows["latency"]  # counts: exact, whatever the minutes
    # Sums of floats: merged over minutes in whatever order the minutes fell.
    assert columns["usage"] == pytest.approx(rows["usage"], rel=1e-12, abs=1e-12)


# --- 1. the same calls, as rows and as columns -------------------------------------------------


def varied_calls(now: datetime) -> list[dict[str, Any]]:
    """Every field on some call and absent on others; explicit and missing call_ids, quality
    verdicts, users, a cache hit, calls with and without a timestamp."""
    return [
        {
            "model": "gpt-4.1",
            "status": "success",
            "latency_ms": 847.25,
            "timestamp": (now - timedelta(minutes=30)).isoformat(),
            "call_id": "0123456789abcdef0123456789abcdef",
            "operation": "responses",
            "response_model": "gpt-4.1-2025-04-14",
            "feature": "summary",
            "team": "finance",
            "environment": "prod",
            "session_id": "session-1",
            "user": "customer_42",
            "http_status": 200,
            "ttft_ms": 120.5,
            "input_tokens": 1_000,
            "output_tokens": 250,
            "cached_input_tokens": 100,
            "finish_reason": "stop",
            "request_id": "req_1",
            "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
            "metadata": {"prompt_version": "v7", "attempt": 2, "cached": False, "note": None},
            "controls": "reroute#3",
            "source": "sdk",
            "quality": {
                "score": 0.8,
                "format_compliance": 1.0,
                "hallucination_risk": 0.125,
                "relevance": 0.75,
            },
        },
        {"model": "gpt-4.1-mini", "status": "success", "latency_ms": 12},
        {
            "model": "gpt-4.1",
            "status": "success",
            "latency_ms": 0.5,
            "timestamp": (now - timedelta(minutes=29)).isoformat(),
            "call_id": "fedcba98765432100123",
            "user": "customer_42",
            "controls": "cache#1",
            "source": "cache",
            "feature": "summary",
        },
        {
            "model": "gpt-4.1",
            "status": "error",
            "latency_ms": 3_000,
            "http_status": 500,
            "error_type": "InternalServerError",
            "error_message": "e" * (ERROR_MESSAGE_MAX + 100),
            "retry_count": 3,
            "cost_usd": 0.25,
            "user": "customer_43",
            "metadata": {},
            "quality": {"score": 0.25},
            "team": "finance",
        },
        {
            "model": "my-finetune",
            "status": "rate_limited",
            "latency_ms": 40,
            "input_tokens": 5,
            "feature": "search",
            "operation": "chat",
            "retry_count": 0,
        },
        {
            "model": "text-embedding-3-small",
            "status": "timeout",
            "latency_ms": 60_000,
            "timestamp": (now - timedelta(hours=2)).isoformat(),
            "operation": "embeddings",
            "input_tokens": 100,
            "environment": "staging",
            "call_id": "aaaaaaaabbbbbbbb",
        },
    ]


@pytest.mark.parametrize("gzipped", [False, True], ids=["plain", "gzip"])
async def test_the_same_calls_as_rows_and_as_columns_store_the_same(
    api: httpx.AsyncClient, store: Engine, gzipped: bool
) -> None:
    batch = varied_calls(datetime.now(UTC))

    before = datetime.now(UTC)
    by_rows = await post_rows(api, batch)
    assert by_rows.status_code == 202, by_rows.text
    from_rows = snapshot(store, batch)
    clear(store)
    by_columns = await post_columns(api, as_columns(batch), gzipped=gzipped)
    after = datetime.now(UTC)
    assert by_columns.status_code == 202, by_columns.text
    assert by_columns.json() == by_rows.json() == {"accepted": 6, "duplicates": 0}
    from_columns = snapshot(store, batch)

    assert_same_stores(from_columns, from_rows)

    # What both stored, checked against the calls themselves (not only against each other).
    rows = stored_calls(store)
    assert [rows[0].call_id, rows[2].call_id, rows[5].call_id] == [
        "0123456789abcdef0123456789abcdef",
        "fedcba98765432100123",
        "aaaaaaaabbbbbbbb",
    ]
    made_up = [rows[1].call_id, rows[3].call_id, rows[4].call_id]
    assert all(HEX.match(call_id) for call_id in made_up)
    assert len(set(made_up)) == 3
    for index in (1, 3, 4):  # no timestamp: the time the batch arrived
        assert before - timedelta(seconds=1) <= utc(rows[index].ts) <= after
    full, minimal, cached, failed, unpriced, embedding = rows
    assert full.operation == "responses"
    assert full.metadata_ == {"prompt_version": "v7", "attempt": 2, "cached": False, "note": None}
    assert full.cost_usd is not None
    assert full.cost_usd > 0  # priced by the API
    assert full.user_hash == cached.user_hash != failed.user_hash
    assert full.user_hash is not None
    assert (minimal.operation, minimal.retry_count, minimal.source) == ("chat", 0, "ingest")
    assert [minimal.user_hash, minimal.metadata_, minimal.feature, minimal.cost_usd] == [None] * 4
    assert cached.source == "cache"
    assert failed.error_message == "e" * ERROR_MESSAGE_MAX
    assert (failed.retry_count, failed.cost_usd, failed.metadata_) == (3, 0.25, {})
    assert unpriced.cost_usd is None
    assert embedding.operation == "embeddings"
    assert utc(embedding.ts) == datetime.fromisoformat(batch[5]["timestamp"])
    # The cache hit stays out of the rollups; the five others are counted.
    usage_calls = [v for k, v in from_columns["usage"].items() if k[-1] == "calls"]
    assert sum(usage_calls) == 5
    assert sum(from_columns["latency"].values()) == 5
    scores = stored_scores(store)
    assert sorted((s.call_id, s.score) for s in scores) == sorted(
        [(full.call_id, 0.8), (failed.call_id, 0.25)]
    )


async def test_a_column_left_out_is_the_field_left_out_of_every_call(
    api: httpx.AsyncClient, store: Engine
) -> None:
    """`{"feature": [null, null]}`, no feature column at all, and no feature in the rows: the
    same; a null in a column with a default (operation, retry_count, source) is the default."""
    batch = [
        {"model": "gpt-4.1", "status": "success", "latency_ms": 1},
        {"model": "gpt-4.1", "status": "error", "latency_ms": 2},
    ]
    answers = []
    stores = []
    for columns in (
        as_columns(batch),
        as_columns(batch, also=OPTIONAL_FIELDS),  # every optional column, all null
    ):
        answers.append(await post_columns(api, columns))
        stores.append(snapshot(store, batch))
        clear(store)
    answers.append(await post_rows(api, batch))
    stores.append(snapshot(store, batch))
    assert [answer.status_code for answer in answers] == [202, 202, 202]
    assert stores[0] == stores[1] == stores[2]
    row = stores[0]["calls"][0]
    assert (row["operation"], row["retry_count"], row["source"]) == ("chat", 0, "ingest")
    assert row["feature"] is row["metadata_"] is row["controls"] is None


# --- 2. any calls: the two forms answer alike ----------------------------------------------------

CALL_IDS = ("0123456789abcdef", "deadbeefdeadbeef", "00000000000000000000000000000001")
# The fields test_ingest_properties.py leaves out, drawn the same way: plausible or hostile.
EXTRA: dict[str, st.SearchStrategy[Any]] = {
    "call_id": st.one_of(
        st.sampled_from(CALL_IDS),  # few: a batch repeats one now and then
        st.text(alphabet="0123456789abcdefABX-", max_size=40),
        texts,
        numbers,
    ),
    "operation": st.one_of(st.sampled_from(["chat", "responses", "embeddings"]), texts),
    "source": st.one_of(st.sampled_from(["ingest", "sdk", "cache"]), texts),
    "response_model": st.one_of(st.sampled_from(["gpt-4.1-mini", "gpt-4.1-2025-04-14"]), texts),
    "controls": st.one_of(st.sampled_from(["reroute#3", "cache#1,fallback#2"]), texts),
    "quality": st.one_of(
        st.fixed_dictionaries(
            {"score": numbers},
            optional={"format_compliance": numbers, "relevance": numbers, "mood": texts},
        ),
        st.fixed_dictionaries({"score": st.floats(0, 1)}),
        texts,
        numbers,
    ),
}
assert not set(EXTRA) & set(OPTIONAL)
assert set(EXTRA) | set(OPTIONAL) == set(OPTIONAL_FIELDS)


@st.composite
def any_call(draw: st.DrawFn) -> dict[str, Any]:
    call = draw(calls())
    for name in draw(st.sets(st.sampled_from(sorted(EXTRA)), max_size=3)):
        call[name] = draw(EXTRA[name])
    return call


# Values within the bounds, so that many batches are stored and their rows compared.
words = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=64
)
fractions = st.one_of(st.floats(min_value=0, max_value=1), st.sampled_from([0, 1]))
PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "timestamp": st.builds(
        lambda back, hours: (
            datetime.now(timezone(timedelta(hours=hours))) - timedelta(seconds=back)
        ).isoformat(),
        st.integers(min_value=0, max_value=6 * 86_400),
        st.integers(min_value=-12, max_value=14),
    ),
    "call_id": st.one_of(
        st.sampled_from(CALL_IDS), st.text(alphabet="0123456789abcdef", min_size=8, max_size=32)
    ),
    "operation": st.sampled_from(["chat", "responses", "embeddings"]),
    "response_model": st.one_of(st.sampled_from(["gpt-4.1-2025-04-14", "gpt-4.1-mini"]), words),
    "feature": words,
    "team": st.sampled_from(["finance", "search"]),
    "environment": words,
    "session_id": words,
    "user": st.one_of(st.sampled_from(["customer_1", "customer_2"]), words),
    "http_status": st.integers(min_value=100, max_value=599),
    "ttft_ms": st.floats(min_value=0, max_value=1e5),
    "input_tokens": st.integers(min_value=0, max_value=10**6),
    "output_tokens": st.integers(min_value=0, max_value=10**6),
    "cached_input_tokens": st.integers(min_value=0, max_value=10**6),
    "cost_usd": st.one_of(st.floats(min_value=0, max_value=100), st.integers(0, 100)),
    "error_type": words,
    "error_message": st.text(
        alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=700
    ),
    "retry_count": st.integers(min_value=0, max_value=100),
    "finish_reason": words,
    "request_id": words,
    "trace_id": words,
    "metadata": st.dictionaries(
        words, st.one_of(words, st.integers(-(2**63) + 1, 2**63 - 1), st.booleans(), st.none())
    ),
    "controls": st.sampled_from(["reroute#3", "cache#1", "fallback#2,cap#4"]),
    "source": st.sampled_from(["ingest", "sdk", "cache"]),
    "quality": st.fixed_dictionaries(
        {"score": fractions},
        optional={n: fractions for n in ("format_compliance", "hallucination_risk", "relevance")},
    ),
}
assert set(PLAUSIBLE) == set(OPTIONAL_FIELDS)


@st.composite
def plausible_call(draw: st.DrawFn) -> dict[str, Any]:
    call: dict[str, Any] = {
        "model": draw(st.one_of(st.sampled_from(["gpt-4.1", "gpt-4.1-mini", "custom"]), words)),
        "status": draw(st.sampled_from(["success", "error", "timeout", "rate_limited"])),
        "latency_ms": draw(st.one_of(st.floats(0, 1e6), st.integers(0, 86_400_000))),
    }
    for name in draw(st.sets(st.sampled_from(sorted(PLAUSIBLE)))):
        call[name] = draw(PLAUSIBLE[name])
    return call


batches = st.one_of(
    st.lists(plausible_call(), min_size=1, max_size=5),  # mostly stored
    st.lists(any_call(), min_size=1, max_size=5),  # mostly refused
    st.lists(st.one_of(plausible_call(), any_call()), min_size=1, max_size=5),
)


def _near_a_bound_of_time(batch: Sequence[dict[str, Any]]) -> bool:
    """A timestamp a minute from the oldest or newest accepted: the two requests, moments
    apart, may rightly disagree on it."""
    now = datetime.now(UTC)
    for call in batch:
        value = call.get("timestamp")
        if not isinstance(value, str):
            continue
        try:
            at = datetime.fromisoformat(value)
            if at.tzinfo is None:
                continue
            at = at.astimezone(UTC)
        except (ValueError, OverflowError):
            continue
        bounds = (now - MAX_RECORD_AGE, now + MAX_CLOCK_SKEW)
        if any(abs(at - bound) < timedelta(minutes=1) for bound in bounds):
            return True
    return False


ROW_FIELD = re.compile(r"^calls\[(\d+)\]\.([a-z_]+)(.*)$", re.DOTALL)


def as_column_error(error: dict[str, Any]) -> tuple[str, str]:
    """A row form error (`calls[2].quality.score`) as the columnar form names it
    (`columns.quality[2].score`); an error about the body as a whole, as it is."""
    found = ROW_FIELD.match(error["field"])
    if found is None:
        return ("", error["type"])
    index, name, rest = found.groups()
    return (f"columns.{name}[{index}]{rest}", error["type"])


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=batches, data=st.data())
async def test_columns_are_accepted_or_refused_as_their_rows_are(
    api: httpx.AsyncClient, store: Engine, batch: list[dict[str, Any]], data: st.DataObject
) -> None:
    assume(not _near_a_bound_of_time(batch))
    clear(store)
    by_rows = await post_rows(api, batch)
    assert by_rows.status_code in (202, 409, 413, 422), by_rows.text
    from_rows = snapshot(store, batch) if by_rows.status_code == 202 else None
    clear(store)

    unused = [name for name in OPTIONAL_FIELDS if not any(name in call for call in batch)]
    nulls = data.draw(st.lists(st.sampled_from(unused), unique=True)) if unused else []
    gzipped = data.draw(st.booleans())
    by_columns = await post_columns(api, as_columns(batch, also=nulls), gzipped=gzipped)
    event(f"HTTP {by_rows.status_code}")

    assert by_columns.status_code == by_rows.status_code, (by_rows.text, by_columns.text)
    if by_rows.status_code != 202:
        assert nothing_stored(store)
        if by_rows.status_code == 422:
            # Every error of the rows' first bad call, at the same place in its column.
            from_columns = {(e["field"], e["type"]) for e in by_columns.json()["errors"]}
            if len(from_columns) < MAX_ERRORS_SHOWN:
                for error in by_rows.json()["errors"]:
                    field, kind = as_column_error(error)
                    if field:
                        assert (field, kind) in from_columns, (by_rows.text, by_columns.text)
                    else:
                        assert kind in {k for _, k in from_columns}, (by_rows.text, by_columns.text)
        return
    assert from_rows is not None
    assert_same_stores(snapshot(store, batch), from_rows)


# --- 3. refusals name the column and the index, and store nothing ---------------------------------


def five(**columns: Any) -> dict[str, Any]:
    """Five good calls in columns, with `columns` instead of theirs (None: left out)."""
    base: dict[str, Any] = {
        "model": ["gpt-4.1"] * 5,
        "status": ["success"] * 5,
        "latency_ms": [10.0, 20.0, 30.0, 40.0, 50.0],
    }
    base.update(columns)
    return {name: values for name, values in base.items() if values is not None}


BAD_AT_3 = [
    ("latency_ms", [1, 2, 3, -1, 5]),
    ("latency_ms", [1, 2, 3, "slow", 5]),
    ("model", ["a", "b", "c", None, "e"]),  # required: null is no model
    ("model", ["a", "b", "c", "x" * 129, "e"]),
    ("status", ["success", "error", "timeout", "exploded", "rate_limited"]),
    ("http_status", [200, None, 200, 99, None]),
    ("input_tokens", [1, None, 2, 2**63, 3]),
    ("retry_count", [0, 1, None, 101, 0]),
    ("cost_usd", [0.1, None, None, -0.5, None]),
    ("feature", ["a", "b", None, "a\x00b", None]),
    ("user", [None, None, None, "", None]),
    ("operation", ["chat", None, "responses", "completion", None]),
    ("source", [None, None, None, "otlp", None]),
    ("call_id", [None, None, None, "NOT-HEX!", None]),
    ("timestamp", [None, None, None, (datetime.now(UTC) - timedelta(days=30)).isoformat(), None]),
    ("timestamp", [None, None, None, "2026-01-01T00:00:00", None]),  # no zone
]


@pytest.mark.parametrize(
    ("name", "values"), BAD_AT_3, ids=[f"{name}-{i}" for i, (name, _) in enumerate(BAD_AT_3)]
)
async def test_a_bad_value_is_refused_by_column_and_index(
    sqlite_api: httpx.AsyncClient, engine: Engine, name: str, values: list[Any]
) -> None:
    for gzipped in (False, True):
        answer = await post_columns(sqlite_api, five(**{name: values}), gzipped=gzipped)
        assert answer.status_code == 422, answer.text
        fields = [error["field"] for error in answer.json()["errors"]]
        assert fields == [f"columns.{name}[3]"], answer.text
        assert nothing_stored(engine)
    # The row form refuses the same call for the same field.
    columns = five(**{name: values})
    calls_ = [{k: v[i] for k, v in columns.items() if v[i] is not None} for i in range(5)]
    by_rows = await post_rows(sqlite_api, calls_)
    assert by_rows.status_code == 422
    assert [e["field"] for e in by_rows.json()["errors"]] == [f"calls[3].{name}"]


@pytest.mark.parametrize(
    ("name", "value", "field"),
    [
        ("metadata", {"k": "v" * 600}, "columns.metadata[3].k"),
        ("metadata", {"": 1}, "columns.metadata[3]..[key]"),  # the key ""
        ("quality", {"score": 2}, "columns.quality[3].score"),
        ("quality", {"score": 0.5, "mood": "good"}, "columns.quality[3].mood"),
        ("quality", {"relevance": 0.5}, "columns.quality[3].score"),
    ],
)
async def test_an_error_inside_a_value_names_the_index_and_the_part(
    sqlite_api: httpx.AsyncClient, engine: Engine, name: str, value: Any, field: str
) -> None:
    answer = await post_columns(sqlite_api, five(**{name: [None, None, None, value, None]}))
    assert answer.status_code == 422, answer.text
    assert [error["field"] for error in answer.json()["errors"]] == [field]
    assert nothing_stored(engine)


def test_the_loc_of_a_refusal_is_body_columns_field_index() -> None:
    """The loc behind the `field` the API answers with, as pydantic gives it."""
    from api.ingest import COLUMNS

    with pytest.raises(RequestValidationError) as refused:
        COLUMNS.validate(_dumps({"columns": five(latency_ms=[1, 2, 3, -1, 5])}))
    errors = refused.value.errors()
    assert [error["loc"] for error in errors] == [("body", "columns", "latency_ms", 3)]


async def test_each_column_names_its_first_bad_value(
    sqlite_api: httpx.AsyncClient, engine: Engine
) -> None:
    # A column stops at its first bad value, as a batch of rows stops at its first bad call.
    columns = five(latency_ms=[-1, 2, 3, 4, -5], http_status=[None, 42, None, None, None])
    answer = await post_columns(sqlite_api, columns)
    assert answer.status_code == 422
    assert {e["field"] for e in answer.json()["errors"]} == {
        "columns.latency_ms[0]",
        "columns.http_status[1]",
    }
    assert nothing_stored(engine)


@pytest.mark.parametrize(
    ("columns", "named"),
    [
        (five(feature=["a", "b", "c", "d"]), "'feature'"),
        (five(latency_ms=[1, 2, 3, 4, 5, 6]), "'latency_ms'"),
        (five(metadata=[{}]), "'metadata'"),
        (five(quality=[{"score": 1}] * 7), "'quality'"),
    ],
    ids=["short-optional", "long-required", "one-value", "long-optional"],
)
async def test_columns_of_different_lengths_are_refused_naming_the_column(
    sqlite_api: httpx.AsyncClient, engine: Engine, columns: dict[str, Any], named: str
) -> None:
    answer = await post_columns(sqlite_api, columns)
    assert answer.status_code == 422, answer.text
    errors = answer.json()["errors"]
    assert len(errors) == 1
    assert named in errors[0]["msg"]
    assert nothing_stored(engine)


@pytest.mark.parametrize("name", REQUIRED)
async def test_a_required_column_left_out_is_refused(
    sqlite_api: httpx.AsyncClient, engine: Engine, name: str
) -> None:
    answer = await post_columns(sqlite_api, five(**{name: None}))
    assert answer.status_code == 422, answer.text
    assert [(e["field"], e["type"]) for e in answer.json()["errors"]] == [
        (f"columns.{name}", "missing")
    ]
    assert nothing_stored(engine)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"columns": five(prompt=["hi"] * 5)}, "columns.prompt"),
        ({"columns": five(user_hash=["user_x"] * 5)}, "columns.user_hash"),  # stored name only
        ({"columns": five(), "calls": []}, "calls"),
        ({"calls": [{"model": "m", "status": "success", "latency_ms": 1}]}, "columns"),
        ({"columns": [five()]}, "columns"),
        ({"columns": five(model=[], status=[], latency_ms=[])}, "columns.model"),
        ({"columns": five(feature=[])}, "columns.feature"),
        ({"columns": five(feature="summary")}, "columns.feature"),  # a value, not a column
    ],
    ids=[
        "unknown",
        "stored-name",
        "both-forms",
        "rows-as-columns",
        "list",
        "empty",
        "empty-opt",
        "scalar",
    ],
)
async def test_a_body_not_in_columns_is_refused(
    sqlite_api: httpx.AsyncClient, engine: Engine, body: Any, field: str
) -> None:
    answer = await post_body(sqlite_api, body)
    assert answer.status_code == 422, answer.text
    assert field in {e["field"] for e in answer.json()["errors"]}, answer.text
    assert nothing_stored(engine)


async def test_a_call_id_twice_in_a_batch_is_refused_at_its_second_index(
    sqlite_api: httpx.AsyncClient, engine: Engine
) -> None:
    call_ids = ["aaaaaaaaaaaaaaaa", None, "bbbbbbbbbbbbbbbb", "aaaaaaaaaaaaaaaa", None]
    answer = await post_columns(sqlite_api, five(call_id=call_ids))
    assert answer.status_code == 422, answer.text
    assert [e["field"] for e in answer.json()["errors"]] == ["columns.call_id[3]"]
    assert "already in this batch" in answer.text
    assert nothing_stored(engine)

    # Nulls are not a repeated call_id: each call gets one of its own.
    call_ids = [None, None, "cccccccccccccccc", None, None]
    answer = await post_columns(sqlite_api, five(call_id=call_ids))
    assert answer.status_code == 202, answer.text
    ids = [row.call_id for row in stored_calls(engine)]
    assert len(set(ids)) == 5
    assert ids[2] == "cccccccccccccccc"


async def test_a_batch_sent_again_in_columns_writes_nothing_twice(
    sqlite_api: httpx.AsyncClient, engine: Engine
) -> None:
    columns = five(call_id=[new_call_id() for _ in range(5)])
    first = await post_columns(sqlite_api, columns, gzipped=True)
    again = await post_columns(sqlite_api, columns)
    as_rows = await post_rows(
        sqlite_api,
        [{name: values[i] for name, values in columns.items()} for i in range(5)],
    )
    assert first.json() == {"accepted": 5, "duplicates": 0}
    assert again.json() == as_rows.json() == {"accepted": 5, "duplicates": 5}
    assert len(stored_calls(engine)) == 5


# --- 4. the SDK sends columns, and they land ------------------------------------------------------

APP_SALT = "app-salt"
RAW_USER = "customer_7@example.com"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
ANSWER = "The capital of France is Paris."


class RecordingSink(HttpSink):
    """An HttpSink that keeps each request it sent, as httpx sent it."""

    def __init__(self, url: str, api_key: str) -> None:
        super().__init__(url, api_key)
        self.sent: list[httpx.Request] = []
        self._lock = threading.Lock()

    def _post(self, body: bytes) -> httpx.Response:
        response = super()._post(body)
        with self._lock:
            self.sent.append(response.request)
        return response


def decoded(request: httpx.Request) -> dict[str, list[Any]]:
    """The columns of a request the sink sent; checks the body is the columnar form."""
    assert request.headers["content-type"] == COLUMNS_TYPE
    assert request.headers["content-encoding"] == "gzip"
    body = json.loads(gzip.decompress(request.content))
    assert list(body) == ["columns"]
    columns: dict[str, list[Any]] = body["columns"]
    assert len({len(values) for values in columns.values()}) == 1
    return columns


def pending(ts: datetime) -> PendingCall:
    return PendingCall(
        operation="chat",
        model="gpt-4.1",
        started=0.0,
        ts=ts,
        context=LLMContext(),
        score_quality=True,
        prompt=CHAT,
        output_parts=[ANSWER],
    )


def sdk_records(now: datetime) -> list[CallRecord]:
    return [
        CallRecord(
            ts=now - timedelta(seconds=3),
            model="gpt-4.1",
            status="success",
            latency_ms=812.5,
            response_model="gpt-4.1-2025-04-14",
            http_status=200,
            ttft_ms=120.0,
            input_tokens=1_000,
            output_tokens=200,
            cached_input_tokens=100,
            feature="summary",
            team="finance",
            environment="prod",
            session_id="s1",
            user_hash=hash_user_id(RAW_USER, APP_SALT),
            finish_reason="stop",
            request_id="req_1",
            metadata={"prompt_version": "v7"},
            controls="reroute#3",
        ),
        CallRecord(
            ts=now - timedelta(seconds=2),
            model="gpt-4.1",
            status="rate_limited",
            latency_ms=35.0,
            http_status=429,
            error_type="RateLimitError",
            error_message="slow down",
            retry_count=2,
            feature="summary",
        ),
        CallRecord(
            ts=now - timedelta(seconds=1),
            model="gpt-4.1",
            status="success",
            latency_ms=0.4,
            source="cache",
            controls="cache#1",
            feature="summary",
        ),
    ]


@pytest.fixture
def sink(ingest_api: ThreadedServer) -> Iterator[RecordingSink]:
    sink = RecordingSink(ingest_api.url, INGEST_KEY)
    yield sink
    sink.close()


# The CallRecord fields stored under their own name.
RECORD_FIELDS = (
    *("model", "status", "latency_ms", "response_model", "http_status", "ttft_ms"),
    *("input_tokens", "output_tokens", "cached_input_tokens", "feature", "team", "environment"),
    *("session_id", "error_type", "error_message", "retry_count", "finish_reason"),
    *("request_id", "trace_id", "source", "controls", "operation"),
)


def test_the_sdk_sends_columns_and_they_land(
    ingest_api: ThreadedServer, engine: Engine, sink: RecordingSink
) -> None:
    recorder = Recorder(sink, salt=APP_SALT, quality_sample_rate=0, flush_interval=0.02)
    try:
        unscored = sdk_records(datetime.now(UTC))
        for record in unscored:
            recorder.enqueue(record)
        assert recorder.flush()
        sent_unscored = len(sink.sent)
        scored = sdk_records(datetime.now(UTC))
        recorder.enqueue(scored[0], pending(scored[0].ts))
        recorder.enqueue(scored[1])
        recorder.enqueue(scored[2], pending(scored[2].ts))
        assert recorder.flush()
    finally:
        recorder.close()
    assert recorder.written == 6
    assert recorder.failed == 0

    # On the wire: columns only, gzipped; no column for a field no record has, no cost (the
    # API prices), and the quality column only when a verdict travels, null for the others.
    sent: dict[str, dict[str, Any]] = {}  # call_id: the call as sent
    for index, request in enumerate(sink.sent):
        columns = decoded(request)
        assert set(columns) <= set(FIELDS)
        assert {"cost_usd", "trace_id", "call_id"} & set(columns) == {"call_id"}
        assert ("quality" in columns) == (index >= sent_unscored)
        for i, call_id in enumerate(columns["call_id"]):
            sent[call_id] = {k: v[i] for k, v in columns.items() if v[i] is not None}
    assert sent_unscored >= 1
    assert len(sink.sent) > sent_unscored
    assert set(sent) == {r.call_id for r in unscored + scored}
    assert "quality" not in sent[scored[1].call_id]
    assert sent[unscored[0].call_id]["user"] == hash_user_id(RAW_USER, APP_SALT)
    expected = heuristic_score(ANSWER, CHAT[0]["content"])
    assert sent[scored[0].call_id]["quality"] == {
        "score": expected.composite,
        "format_compliance": expected.format_compliance,
        "hallucination_risk": expected.hallucination_risk,
        "relevance": expected.relevance,
    }

    # In the stores: each record as it was, the user hashed again with the API's salt ("s").
    rows = {row.call_id: row for row in stored_calls(engine)}
    assert set(rows) == set(sent)
    for record in unscored + scored:
        row = rows[record.call_id]
        assert utc(row.ts) == record.ts
        for name in RECORD_FIELDS:
            assert getattr(row, name) == getattr(record, name), name
        assert row.metadata_ == record.metadata
        expected_user = hash_user_id(record.user_hash, "s") if record.user_hash else None
        assert row.user_hash == expected_user
    assert rows[unscored[0].call_id].cost_usd is not None
    assert rows[unscored[0].call_id].cost_usd > 0  # type: ignore[operator]
    assert rows[unscored[2].call_id].cost_usd is None  # no tokens: nothing to price
    scores = {s.call_id: s for s in stored_scores(engine)}
    assert set(scores) == {scored[0].call_id, scored[2].call_id}
    for call_id in scores:
        assert scores[call_id].source == "scorer"
        assert scores[call_id].score == pytest.approx(expected.composite)
        assert utc(scores[call_id].ts) == utc(rows[call_id].ts)


def test_encode_is_the_columnar_form_of_the_records() -> None:
    now = datetime.now(UTC)
    records = sdk_records(now)
    verdict = ScoreRecord(
        call_id=records[1].call_id,
        ts=records[1].ts,
        source="scorer",
        score=0.5,
        relevance=0.25,
        evaluator="pagerloop-heuristics",
    )
    body = json.loads(gzip.decompress(encode(records, {records[1].call_id: verdict})))
    columns = body["columns"]
    assert list(body) == ["columns"]
    assert columns["call_id"] == [r.call_id for r in records]
    assert columns["timestamp"] == [r.ts.isoformat() for r in records]
    assert columns["status"] == ["success", "rate_limited", "success"]
    assert columns["user"] == [hash_user_id(RAW_USER, APP_SALT), None, None]
    assert columns["error_message"] == [None, "slow down", None]
    assert columns["retry_count"] == [0, 2, 0]
    assert columns["source"] == ["sdk", "sdk", "cache"]
    assert columns["quality"] == [
        None,
        {"score": 0.5, "format_compliance": None, "hallucination_risk": None, "relevance": 0.25},
        None,
    ]
    assert "trace_id" not in columns  # no record has one
    assert "cost_usd" not in columns  # the API prices
    assert "user_hash" not in columns
    assert "ts" not in columns

    without = json.loads(gzip.decompress(encode(records[1:], {})))["columns"]
    assert "quality" not in without
    assert "user" not in without  # neither of these records has a user
    assert "response_model" not in without
    assert without["feature"] == ["summary", "summary"]


async def test_what_encode_makes_is_stored_as_the_records_are(
    api: httpx.AsyncClient, store: Engine
) -> None:
    records = sdk_records(datetime.now(UTC))
    verdict = ScoreRecord(call_id=records[0].call_id, ts=records[0].ts, source="scorer", score=0.9)
    answer = await api.post(
        PATH,
        content=encode(records, {verdict.call_id: verdict}),
        headers={**AUTH, "Content-Type": COLUMNS_TYPE, "Content-Encoding": "gzip"},
    )
    assert answer.status_code == 202, answer.text
    rows = stored_calls(store)
    assert [row.call_id for row in rows] == [r.call_id for r in records]
    assert [utc(row.ts) for row in rows] == [r.ts for r in records]
    assert [row.source for row in rows] == ["sdk", "sdk", "cache"]
    assert rows[0].user_hash == hash_user_id(hash_user_id(RAW_USER, APP_SALT), SALT)
    assert [(s.call_id, s.score) for s in stored_scores(store)] == [(records[0].call_id, 0.9)]
