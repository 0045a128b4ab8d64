"""The postmortem summary an incident leaves on its ticket when it is resolved (pure)."""

from __future__ import annotations

from datetime import datetime

from domain.incident import IncidentState


def _duration(start: datetime, end: datetime | None) -> str:
    if end is None:
        return "-"
    seconds = int((end - start).total_seconds())
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m {seconds:02d}s" if hours else f"{minutes}m {seconds:02d}s"


def postmortem(state: IncidentState) -> str:
    lines = [
        f"h3. Postmortem: {state.severity} {state.trigger} on {state.scope}",
        "",
        f"* Incident: {state.incident_id}",
        f"* Opened: {state.opened_at:%Y-%m-%d %H:%M:%S} UTC, highest level reached: L{state.level}",
        f"* Time to acknowledge: {_duration(state.opened_at, state.acknowledged_at)}"
        + (f" (by {state.acknowledged_by})" if state.acknowledged_by else ""),
        f"* Time to mitigate: {_duration(state.opened_at, state.mitigation_started_at)}",
        f"* Time to resolve: {_duration(state.opened_at, state.resolved_at)}"
        + (f" (by {state.resolved_by})" if state.resolved_by else ""),
        f"* Signal recovered: {state.recovered_at:%H:%M:%S} UTC"
        if state.recovered_at
        else "* Signal recovered: not reported",
        "",
        "h4. Last metrics",
    ]
    lines += [f"* {name}: {value:.4g}" for name, value in state.metrics.items()] or ["* none"]
    if state.runbook:
        lines += [
            "",
            f"h4. Runbook {state.runbook}",
            f"* Verification: {state.verification or '-'}",
        ]
        lines += [f"* {line}" for line in state.diagnosis.splitlines() if line.strip()]
    kinds = ("mitigation", "verified", "verification", "rolled_back", "controls_reverted",
             "controls_kept")  # fmt: skip
    actions = [e for e in state.timeline if e.kind in kinds]
    lines += ["", "h4. Actions"]
    lines += [f"* {e.at:%H:%M:%S} {e.text}" for e in actions] or ["* none recorded"]
    lines += ["", "h4. Timeline"]
    lines += [
        f"* {e.at:%H:%M:%S} {e.kind} ({e.actor} via {e.channel}): {e.text}" for e in state.timeline
    ]
    return "\n".join(lines)
