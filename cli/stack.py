"""Running the service as processes: the API and the worker until a signal, and the whole
embedded stack of `pagerloop dev`. Shutdown always runs in order: the API stops taking
requests, the worker finishes, and only then the Temporal server it may have started."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import uvicorn
from fastapi import FastAPI
from sqlalchemy.engine import make_url
from temporalio.client import Client

import worker as wiring
from cli.devserver import EmbeddedTemporal, answers
from config import Settings

log = logging.getLogger("pagerloop")

SHUTDOWN_SECONDS = 10


class _EmbeddedServer(uvicorn.Server):
    """uvicorn that leaves signal handling to the process that embeds it."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def api_server(settings: Settings, app: FastAPI) -> uvicorn.Server:
    config = uvicorn.Config(
        app,
        host=settings.api_host,
        port=settings.api_port,
        log_level="warning",
        lifespan="off",
        timeout_graceful_shutdown=5,
    )
    return _EmbeddedServer(config)


async def _run_api(server: uvicorn.Server, settings: Settings) -> None:
    try:
        await server.serve()
    except SystemExit:  # uvicorn exits when it cannot bind
        raise RuntimeError(
            f"the API could not listen on {settings.api_host}:{settings.api_port} "
            "(in use? set PAGERLOOP_API_PORT)"
        ) from None


def _on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()

    def signalled() -> None:
        if stop.is_set():
            log.warning("second signal: exiting now")
            os._exit(130)
        log.info("stopping (a second Ctrl-C forces it)")
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, signalled)


async def serve(settings: Settings, *, run_api: bool, run_worker: bool) -> None:
    """Run the API and/or the worker until SIGINT or SIGTERM or a failure, then stop them."""
    client = await wiring.connect_temporal(settings, lazy=not run_worker)
    engine = wiring.open_store(settings)
    stop = asyncio.Event()
    _on_signals(stop)
    running = wiring.build_worker(settings, client, engine) if run_worker else None
    served = wiring.api_engine(settings) if run_api else None
    server = api_server(settings, wiring.build_api(settings, client, served)) if served else None
    tasks: list[asyncio.Task[Any]] = []
    failure: BaseException | None = None
    try:
        if running is not None:
            await wiring.register_search_attributes(client, settings.temporal_namespace)
            tasks.append(asyncio.create_task(running.run(), name="worker"))
            await wiring.ensure_detector(client, settings)
            await wiring.ensure_retention_schedule(client, settings)
        if server is not None:
            if not settings.dev_mode and not settings.user_hash_salt.get_secret_value():
                log.warning(
                    "PAGERLOOP_USER_HASH_SALT is empty: end-user ids are hashed without a "
                    "secret, so a known id can be matched to its hash"
                )
            tasks.append(asyncio.create_task(_run_api(server, settings), name="api"))
        waiter = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        failure = next((t.exception() for t in done if t is not waiter and t.exception()), None)
    finally:
        if server is not None:
            server.should_exit = True
        if running is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(running.shutdown(), SHUTDOWN_SECONDS)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=SHUTDOWN_SECONDS)
            for task in late:
                task.cancel()
        engine.dispose()
        if served is not None:
            served.dispose()
    if failure is not None:
        raise failure


HEALTHY_WITHIN_SECONDS = 30.0


async def _connect_once_healthy(settings: Settings) -> Client:
    """A server that has just opened its port may still say "Frontend is not healthy yet"
    (a restart over an existing database takes longer): ask again until it is."""
    deadline = time.monotonic() + HEALTHY_WITHIN_SECONDS
    while True:
        try:
            return await wiring.connect_temporal(settings)
        except RuntimeError as exc:
            if "not healthy" not in str(exc) or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def run_dev(settings: Settings) -> None:
    """The embedded stack: Temporal dev server with UI, API, worker and detector."""
    settings = settings.model_copy(update={"dev_mode": True})
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    temporal: EmbeddedTemporal | None = None
    if answers(settings.temporal_address):
        log.info("using the Temporal server already at %s", settings.temporal_address)
    else:
        temporal = EmbeddedTemporal(
            settings.temporal_address,
            settings.temporal_ui_port,
            settings.temporal_namespace,
            db_file=settings.data_dir / "temporal.db",
            log_file=settings.data_dir / "temporal.log",
        )
        temporal.start()
    try:
        client = await _connect_once_healthy(settings)
        await wiring.register_search_attributes(client, settings.temporal_namespace)
        ui = temporal.ui_url if temporal else "(the existing server's UI)"
        stores = make_url(settings.database_url).render_as_string(hide_password=True)
        print(
            f"pagerloop dev\n  Temporal UI  {ui}\n  API          {settings.api_url}\n"
            f"  Temporal     {settings.temporal_address} (namespace {settings.temporal_namespace})"
            f"\n  stores       {stores}\n  Ctrl-C stops everything.",
            flush=True,
        )
        await serve(settings, run_api=True, run_worker=True)
    finally:
        if temporal is not None:
            temporal.stop()
        print("pagerloop dev stopped", flush=True)
