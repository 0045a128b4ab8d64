"""Workflow ids of the detectors."""

from __future__ import annotations


def detector_workflow_id(task_queue: str) -> str:
    """One detector per deployment; deployments sharing a namespace differ by task queue."""
    return f"detector-{task_queue}"
