"""Real processes for the chaos suite: a pagerloop worker and a Temporal dev server, each an OS
process of its own that a test can SIGKILL and start again.

    python -m tests.chaos.processes worker   # settings from PAGERLOOP_*, as `python worker.py`
    python -m tests.chaos.processes warm     # imports once, forks a worker per request line

The worker is built exactly as worker.py builds it (`worker.build_worker(settings, client,
engine)`), but it starts no detector and no retention schedule: a chaos test opens and drives
its incidents itself, and a detector reading the test's store would open incidents of its own.
The Temporal server is started with the command `pagerloop dev` uses (`worker.EmbeddedTemporal`),
on a database file, so that a restart finds its workflows, timers and search attributes again.

    worker = WorkerProcess(settings, tmp_path / "worker.log")
    await worker.start(); await worker.ready()
    killed_at, polling_at = await worker.restart()   # SIGKILL, then a new process
    worker.stop()                                    # SIGTERM (graceful), SIGKILL after 20 s
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from pydantic import SecretStr
from temporalio.client import Client
from temporalio.worker._worker import load_default_build_id

import worker
from config import Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
# The worker prints this once it polls its task queue.
READY = "pagerloop chaos worker: polling"
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes `load_settings()` in a child process read `settings`:
    every field as its PAGERLOOP_ variable, none of ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAGERLOOP_")}
    for name, value in settings.model_dump().items():
        if value is None or name == "dev_mode":
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif name == "operator_api_keys":
            value = ",".join(f"{k}:{v.get_secret_value()}" for k, v in value.items())
        elif isinstance(value, list):
            value = ",".join(v.get_secret_value() if isinstance(v, SecretStr) else v for v in value)
        elif isinstance(value, dict):
            value = ",".join(f"{k}={v}" for k, v in value.items())
        env[f"PAGERLOOP_{name.upper()}"] = str(value)
    return env


def _die_with_parent() -> None:
    # A test run killed outright must not leave workers or servers behind.
    if sys.platform == "linux":
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class _Process:
    """A process in a session of its own, logging to a file; SIGKILL takes its whole group."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.forked: int | None = None  # a pid forked by the warm parent (not our child)

    def _spawn(self, command: list[str], env: dict[str, str] | None = None) -> None:
        if self.alive:
            raise RuntimeError(f"{command[0]} is running already (pid {self.pid})")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.forked = None
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    @property
    def pid(self) -> int:
        if self.forked is not None:
            return self.forked
        assert self.process is not None
        return self.process.pid

    @property
    def alive(self) -> bool:
        if self.forked is not None:
            return _running(self.forked)
        return self.process is not None and self.process.poll() is None

    def _wait(self, timeout: float) -> None:
        if self.forked is None:
            assert self.process is not None
            self.process.wait(timeout)
            return
        deadline = time.monotonic() + timeout
        while _running(self.forked):
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.forked}", timeout)
            time.sleep(0.01)

    def _signal(self, signum: int) -> None:
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:  # not (yet) a group of its own
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def kill(self) -> float:
        """SIGKILL, no warning; the time.monotonic() of the kill."""
        killed_at = time.monotonic()
        self._signal(signal.SIGKILL)
        self._wait(10)
        return killed_at

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        """Ask it to stop (it may finish what it does); SIGKILL if it does not."""
        if not self.alive:
            return
        self._signal(signum)
        try:
            self._wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def tail(self, lines: int = 30) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone, only not yet reaped
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


class WorkerProcess(_Process):
    """A pagerloop worker with `settings` in its environment, in an OS process of its own.

    `warm` (the default): forked from a parent that has imported pagerloop once (a pre-fork
    server's way), so that a start costs well under a second instead of about 8 s of CPU here
    (imports compiled from source under PYTHONDONTWRITEBYTECODE, then the SDK hashing every
    loaded module into its default build id): the suite starts a dozen workers. `warm=False`
    spawns `python -m tests.chaos.processes worker` from scratch, as a deployment would. Either
    way the process then does what `serve_worker` says: load_settings(), connect, open the
    store, build_worker, poll."""

    def __init__(self, settings: Settings, log: Path, warm: bool = True) -> None:
        super().__init__(log)
        self.env = settings_env(settings)
        self.warm = warm
        self._ready_seen = 0
        self.starts = 0

    async def start(self) -> None:
        if self.alive:
            raise RuntimeError(f"the worker is running already (pid {self.pid})")
        self._ready_seen = self._ready_count()
        if self.warm:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            self.process, self.forked = None, await _warm_parent().fork(self.env, self.log)
        else:
            self._spawn([sys.executable, "-m", "tests.chaos.processes", "worker"], self.env)
        self.starts += 1

    def _ready_count(self) -> int:
        if not self.log.exists():
            return 0
        return self.log.read_text(errors="replace").count(READY)

    async def ready(self, timeout: float = 60.0) -> float:
        """Wait until the process started last polls; the time.monotonic() it did."""
        deadline = time.monotonic() + timeout
        while self._ready_count() <= self._ready_seen:
            if not self.alive:
                raise RuntimeError(f"the worker exited:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the worker did not poll within {timeout:.0f} s:\n{self.tail()}"
                )
            await asyncio.sleep(0.02)
        return time.monotonic()

    async def restart(self, meanwhile: Callable[[], object] | None = None) -> tuple[float, float]:
        """SIGKILL, (`meanwhile()`,) then a new process: (killed at, polling again at), both
        time.monotonic()."""
        killed_at = self.kill()
        if meanwhile is not None:
            meanwhile()
        await self.start()
        return killed_at, await self.ready()


class _WarmParent:
    """`python -m tests.chaos.processes warm`: imports pagerloop once, then forks a worker
    for each request (a JSON line: env and log) and answers with its pid."""

    def __init__(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "tests.chaos.processes", "warm"],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self._lock = threading.Lock()
        atexit.register(self.close)

    def _request(self, line: bytes) -> int:
        with self._lock:
            assert self._process.stdin is not None
            assert self._process.stdout is not None
            self._process.stdin.write(line)
            self._process.stdin.flush()
            answer = self._process.stdout.readline()
        if not answer:
            raise RuntimeError(f"the warm parent exited ({self._process.poll()})")
        return int(json.loads(answer)["pid"])

    async def fork(self, env: dict[str, str], log: Path) -> int:
        line = json.dumps({"env": env, "log": str(log)}).encode() + b"\n"
        return await asyncio.to_thread(self._request, line)

    def close(self) -> None:
        if self._process.poll() is None:
            assert self._process.stdin is not None
            self._process.stdin.close()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()


_warm: _WarmParent | None = None


def _warm_parent() -> _WarmParent:
    global _warm
    if _warm is None or _warm._process.poll() is not None:
        _warm = _WarmParent()
    return _warm


class TemporalServer(_Process):
    """`temporal server start-dev` on a database file, with pagerloop's search attributes: the
    command `pagerloop dev` runs. Restarted, it keeps its address and its database."""

    def __init__(self, db_file: Path, log: Path, namespace: str = "default") -> None:
        super().__init__(log)
        self.db_file = db_file
        self.namespace = namespace
        self.port = free_port()
        self.ui_port = free_port()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        embedded = worker.EmbeddedTemporal(
            self.address, self.ui_port, self.namespace, self.db_file, self.log
        )
        return embedded.command()

    def start(self) -> None:
        self._spawn(self.command())

    async def healthy(self, timeout: float = 60.0) -> float:
        """Wait until the frontend answers a health check; the time.monotonic() it did."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive:
                raise RuntimeError(f"the Temporal server exited:\n{self.tail()}")
            try:
                client = await Client.connect(self.address, namespace=self.namespace)
                if await client.service_client.check_health():
                    return time.monotonic()
            except Exception:
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.1)

    def stop(self, signum: int = signal.SIGINT, timeout: float = 20.0) -> None:
        super().stop(signum, timeout)


# --- the worker process ------------------------------------------------------------------


async def _connect(settings: Settings) -> Client:
    """Connect, waiting out a server that is (re)starting, as a deployed worker would."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return await worker.connect_temporal(settings)
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def serve_worker() -> None:
    """Run the worker until SIGTERM or SIGINT (a SIGKILL just ends it)."""
    settings = load_settings()
    logging.basicConfig(level=settings.log_level, format=worker.LOG_FORMAT)
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    client = await _connect(settings)
    engine = worker.open_store(settings)
    try:
        async with worker.build_worker(settings, client, engine):
            print(f"{READY} {settings.task_queue} (pid {os.getpid()})", flush=True)
            await stop.wait()
    finally:
        engine.dispose()


def _forked_worker(env: dict[str, str], log: str) -> None:
    """In the child of a fork: a session of its own, the log as output, `env` as the
    environment, and then the worker; never back into the parent's loop."""
    code = 1
    try:
        os.setsid()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        _die_with_parent()
        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.environ.clear()
        os.environ.update(env)
        asyncio.run(serve_worker())
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve_forks() -> None:
    """The warm parent: pagerloop imported (and the SDK's build id hashed) once; a fork per
    request line, its pid answered; exits when its input closes."""
    load_default_build_id()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped as they end
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            _forked_worker(request["env"], request["log"])
        print(json.dumps({"pid": pid}), flush=True)


def main(argv: list[str]) -> None:
    if argv == ["worker"]:
        asyncio.run(serve_worker())
    elif argv == ["warm"]:
        serve_forks()
    else:
        raise SystemExit("usage: python -m tests.chaos.processes worker | warm")


if __name__ == "__main__":
    main(sys.argv[1:])
