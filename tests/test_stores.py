"""The stores on SQLite and on a real PostgreSQL: same rows in, same answers out."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, SQLModel, select

from stores import schema
from stores.llm_calls import CallRecord, LLMCall, UsageRollup, error_counts, utc, write_calls
from stores.quality import QualityScore, ScoreRecord, write_scores
from stores.retention import purge

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def call(seconds_ago: float, status: str = "success", **extra: object) -> CallRecord:
    return CallRecord(
        ts=NOW - timedelta(seconds=seconds_ago),
        model="gpt-4.1",
        status=status,
        latency_ms=100.0,
        **extra,  # type: ignore[arg-type]
    )


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


def test_error_counts_cover_exactly_the_window(store: Engine) -> None:
    write_calls(
        store,
        [
            call(0.5, "error"),  # inside
            call(100, "rate_limited"),  # inside
            call(299, "success"),  # inside
            call(300, "timeout"),  # the start: inside (start <= ts)
            call(301, "error"),  # before the window
            call(-1, "error"),  # after the end
        ],
    )
    counts = error_counts(store, NOW - timedelta(seconds=300), NOW)
    assert (counts.total, counts.errors) == (4, 3)
    assert counts.rate == pytest.approx(0.75)


def test_empty_window_has_rate_zero(store: Engine) -> None:
    counts = error_counts(store, NOW - timedelta(seconds=60), NOW)
    assert (counts.total, counts.errors, counts.rate) == (0, 0, 0.0)


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
    expected = {name: getattr(record, name) for name in record.__slots__}
    assert stored == expected


def test_any_time_zone_in_means_the_same_instant(store: Engine) -> None:
    tokyo = timezone(timedelta(hours=9))
    write_calls(
        store, [CallRecord(ts=NOW.astimezone(tokyo), model="m", status="error", latency_ms=1)]
    )
    assert error_counts(store, NOW - timedelta(seconds=1), NOW + timedelta(seconds=1)).total == 1
    assert error_counts(store, NOW.astimezone(tokyo), NOW + timedelta(days=1)).total == 1
    assert error_counts(store, NOW + timedelta(seconds=1), NOW + timedelta(hours=9)).total == 0


def test_a_failing_batch_writes_nothing(store: Engine) -> None:
    first = call(1)
    write_calls(store, [first])
    with pytest.raises(IntegrityError):
        write_calls(store, [call(2), call(3, call_id=first.call_id)])
    assert [row.call_id for row in rows(store)] == [first.call_id]
    with Session(store) as session:
        assert session.exec(select(UsageRollup.calls)).all() == [1]


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
    purged = purge(store, NOW, retention_days=30, rollup_days=400)
    assert (purged.calls, purged.scores, purged.rollup_rows) == (1, 1, 0)
    assert [row.call_id for row in rows(store)] == [recent.call_id]
    with Session(store) as session:
        assert [s.source for s in session.exec(select(QualityScore))] == ["feedback"]
        assert len(session.exec(select(UsageRollup)).all()) == 2  # the rollup stays longer
    assert purge(store, NOW, retention_days=30, rollup_days=10).rollup_rows == 1
