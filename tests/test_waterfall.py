"""The request waterfall (issue #16): a trace's calls from the call log on SQLite and PostgreSQL,
laid out on a time axis, over HTTP (`GET /v1/waterfall/{trace_id}`) and on the command line
(`pagerloop calls trace`); the diagnosis linking its worst calls' traces; and the seed's
`llm.*` attributes on the SDK's spans."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from llmock.pytest_plugin import LLMock
from pagerloop_sdk import Recorder, instrument
from sqlalchemy import Engine
from temporalio.testing import WorkflowEnvironment
from typer.testing import CliRunner

from activities.diagnosis import (
    DiagnosisActivities,
    DiagnosisQuery,
    ErrorGroup,
    ModelLatency,
    waterfall_url,
)
from config import Settings
from detectors.config import DetectorRules
from detectors.reading import SignalJudge
from domain.waterfall import (
    BAR,
    TraceCall,
    TracedCall,
    bar,
    draw,
    span_attributes,
    traces_finding,
    waterfall,
    worst_traces,
)
from instrumentation.store_sink import StoreSink
from runbooks import elevated_latency
from runbooks.testing import RunbookKit, Snapshot
from stores.engine import create_schema, make_engine
from stores.llm_calls import CallRecord
from stores.quality import ScoreRecord, write_scores
from stores.waterfall import MAX_TRACE_CALLS, trace_calls
from stores.writer import write_calls
from tests.helpers import api_client, recorded

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
OTHER = "00f067aa0ba902b7aaaaaaaaaaaaaaaa"
OPERATOR = "operator-key-1"
INGEST = "ingest-key-1"
ALICE = {"Authorization": f"Bearer {OPERATOR}"}
runner = CliRunner()


def at(ms: float) -> datetime:
    return T0 + timedelta(milliseconds=ms)


def record(
    start_ms: float, latency_ms: float, trace: str | None = TRACE, **fields: Any
) -> CallRecord:
    values: dict[str, Any] = {"model": "gpt-4.1", "status": "success"}
    values.update(fields)
    return CallRecord(ts=at(start_ms), latency_ms=latency_ms, trace_id=trace, **values)


def one_request() -> list[CallRecord]:
    """The seed's request: a prompt built, the call (429 first, then answered), a cheap
    follow-up, all in one trace; written out of order, with calls of another trace between."""
    return [
        record(
            1_400.0,
            1_234.5,
            input_tokens=1_850,
            output_tokens=420,
            cost_usd=0.0071,
            response_model="gpt-4.1-2025-04-14",
            finish_reason="stop",
            request_id="req_answer",
            feature="summarize",
            retry_count=1,
        ),
        record(
            0.0,
            180.0,
            status="rate_limited",
            http_status=429,
            error_type="RateLimitError",
            feature="summarize",
        ),
        record(500.0, 20_000.0, trace=OTHER, feature="chat"),
        record(
            2_700.0,
            300.0,
            model="gpt-4.1-nano",
            input_tokens=90,
            output_tokens=12,
            cost_usd=0.0000138,
            source="cache",
            controls="cache#4",
            feature="summarize",
        ),
        record(50.0, 10.0, trace=None),
    ]


# --- the layout (pure) -------------------------------------------------------------------------


def call(start_ms: float, latency_ms: float, **fields: Any) -> TraceCall:
    values: dict[str, Any] = {"call_id": f"c{start_ms}", "model": "gpt-4.1", "status": "success"}
    values.update(fields)
    return TraceCall(started_at=at(start_ms), latency_ms=latency_ms, **values)


def test_calls_are_placed_from_the_first_calls_start_in_start_order() -> None:
    laid = waterfall([call(1_500, 500), call(200, 1_000), call(0, 100)])
    assert laid.started_at == T0
    assert [(p.offset_ms, p.duration_ms) for p in laid.calls] == [
        (0.0, 100.0),
        (200.0, 1_000.0),
        (1_500.0, 500.0),
    ]
    # From the first start to the last end, which need not be the last call's.
    assert laid.duration_ms == 2_000.0
    assert waterfall([call(0, 3_000), call(100, 50)]).duration_ms == 3_000.0
    assert waterfall([call(7, 0.5)]).calls[0].offset_ms == 0.0
    with pytest.raises(ValueError, match="at least one call"):
        waterfall([])


def test_bars_are_proportional_at_least_a_column_and_never_past_the_axis() -> None:
    assert bar(0, 1_000, 2_000, 40) == (0, 20)
    assert bar(1_000, 1_000, 2_000, 40) == (20, 20)
    assert bar(500, 250, 2_000, 40) == (10, 5)
    # A 2 ms call beside a 20 s one still shows, one column where it ran.
    assert bar(10_000, 2, 20_000, 40) == (20, 1)
    # A call starting at the very end, or of no duration: one column, inside the axis.
    assert bar(2_000, 0, 2_000, 40) == (39, 1)
    # Floating point at the far end does not spill a column past it.
    assert bar(0.1, 1_999.9, 2_000, 7) == (0, 7)
    # A trace of one instant: every call in the first column.
    assert bar(0, 0, 0, 40) == (0, 1)
    with pytest.raises(ValueError, match="width"):
        bar(0, 1, 1, 0)
    assert draw(3, 4, 10) == f"   {BAR * 4}   "
    assert draw(0, 10, 10) == BAR * 10
    for start, columns in (bar(o, d, 2_000, 10) for o, d in ((0, 2_000), (1_999, 1), (999, 2))):
        assert len(draw(start, columns, 10)) == 10


def test_span_attributes_are_the_sdks_genai_ones_and_the_seeds_llm_ones() -> None:
    answered = call(
        0,
        1_234.5,
        operation="responses",
        response_model="gpt-4.1-2025-04-14",
        input_tokens=1_850,
        output_tokens=420,
        cached_input_tokens=1_024,
        cost_usd=0.0071,
        request_id="req_1",
        finish_reason="completed",
    )
    assert span_attributes(answered) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "gpt-4.1",
        "gen_ai.response.model": "gpt-4.1-2025-04-14",
        "gen_ai.response.id": "req_1",
        "gen_ai.response.finish_reasons": ["completed"],
        "gen_ai.usage.input_tokens": 1_850,
        "gen_ai.usage.output_tokens": 420,
        "gen_ai.usage.cache_read.input_tokens": 1_024,
        "llm.latency_ms": 1_234.5,
        "llm.cost_usd": 0.0071,
    }
    limited = span_attributes(call(0, 35, status="rate_limited", operation="embeddings"))
    assert limited["error.type"] == "rate_limited"
    assert limited["gen_ai.operation.name"] == "embeddings"
    assert "llm.cost_usd" not in limited  # unpriced: no cost, not a cost of 0
    typed = span_attributes(call(0, 35, status="error", error_type="APIConnectionError"))
    assert typed["error.type"] == "APIConnectionError"


def test_the_diagnosis_links_the_first_three_distinct_traces_found() -> None:
    found = [
        TracedCall(
            "t1", "slowest", "gpt-4.1", "success", 12_300.0, url="https://p/v1/waterfall/t1"
        ),
        TracedCall("t1", "failed", "gpt-4.1", "timeout", 30_000.0),
        TracedCall("t2", "failed", "o3", "timeout", 30_000.0),
        TracedCall("", "failed", "o3", "error", 10.0),
        TracedCall("t3", "costliest", "o3", "success", 900.0, cost_usd=1.25),
        TracedCall("t4", "slowest", "o3", "success", 9_000.0),
    ]
    picked = worst_traces(found)
    assert [t.trace_id for t in picked] == ["t1", "t2", "t3"]
    assert picked[0].why == "slowest"  # the first found of a trace stands for it
    line = traces_finding(picked)
    assert line is not None
    assert "`pagerloop calls trace TRACE_ID`" in line
    assert "t1 (slowest: gpt-4.1, 12,300 ms) https://p/v1/waterfall/t1" in line
    assert "t2 (failed: o3, timeout, 30,000 ms);" in line
    assert "t3 (costliest: o3, $1.2500)" in line
    assert "t4" not in line
    assert traces_finding([]) is None
    assert waterfall_url("", TRACE) == ""
    assert waterfall_url("https://pager.example/", "a/b") == (
        "https://pager.example/v1/waterfall/a%2Fb"
    )


# --- the store, on SQLite and PostgreSQL --------------------------------------------------------


def test_a_traces_calls_come_back_by_start_and_only_its_own(store: Engine) -> None:
    write_calls(store, one_request())
    found = trace_calls(store, TRACE)
    assert found.trace_id == TRACE
    assert not found.truncated
    assert [(c.started_at, c.latency_ms, c.status) for c in found.calls] == [
        (T0, 180.0, "rate_limited"),
        (at(1_400), 1_234.5, "success"),
        (at(2_700), 300.0, "success"),
    ]
    limited, answered, cached = found.calls
    assert all(c.started_at.tzinfo is not None for c in found.calls)  # UTC on both stores
    assert (limited.http_status, limited.error_type) == (429, "RateLimitError")
    assert (answered.input_tokens, answered.output_tokens, answered.cost_usd) == (
        1_850,
        420,
        0.0071,
    )
    assert (answered.response_model, answered.request_id, answered.retry_count) == (
        "gpt-4.1-2025-04-14",
        "req_answer",
        1,
    )
    assert (answered.cache_hit, cached.cache_hit, cached.controls) == (False, True, "cache#4")
    assert trace_calls(store, OTHER).calls[0].latency_ms == 20_000.0
    assert trace_calls(store, "no-such-trace").calls == []
    assert trace_calls(store, TRACE.upper()).calls == []  # ids are matched exactly


def test_a_huge_trace_is_cut_to_its_first_calls_and_says_so(store: Engine) -> None:
    write_calls(store, [record(float(ms), 5.0) for ms in range(12, 0, -1)])
    cut = trace_calls(store, TRACE, limit=5)
    assert cut.truncated
    assert [c.started_at for c in cut.calls] == [at(ms) for ms in range(1, 6)]
    whole = trace_calls(store, TRACE, limit=12)
    assert (len(whole.calls), whole.truncated) == (12, False)
    with pytest.raises(ValueError, match="limit"):
        trace_calls(store, TRACE, limit=MAX_TRACE_CALLS + 1)


# --- over HTTP -----------------------------------------------------------------------------------


@pytest.fixture
def calls_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'stores.db'}"
    monkeypatch.setenv("PAGERLOOP_DATABASE_URL", url)
    engine = make_engine(url)
    create_schema(engine)
    write_calls(engine, one_request())
    yield engine
    engine.dispose()


@pytest.fixture
async def api(calls_store: Engine) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        ingest_api_keys=INGEST,
        operator_api_keys=f"alice:{OPERATOR}",
        user_hash_salt="s",
        database_url=str(calls_store.url),
    )
    async with api_client(settings, calls_store, None) as client:  # type: ignore[arg-type]
        yield client


async def test_only_operators_read_a_waterfall(api: httpx.AsyncClient) -> None:
    assert (await api.get(f"/v1/waterfall/{TRACE}")).status_code == 401
    wrong = await api.get(f"/v1/waterfall/{TRACE}", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    app_key = await api.get(f"/v1/waterfall/{TRACE}", headers={"Authorization": f"Bearer {INGEST}"})
    assert app_key.status_code == 403
    # Refused before the store is read: an unknown trace looks the same as a known one.
    assert (await api.get("/v1/waterfall/no-such-trace")).status_code == 401


async def test_the_waterfall_document_has_each_call_on_the_time_axis(
    api: httpx.AsyncClient,
) -> None:
    response = await api.get(f"/v1/waterfall/{TRACE}", headers=ALICE)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["trace_id"] == TRACE
    assert datetime.fromisoformat(body["started_at"]) == T0
    assert body["duration_ms"] == 3_000.0  # the first start to the cached call's end
    assert body["truncated"] is False
    assert body["cost_usd"] == round(0.0071 + 0.0000138, 6)  # to the micro-dollar
    assert (body["input_tokens"], body["output_tokens"]) == (1_940, 432)
    calls = body["calls"]
    assert [c["offset_ms"] for c in calls] == [0.0, 1_400.0, 2_700.0]
    assert [c["duration_ms"] for c in calls] == [180.0, 1_234.5, 300.0]
    assert [c["status"] for c in calls] == ["rate_limited", "success", "success"]
    assert [c["model"] for c in calls] == ["gpt-4.1", "gpt-4.1", "gpt-4.1-nano"]
    assert [c["cache_hit"] for c in calls] == [False, False, True]
    limited, answered, cached = calls
    assert (limited["http_status"], limited["error_type"]) == (429, "RateLimitError")
    assert limited["attributes"]["error.type"] == "RateLimitError"
    assert answered["attributes"]["llm.cost_usd"] == 0.0071
    assert answered["attributes"]["llm.latency_ms"] == 1_234.5
    assert answered["attributes"]["gen_ai.request.model"] == "gpt-4.1"
    assert answered["attributes"]["gen_ai.response.model"] == "gpt-4.1-2025-04-14"
    assert answered["attributes"]["gen_ai.usage.output_tokens"] == 420
    assert answered["feature"] == "summarize"
    assert cached["controls"] == "cache#4"
    # The same document as the command line's --json.
    cli = runner.invoke(_cli(), ["calls", "trace", TRACE, "--json"])
    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.output) == body


async def test_unknown_and_malformed_trace_ids(api: httpx.AsyncClient) -> None:
    unknown = await api.get("/v1/waterfall/0af7651916cd43dd8448eb211c80319c", headers=ALICE)
    assert unknown.status_code == 404
    assert "no call in the call log carries this trace id" in unknown.json()["detail"]
    long = await api.get(f"/v1/waterfall/{'a' * 65}", headers=ALICE)
    assert long.status_code == 422
    assert long.json()["errors"][0]["field"] == "path.trace_id"
    nul = await api.get("/v1/waterfall/abc%00def", headers=ALICE)
    assert nul.status_code == 422
    assert nul.json()["errors"][0]["field"] == "path.trace_id"
    empty = await api.get("/v1/waterfall/", headers=ALICE)
    assert empty.status_code == 422
    # Any id ingest takes can be read back, a `/` in it too.
    assert (await api.get("/v1/waterfall/a%2Fb", headers=ALICE)).status_code == 404


async def test_a_trace_id_with_a_slash_is_read_back(
    api: httpx.AsyncClient, calls_store: Engine
) -> None:
    write_calls(calls_store, [record(0, 10.0, trace="svc/req-7")])
    response = await api.get("/v1/waterfall/svc%2Freq-7", headers=ALICE)
    assert response.status_code == 200, response.text
    assert response.json()["trace_id"] == "svc/req-7"


# --- on the command line --------------------------------------------------------------------------


def _cli() -> Any:
    from cli.main import app

    return app


def test_pagerloop_calls_trace_draws_the_waterfall(calls_store: Engine) -> None:
    result = runner.invoke(_cli(), ["calls", "trace", TRACE, "--width", "30"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == (
        f"trace {TRACE}: 3 calls in 3,000 ms from 2026-12-01 12:00:00 UTC, "
        "1,940/432 tokens, $0.007114"
    )
    rows = [line for line in lines if line.startswith("│")]
    assert len(rows) == 3
    cells = [[cell.strip() for cell in row.strip("│").split("│")] for row in rows]
    assert [c[0] for c in cells] == ["+0 ms", "+1,400 ms", "+2,700 ms"]
    assert [c[2] for c in cells] == ["180 ms", "1,234 ms", "300 ms"]
    assert [c[4] for c in cells] == ["rate_limited", "success", "success"]
    assert [c[5] for c in cells] == ["-", "1850/420", "90/12"]
    assert [c[6] for c in cells] == ["-", "$0.007100", "$0.000014"]
    assert cells[0][8] == "RateLimitError"
    assert cells[1][8] == "1 retry"
    assert cells[2][8] == "cache hit, cache#4"
    # The bars: where each call ran on a 30-column axis of 3,000 ms (100 ms a column).
    bars = [row.split("│")[2] for row in rows]
    assert all(len(b) == 32 for b in bars)  # the column, and a space of padding either side
    assert [(len(b[1:31]) - len(b[1:31].lstrip()), b.count(BAR)) for b in bars] == [
        (0, 2),  # 0-180 ms: columns 0 and 1
        (14, 13),  # 1,400-2,634.5 ms: columns 14 to 26
        (27, 3),  # 2,700-3,000 ms: the last three
    ]
    header = next(line for line in lines if "3,000 ms" in line and line.startswith("┃"))
    assert re.search(r"┃ 0 +3,000 ms ┃", header)


def test_pagerloop_calls_trace_refuses_and_says_what_is_missing(calls_store: Engine) -> None:
    unknown = runner.invoke(_cli(), ["calls", "trace", "0af7651916cd43dd8448eb211c80319c"])
    assert unknown.exit_code == 1
    assert "no call in the call log carries trace id" in unknown.output
    long = runner.invoke(_cli(), ["calls", "trace", "a" * 65])
    assert long.exit_code == 2
    assert "TRACE_ID" in long.output
    whole = runner.invoke(_cli(), ["calls", "trace", TRACE])
    assert whole.exit_code == 0
    assert "more carry this trace id" not in whole.output


def test_pagerloop_calls_trace_says_when_the_trace_is_cut(
    calls_store: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cli import calls as cli_calls

    monkeypatch.setattr(cli_calls, "trace_calls", partial(trace_calls, limit=2))
    cut = runner.invoke(_cli(), ["calls", "trace", TRACE])
    assert cut.exit_code == 0, cut.output
    assert len([line for line in cut.output.splitlines() if line.startswith("│")]) == 2
    assert cut.output.splitlines()[-1] == "the first 2 calls by start; more carry this trace id"


# --- the incident's diagnosis links its worst calls' traces ---------------------------------------


def traced(trace: str, ago_s: float, **fields: Any) -> CallRecord:
    values: dict[str, Any] = {"model": "gpt-4.1", "status": "success", "latency_ms": 100.0}
    values.update(fields)
    return CallRecord(ts=T0 - timedelta(seconds=ago_s), trace_id=trace, **values)


async def test_the_diagnosis_queries_carry_their_worst_calls_traces(store: Engine) -> None:
    write_calls(
        store,
        [
            traced("slow-1", 60, latency_ms=25_000.0, feature="chat"),
            traced("slow-1", 61, latency_ms=24_000.0, feature="chat"),  # the same trace again
            traced("slow-2", 62, latency_ms=20_000.0, feature="chat"),
            traced("slow-3", 63, latency_ms=9_000.0, feature="search"),
            traced("quick", 64, latency_ms=50.0, feature="chat"),
            CallRecord(
                ts=T0 - timedelta(seconds=65),
                model="gpt-4.1",
                status="success",
                latency_ms=90_000.0,
            ),
            traced("old", 2_000, latency_ms=99_000.0),  # before the window
            traced("cached", 66, latency_ms=80_000.0, source="cache"),  # never reached OpenAI
            traced("other-model", 67, latency_ms=60_000.0, model="o3"),
            traced("fail-1", 10, status="timeout", latency_ms=30_000.0, feature="chat"),
            traced("fail-2", 20, status="timeout", latency_ms=30_000.0, feature="chat"),
            traced(
                "limited",
                30,
                status="rate_limited",
                latency_ms=35.0,
                feature="chat",
                error_type="RateLimitError",
                input_tokens=10,
                cost_usd=0.5,
            ),
            traced(
                "dear", 40, input_tokens=90_000, output_tokens=9_000, cost_usd=0.9, feature="chat"
            ),
        ],
    )
    activities = DiagnosisActivities(
        store, SignalJudge(DetectorRules(), daily_budget_usd=500.0), public_url="https://p.ex/"
    )
    q = DiagnosisQuery(scope="model:gpt-4.1", end=T0, window_seconds=900, limit=5)
    [gpt] = await activities.latency(q)
    # The slowest of the model's calls in the window that reached OpenAI and carry a trace id,
    # one per trace (not the untraced, cached, older or other model's slower ones).
    assert [t.trace_id for t in gpt.traces] == ["fail-1", "fail-2", "slow-1"]
    assert gpt.traces[2] == TracedCall(
        "slow-1",
        "slowest",
        "gpt-4.1",
        "success",
        25_000.0,
        None,
        "https://p.ex/v1/waterfall/slow-1",
    )
    # A feature scope: only that feature's calls.
    search = DiagnosisQuery(scope="feature:search", end=T0, window_seconds=900)
    [by_feature] = await activities.latency(search)
    assert [t.trace_id for t in by_feature.traces] == ["slow-3"]

    errors = await activities.recent_errors(q)
    assert [(e.status, [t.trace_id for t in e.traces]) for e in errors] == [
        ("timeout", ["fail-1", "fail-2"]),
        ("rate_limited", ["limited"]),
    ]
    assert errors[0].traces[0].why == "failed"
    [limits] = await activities.rate_limits(q)
    assert [(t.trace_id, t.why) for t in limits.traces] == [("limited", "rate_limited")]
    features = await activities.top_features(q)
    chat = next(f for f in features if f.feature == "chat")
    assert [(t.trace_id, t.cost_usd) for t in chat.traces] == [("dear", 0.9), ("limited", 0.5)]


async def test_the_worst_quality_calls_traces(store: Engine) -> None:
    calls = [
        traced("bad", 60, response_model="gpt-4.1-2025-04-14"),
        traced("good", 61, response_model="gpt-4.1-2025-04-14"),
        traced("untraced", 62, response_model="gpt-4.1-2025-04-14"),
    ]
    calls[2].trace_id = None
    write_calls(store, calls)
    write_scores(
        store,
        [
            ScoreRecord(
                call_id=c.call_id,
                ts=T0 - timedelta(seconds=5),
                source="scorer",
                score=score,
                model="gpt-4.1-2025-04-14",
            )
            for c, score in zip(calls, (0.1, 0.9, 0.0), strict=True)
        ],
    )
    activities = DiagnosisActivities(store, SignalJudge(DetectorRules(), daily_budget_usd=500.0))
    [group] = await activities.quality(DiagnosisQuery(scope="global", end=T0, window_seconds=900))
    assert [(t.trace_id, t.why, t.url) for t in group.traces] == [
        ("bad", "lowest_quality", ""),
        ("good", "lowest_quality", ""),
    ]


async def test_the_runbooks_diagnosis_ends_with_the_worst_calls_traces(
    time_skipping_env: WorkflowEnvironment, engine: Engine
) -> None:
    slow = [TracedCall(f"slow-{i}", "slowest", "gpt-4.1", "success", 20_000.0 - i) for i in (1, 2)]
    failed = [
        TracedCall("slow-1", "failed", "gpt-4.1", "timeout", 30_000.0),
        TracedCall("fail-9", "failed", "gpt-4.1", "timeout", 30_000.0, url="https://p/w/fail-9"),
        TracedCall("fail-10", "failed", "gpt-4.1", "timeout", 30_000.0),
    ]
    snapshot = Snapshot(
        latency=[ModelLatency("gpt-4.1", 100, 900.0, 20_000.0, 800.0, traces=slow)],
        errors=[ErrorGroup("gpt-4.1", "chat", "timeout", "", 3, T0, "", traces=failed)],
    )
    kit = RunbookKit(time_skipping_env.client, engine, snapshot)
    run = await kit.run(elevated_latency.SPEC, scope="model:gpt-4.1", may_mitigate=False)
    last = run.report.findings[-1]
    assert last.startswith("traces of the worst calls")
    assert re.findall(r"(\S+) \((\w+):", last) == [
        ("slow-1", "slowest"),
        ("slow-2", "slowest"),
        ("fail-9", "failed"),
    ]
    assert "https://p/w/fail-9" in last
    assert "fail-10" not in last

    # Without traces in the answers, the diagnosis is what it was.
    plain = Snapshot(latency=[ModelLatency("gpt-4.1", 100, 900.0, 20_000.0, 800.0)])
    bare = await RunbookKit(time_skipping_env.client, engine, plain).run(
        elevated_latency.SPEC, scope="model:gpt-4.1", may_mitigate=False
    )
    assert not any("traces of the worst calls" in f for f in bare.report.findings)


# --- the SDK's spans carry the seed's llm.* attributes --------------------------------------------


@pytest.fixture
def recorder(engine: Engine) -> Iterator[Recorder]:
    recorder = Recorder(StoreSink(engine), salt="s", flush_interval=0.05)
    yield recorder
    recorder.close()


def test_the_sdks_span_has_llm_latency_and_cost_beside_the_genai_attributes(
    llmock: LLMock, recorder: Recorder, engine: Engine
) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    client = instrument(
        openai.OpenAI(base_url=llmock.base_url(), api_key="k", max_retries=0),
        recorder=recorder,
        tracer_provider=provider,
        controls=False,
    )
    chat = [{"role": "user", "content": "Summarize the quarterly report"}]
    with provider.get_tracer("app").start_as_current_span("handle_request"):
        client.chat.completions.create(model="gpt-4.1", messages=chat)
        llmock.rate_limit(times=1, retry_after=0.01)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="gpt-4.1", messages=chat)
    ok, limited = [s for s in spans.get_finished_spans() if s.name.startswith("chat")]
    attributes = dict(ok.attributes or {})
    ok_row, limited_row = recorded(recorder, engine)
    # The seed's names, with the record's own values: the span and the call log agree.
    assert attributes["llm.cost_usd"] == pytest.approx(ok_row.cost_usd)
    assert attributes["llm.cost_usd"] > 0
    assert attributes["llm.latency_ms"] == pytest.approx(ok_row.latency_ms, abs=1.0)
    assert attributes["llm.latency_ms"] > 0
    assert attributes["gen_ai.usage.input_tokens"] == ok_row.input_tokens
    assert attributes["gen_ai.request.model"] == "gpt-4.1"
    # A call that failed took time and spent nothing priced: latency, no cost.
    failed = dict(limited.attributes or {})
    assert failed["llm.latency_ms"] == pytest.approx(limited_row.latency_ms, abs=1.0)
    assert "llm.cost_usd" not in failed
    assert failed["error.type"] == "RateLimitError"
    # And the waterfall of that trace shows both calls, under the span's trace id.
    trace_id = format(ok.context.trace_id, "032x")
    assert ok_row.trace_id == limited_row.trace_id == trace_id
    assert [c.status for c in trace_calls(engine, trace_id).calls] == ["success", "rate_limited"]


def test_the_llm_attributes_price_a_call_as_its_record_will_be() -> None:
    from pagerloop_sdk.capture import PendingCall
    from pagerloop_sdk.context import EMPTY
    from pagerloop_sdk.pricing import DEFAULT_PRICES
    from pagerloop_sdk.telemetry import llm_attributes

    def pending(**fields: Any) -> PendingCall:
        values: dict[str, Any] = {
            "operation": "chat",
            "model": "gpt-4.1",
            "started": 10.0,
            "ended": 11.2345,
            "input_tokens": 1_000,
        }
        values.update(fields)
        return PendingCall(ts=T0, context=EMPTY, **values)

    # Priced by the snapshot that answered, at the seed's gpt-4.1 prices ($2 / $8 per 1M).
    answered = pending(output_tokens=100, response_model="gpt-4.1-2025-04-14")
    assert llm_attributes(answered, DEFAULT_PRICES) == {
        "llm.latency_ms": 1_234.5,
        "llm.cost_usd": pytest.approx((1_000 * 2.0 + 100 * 8.0) / 1e6),
    }
    # The response cache answered: nothing was spent, whatever the kept response's usage.
    assert llm_attributes(pending(cache_hit=True), DEFAULT_PRICES)["llm.cost_usd"] == 0.0
    # A model without a price has no cost (not a cost of 0); a call without usage neither.
    assert "llm.cost_usd" not in llm_attributes(pending(model="acme-llm"), DEFAULT_PRICES)
    assert "llm.cost_usd" not in llm_attributes(pending(input_tokens=None), DEFAULT_PRICES)
