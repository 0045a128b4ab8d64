"""P2: call records per second the recorder's background writer sustains, into SQLite and
PostgreSQL.

The writer's whole work is timed, from the first record queued to `flush` returning: the log
level check, the batched insert of the call rows and the per-minute rollup upsert. Making the
record from the finished call happens on the caller's side (P1 counts it); its cost per record
is printed too.

    uv run python bench/p2_writer.py [--records 200000] [--postgres URL]

Targets: >= 100,000 records/s into SQLite, >= 50,000 records/s into PostgreSQL.
"""

from __future__ import annotations

import argparse
import gc
import random
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
from pagerloop_sdk.capture import PendingCall, finalize
from pagerloop_sdk.context import LLMContext
from pagerloop_sdk.pricing import DEFAULT_PRICES
from pagerloop_sdk.recorder import Recorder
from sqlalchemy.engine import make_url

from instrumentation.store_sink import StoreSink
from stores.engine import create_schema, make_engine

MODELS = ("gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "o4-mini", "o3")
FEATURES = ("chat", "summarizer", "classifier", "code_review", "search")
STATUSES = ("success",) * 95 + ("rate_limited", "rate_limited", "error", "timeout", "server_error")


def synthetic_calls(count: int, seed: int = 7) -> list[PendingCall]:
    rng = random.Random(seed)
    start = datetime.now(UTC) - timedelta(minutes=30)
    contexts = [
        LLMContext(feature=f, team="platform", environment="prod", user_id=f"user-{i}")
        for i, f in enumerate(FEATURES)
    ]
    calls = []
    for i in range(count):
        latency = rng.lognormvariate(0.5, 0.8)
        call = PendingCall(
            operation="chat",
            model=rng.choice(MODELS),
            started=0.0,
            ts=start + timedelta(milliseconds=i * 9),
            context=rng.choice(contexts),
            stream=True,
        )
        call.ended = latency
        call.first_token = latency * 0.3
        call.status = rng.choice(STATUSES)
        call.http_status = 200 if call.status == "success" else 429
        call.finish_reason = "stop"
        call.request_id = f"req_{rng.getrandbits(64):016x}"
        if call.status == "success":
            call.input_tokens = rng.randint(200, 8000)
            call.output_tokens = rng.randint(20, 2000)
            call.cached_input_tokens = 0
        calls.append(call)
    return calls


def finalize_cost(count: int) -> float:
    """Microseconds per record to make it from the finished call (the caller's side)."""
    calls = synthetic_calls(count)
    started = time.perf_counter()
    for call in calls:
        finalize(call, "salt", DEFAULT_PRICES)
    return (time.perf_counter() - started) / count * 1e6


def writer_rate(url: str, count: int) -> float:
    engine = make_engine(url)
    create_schema(engine)
    records = [finalize(c, "salt", DEFAULT_PRICES) for c in synthetic_calls(count)]
    # In an app the queue holds a few thousand records at a time; here all of them exist up
    # front, and the garbage collector would keep walking them. Take them out of its sight.
    gc.collect()
    gc.freeze()
    recorder = Recorder(StoreSink(engine), max_queue=count + 1, batch_size=10_000)
    started = time.perf_counter()
    for record in records:
        recorder.enqueue(record)
    assert recorder.flush(timeout=900), "the writer did not finish"
    elapsed = time.perf_counter() - started
    stats = recorder.stats()
    recorder.close()
    engine.dispose()
    gc.unfreeze()
    assert stats.written == count, stats
    return count / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument(
        "--postgres",
        default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
        help="a server where a throwaway database can be created",
    )
    args = parser.parse_args()

    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        results["SQLite"] = writer_rate(f"sqlite:///{folder}/bench.db", args.records)

    admin = make_url(args.postgres)
    name = f"pagerloop_bench_{uuid.uuid4().hex[:8]}"
    dsn = admin.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        url = admin.set(database=name).render_as_string(hide_password=False)
        results["PostgreSQL"] = writer_rate(url, args.records)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    targets = {"SQLite": 100_000, "PostgreSQL": 50_000}
    print(f"P2 background writer throughput ({args.records:,} call records, batches of 10,000)\n")
    print(f"{'store':<12} {'records/s':>12} {'target':>10}  verdict")
    for store, rate in results.items():
        verdict = "met" if rate >= targets[store] else "NOT met"
        print(f"{store:<12} {rate:>12,.0f} {targets[store]:>10,}  {verdict}")
    print(f"\nmaking a record on the caller's side: {finalize_cost(50_000):.1f} us each")


if __name__ == "__main__":
    main()
