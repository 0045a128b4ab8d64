"""No call record lost through an outage (issue 11, part 3), on real stores.

(a) PostgreSQL stopped for 60 s while 10,000 calls go through the instrumented OpenAI SDK:
    afterwards exactly 10,000 rows (and an SQLite variant: its write lock held by another
    connection); (b) a small queue spills to the spool directory, close() spools the rest, and
    a new recorder on the same directory writes everything exactly once; (c) a retried batch,
    an ambiguous commit and a re-sent OTLP export write nothing twice and count nothing twice in
    the rollups; (d) what is finally lost is counted and logged once; and the API answers 503
    with Retry-After within 2 s while its PostgreSQL is down.

The outages are real: our own PostgreSQL cluster (tests/postgres.py) is stopped and started
with pg_ctl, and SQLite's write lock is taken by another connection.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import httpx2
import openai
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from pagerloop_sdk import Recorder, instrument
from pagerloop_sdk.recorder import RecorderStats
from prometheus_client import REGISTRY
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError
from temporalio.testing import WorkflowEnvironment

import worker
from config import Settings
from instrumentation.store_sink import StoreSink
from stores.engine import PATIENT_LOCK_SECONDS, create_schema, make_engine
from stores.llm_calls import CallRecord
from stores.quality import ScoreRecord, write_scores
from stores.writer import write_calls
from tests import postgres
from tests.chaos import ledger
from tests.conftest import postgres_required
from tests.helpers import api_client

KEY = "ingest-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
COMPLETION = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1_795_000_000,
    "model": "gpt-4.1-2025-04-14",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Revenue grew 12% on cloud services."},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 42, "completion_tokens": 9, "total_tokens": 51},
}
CHAT = [{"role": "user", "content": "Summarize the quarterly report revenue in one sentence."}]

# --- a PostgreSQL of our own, to stop and start ------------------------------------------------


class Cluster(postgres.OwnCluster):
    """A throwaway cluster that can be stopped and started again on the same data."""

    def halt(self) -> None:
        assert self.bin is not None
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "fast", "stop")

    def resume(self) -> None:
        assert self.bin is not None
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-o", options,
            "-l", str(self.dir / "log"), "-w", "start",
        )  # fmt: skip


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Cluster, str]]:
    own = Cluster()
    if not own.available:
        reason = "no PostgreSQL server binaries (initdb, pg_ctl) to start a cluster to stop"
        if postgres_required():
            pytest.fail(reason)
        pytest.skip(reason)
    admin = own.start()
    try:
        yield own, admin.render_as_string(hide_password=False)
    finally:
        with contextlib.suppress(Exception):
            own.resume()  # a test that failed mid-outage
        own.stop()


@pytest.fixture
def pg(cluster: tuple[Cluster, str], request: pytest.FixtureRequest) -> Iterator[Engine]:
    """A database of the test's own on the cluster, with an engine as the SDK makes it."""
    _, admin_url = cluster
    admin = postgres.make_url(admin_url)
    name = f"t_{request.node.name[:40].lower()}_{time.monotonic_ns() % 10**6}"
    name = "".join(c if c.isalnum() else "_" for c in name)
    url = postgres.create_database(admin, name)
    engine = make_engine(
        url.render_as_string(hide_password=False), lock_timeout_seconds=PATIENT_LOCK_SECONDS
    )
    create_schema(engine)
    yield engine
    engine.dispose()
    postgres.drop_database(admin, name)


# --- the app's side: the real OpenAI SDK, instrumented, on a canned transport -----------------


def instrumented(recorder: Recorder) -> openai.OpenAI:
    body = json.dumps(COMPLETION).encode()

    def answer(request: httpx2.Request) -> httpx2.Response:
        headers = {"content-type": "application/json", "x-request-id": "req_1"}
        return httpx2.Response(200, content=body, headers=headers)

    client = openai.OpenAI(
        api_key="sk-test",
        base_url="http://api.openai.test/v1",
        http_client=httpx2.Client(transport=httpx2.MockTransport(answer)),
        max_retries=0,
    )
    return instrument(client, recorder=recorder, controls=False)


def make_calls(client: openai.OpenAI, count: int, over_seconds: float) -> None:
    """`count` chat completions spread evenly over `over_seconds` (in bursts of 100)."""
    started = time.monotonic()
    for burst in range(0, count, 100):
        for _ in range(min(100, count - burst)):
            client.chat.completions.create(model="gpt-4.1", messages=CHAT)
        due = started + over_seconds * (burst + 100) / count
        time.sleep(max(0.0, due - time.monotonic()))


def counts(engine: Engine) -> tuple[int, int, int, int]:
    """Rows, distinct call ids, and the calls the usage and latency rollups count."""
    with engine.connect() as connection:
        rows, distinct = connection.execute(
            text("SELECT count(*), count(DISTINCT call_id) FROM llm_calls")
        ).one()
        usage = connection.execute(text("SELECT coalesce(sum(calls), 0) FROM usage_rollup"))
        latency = connection.execute(text("SELECT coalesce(sum(calls), 0) FROM latency_rollup"))
        return int(rows), int(distinct), int(usage.scalar_one()), int(latency.scalar_one())


def outcome(name: str) -> float:
    value = REGISTRY.get_sample_value("pagerloop_instrumentation_records_total", {"outcome": name})
    return value or 0.0


def record(i: int = 0, **fields: Any) -> CallRecord:
    values: dict[str, Any] = {
        "ts": datetime.now(UTC) - timedelta(seconds=i % 120),
        "model": "gpt-4.1",
        "status": "success",
        "latency_ms": 100.0 + i,
        "input_tokens": 10,
        "output_tokens": 5,
        "cost_usd": 0.001,
        **fields,
    }
    return CallRecord(**values)


@contextlib.contextmanager
def sqlite_write_lock(engine: Engine) -> Iterator[None]:
    """Another connection holds SQLite's write lock (a long transaction elsewhere)."""
    holder = sqlite3.connect(str(engine.url.database), timeout=0)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        holder.rollback()
        holder.close()


def losses_logged(caplog: pytest.LogCaptureFixture, words: str) -> int:
    return sum(
        1
        for r in caplog.records
        if r.name == "pagerloop_sdk.recorder" and r.levelno >= logging.ERROR and words in r.message
    )


# --- (a) a store outage while the app keeps calling ----------------------------------------


def test_postgres_down_60_s_while_10000_calls_are_made(
    cluster: tuple[Cluster, str], pg: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    own, _ = cluster
    # Memory only (no spool): the queue holds the outage. Backoff capped at 2 s, not 30 s, so
    # that the test does not wait half a minute for the retry after PostgreSQL is back.
    recorder = Recorder(StoreSink(pg), quality_sample_rate=0.1, retry_cap=2.0)
    client = instrumented(recorder)
    try:
        own.halt()
        down_at = time.monotonic()
        make_calls(client, 10_000, over_seconds=55)
        time.sleep(max(0.0, down_at + 60 - time.monotonic()))
        during = recorder.stats()
        own.resume()
        assert recorder.flush(timeout=30), recorder.stats()
    finally:
        recorder.close()
    rows, distinct, usage, latency = counts(pg)
    stats = recorder.stats()
    ledger.record(
        "PostgreSQL down 60 s during SDK ingest (10,000 calls)",
        runs=10_000,
        records_lost=10_000 - distinct,
    )
    assert (during.written, during.queued) == (0, 10_000)  # all kept while it was down
    assert (rows, distinct, usage, latency) == (10_000, 10_000, 10_000, 10_000)
    assert (stats.submitted, stats.written, stats.dropped, stats.failed) == (10_000,) * 2 + (0, 0)
    assert losses_logged(caplog, "LLM call records") == 0
    with pg.connect() as connection:  # the sampled quality scores: once each
        scored = connection.execute(
            text("SELECT count(*), count(DISTINCT call_id) FROM quality_scores")
        ).one()
    assert scored[0] == scored[1] > 0


def test_sqlite_write_lock_held_10_s_while_2000_calls_are_made(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'stores.db'}", lock_timeout_seconds=0.2)
    create_schema(engine)
    recorder = Recorder(StoreSink(engine), retry_cap=1.0)
    client = instrumented(recorder)
    try:
        with sqlite_write_lock(engine):
            make_calls(client, 2_000, over_seconds=8)
            time.sleep(2)
            assert recorder.stats().written == 0
        assert recorder.flush(timeout=20), recorder.stats()
    finally:
        recorder.close()
    rows, distinct, usage, latency = counts(engine)
    ledger.record(
        "SQLite write lock held 10 s during SDK ingest (2,000 calls)",
        runs=2_000,
        records_lost=2_000 - distinct,
    )
    assert (rows, distinct, usage, latency) == (2_000,) * 4


# --- (b) the spool: past the queue, and across a restart of the app -------------------------


def settled_stats(
    recorder: Recorder, *, quiet: float = 0.3, timeout: float = 10.0
) -> RecorderStats:
    """The recorder's stats once its threads have stopped moving records (for `quiet` s)."""
    deadline = time.monotonic() + timeout
    last = recorder.stats()
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = recorder.stats()
        if now == last:
            return now
        last = now
    return last


def test_a_small_queue_spools_through_an_outage_and_the_next_recorder_writes_it_once(
    cluster: tuple[Cluster, str], pg: Engine, tmp_path: Path
) -> None:
    own, _ = cluster
    spool = tmp_path / "spool"
    first = Recorder(
        StoreSink(pg), max_queue=1_000, batch_size=200, spool_dir=spool, flush_interval=0.05
    )
    client = instrumented(first)
    own.halt()
    try:
        make_calls(client, 5_000, over_seconds=10)  # 5x the queue
        during = settled_stats(first)  # the spooler has written its last file
        first.close()  # the app exits while the store is down: the rest goes to the spool
    finally:
        own.resume()
    after = first.stats()
    assert during.spooled >= 3_000, during
    assert during.queued <= 1_000, during
    assert (after.dropped, after.failed, after.written, after.spooled) == (0, 0, 0, 5_000)
    in_files = [int(path.stem.rsplit("-", 1)[1]) for path in spool.glob("*.jsonl")]
    assert sum(in_files) == 5_000, in_files
    assert max(in_files) <= 1_000 // 2, in_files  # a file holds half the queue at most
    assert counts(pg)[0] == 0

    second = Recorder(StoreSink(pg), spool_dir=spool)  # the app again: replays on its own
    try:
        assert second.flush(timeout=30), second.stats()
    finally:
        second.close()
    assert counts(pg) == (5_000,) * 4
    assert (second.stats().written, second.stats().spooled) == (5_000, 0)
    assert list(spool.iterdir()) == []


def test_a_spool_replayed_twice_writes_nothing_twice(store: Engine, tmp_path: Path) -> None:
    """Two processes replaying the same file (or a replay whose delete was lost) are safe."""
    spool = tmp_path / "spool"
    records = [record(i) for i in range(300)]
    keeper = Recorder(StoreSink(store), spool_dir=spool)
    assert keeper._spool is not None
    assert keeper._spool.put(records, [])
    copy = next(spool.glob("*.jsonl"))
    duplicate = copy.with_name(copy.name.replace("-0-300", "-1-300"))
    duplicate.write_bytes(copy.read_bytes())
    replayer = Recorder(StoreSink(store), spool_dir=spool)
    try:
        assert replayer.flush(timeout=20)
    finally:
        replayer.close()
        keeper.close()
    assert counts(store) == (300,) * 4
    assert list(spool.iterdir()) == []


# --- (c) idempotent ingest: a batch sent again writes nothing twice ----------------------------


def rollups(engine: Engine) -> list[tuple[Any, ...]]:
    with engine.connect() as connection:
        usage = connection.execute(
            text("SELECT * FROM usage_rollup ORDER BY minute, model, feature, team, environment")
        ).all()
        latency = connection.execute(
            text("SELECT * FROM latency_rollup ORDER BY minute, model, feature, bucket")
        ).all()
    return [tuple(row) for row in usage + latency]


def sums(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The rollup rows without their minute (SQLite and PostgreSQL spell it differently)."""
    return [tuple(round(v, 6) if isinstance(v, float) else v for v in row[1:]) for row in rows]


def test_a_retried_batch_writes_nothing_twice_and_rollups_count_once(
    store: Engine, tmp_path: Path
) -> None:
    batch = [record(i, feature=f"f{i % 3}") for i in range(200)]
    batch[7].source = "cache"  # a cache hit: in the call log, never in the rollups
    assert write_calls(store, batch) == 200
    once = rollups(store)
    assert write_calls(store, batch) == 0  # the client retried after a timeout
    assert rollups(store) == once
    more = [record(1000 + i, feature="f0") for i in range(50)]
    assert write_calls(store, batch[100:] + more) == 50  # half seen, half new
    assert counts(store)[:2] == (250, 250)
    assert counts(store)[2:] == (249, 249)  # the cache hit is not counted

    reference = make_engine(f"sqlite:///{tmp_path / 'reference.db'}")
    create_schema(reference)
    write_calls(reference, batch + more)  # the same calls, each written once
    assert sums(rollups(store)) == sums(rollups(reference))
    reference.dispose()


def test_scorer_verdicts_are_kept_once_and_feedback_each_time(store: Engine) -> None:
    calls = [record(i) for i in range(3)]
    write_calls(store, calls)
    scorer = [
        ScoreRecord(call_id=c.call_id, ts=c.ts, source="scorer", score=0.5, model="gpt-4.1")
        for c in calls
    ]
    assert write_scores(store, scorer) == 3
    assert write_scores(store, scorer + scorer[:1]) == 0  # a retried batch
    vote = ScoreRecord(call_id=calls[0].call_id, ts=calls[0].ts, source="feedback", score=1.0)
    assert write_scores(store, [vote]) == 1
    assert write_scores(store, [vote]) == 1  # a user may vote twice: no natural key
    with store.connect() as connection:
        stored = connection.execute(text("SELECT count(*) FROM quality_scores")).scalar_one()
        rolled = connection.execute(text("SELECT sum(scores) FROM quality_rollup")).scalar_one()
    assert (stored, rolled) == (5, 5)


class AnswerLostOnce:
    """The store commits the first write, then the connection dies before the answer."""

    def __init__(self, engine: Engine) -> None:
        self.store = StoreSink(engine)
        self.lost = False

    def write(self, calls: Sequence[CallRecord], scores: Sequence[ScoreRecord]) -> None:
        self.store.write(calls, scores)
        if not self.lost:
            self.lost = True
            raise OperationalError("COMMIT", None, ConnectionResetError("connection reset"))


def test_a_write_whose_answer_was_lost_is_retried_without_a_duplicate(store: Engine) -> None:
    recorder = Recorder(AnswerLostOnce(store), retry_base=0.05, flush_interval=0.05)
    for i in range(500):
        recorder.enqueue(record(i))
    try:
        assert recorder.flush(timeout=20)
    finally:
        recorder.close()
    assert counts(store) == (500,) * 4
    assert recorder.stats().written == 500


def api_for(env: WorkflowEnvironment, engine: Engine) -> httpx.AsyncClient:
    settings = Settings(_env_file=None, ingest_api_keys=KEY, user_hash_salt="s")  # type: ignore[call-arg]
    return api_client(settings, engine, env.client)


def otlp_export(spans: int) -> bytes:
    export = ExportTraceServiceRequest()
    scope = export.resource_spans.add().scope_spans.add()
    start = time.time_ns() - 10**9
    for i in range(spans):
        span = scope.spans.add()
        span.trace_id = bytes.fromhex("5b8efff798038103d269b633813fc60c")
        span.span_id = (i + 1).to_bytes(8, "big")
        span.name = "chat gpt-4.1"
        span.kind = 3  # CLIENT
        span.start_time_unix_nano = start + i
        span.end_time_unix_nano = start + i + 250_000_000
        attributes = {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": "gpt-4.1",
            "gen_ai.usage.input_tokens": 40,
            "gen_ai.usage.output_tokens": 8,
        }
        for key, value in attributes.items():
            if isinstance(value, str):
                span.attributes.append(KeyValue(key=key, value=AnyValue(string_value=value)))
            else:
                span.attributes.append(KeyValue(key=key, value=AnyValue(int_value=value)))
    return export.SerializeToString()


async def test_a_resent_ingest_batch_and_otlp_export_write_nothing_twice(
    time_skipping_env: WorkflowEnvironment, store: Engine
) -> None:
    calls = [
        {"model": "gpt-4.1", "status": "success", "latency_ms": 12.5, "call_id": f"{i:032x}"}
        for i in range(1, 51)
    ]
    export = otlp_export(20)
    protobuf = {**AUTH, "content-type": "application/x-protobuf"}
    async with api_for(time_skipping_env, store) as api:
        first = await api.post("/v1/llm-calls", json={"calls": calls}, headers=AUTH)
        retried = await api.post("/v1/llm-calls", json={"calls": calls}, headers=AUTH)
        traces = [await api.post("/v1/traces", content=export, headers=protobuf) for _ in "ab"]
    assert (first.status_code, first.json()) == (202, {"accepted": 50, "duplicates": 0})
    assert (retried.status_code, retried.json()) == (202, {"accepted": 50, "duplicates": 50})
    assert [t.status_code for t in traces] == [200, 200]
    assert counts(store) == (70,) * 4
    with store.connect() as connection:
        otlp_ids = connection.execute(
            text("SELECT call_id FROM llm_calls WHERE source = 'otlp'")
        ).scalars()
        assert all(len(call_id) == 32 for call_id in otlp_ids)


# --- (d) what is finally lost is counted, and logged once ------------------------------------


def test_a_full_queue_without_a_spool_drops_counts_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'stores.db'}", lock_timeout_seconds=0.1)
    create_schema(engine)
    recorder = Recorder(StoreSink(engine), max_queue=100, batch_size=50, flush_interval=0.05)
    dropped_before = outcome("dropped")
    try:
        with sqlite_write_lock(engine):
            for i in range(400):
                recorder.enqueue(record(i))
                if i % 50 == 0:
                    time.sleep(0.05)
            time.sleep(0.3)
        assert recorder.flush(timeout=20)
    finally:
        recorder.close()
    stats = recorder.stats()
    assert stats.dropped >= 250  # the queue holds 100, a held batch 50 more
    assert stats.submitted + stats.dropped == 400
    assert outcome("dropped") - dropped_before == stats.dropped
    assert counts(engine)[:2] == (stats.submitted, stats.submitted)
    assert losses_logged(caplog, "the queue is full") == 1


def test_a_record_the_store_refuses_is_isolated_counted_and_the_rest_written(
    store: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    failed_before = outcome("failed")
    recorder = Recorder(StoreSink(store), flush_interval=0.05)
    for i in range(1_000):
        poison = {"input_tokens": 2**64} if i in (10, 777) else {}  # no column takes it
        recorder.enqueue(record(i, **poison))
    try:
        assert recorder.flush(timeout=30)
    finally:
        recorder.close()
    stats = recorder.stats()
    assert (stats.written, stats.failed, stats.dropped) == (998, 2, 0)
    assert outcome("failed") - failed_before == 2
    assert counts(store) == (998,) * 4
    assert losses_logged(caplog, "the store refuses them") == 1


def test_a_full_spool_drops_counts_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'stores.db'}", lock_timeout_seconds=0.1)
    create_schema(engine)
    recorder = Recorder(
        StoreSink(engine),
        max_queue=300,
        batch_size=100,
        spool_dir=tmp_path / "spool",
        spool_max_bytes=60_000,  # about two batches of 100
        flush_interval=0.05,
    )
    try:
        with sqlite_write_lock(engine):
            for i in range(1_000):
                recorder.enqueue(record(i))
                if i % 50 == 0:
                    time.sleep(0.05)
            time.sleep(0.3)
            recorder.close()  # the queue cannot go to the spool either
    finally:
        recorder.close()
    stats = recorder.stats()
    assert 100 <= stats.spooled <= 300
    assert stats.spooled + stats.dropped == 1_000
    assert (stats.written, stats.failed, stats.queued) == (0, 0, 0)
    assert losses_logged(caplog, "the queue is full and so is the spool") == 1
    assert losses_logged(caplog, "still undelivered at close, and the spool is full") == 1


# --- the API while its PostgreSQL is down ----------------------------------------------------


async def test_the_api_answers_503_with_retry_after_within_2_s_while_postgres_is_down(
    time_skipping_env: WorkflowEnvironment, cluster: tuple[Cluster, str], pg: Engine
) -> None:
    own, _ = cluster
    url = pg.url.render_as_string(hide_password=False)
    served = worker.api_engine(Settings(_env_file=None, database_url=url))  # type: ignore[call-arg]
    body = {"calls": [{"model": "gpt-4.1", "status": "success", "latency_ms": 5}]}
    try:
        async with api_for(time_skipping_env, served) as api:
            assert (await api.post("/v1/llm-calls", json=body, headers=AUTH)).status_code == 202
            own.halt()  # the API's pooled connections now lead to a stopped server
            try:
                started = time.monotonic()
                down = await api.post("/v1/llm-calls", json=body, headers=AUTH)
                took = time.monotonic() - started
                export = await api.post(
                    "/v1/traces",
                    content=otlp_export(1),
                    headers={**AUTH, "content-type": "application/x-protobuf"},
                )
            finally:
                own.resume()
            back = await api.post("/v1/llm-calls", json=body, headers=AUTH)
    finally:
        served.dispose()
    assert down.status_code == 503, down.text
    assert int(down.headers["Retry-After"]) > 0
    assert took < 2.0
    assert export.status_code == 503
    assert back.status_code == 202
    assert counts(pg)[0] == 2
