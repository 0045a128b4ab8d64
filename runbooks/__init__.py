"""Runbooks: one file per failure mode, each a child workflow of the incident it mitigates.

To add one, write `runbooks/<name>.py` (a workflow and its `SPEC`) and list its SPEC below;
README "Write a runbook" walks through it.
"""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from runbooks import (
        api_outage,
        cost_spike,
        elevated_latency,
        quality_degradation,
        rate_limit_exhaustion,
    )
    from runbooks.base import RunbookSpec

RUNBOOKS: tuple[RunbookSpec, ...] = (
    rate_limit_exhaustion.SPEC,
    elevated_latency.SPEC,
    quality_degradation.SPEC,
    cost_spike.SPEC,
    api_outage.SPEC,
)


def runbook_for(trigger: str, runbooks: tuple[RunbookSpec, ...] = RUNBOOKS) -> RunbookSpec | None:
    return next((spec for spec in runbooks if trigger in spec.triggers), None)


def workflows() -> list[type]:
    """The runbook workflow classes, for the worker to register."""
    return [spec.workflow for spec in RUNBOOKS]
