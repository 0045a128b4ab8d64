"""One Slack replay cache for all API replicas, in the stores (SQLite and PostgreSQL): a signed
request used once is refused by another replica, and after a restart; its row expires with the
signature; expired rows are pruned; a store that cannot answer is a 503, never a pass."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import Engine, func
from sqlmodel import Session, select
from temporalio.testing import WorkflowEnvironment

import worker
from api import slack as slack_api
from config import Settings
from stores import replay_guard
from stores.replay_guard import SeenRequest, first_use, prune, request_key, take
from tests.conftest import SIGNING_SECRET, free_port, serving_api
from tests.fakes.slack import Message, button_click

NOW = datetime(2026, 12, 8, 12, 0, tzinfo=UTC)
TTL = timedelta(minutes=6)


def click(
    incident_id: str = "incident-nope", at: float | None = None
) -> tuple[bytes, dict[str, str]]:
    button = {"type": "button", "action_id": "incident_acknowledge", "value": incident_id,
              "text": {"type": "plain_text", "text": "Acknowledge"}}  # fmt: skip
    message = Message("C00000001", "1.000001", "x", [{"type": "actions", "elements": [button]}])
    return button_click(message, "incident_acknowledge", "U1", SIGNING_SECRET, at=at)


def rows(engine: Engine) -> int:
    with Session(engine) as session:
        return int(session.exec(select(func.count()).select_from(SeenRequest)).one())


def replays_refused() -> float:
    labels = {"endpoint": "slack", "reason": "replayed"}
    return REGISTRY.get_sample_value("pagerloop_rejected_requests_total", labels) or 0.0


@pytest.fixture
def on_store(settings: Settings, store: Engine) -> Settings:
    """The test's settings on the `store` fixture's database (SQLite file or PostgreSQL)."""
    return settings.model_copy(
        update={"database_url": store.url.render_as_string(hide_password=False)}
    )


@contextlib.asynccontextmanager
async def replica(settings: Settings, env: WorkflowEnvironment) -> AsyncIterator[str]:
    """One more API process's worth: its own engine (as `pagerloop api` makes it), its own
    port, a real uvicorn server."""
    mine = settings.model_copy(update={"api_port": free_port()})
    engine = worker.api_engine(mine)
    try:
        async with serving_api(mine, env.client, engine) as url:
            yield url
    finally:
        engine.dispose()


# --- across replicas and restarts -------------------------------------------------------------


async def test_a_replay_is_refused_by_another_replica_and_after_a_restart(
    on_store: Settings, dev_env: WorkflowEnvironment
) -> None:
    body, headers = click()
    refused_before = replays_refused()
    async with (
        replica(on_store, dev_env) as first,
        replica(on_store, dev_env) as second,
        httpx.AsyncClient() as http,
    ):
        used = await http.post(f"{first}/slack/interactions", content=body, headers=headers)
        assert used.status_code == 200, used.text
        again = await http.post(f"{second}/slack/interactions", content=body, headers=headers)
        assert again.status_code == 401
        assert again.json()["detail"] == "this signed request was already used"
        # Another click (another signature) still goes through on the second replica.
        other_body, other_headers = click("incident-other")
        other = await http.post(
            f"{second}/slack/interactions", content=other_body, headers=other_headers
        )
        assert other.status_code == 200

    # Both processes gone; a new one on the same store still remembers.
    async with replica(on_store, dev_env) as restarted, httpx.AsyncClient() as http:
        after = await http.post(f"{restarted}/slack/interactions", content=body, headers=headers)
        assert after.status_code == 401
    assert replays_refused() - refused_before == 2


async def test_the_same_click_sent_to_many_replicas_at_once_is_taken_once(
    on_store: Settings, dev_env: WorkflowEnvironment
) -> None:
    body, headers = click()
    async with (
        replica(on_store, dev_env) as first,
        replica(on_store, dev_env) as second,
        httpx.AsyncClient() as http,
    ):
        answers = await asyncio.gather(
            *(
                http.post(f"{url}/slack/interactions", content=body, headers=headers)
                for url in [first, second] * 4
            )
        )
    assert sorted(a.status_code for a in answers) == [200] + [401] * 7


# --- a store that cannot answer -----------------------------------------------------------


@contextlib.contextmanager
def locked(store: Engine) -> Iterator[None]:
    """Hold the replay cache's table locked from another connection, as a long migration or a
    stuck transaction would."""
    if store.dialect.name == "sqlite":
        database = store.url.database
        assert database
        writer = sqlite3.connect(database, isolation_level=None)
        writer.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            writer.execute("ROLLBACK")
            writer.close()
        return
    with store.connect() as connection:
        connection.exec_driver_sql("LOCK TABLE seen_requests IN ACCESS EXCLUSIVE MODE")
        try:
            yield
        finally:
            connection.rollback()


async def test_a_store_that_cannot_answer_is_a_503_in_time_not_a_pass(
    on_store: Settings, store: Engine, dev_env: WorkflowEnvironment
) -> None:
    body, headers = click()
    async with replica(on_store, dev_env) as url, httpx.AsyncClient() as http:
        with locked(store):
            started = time.monotonic()
            answer = await http.post(f"{url}/slack/interactions", content=body, headers=headers)
            took = time.monotonic() - started
        assert answer.status_code == 503
        assert answer.headers["Retry-After"] == "5"
        assert took < 3  # Slack's limit
        # Nothing was recorded: the same request, once the store is back, is taken.
        retried = await http.post(f"{url}/slack/interactions", content=body, headers=headers)
        assert retried.status_code == 200


async def test_a_store_slower_than_the_backstop_is_a_503(
    on_store: Settings, dev_env: WorkflowEnvironment, monkeypatch: pytest.MonkeyPatch
) -> None:
    def slow(*_: object) -> bool:
        time.sleep(0.5)
        return True

    monkeypatch.setattr(slack_api, "REPLAY_CHECK_SECONDS", 0.1)
    monkeypatch.setattr(replay_guard, "take", slow)
    body, headers = click()
    async with replica(on_store, dev_env) as url, httpx.AsyncClient() as http:
        answer = await http.post(f"{url}/slack/interactions", content=body, headers=headers)
    assert answer.status_code == 503
    assert "Retry-After" in answer.headers


# --- the store functions, with explicit times ---------------------------------------------


def test_a_key_is_taken_once_until_it_expires(store: Engine) -> None:
    key = request_key("slack", "v0=abc")
    assert len(key) == replay_guard.KEY_LENGTH
    assert first_use(store, key, NOW, NOW + TTL)
    assert not first_use(store, key, NOW + timedelta(seconds=1), NOW + TTL)
    assert not first_use(store, key, NOW + TTL - timedelta(microseconds=1), NOW + 2 * TTL)
    # Expired (Slack refuses the signature by then anyway): not a replay by the cache.
    assert first_use(store, key, NOW + TTL, NOW + 2 * TTL)
    assert not first_use(store, key, NOW + TTL + timedelta(seconds=1), NOW + 2 * TTL)
    assert first_use(store, request_key("slack", "v0=abd"), NOW, NOW + TTL)
    assert request_key("pagerduty", "v0=abc") != key
    assert rows(store) == 2


def test_prune_deletes_only_expired_rows(store: Engine) -> None:
    for i in range(5):
        first_use(store, request_key("slack", f"old{i}"), NOW, NOW + timedelta(minutes=i))
    assert prune(store, NOW + timedelta(minutes=2)) == 3  # expired at 0, 1 and 2 minutes
    assert rows(store) == 2
    assert not first_use(store, request_key("slack", "old3"), NOW + timedelta(minutes=2), NOW)


def test_take_prunes_in_passing_at_most_once_a_minute(
    store: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(replay_guard._pruner, "next_at", {})
    for i in range(3):
        first_use(store, request_key("slack", f"old{i}"), NOW, NOW + TTL)
    later = NOW + TTL + timedelta(seconds=1)
    assert take(store, request_key("slack", "new1"), later, later + TTL)
    assert rows(store) == 1  # the three expired ones went
    first_use(store, request_key("slack", "old3"), NOW, NOW + TTL)
    assert take(store, request_key("slack", "new2"), later, later + TTL)
    assert rows(store) == 3  # not due again yet
    assert not take(store, request_key("slack", "new2"), later, later + TTL)


async def test_a_key_is_kept_until_its_signature_stops_being_accepted(
    on_store: Settings, store: Engine, dev_env: WorkflowEnvironment
) -> None:
    # Slack's verifier accepts a timestamp up to 5 minutes either side of our clock: a request
    # signed 4 minutes ahead stays acceptable for 9 minutes, and its key must stay as long.
    signed_at = int(time.time()) + 240
    body, headers = click(at=signed_at)
    async with replica(on_store, dev_env) as url, httpx.AsyncClient() as http:
        assert (
            await http.post(f"{url}/slack/interactions", content=body, headers=headers)
        ).is_success
    with Session(store) as session:
        [row] = session.exec(select(SeenRequest)).all()
    kept_until = row.expires_at.replace(tzinfo=row.expires_at.tzinfo or UTC)
    last_accepted = datetime.fromtimestamp(signed_at + slack_api.REPLAY_WINDOW_SECONDS, UTC)
    assert kept_until >= last_accepted
    assert kept_until <= last_accepted + timedelta(minutes=2)
