"""`pagerloop simulate SCENARIO`: real calls through the instrumented OpenAI client against a
fault-injecting OpenAI-compatible server (llmock), to watch the whole loop: the calls land in
the stores, the detector opens an incident, its runbook sets controls, and the instrumentation
enforces them on the next calls.

This module is the command and its orchestration: it starts the fault server, runs the traffic
with asyncio, switches the faults on at their time, and polls what it shows. The parts:
`cli/scenarios.py` (the traffic and faults of each scenario), `cli/fault_server.py` (llmock),
`cli/simulate_traffic.py` (the application's client and calls), `cli/simulate_watch.py`
(controls and incidents, best effort), `cli/simulate_progress.py` (what happened) and
`cli/simulate_display.py` (the live view and the summary).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Annotated

import openai
import typer
from pagerloop_sdk import Recorder
from rich.console import Console
from rich.live import Live
from sqlalchemy import Engine

from cli.fault_server import FaultServer, InProcessLlmock, RemoteLlmock
from cli.scenarios import FEATURE_PRIORITIES, Scenario, ScenarioSetup, build
from cli.simulate_display import render, summary
from cli.simulate_progress import Progress
from cli.simulate_traffic import make_client, sleep_until, traffic_loop
from cli.simulate_watch import IncidentWatch, poll_controls, poll_incidents
from config import ConfigurationError, Settings, load_settings
from instrumentation.embedded import store_recorder

POLL_SECONDS = 5.0
REFRESH_SECONDS = 0.5
# One log line per call, per HTTP request, and llmock's reports of the answers it was still
# delaying when it stopped: the display says it all.
NOISY_LOGGERS = ("pagerloop.llm_calls", "httpx", "httpx2", "openai", "uvicorn.error")

err = Console(stderr=True)


async def _every(seconds: float, action: Callable[[], Awaitable[None]]) -> None:
    while True:
        await action()
        await asyncio.sleep(seconds)


def _refresh(on_refresh: Callable[[], None]) -> Callable[[], Awaitable[None]]:
    async def refresh() -> None:
        on_refresh()

    return refresh


async def drive(
    setup: ScenarioSetup,
    server: FaultServer,
    client: openai.AsyncOpenAI,
    progress: Progress,
    *,
    engine: Engine,
    settings: Settings,
    on_refresh: Callable[[], None] | None,
) -> None:
    """Run the traffic for the duration: faults switched on at their time, controls and
    incidents read every few seconds when someone is watching."""
    duration = progress.duration
    fault_at = setup.fault_at(duration)
    tasks: list[asyncio.Task[None]] = []
    try:
        for traffic in setup.traffic:
            start, end = 0.0, duration
            if traffic.phase == "before_fault":
                end = fault_at
            elif traffic.phase == "after_fault":
                start = fault_at
            for index in range(traffic.workers):
                tasks.append(
                    asyncio.create_task(traffic_loop(client, traffic, index, start, end, progress))
                )
        if on_refresh is not None:
            watch = IncidentWatch(settings)
            tasks.append(
                asyncio.create_task(_every(POLL_SECONDS, lambda: poll_controls(engine, progress)))
            )
            tasks.append(
                asyncio.create_task(_every(POLL_SECONDS, lambda: poll_incidents(watch, progress)))
            )
            tasks.append(asyncio.create_task(_every(REFRESH_SECONDS, _refresh(on_refresh))))
        if fault_at > 0:
            progress.phase = "healthy"
            await sleep_until(progress, fault_at)
            await asyncio.to_thread(server.apply, setup, True)
        progress.phase = "fault"
        await sleep_until(progress, duration)
    finally:
        progress.finished = time.monotonic()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()


def make_recorder(settings: Settings) -> tuple[Recorder, Engine]:
    """A recorder writing to the configured stores (the instrumentation reads the controls
    from the same store), and the store's engine."""
    return store_recorder(settings)


def run(
    scenario: Scenario,
    *,
    duration: float = 300.0,
    concurrency: int = 4,
    llmock_port: int = 0,
    openai_base_url: str | None = None,
    quiet: bool = False,
    settings: Settings | None = None,
    console: Console | None = None,
) -> Progress:
    """Run one scenario to its end (or Ctrl-C); returns what happened."""
    settings = settings or load_settings()
    console = console or Console()
    setup = build(scenario, concurrency)
    progress = Progress(setup, duration)
    with _silenced(*NOISY_LOGGERS):
        _run(setup, progress, llmock_port, openai_base_url, quiet, settings, console)
    console.print(summary(progress))
    return progress


@contextlib.contextmanager
def _silenced(*names: str) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _run(
    setup: ScenarioSetup,
    progress: Progress,
    llmock_port: int,
    openai_base_url: str | None,
    quiet: bool,
    settings: Settings,
    console: Console,
) -> None:
    duration = progress.duration
    server: InProcessLlmock | RemoteLlmock
    if openai_base_url:
        server = RemoteLlmock(openai_base_url, progress.notes)
        if setup.rpm is not None:
            progress.notes.append(
                f"the quota is llmock's: start it with `llmock serve --rpm {setup.rpm}`"
            )
    else:
        server = InProcessLlmock(llmock_port, setup.rpm)
    recorder, engine = make_recorder(settings)
    try:
        server.apply(setup, setup.fault_at(duration) == 0)
        client = make_client(server.base_url, progress, recorder)
        if not quiet:
            console.print(
                f"llmock at {server.base_url}; calls recorded in {settings.database_url}\n"
                f"[dim]for the runbooks, run the worker with "
                f"PAGERLOOP_FEATURE_PRIORITIES={FEATURE_PRIORITIES}[/dim]"
            )
        progress.started = time.monotonic()
        _drive_with_display(setup, server, client, progress, engine, settings, quiet, console)
    finally:
        recorder.close()
        server.stop()
    if quiet:
        _read_once(engine, settings, progress)


def _drive_with_display(
    setup: ScenarioSetup,
    server: FaultServer,
    client: openai.AsyncOpenAI,
    progress: Progress,
    engine: Engine,
    settings: Settings,
    quiet: bool,
    console: Console,
) -> None:
    def drive_with(on_refresh: Callable[[], None] | None) -> None:
        asyncio.run(
            drive(
                setup,
                server,
                client,
                progress,
                engine=engine,
                settings=settings,
                on_refresh=on_refresh,
            )
        )

    try:
        if quiet:
            drive_with(None)
            return
        with Live(render(progress), console=console, auto_refresh=False, transient=True) as live:
            drive_with(lambda: live.update(render(progress), refresh=True))
    except KeyboardInterrupt:
        progress.interrupted = True


def _read_once(engine: Engine, settings: Settings, progress: Progress) -> None:
    """The controls and incidents for the summary of a run that did not poll them."""

    async def read() -> None:
        await poll_controls(engine, progress)
        await poll_incidents(IncidentWatch(settings), progress)

    asyncio.run(read())


def command(
    scenario: Annotated[Scenario, typer.Argument(help="the failure mode to cause")],
    duration: Annotated[
        float, typer.Option(help="seconds of traffic (an incident needs about 1-2 min)")
    ] = 300.0,
    concurrency: Annotated[
        int, typer.Option(min=1, help="concurrent callers of each main feature")
    ] = 4,
    llmock_port: Annotated[
        int, typer.Option(help="port of the in-process llmock (0: any free port)")
    ] = 0,
    openai_base_url: Annotated[
        str | None,
        typer.Option(
            help="use a running llmock (`llmock serve`) instead, e.g. http://127.0.0.1:8000/v1"
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option(help="no live display, only the final summary")] = False,
) -> None:
    """Drive real calls through the instrumented OpenAI client against llmock, faults injected.

    \b
    rate_limit_exhaustion  llmock allows 240 requests/min per --concurrency; the app sends ~7/s
                           per --concurrency. Runbook: halve concurrency, back off, shed summaries.
    elevated_latency       gpt-4.1 answers in 3 s (9 s streamed), gpt-4.1-mini fast.
                           Runbook: cap max_tokens, reroute gpt-4.1 -> gpt-4.1-mini.
    quality_degradation    after a tenth of the run (30 s at most), the gpt-4.1 alias moves from
                           gpt-4.1-2025-04-14 to a newer snapshot that answers poorly.
                           Runbook (once acknowledged): pin gpt-4.1-2025-04-14.
    cost_spike             after 20 s, summaries send ~6k-token documents to gpt-4.1 and get
                           ~3k-token answers (~$170/h, 8x the default $500/day budget; no budget
                           change needed). Runbook: reroute to gpt-4.1-nano, cap tokens, throttle.
    api_outage             after 5 s, 9 requests in 10 get a 503. Runbook: serve cached
                           responses, disable non-critical features (summaries).

    Run it beside `uv run pagerloop dev` (same PAGERLOOP_DATABASE_URL), with the worker started
    with PAGERLOOP_FEATURE_PRIORITIES=chat=critical,summaries=low. Ctrl-C stops with a summary.
    """
    try:
        settings = load_settings()
    except ConfigurationError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    run(
        scenario,
        duration=duration,
        concurrency=concurrency,
        llmock_port=llmock_port,
        openai_base_url=openai_base_url,
        quiet=quiet,
        settings=settings,
    )
