"""What the vendor activities (Slack, PagerDuty, Jira) share about failures: one mapping of a
vendor's answer to what the activity does next, and the attempt key of idempotent retries.

The mapping is the same for every vendor:
- an answer that says slow down (HTTP 429, or the vendor's own word for it) is retried after
  its `Retry-After` (seconds; the vendor's usual pause when it names none);
- an answer no retry can change (PERMANENT_STATUSES, or the vendor's own verdict when its body
  gives one) raises the vendor's permanent error, which VENDOR_CALL does not retry;
- anything else, and no answer at all, is retried with the policy's backoff.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum

from requests.exceptions import InvalidJSONError
from requests.exceptions import JSONDecodeError as ResponseNotJSON
from temporalio import activity
from temporalio.exceptions import ApplicationError

# Answers no retry can change: the request itself is refused (credentials, project, a body
# the vendor cannot parse or will not take).
PERMANENT_STATUSES = frozenset({400, 401, 403, 404, 413, 422})
THROTTLED_STATUS = 429
# What a message quotes of a vendor's answer (an error page can be long).
DETAIL_MAX = 500


class Failure(StrEnum):
    RETRYABLE = "retryable"
    THROTTLED = "throttled"
    PERMANENT = "permanent"


@dataclass(frozen=True)
class Verdict:
    failure: Failure
    retry_after: timedelta | None = None  # THROTTLED: when to try again


def classify(
    status: int,
    retry_after: str | None,
    default_retry_after: int,
    *,
    throttled: bool = False,
    refused: bool | None = None,
) -> Verdict:
    """What a failed request's answer means: `status` its HTTP status (0: no answer came),
    `retry_after` its Retry-After header. `throttled` and `refused` are the vendor's own words
    from its body (Slack's `ratelimited`, its `ok: false` errors): `refused` decides instead of
    the status when given."""
    if status == THROTTLED_STATUS or throttled:
        delay = timedelta(seconds=_seconds(retry_after, default_retry_after))
        return Verdict(Failure.THROTTLED, delay)
    if refused if refused is not None else status in PERMANENT_STATUSES:
        return Verdict(Failure.PERMANENT)
    return Verdict(Failure.RETRYABLE)


def _seconds(retry_after: str | None, default: int) -> int:
    try:
        return max(int(retry_after), 0) if retry_after is not None else default
    except ValueError:  # an HTTP date, or nonsense: the vendor's usual pause
        return default


@dataclass(frozen=True)
class VendorErrors:
    """One vendor's failures as the activity raises them (the mapping is `classify`'s)."""

    vendor: str  # as the messages name it: "PagerDuty"
    permanent: type[Exception]  # listed as non-retryable in VENDOR_CALL
    default_retry_after: int  # seconds, when a throttling answer names no Retry-After
    throttled_type: str = ""  # the throttled ApplicationError's type; "<vendor>Throttled"

    def answer(
        self,
        what: str,
        status: int,
        retry_after: str | None = None,
        detail: str = "",
        *,
        throttled: bool = False,
        refused: bool | None = None,
    ) -> Exception:
        """The exception for a request the vendor answered with a failure (see `classify`);
        `detail` is what the vendor said."""
        verdict = classify(
            status, retry_after, self.default_retry_after, throttled=throttled, refused=refused
        )
        said = f": {_clip(detail)}" if detail else ""
        if verdict.failure == Failure.THROTTLED:
            assert verdict.retry_after is not None
            return ApplicationError(
                f"{self.vendor} rate-limited {what}; "
                f"retrying after {int(verdict.retry_after.total_seconds())}s",
                type=self.throttled_type or f"{self.vendor}Throttled",
                next_retry_delay=verdict.retry_after,
            )
        if verdict.failure == Failure.PERMANENT:
            http = f" (HTTP {status})" if status >= 400 else ""
            return self.permanent(f"{self.vendor} refused {what}{http}{said}")
        http = f" (HTTP {status})" if status else ""
        return ApplicationError(f"{self.vendor} failed {what}{http}{said}", type=self.retryable)

    def unreachable(self, what: str, exc: BaseException) -> ApplicationError:
        """No answer at all (connection refused, timeout): retryable."""
        return ApplicationError(f"{self.vendor} unreachable for {what}: {exc}", type=self.retryable)

    def unencodable(self, what: str, exc: BaseException) -> Exception:
        """Our request could not be built or encoded: the same on every try."""
        return self.permanent(
            f"{self.vendor} {what} not sent: the request could not be encoded: {exc}"
        )

    @property
    def retryable(self) -> str:
        return f"{self.vendor}Error"


def _clip(text: str) -> str:
    return text if len(text) <= DETAIL_MAX else text[: DETAIL_MAX - 1] + "…"


def request_unencodable(exc: BaseException | None) -> bool:
    """Our request body could not be encoded (the same on every try); an answer that is not
    JSON subclasses the same exception and is the vendor's, retryable."""
    return isinstance(exc, InvalidJSONError) and not isinstance(exc, ResponseNotJSON)


def attempt_key(info: activity.Info) -> str:
    """The same for every attempt of one activity execution (its workflow run and activity id),
    different for any other execution: what a retry looks for to learn whether an earlier
    attempt already told the vendor."""
    run = info.workflow_run_id or info.workflow_id or ""
    return hashlib.sha256(f"{run}/{info.activity_id}".encode()).hexdigest()[:32]
