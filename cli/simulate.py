"""`pagerloop simulate SCENARIO`: real calls through the instrumented OpenAI client against a
fault-injecting OpenAI-compatible server (llmock), to watch the whole loop: the calls land in
the stores, the detector opens an incident, its runbook sets controls, and the instrumentation
enforces them on the next calls.

The traffic and the faults of each scenario are in `cli/scenarios.py`; this module starts
llmock (in this process, or uses a running one), drives the traffic with asyncio, and shows
what happens. Everything it reads besides its own counters (controls, incidents) is best
effort: a store or a Temporal server that does not answer never stops the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import json
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any, Protocol

import httpx
import openai
import typer
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text
from sqlalchemy import Engine
from temporalio.client import Client

from cli.scenarios import FEATURE_PRIORITIES, Scenario, ScenarioSetup, Traffic, build
from config import ConfigurationError, Settings, load_settings
from instrumentation import Recorder, StoreSink, instrument, llm_context
from instrumentation.classify import classify_exception
from instrumentation.pricing import PriceTable
from stores.engine import create_schema, make_engine
from workflows import search_attributes as sa

STATUSES = ("success", "cached", "rate_limited", "server_error", "error", "disabled")
STYLES = {
    "success": "green",
    "cached": "cyan",
    "rate_limited": "yellow",
    "server_error": "red",
    "error": "red",
    "disabled": "magenta",
}
RECENT_SECONDS = 15.0
POLL_SECONDS = 5.0
REFRESH_SECONDS = 0.5
API_KEY = "pagerloop-simulate"
RESPONSE_CACHE_SIZE = 256
CALL_TIMEOUT_SECONDS = 30.0
DISABLED_PAUSE_SECONDS = 1.0
MIN_CALL_SECONDS = 0.05
CONNECT_TIMEOUT_SECONDS = 3.0
# One log line per call, per HTTP request, and llmock's reports of the answers it was still
# delaying when it stopped: the display says it all.
NOISY_LOGGERS = ("pagerloop.llm_calls", "httpx", "httpx2", "openai", "uvicorn.error")

err = Console(stderr=True)


# --- what happened ---------------------------------------------------------------------------


@dataclass
class Progress:
    """The simulator's own view of its calls, and the last controls and incidents it read."""

    setup: ScenarioSetup
    duration: float
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    phase: str = "starting"
    counts: Counter[str] = field(default_factory=Counter)
    sent: Counter[str] = field(default_factory=Counter)  # HTTP requests per requested model
    served: Counter[str] = field(default_factory=Counter)  # answers per response model
    latencies: list[float] = field(default_factory=list)  # seconds, every finished call
    recent: deque[tuple[float, float]] = field(default_factory=deque)  # (at, seconds)
    recent_sent: deque[tuple[float, str]] = field(default_factory=deque)  # (at, model)
    response_ids: set[str] = field(default_factory=set)
    controls: list[str] | None = None  # None: the store has no controls (yet)
    controls_note: str = "not read yet"
    incidents: list[str] | None = None  # None: not known
    incidents_note: str = "not read yet"
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)

    def elapsed(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    def record(self, status: str, seconds: float, served: str | None) -> None:
        now = time.monotonic()
        self.counts[status] += 1
        self.latencies.append(seconds)
        self.recent.append((now, seconds))
        if served:
            self.served[served] += 1
        self._trim(now)

    def request_sent(self, model: str) -> None:
        now = time.monotonic()
        self.sent[model] += 1
        self.recent_sent.append((now, model))
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self.recent and self.recent[0][0] < now - RECENT_SECONDS:
            self.recent.popleft()
        while self.recent_sent and self.recent_sent[0][0] < now - RECENT_SECONDS:
            self.recent_sent.popleft()

    def recent_p95(self) -> float | None:
        self._trim(time.monotonic())
        return _percentile([seconds for _, seconds in self.recent], 0.95)

    def recent_models(self) -> Counter[str]:
        self._trim(time.monotonic())
        return Counter(model for _, model in self.recent_sent)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)  # nearest rank
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


# --- the fault-injecting server ------------------------------------------------------------


class FaultServer(Protocol):
    base_url: str

    def apply(self, setup: ScenarioSetup, faulty: bool) -> None:
        """Script the behaviours of this phase of the scenario (replacing those before)."""


class ResolveAliases:
    """ASGI middleware answering for an alias with the dated snapshot it points to (the
    response's `model`), as OpenAI does; llmock answers with the requested name. The snapshot
    is chosen when the request arrives, as llmock chooses its answer."""

    def __init__(self, app: Any, aliases: Callable[[], dict[str, str]]) -> None:
        self.app = app
        self.aliases = aliases

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        aliases = self.aliases()
        if scope["type"] != "http" or not aliases:
            await self.app(scope, receive, send)
            return
        start: dict[str, Any] | None = None
        chunks: list[bytes] = []

        async def rewrite(message: dict[str, Any]) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                types = [v for k, v in message.get("headers", []) if k == b"content-type"]
                if types and types[0].startswith(b"application/json"):
                    start = message  # held until the body is complete
                    return
            elif message["type"] == "http.response.body" and start is not None:
                chunks.append(message.get("body", b""))
                if message.get("more_body"):
                    return
                body = _resolve_model(b"".join(chunks), aliases)
                kept = [(k, v) for k, v in start.get("headers", []) if k != b"content-length"]
                kept.append((b"content-length", str(len(body)).encode()))
                await send({**start, "headers": kept})
                message = {"type": "http.response.body", "body": body}
            await send(message)

        await self.app(scope, receive, rewrite)


def _resolve_model(body: bytes, aliases: dict[str, str]) -> bytes:
    try:
        data = json.loads(body)
    except ValueError:
        return body
    if not isinstance(data, dict) or data.get("model") not in aliases:
        return body
    data["model"] = aliases[data["model"]]
    return json.dumps(data).encode()


class InProcessLlmock:
    """llmock in a thread of this process: its scenario queue, error rates, quota and the
    snapshots its aliases answer as set directly."""

    def __init__(self, port: int, rpm: int | None) -> None:
        try:
            from llmock.ratelimit import LimitSettings
            from llmock.testing import LLMockServer
        except ImportError:
            err.print(
                "[red]llmock is not installed: `uv sync` installs it (dev group), or start one "
                "elsewhere and pass --openai-base-url[/red]"
            )
            raise typer.Exit(2) from None
        self.aliases: dict[str, str] = {}
        self.server = LLMockServer(port=port)
        self.server.app.add_middleware(ResolveAliases, aliases=lambda: self.aliases)
        self.server.start()
        self.base_url = self.server.base_url("openai")
        if rpm is not None:
            limiter = self.server.state.limiter
            limiter.configure(LimitSettings(rpm=rpm))
            # Start with this minute's quota spent, as a busy application would.
            for _ in range(rpm):
                limiter.admit("openai", f"Bearer {API_KEY}", 0)

    def apply(self, setup: ScenarioSetup, faulty: bool) -> None:
        from llmock.scenarios import behavior_from_dict

        state = self.server.state
        state.chaos.error_rates = dict(setup.error_rates) if faulty else {}
        self.aliases = setup.served_as(faulty)
        state.scenarios.clear()
        state.scenarios.add(*(behavior_from_dict(b) for b in setup.behaviors(faulty)))

    def stop(self) -> None:
        # Do not wait for the answers still being delayed: nobody is waiting for them.
        uvicorn_server = getattr(self.server, "_server", None)
        if uvicorn_server is not None:
            uvicorn_server.force_exit = True
        self.server.stop()


class RemoteLlmock:
    """A running llmock (`llmock serve`), scripted through its `/_llmock/scenario` API."""

    def __init__(self, base_url: str, progress: Progress) -> None:
        self.base_url = base_url.rstrip("/")
        root = self.base_url.removesuffix("/v1")
        self.admin = f"{root}/_llmock/scenario"
        self.progress = progress

    def apply(self, setup: ScenarioSetup, faulty: bool) -> None:
        behaviors = setup.behaviors(faulty)
        if setup.served_as(faulty) and not self.progress.notes:
            self.progress.notes.append(
                "this llmock answers as the model requested: the runbook finds no earlier "
                "snapshot to pin (the in-process llmock answers as the snapshots)"
            )
        if faulty and setup.error_rates:
            # Error rates are set when llmock starts; over its API, the errors are scripted.
            rates = " ".join(f"--error-rate {s}={r}" for s, r in setup.error_rates)
            self.progress.notes.append(
                f"every request fails here: `llmock serve {rates}` fails only some of them"
            )
            fails = [{"type": "fail", "status": s, "times": None} for s, _ in setup.error_rates]
            behaviors = [*fails, *behaviors]
        try:
            httpx.delete(self.admin, timeout=5).raise_for_status()
            if behaviors:
                httpx.post(self.admin, json={"behaviors": behaviors}, timeout=5).raise_for_status()
        except httpx.HTTPError as exc:
            self.progress.notes.append(f"could not script the faults at {self.admin}: {exc}")

    def stop(self) -> None:
        pass


# --- controls and incidents, best effort ---------------------------------------------------


def read_controls(engine: Engine) -> list[str] | None:
    """One line per active control, or None when this version has no controls store."""
    try:
        store = importlib.import_module("stores.controls")
    except ImportError:
        return None
    return [str(row.description) for row in store.active(engine, datetime.now(UTC))]


class IncidentWatch:
    """Open incidents of this task queue, by visibility query (as `pagerloop incidents list`)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client: Client | None = None

    async def fetch(self) -> tuple[list[str] | None, str]:
        """One line per open incident (None when unknown), or why there is none."""
        address = self.settings.temporal_address
        try:
            if self.client is None:
                self.client = await asyncio.wait_for(
                    Client.connect(address, namespace=self.settings.temporal_namespace),
                    CONNECT_TIMEOUT_SECONDS,
                )
        except Exception:  # never stop the run for it
            return None, f"Temporal not reachable at {address}"
        query = (
            "WorkflowType = 'IncidentWorkflow' AND ExecutionStatus = 'Running' "
            f"AND TaskQueue = {sa.literal(self.settings.task_queue)}"
        )
        found = []
        try:
            async for execution in self.client.list_workflows(query, limit=20):
                attrs = execution.typed_search_attributes
                found.append(
                    f"{attrs.get(sa.INCIDENT_SEVERITY)} {attrs.get(sa.INCIDENT_TRIGGER)} · "
                    f"{attrs.get(sa.INCIDENT_SCOPE)} · {attrs.get(sa.INCIDENT_STATUS)} · "
                    f"L{attrs.get(sa.INCIDENT_LEVEL)}  [dim]{execution.id}[/dim]"
                )
        except Exception as exc:  # never stop the run for it
            self.client = None
            return None, f"could not list incidents at {address}: {type(exc).__name__}"
        return found, "" if found else "no open incident"


async def poll_controls(engine: Engine, progress: Progress) -> None:
    try:
        progress.controls = await asyncio.to_thread(read_controls, engine)
        progress.controls_note = (
            "this version has no controls store"
            if progress.controls is None
            else ("" if progress.controls else "none active")
        )
    except Exception as exc:  # never stop the run for it
        progress.controls_note = f"could not read: {type(exc).__name__}"


async def poll_incidents(watch: IncidentWatch, progress: Progress) -> None:
    progress.incidents, progress.incidents_note = await watch.fetch()


# --- the traffic ---------------------------------------------------------------------------


def _feature_disabled() -> tuple[type[BaseException], ...]:
    """The exception the instrumentation raises for a disabled feature, when it has one."""
    found = getattr(importlib.import_module("instrumentation"), "FeatureDisabled", None)
    return (found,) if isinstance(found, type) and issubclass(found, BaseException) else ()


def _status(exc: BaseException) -> str:
    status = classify_exception(exc)[0]
    return status if status in STATUSES else "error"


def make_client(base_url: str, progress: Progress, recorder: Recorder) -> openai.AsyncOpenAI:
    """The application's client: no retries of its own (backoff comes from the controls),
    instrumented with a response cache when the instrumentation offers one."""

    async def count_request(request: Any) -> None:
        try:
            model = json.loads(request.content).get("model")
        except (ValueError, AttributeError, TypeError):
            return
        if isinstance(model, str):
            progress.request_sent(model)

    http_client = openai.DefaultAsyncHttpxClient(event_hooks={"request": [count_request]})
    client = openai.AsyncOpenAI(
        base_url=base_url,
        api_key=API_KEY,
        max_retries=0,
        timeout=CALL_TIMEOUT_SECONDS,
        http_client=http_client,
    )
    options: dict[str, Any] = {"recorder": recorder}
    if "response_cache" in inspect.signature(instrument).parameters:
        options["response_cache"] = RESPONSE_CACHE_SIZE
    return instrument(client, **options)


async def one_call(
    client: openai.AsyncOpenAI,
    traffic: Traffic,
    worker_index: int,
    call_number: int,
    progress: Progress,
    disabled: tuple[type[BaseException], ...],
) -> tuple[str, float]:
    kwargs = traffic.request(call_number)
    started = time.perf_counter()
    served: str | None = None
    with llm_context(
        feature=traffic.feature,
        team="simulate",
        environment="simulate",
        user_id=f"sim-user-{worker_index % 7}",
        session_id=f"sim-{traffic.feature}-{worker_index}",
    ):
        try:
            response_id: str | None = None
            if kwargs.get("stream"):
                stream = await client.chat.completions.create(**kwargs)
                async for chunk in stream:
                    served = chunk.model or served
                    response_id = chunk.id or response_id
            else:
                response = await client.chat.completions.create(**kwargs)
                served, response_id = response.model, response.id
            # A response seen before came from the response cache (llmock's ids are unique).
            status = "cached" if response_id in progress.response_ids else "success"
            if response_id:
                progress.response_ids.add(response_id)
        except disabled:
            status = "disabled"
        except Exception as exc:
            status = _status(exc)
    seconds = time.perf_counter() - started
    progress.record(status, seconds, served)
    return status, seconds


async def _sleep_until(progress: Progress, at: float) -> None:
    delay = at - progress.elapsed()
    if delay > 0:
        await asyncio.sleep(delay)


async def traffic_loop(
    client: openai.AsyncOpenAI,
    traffic: Traffic,
    worker_index: int,
    start: float,
    end: float,
    progress: Progress,
    disabled: tuple[type[BaseException], ...],
) -> None:
    await _sleep_until(progress, start)
    call_number = worker_index  # loops of one feature start on different prompts
    while progress.elapsed() < end:
        status, seconds = await one_call(
            client, traffic, worker_index, call_number, progress, disabled
        )
        call_number += 1
        pause = traffic.think_seconds
        if status == "disabled":
            pause = max(pause, DISABLED_PAUSE_SECONDS)  # the app shows "unavailable" a while
        elif seconds < MIN_CALL_SECONDS:
            pause = max(pause, MIN_CALL_SECONDS)  # instant failures: no busy loop
        await asyncio.sleep(min(pause, max(0.0, end - progress.elapsed())))


async def _every(seconds: float, action: Callable[[], Awaitable[None]]) -> None:
    while True:
        await action()
        await asyncio.sleep(seconds)


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
    disabled = _feature_disabled()
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
                    asyncio.create_task(
                        traffic_loop(client, traffic, index, start, end, progress, disabled)
                    )
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
            await _sleep_until(progress, fault_at)
            await asyncio.to_thread(server.apply, setup, True)
        progress.phase = "fault"
        await _sleep_until(progress, duration)
    finally:
        progress.finished = time.monotonic()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()


def _refresh(on_refresh: Callable[[], None]) -> Callable[[], Awaitable[None]]:
    async def refresh() -> None:
        on_refresh()

    return refresh


# --- display -------------------------------------------------------------------------------


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes:02d}:{secs:02d}"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.0f} ms"


def _status_table(progress: Progress) -> Table:
    table = Table(title="calls by status", title_justify="left", expand=False)
    for status in STATUSES:
        table.add_column(status, justify="right", style=STYLES[status])
    total = progress.total or 1
    table.add_row(
        *(
            f"{progress.counts[s]:,} ({progress.counts[s] / total:.0%})"
            if progress.counts[s]
            else "0"
            for s in STATUSES
        )
    )
    return table


def _models_table(progress: Progress, recent: bool = True) -> Table:
    """Requests sent per model (after any reroute or pin), and answers per model they came
    back as (a snapshot, or a cached answer)."""
    table = Table(title="models", title_justify="left")
    table.add_column("model")
    if recent:
        table.add_column(f"requests, last {RECENT_SECONDS:.0f} s", justify="right")
    table.add_column("requests", justify="right")
    table.add_column("answered as", justify="right")
    last = progress.recent_models()
    for model in sorted(set(progress.sent) | set(progress.served)):
        counts = [progress.sent[model], progress.served[model]]
        if recent:
            counts.insert(0, last[model])
        table.add_row(model, *(f"{count:,}" for count in counts))
    return table


def _lines(title: str, lines: list[str] | None, note: str) -> Text:
    text = Text.from_markup(f"[bold]{title}[/bold]: ")
    if lines:
        text.append_text(Text.from_markup("\n  " + "\n  ".join(lines)))
    else:
        text.append(note, style="dim")
    return text


def render(progress: Progress) -> RenderableType:
    setup = progress.setup
    header = Text.from_markup(
        f"[bold]pagerloop simulate {setup.scenario}[/bold]  "
        f"{_clock(progress.elapsed())} / {_clock(progress.duration)}  phase: "
        f"[{'red' if progress.phase == 'fault' else 'green'}]{progress.phase}[/]\n"
        f"[dim]fault:[/dim] {setup.fault}\n[dim]runbook:[/dim] {setup.mitigation}"
        + (f"\n[yellow]{setup.hint}[/yellow]" if setup.hint else "")
    )
    p95 = Text.from_markup(
        f"[bold]p95 latency, last {RECENT_SECONDS:.0f} s[/bold]: {_ms(progress.recent_p95())}"
        f"   [bold]calls[/bold]: {progress.total:,}"
        f" ({progress.total / max(progress.elapsed(), 1e-3):.1f}/s)"
    )
    parts: list[RenderableType] = [
        header,
        _status_table(progress),
        p95,
        _models_table(progress),
        _lines("active controls", progress.controls, progress.controls_note),
        _lines("open incidents", progress.incidents, progress.incidents_note),
    ]
    parts += [Text(note, style="yellow") for note in progress.notes[-3:]]
    return Group(*parts)


def summary(progress: Progress) -> RenderableType:
    setup = progress.setup
    how = "interrupted" if progress.interrupted else "done"
    lines: list[RenderableType] = [
        Text.from_markup(
            f"[bold]pagerloop simulate {setup.scenario}[/bold]: {how} after "
            f"{_clock(progress.elapsed())}, {progress.total:,} calls, p50 "
            f"{_ms(_percentile(progress.latencies, 0.5))}, p95 "
            f"{_ms(_percentile(progress.latencies, 0.95))}"
        ),
        _status_table(progress),
        _models_table(progress, recent=False),
        _lines("active controls", progress.controls, progress.controls_note),
        _lines("open incidents", progress.incidents, progress.incidents_note),
        *(Text(note, style="yellow") for note in [*progress.notes, setup.hint] if note),
        Text.from_markup(
            "[dim]next: `uv run pagerloop incidents list`, the Temporal UI, "
            f"and PAGERLOOP_FEATURE_PRIORITIES={FEATURE_PRIORITIES} on the worker[/dim]"
        ),
    ]
    return Group(*lines)


# --- running it ----------------------------------------------------------------------------


def make_recorder(settings: Settings) -> tuple[Recorder, Engine]:
    """A recorder writing to the configured stores, as `instrument(client)` would make (the
    instrumentation reads the controls from the same store), and the store's engine."""
    engine = make_engine(settings.database_url)
    create_schema(engine)
    recorder = Recorder(
        StoreSink(engine),
        salt=settings.user_hash_salt.get_secret_value(),
        prices=PriceTable.from_file(settings.prices_file),
        quality_sample_rate=settings.quality_sample_rate,
    )
    return recorder, engine


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
        server = RemoteLlmock(openai_base_url, progress)
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
    try:
        if quiet:
            asyncio.run(
                drive(
                    setup,
                    server,
                    client,
                    progress,
                    engine=engine,
                    settings=settings,
                    on_refresh=None,
                )
            )
            return
        with Live(render(progress), console=console, auto_refresh=False, transient=True) as live:

            def refresh() -> None:
                live.update(render(progress), refresh=True)

            asyncio.run(
                drive(
                    setup,
                    server,
                    client,
                    progress,
                    engine=engine,
                    settings=settings,
                    on_refresh=refresh,
                )
            )
    except KeyboardInterrupt:
        progress.interrupted = True


def _read_once(engine: Engine, settings: Settings, progress: Progress) -> None:
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
