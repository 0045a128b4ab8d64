"""The call log on SQLite and on a real PostgreSQL: same rows in, same answers out."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from stores.llm_calls import LLMCall, error_counts, insert_calls, utc

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def call(seconds_ago: float, status: str = "success", **extra: object) -> LLMCall:
    return LLMCall(
        ts=NOW - timedelta(seconds=seconds_ago),
        model="gpt-4.1",
        status=status,
        latency_ms=100.0,
        **extra,
    )


def test_error_counts_cover_exactly_the_window(store: Engine) -> None:
    insert_calls(
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


def test_timestamps_come_back_as_utc(store: Engine) -> None:
    paris = timezone(timedelta(hours=1))
    insert_calls(store, [call(0, metadata_={"prompt": "v2", "n": 3})])
    with Session(store) as session:
        row = session.exec(select(LLMCall)).one()
    assert utc(row.ts) == NOW
    assert utc(row.ts).astimezone(paris).hour == 13
    assert row.metadata_ == {"prompt": "v2", "n": 3}


def test_any_time_zone_in_means_the_same_instant(store: Engine) -> None:
    tokyo = timezone(timedelta(hours=9))
    insert_calls(
        store, [LLMCall(ts=NOW.astimezone(tokyo), model="m", status="error", latency_ms=1)]
    )
    assert error_counts(store, NOW - timedelta(seconds=1), NOW + timedelta(seconds=1)).total == 1
    assert (
        error_counts(store, NOW.astimezone(tokyo), NOW.astimezone(tokyo) + timedelta(1)).total == 1
    )
    assert error_counts(store, NOW + timedelta(seconds=1), NOW + timedelta(hours=9)).total == 0


def test_a_failing_batch_writes_nothing(store: Engine) -> None:
    insert_calls(store, [call(1, call_id="dup")])
    with pytest.raises(IntegrityError):
        insert_calls(store, [call(2, call_id="fresh"), call(3, call_id="dup")])
    with Session(store) as session:
        ids = session.exec(select(LLMCall.call_id)).all()
    assert ids == ["dup"]
