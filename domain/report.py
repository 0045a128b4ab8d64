"""The incident report written at resolve: what the incident cost and how it was handled.

Pure: an `IncidentReport` (every figure, gathered from the stores by `activities/reports.py`)
in, Markdown out (`markdown`: the Jira postmortem and `pagerloop incidents report ID`) and a
few lines for the incident's Slack thread (`summary`). Times to detect, acknowledge, mitigate,
verify and resolve; the calls affected, tokens and dollars against the same window a day
earlier; the share of the scope's calls each control changed; each mitigation with its
verdict; the timeline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime

from domain.incident import IncidentState, TimelineEntry

# A report covers at most this much traffic: an incident left open for weeks is reported on
# its last week (and says so).
MAX_WINDOW_DAYS = 7
# Timeline rows written into the report (the `state` query and `incidents show` have them all).
MAX_TIMELINE_ROWS = 300
DASH = "—"

# Timeline kinds: a step that changed the traffic, and the verdicts that follow one.
STEP_KINDS = frozenset({"mitigation", "canary"})
VERDICT_KINDS = frozenset({"verified", "verification", "rolled_back"})
# A canary's entries: the first one tried it ("canary on 10% ..."), the next one judged it.
CANARY_VERDICT_PREFIXES = ("canary promoted", "canary reverted")


@dataclass
class Onset:
    """The first bad minute: the start of the run of minutes, ending when the incident opened,
    whose signal (as the detector computes it) is past the rule's warning line."""

    minute: datetime | None
    rule: str = ""
    line: float | None = None  # the rule's warning line (its critical one when it has none)
    value: float | None = None  # the signal at that minute
    bounded: bool = False  # the run reaches back to the search's start: it began earlier
    why: str = ""  # why there is none


@dataclass
class ReportLines:
    """The lines past which a call counts as affected without failing: slower than the p95
    rule's warning line (latency incidents), scored below the quality rule's (quality ones)."""

    slow_ms: float = 8000.0
    low_quality: float = 0.7


@dataclass
class Usage:
    """The scope's calls that reached OpenAI over a window, as the usage rollups count them."""

    calls: int = 0
    failed: int = 0  # errors, timeouts and 5xx: what the detector's error rate counts
    rate_limited: int = 0  # 429s
    slow: int | None = None  # successful calls past the slow line (latency incidents only)
    low_quality: int | None = None  # answers scored below the line (quality incidents only)
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0

    @property
    def affected(self) -> int:
        return self.failed + self.rate_limited + (self.slow or 0) + (self.low_quality or 0)

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass
class ControlShare:
    """One of the incident's controls, and the share of the scope's calls (cache hits
    included: those are a cache control's calls) that carried its tag while it was in force
    during the incident."""

    control_id: int
    kind: str
    description: str
    created_at: datetime
    ended_at: datetime | None  # reverted, or expired (None: still in force)
    fraction: float | None  # a canary's slice
    start: datetime | None  # in force during the incident from ...
    end: datetime | None  # ... to (None, None: not in force during the incident)
    calls: int = 0  # the scope's calls over that time
    tagged: int = 0  # those that carried its tag (`kind#id` or `canary#id`)

    @property
    def share(self) -> float | None:
        return self.tagged / self.calls if self.calls else None


@dataclass
class Elapsed:
    """One of the report's times: from the incident's opening (or the first bad minute) to a
    milestone, or why there is none."""

    name: str  # detect | acknowledge | mitigate | verify | resolve
    seconds: float | None
    span: str  # what was measured: "first bad minute 13:58 UTC → opened"
    why: str = ""  # why there is no time


@dataclass
class Mitigation:
    """A step that changed the traffic (runbook mitigation or canary), and its verdict."""

    at: datetime
    kind: str
    text: str
    verdict_kind: str = ""
    verdict: str = ""
    verdict_at: datetime | None = None


@dataclass
class IncidentReport:
    incident_id: str
    trigger: str
    scope: str
    severity: str
    status: str
    opened_at: datetime
    written_at: datetime
    start: datetime  # the window reported on: the first bad minute (or the opening) ...
    end: datetime  # ... to the resolve (or now, for a preview)
    onset: Onset
    during: Usage
    day_before: Usage
    lines: ReportLines = field(default_factory=ReportLines)
    times: list[Elapsed] = field(default_factory=list)
    controls: list[ControlShare] = field(default_factory=list)
    mitigations: list[Mitigation] = field(default_factory=list)
    timeline: list[TimelineEntry] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    summary: str = ""
    level_name: str = "L1"
    acknowledged_by: str | None = None
    resolved_by: str | None = None
    resolved_at: datetime | None = None
    runbook: str | None = None
    verification: str | None = None
    jira_issue: str | None = None
    merged_into: str | None = None
    notes: list[str] = field(default_factory=list)  # caveats: the window capped, a folded scope

    @property
    def preview(self) -> bool:
        return self.resolved_at is None


# --- what the state says (pure) ----------------------------------------------------------


def mitigations(timeline: list[TimelineEntry]) -> list[Mitigation]:
    """Each step that changed the traffic, with the verdict that followed it: a runbook's
    mitigation with the next verified / verification / rolled_back entry before the next
    step; a canary ("canary on ...") with the next canary entry that promoted or reverted it."""
    found: list[Mitigation] = []
    open_step: Mitigation | None = None
    open_canaries: list[Mitigation] = []
    for entry in timeline:
        if entry.kind == "canary" and entry.text.startswith(CANARY_VERDICT_PREFIXES):
            if open_canaries:
                _judge(open_canaries.pop(0), entry)
            continue
        if entry.kind in STEP_KINDS:
            step = Mitigation(entry.at, entry.kind, entry.text)
            found.append(step)
            if entry.kind == "canary":
                open_canaries.append(step)
            else:
                open_step = step
        elif entry.kind in VERDICT_KINDS and open_step is not None:
            _judge(open_step, entry)
            open_step = None
    return found


def _judge(step: Mitigation, entry: TimelineEntry) -> None:
    step.verdict_kind, step.verdict, step.verdict_at = entry.kind, entry.text, entry.at


def times(state: IncidentState, onset: Onset, first_control_at: datetime | None) -> list[Elapsed]:
    """Time to detect (first bad minute → opened), and from the opening to the first
    acknowledgement, the first control applied, the verdict on the mitigation, the resolve."""
    opened = state.opened_at
    found = [_detect(opened, onset)]
    if state.acknowledged_at is not None:
        by = f" by {state.acknowledged_by}" if state.acknowledged_by else ""
        found.append(_since(opened, "acknowledge", state.acknowledged_at, f"acknowledged{by}"))
    else:
        found.append(Elapsed("acknowledge", None, "opened → acknowledged", _never_acked(state)))
    first_step = next((e.at for e in state.timeline if e.kind in STEP_KINDS), None)
    applied = [at for at in (first_control_at, first_step) if at is not None]
    if applied:
        found.append(_since(opened, "mitigate", min(applied), "first control applied"))
    else:
        why = "no control was applied" + (
            f" (runbook {state.runbook}: {state.runbook_phase or 'not run'})"
            if state.runbook
            else ""
        )
        found.append(Elapsed("mitigate", None, "opened → first control applied", why))
    found.append(_verify(state))
    if state.resolved_at is not None:
        by = f" by {state.resolved_by}" if state.resolved_by else ""
        found.append(_since(opened, "resolve", state.resolved_at, f"resolved{by}"))
    else:
        found.append(Elapsed("resolve", None, "opened → resolved", "not resolved yet"))
    return found


def _since(opened: datetime, name: str, at: datetime, what: str) -> Elapsed:
    return Elapsed(name, max((at - opened).total_seconds(), 0.0), f"opened → {what}")


def _detect(opened: datetime, onset: Onset) -> Elapsed:
    if onset.minute is None:
        return Elapsed("detect", None, "first bad minute → opened", onset.why)
    start = f"first bad minute {onset.minute:%H:%M} UTC"
    if onset.bounded:
        start = f"the search's start {onset.minute:%H:%M} UTC (it began earlier)"
    seconds = max((opened - onset.minute).total_seconds(), 0.0)
    return Elapsed("detect", seconds, f"{start} → opened")


def _never_acked(state: IncidentState) -> str:
    if state.merged_into:
        return f"never acknowledged: merged into {state.merged_into}"
    if state.resolved_at is None:
        return "not acknowledged yet"
    if state.resolved_by == "pagerloop":
        return "never acknowledged: auto-resolved"
    return f"never acknowledged: resolved by {state.resolved_by} first"


def _verify(state: IncidentState) -> Elapsed:
    opened = state.opened_at
    if state.verified_at is not None:
        return _since(opened, "verify", state.verified_at, "mitigation verified")
    verdict = next((e for e in state.timeline if e.kind in VERDICT_KINDS), None)
    if verdict is not None:
        outcome = {"verified": "mitigation verified", "rolled_back": "rolled back: no recovery"}
        return _since(opened, "verify", verdict.at, outcome.get(verdict.kind, verdict.text))
    if not any(e.kind in STEP_KINDS for e in state.timeline):
        return Elapsed("verify", None, "opened → verdict", "no mitigation to verify")
    return Elapsed("verify", None, "opened → verdict", "resolved before the verification")


# --- rendering -----------------------------------------------------------------------------


def took(seconds: float | None) -> str:
    """A time as people read it: 45 s, 4 min 11 s, 1 h 02 min."""
    if seconds is None:
        return DASH
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        minutes, rest = divmod(whole, 60)
        return f"{minutes} min {rest:02d} s"
    hours, rest = divmod(whole, 3600)
    days, hours = divmod(hours, 24)
    text = f"{hours} h {rest // 60:02d} min"
    return f"{days} d {text}" if days else text


def count(value: float | None) -> str:
    if value is None:
        return DASH
    if not math.isfinite(value):
        return _infinite(value)
    return f"{round(value):,}"


def dollars(value: float) -> str:
    if not math.isfinite(value):
        return _infinite(value)
    return f"${value:,.2f}" if abs(value) >= 0.01 or value == 0 else f"${value:.4f}"


def percent(part: float, whole: float) -> str:
    if not whole or not (math.isfinite(part) and math.isfinite(whole)):
        return DASH
    return f"{part / whole:.1%}"


def _infinite(value: float) -> str:
    return "NaN" if math.isnan(value) else ("∞" if value > 0 else "-∞")


def _number(value: float) -> str:
    """14200.0 -> "14,200", 0.0812 -> "0.0812"."""
    if not math.isfinite(value):
        return _infinite(value)
    if abs(value) >= 1000 or value == int(value):
        return f"{value:,.0f}"
    return f"{value:.4g}"


def _change(now: float, before: float, money: bool = False) -> str:
    """`+445 (+3.7%)`: the difference, and how much that is of the day before."""
    if not (math.isfinite(now) and math.isfinite(before)):
        return DASH
    diff = now - before
    sign = "+" if diff >= 0 else "-"
    shown = dollars(abs(diff)) if money else count(abs(diff))
    relative = f" ({sign}{abs(diff) / before:.1%})" if before else ""
    return f"{sign}{shown}{relative}"


def _cell(text: str) -> str:
    """Text inside one table cell: one line, no cell breaks."""
    lines = [line.strip().removeprefix("• ") for line in text.splitlines() if line.strip()]
    return "; ".join(lines).replace("|", "\\|")


def _at(at: datetime, day: datetime | None = None) -> str:
    """14:03:10, with the date when it is another day than `day`."""
    if day is not None and at.date() == day.date():
        return f"{at:%H:%M:%S}"
    return f"{at:%Y-%m-%d %H:%M:%S}"


NAMES = {
    "detect": "Time to detect",
    "acknowledge": "Time to acknowledge",
    "mitigate": "Time to mitigate",
    "verify": "Time to verify",
    "resolve": "Time to resolve",
}


def markdown(report: IncidentReport) -> str:
    """The whole report as Markdown (GitHub-flavoured tables)."""
    r = report
    lines = [f"# Postmortem: {r.severity} {r.trigger} on `{r.scope}`", ""]
    if r.preview:
        lines += [f"> Preview: the incident is {r.status}; figures up to {_at(r.end)} UTC.", ""]
    head = [f"Incident `{r.incident_id}`", f"opened {_at(r.opened_at)} UTC"]
    if r.resolved_at is not None:
        head.append(f"resolved {_at(r.resolved_at, r.opened_at)} UTC by {r.resolved_by}")
    head.append(f"highest level {r.level_name}")
    if r.runbook:
        head.append(f"runbook `{r.runbook}` (verification: {r.verification or DASH})")
    if r.jira_issue:
        head.append(f"ticket {r.jira_issue}")
    if r.merged_into:
        head.append(f"merged into `{r.merged_into}`")
    lines += [" · ".join(head), ""]
    if r.summary:
        lines += [f"> {_cell(r.summary)}", ""]
    lines += ["## Times", "", "| | took | measured |", "|---|---|---|"]
    for elapsed in r.times:
        measured = elapsed.span + (f": {elapsed.why}" if elapsed.why else "")
        name = NAMES.get(elapsed.name, elapsed.name)
        lines.append(f"| {name} | {took(elapsed.seconds)} | {_cell(measured)} |")
    lines += ["", *_impact(r), "", *_controls(r), "", *_mitigations(r)]
    if r.metrics:
        lines += ["", "## Last metrics", ""]
        lines += [f"- {name}: {_number(value)}" for name, value in r.metrics.items()]
    lines += ["", *_timeline(r)]
    if r.notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in r.notes]
    lines += ["", f"Written by pagerloop at {_at(r.written_at)} UTC."]
    return "\n".join(lines) + "\n"


def _impact(r: IncidentReport) -> list[str]:
    now, before = r.during, r.day_before
    lines = [
        f"## Impact on `{r.scope}`, {_at(r.start)} → {_at(r.end, r.start)} UTC",
        "",
        "| | during the incident | same window a day earlier | difference |",
        "|---|---|---|---|",
    ]
    rows: list[tuple[str, float | None, float | None, bool]] = [
        ("Calls", now.calls, before.calls, False),
        ("Failed calls (errors, timeouts, 5xx)", now.failed, before.failed, False),
        ("Rate-limited calls (429)", now.rate_limited, before.rate_limited, False),
    ]
    if now.slow is not None:
        rows.append((f"Slow calls (over {_number(r.lines.slow_ms)} ms)", now.slow, before.slow,
                     False))  # fmt: skip
    if now.low_quality is not None:
        rows.append((f"Answers scored below {_number(r.lines.low_quality)}", now.low_quality,
                     before.low_quality, False))  # fmt: skip
    rows += [
        ("**Calls affected**", now.affected, before.affected, False),
        ("Input tokens", now.input_tokens, before.input_tokens, False),
        ("Output tokens", now.output_tokens, before.output_tokens, False),
        ("Cost", now.cost_usd, before.cost_usd, True),
    ]
    for name, value, earlier, money in rows:
        if value is None or earlier is None:
            continue
        shown = dollars(value) if money else count(value)
        then = dollars(earlier) if money else count(earlier)
        lines.append(f"| {name} | {shown} | {then} | {_change(value, earlier, money)} |")
    lines += [
        "",
        f"Calls affected: {count(now.affected)} of {count(now.calls)} "
        f"({percent(now.affected, now.calls)}); calls that reached OpenAI, in the scope.",
    ]
    return lines


def _controls(r: IncidentReport) -> list[str]:
    lines = ["## Controls", ""]
    if not r.controls:
        return [*lines, "No control was set for this incident."]
    lines += [
        "| control | in force during the incident (UTC) | calls under it | share of the calls |",
        "|---|---|---|---|",
    ]
    for c in r.controls:
        name = f"{_cell(c.description)} (#{c.control_id})"
        if c.start is None or c.end is None:
            lines.append(f"| {name} | not in force during the incident | {DASH} | {DASH} |")
            continue
        when = f"{_at(c.start, r.start)} → {_at(c.end, c.start)}"
        under = f"{count(c.tagged)} of {count(c.calls)}"
        share = f"{c.share:.1%}" if c.share is not None else DASH
        lines.append(f"| {name} | {when} | {under} | {share} |")
    lines += [
        "",
        f"Calls under a control carried its tag; the share is of the calls in `{r.scope}` "
        "while it was in force (answers from the response cache included).",
    ]
    return lines


def _mitigations(r: IncidentReport) -> list[str]:
    lines = ["## Mitigations", ""]
    if not r.mitigations:
        return [*lines, "No runbook step changed the traffic."]
    lines += ["| at (UTC) | step | verdict |", "|---|---|---|"]
    for m in r.mitigations:
        verdict = DASH
        if m.verdict_at is not None:
            verdict = f"{_at(m.verdict_at, m.at)} {m.verdict_kind.replace('_', ' ')}: {m.verdict}"
        lines.append(f"| {_at(m.at, r.start)} | {_cell(m.text)} | {_cell(verdict)} |")
    return lines


def _timeline(r: IncidentReport) -> list[str]:
    lines = ["## Timeline", "", "| at (UTC) | what | who | via | text |", "|---|---|---|---|---|"]
    shown = r.timeline[-MAX_TIMELINE_ROWS:]
    for e in shown:
        lines.append(
            f"| {_at(e.at, r.opened_at)} | {e.kind} | {_cell(e.actor)} | {e.channel} "
            f"| {_cell(e.text)} |"
        )
    if len(shown) < len(r.timeline):
        left = len(r.timeline) - len(shown)
        lines += [
            "",
            f"The first {left} entries are left out: `pagerloop incidents show` has them.",
        ]
    return lines


def summary(report: IncidentReport) -> str:
    """A few lines for the incident's Slack thread (Slack mrkdwn)."""
    r = report
    by = {t.name: t for t in r.times}
    resolve = by.get("resolve")
    head = f"*Incident report* · {r.severity} {r.trigger} on `{r.scope}`"
    if r.resolved_at is not None and resolve is not None:
        head += f" · resolved by {r.resolved_by} after {took(resolve.seconds)}"
    milestones = []
    for name in ("detect", "acknowledge", "mitigate", "verify"):
        elapsed = by.get(name)
        if elapsed is not None:
            why = f" ({elapsed.why})" if elapsed.seconds is None and elapsed.why else ""
            milestones.append(f"{name} {took(elapsed.seconds)}{why}")
    now, before = r.during, r.day_before
    parts = [f"{count(now.failed)} failed", f"{count(now.rate_limited)} rate-limited"]
    if now.slow is not None:
        parts.append(f"{count(now.slow)} slow")
    if now.low_quality is not None:
        parts.append(f"{count(now.low_quality)} scored low")
    lines = [
        head,
        "Time to " + " · ".join(milestones),
        f"Calls affected: {count(now.affected)} of {count(now.calls)} "
        f"({percent(now.affected, now.calls)}): " + ", ".join(parts),
        f"Spent {dollars(now.cost_usd)} and {count(now.tokens)} tokens: "
        f"{_change(now.cost_usd, before.cost_usd, money=True)} on the same window a day earlier",
    ]
    in_force = [c for c in r.controls if c.share is not None]
    if in_force:
        shown = [f"{c.description} on {c.share or 0:.1%} of the calls" for c in in_force[:3]]
        more = f" and {len(in_force) - 3} more" if len(in_force) > 3 else ""
        lines.append("Controls: " + "; ".join(shown) + more)
    if r.mitigations:
        last = r.mitigations[-1]
        verdict = last.verdict.splitlines()[0] if last.verdict else "no verdict"
        lines.append(f"Mitigation: {_cell(verdict)}")
    where = f"`pagerloop incidents report {r.incident_id}`"
    if r.jira_issue:
        where += f" and the postmortem on {r.jira_issue}"
    lines.append(f"Full report: {where}")
    return "\n".join(lines)


@dataclass
class ReportText:
    """The report as it is posted: Markdown (Jira, the CLI) and the Slack summary."""

    markdown: str
    summary: str
