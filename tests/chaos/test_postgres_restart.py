"""Chaos: the stores' PostgreSQL restarted under load, on a throwaway cluster of our own
(`tests/postgres.py`), stopped with `pg_ctl -m immediate` (backends killed mid-transaction, crash
recovery on start) or `-m fast` and started again on the same port.

- During ingest: clients POST batches to the real API server (uvicorn) with the ingest key,
  retrying as a well-behaved client does (503: after Retry-After; connection errors: soon);
  afterwards the store holds every call exactly once, by call_id, and the rollups agree.
- During a detector evaluation (local dev server, real time): the evaluation's store query
  retries, the detector keeps its interval, and a breach written before or after the restart
  still opens its one incident."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import URL
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

import worker
from config import Settings
from domain.workflow_names import detector_workflow_id
from tests import postgres
from tests.chaos import ledger
from tests.conftest import INGEST_KEY, incident_ids, postgres_required, serving_api
from tests.helpers import eventually
from workflows.incident import IncidentWorkflow

AUTH = {"Authorization": f"Bearer {INGEST_KEY}"}
CLIENTS = 8  # concurrent ingest clients
BATCH = 50  # calls per batch
AFTER_RESTART = 5  # batches each client still sends once the store is back
DOWN_SECONDS = 1.5  # between stop and start: longer than the detector's interval
EVALUATION = "metrics.window_aggregates"


class RestartableCluster(postgres.OwnCluster):
    """Our own cluster, which a test may stop and start again on the same port."""

    def _pg_ctl(self, *args: str) -> None:
        assert self.bin is not None
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), *args)

    def restart(self, mode: str, down_seconds: float = DOWN_SECONDS) -> float:
        """Stop (`fast` or `immediate`), stay down a while, start; the seconds it was down."""
        began = time.monotonic()
        self._pg_ctl("-m", mode, "stop")
        time.sleep(down_seconds)
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
        self._pg_ctl("-o", options, "-l", str(self.dir / "log"), "-w", "start")
        return time.monotonic() - began


@pytest.fixture(scope="module")
def cluster() -> Iterator[RestartableCluster]:
    own = RestartableCluster()
    if not own.available:
        reason = "no PostgreSQL server binaries (initdb, pg_ctl) to run a cluster to restart"
        if postgres_required():
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        own.start()
        yield own
    finally:
        own.stop()


@pytest.fixture
def pg_settings(cluster: RestartableCluster, settings: Settings) -> Iterator[Settings]:
    """The usual settings, with the stores in a database of their own on our cluster."""
    admin = URL.create("postgresql+psycopg", username="postgres", host="127.0.0.1",
                       port=cluster.port, database="postgres")  # fmt: skip
    name = f"pagerloop_chaos_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    url = postgres.create_database(admin, name)
    yield settings.model_copy(update={"database_url": url.render_as_string(hide_password=False)})
    with contextlib.suppress(Exception):  # a failed restart leaves nothing to drop
        postgres.drop_database(admin, name)


@contextlib.asynccontextmanager
async def service(settings: Settings, client: Client, detector: bool) -> AsyncIterator[Engine]:
    """API (on its fail-fast engine, as `pagerloop serve` wires it) and, with `detector`, the
    worker and the detector; yields the worker's engine."""
    engine = worker.open_store(settings)
    api_engine = worker.api_engine(settings)
    try:
        async with contextlib.AsyncExitStack() as stack:
            if detector:
                await stack.enter_async_context(worker.build_worker(settings, client, engine))
                await worker.ensure_detector(client, settings)
            await stack.enter_async_context(serving_api(settings, client, api_engine))
            yield engine
            if detector:
                handle = client.get_workflow_handle(detector_workflow_id(settings.task_queue))
                await handle.terminate("test over")
    finally:
        api_engine.dispose()
        engine.dispose()


# --- the ingest clients ----------------------------------------------------------------------


@dataclass
class Ingest:
    """What the clients made and what the API answered them."""

    made: list[str] = field(default_factory=list)  # call_ids of every call made
    batches: int = 0
    answers: dict[str, int] = field(default_factory=dict)  # "503", "transport", ... -> count
    given_up: list[str] = field(default_factory=list)  # batches a client could not deliver
    slowest_refusal: float = 0.0  # seconds the API took for its slowest 5xx answer

    def saw(self, answer: str) -> None:
        self.answers[answer] = self.answers.get(answer, 0) + 1


def calls(count: int, status: str = "success", **extra: Any) -> list[dict[str, Any]]:
    return [
        {"call_id": uuid.uuid4().hex, "model": "gpt-4.1", "status": status, "latency_ms": 800,
         "input_tokens": 120, "output_tokens": 40, "feature": "chaos", **extra}
        for _ in range(count)
    ]  # fmt: skip


async def deliver(
    api: httpx.AsyncClient, batch: list[dict[str, Any]], ingest: Ingest, again: bool = False
) -> None:
    """POST one batch until the API has it, as a well-behaved client does (`again`: a batch
    sent before, whose answer the client did not get)."""
    if not again:
        ingest.made += [call["call_id"] for call in batch]
        ingest.batches += 1
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        asked = time.monotonic()
        try:
            answer = await api.post("/v1/llm-calls", json={"calls": batch}, headers=AUTH)
        except httpx.TransportError as exc:
            ingest.saw(f"transport: {type(exc).__name__}")
            await asyncio.sleep(0.5)
            continue
        ingest.saw(str(answer.status_code))
        if answer.status_code == 202:
            return
        if answer.status_code == 409:  # an earlier try of this batch was recorded
            return
        if answer.status_code in (502, 503, 504):
            ingest.slowest_refusal = max(ingest.slowest_refusal, time.monotonic() - asked)
            await asyncio.sleep(float(answer.headers.get("Retry-After", "1")))
            continue
        ingest.given_up.append(f"HTTP {answer.status_code}: {answer.text[:300]}")
        return
    ingest.given_up.append("still not accepted after 60 s")


async def client_loop(url: str, ingest: Ingest, back: asyncio.Event) -> None:
    """Send batches until the store has been back for AFTER_RESTART of them. Once it is back,
    send the last batch from before the restart once more, as a client does whose answer was
    lost in the restart (a timeout, a dropped connection)."""
    after = 0
    last_before: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=url, timeout=15) as api:
        while after < AFTER_RESTART:
            was_back = back.is_set()
            if was_back and last_before:
                await deliver(api, last_before, ingest, again=True)
                last_before = []
            batch = calls(BATCH)
            await deliver(api, batch, ingest)
            if not was_back:
                last_before = batch
            after += was_back
            await asyncio.sleep(0.02)


def stored(engine: Engine, call_ids: list[str]) -> tuple[int, int, int]:
    """Rows holding these call_ids, distinct call_ids among them, and every call the usage
    rollup counts (the test's database holds nothing else)."""
    with engine.connect() as conn:
        conn.execute(text("CREATE TEMP TABLE made (call_id text PRIMARY KEY)"))
        conn.execute(text("INSERT INTO made VALUES (:c)"), [{"c": c} for c in call_ids])
        rows, distinct = conn.execute(
            text(
                "SELECT count(*), count(DISTINCT call_id) FROM llm_calls JOIN made USING (call_id)"
            )
        ).one()
        rollup = conn.execute(text("SELECT coalesce(sum(calls), 0) FROM usage_rollup")).scalar()
    return int(rows), int(distinct), int(rollup or 0)


@pytest.mark.parametrize("mode", ["immediate", "fast"])
async def test_restart_during_ingest_keeps_every_call_once(
    cluster: RestartableCluster,
    pg_settings: Settings,
    dev_env: WorkflowEnvironment,
    mode: str,
) -> None:
    ingest = Ingest()
    back = asyncio.Event()
    async with service(pg_settings, dev_env.client, detector=False) as engine:
        clients = [
            asyncio.create_task(client_loop(pg_settings.api_url, ingest, back))
            for _ in range(CLIENTS)
        ]
        await eventually(lambda: ingest.answers.get("202", 0) >= 2 * CLIENTS, timeout=30)
        down = await asyncio.to_thread(cluster.restart, mode)
        back.set()
        await asyncio.wait_for(asyncio.gather(*clients), timeout=90)
        rows, distinct, rollup = await asyncio.to_thread(stored, engine, ingest.made)

    lost = len(ingest.made) - distinct
    duplicates = (rows - distinct) + max(rollup - rows, 0)
    ledger.record(
        f"PostgreSQL restart ({mode}) during ingest",
        runs=ingest.batches,
        duplicates=duplicates,
        records_lost=lost,
    )
    assert set(ingest.answers) - {"202"}, f"down {down:.1f} s, not felt: {ingest.answers}"
    assert ingest.given_up == [], ingest.given_up
    assert lost == 0, f"{lost} of {len(ingest.made)} calls missing; answers {ingest.answers}"
    assert rows == distinct == len(ingest.made), (rows, distinct, len(ingest.made))
    assert rollup == rows, f"usage_rollup counts {rollup} calls for {rows} rows"
    # The API answers an unavailable store at once (worker.api_engine: a 503 within 2 s), not
    # after the client's timeout; the bound is loose for busy CI machines.
    assert ingest.slowest_refusal <= 5, f"a 503 took {ingest.slowest_refusal:.1f} s"


# --- the detector ------------------------------------------------------------------------------


@dataclass
class Evaluations:
    starts: list[float]  # when each evaluation began (its store query scheduled), in seconds
    retried: int  # evaluations whose store query took more than one try (or failed)


async def evaluations(client: Client, settings: Settings) -> Evaluations:
    """The detector's evaluations so far, from its history."""
    handle = client.get_workflow_handle(detector_workflow_id(settings.task_queue))
    history = await handle.fetch_history()
    scheduled: dict[int, float] = {}
    retried = 0
    for event in history.events:
        if event.HasField("activity_task_scheduled_event_attributes"):
            if event.activity_task_scheduled_event_attributes.activity_type.name == EVALUATION:
                scheduled[event.event_id] = event.event_time.ToDatetime().timestamp()
        elif event.HasField("activity_task_started_event_attributes"):
            started = event.activity_task_started_event_attributes
            retried += started.scheduled_event_id in scheduled and started.attempt > 1
        elif event.HasField("activity_task_failed_event_attributes"):
            failed = event.activity_task_failed_event_attributes
            retried += failed.scheduled_event_id in scheduled
    return Evaluations(list(scheduled.values()), retried)


async def evaluation_starts(client: Client, settings: Settings) -> list[float]:
    return (await evaluations(client, settings)).starts


async def post_until_accepted(settings: Settings, batch: list[dict[str, Any]]) -> Ingest:
    ingest = Ingest()
    async with httpx.AsyncClient(base_url=settings.api_url, timeout=15) as api:
        await deliver(api, batch, ingest)
    assert ingest.given_up == [], ingest.given_up
    return ingest


@pytest.mark.parametrize("breach", ["before", "after"])
async def test_restart_during_evaluation_keeps_the_interval_and_opens_the_incident(
    cluster: RestartableCluster,
    pg_settings: Settings,
    dev_env: WorkflowEnvironment,
    breach: str,
) -> None:
    client = dev_env.client
    interval = pg_settings.detector_interval_seconds
    errors = calls(90) + calls(10, "error", http_status=400)  # 10 % errors: SEV2 error_rate
    async with service(pg_settings, client, detector=True) as engine:
        await eventually(lambda: evaluation_starts(client, pg_settings), timeout=15)
        if breach == "before":
            ingest = await post_until_accepted(pg_settings, errors)
        restarted_at = time.time()
        down = await asyncio.to_thread(cluster.restart, "immediate")
        if breach == "after":
            ingest = await post_until_accepted(pg_settings, errors)
        found = await eventually(lambda: incident_ids(client, pg_settings.task_queue), timeout=45)
        since = max(time.time(), restarted_at + down)

        # The detector goes on at its interval once the store is back (and finds the incident
        # it opened, rather than opening another, evaluation after evaluation).
        async def resumed() -> list[float]:
            starts = await evaluation_starts(client, pg_settings)
            return starts if sum(at > since for at in starts) >= 4 else []

        starts = await eventually(resumed, timeout=30)
        retried = (await evaluations(client, pg_settings)).retried
        opened = await incident_ids(client, pg_settings.task_queue)
        rows, distinct, _ = await asyncio.to_thread(stored, engine, ingest.made)
        for incident_id in opened:
            with contextlib.suppress(Exception):
                await client.get_workflow_handle_for(IncidentWorkflow.run, incident_id).terminate()

    gaps = [b - a for a, b in itertools.pairwise(starts)]
    during = [g for a, g in zip(starts, gaps, strict=False) if a <= restarted_at + down]
    after = [g for a, g in zip(starts, gaps, strict=False) if a > restarted_at + down]
    worst = max(gaps) - interval
    ledger.record(
        f"PostgreSQL restart (immediate) during an evaluation, breach {breach} it",
        runs=1,
        incidents_lost=1 - min(len(found), 1),
        duplicates=max(len(opened) - 1, 0),
        worst_timer_delay_s=worst,
        records_lost=len(ingest.made) - distinct,
    )
    assert len(found) == 1
    assert opened == found, f"more than one incident for one breach: {opened}"
    assert rows == distinct == len(ingest.made)
    # One evaluation waits out the restart (its query retries: 0.5 s, 1 s, 2 s, 4 s apart);
    # afterwards the detector is back on its interval.
    shown = f"down {down:.1f} s; evaluations apart: {[round(g, 2) for g in gaps]}"
    assert retried >= 1, f"no evaluation met the restart: {shown}"
    assert max(during, default=0) <= down + 8, shown
    assert max(after[1:]) <= interval + 2, shown
