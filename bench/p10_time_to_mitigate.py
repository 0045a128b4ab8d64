"""P10: time to mitigate, for each failure mode of `pagerloop simulate`, on the embedded stack:
first bad call → incident → first control applied → verified.

One Temporal dev server and the Slack, PagerDuty and Jira fakes (tests/fakes, real HTTP) serve
all runs. Each run (one scenario, once) gets its own SQLite store, task queue, worker and
detector, wired as worker.py wires them (`build_worker`, `ensure_detector`) with
PAGERLOOP_FEATURE_PRIORITIES=chat=critical,summaries=low, as `pagerloop simulate` asks. At a
random phase of the detector's cycle (0 to one interval after its first evaluation, seeded: as
P4 draws its breach's), the application starts: `pagerloop simulate SCENARIO --quiet` in a
process of its own (an app beside the worker, as deployed: it shares no interpreter lock with
the worker, and its CPU is counted apart), recording through the instrumented OpenAI client into
the run's store. It is stopped (SIGINT, which ends it with its summary) once the runbook has
concluded, or at the timeout. A process runs its runs one after another (the safe default).
Processes started side by side (one per `--scenario`) share nothing but the CPU: each has its
own dev server, stores, task queue, detector and llmock port; each run prints the CPU its stack
used (this process, the dev server, the app) and the load average, so contention shows.

Read from the run's store and the incidents' `state` query every 0.5 s:
- first bad call: the start (`ts`) of the first recorded call of the faulty traffic (response
  cache hits excluded), per scenario: BAD_CALLS below;
- first bad minute: that call's minute, the detector's unit (its rollups count whole minutes);
- incident: `opened_at` (the evaluation that fired) of the first incident whose trigger is one
  of the scenario's runbook's (e.g. cost_spike or budget_exhaustion);
- first control: the earliest `controls.created_at` of those incidents (a canary slice counts:
  it is in force on real traffic);
- verified: `verified_at` of the incident that set that control (its "verified" timeline entry).
  A runbook that concludes otherwise (not_recovered, inconclusive, runbook_failed) shows that
  verdict instead, and a run that has not concluded by the timeout shows "timeout".

The bench stands in for the people: an approval a runbook asks (`decide_approval`) and the
acknowledgement the quality runbook waits for (`acknowledge`) are answered within one poll,
through the same updates the CLI sends. That wait is inside the figures and printed as
zero-human-time: in a real incident a person's answer comes on top.

Target (issue #15): incident within one detector interval + 3 s of the first bad minute, first
control within 10 s after that. "Of the first bad minute" is read from the end of that minute,
when it is whole in the per-minute rollups the detector reads (it reads the current minute too,
so it may fire earlier: a negative figure). The first bad call lands anywhere in its minute:
from the minute's start, the target is out of reach for a call late in it (that figure, and
the runs within the target by it, are printed too). Judged on the median of the runs (the
README's table); the number of runs within each target is printed beside it.

    uv run python -m bench.p10_time_to_mitigate [--runs 5] [--scenario X ...] [--interval 30]
        [--verify-seconds N] [--timeout 720] [--seed 10]

`--verify-seconds` lowers PAGERLOOP_RUNBOOK_VERIFY_SECONDS (the canary and verification
windows, 180 s by default): runs end sooner, the detection and first-control figures do not
depend on it, and the bench says so when it is used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func
from sqlalchemy.sql import ColumnElement
from sqlmodel import Session, col, select
from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.service import RPCError

import worker
from bench.stack import (
    TimedJira,
    TimedPagerDuty,
    TimedSlack,
    child_pids,
    cpu_seconds,
    dev_server,
    settings_environment,
    stack_settings,
)
from cli.scenarios import FEATURE_PRIORITIES, NEW_SNAPSHOT, Scenario, build
from config import Settings
from detectors.detector import DetectorWorkflow
from domain import search_attributes as sa
from domain.incident import ActionRequest, ApprovalDecision, IncidentState
from domain.workflow_names import detector_workflow_id
from runbooks import RUNBOOKS
from stores.controls import Control
from stores.llm_calls import LLMCall, utc
from workflows.incident import IncidentWorkflow

POLL_SECONDS = 0.5
FIRST_CONTROL_TARGET_S = 10.0
BENCH_USER = "p10-bench"  # who the timeline says answered
APP_STOP_SECONDS = 30.0
MINUTE = timedelta(minutes=1)
# The timeline entries a runbook's run ends with (runbooks/steps.py `verify`, the incident).
CONCLUSIONS = ("verified", "verification", "rolled_back", "runbook_failed")


def _faulty_latency() -> ColumnElement[bool]:
    # Healthy calls take 0.2 s; gpt-4.1's faulty ones at least llmock's 3 s delay.
    return (col(LLMCall.model) == "gpt-4.1") & (col(LLMCall.latency_ms) >= 2500)


def _large_summary() -> ColumnElement[bool]:
    # The calm summaries send a prompt of ~15 tokens; the spike's a ~6,000-token document.
    return (
        (col(LLMCall.feature) == "summaries")
        & (col(LLMCall.model) == "gpt-4.1")
        & (col(LLMCall.input_tokens) >= 3000)
    )


@dataclass(frozen=True)
class BadCall:
    what: str
    where: Callable[[], ColumnElement[bool]]


BAD_CALLS: dict[Scenario, BadCall] = {
    Scenario.RATE_LIMIT_EXHAUSTION: BadCall(
        "the first 429 (rate_limited)", lambda: col(LLMCall.status) == "rate_limited"
    ),
    Scenario.ELEVATED_LATENCY: BadCall("the first gpt-4.1 call taking >= 2.5 s", _faulty_latency),
    Scenario.QUALITY_DEGRADATION: BadCall(
        f"the first call answered by {NEW_SNAPSHOT}",
        lambda: col(LLMCall.response_model) == NEW_SNAPSHOT,
    ),
    Scenario.COST_SPIKE: BadCall(
        "the first summaries call to gpt-4.1 with a >= 3,000-token prompt", _large_summary
    ),
    Scenario.API_OUTAGE: BadCall(
        "the first 503 (server_error)",
        lambda: (col(LLMCall.status) == "server_error") | (col(LLMCall.http_status) == 503),
    ),
}


def runbook_triggers(scenario: Scenario) -> tuple[str, ...]:
    """The triggers of the runbook named after the scenario: its incidents are the scenario's."""
    return next(spec.triggers for spec in RUNBOOKS if spec.name == scenario.value)


# --- what a run measured ----------------------------------------------------------------------


@dataclass
class Answer:
    """An ask the bench answered: what, and how long it waited for the answer."""

    what: str
    waited: float


@dataclass
class Run:
    scenario: Scenario
    number: int
    started: datetime
    first_bad: datetime | None = None
    incident: IncidentState | None = None  # the first of the scenario's incidents
    first_control: Control | None = None
    mitigating: IncidentState | None = None  # the incident that set the first control
    ended: datetime | None = None
    timed_out: bool = False
    answers: list[Answer] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)
    wall: float = 0.0
    load: tuple[float, float] = (0.0, 0.0)
    phase: float = 0.0  # seconds after the detector's first evaluation the app started

    @property
    def first_bad_minute(self) -> datetime | None:
        return self.first_bad.replace(second=0, microsecond=0) if self.first_bad else None

    @property
    def opened(self) -> datetime | None:
        return self.incident.opened_at if self.incident else None

    @property
    def detect(self) -> float | None:
        return _between(self.first_bad, self.opened)

    @property
    def detect_from_minute(self) -> float | None:
        """From the start of the first bad minute."""
        return _between(self.first_bad_minute, self.opened)

    @property
    def detect_after_minute(self) -> float | None:
        """From the end of the first bad minute, the moment the detector has it whole (the
        target's reference); negative: it fired before the minute was over."""
        minute = self.first_bad_minute
        return _between(minute + MINUTE if minute else None, self.opened)

    @property
    def control_at(self) -> datetime | None:
        return utc(self.first_control.created_at) if self.first_control else None

    @property
    def mitigate(self) -> float | None:
        return _between(self.opened, self.control_at)

    @property
    def verified_at(self) -> datetime | None:
        return self.mitigating.verified_at if self.mitigating else None

    @property
    def to_verified(self) -> float | None:
        return _between(self.first_bad, self.verified_at)

    @property
    def verdict(self) -> str:
        state = self.mitigating or self.incident
        if state is None:
            return "no incident"
        if state.verification:
            return state.verification
        if any(entry.kind == "runbook_failed" for entry in state.timeline):
            return "runbook_failed"
        return "timeout" if self.timed_out else state.runbook_phase or "-"

    @property
    def to_verdict(self) -> float | None:
        """First bad call → the runbook's conclusion, whichever it was."""
        state = self.mitigating
        if state is None or state.runbook_phase != "done":
            return None
        ends = [e.at for e in state.timeline if e.kind in CONCLUSIONS]
        return _between(self.first_bad, ends[-1] if ends else None)

    @property
    def concluded(self) -> bool:
        state = self.mitigating
        return state is not None and state.runbook_phase == "done"


def _between(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return (end - start).total_seconds()


# --- the run's store and incidents ------------------------------------------------------------


def first_bad_call(engine: Engine, scenario: Scenario) -> datetime | None:
    with Session(engine) as session:
        first = session.exec(
            select(func.min(LLMCall.ts)).where(
                BAD_CALLS[scenario].where(), col(LLMCall.source) != "cache"
            )
        ).one()
    return utc(first) if first is not None else None


def first_control(engine: Engine, incident_ids: list[str]) -> Control | None:
    if not incident_ids:
        return None
    with Session(engine) as session:
        return session.exec(
            select(Control)
            .where(col(Control.incident_id).in_(incident_ids))
            .order_by(col(Control.created_at), col(Control.id))
            .limit(1)
        ).first()


async def incident_states(client: Client, task_queue: str) -> list[IncidentState]:
    """Every incident of the run's task queue (open or not), oldest first."""
    query = f"WorkflowType = 'IncidentWorkflow' AND TaskQueue = {sa.literal(task_queue)}"
    states = []
    async for execution in client.list_workflows(query, limit=100):
        handle = client.get_workflow_handle_for(IncidentWorkflow.run, execution.id)
        with contextlib.suppress(RPCError):
            states.append(await handle.query(IncidentWorkflow.state))
    return sorted(states, key=lambda s: s.opened_at)


async def answer_asks(
    client: Client, state: IncidentState, answers: list[Answer], tried: set[str]
) -> None:
    """Approve what the runbook asks and acknowledge what it waits for, at once, through the
    updates the CLI sends (`pagerloop incidents approve|ack`); each once (`tried`: what was
    answered, refused answers included)."""
    handle = client.get_workflow_handle_for(IncidentWorkflow.run, state.incident_id)
    on = f"{state.trigger} on {state.scope}"
    for approval in state.pending_approvals():
        if approval.approval_id in tried:
            continue
        tried.add(approval.approval_id)
        decision = ApprovalDecision(
            approval.approval_id, True, BENCH_USER, "p10: answered at once", "cli"
        )
        what = f"approval of {approval.step} ({on})"
        try:
            await handle.execute_update(IncidentWorkflow.decide_approval, decision)
        except (WorkflowUpdateFailedError, RPCError) as exc:  # expired or withdrawn meanwhile
            what += f" refused: {getattr(exc, 'cause', None) or exc}"
        answers.append(Answer(what, (datetime.now(UTC) - approval.asked_at).total_seconds()))
    acknowledge = f"{state.incident_id}/acknowledge"
    if state.runbook_phase == "diagnosed" and state.acknowledged_by is None:
        if acknowledge in tried:
            return
        tried.add(acknowledge)
        diagnosed = [e.at for e in state.timeline if e.kind == "diagnosis"]
        since = diagnosed[-1] if diagnosed else state.opened_at
        request = ActionRequest(BENCH_USER, "cli", "p10: acknowledged at once")
        what = f"acknowledgement ({on})"
        try:
            await handle.execute_update(IncidentWorkflow.acknowledge, request)
        except (WorkflowUpdateFailedError, RPCError) as exc:
            what += f" refused: {getattr(exc, 'cause', None) or exc}"
        answers.append(Answer(what, (datetime.now(UTC) - since).total_seconds()))


async def terminate_queue(client: Client, task_queue: str) -> None:
    """Out of the dev server's way: the run's detector and incidents (their runbooks go with
    them, a child's parent close policy)."""
    query = f"TaskQueue = {sa.literal(task_queue)} AND ExecutionStatus = 'Running'"
    async for execution in client.list_workflows(query):
        with contextlib.suppress(RPCError):
            await client.get_workflow_handle(execution.id).terminate("p10 run measured")


async def detector_evaluated(client: Client, settings: Settings) -> None:
    handle = client.get_workflow_handle_for(
        DetectorWorkflow.run, detector_workflow_id(settings.task_queue)
    )
    while True:
        if (await handle.query(DetectorWorkflow.status)).evaluations >= 1:
            return
        await asyncio.sleep(0.2)


# --- the application: `pagerloop simulate` in a process of its own ----------------------------


def start_app(
    scenario: Scenario, settings: Settings, folder: Path, duration: float
) -> subprocess.Popen[bytes]:
    root = Path(__file__).resolve().parent.parent
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PAGERLOOP_")}
    environment |= settings_environment(settings)
    environment |= {"PAGERLOOP_FEATURE_PRIORITIES": FEATURE_PRIORITIES, "PYTHONPATH": str(root)}
    log = (folder / "simulate.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "cli.main", "simulate", scenario.value, "--quiet",
         "--duration", str(duration)],
        cwd=folder,  # no .env of the repo's
        env=environment,
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip


def stop_app(app: subprocess.Popen[bytes]) -> None:
    if app.poll() is None:
        app.send_signal(signal.SIGINT)  # Ctrl-C: it stops its traffic and prints its summary
        try:
            app.wait(APP_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            app.kill()
            app.wait()


def tail(path: Path, chars: int = 2000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else ""


class CpuMeter:
    """CPU seconds of this process (worker, detector, vendor fakes, polling), the Temporal dev
    server and the app, over a run."""

    def __init__(self, app_pid: int) -> None:
        self.pids = {"worker+bench": os.getpid(), "app (simulate)": app_pid}
        for pid in child_pids(os.getpid(), "temporal"):
            self.pids["Temporal dev server"] = pid
        self.before = self.read()
        self.last = dict(self.before)

    def read(self) -> dict[str, float]:
        found = {}
        for name, pid in self.pids.items():
            with contextlib.suppress(OSError):
                found[name] = cpu_seconds(pid)
        return found

    def sample(self) -> None:
        """Before the app exits, while /proc still has it."""
        self.last = self.read()

    def used(self) -> dict[str, float]:
        return {name: self.last.get(name, 0.0) - self.before[name] for name in self.before}


# --- one run ----------------------------------------------------------------------------------


async def one_run(
    client: Client,
    address: str,
    scenario: Scenario,
    number: int,
    args: argparse.Namespace,
    vendors: tuple[TimedSlack, TimedPagerDuty, TimedJira],
    phase: float,
) -> Run:
    overrides: dict[str, Any] = {"feature_priorities": FEATURE_PRIORITIES}
    if args.verify_seconds is not None:
        overrides["runbook_verify_seconds"] = args.verify_seconds
    with tempfile.TemporaryDirectory(prefix="p10-") as name:
        folder = Path(name)
        settings = stack_settings(
            folder,
            f"bench-p10-{scenario.value}-{uuid.uuid4().hex[:8]}",
            args.interval,
            *vendors,
            temporal_address=address,
            **overrides,
        )
        engine = worker.open_store(settings)
        try:
            async with worker.build_worker(settings, client, engine):
                await worker.ensure_detector(client, settings)
                await detector_evaluated(client, settings)
                # The fault's phase in the detector's cycle, drawn per run: the same phase every
                # run would measure one point of the cycle five times.
                await asyncio.sleep(phase)
                try:
                    run = await watch(client, engine, settings, scenario, number, folder, args)
                    run.phase = phase
                    return run
                finally:
                    # Bounded: after a Ctrl-C the dev server may be gone already.
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(terminate_queue(client, settings.task_queue), 15)
        finally:
            engine.dispose()


async def watch(
    client: Client,
    engine: Engine,
    settings: Settings,
    scenario: Scenario,
    number: int,
    folder: Path,
    args: argparse.Namespace,
) -> Run:
    triggers = runbook_triggers(scenario)
    run = Run(scenario, number, datetime.now(UTC), load=(os.getloadavg()[0], 0.0))
    started = time.monotonic()
    tried: set[str] = set()
    # The app runs past the timeout: it is stopped, never out of traffic while measured.
    app = start_app(scenario, settings, folder, args.timeout + 60)
    meter = CpuMeter(app.pid)
    try:
        while not run.concluded:
            if app.poll() is not None:
                raise RuntimeError(
                    f"{scenario}: simulate exited ({app.returncode}):\n"
                    f"{tail(folder / 'simulate.log')}"
                )
            if time.monotonic() - started > args.timeout:
                run.timed_out = True
                break
            if run.first_bad is None:
                run.first_bad = await asyncio.to_thread(first_bad_call, engine, scenario)
            ours = [s for s in await incident_states(client, settings.task_queue)
                    if s.trigger in triggers]  # fmt: skip
            if ours:
                run.incident = ours[0]
            for state in ours:
                await answer_asks(client, state, run.answers, tried)
            if run.first_control is None:
                ids = [s.incident_id for s in ours]
                run.first_control = await asyncio.to_thread(first_control, engine, ids)
            if run.first_control is not None:
                owner = run.first_control.incident_id
                run.mitigating = next((s for s in ours if s.incident_id == owner), None)
            await asyncio.sleep(POLL_SECONDS)
        meter.sample()
    finally:
        await asyncio.to_thread(stop_app, app)
    run.ended = datetime.now(UTC)
    run.wall = time.monotonic() - started
    run.cpu = meter.used()
    run.load = (run.load[0], os.getloadavg()[0])
    return run


# --- the report -------------------------------------------------------------------------------


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def run_line(run: Run) -> str:
    incident = run.incident
    where = f"{incident.trigger} on {incident.scope}" if incident else "no incident"
    control = run.first_control.description if run.first_control else "no control"
    bad = f"{run.first_bad:%H:%M:%S.%f}"[:-3] + " UTC" if run.first_bad else "none recorded"
    answered = ", ".join(f"{a.what} after {a.waited:.1f}s" for a in run.answers) or "none"
    cpu = ", ".join(f"{name} {seconds:.0f}s" for name, seconds in run.cpu.items())
    share = sum(run.cpu.values()) / (run.wall * (os.cpu_count() or 1)) if run.wall else 0.0
    return (
        f"  {run.scenario.value} run {run.number}: first bad call {bad}; incident {where} "
        f"after {fmt(run.detect)}s ({fmt(run.detect_from_minute)}s from the start of its minute, "
        f"{fmt(run.detect_after_minute)}s from its end); first control +{fmt(run.mitigate)}s "
        f"({control}); verdict {run.verdict} {fmt(run.to_verdict)}s after the first bad call\n"
        f"      answered by the bench (zero human time): {answered}\n"
        f"      app started {run.phase:.1f}s after the detector's first evaluation; "
        f"{run.wall:.0f}s wall; CPU {cpu} ({share:.0%} of {os.cpu_count()} cores); "
        f"load average {run.load[0]:.1f} -> {run.load[1]:.1f}"
    )


@dataclass
class Figures:
    scenario: Scenario
    runs: list[Run]
    interval: int

    def values(self, name: str) -> list[float]:
        return [v for r in self.runs if (v := getattr(r, name)) is not None]

    def median_max(self, name: str) -> tuple[float | None, float | None]:
        values = self.values(name)
        return (statistics.median(values), max(values)) if values else (None, None)

    @property
    def detect_target(self) -> float:
        return self.interval + 3.0

    def within(self, name: str, target: float) -> int:
        return sum(1 for v in self.values(name) if v <= target)

    @property
    def met(self) -> bool:
        detect, _ = self.median_max("detect_after_minute")
        mitigate, _ = self.median_max("mitigate")
        complete = (
            len(self.values("detect_after_minute"))
            == len(self.runs)
            == len(self.values("mitigate"))
        )
        return (
            complete
            and detect is not None
            and mitigate is not None
            and detect <= self.detect_target
            and mitigate <= FIRST_CONTROL_TARGET_S
        )

    def verdicts(self) -> str:
        counts: dict[str, int] = {}
        for r in self.runs:
            counts[r.verdict] = counts.get(r.verdict, 0) + 1
        return ", ".join(f"{k} {v}/{len(self.runs)}" for k, v in counts.items())


def pair(values: tuple[float | None, float | None]) -> str:
    return f"{fmt(values[0])} / {fmt(values[1])}"


def report(all_figures: list[Figures], args: argparse.Namespace, started: float) -> None:
    default_verify = Settings.model_fields["runbook_verify_seconds"].default
    verify = args.verify_seconds or default_verify
    runs = max((len(f.runs) for f in all_figures), default=0)
    print(
        f"\nP10 time to mitigate: {runs} run(s) per scenario on the embedded stack (Temporal dev "
        "server, worker + detector as worker.py wires them, SQLite stores, vendor fakes over "
        "HTTP; the app is `pagerloop simulate --quiet` in its own process), this process's runs "
        "one after another"
    )
    print(
        f"detector interval {args.interval} s; worker PAGERLOOP_FEATURE_PRIORITIES="
        f"{FEATURE_PRIORITIES}; runbook verify window {verify} s"
        + (
            f" (LOWERED from the default {default_verify} s with --verify-seconds: the canary "
            "and verification windows only, so runs end sooner; detection and the first "
            "control come before them)"
            if args.verify_seconds is not None
            else " (the default)"
        )
    )
    print(
        "approvals and acknowledgements were answered by the bench within a poll "
        f"({POLL_SECONDS} s): zero human time, included in the figures below\n"
    )
    columns = {
        "bad→incident": "detect",
        "bad minute→incident": "detect_from_minute",
        "minute over→incident": "detect_after_minute",
        "incident→control": "mitigate",
        "bad→verified": "to_verified",
        "bad→verdict": "to_verdict",
    }
    print("median / max, seconds (bad: the first bad call; bad minute: the start of its minute;")
    print("minute over: the end of that minute, whole in the detector's rollups)")
    print(f"{'scenario':<22}" + "".join(f" {name:>21}" for name in columns) + "  verdicts")
    for f in all_figures:
        cells = "".join(f" {pair(f.median_max(attr)):>21}" for attr in columns.values())
        print(f"{f.scenario.value:<22}{cells}  {f.verdicts()}")
    target = all_figures[0].detect_target
    print(
        f"\ntarget: incident <= interval + 3 s = {target:.0f} s after the first bad minute is "
        f"over (whole in the rollups the detector reads), first control <= "
        f"{FIRST_CONTROL_TARGET_S:.0f} s after the incident; judged on the median"
    )
    for f in all_figures:
        n = len(f.runs)
        print(
            f"{f.scenario.value:<22} {'PASS' if f.met else 'MISS'}  "
            f"(minute over→incident median {fmt(f.median_max('detect_after_minute')[0])} s, "
            f"{f.within('detect_after_minute', target)}/{n} runs within; from the minute's start "
            f"{f.within('detect_from_minute', target)}/{n}; incident→control median "
            f"{fmt(f.median_max('mitigate')[0])} s, "
            f"{f.within('mitigate', FIRST_CONTROL_TARGET_S)}/{n} within)"
        )
    print("\nfirst bad call, per scenario:")
    for f in all_figures:
        print(f"  {f.scenario.value}: {BAD_CALLS[f.scenario].what}")
    print(
        f"\nP10 {'PASS' if all(f.met for f in all_figures) else 'MISS'} "
        f"(total {time.perf_counter() - started:.0f} s; {os.cpu_count()} CPUs; load average "
        f"now {os.getloadavg()[0]:.1f})"
    )


# --- main -------------------------------------------------------------------------------------


async def bench(args: argparse.Namespace, scenarios: list[Scenario]) -> list[Figures]:
    figures = {s: Figures(s, [], args.interval) for s in scenarios}
    rng = random.Random(args.seed)
    env = await dev_server()
    try:
        with TimedSlack() as slack, TimedPagerDuty() as pagerduty, TimedJira() as jira:
            address = env.client.service_client.config.target_host
            for number in range(1, args.runs + 1):
                for scenario in scenarios:
                    vendors = (slack, pagerduty, jira)
                    phase = rng.uniform(0, args.interval)
                    run = await one_run(env.client, address, scenario, number, args, vendors, phase)
                    figures[scenario].runs.append(run)
                    print(run_line(run), flush=True)
    finally:
        await env.shutdown()
    return list(figures.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--scenario", action="append", choices=[s.value for s in Scenario], default=None
    )
    parser.add_argument("--interval", type=int, default=30, help="detector interval, seconds")
    parser.add_argument(
        "--verify-seconds",
        type=int,
        default=None,
        help="lower PAGERLOOP_RUNBOOK_VERIFY_SECONDS (default: the product's, 180)",
    )
    parser.add_argument("--timeout", type=float, default=720.0, help="per run, seconds")
    parser.add_argument("--seed", type=int, default=10, help="of the runs' detector phases")
    args = parser.parse_args()
    scenarios = [Scenario(s) for s in args.scenario] if args.scenario else list(Scenario)
    for scenario in scenarios:
        build(scenario)  # every scenario named exists before minutes are spent
    started = time.perf_counter()
    figures = asyncio.run(bench(args, scenarios))
    report(figures, args, started)


if __name__ == "__main__":
    main()
