"""P4: the detector's window at high cardinality: 1k, 10k, 100k and 1M distinct features in a
5-minute window, one busy feature ("checkout", the most calls, 50 % errors) breaching among
them, on SQLite and on PostgreSQL.

For each size it prints what the detector does each interval, folded to the top
`--max-scopes` names per dimension: the time of the store query plus the rule evaluation
(median of 3), the size of the serialised activity result, and whether the breach on checkout
is found. Beside it, the baseline: the per-(model, feature)-cell result the detector returned
before the folding, built the same way from an unfolded query (up to 100k features; at 1M it
is extrapolated from 100k, marked ~), and whether it is over Temporal's 2 MB payload limit.

The features accumulate: each size adds the new names' calls to the same store.

    uv run python -m bench.p7_cardinality [--sizes 1000,10000,100000,1000000] [--max-scopes 50]
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import psycopg
from sqlalchemy import Engine, func, select
from sqlalchemy.engine import make_url
from temporalio.contrib.pydantic import pydantic_data_converter

from detectors.config import DetectorRules
from detectors.evaluation import evaluate
from detectors.rules import RuleState
from domain.aggregates import Aggregate, WindowAggregates
from domain.usage import SIGNAL_COUNTERS
from stores.aggregates import window_aggregates
from stores.engine import create_schema, make_engine
from stores.llm_calls import CallRecord, LatencyRollup, UsageRollup, utc
from stores.quality import QualityScore, ScoreRecord, write_scores
from stores.writer import write_calls

MODELS = ("gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "o3", "o4-mini")
BUSY = "checkout"
BUSY_CALLS = 5_000
WINDOW_SECONDS = 300
PAYLOAD_LIMIT = 2 * 1024 * 1024
BASELINE_UP_TO = 100_000  # beyond, the per-cell result is too big to build here
BATCH = 10_000
QUALITY_SAMPLE = 0.1


def size(result: WindowAggregates) -> int:
    [payload] = pydantic_data_converter.payload_converter.to_payloads([result])
    return payload.ByteSize()


def new_calls(first: int, last: int, end: datetime, busy: bool) -> Iterator[CallRecord]:
    """One call for each feature numbered [first, last); with `busy`, checkout's calls too."""
    rng = random.Random(first)
    start = end - timedelta(seconds=WINDOW_SECONDS - 10)

    def record(feature: str, status: str) -> CallRecord:
        return CallRecord(
            ts=start + timedelta(seconds=rng.uniform(0, WINDOW_SECONDS - 15)),
            model=rng.choice(MODELS),
            status=status,
            latency_ms=rng.lognormvariate(6.5, 0.7),
            feature=feature,
            input_tokens=rng.randint(100, 3000),
            output_tokens=rng.randint(10, 800),
            cost_usd=0.001,
        )

    if busy:
        for i in range(BUSY_CALLS):
            yield record(BUSY, "error" if i % 2 else "success")
    for i in range(first, last):
        yield record(f"feature-{i:07d}", "success")


def load(engine: Engine, records: Iterator[CallRecord]) -> None:
    rng = random.Random(1)
    batch: list[CallRecord] = []
    for call in records:
        batch.append(call)
        if len(batch) == BATCH:
            _write(engine, batch, rng)
            batch = []
    if batch:
        _write(engine, batch, rng)


def _write(engine: Engine, batch: list[CallRecord], rng: random.Random) -> None:
    write_calls(engine, batch)
    sample = [r for r in batch if rng.random() < QUALITY_SAMPLE]
    write_scores(
        engine,
        [ScoreRecord(r.call_id, r.ts, "scorer", rng.betavariate(8, 2), model=r.model,
                     feature=r.feature) for r in sample],
    )  # fmt: skip


def per_cell(engine: Engine, end: datetime) -> WindowAggregates:
    """The result as the detector's activity returned it before the folding: one Aggregate per
    (model, feature) cell of the window (the baseline of past hours is empty here)."""
    first_minute = (end - timedelta(seconds=WINDOW_SECONDS)).replace(second=0, microsecond=0)
    cells: dict[str, dict[str, Aggregate]] = {}

    def cell(model: str, feature: str) -> Aggregate:
        return cells.setdefault(model, {}).setdefault(feature, Aggregate())

    u = UsageRollup.__table__.c  # type: ignore[attr-defined]
    lat = LatencyRollup.__table__.c  # type: ignore[attr-defined]
    s = QualityScore.__table__.c  # type: ignore[attr-defined]
    usage = (
        select(u.model, u.feature, *(func.sum(u[n]) for n in SIGNAL_COUNTERS))
        .where(u.minute >= first_minute, u.minute < end)
        .group_by(u.model, u.feature)
    )
    latency = (
        select(lat.model, lat.feature, lat.bucket, func.sum(lat.calls))
        .where(lat.minute >= first_minute, lat.minute < end)
        .group_by(lat.model, lat.feature, lat.bucket)
    )
    quality = (
        select(s.model, s.feature, func.count(), func.sum(s.score))
        .where(s.ts > end - timedelta(seconds=WINDOW_SECONDS), s.ts <= end)
        .group_by(s.model, s.feature)
    )
    with engine.connect() as connection:
        for model, feature, *sums in connection.execute(usage):
            target = cell(model, feature)
            for name, value in zip(SIGNAL_COUNTERS, sums, strict=True):
                setattr(target, name, type(getattr(target, name))(value or 0))
        for model, feature, bucket, calls in connection.execute(latency):
            cell(model, feature).latency_histogram[int(bucket)] = int(calls)
        for model, feature, count, total in connection.execute(quality):
            target = cell(model or "", feature or "")
            target.quality_count, target.quality_sum = int(count), float(total or 0)
    return WindowAggregates(utc(end), (end - first_minute).total_seconds(), cells)


@dataclass
class Row:
    features: int
    load_s: float
    eval_ms: float
    size: int
    detected: bool
    scopes: int
    old_size: int | None
    old_estimated: bool = False


def measure(engine: Engine, end: datetime, features: int, max_scopes: int) -> Row:
    timings, states = [], dict[str, RuleState]()
    size_now, detected, scopes = 0, False, 0
    for _ in range(3):
        started = time.perf_counter()
        result = window_aggregates(engine, end, WINDOW_SECONDS, max_scopes=max_scopes)
        evaluation = evaluate(DetectorRules(), result, states, daily_budget_usd=1e9)
        timings.append(time.perf_counter() - started)
        states = evaluation.rule_states
        size_now, scopes = size(result), len(result.by_scope)
        detected = any(
            f.trigger == "error_rate" and f.scope == f"feature:{BUSY}" for f in evaluation.firing
        )
    old = size(per_cell(engine, end)) if features <= BASELINE_UP_TO else None
    return Row(features, 0.0, statistics.median(timings) * 1000, size_now, detected, scopes, old)


def run_store(url: str, sizes: list[int], max_scopes: int) -> list[Row]:
    engine = make_engine(url)
    create_schema(engine)
    end = datetime.now(UTC).replace(microsecond=0)
    rows: list[Row] = []
    loaded = 0
    for target in sizes:
        started = time.perf_counter()
        load(engine, new_calls(loaded, target, end, busy=loaded == 0))
        load_s = time.perf_counter() - started
        loaded = target
        row = measure(engine, end, target, max_scopes)
        row.load_s = load_s
        rows.append(row)
        print(f"  {url.split(':')[0]}: {target:,} features loaded in {load_s:.0f}s", flush=True)
    engine.dispose()
    measured = [r for r in rows if r.old_size is not None]
    for row in rows:
        if row.old_size is None and measured:
            last = measured[-1]
            assert last.old_size is not None
            row.old_size = last.old_size * row.features // last.features
            row.old_estimated = True
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000,1000000")
    parser.add_argument("--max-scopes", type=int, default=50)
    parser.add_argument(
        "--postgres",
        default="postgresql+psycopg://postgres@127.0.0.1:5432/test",
        help="a server where a throwaway database can be created",
    )
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))

    started = time.perf_counter()
    results: dict[str, list[Row]] = {}
    with tempfile.TemporaryDirectory() as folder:
        results["SQLite"] = run_store(f"sqlite:///{folder}/p4.db", sizes, args.max_scopes)
    admin = make_url(args.postgres)
    name = f"pagerloop_p4_{uuid.uuid4().hex[:8]}"
    dsn = admin.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        url = admin.set(database=name).render_as_string(hide_password=False)
        results["PostgreSQL"] = run_store(url, sizes, args.max_scopes)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    print(
        f"\nP7 cardinality: N distinct features in a {WINDOW_SECONDS}s window plus {BUSY!r} "
        f"({BUSY_CALLS:,} calls, 50 % errors), folded to the top {args.max_scopes} per "
        "dimension; evaluation = store query + evaluate (ms, median of 3)\n"
    )
    print(f"{'store':<11} {'features':>10} {'load s':>7} {'eval ms':>9} {'scopes':>6} "
          f"{'result B':>10} {'breach':>7} {'per-cell B':>13} {'> 2 MB':>7}")  # fmt: skip
    for store, rows in results.items():
        for r in rows:
            old = f"{'~' if r.old_estimated else ''}{r.old_size:,}" if r.old_size else "-"
            over = "yes" if r.old_size and r.old_size > PAYLOAD_LIMIT else "no"
            print(
                f"{store:<11} {r.features:>10,} {r.load_s:>7.0f} {r.eval_ms:>9.1f} {r.scopes:>6} "
                f"{r.size:>10,} {'found' if r.detected else 'MISSED':>7} {old:>13} {over:>7}"
            )
    print(f"\ntotal {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
