"""A real PostgreSQL for the tests: the one configured, or a throwaway cluster of our own."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
from sqlalchemy.engine import URL, make_url

DEFAULT_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def configured_url() -> URL:
    return make_url(os.environ.get("PAGERLOOP_TEST_DATABASE_URL", DEFAULT_URL))


def _dsn(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def answers(url: URL) -> bool:
    try:
        with psycopg.connect(_dsn(url), connect_timeout=3):
            return True
    except psycopg.OperationalError:
        return False


def create_database(admin: URL, name: str) -> URL:
    with psycopg.connect(_dsn(admin), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return admin.set(database=name)


def drop_database(admin: URL, name: str) -> None:
    with psycopg.connect(_dsn(admin), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _server_bin() -> Path | None:
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OwnCluster:
    """initdb + pg_ctl in a temp dir, as the `postgres` user when we are root."""

    def __init__(self) -> None:
        self.bin = _server_bin()
        self.dir = Path(tempfile.mkdtemp(prefix="pagerloop-pg-"))
        self.port = _free_port()

    @property
    def available(self) -> bool:
        return self.bin is not None

    def _run(self, *args: str) -> None:
        command = list(args)
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres")
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def start(self) -> URL:
        assert self.bin is not None
        data = self.dir / "data"
        self._run(str(self.bin / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres")
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(data), "-o", options, "-l",
            str(self.dir / "log"), "-w", "start",
        )  # fmt: skip
        url = make_url(f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres")
        deadline = time.monotonic() + 30
        while not answers(url):
            if time.monotonic() > deadline:
                raise RuntimeError(f"own PostgreSQL did not answer; see {self.dir / 'log'}")
            time.sleep(0.2)
        return url

    def stop(self) -> None:
        if self.bin is not None and (self.dir / "data").exists():
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "fast", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)
