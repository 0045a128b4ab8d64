"""The stores on SQLite and on a real PostgreSQL: same rows in, same answers out."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine
from sqlalchemy.exc import DataError
from sqlmodel import Session, SQLModel, select

from domain.histogram import RELATIVE_ERROR, bucket, exact_percentile, percentile
from stores import schema
from stores.aggregates import window_aggregates
from stores.email_ledger import record_sent, was_sent
from stores.llm_calls import CallRecord, LatencyRollup, LLMCall, UsageRollup, utc
from stores.quality import QualityScore, ScoreRecord, write_scores
from stores.retention import purge
from stores.writer import write_calls

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def call(seconds_ago: float, status: str = "success", **extra: object) -> CallRecord:
    fields: dict[str, object] = {"model": "gpt-4.1", "latency_ms": 100.0, **extra}
    return CallRecord(ts=NOW - timedelta(seconds=seconds_ago), status=status, **fields)  # type: ignore[arg-type]


def rows(engine: Engine) -> list[LLMCall]:
    with Session(engine) as session:
        return list(session.exec(select(LLMCall).order_by(LLMCall.id)))


def test_schema_matches_the_models(store: Engine) -> None:
    assert schema.current_revision(store) == schema.head_revision()
    with store.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), SQLModel.metadata)
    assert diff == []


def test_upgrade_is_idempotent(store: Engine) -> None:
    write_calls(store, [call(1)])
    schema.upgrade(store)
    assert len(rows(store)) == 1


def test_window_aggregates_cover_the_minutes_of_the_window(store: Engine) -> None:
    write_calls(
        store,
        [
            call(0.5, "error", model="gpt-4.1", feature="chat"),
            call(100, "rate_limited", model="gpt-4.1", feature="chat", input_tokens=10),
            call(299, "success", model="o3", feature="search", input_tokens=100, cost_usd=0.5),
            call(270, "timeout", model="o3"),  # 11:55:30
            call(330, "error", model="o3"),  # 11:54:30: before the window
            call(-30, "error", model="o3"),  # after the end
        ],
    )
    found = window_aggregates(store, NOW, 300)
    assert found.window_seconds == 300  # 11:55:00 to 12:00:00: five whole minutes
    # A partial minute at the start counts whole: the window covers the minutes it touches.
    assert window_aggregates(store, NOW - timedelta(seconds=15), 300).window_seconds == 345
    assert set(found.scopes(("model",))) == {"model:gpt-4.1", "model:o3"}
    everything = found.scope("global")
    assert (everything.calls, everything.errors, everything.rate_limited) == (4, 1, 1)
    assert (everything.timeouts, everything.successes) == (1, 1)
    assert everything.input_tokens == 110
    assert everything.cost_usd == pytest.approx(0.5)
    assert sum(everything.latency_histogram.values()) == 4
    assert found.scope("model:o3").calls == 2
    assert found.scope("feature:chat").calls == 2
    assert found.global_without(["model:gpt-4.1"]).calls == 2
    assert found.cost_today_usd == pytest.approx(0.5)


def test_quality_sums_for_the_window_and_the_baseline(store: Engine) -> None:
    recent = [
        ScoreRecord(f"c{i}", NOW - timedelta(seconds=i), "scorer", 0.4, model="o3")
        for i in range(5)
    ]
    history = [
        ScoreRecord(
            f"h{i}", NOW - timedelta(hours=3, minutes=i), "scorer", 0.8 + (i % 2) * 0.1, model="o3"
        )
        for i in range(40)
    ]
    write_scores(store, recent + history)
    found = window_aggregates(store, NOW, 300).scope("model:o3")
    assert (found.quality_count, found.quality_sum) == (5, pytest.approx(2.0))
    assert found.baseline_count == 40
    assert found.baseline_sum == pytest.approx(40 * 0.85)


def test_every_field_round_trips(store: Engine) -> None:
    record = call(
        0,
        operation="responses",
        response_model="gpt-4.1-2025-04-14",
        http_status=200,
        ttft_ms=12.5,
        input_tokens=10,
        output_tokens=20,
        cached_input_tokens=4,
        cost_usd=0.0123,
        feature="chat",
        team="platform",
        environment="prod",
        session_id="s1",
        user_hash="user_abc",
        error_type=None,
        retry_count=2,
        finish_reason="stop",
        request_id="req_1",
        trace_id="0af7651916cd43dd8448eb211c80319c",
        source="ingest",
        metadata={"prompt": "v2", "n": 3},
    )
    write_calls(store, [record])
    [row] = rows(store)
    stored = {name: getattr(row, name) for name in LLMCall.model_fields if name not in ("id",)}
    stored["metadata"] = stored.pop("metadata_")
    stored["ts"] = utc(stored["ts"])
    assert stored.pop("latency_bucket") == bucket(record.latency_ms)
    expected = {name: getattr(record, name) for name in record.__slots__}
    assert stored == expected


def test_any_time_zone_in_means_the_same_instant(store: Engine) -> None:
    tokyo = timezone(timedelta(hours=9))
    record = CallRecord(ts=NOW.astimezone(tokyo), model="m", status="error", latency_ms=1)
    write_calls(store, [record])
    assert window_aggregates(store, NOW + timedelta(seconds=1), 60).scope("global").calls == 1
    later = NOW.astimezone(tokyo) + timedelta(minutes=5)
    assert window_aggregates(store, later, 60).scope("global").calls == 0
    with Session(store) as session:
        assert utc(session.exec(select(LLMCall.ts)).one()) == NOW


def test_a_failing_batch_writes_nothing(store: Engine) -> None:
    first = call(1)
    write_calls(store, [first])
    with pytest.raises((OverflowError, DataError)):  # a value no store column takes
        write_calls(store, [call(2), call(3, input_tokens=2**64)])
    assert [row.call_id for row in rows(store)] == [first.call_id]
    with Session(store) as session:
        assert session.exec(select(UsageRollup.calls)).all() == [1]


def test_a_recorded_call_id_is_left_out_and_the_rest_written(store: Engine) -> None:
    first = call(1)
    write_calls(store, [first])
    assert write_calls(store, [call(2), call(3, call_id=first.call_id)]) == 1
    assert len(rows(store)) == 2
    with Session(store) as session:
        assert session.exec(select(UsageRollup.calls)).all() == [2]


def test_the_rollup_sums_each_minute_and_dimension(store: Engine) -> None:
    minute = NOW.replace(second=0)
    batch = [
        call(-1, "success", feature="chat", input_tokens=100, output_tokens=10, cost_usd=0.5),
        call(-2, "rate_limited", feature="chat", input_tokens=5),  # unpriced
        call(-3, "server_error", feature="search", cost_usd=0.25),
        call(65, "success", feature="chat", cost_usd=1.0),  # the minute before
    ]
    write_calls(store, batch[:2])
    write_calls(store, batch[2:])  # a second batch adds to the same buckets
    write_calls(store, [call(-4, "timeout", feature="chat", cost_usd=0.5)])
    with Session(store) as session:
        found = {(utc(r.minute), r.feature): r for r in session.exec(select(UsageRollup)).all()}
    chat = found[(minute, "chat")]
    assert (chat.calls, chat.successes, chat.rate_limited, chat.timeouts) == (3, 1, 1, 1)
    assert (chat.input_tokens, chat.output_tokens, chat.unpriced_calls) == (105, 10, 1)
    assert chat.cost_usd == pytest.approx(1.0)
    assert chat.latency_ms_sum == pytest.approx(300.0)
    assert found[(minute, "search")].server_errors == 1
    assert found[(minute - timedelta(minutes=2), "chat")].calls == 1


def test_scores_and_retention(store: Engine) -> None:
    old, recent = call(40 * 86400), call(3600)
    write_calls(store, [old, recent])
    write_scores(
        store,
        [
            ScoreRecord(call_id=old.call_id, ts=old.ts, source="scorer", score=0.8),
            ScoreRecord(call_id=recent.call_id, ts=recent.ts, source="feedback", score=0.0),
        ],
    )
    record_sent(store, "<old@pagerloop>", "incident-1", NOW - timedelta(days=40))
    record_sent(store, "<new@pagerloop>", "incident-2", NOW - timedelta(hours=1))
    purged = purge(store, NOW, retention_days=30, rollup_days=400)
    assert (purged.calls, purged.scores, purged.rollup_rows, purged.emails) == (1, 1, 0, 1)
    assert (was_sent(store, "<old@pagerloop>"), was_sent(store, "<new@pagerloop>")) == (
        False,
        True,
    )
    assert [row.call_id for row in rows(store)] == [recent.call_id]
    with Session(store) as session:
        assert [s.source for s in session.exec(select(QualityScore))] == ["feedback"]
        assert len(session.exec(select(UsageRollup)).all()) == 2  # the rollup stays longer
    assert purge(store, NOW, retention_days=30, rollup_days=10).rollup_rows == 1


def test_latency_histograms_merge_into_percentiles_within_the_stated_bound(store: Engine) -> None:
    import random

    rng = random.Random(3)
    values = [rng.lognormvariate(7, 1.2) for _ in range(3000)]  # about 0.1 s to 100 s
    records = [
        call(i % 240, latency_ms=v, feature="chat" if i % 3 else "search")  # 4 minutes
        for i, v in enumerate(values)
    ]
    for start in range(0, len(records), 700):  # several batches add to the same buckets
        write_calls(store, records[start : start + 700])
    with Session(store) as session:
        rows = session.exec(select(LatencyRollup)).all()
    histogram: dict[int, int] = {}
    for row in rows:
        histogram[row.bucket] = histogram.get(row.bucket, 0) + row.calls
    assert sum(histogram.values()) == len(values)
    assert len({utc(row.minute) for row in rows}) >= 4
    for q in (0.5, 0.95, 0.99):
        exact = exact_percentile(values, q)
        estimate = percentile(histogram, q)
        assert estimate is not None
        assert abs(estimate - exact) / exact <= RELATIVE_ERROR


def test_an_older_schema_is_upgraded_in_place(store: Engine) -> None:
    schema.downgrade(store, "0001")
    from sqlalchemy import text

    with store.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO llm_calls (call_id, ts, operation, model, status, latency_ms, "
                "retry_count, source) VALUES ('0123456789abcdef', :ts, 'chat', 'gpt-4.1', "
                "'success', 12.5, 0, 'sdk')"
            ),
            {"ts": NOW},
        )
    schema.upgrade(store)
    assert schema.current_revision(store) == schema.head_revision()
    [row] = rows(store)
    assert (row.call_id, row.latency_ms, row.latency_bucket) == ("0123456789abcdef", 12.5, None)
