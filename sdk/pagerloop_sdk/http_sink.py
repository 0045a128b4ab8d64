"""The recorder's sink in an application: batches of records to `POST /v1/llm-calls`, gzipped.

The recorder's thread calls `write`; whatever this raises decides what becomes of the batch
(pagerloop_sdk.recorder): a refusal of the records themselves (422: a value the API cannot
take) splits the batch until the bad record is alone, anything else keeps the records and
retries them with backoff, no sooner than the API's `Retry-After` (429, 503). A wrong key
(401/403) is retried too: records wait, spooled, for an operator to fix the key.

A batch sent again after an ambiguous failure (a timeout after the API wrote it) writes nothing
twice: every record carries its call_id, and ingest is idempotent on it.
"""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from operator import attrgetter
from typing import Any

import httpx

from pagerloop_sdk.backoff import RETRY_AFTER_MAX
from pagerloop_sdk.recorder import SLICE, RecordsRefusedError, refused
from pagerloop_sdk.records import CallRecord, ScoreRecord

PATH = "/v1/llm-calls"
COLUMNS_TYPE = "application/vnd.pagerloop.columns+json"  # api/columns.py
COLUMN_CHUNK = 256  # values per `json.dumps`: about 0.1 ms of holding the GIL
CALLS_PER_REQUEST = 2_000  # the API takes 10,000 and 5 MB inflated; a call is ~0.5 KB of JSON
CONCURRENCY = 4  # requests of one batch in flight together
TIMEOUT = httpx.Timeout(10.0, connect=5.0)
# Quality verdicts travel with their call; a ScoreRecord's other fields are the call's.
QUALITY_FIELDS = ("score", "format_compliance", "hallucination_risk", "relevance")


class RetryLaterError(Exception):
    """The API is there but asks for time (429, 503): retry no sooner than `retry_after`."""

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# The record's fields as the API names them, in one C call per record (`asdict` would deep-copy
# each value): the cost is left out, `ts` is sent as `timestamp`, `user_hash` as `user`.
_RENAMED = {"user_hash": "user"}
_SENT = tuple(f.name for f in fields(CallRecord) if f.name not in ("ts", "cost_usd"))
_WIRE_NAMES = tuple(_RENAMED.get(name, name) for name in _SENT)
_sent_values = attrgetter(*_SENT)


def encode(calls: Sequence[CallRecord], scores: dict[str, ScoreRecord]) -> bytes:
    """The calls as `POST /v1/llm-calls` takes them in columns (COLUMNS_TYPE), gzipped: an
    array per field, a field no call has left out. The user is the SDK's pseudonym (the API
    hashes it again with its own salt): raw end-user ids never leave the application. The cost
    is left to the API, which prices every call with the one price table it is configured
    with, whichever way the call arrived.

    Made SLICE records, or COLUMN_CHUNK values of a column, at a time: `json.dumps` and the C
    loops hold the GIL until they return, and the app's threads wait meanwhile."""
    rows: list[tuple[Any, ...]] = []
    stamps: list[str] = []
    for start in range(0, len(calls), SLICE):
        part = calls[start : start + SLICE]
        rows.extend(map(_sent_values, part))
        stamps.extend(call.ts.isoformat() for call in part)
        time.sleep(0)  # the GIL to a waiting app thread
    pieces = []
    for name, column in zip(_WIRE_NAMES, zip(*rows, strict=True), strict=True):
        if column.count(None) < len(column):
            pieces.append(f'"{name}": {_json_array(column)}')
    pieces.append(f'"timestamp": {_json_array(stamps)}')
    verdicts = [scores.get(call.call_id) for call in calls] if scores else []
    if any(verdicts):
        quality = [
            None if v is None else {name: getattr(v, name) for name in QUALITY_FIELDS}
            for v in verdicts
        ]
        pieces.append(f'"quality": {_json_array(quality)}')
    body = '{"columns": {' + ", ".join(pieces) + "}}"
    return gzip.compress(body.encode(), compresslevel=1)


def _json_array(values: Sequence[Any]) -> str:
    parts = []
    for start in range(0, len(values), COLUMN_CHUNK):
        parts.append(json.dumps(values[start : start + COLUMN_CHUNK])[1:-1])
        time.sleep(0)
    return "[" + ",".join(parts) + "]"


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    try:
        return min(max(float(value), 0.0), RETRY_AFTER_MAX)
    except ValueError:
        return None


class HttpSink:
    def __init__(
        self,
        url: str,
        api_key: str | None,
        *,
        client: httpx.Client | None = None,
        concurrency: int = CONCURRENCY,
    ) -> None:
        self.url = url.rstrip("/")
        headers = {
            "Content-Type": COLUMNS_TYPE,
            "Content-Encoding": "gzip",
            "User-Agent": "pagerloop-sdk",
        }
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._headers = headers
        self._client = client or httpx.Client(timeout=TIMEOUT)
        self.concurrency = concurrency
        self._pool: ThreadPoolExecutor | None = None

    def write(self, calls: Sequence[CallRecord], scores: Sequence[ScoreRecord]) -> None:
        """Send a batch: one request per `CALLS_PER_REQUEST` calls. A batch of several parts
        has them in flight together (up to `concurrency`), each encoded while the API takes the
        one before; the batch is written when every part is. A part that fails fails the batch,
        which is sent again whole (the parts already written write nothing twice)."""
        by_call = {score.call_id: score for score in scores}
        parts = list(_parts(calls))
        if len(parts) == 1 or self.concurrency <= 1:
            for part in parts:
                self._check(self._post(encode(part, by_call)))
            return
        try:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    self.concurrency, thread_name_prefix="pagerloop-http"
                )
            pending = [self._pool.submit(self._post, encode(part, by_call)) for part in parts]
        except RuntimeError:  # at exit (the flush of atexit): no new threads, one at a time
            for part in parts:
                self._check(self._post(encode(part, by_call)))
            return
        failures: list[BaseException] = []
        for future in pending:
            try:
                self._check(future.result())
            except Exception as exc:
                failures.append(exc)
        if failures:
            # A failure that is not the records' own first: the batch is retried whole, and a
            # refusal among its parts is isolated once the API takes the rest.
            raise next((exc for exc in failures if not refused(exc)), failures[0])

    def _post(self, body: bytes) -> httpx.Response:
        return self._client.post(self.url + PATH, content=body, headers=self._headers)

    @staticmethod
    def _check(response: httpx.Response) -> None:
        status = response.status_code
        if status < 300:
            return
        detail = response.text[:300]
        if status in (429, 503):
            raise RetryLaterError(f"{status} {detail}", _retry_after(response))
        if status in (413, 422):  # the records themselves: their batch is split to find which
            raise RecordsRefusedError(f"{status} {detail}")
        raise httpx.HTTPStatusError(
            f"{status} from {response.request.url}: {detail}",
            request=response.request,
            response=response,
        )

    def controls(self) -> Any:
        """The controls to enforce for calls recorded here: the same API's."""
        from pagerloop_sdk.http_controls import HttpControls

        return HttpControls.shared(self.url, self._headers.get("Authorization"))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
        self._client.close()


def _parts(calls: Sequence[CallRecord]) -> Iterator[Sequence[CallRecord]]:
    for start in range(0, len(calls), CALLS_PER_REQUEST):
        yield calls[start : start + CALLS_PER_REQUEST]
