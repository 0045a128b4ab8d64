"""RetentionWorkflow: purges old call records; a Temporal Schedule runs it every hour."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

with workflow.unsafe.imports_passed_through():
    from activities.retention import PurgeRequest, RetentionActivities
    from stores.retention import Purged


@dataclass
class RetentionInput:
    retention_days: int
    rollup_retention_days: int


@dataclass
class RetentionResult:
    calls: int
    scores: int
    rollup_rows: int


@workflow.defn
class RetentionWorkflow:
    @workflow.run
    async def run(self, input: RetentionInput) -> RetentionResult:
        purged: Purged = await workflow.execute_activity_method(
            RetentionActivities.purge,
            PurgeRequest(workflow.now(), input.retention_days, input.rollup_retention_days),
            start_to_close_timeout=timedelta(minutes=30),
            retry_policy=RetryPolicy(maximum_attempts=3),
            summary=f"purge calls older than {input.retention_days} days",
        )
        return RetentionResult(purged.calls, purged.scores, purged.rollup_rows)
