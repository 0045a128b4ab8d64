"""P8: call records per second from the SDK to PostgreSQL through the API, end to end.

The SDK's recorder (as `instrument()` makes it: HttpSink, gzipped JSON batches to
`POST /v1/llm-calls`) in this process; the API as `pagerloop serve` builds it in uvicorn
processes of their own (`--workers`), over a throwaway PostgreSQL database. The records are
P2's synthetic calls (5 % errors, logged by the recorder), made up front; the time runs from the
first record queued until `flush()` returns (every batch answered 202: its rows committed), and
the rows are then counted in the database.

    uv run python bench/p8_ingest.py [--records 200000] [--workers 2] [--postgres URL]

Target: >= 50,000 records/s.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import uuid
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.p2_writer import synthetic_calls
from bench.stack import INGEST_KEY, api_process

TARGET = 50_000


def ingest_rate(
    url: str, count: int, workers: int, batch: int, concurrency: int
) -> tuple[float, int]:
    from pagerloop_sdk.capture import finalize
    from pagerloop_sdk.http_sink import HttpSink
    from pagerloop_sdk.pricing import DEFAULT_PRICES
    from pagerloop_sdk.recorder import Recorder

    with api_process(url, workers) as api:
        # Warm the API's workers (imports, connection pools) before the clock starts.
        warm = Recorder(HttpSink(api, INGEST_KEY))
        for call in synthetic_calls(workers * 50, seed=1):
            warm.submit(call)
        assert warm.flush(timeout=60), warm.stats()
        warm.close()
        records = [finalize(c, "salt", DEFAULT_PRICES) for c in synthetic_calls(count)]
        gc.collect()
        gc.freeze()  # as P2: the records made up front stay out of the collector's sight
        sink = HttpSink(api, INGEST_KEY, concurrency=concurrency)
        recorder = Recorder(sink, max_queue=count + 1, batch_size=batch)
        started = time.perf_counter()
        for record in records:
            recorder.enqueue(record)
        assert recorder.flush(timeout=900), recorder.stats()
        elapsed = time.perf_counter() - started
        stats = recorder.stats()
        recorder.close()
        gc.unfreeze()
    assert stats.written == count, stats
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM llm_calls").fetchone()
    rows = int(row[0]) if row else 0
    return (rows - workers * 50) / elapsed, rows - workers * 50


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--workers", type=int, default=2, help="uvicorn worker processes")
    parser.add_argument("--batch", type=int, default=10_000, help="the recorder's batch size")
    parser.add_argument(
        "--concurrency", type=int, default=4, help="HttpSink: requests of a batch in flight"
    )
    parser.add_argument(
        "--postgres",
        default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
        help="a server where a throwaway database can be created",
    )
    args = parser.parse_args()

    admin = make_url(args.postgres)
    name = f"pagerloop_bench_{uuid.uuid4().hex[:8]}"
    dsn = admin.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        url = admin.set(database=name).render_as_string(hide_password=False)
        rate, rows = ingest_rate(url, args.records, args.workers, args.batch, args.concurrency)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    print(
        f"P8 SDK -> API -> PostgreSQL ({args.records:,} call records, recorder batches of "
        f"{args.batch:,}, HttpSink requests of 2,000 gzipped, {args.concurrency} in flight; API: "
        f"uvicorn x {args.workers} workers; {os.cpu_count()} cores)\n"
    )
    verdict = "met" if rate >= TARGET else "NOT met"
    print(f"{'rows committed':<16} {'records/s':>12} {'target':>10}  verdict")
    print(f"{rows:<16,} {rate:>12,.0f} {TARGET:>10,}  {verdict}")


if __name__ == "__main__":
    main()
