"""What each chaos scenario counted, gathered into the Reliability table printed after the run.

A scenario calls `record(...)` once with what it measured; the table (also written to
`$PAGERLOOP_CHAOS_REPORT` as JSON when that is set) is the README's Reliability table."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Outcome:
    fault: str
    runs: int  # incidents (or batches) put through the fault
    incidents_lost: int  # opened but missing, frozen or never resolved afterwards
    duplicates: int  # Slack messages, PagerDuty dedup keys, Jira tickets beyond one each
    worst_timer_delay_s: float  # latest escalation timer against its deadline (0 if none due)
    records_lost: int  # call records made but not in the store afterwards


OUTCOMES: list[Outcome] = []


def record(
    fault: str,
    *,
    runs: int,
    incidents_lost: int = 0,
    duplicates: int = 0,
    worst_timer_delay_s: float = 0.0,
    records_lost: int = 0,
) -> Outcome:
    outcome = Outcome(fault, runs, incidents_lost, duplicates, worst_timer_delay_s, records_lost)
    OUTCOMES.append(outcome)
    return outcome


HEADER = "| fault | runs | incidents lost | duplicates | worst timer delay | records lost |"


def table() -> str:
    lines = [HEADER, "|---|---:|---:|---:|---:|---:|"]
    lines += [
        f"| {o.fault} | {o.runs} | {o.incidents_lost} | {o.duplicates} | "
        f"{o.worst_timer_delay_s:.1f} s | {o.records_lost} |"
        for o in OUTCOMES
    ]
    return "\n".join(lines)


def write_report() -> None:
    path = os.environ.get("PAGERLOOP_CHAOS_REPORT")
    if path and OUTCOMES:
        with open(path, "w", encoding="utf-8") as out:
            json.dump([asdict(o) for o in OUTCOMES], out, indent=2)
