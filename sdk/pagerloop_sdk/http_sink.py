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
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from typing import Any

import httpx

from pagerloop_sdk.backoff import RETRY_AFTER_MAX
from pagerloop_sdk.recorder import RecordsRefusedError
from pagerloop_sdk.records import CallRecord, ScoreRecord

PATH = "/v1/llm-calls"
CALLS_PER_REQUEST = 2_000  # the API takes 10,000 and 5 MB inflated; a call is ~0.5 KB of JSON
TIMEOUT = httpx.Timeout(10.0, connect=5.0)
# Quality verdicts travel with their call; a ScoreRecord's other fields are the call's.
QUALITY_FIELDS = ("score", "format_compliance", "hallucination_risk", "relevance")


class RetryLaterError(Exception):
    """The API is there but asks for time (429, 503): retry no sooner than `retry_after`."""

    def __init__(self, message: str, retry_after: float | None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def wire(call: CallRecord, score: ScoreRecord | None) -> dict[str, Any]:
    """One record as `POST /v1/llm-calls` takes it. The user is the SDK's pseudonym (the API
    hashes it again with its own salt): raw end-user ids never leave the application. The cost
    is left to the API, which prices every call with the one price table it is configured
    with, whichever way the call arrived."""
    body = {k: v for k, v in asdict(call).items() if v is not None and k != "cost_usd"}
    body["timestamp"] = body.pop("ts").isoformat()
    if "user_hash" in body:
        body["user"] = body.pop("user_hash")
    if score is not None:
        body["quality"] = {name: getattr(score, name) for name in QUALITY_FIELDS}
    return body


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
    ) -> None:
        self.url = url.rstrip("/")
        headers = {
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
            "User-Agent": "pagerloop-sdk",
        }
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._headers = headers
        self._client = client or httpx.Client(timeout=TIMEOUT)

    def write(self, calls: Sequence[CallRecord], scores: Sequence[ScoreRecord]) -> None:
        by_call = {score.call_id: score for score in scores}
        for part in _parts(calls):
            records = [wire(call, by_call.get(call.call_id)) for call in part]
            body = gzip.compress(json.dumps({"calls": records}).encode(), compresslevel=1)
            response = self._client.post(self.url + PATH, content=body, headers=self._headers)
            self._check(response)

    @staticmethod
    def _check(response: httpx.Response) -> None:
        status = response.status_code
        if status < 300:
            return
        detail = response.text[:300]
        if status in (429, 503):
            raise RetryLaterError(f"{status} {detail}", _retry_after(response))
        if status in (400, 413, 422):
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
        self._client.close()


def _parts(calls: Sequence[CallRecord]) -> Iterator[Sequence[CallRecord]]:
    for start in range(0, len(calls), CALLS_PER_REQUEST):
        yield calls[start : start + CALLS_PER_REQUEST]
