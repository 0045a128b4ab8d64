"""GET /v1/calls and /v1/calls/stats through the real FastAPI app, and `pagerloop calls search /
stats` through the real CLI, over a SQLite store (the SQL itself is tested on both stores in
tests/test_call_search.py)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine
from typer.testing import CliRunner

from api import calls as api_calls
from cli import calls as cli_calls
from cli.main import app as cli
from config import Settings
from stores import call_search
from stores.engine import create_schema, make_engine
from stores.llm_calls import CallRecord
from stores.writer import write_calls
from tests.helpers import api_client

INGEST = "ingest-key-1"
OPERATOR = "operator-key-1"
SALT = "api-test-salt"
ALICE = {"Authorization": f"Bearer {OPERATOR}"}
APP = {"Authorization": f"Bearer {INGEST}"}
runner = CliRunner()


def ago(seconds: float) -> datetime:
    return datetime.now(UTC) - timedelta(seconds=seconds)


def record(name: str, seconds_ago: float, **fields: Any) -> CallRecord:
    values: dict[str, Any] = {"model": "gpt-4.1", "status": "success", "latency_ms": 420.0}
    values.update(fields)
    return CallRecord(ts=ago(seconds_ago), request_id=name, **values)


def rows() -> list[CallRecord]:
    """Made when the test runs (not at import: under xdist a module waits minutes for its turn),
    so that "the last hour" holds them."""
    return [
        record("req_a", 60, feature="chat", input_tokens=812, output_tokens=96, cost_usd=0.002392),
        record(
            "req_b",
            120,
            status="error",
            latency_ms=2710.0,
            feature="chat",
            http_status=500,
            error_type="InternalServerError",
            retry_count=2,
            input_tokens=640,
            cost_usd=0.00128,
        ),
        record(
            "req_c",
            180,
            model="o3",
            status="rate_limited",
            latency_ms=35.0,
            feature="summarize",
            http_status=429,
            error_type="RateLimitError",
            retry_count=1,
        ),
        record("req_d", 240, model="gpt-4.1-mini", latency_ms=2250.0, feature="summarize"),
        record("req_old", 7200, feature="chat"),  # two hours ago: outside the default hour
    ]


@pytest.fixture
def engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Engine:
    url = f"sqlite:///{tmp_path / 'stores.db'}"
    monkeypatch.setenv("PAGERLOOP_DATABASE_URL", url)
    monkeypatch.setenv("PAGERLOOP_USER_HASH_SALT", SALT)
    engine = make_engine(url)
    create_schema(engine)
    write_calls(engine, rows())
    return engine


@pytest.fixture
async def api(engine: Engine) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        ingest_api_keys=INGEST,
        operator_api_keys=f"alice:{OPERATOR}",
        user_hash_salt=SALT,
        database_url=str(engine.url),
    )
    async with api_client(settings, engine, None) as client:  # type: ignore[arg-type]
        yield client


def names(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [c["request_id"] for c in response.json()["calls"]]


async def test_operators_search_the_last_hour_by_default(api: httpx.AsyncClient) -> None:
    everything = await api.get("/v1/calls", headers=ALICE)
    assert names(everything) == ["req_a", "req_b", "req_c", "req_d"]
    body = everything.json()
    assert body["next"] is None
    first = body["calls"][0]
    assert first["model"] == "gpt-4.1"
    assert first["status"] == "success"
    assert first["input_tokens"] == 812
    assert first["cost_usd"] == 0.002392
    assert first["timestamp"].endswith("Z") or first["timestamp"].endswith("+00:00")
    assert len(first["call_id"]) == 32
    query = {"q": "status:error AND model:gpt-4.1"}
    assert names(await api.get("/v1/calls", params=query, headers=ALICE)) == ["req_b"]
    slow = await api.get("/v1/calls", params={"q": "latency_ms:>2000"}, headers=ALICE)
    assert names(slow) == ["req_b", "req_d"]
    day = await api.get("/v1/calls", params={"q": "feature:chat", "since": "1d"}, headers=ALICE)
    assert names(day) == ["req_a", "req_b", "req_old"]
    window = {"since": ago(200).isoformat(), "until": ago(90).isoformat()}
    assert names(await api.get("/v1/calls", params=window, headers=ALICE)) == ["req_b", "req_c"]


async def test_pages_follow_next(api: httpx.AsyncClient) -> None:
    seen: list[str] = []
    params: dict[str, Any] = {"limit": 3, "since": "1d"}
    while True:
        page = await api.get("/v1/calls", params=params, headers=ALICE)
        seen += names(page)
        if page.json()["next"] is None:
            break
        params["cursor"] = page.json()["next"]
    assert seen == ["req_a", "req_b", "req_c", "req_d", "req_old"]


class Clock:
    """A clock the tests move: the pages of a sweep asked for as time passes."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


async def test_a_sweep_asked_for_as_time_passes_returns_every_call_once(
    api: httpx.AsyncClient, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages of the default hour, ten minutes apart: the calls that left "the last hour" while
    the operator read are still on the later pages, because the cursor carries the range."""
    clock = Clock()
    monkeypatch.setattr(api_calls, "clock", clock)
    write_calls(engine, [record(f"old{i}", 3000 + 60 * i) for i in range(8)])  # 50-57 min ago
    expected = ["req_a", "req_b", "req_c", "req_d", *(f"old{i}" for i in range(8))]
    seen: list[str] = []
    params: dict[str, Any] = {"limit": 4, "q": "model:gpt-4.1*"}
    first = None
    while True:
        page = await api.get("/v1/calls", params=params, headers=ALICE)
        seen += names(page)
        body = page.json()
        first = first or (body["since"], body["until"])
        assert (body["since"], body["until"]) == first
        if body["next"] is None:
            break
        params["cursor"] = body["next"]
        clock.now += timedelta(minutes=10)
    assert seen == [n for n in expected if n != "req_c"]  # req_c is o3
    # Beside a cursor, since/until that name another range, or another q, are refused.
    for extra in ({"since": "2h"}, {"until": "1m"}, {"q": "model:o3"}):
        refused = await api.get("/v1/calls", params={**params, **extra}, headers=ALICE)
        assert refused.status_code == 422, refused.text
        assert [e["field"] for e in refused.json()["errors"]] == ["query.cursor"]
    same = await api.get("/v1/calls", params={**params, "since": "1h"}, headers=ALICE)
    assert same.status_code == 200, same.text


def test_cli_pages_as_time_passes(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(cli_calls, "clock", clock)
    write_calls(engine, [record(f"old{i}", 3000 + 60 * i) for i in range(4)])
    seen: list[str] = []
    args = ["search", "feature:chat OR request_id:old*", "--limit", "2", "--csv"]
    cursor: list[str] = []
    while True:
        result = runner.invoke(cli, ["calls", *args, *cursor])
        assert result.exit_code == 0, result.output
        found = list(csv.DictReader(io.StringIO(result.stdout)))
        seen += [r["request_id"] for r in found]
        if "more: --cursor " not in result.stderr:
            break
        cursor = ["--cursor", result.stderr.rsplit("--cursor ", 1)[1].split()[0]]
        clock.now += timedelta(minutes=15)
    assert seen == ["req_a", "req_b", "old0", "old1", "old2", "old3"]
    other = runner.invoke(cli, ["calls", *args, *cursor[:1], cursor[1], "--since", "2h"])
    assert other.exit_code == 2
    assert "--cursor" in other.output


async def test_the_user_is_hashed_as_ingest_hashes_it(api: httpx.AsyncClient) -> None:
    call = {
        "model": "o3",
        "status": "success",
        "latency_ms": 12,
        "user": "u-1234",
        "request_id": "req_user",
    }
    posted = await api.post("/v1/llm-calls", json={"calls": [call]}, headers=APP)
    assert posted.status_code == 202, posted.text
    assert names(await api.get("/v1/calls", params={"q": "user:u-1234"}, headers=ALICE)) == [
        "req_user"
    ]
    assert names(await api.get("/v1/calls", params={"q": "user:u-123"}, headers=ALICE)) == []


async def test_keys(api: httpx.AsyncClient) -> None:
    for path in ("/v1/calls", "/v1/calls/stats"):
        assert (await api.get(path)).status_code == 401
        wrong = await api.get(path, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert (await api.get(path, headers=APP)).status_code == 403
        # The key is checked before the parameters are.
        assert (await api.get(path, params={"since": "never"})).status_code == 401


async def test_a_bad_query_is_a_400_with_its_position(api: httpx.AsyncClient) -> None:
    bad = await api.get("/v1/calls", params={"q": "status:error AND latency_ms:>"}, headers=ALICE)
    assert bad.status_code == 400
    assert bad.json() == {
        "detail": "position 29: expected a value after 'latency_ms:>'",
        "position": 29,
    }
    unknown = await api.get("/v1/calls/stats", params={"q": "modle:x"}, headers=ALICE)
    assert unknown.status_code == 400
    assert unknown.json()["position"] == 0
    assert "unknown field 'modle'; fields: status, model," in unknown.json()["detail"]
    injection = await api.get("/v1/calls", params={"q": 'model:"x\' OR 1=1 --"'}, headers=ALICE)
    assert names(injection) == []


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 0}, "query.limit"),
        ({"limit": 1001}, "query.limit"),
        ({"limit": "many"}, "query.limit"),
        ({"since": "yesterday"}, "query.since"),
        ({"since": "99999999d"}, "query.since"),
        ({"until": "2026-13-01T00:00:00Z"}, "query.until"),
        ({"since": "1h", "until": "2h"}, "query.until"),
        ({"cursor": "not-a-cursor"}, "query.cursor"),
        ({"cursor": "x" * 200}, "query.cursor"),
        ({"cursor": "x" * 300}, "query.cursor"),
        ({"since": "2026-12-01T10:00:00"}, "query.since"),
        ({"q": "model:" + "x" * 2000}, "query.q"),
        ({"q": "model:a\x00"}, "query.q"),
    ],
)
async def test_bad_parameters_are_422_naming_them(
    api: httpx.AsyncClient, params: dict[str, Any], field: str
) -> None:
    response = await api.get("/v1/calls", params=params, headers=ALICE)
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith(f"{field}: ")
    assert [e["field"] for e in response.json()["errors"]] == [field]


async def test_stats_per_group(api: httpx.AsyncClient) -> None:
    response = await api.get("/v1/calls/stats", params={"by": "feature"}, headers=ALICE)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["by"], body["calls"], body["groups_total"]) == ("feature", 4, 2)
    assert body["error_statuses"] == ["error", "timeout", "server_error"]
    chat, summarize = body["groups"]
    assert (chat["key"], chat["calls"], chat["errors"], chat["error_pct"]) == ("chat", 2, 1, 50)
    assert chat["input_tokens"] == 812 + 640
    assert chat["cost_usd"] == pytest.approx(0.002392 + 0.00128)
    assert (summarize["rate_limited"], summarize["rate_limited_pct"]) == (1, 50)
    assert chat["latency_p50_ms"] == pytest.approx(420, rel=0.025)
    assert chat["latency_p99_ms"] == pytest.approx(2710, rel=0.025)
    bad_by = await api.get("/v1/calls/stats", params={"by": "user"}, headers=ALICE)
    assert bad_by.status_code == 422
    assert bad_by.json()["errors"][0]["field"] == "query.by"


async def test_a_search_too_slow_is_a_503(
    api: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def slow(*_: object, **__: object) -> None:
        raise call_search.SearchTimeoutError("the search ran past 10 s: narrow it")

    monkeypatch.setattr(call_search, "search", slow)
    response = await api.get("/v1/calls", headers=ALICE)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "5"
    assert "narrow" in response.json()["detail"]


# --- the CLI -----------------------------------------------------------------------------------


def run(*args: str) -> Any:
    return runner.invoke(cli, ["calls", *args])


def test_cli_search_prints_a_table(engine: Engine) -> None:
    result = run("search", "status:error AND model:gpt-4.1")
    assert result.exit_code == 0, result.output
    for shown in (
        "gpt-4.1",
        "error",
        "500",
        "2,710 ms",
        "640/-",
        "$0.001280",
        "chat",
        "InternalServerError",
        "req_b",
        "1 call, newest first",
    ):
        assert shown in result.output
    assert "req_a" not in result.output
    everything = run("search", "", "--limit", "2")
    assert everything.exit_code == 0, everything.output
    assert "req_a" in everything.output
    assert "req_b" in everything.output
    assert "more: --cursor " in everything.output
    cursor = everything.output.rsplit("--cursor ", 1)[1].split()[0]
    rest = run("search", "--limit", "2", "--cursor", cursor)
    assert "req_c" in rest.output
    assert "req_d" in rest.output
    assert "req_a" not in rest.output
    none = run("search", "model:nothing")
    assert none.exit_code == 0
    assert "no calls from" in none.output


def test_cli_search_as_json_and_csv(engine: Engine) -> None:
    result = run("search", "latency_ms:>2000", "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert [c["request_id"] for c in document["calls"]] == ["req_b", "req_d"]
    assert document["next"] is None
    as_csv = run("search", "feature:chat", "--since", "1d", "--csv")
    assert as_csv.exit_code == 0, as_csv.output
    rows = list(csv.DictReader(io.StringIO(as_csv.output)))
    assert [r["request_id"] for r in rows] == ["req_a", "req_b", "req_old"]
    assert rows[0]["model"] == "gpt-4.1"
    assert rows[0]["http_status"] == ""
    both = run("search", "--json", "--csv")
    assert both.exit_code == 2


def test_cli_explains_a_bad_query_where_it_is(engine: Engine) -> None:
    result = run("search", "status:error AND latency_ms:>")
    assert result.exit_code == 2
    assert "position 29: expected a value after 'latency_ms:>'" in result.output
    lines = result.output.splitlines()
    caret = next(i for i, line in enumerate(lines) if line.strip() == "^")
    assert lines[caret].index("^") == lines[caret - 1].index("s") + 29
    since = run("search", "--since", "yesterday")
    assert since.exit_code == 2
    assert "--since" in since.output


def test_cli_stats(engine: Engine) -> None:
    result = runner.invoke(cli, ["calls", "stats", "", "--by", "model"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for shown in (
        "gpt-4.1",
        "o3",
        "gpt-4.1-mini",
        "50.00 %",
        "100.00 %",
        "4 calls in 3 groups",
        "error % counts error, timeout, server_error",
    ):
        assert shown in result.output
    as_json = json.loads(run("stats", "feature:chat", "--by", "feature", "--json").output)
    assert as_json["groups"][0]["key"] == "chat"
    assert as_json["groups"][0]["calls"] == 2
    as_csv = run("stats", "", "--by", "status", "--csv")
    rows = list(csv.DictReader(io.StringIO(as_csv.output)))
    assert {r["key"]: int(r["calls"]) for r in rows} == {
        "success": 2,
        "error": 1,
        "rate_limited": 1,
    }
    bad = run("stats", "", "--by", "user")
    assert bad.exit_code == 2
    assert "--by" in bad.output
