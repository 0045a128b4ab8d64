"""Named timeouts and retry policies for every activity call the workflows make (the incident,
the detector, the runbooks): beside the activities, which all three import, and the permanent
errors VENDOR_CALL names."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from temporalio.common import RetryPolicy


@dataclass(frozen=True)
class ActivityPolicy:
    start_to_close: timedelta
    schedule_to_close: timedelta | None
    retry: RetryPolicy

    def options(self) -> dict[str, Any]:
        """As keyword arguments of `workflow.execute_activity`."""
        return {
            "start_to_close_timeout": self.start_to_close,
            "schedule_to_close_timeout": self.schedule_to_close,
            "retry_policy": self.retry,
        }


# A page must never be lost: vendor calls retry with backoff for a day unless the error
# says retrying cannot help (bad token, unknown channel, invalid payload).
VENDOR_CALL = ActivityPolicy(
    start_to_close=timedelta(seconds=30),
    schedule_to_close=timedelta(hours=24),
    retry=RetryPolicy(
        initial_interval=timedelta(seconds=1),
        backoff_coefficient=2.0,
        maximum_interval=timedelta(minutes=5),
        non_retryable_error_types=[
            "SlackPermanentError",
            "PagerDutyPermanentError",
            "JiraPermanentError",
            "WebhookPermanentError",
            "EmailPermanentError",
        ],
    ),
)

# Store queries are cheap and the next evaluation comes soon: give up quickly.
STORE_QUERY = ActivityPolicy(
    start_to_close=timedelta(seconds=20),
    schedule_to_close=timedelta(minutes=1),
    retry=RetryPolicy(
        initial_interval=timedelta(milliseconds=500),
        maximum_interval=timedelta(seconds=5),
        maximum_attempts=5,
    ),
)

# Opening an incident talks to Temporal itself; transient failures clear fast.
OPEN_INCIDENT = ActivityPolicy(
    start_to_close=timedelta(seconds=30),
    schedule_to_close=timedelta(minutes=5),
    retry=RetryPolicy(
        initial_interval=timedelta(seconds=1),
        maximum_interval=timedelta(seconds=15),
    ),
)

# A control that is set must also be revertible: changing one retries for an hour.
CONTROL_CHANGE = ActivityPolicy(
    start_to_close=timedelta(seconds=20),
    schedule_to_close=timedelta(hours=1),
    retry=RetryPolicy(
        initial_interval=timedelta(seconds=1),
        backoff_coefficient=2.0,
        maximum_interval=timedelta(seconds=30),
    ),
)

# Telling users is worth retrying, but a notice hours late is news of nothing, and the outage
# runbook waits for it before verifying: retried with backoff for ten minutes at most.
USER_NOTICE = ActivityPolicy(
    start_to_close=timedelta(seconds=30),
    schedule_to_close=timedelta(minutes=10),
    retry=RetryPolicy(
        initial_interval=timedelta(seconds=1),
        backoff_coefficient=2.0,
        maximum_interval=timedelta(minutes=1),
        non_retryable_error_types=["WebhookPermanentError"],
    ),
)

# An eval runs a model over a golden set: give it time, retry it with backoff, but not for
# longer than a person waits for the diagnosis (the quality runbook asks before pinning).
GOLDEN_SET_EVAL = ActivityPolicy(
    start_to_close=timedelta(minutes=2),
    schedule_to_close=timedelta(minutes=10),
    retry=RetryPolicy(
        initial_interval=timedelta(seconds=2),
        backoff_coefficient=2.0,
        maximum_interval=timedelta(minutes=1),
        non_retryable_error_types=["WebhookPermanentError", "GoldenSetAnswerError"],
    ),
)
