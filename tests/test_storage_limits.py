"""Storage limits: 64-bit ids and counters, stores that fail fast when locked or down, and
strings that PostgreSQL or UTF-8 would refuse."""

from __future__ import annotations

import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import BigInteger, Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, SQLModel, select

from stores import schema, silences
from stores.engine import create_schema, make_engine, ping
from stores.llm_calls import CallRecord, LatencyRollup, LLMCall, UsageRollup
from stores.quality import QualityRollup, ScoreRecord, write_scores
from stores.writer import write_calls

NOW = datetime(2026, 12, 5, 12, 0, 30, tzinfo=UTC)
MAX_TOKENS_PER_CALL = 1_000_000_000  # the ingest API's bound
INT32_MAX = 2**31 - 1
COUNTERS = (
    ("latency_rollup", "calls"),
    ("quality_rollup", "scores"),
    ("usage_rollup", "successes"),
)


def call(**extra: object) -> CallRecord:
    fields: dict[str, object] = {"model": "gpt-4.1", "status": "success", "latency_ms": 120.0}
    return CallRecord(ts=NOW, **{**fields, **extra})  # type: ignore[arg-type]


def usage(engine: Engine) -> UsageRollup:
    with Session(engine) as session:
        return session.exec(select(UsageRollup)).one()


def calls(engine: Engine) -> list[LLMCall]:
    with Session(engine) as session:
        return list(session.exec(select(LLMCall).order_by(LLMCall.id)))  # type: ignore[arg-type]


def _dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture
def pg(postgres_url: str) -> Iterator[Engine]:
    """Empty stores on PostgreSQL, at no revision: each test brings them where it needs."""
    engine = make_engine(postgres_url)
    schema.downgrade(engine, "base")
    yield engine
    schema.downgrade(engine, "base")
    engine.dispose()


# --- 64-bit ids and counters ------------------------------------------------------------------


def _big_columns() -> set[tuple[str, str]]:
    return {
        (table.name, column.name)
        for table in SQLModel.metadata.sorted_tables
        for column in table.columns
        if isinstance(column.type, BigInteger)
    }


def _data_types(engine: Engine) -> dict[tuple[str, str], str]:
    query = text(
        "SELECT table_name, column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = current_schema()"
    )
    with engine.connect() as connection:
        return {(table, column): kind for table, column, kind in connection.execute(query)}


def test_the_upgrade_from_0003_keeps_the_rows_and_widens_ids_and_counters(pg: Engine) -> None:
    schema.upgrade(pg, "0003")
    write_calls(pg, [call(input_tokens=7), call(status="rate_limited")])
    write_scores(pg, [ScoreRecord(call_id="c1", ts=NOW, source="feedback", score=0.5)])
    silence = silences.Silence(
        starts_at=NOW, ends_at=NOW + timedelta(hours=1), author="a", reason="r", created_at=NOW
    )
    silences.create(pg, silence)
    # The table as 0003 made it: today's model has columns added since.
    with pg.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO controls (key, kind, feature, value, incident_id, reason, set_by,"
                " created_at, updated_at, expires_at) VALUES ('inc/disable/chat/*', 'disable',"
                " 'chat', '', 'inc', 'r', 'a', :now, :now, :until)"
            ),
            {"now": NOW, "until": NOW + timedelta(hours=1)},
        )

    assert _data_types(pg)[("llm_calls", "id")] == "integer"

    schema.upgrade(pg)

    assert schema.current_revision(pg) == schema.head_revision()
    expected = _big_columns()
    assert {("llm_calls", "id"), ("usage_rollup", "input_tokens"), ("controls", "id")} <= expected
    found = _data_types(pg)
    with pg.connect() as connection:
        sequences: dict[str, int] = dict(
            connection.execute(text("SELECT sequencename, max_value FROM pg_sequences")).all()
        )
    assert {key: found[key] for key in expected} == dict.fromkeys(expected, "bigint")
    assert found[("llm_calls", "retry_count")] == "integer"  # bounded per call: stays small
    assert sequences == dict.fromkeys(
        ("llm_calls_id_seq", "quality_scores_id_seq", "silences_id_seq", "controls_id_seq"),
        2**63 - 1,
    )
    rows = calls(pg)
    assert [(r.id, r.status, r.input_tokens) for r in rows] == [
        (1, "success", 7),
        (2, "rate_limited", None),
    ]
    assert (usage(pg).calls, usage(pg).input_tokens, usage(pg).rate_limited) == (2, 7, 1)
    write_calls(pg, [call()])
    assert [r.id for r in calls(pg)] == [1, 2, 3]  # the sequence carries on


def test_call_ids_past_2_to_the_31_on_postgres(pg: Engine) -> None:
    create_schema(pg)
    with pg.begin() as connection:
        connection.execute(text(f"SELECT setval('llm_calls_id_seq', {2**31 + 10})"))
    write_calls(pg, [call(), call(status="error")])
    assert [r.id for r in calls(pg)] == [2**31 + 11, 2**31 + 12]
    assert usage(pg).calls == 2


def test_a_minute_of_tokens_past_2_to_the_31_is_summed_exactly(store: Engine) -> None:
    for _ in range(2):  # the second batch adds to the stored row
        write_calls(store, [call(input_tokens=MAX_TOKENS_PER_CALL, output_tokens=3) for _ in "abc"])
    row = usage(store)
    assert (row.calls, row.input_tokens, row.output_tokens) == (6, 6 * MAX_TOKENS_PER_CALL, 18)
    assert row.input_tokens > INT32_MAX
    assert sum(r.input_tokens or 0 for r in calls(store)) == 6 * MAX_TOKENS_PER_CALL


def test_counters_carry_on_past_2_to_the_31(store: Engine) -> None:
    write_calls(store, [call()])
    write_scores(store, [ScoreRecord(call_id="c", ts=NOW, source="eval", score=1.0)])
    with store.begin() as connection:
        for table, column in COUNTERS:
            connection.execute(text(f"UPDATE {table} SET {column} = {INT32_MAX}"))  # noqa: S608
    write_calls(store, [call()])
    write_scores(store, [ScoreRecord(call_id="c", ts=NOW, source="eval", score=1.0)])
    with Session(store) as session:
        assert session.exec(select(LatencyRollup.calls)).one() == INT32_MAX + 1
        assert session.exec(select(QualityRollup.scores)).one() == INT32_MAX + 1
    assert usage(store).successes == INT32_MAX + 1


def test_a_minute_near_2_to_the_62_does_not_overflow(store: Engine) -> None:
    """At <= 1e9 tokens a call, 2^63 takes 9 billion calls in one minute and dimension: the
    rollup gets near 2^62 only by hand, and the write path still adds to it exactly."""
    write_calls(store, [call(input_tokens=1)])
    with store.begin() as connection:
        connection.execute(text(f"UPDATE usage_rollup SET input_tokens = {2**62}"))  # noqa: S608
    batch = [call(input_tokens=MAX_TOKENS_PER_CALL) for _ in range(1000)]
    write_calls(store, batch)
    assert usage(store).input_tokens == 2**62 + 1000 * MAX_TOKENS_PER_CALL
    assert usage(store).calls == 1001


# --- a store that is locked or down fails fast ------------------------------------------------


def test_a_locked_sqlite_file_fails_a_write_within_the_lock_timeout(tmp_path: Path) -> None:
    path = tmp_path / "stores.db"
    engine = make_engine(f"sqlite:///{path}", lock_timeout_seconds=1)
    create_schema(engine)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        with pytest.raises(OperationalError, match="locked"):
            write_calls(engine, [call()])
        assert time.monotonic() - started < 1.5
    finally:
        holder.rollback()
        holder.close()
    write_calls(engine, [call()])  # the pool's connection is still good
    assert len(calls(engine)) == 1
    engine.dispose()


def test_the_default_sqlite_engine_still_waits_long(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'stores.db'}")
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar_one() == 30_000
    engine.dispose()


def test_a_closed_postgres_port_fails_fast() -> None:
    engine = make_engine("postgresql+psycopg://postgres@127.0.0.1:1/test", lock_timeout_seconds=1.5)
    started = time.monotonic()
    with pytest.raises(OperationalError):
        write_calls(engine, [call()])
    with pytest.raises(OperationalError):
        ping(engine)
    assert time.monotonic() - started < 3
    engine.dispose()


def test_a_postgres_server_that_never_answers_fails_within_the_connect_timeout() -> None:
    with socket.socket() as listener:  # the kernel accepts the connection; nobody answers it
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/test"
        engine = make_engine(url, lock_timeout_seconds=1.5)
        started = time.monotonic()
        with pytest.raises(OperationalError):
            write_calls(engine, [call()])
        assert time.monotonic() - started < 3
        engine.dispose()


def test_a_postgres_row_lock_fails_a_write_within_the_lock_timeout(
    pg: Engine, postgres_url: str
) -> None:
    create_schema(pg)
    write_calls(pg, [call()])
    fast = make_engine(postgres_url, lock_timeout_seconds=1)
    with fast.connect() as connection:
        settings = (
            connection.execute(text("SHOW lock_timeout")).scalar_one(),
            connection.execute(text("SHOW statement_timeout")).scalar_one(),
        )
    assert settings == ("1s", "10s")
    with psycopg.connect(_dsn(postgres_url)) as holder:
        holder.execute("SELECT * FROM usage_rollup FOR UPDATE")  # the row the write adds to
        started = time.monotonic()
        with pytest.raises(OperationalError, match="lock timeout"):
            write_calls(fast, [call()])
        with pytest.raises(OperationalError, match="lock timeout"), fast.begin() as connection:
            connection.execute(text("UPDATE usage_rollup SET calls = calls + 1"))
        assert time.monotonic() - started < 3
    write_calls(fast, [call()])
    assert usage(pg).calls == 2
    fast.dispose()


def test_the_default_postgres_engine_keeps_waiting(pg: Engine) -> None:
    with pg.connect() as connection:
        assert connection.execute(text("SHOW lock_timeout")).scalar_one() == "0"


def test_a_migration_through_a_fast_engine_waits_for_its_locks(
    pg: Engine, postgres_url: str
) -> None:
    schema.upgrade(pg, "0003")
    fast = make_engine(postgres_url, lock_timeout_seconds=0.5)
    with psycopg.connect(_dsn(postgres_url)) as holder:
        holder.execute("LOCK TABLE llm_calls IN ACCESS SHARE MODE")
        release = threading.Timer(1.5, holder.rollback)
        release.start()
        create_schema(fast)  # waits the 1.5 s, past the 0.5 s lock timeout
        release.join()
    assert schema.current_revision(fast) == schema.head_revision()
    with fast.connect() as connection:
        assert connection.execute(text("SHOW lock_timeout")).scalar_one() == "500ms"
    fast.dispose()


# --- strings no store takes -------------------------------------------------------------------


class Unprintable:
    def __str__(self) -> str:
        return "obj\x00ect"


def test_nul_and_lone_surrogates_are_mended_not_fatal(store: Engine) -> None:
    bad = call(
        feature="chat\x00bot",
        error_message="failed: \ud800 in \udfff",
        session_id="s\ud83d\ude00",  # a pair the way a UTF-16 source hands it over
        metadata={"k\x00": ["v\udc00", {"emoji": "😀"}], "obj": Unprintable()},
        status="error",
    )
    before = (bad.feature, bad.error_message)
    assert write_calls(store, [call(feature="chat"), bad, call(feature="ok é")]) == 3

    assert (bad.feature, bad.error_message) == before  # the caller's record is left as it was
    first, mended, last = calls(store)
    assert (first.feature, last.feature) == ("chat", "ok é")
    assert mended.feature == "chat\ufffdbot"
    assert mended.error_message == "failed: \ufffd in \ufffd"
    assert mended.session_id == "s😀"
    assert mended.metadata_ == {"k\ufffd": ["v\ufffd", {"emoji": "😀"}], "obj": "obj\ufffdect"}
    with Session(store) as session:
        features = set(session.exec(select(UsageRollup.feature)))
    assert features == {"chat", "chat\ufffdbot", "ok é"}
