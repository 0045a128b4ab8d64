"""The incident report, written when an incident resolves (`reports.build`): its figures read
from the stores for the incident's scope over its window (the first bad minute, or the
opening, to the resolve) and the same window a day earlier, rendered (`domain.report`),
saved (`stores.incident_reports`) and handed back for Jira and Slack.

`build_report` is also what `pagerloop incidents report` runs for an incident still open (a
preview, not saved).
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import Engine
from temporalio import activity

from activities.finite import json_safe
from domain.incident import IncidentState, Trigger
from domain.report import (
    MAX_WINDOW_DAYS,
    IncidentReport,
    Onset,
    ReportLines,
    ReportText,
    markdown,
    mitigations,
    summary,
    times,
)
from domain.scopes import OTHER
from stores import incident_figures, incident_reports
from stores.llm_calls import utc

# Controls reported per incident (a runbook sets a handful; the rest would be noise).
MAX_CONTROLS = 20
DAY = timedelta(days=1)


class SignalHistory(Protocol):
    """What the detector's rules say about an incident's signal (`detectors.onset`, given by
    the worker): where its trouble began, and the lines past which a call counts as affected."""

    def first_bad_minute(self, trigger: str, scope: str, opened_at: datetime) -> Onset: ...

    def lines(self) -> ReportLines: ...


@dataclass
class ReportRequest:
    """The incident as it ended (its whole timeline)."""

    state: IncidentState


def build_report(
    engine: Engine, state: IncidentState, history: SignalHistory, now: datetime
) -> IncidentReport:
    """Every figure of the incident's report, from the stores as they are now."""
    opened = utc(state.opened_at)
    end = utc(state.resolved_at) if state.resolved_at is not None else utc(now)
    onset = history.first_bad_minute(str(state.trigger), state.scope, opened)
    start = min(utc(onset.minute), end) if onset.minute is not None else min(opened, end)
    notes: list[str] = []
    if onset.bounded:
        notes.append(
            "The signal was past its line for as far back as the search reaches: the "
            "trouble began before the window reported on."
        )
    if end - start > timedelta(days=MAX_WINDOW_DAYS):
        start = end - timedelta(days=MAX_WINDOW_DAYS)
        notes.append(
            f"The incident lasted longer than {MAX_WINDOW_DAYS} days: the figures "
            f"cover its last {MAX_WINDOW_DAYS}."
        )
    if state.scope.endswith(f":{OTHER}"):
        notes.append(
            f"{state.scope} stands for many small names, whichever were not the busiest at "
            "each evaluation: it has no calls of its own to count."
        )
    lines = history.lines()
    counted: dict[str, Any] = {
        "slow_ms": lines.slow_ms if state.trigger == Trigger.ELEVATED_LATENCY else None,
        "low_quality": lines.low_quality if state.trigger == Trigger.QUALITY_DEGRADATION else None,
    }
    during = incident_figures.usage(engine, state.scope, start, end, **counted)
    day_before = incident_figures.usage(engine, state.scope, start - DAY, end - DAY, **counted)
    controls = incident_figures.incident_controls(engine, state.incident_id)
    if len(controls) > MAX_CONTROLS:
        notes.append(f"{len(controls)} controls were set: the first {MAX_CONTROLS} are shown.")
        controls = controls[:MAX_CONTROLS]
    shares = [
        incident_figures.control_share(engine, state.scope, control, start, end)
        for control in controls
    ]
    first_control = min((utc(c.created_at) for c in controls), default=None)
    return IncidentReport(
        incident_id=state.incident_id,
        trigger=str(state.trigger),
        scope=state.scope,
        severity=str(state.severity),
        status=str(state.status),
        opened_at=opened,
        written_at=utc(now),
        start=start,
        end=end,
        onset=onset,
        during=during,
        day_before=day_before,
        lines=lines,
        times=times(state, onset, first_control),
        controls=shares,
        mitigations=mitigations(state.timeline),
        timeline=list(state.timeline),
        metrics=dict(state.metrics),
        summary=state.summary,
        level_name=state.level_name,
        acknowledged_by=state.acknowledged_by,
        resolved_by=state.resolved_by,
        resolved_at=utc(state.resolved_at) if state.resolved_at is not None else None,
        runbook=state.runbook,
        verification=state.verification,
        jira_issue=state.jira_issue,
        merged_into=state.merged_into,
        notes=notes,
    )


def figures(report: IncidentReport) -> dict[str, Any]:
    """The report's figures as JSON (no timeline: the Markdown has it), with the derived ones
    (calls affected, control shares) spelled out for whoever reads the row."""
    found = dataclasses.asdict(report)
    found.pop("timeline")
    for name, usage in (("during", report.during), ("day_before", report.day_before)):
        found[name]["affected"] = usage.affected
    for shown, control in zip(found["controls"], report.controls, strict=True):
        shown["share"] = control.share
    safe = json_safe(found)
    assert isinstance(safe, dict)
    return safe


def write_report(
    engine: Engine, state: IncidentState, history: SignalHistory, now: datetime
) -> ReportText:
    """Build, render and save the incident's report (replacing an earlier one)."""
    report = build_report(engine, state, history, now)
    text = ReportText(markdown(report), summary(report))
    incident_reports.save(
        engine, state.incident_id, text.markdown, text.summary, figures(report), now
    )
    return text


class ReportActivities:
    def __init__(self, engine: Engine, history: SignalHistory) -> None:
        self._engine = engine
        self._history = history

    @activity.defn(name="reports.build")
    async def build(self, request: ReportRequest) -> ReportText:
        return await asyncio.to_thread(
            write_report, self._engine, request.state, self._history, datetime.now(UTC)
        )
