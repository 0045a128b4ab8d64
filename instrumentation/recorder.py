"""The recorder: a bounded queue on the caller's side, one background thread on the other.

`submit` never blocks and never does I/O: it turns the finished call into its record (a few
microseconds of arithmetic: usage, price, pseudonym) and queues it; when the queue is full the
record is dropped and counted. The thread does everything slow: quality scoring of the sampled
calls, the JSON log line, and the batched writes to its sink. `flush()` waits for what is
queued, and an atexit hook flushes on exit.
"""

from __future__ import annotations

import atexit
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import Counter, Gauge
from sqlalchemy import Engine

from instrumentation import calllog, quality
from instrumentation.capture import PendingCall, finalize, prompt_text
from instrumentation.pricing import DEFAULT_PRICES, PRICES, PriceTable, base_model
from stores.llm_calls import CallRecord, write_calls
from stores.quality import ScoreRecord, write_scores

log = logging.getLogger(__name__)

RECORDS = Counter(
    "pagerloop_instrumentation_records_total",
    "LLM call records by what became of them (written, dropped: queue full, failed: sink error).",
    ["outcome"],
)
UNPRICED = Counter(
    "pagerloop_unpriced_calls_total",
    "Calls recorded with an unknown cost because their model has no price.",
    ["model"],
)
QUEUE_DEPTH = Gauge(
    "pagerloop_instrumentation_queue_depth", "Records waiting for the recorder's thread."
)


def count_unpriced(model: str) -> None:
    """Count a call without a price. The label is a model of the price table (a snapshot
    counts as its base model) or "other": model names come from callers, and each label value
    is a series on /metrics for as long as the process lives."""
    known = model if model in PRICES else base_model(model)
    UNPRICED.labels(known if known in PRICES else "other").inc()


class Sink(Protocol):
    def write(self, calls: Sequence[CallRecord], scores: Sequence[ScoreRecord]) -> None: ...


class StoreSink:
    """Straight into the stores (SQLite file or PostgreSQL) the detectors read."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def write(self, calls: Sequence[CallRecord], scores: Sequence[ScoreRecord]) -> None:
        write_calls(self.engine, calls)
        write_scores(self.engine, scores)


@dataclass
class RecorderStats:
    submitted: int
    written: int
    dropped: int
    failed: int
    queued: int


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
        sink_attempts: int = 3,
    ) -> None:
        self.sink = sink
        self.salt = salt
        self.prices = prices
        self.quality_sample_rate = quality_sample_rate
        self.max_queue = max_queue
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.sink_attempts = sink_attempts
        # Each record with its call when that call is to be scored for quality.
        self._queue: deque[tuple[CallRecord, PendingCall | None]] = deque()
        self._wake = threading.Event()
        self._idle = threading.Condition()
        self._busy = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.submitted = 0
        self.written = 0
        self.dropped = 0
        self.failed = 0

    # --- the caller's side -------------------------------------------------------------------

    def sample_quality(self) -> bool:
        return self.quality_sample_rate > 0 and random.random() < self.quality_sample_rate  # noqa: S311

    def submit(self, call: PendingCall) -> None:
        """Queue a finished call. Never blocks, never raises."""
        if len(self._queue) >= self.max_queue:
            self.dropped += 1
            RECORDS.labels("dropped").inc()
            return
        try:
            record = finalize(call, self.salt, self.prices)
        except Exception:
            log.exception("could not make a record of an LLM call")
            self.failed += 1
            RECORDS.labels("failed").inc()
            return
        scored = call if call.score_quality and record.status == "success" else None
        self.enqueue(record, scored)

    def enqueue(self, record: CallRecord, scored: PendingCall | None = None) -> None:
        """Queue a finished record (and the call to score, if any)."""
        if self._thread is None:
            self._start()
        if len(self._queue) >= self.max_queue:
            self.dropped += 1
            RECORDS.labels("dropped").inc()
            return
        self._queue.append((record, scored))
        self.submitted += 1
        if len(self._queue) >= self.batch_size:
            self._wake.set()

    # --- the thread's side -------------------------------------------------------------------

    def _start(self) -> None:
        with self._start_lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(
                target=self._run, name="pagerloop-recorder", daemon=True
            )
            self._thread.start()
            atexit.register(self.close)

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            self._drain()
        self._drain()

    def _drain(self) -> None:
        with self._idle:
            self._busy = True
        try:
            while self._queue:
                size = min(self.batch_size, len(self._queue))
                batch = [self._queue.popleft() for _ in range(size)]
                QUEUE_DEPTH.set(len(self._queue))
                self._write(batch)
        finally:
            with self._idle:
                self._busy = False
                self._idle.notify_all()

    def _write(self, batch: list[tuple[CallRecord, PendingCall | None]]) -> None:
        calls = [record for record, _ in batch]
        scores: list[ScoreRecord] = []
        for record, pending in batch:
            if pending is not None:
                scored = self._score(pending, record)
                if scored is not None:
                    scores.append(scored)
            if record.cost_usd is None and record.input_tokens is not None:
                count_unpriced(record.response_model or record.model)
        calllog.emit(calls)
        for attempt in range(1, self.sink_attempts + 1):
            try:
                self.sink.write(calls, scores)
            except Exception as exc:
                if attempt == self.sink_attempts:
                    log.error("dropping %d LLM call records: the store failed: %s", len(calls), exc)
                    self.failed += len(calls)
                    RECORDS.labels("failed").inc(len(calls))
                    return
                time.sleep(0.2 * 2**attempt)
            else:
                self.written += len(calls)
                RECORDS.labels("written").inc(len(calls))
                return

    @staticmethod
    def _score(pending: PendingCall, record: CallRecord) -> ScoreRecord | None:
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

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted so far is written (or failed); False on timeout."""
        if self._thread is None:
            return True
        deadline = time.monotonic() + timeout
        while True:
            self._wake.set()
            with self._idle:
                if not self._queue and not self._busy:
                    return True
                self._idle.wait(0.05)
            if time.monotonic() > deadline:
                return False

    def close(self, timeout: float = 10.0) -> None:
        self.flush(timeout)
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def stats(self) -> RecorderStats:
        return RecorderStats(
            self.submitted, self.written, self.dropped, self.failed, len(self._queue)
        )
