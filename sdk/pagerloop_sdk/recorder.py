"""The recorder: a bounded queue on the caller's side, background threads on the other.

`submit` never blocks and never does I/O: it queues the finished call as the wrapper noted it
(timestamps and references); when the queue is full the call is dropped and counted. The writer
thread does everything else: the record (usage, price, pseudonym, call id), quality scoring of
the sampled calls, the JSON log line, and the batched writes to its sink (the pagerloop API in
an app, `pagerloop_sdk.http_sink`; the stores themselves in the server's own processes). While
the sink is away it makes the records of the queued calls as they come, so that the queue holds
records, not responses. `flush()` waits for what is queued, and an atexit hook closes the
recorder on exit.

No record is lost to a sink outage the recorder can hold: a batch the sink fails to write is
kept at the front and retried with capped exponential backoff and jitter (0.2 s doubling to
30 s), and the records keep queueing in memory. With a spool directory (`PAGERLOOP_SPOOL_DIR`,
pagerloop_sdk.spool), a second thread, the spooler, moves the oldest queued records to disk
whenever the queue is half full: up to half the queue's size per file, taken out of the queue
before the file is written and synced, so the callers have room meanwhile (at most that many
records are in memory beyond the queue's bound). It does not wait for the writer, which may
spend seconds in a write that does not come back (a connect or lock timeout). The writer
replays the spool, oldest file first, ahead of the queue, whenever the store answers; and
`close()` spools whatever is still undelivered, so that the next recorder on the same directory
writes it. Batches are written once per call_id (ingest and the stores' writer are idempotent on
it), so a retry after an ambiguous failure, or a replay, writes nothing twice.

What is finally lost is counted in `pagerloop_instrumentation_records_total` and in `stats()`,
and logged once per episode: "dropped" for want of room or time (queue full and no spool, spool
full, still undelivered at close without a spool), "failed" for a record that could not be made
or that the store refuses for good (a value it cannot take: the batch is split in halves until
that record is alone, and the rest is written).
"""

from __future__ import annotations

import atexit
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from pagerloop_sdk import calllog, quality, validation
from pagerloop_sdk.capture import PendingCall, finalize, prompt_text
from pagerloop_sdk.metrics import counter, gauge
from pagerloop_sdk.pricing import DEFAULT_PRICES, PRICES, PriceTable, base_model
from pagerloop_sdk.records import CallRecord, ScoreRecord
from pagerloop_sdk.spool import CorruptSpoolFileError, Spool, SpooledBatch

log = logging.getLogger(__name__)
T = TypeVar("T")

RECORDS = counter(
    "pagerloop_instrumentation_records_total",
    "LLM call records by what became of them (written; dropped: no room or time left to keep "
    "them; failed: could not be made, or refused by the store for good).",
    ("outcome",),
)
UNPRICED = counter(
    "pagerloop_unpriced_calls_total",
    "Calls recorded with an unknown cost because their model has no price.",
    ("model",),
)
QUEUE_DEPTH = gauge(
    "pagerloop_instrumentation_queue_depth", "Records waiting for the recorder's thread."
)
SPOOLED = gauge(
    "pagerloop_instrumentation_spooled_records",
    "Records waiting in the recorder's spool directory for the store.",
)

RETRY_BASE_SECONDS = 0.2
RETRY_CAP_SECONDS = 30.0
EPISODE_QUIET_SECONDS = 60.0  # losses this far apart are logged as separate episodes
DEFAULT_SPOOL_MAX_BYTES = 1_000_000_000


def count_unpriced(model: str) -> None:
    """Count a call without a price. The label is a model of the price table (a snapshot
    counts as its base model) or "other": model names come from callers, and each label value
    is a series on /metrics for as long as the process lives."""
    known = model if model in PRICES else base_model(model)
    UNPRICED.labels(known if known in PRICES else "other").inc()


# What the queue holds: a call as submitted, a record, or a record with its call to score;
# _FAILED stands for a call whose record could not be made (counted already).
# The background threads work in slices of this many records and let the app's threads have
# the GIL between slices: a thread returning from its OpenAI call would otherwise wait for the
# interpreter's switch interval (5 ms) whenever a batch is being made or encoded.
SLICE = 32


def in_slices(items: Sequence[T]) -> Iterator[T]:
    """The items, with the GIL handed over (`time.sleep(0)`) every SLICE of them."""
    for index, item in enumerate(items):
        if index % SLICE == SLICE - 1:
            time.sleep(0)
        yield item


class _Unmade:
    pass


_FAILED = _Unmade()
_Queued = PendingCall | CallRecord | tuple[CallRecord, PendingCall] | _Unmade


class Sink(Protocol):
    def write(self, calls: Sequence[CallRecord], scores: Sequence[ScoreRecord]) -> None: ...


class RecordsRefusedError(Exception):
    """For sinks: these records will never be accepted (retrying cannot help)."""


# A sink's failures that are about the records themselves, for good: a value the store cannot
# take (sinks raise RecordsRefusedError for theirs), a value of the wrong type.
REFUSALS = (RecordsRefusedError, TypeError, ValueError, ArithmeticError)


def refused(exc: BaseException) -> bool:
    """Whether retrying cannot help. Anything else (a lost server, a lock, a full disk) is
    taken to pass, and retried."""
    return isinstance(exc, REFUSALS)


@dataclass
class RecorderStats:
    submitted: int
    written: int
    dropped: int
    failed: int
    queued: int  # in memory (queued, or on their way to the spool), waiting for the store
    spooled: int = 0  # in the spool directory, waiting for the store


@dataclass
class _Batch:
    """Records ready for the sink (scored, logged); `spooled` is the file they came from."""

    calls: list[CallRecord]
    scores: list[ScoreRecord]
    spooled: SpooledBatch | None = None


class _Episode:
    """A kind of loss, logged when it starts and when it has stopped, not per record."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.total = 0
        self.at_start = 0
        self.last = 0.0
        self.open = False

    def add(self, count: int, why: object) -> None:
        self.total += count
        self.last = time.monotonic()
        if not self.open:
            self.open, self.at_start = True, self.total - count
            log.error(
                "%s LLM call records: %s (logged once until it stops; counted in "
                "pagerloop_instrumentation_records_total)",
                self.what,
                why,
            )

    def tick(self) -> None:
        if self.open and time.monotonic() - self.last > EPISODE_QUIET_SECONDS:
            self.open = False
            log.warning("%s %d LLM call records in all", self.what, self.total - self.at_start)


class Recorder:
    def __init__(
        self,
        sink: Sink,
        *,
        salt: str = "",
        prices: PriceTable = DEFAULT_PRICES,
        quality_sample_rate: float = 0.1,
        max_queue: int = 100_000,
        batch_size: int = 5_000,
        flush_interval: float = 0.2,
        spool_dir: Path | str | None = None,
        spool_max_bytes: int = DEFAULT_SPOOL_MAX_BYTES,
        retry_base: float = RETRY_BASE_SECONDS,
        retry_cap: float = RETRY_CAP_SECONDS,
    ) -> None:
        self.sink = sink
        self.salt = salt
        self.prices = prices
        self.quality_sample_rate = quality_sample_rate
        self.max_queue = max_queue
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self._spool = _open_spool(spool_dir, spool_max_bytes)
        # Past this depth the spooler moves the oldest queued records to the spool...
        self._spool_mark = max(1, min(max_queue // 2, max_queue - batch_size))
        # ...this many at most per file: one file (one sync) for all the records past the mark.
        self._spool_chunk = max(batch_size, self._spool_mark)
        # Calls as submitted (their records not made yet), records, and (record, call) pairs
        # for the records whose call is to be scored for quality.
        self._queue: deque[_Queued] = deque()
        self._take_lock = threading.Lock()  # one thread at a time takes from the queue's front
        self._held: _Batch | None = None  # the oldest batch: its write failed, to be retried
        self._spilling = 0  # records the spooler has taken from the queue, not yet on disk
        self._failures = 0  # consecutive failed writes (0: the store answers)
        self._spool_full = False  # the spool refused the last batch...
        self._spool_full_at = 0  # ...when it held this many bytes
        self._retry_at = 0.0
        self._write_at = batch_size  # the queue depth at which `enqueue` wakes the writer...
        self._wake_at = self._first_mark()  # ...or the spooler, whichever comes first
        self._wake = threading.Event()  # the writer's
        self._spill_wake = threading.Event()  # the spooler's
        self._idle = threading.Condition()
        self._busy = False  # the writer is at work
        self._spooling = False  # the spooler is at work
        self._stopping = False
        self._spooler_stopping = False
        self._thread: threading.Thread | None = None
        self._spooler: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.submitted = 0
        self.written = 0
        self.dropped = 0  # by the callers' threads: the queue was full
        self.dropped_late = 0  # by the recorder's thread: no room in the spool at close
        self.failed = 0
        self._queue_full = _Episode("dropping")
        self._queue_full_seen = 0
        self._lost = _Episode("dropping")
        self._refused = _Episode("failing")
        if self._spool is not None and self._spool.records:
            self._start()  # a spool left by an earlier recorder: deliver it now

    # --- the caller's side -------------------------------------------------------------------

    def sample_quality(self) -> bool:
        return self.quality_sample_rate > 0 and random.random() < self.quality_sample_rate  # noqa: S311

    def submit(self, call: PendingCall) -> None:
        """Queue a finished call; its record is made in the writer's thread. Never blocks,
        never raises."""
        if self._thread is None:
            self._start()
        queue = self._queue
        if len(queue) >= self.max_queue:
            self.dropped += 1
            RECORDS.labels("dropped").inc()
            return
        queue.append(call)
        self.submitted += 1
        if len(queue) >= self._wake_at:
            self._wake_up()

    def enqueue(self, record: CallRecord, scored: PendingCall | None = None) -> None:
        """Queue a finished record (and the call to score, if any)."""
        if self._thread is None:
            self._start()
        if len(self._queue) >= self.max_queue:
            self.dropped += 1
            RECORDS.labels("dropped").inc()
            return
        self._queue.append(record if scored is None else (record, scored))
        self.submitted += 1
        if len(self._queue) >= self._wake_at:
            self._wake_up()

    def _made(self, item: _Queued) -> tuple[CallRecord, PendingCall | None] | None:
        """A queued item as (record, call to score); None when its record cannot be made
        (logged and counted failed)."""
        if isinstance(item, PendingCall):
            try:
                record = finalize(item, self.salt, self.prices)
            except Exception:
                log.exception("could not make a record of an LLM call")
                self.failed += 1
                RECORDS.labels("failed").inc()
                return None
            return record, item if item.score_quality and record.status == "success" else None
        if isinstance(item, _Unmade):
            return None
        if isinstance(item, tuple):
            return item
        return item, None

    def _make_queued(self) -> None:
        """Make the records of the calls queued since the last time (the newest, at the right
        end), in place: while the store is away the queue may fill, and a call holds its
        response until its record is made."""
        queue = self._queue
        with self._take_lock:  # the left end stays put; callers only append at the right
            index = len(queue) - 1
            while index >= 0:
                item = queue[index]
                if type(item) is not PendingCall:
                    break  # made by an earlier pass, as is everything before it
                made = self._made(item)
                if made is None:
                    queue[index] = _FAILED
                else:
                    record, scored = made
                    queue[index] = record if scored is None else (record, scored)
                index -= 1

    def _wake_up(self) -> None:
        """Past a mark: wake the writer (a batch is ready), the spooler (the queue is half
        full), or both. No I/O: setting an event."""
        depth = len(self._queue)
        if depth >= self._write_at and not self._wake.is_set():
            self._wake.set()
        if depth >= self._spool_mark and self._spooler and not self._spill_wake.is_set():
            self._spill_wake.set()

    def _first_mark(self) -> int:
        """The depth at which `enqueue` wakes a thread: the writer's mark or the spool's."""
        return min(self._write_at, self._spool_mark) if self._spool else self._write_at

    # --- the threads' side -------------------------------------------------------------------

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is not None:
                return
            if self._spool is not None:
                self._spooler = threading.Thread(
                    target=self._spool_run, name="pagerloop-spooler", daemon=True
                )
                self._spooler.start()
            self._thread = threading.Thread(
                target=self._run, name="pagerloop-recorder", daemon=True
            )
            self._thread.start()
            atexit.register(self.close)

    def _run(self) -> None:
        """The writer."""
        while not self._stopping:
            self._wake.wait(self._pause())
            self._wake.clear()
            self._work(retry=time.monotonic() >= self._retry_at)
        self._finish()

    def _pause(self) -> float:
        """Until the next write: the flush interval, or the retry time while the store fails
        (waking at the flush interval meanwhile, to keep the gauges and the loss log current)."""
        if not self._failures:
            return self.flush_interval
        return max(0.0, min(self.flush_interval, self._retry_at - time.monotonic()))

    def _work(self, *, retry: bool) -> None:
        with self._idle:
            self._busy = True
        try:
            if retry:
                self._deliver()
            if self._failures:
                self._make_queued()
            self._note_losses()
        finally:
            self._gauges()
            with self._idle:
                self._busy = False
                self._idle.notify_all()

    def _gauges(self) -> None:
        QUEUE_DEPTH.set(len(self._queue) + self._spilling)
        SPOOLED.set(self._spool.records if self._spool else 0)

    def _deliver(self) -> None:
        """Write batches, oldest first, until none is left or the store fails."""
        while True:
            batch = self._next()
            if batch is None:
                return
            rest = self._write(batch)
            if rest is not None:
                self._held = rest
                return

    def _next(self) -> _Batch | None:
        """The held batch, else the oldest spooled one, else the next from the queue."""
        if self._held is not None:
            batch, self._held = self._held, None
            return batch
        if self._spool is not None:
            try:
                spooled = self._spool.take()
            except CorruptSpoolFileError as exc:
                self._count_failed(exc.records, f"a spool file cannot be read back ({exc})")
                return self._next()
            if spooled is not None:
                return _Batch(spooled.calls, spooled.scores, spooled)
        batch = self._prepare(self.batch_size)
        return batch if batch.calls else None  # the spooler may have taken them meanwhile

    def _prepare(self, most: int, *, spilling: bool = False) -> _Batch:
        """Take up to `most` queued records, the oldest: score the sampled ones, log them all.
        For the spooler (`spilling`), they are counted in `_spilling` until they are on disk
        (or back in the queue)."""
        with self._take_lock:
            size = min(most, len(self._queue))
            if spilling:
                self._spilling += size  # counted there before they leave the queue
            items = [self._queue.popleft() for _ in range(size)]
        made = self._made
        taken = [pair for item in in_slices(items) if (pair := made(item))]
        if spilling and len(taken) < size:
            with self._take_lock:
                self._spilling -= size - len(taken)  # failed: they will not reach the disk
        calls = [record for record, _ in taken]
        scores: list[ScoreRecord] = []
        for record, pending in taken:
            if pending is not None:
                scored = self._score(pending, record)
                if scored is not None:
                    scores.append(scored)
            if record.cost_usd is None and record.input_tokens is not None:
                count_unpriced(record.response_model or record.model)
        calllog.emit(calls)
        return _Batch(calls, scores)

    def _write(self, batch: _Batch) -> _Batch | None:
        """Write a batch, `batch_size` calls at a time (a spool file may hold more); what is
        left to retry when the store fails (None: all done, and its spool file deleted)."""
        calls, scores = batch.calls, batch.scores
        while calls:
            part, calls = calls[: self.batch_size], calls[self.batch_size :]
            part_scores, scores = _scores_of(part, scores) if calls else (scores, [])
            left = self._write_part(part, part_scores)
            if left is not None:
                return _Batch(left[0] + calls, left[1] + scores, batch.spooled)
        if batch.spooled is not None and self._spool is not None:
            self._spool.done(batch.spooled)
        return None

    def _write_part(
        self, calls: list[CallRecord], scores: list[ScoreRecord]
    ) -> tuple[list[CallRecord], list[ScoreRecord]] | None:
        """Write up to a batch; what is left to retry when the store fails (None: done)."""
        try:
            self.sink.write(calls, scores)
        except Exception as exc:
            if not refused(exc):
                self._failed_attempt(exc)
                return calls, scores
            rest = self._isolate(calls, scores)
            if rest is not None:
                return rest
        else:
            self._count_written(len(calls))
        self._recovered()
        return None

    def _isolate(
        self, calls: list[CallRecord], scores: list[ScoreRecord]
    ) -> tuple[list[CallRecord], list[ScoreRecord]] | None:
        """Write a batch the store refused in halves, then quarters..., until each record it
        refuses is alone: those are counted failed, the others written. A failure that is not
        a refusal on the way stops it: what is left is returned, to retry."""
        parts = deque(_halves(calls, scores))
        while parts:
            calls, scores = parts.popleft()
            try:
                self.sink.write(calls, scores)
            except Exception as exc:
                if not refused(exc):
                    self._failed_attempt(exc)
                    left = [(calls, scores), *parts]
                    return (
                        [c for part, _ in left for c in part],
                        [s for _, part in left for s in part],
                    )
                if len(calls) > 1:
                    parts.extendleft(reversed(_halves(calls, scores)))
                elif scores:
                    parts.appendleft((calls, []))  # the call may do without its scores
                else:
                    self._count_failed(1, f"the store refuses them ({_summary(exc)})")
            else:
                self._count_written(len(calls))
        return None

    def _failed_attempt(self, exc: Exception) -> None:
        self._failures += 1
        ceiling = min(self.retry_cap, self.retry_base * 2 ** min(self._failures - 1, 30))
        self._retry_at = time.monotonic() + ceiling * (0.5 + random.random() / 2)  # noqa: S311
        asked = getattr(exc, "retry_after", None)  # the sink's server said when (Retry-After)
        if asked:
            self._retry_at = max(self._retry_at, time.monotonic() + asked)
        # While the store is away the queue does not wake the writer (it retries on its own
        # time); it still wakes the spooler at its mark.
        self._write_at = self.max_queue + 1
        self._wake_at = self._first_mark()
        if self._failures == 1:
            log.warning(
                "the store is unavailable (%s): keeping LLM call records and retrying "
                "(backoff up to %.0f s)%s",
                _summary(exc),
                self.retry_cap,
                "" if self._spool is not None else "; no spool directory: they wait in memory",
            )

    def _recovered(self) -> None:
        if self._failures:
            log.warning(
                "the store is back after %d failed writes: delivering the records kept",
                self._failures,
            )
        self._failures = 0
        self._write_at = self.batch_size
        self._wake_at = self._first_mark()

    # --- the spooler -------------------------------------------------------------------------

    def _spool_run(self) -> None:
        """The spooler: wakes when the queue passes its mark (and at the flush interval, in
        case), and moves the overflow to the spool, whatever the writer is doing."""
        while not self._spooler_stopping:
            self._spill_wake.wait(self.flush_interval)
            self._spill_wake.clear()
            if len(self._queue) < self._spool_mark or self._spooler_stopping:
                continue
            with self._idle:
                self._spooling = True
            try:
                self._overflow()
            except Exception:  # the thread must live on: the queue has no other way out
                log.exception("the recorder's spooler failed; it carries on")
            finally:
                self._gauges()
                with self._idle:
                    self._spooling = False
                    self._idle.notify_all()

    def _overflow(self) -> None:
        """Move the oldest queued records to the spool while the queue is past its mark."""
        spool = self._spool
        assert spool is not None
        while not self._spooler_stopping and len(self._queue) >= self._spool_mark:
            if self._spool_full and spool.bytes >= self._spool_full_at:
                return  # no room made since it was full: the queue fills, then drops
            batch = self._prepare(self._spool_chunk, spilling=True)
            left: _Batch | None = batch
            try:
                left = self._spill_parts(batch)
            finally:
                if left is not None:
                    self._spool_full, self._spool_full_at = True, spool.bytes
                    # Back to the front of the queue (their quality scores are lost).
                    with self._take_lock:
                        self._queue.extendleft(reversed(left.calls))
                with self._take_lock:
                    self._spilling -= len(batch.calls)  # on disk now, or back in the queue
            if left is not None:
                return
            self._spool_full = False

    def _spill_parts(self, batch: _Batch) -> _Batch | None:
        """Write a batch to the spool: in one file, else (too big for the room left) in files
        of `batch_size`. What could not be written is returned (None: all of it was)."""
        if not batch.calls or self._spill(batch):
            return None
        if len(batch.calls) <= self.batch_size:
            return batch
        calls, scores = batch.calls, batch.scores
        while calls:
            part, rest = calls[: self.batch_size], calls[self.batch_size :]
            part_scores, rest_scores = _scores_of(part, scores) if rest else (scores, [])
            if not self._spill(_Batch(part, part_scores)):
                return _Batch(calls, scores)
            calls, scores = rest, rest_scores
        return None

    def _spill(self, batch: _Batch) -> bool:
        """Write a batch to the spool; False when it is full or cannot be written."""
        assert self._spool is not None
        try:
            return self._spool.put(batch.calls, batch.scores)
        except Exception as exc:  # a full disk, a directory gone, a record it cannot encode
            log.error("cannot write to the spool directory %s: %s", self._spool.directory, exc)
            return False

    def _note_losses(self) -> None:
        if self.dropped > self._queue_full_seen:
            if self._spool is None:
                why = "the queue is full and there is no spool directory"
            elif self._spool_full:
                why = "the queue is full and so is the spool"
            else:
                why = "the queue is full (the spool did not keep up)"
            self._queue_full.add(self.dropped - self._queue_full_seen, why)
            self._queue_full_seen = self.dropped
        for episode in (self._queue_full, self._lost, self._refused):
            episode.tick()

    def _count_written(self, count: int) -> None:
        self.written += count
        RECORDS.labels("written").inc(count)

    def _count_failed(self, count: int, why: object) -> None:
        self.failed += count
        RECORDS.labels("failed").inc(count)
        self._refused.add(count, why)

    def _count_dropped(self, count: int, why: str) -> None:
        self.dropped_late += count
        RECORDS.labels("dropped").inc(count)
        self._lost.add(count, why)

    def _finish(self) -> None:
        """The writer's last work, once the spooler has stopped: what `close` did not see
        written goes to the spool, for the next recorder; without one, a last delivery while
        the store answers, and what is left is counted dropped."""
        with self._idle:
            self._busy = True
        try:
            if self._spool is None and not self._failures:
                self._deliver()
            left = self._held
            self._held = None
            if left is not None and left.spooled is not None:
                assert self._spool is not None
                spooled, left = left.spooled, _Batch(left.calls, left.scores)
                # On disk already: the next recorder's. When part of it was written, what is
                # left goes to a file of its own, so that the next recorder counts it once.
                if len(left.calls) < len(spooled.calls) and self._spill(left):
                    self._spool.done(spooled)
                else:
                    self._spool.release(spooled)
                left = None
            batches = [left] if left is not None else []
            while self._queue:
                batch = self._prepare(self._spool_chunk if self._spool else self.batch_size)
                batches.append(batch)
            for batch in batches:
                rest = batch if self._spool is None else self._spill_parts(batch)
                if rest is not None:
                    why = "still undelivered at close, " + (
                        "and the spool is full" if self._spool else "and no spool directory"
                    )
                    self._count_dropped(len(rest.calls), why)
        finally:
            SPOOLED.set(self._spool.records if self._spool else 0)
            QUEUE_DEPTH.set(0)
            with self._idle:
                self._busy = False
                self._idle.notify_all()

    @staticmethod
    def _score(pending: PendingCall, record: CallRecord) -> ScoreRecord | None:
        if pending.invalid is not None:
            return validation.failure_score(pending, record)
        output = pending.output_text()
        if not output:
            return None
        result = quality.score(output, prompt_text(pending.prompt), pending.expected_format)
        return ScoreRecord(
            call_id=record.call_id,
            ts=record.ts,
            source="scorer",
            score=result.composite,
            format_compliance=result.format_compliance,
            hallucination_risk=result.hallucination_risk,
            relevance=result.relevance,
            evaluator="pagerloop-heuristics",
            model=record.response_model or record.model,
            feature=record.feature,
        )

    # --- lifecycle ---------------------------------------------------------------------------

    def _settled(self) -> bool:
        """Nothing left to write (called under `_idle`: the threads mark their work there)."""
        if self._busy or self._spooling or self._queue or self._held is not None:
            return False
        return not self._spilling and not (self._spool.records if self._spool else 0)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted so far (and spooled) is written, or refused by the
        store for good; False on timeout (while the store is away, say)."""
        if self._thread is None:
            return True
        if not self._thread.is_alive():  # closed: nothing more will be written
            with self._idle:
                return self._settled()
        deadline = time.monotonic() + timeout
        while True:
            self._wake.set()
            with self._idle:
                if self._settled():
                    return True
                self._idle.wait(0.05)
            if time.monotonic() > deadline:
                return False

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued (waiting up to `timeout` for the store) and stop the threads.
        What is still undelivered then goes to the spool directory, for the next recorder on
        it; without one it is counted dropped. With a spool and the store away, close does not
        wait for the store."""
        if self._spool is None or not self._failures:
            self.flush(timeout)
        # The spooler first (it ends the file it is writing), so that the writer's last work
        # sees everything that is not on disk.
        self._spooler_stopping = True
        self._spill_wake.set()
        if self._spooler is not None:
            self._spooler.join(timeout)
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive() or (self._spooler and self._spooler.is_alive()):
                log.error(
                    "the recorder's threads are still writing after %.0f s: %d queued LLM "
                    "call records may be lost",
                    timeout,
                    len(self._queue) + self._spilling,
                )

    def stats(self) -> RecorderStats:
        held = len(self._held.calls) if self._held and not self._held.spooled else 0
        return RecorderStats(
            self.submitted,
            self.written,
            self.dropped + self.dropped_late,
            self.failed,
            len(self._queue) + self._spilling + held,
            self._spool.records if self._spool is not None else 0,
        )


def _open_spool(directory: Path | str | None, max_bytes: int) -> Spool | None:
    if not directory:
        return None
    try:
        return Spool(Path(directory), max_bytes)
    except OSError as exc:  # the app runs on: records wait in memory only
        log.error("cannot use %s as the spool directory: %s", directory, exc)
        return None


def _halves(
    calls: list[CallRecord], scores: list[ScoreRecord]
) -> list[tuple[list[CallRecord], list[ScoreRecord]]]:
    """A batch in two, each half with the scores of its calls."""
    middle = len(calls) // 2
    parts = []
    for part in (calls[:middle], calls[middle:]):
        if not part:
            continue
        ids = {call.call_id for call in part}
        parts.append((part, [score for score in scores if score.call_id in ids]))
    return parts


def _scores_of(
    calls: list[CallRecord], scores: list[ScoreRecord]
) -> tuple[list[ScoreRecord], list[ScoreRecord]]:
    """The scores of these calls, and the others."""
    ids = {call.call_id for call in calls}
    return [s for s in scores if s.call_id in ids], [s for s in scores if s.call_id not in ids]


def _summary(exc: BaseException) -> str:
    """An error in one short line (a driver's message may run to the statement and more)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"
