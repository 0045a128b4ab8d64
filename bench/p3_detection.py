"""P3: time to evaluate every signal for every scope, with 1,000,000 calls in the window and
10,000,000 in history, on SQLite and on PostgreSQL, beside the seed's MetricsCollector on the
same window's calls.

What is timed for pagerloop is what the detector does each interval: the store queries of the
window (`stores.aggregates.window_aggregates`) and the rule evaluation of all scopes
(`detectors.evaluation.evaluate`; global, 5 models, 5 features). The seed's approach keeps
every sample in memory and sorts them for percentiles; it is given the same window's calls
(without its 10,000-sample cap, which would drop 99 % of them) and timed on
`evaluate_alerts()` plus the latency percentiles, once per scope.

It also shows that the time follows the window, not the history: the same evaluation with half
the history, and with a 60-minute window.

    uv run python -m bench.p3_detection [--window-calls 1000000] [--history-calls 10000000]

Targets: <= 250 ms, >= 20x faster than the seed's approach.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
from pagerloop_sdk.pricing import DEFAULT_PRICES
from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from bench.seed_collector import SeedMetricsCollector
from detectors.config import DetectorRules
from detectors.evaluation import evaluate
from stores.aggregates import window_aggregates
from stores.engine import create_schema, make_engine
from stores.llm_calls import CallRecord
from stores.quality import ScoreRecord, write_scores
from stores.writer import write_calls

MODELS = ("gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "o3", "o4-mini")
FEATURES = ("chat", "summarizer", "classifier", "code_review", "search")
STATUSES = ("success",) * 96 + ("error", "rate_limited", "timeout", "server_error")
WINDOW_SECONDS = 300
QUALITY_SAMPLE = 0.1
BATCH = 10_000


def calls(count: int, start: datetime, end: datetime, seed: int) -> Iterator[CallRecord]:
    rng = random.Random(seed)
    span = (end - start).total_seconds()
    for i in range(count):
        model, feature = rng.choice(MODELS), rng.choice(FEATURES)
        tokens_in, tokens_out = rng.randint(200, 6000), rng.randint(20, 1500)
        status = rng.choice(STATUSES)
        yield CallRecord(
            ts=start + timedelta(seconds=span * i / count),
            model=model,
            status=status,
            latency_ms=rng.lognormvariate(7.0, 0.8),  # median about 1.1 s
            feature=feature,
            team="platform",
            environment="prod",
            input_tokens=tokens_in,
            output_tokens=tokens_out,
            cached_input_tokens=0,
            cost_usd=DEFAULT_PRICES.cost_usd(model, tokens_in, tokens_out),
        )


def load(engine: Engine, count: int, start: datetime, end: datetime, seed: int) -> list[CallRecord]:
    """Write `count` calls (and a 10 % sample of quality scores) spread over [start, end)."""
    rng = random.Random(seed + 1)
    batch: list[CallRecord] = []
    kept: list[CallRecord] = []
    keep = end - start <= timedelta(seconds=WINDOW_SECONDS)
    for record in calls(count, start, end, seed):
        batch.append(record)
        if len(batch) == BATCH:
            _write(engine, batch, rng)
            if keep:
                kept.extend(batch)
            batch = []
    if batch:
        _write(engine, batch, rng)
        if keep:
            kept.extend(batch)
    return kept


def _write(engine: Engine, batch: list[CallRecord], rng: random.Random) -> None:
    write_calls(engine, batch)
    scores = [
        ScoreRecord(
            r.call_id, r.ts, "scorer", rng.betavariate(8, 2), model=r.model, feature=r.feature
        )
        for r in batch
        if rng.random() < QUALITY_SAMPLE
    ]
    write_scores(engine, scores)


def time_pagerloop(engine: Engine, end: datetime, window: int, runs: int = 7) -> tuple[float, int]:
    timings, scopes = [], 0
    for _ in range(runs):
        started = time.perf_counter()
        aggregates = window_aggregates(engine, end, window)
        evaluation = evaluate(DetectorRules(), aggregates, {}, daily_budget_usd=50_000)
        timings.append(time.perf_counter() - started)
        scopes = len(aggregates.scopes())
        assert evaluation.verdicts
    return statistics.median(timings) * 1000, scopes


def time_seed(window_calls: list[CallRecord], end: datetime) -> float:
    """The seed's collectors, one per scope, fed the window's calls; then evaluation timed."""
    collectors: dict[str, SeedMetricsCollector] = {"global": SeedMetricsCollector(WINDOW_SECONDS)}
    for record in window_calls:
        for scope in ("global", f"model:{record.model}", f"feature:{record.feature}"):
            collector = collectors.setdefault(scope, SeedMetricsCollector(WINDOW_SECONDS))
            collector.record_call(
                record.ts.timestamp(),
                record.latency_ms / 1000,
                (record.input_tokens or 0) + (record.output_tokens or 0),
                record.cost_usd or 0.0,
                record.status != "success",
            )
    now = end.timestamp()
    started = time.perf_counter()
    for collector in collectors.values():
        collector.get_latency_percentiles(now)
        collector.evaluate_alerts(now)
    return (time.perf_counter() - started) * 1000


def run_store(url: str, window_calls: int, history_calls: int) -> dict[str, float]:
    engine = make_engine(url)
    create_schema(engine)
    end = datetime.now(UTC).replace(microsecond=0)
    window_start = end - timedelta(seconds=WINDOW_SECONDS)
    history_start = end - timedelta(days=30)
    half = history_calls // 2
    started = time.perf_counter()
    load(engine, half, history_start, end - timedelta(days=15), seed=1)
    kept = load(engine, window_calls, window_start, end, seed=2)
    load_seconds = time.perf_counter() - started
    gc.collect()
    figures: dict[str, float] = {}
    figures["half history"], scopes = time_pagerloop(engine, end, WINDOW_SECONDS)
    started = time.perf_counter()
    load(
        engine, history_calls - half, end - timedelta(days=15), window_start - timedelta(hours=1), 3
    )
    load_seconds += time.perf_counter() - started
    figures["pagerloop"], _ = time_pagerloop(engine, end, WINDOW_SECONDS)
    figures["60 min window"], _ = time_pagerloop(engine, end, 3600)
    figures["seed"] = time_seed(kept, end)
    figures["scopes"] = scopes
    figures["load s"] = load_seconds
    engine.dispose()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window-calls", type=int, default=1_000_000)
    parser.add_argument("--history-calls", type=int, default=10_000_000)
    parser.add_argument(
        "--postgres",
        default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
        help="a server where a throwaway database can be created",
    )
    args = parser.parse_args()

    results = {}
    with tempfile.TemporaryDirectory() as folder:
        results["SQLite"] = run_store(
            f"sqlite:///{folder}/p3.db", args.window_calls, args.history_calls
        )
    admin = make_url(args.postgres)
    name = f"pagerloop_p3_{uuid.uuid4().hex[:8]}"
    dsn = admin.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        url = admin.set(database=name).render_as_string(hide_password=False)
        results["PostgreSQL"] = run_store(url, args.window_calls, args.history_calls)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    print(
        f"P3 detection: every signal of every scope, {args.window_calls:,} calls in a "
        f"{WINDOW_SECONDS}s window, {args.history_calls:,} in 30 days of history "
        "(milliseconds, median of 7)\n"
    )
    header = (
        "store",
        "scopes",
        "pagerloop",
        "seed's way",
        "speed-up",
        "half history",
        "60 min window",
    )
    print(f"{header[0]:<11} {header[1]:>6} {header[2]:>10} {header[3]:>11} {header[4]:>9} "
          f"{header[5]:>13} {header[6]:>14}")  # fmt: skip
    for store, f in results.items():
        speedup = f["seed"] / f["pagerloop"]
        print(
            f"{store:<11} {int(f['scopes']):>6} {f['pagerloop']:>10.1f} {f['seed']:>11.0f} "
            f"{speedup:>8.0f}x {f['half history']:>13.1f} {f['60 min window']:>14.1f}"
        )
    for store, f in results.items():
        met = f["pagerloop"] <= 250 and f["seed"] / f["pagerloop"] >= 20
        print(
            f"{store}: <= 250 ms and >= 20x the seed's way: {'met' if met else 'NOT met'} "
            f"(data loaded in {f['load s']:.0f}s)"
        )


if __name__ == "__main__":
    main()
