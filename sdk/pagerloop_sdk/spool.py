"""The recorder's spool: batches of call records it cannot deliver yet, kept on disk, so that a
store outage can outlast the recorder's memory and an app restart does not lose them.

One JSON-lines file per batch put (a header line, then one line per call and per quality
score), written under a temporary name, synced and renamed into place: a reader never sees half
a batch. Files are named by the time they were written, so replay takes the oldest first, and
each name carries its record count. A file is deleted once its batch is in the store. The
spool holds at most `max_bytes`; a batch beyond that is refused (the recorder counts it as
dropped, or puts it back in its queue).

Within a process, one thread may put batches while another takes them (the recorder's spooler
and its writer): the totals are kept under a lock. Several processes may share a directory: a
file being replayed is locked (`flock`, released by the kernel if the process dies), and a file
replayed twice writes nothing twice anyway (ingest is idempotent on call_id).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from pagerloop_sdk.records import CallRecord, ScoreRecord

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: files are not locked, replays may repeat
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

FORMAT = 1
SUFFIX = ".jsonl"
# <nanoseconds>-<pid>-<sequence>-<records>.jsonl
_NAME = re.compile(r"^(\d{20})-(\d+)-(\d+)-(\d+)\.jsonl$")
STALE_TMP_SECONDS = 3600  # a temporary file this old was left by a process that died writing it
RESCAN_SECONDS = 30.0  # how often an empty spool looks for files other processes left
_CALL_FIELDS = tuple(f.name for f in fields(CallRecord))
_SCORE_FIELDS = tuple(f.name for f in fields(ScoreRecord))


class CorruptSpoolFileError(Exception):
    """A spool file that cannot be read back; it was renamed aside (`.bad`)."""

    def __init__(self, path: Path, records: int, reason: str) -> None:
        super().__init__(f"{path.name}: {reason}")
        self.path = path
        self.records = records


@dataclass
class SpooledBatch:
    """A batch read back from its file, which stays locked until `done` or `release`."""

    path: Path
    calls: list[CallRecord]
    scores: list[ScoreRecord]
    size: int
    handle: Any  # the open file holding the lock


def _records_in(name: str) -> int:
    match = _NAME.match(name)
    return int(match.group(4)) if match else 0


def _dump(record: Any, names: tuple[str, ...]) -> dict[str, Any]:
    found = {name: getattr(record, name) for name in names}
    found["ts"] = found["ts"].isoformat()
    return {k: v for k, v in found.items() if v is not None}


def _load(kind: type[Any], values: dict[str, Any], names: tuple[str, ...]) -> Any:
    known = {k: v for k, v in values.items() if k in names}  # fields of a later version: left
    known["ts"] = datetime.fromisoformat(known["ts"])
    return kind(**known)


def encode(calls: list[CallRecord], scores: list[ScoreRecord]) -> bytes:
    header = {"pagerloop_spool": FORMAT, "calls": len(calls), "scores": len(scores)}
    lines = [json.dumps(header)]
    lines += [json.dumps({"call": _dump(c, _CALL_FIELDS)}, default=str) for c in calls]
    lines += [json.dumps({"score": _dump(s, _SCORE_FIELDS)}, default=str) for s in scores]
    return ("\n".join(lines) + "\n").encode()


def decode(data: bytes) -> tuple[list[CallRecord], list[ScoreRecord]]:
    lines = data.decode().splitlines()
    header = json.loads(lines[0])
    if header.get("pagerloop_spool") != FORMAT:
        raise ValueError(f"not a spool file of format {FORMAT}")
    calls: list[CallRecord] = []
    scores: list[ScoreRecord] = []
    for line in lines[1:]:
        item = json.loads(line)
        if "call" in item:
            calls.append(_load(CallRecord, item["call"], _CALL_FIELDS))
        else:
            scores.append(_load(ScoreRecord, item["score"], _SCORE_FIELDS))
    if (len(calls), len(scores)) != (header["calls"], header["scores"]):
        raise ValueError("fewer lines than its header counts")
    return calls, scores


class Spool:
    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        directory.mkdir(parents=True, exist_ok=True)
        self._sequence = itertools.count()
        self._last_scan = 0.0
        # The totals, for threads that put and take at once: a file renamed into place is
        # counted once, by `put` or by a scan, never by both.
        self._totals_lock = threading.Lock()
        self._reserved = 0  # bytes of the batches being written
        self.bytes = 0
        self.records = 0  # in the files of the directory, as far as this process knows
        self._scan()
        self._remove_stale_tmp()

    def _scan(self) -> list[Path]:
        """The batch files, oldest first (and the totals brought up to date)."""
        found = []
        total_bytes = total_records = 0
        with self._totals_lock, contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.directory):
                if _NAME.match(entry.name):
                    with contextlib.suppress(FileNotFoundError):
                        total_bytes += entry.stat().st_size
                        total_records += _records_in(entry.name)
                        found.append(Path(entry.path))
            self.bytes, self.records = total_bytes, total_records
            self._last_scan = time.monotonic()
        return sorted(found, key=lambda path: path.name)

    def _remove_stale_tmp(self) -> None:
        now = time.time()
        for path in self.directory.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > STALE_TMP_SECONDS:
                    path.unlink()

    def room_for(self, size: int) -> bool:
        return self.bytes + self._reserved + size <= self.max_bytes

    def put(self, calls: list[CallRecord], scores: list[ScoreRecord]) -> bool:
        """Write a batch to its own file; False (nothing written) when the spool is full.
        OSError when it cannot be written (nothing is left in place then)."""
        data = encode(calls, scores)
        with self._totals_lock:
            if not self.room_for(len(data)):
                return False
            self._reserved += len(data)
        name = f"{time.time_ns():020d}-{os.getpid()}-{next(self._sequence)}-{len(calls)}{SUFFIX}"
        tmp = self.directory / f".{name}.tmp"
        try:
            with open(tmp, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            with self._totals_lock:
                os.replace(tmp, self.directory / name)
                self.bytes += len(data)
                self.records += len(calls)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        finally:
            with self._totals_lock:
                self._reserved -= len(data)
        self._sync_directory()
        return True

    def _sync_directory(self) -> None:
        with contextlib.suppress(OSError):  # not every platform opens directories
            fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def take(self) -> SpooledBatch | None:
        """The oldest batch no other process is replaying, locked; None when there is none.
        CorruptSpoolFileError for a file that cannot be read (renamed aside first)."""
        if self.records == 0 and time.monotonic() - self._last_scan < RESCAN_SECONDS:
            return None
        for path in self._scan():
            handle = self._lock(path)
            if handle is None:
                continue
            try:
                data = handle.read()
                calls, scores = decode(data)
            except (ValueError, KeyError, TypeError) as exc:
                self._set_aside(path, handle)
                raise CorruptSpoolFileError(path, _records_in(path.name), str(exc)) from None
            return SpooledBatch(path, calls, scores, len(data), handle)
        return None

    @staticmethod
    def _lock(path: Path) -> Any:
        """The file opened and locked, or None when it is gone or another process holds it."""
        try:
            handle = open(path, "rb")  # noqa: SIM115 (held open for as long as the lock)
        except FileNotFoundError:
            return None
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                # Replayed and deleted by another process between our listing and our lock?
                same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
            except OSError:
                same = False
            if not same:
                handle.close()
                return None
        return handle

    def _set_aside(self, path: Path, handle: Any) -> None:
        with contextlib.suppress(OSError):
            path.rename(path.with_suffix(".bad"))
        handle.close()
        self._scan()

    def done(self, batch: SpooledBatch) -> None:
        """The batch is in the store: delete its file."""
        with contextlib.suppress(FileNotFoundError):
            batch.path.unlink()
        batch.handle.close()
        with self._totals_lock:
            self.bytes = max(0, self.bytes - batch.size)
            self.records = max(0, self.records - len(batch.calls))

    @staticmethod
    def release(batch: SpooledBatch) -> None:
        """Keep the batch's file for a later replay (by this process or the next)."""
        batch.handle.close()
