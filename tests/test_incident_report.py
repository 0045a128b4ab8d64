"""The incident report (issue #15, item 3): its figures against a brute-force count over the
call log on SQLite and PostgreSQL (calls, failures, 429s, slow and low-scored calls, tokens,
dollars, the same window a day earlier, each control's share), the first bad minute on the
detector's own series, the renderer, the Jira wiki markup; then whole incidents on the
time-skipping server (report saved, the Jira postmortem posted once although its first post
is cut off, the summary in the Slack thread) and `pagerloop incidents report`."""

from __future__ import annotations

import asyncio
import io
import random
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from sqlalchemy import Engine, select
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from temporalio.client import Client, WorkflowHandle
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment
from typer.testing import CliRunner

import worker
from activities import jira
from activities.jira import JiraActivities, JiraPostmortem, post_postmortem, wiki
from activities.reports import build_report, figures, write_report
from cli import incidents as cli_incidents
from cli.main import app as cli
from config import Settings
from config.escalation import load_escalation
from detectors.config import load_rules
from detectors.onset import GRACE_MINUTES, IncidentOnsets, onset_of, report_lines
from detectors.rules import DEFAULT_RULES
from detectors.series import RuleSeries
from domain.incident import (
    ActionRequest,
    Breach,
    IncidentInput,
    IncidentState,
    IncidentStatus,
    Severity,
    TimelineEntry,
    Trigger,
)
from domain.report import (
    ControlShare,
    Elapsed,
    IncidentReport,
    Onset,
    ReportLines,
    Usage,
    markdown,
    mitigations,
    summary,
    times,
    took,
)
from domain.scopes import in_scope
from stores import controls as control_store
from stores import incident_reports
from stores.controls import Control
from stores.llm_calls import CallRecord, LLMCall, utc
from stores.quality import QualityScore, ScoreRecord, write_scores
from stores.writer import write_calls
from tests.conftest import incident_worker
from tests.fakes.jira import FakeJira
from tests.fakes.server import read_body
from tests.fakes.slack import FakeSlack
from tests.helpers import close_incidents, eventually
from workflows.incident import IncidentWorkflow

OPENED = datetime(2026, 3, 10, 14, 2, 11, 250_000, tzinfo=UTC)
FIRST_BAD = datetime(2026, 3, 10, 13, 58, tzinfo=UTC)
RESOLVED = datetime(2026, 3, 10, 14, 40, 3, 370_000, tzinfo=UTC)
INCIDENT = "incident-elevated_latency-global-20260310T140211"
DAY = timedelta(days=1)
MINUTE = timedelta(minutes=1)
MODELS = ["gpt-4.1", "gpt-4.1-mini", "gpt-4.1 (eu)"]  # the last one's scope name differs
FEATURES = ["chat", "search", None]
STATUSES = ["success"] * 6 + ["error", "timeout", "server_error", "rate_limited"]
ERRORS = {"error", "timeout", "server_error"}


# --- the call log, and the brute-force count over it -----------------------------------------


@dataclass
class Seeded:
    """What a test wrote: the controls of the incident (by name) and of another one."""

    controls: dict[str, Control] = field(default_factory=dict)


def seed_controls(engine: Engine) -> Seeded:
    """The incident's controls: a reroute reverted during it, a canary in force to the end, a
    cache control that expired during it, one set after the resolve; and another incident's."""
    seeded = Seeded()

    def put(
        name: str, kind: str, value: str, at: datetime, expires: datetime, **extra: Any
    ) -> None:
        seeded.controls[name] = control_store.upsert(
            engine,
            incident_id=extra.pop("incident_id", INCIDENT),
            kind=kind,
            feature=extra.pop("feature", None),
            model=extra.pop("model", None),
            value=value,
            reason="test",
            set_by="runbook:test",
            expires_at=expires,
            now=at,
            **extra,
        )

    hour = timedelta(hours=1)
    put(
        "reroute",
        "reroute",
        "gpt-4.1-mini",
        OPENED + 50 * timedelta(seconds=1),
        OPENED + hour,
        model="gpt-4.1",
    )
    put("canary", "max_tokens", "500", OPENED + 4 * MINUTE, RESOLVED + hour, fraction=0.1)
    put("cache", "cache", "1", OPENED + 8 * MINUTE, OPENED + 28 * MINUTE, feature="chat")
    put("late", "rpm", "100", RESOLVED + 5 * MINUTE, RESOLVED + hour)
    put("other", "rpm", "50", OPENED, RESOLVED + hour, incident_id="incident-other")
    control_store.revert(
        engine, INCIDENT, OPENED + 20 * MINUTE, keys=[seeded.controls["reroute"].key]
    )
    seeded.controls["reroute"] = next(
        c for c in incident_controls(engine) if c.key == seeded.controls["reroute"].key
    )
    return seeded


def incident_controls(engine: Engine) -> list[Control]:
    from sqlmodel import Session
    from sqlmodel import select as model_select

    with Session(engine) as session:
        return list(session.exec(model_select(Control).where(Control.incident_id == INCIDENT)))


def labels(seeded: Seeded) -> list[str | None]:
    c = {name: control.id for name, control in seeded.controls.items()}
    return [
        None,
        None,
        None,
        f"max_tokens#{c['canary']}",
        f"canary#{c['canary']}",
        f"canary#{c['canary']},reroute#{c['reroute']}",
        f"reroute#{c['reroute']}",
        f"reroute#{c['reroute']}0",  # another control's tag: never counted as this one's
        f"rpm#{c['other']}",
        f"rpm#{c['late']}",
    ]


def traffic(
    seed: int, count: int, start: datetime, end: datetime, seeded: Seeded
) -> list[CallRecord]:
    rng = random.Random(seed)
    span = (end - start).total_seconds()
    tags = labels(seeded)
    cache_tag = f"cache#{seeded.controls['cache'].id}"
    calls = []
    for _ in range(count):
        cached = rng.random() < 0.06
        calls.append(
            CallRecord(
                ts=start + timedelta(seconds=rng.uniform(0, span)),
                model=rng.choice(MODELS),
                status="success" if cached else rng.choice(STATUSES),
                latency_ms=rng.choice([rng.uniform(50, 3000), rng.uniform(7000, 20000)]),
                input_tokens=rng.choice([None, rng.randint(10, 4000)]),
                output_tokens=rng.randint(0, 1500),
                cost_usd=rng.choice([None, round(rng.uniform(0.0001, 0.05), 6)]),
                feature=rng.choice(FEATURES),
                source="cache" if cached else "sdk",
                controls=cache_tag if cached else rng.choice(tags),
            )
        )
    return calls


def scores_for(seed: int, calls: list[LLMCall]) -> list[ScoreRecord]:
    rng = random.Random(seed)
    return [
        ScoreRecord(
            call_id=call.call_id,
            ts=utc(call.ts) + timedelta(seconds=1),
            source="scorer",
            score=round(rng.uniform(0.2, 1.0), 3),
            model=call.model,
            feature=call.feature,
        )
        for call in calls
        if call.source != "cache" and rng.random() < 0.5
    ]


@pytest.fixture
def seeded(store: Engine) -> tuple[Engine, Seeded]:
    """Controls, and calls around the incident's window and the same window a day earlier
    (with a few right on its edges), and quality scores for half of them."""
    engine = store
    seeded = seed_controls(engine)
    for index, (start, end) in enumerate(
        [
            (FIRST_BAD - 20 * MINUTE, RESOLVED + 20 * MINUTE),
            (FIRST_BAD - DAY - 20 * MINUTE, RESOLVED - DAY + 20 * MINUTE),
        ]
    ):
        write_calls(engine, traffic(index, 1200, start, end, seeded))
    edges = [FIRST_BAD, RESOLVED, FIRST_BAD - DAY, RESOLVED - DAY, OPENED + 20 * MINUTE]
    write_calls(
        engine,
        [
            CallRecord(
                ts=at + delta,
                model="gpt-4.1",
                status="error",
                latency_ms=9000.0,
                feature="chat",
                cost_usd=0.01,
                input_tokens=10,
                output_tokens=10,
            )
            for at in edges
            for delta in (timedelta(0), timedelta(microseconds=1), -timedelta(microseconds=1))
        ],
    )
    write_scores(engine, scores_for(7, logged(engine)))
    return engine, seeded


def logged(engine: Engine) -> list[LLMCall]:
    with engine.connect() as connection:
        return [LLMCall(**row._mapping) for row in connection.execute(select(LLMCall))]


def scored(engine: Engine) -> list[QualityScore]:
    with engine.connect() as connection:
        return [QualityScore(**row._mapping) for row in connection.execute(select(QualityScore))]


def within(at: datetime, start: datetime, end: datetime) -> bool:
    return start < utc(at) <= end


def brute_usage(
    calls: list[LLMCall],
    scores: list[QualityScore],
    scope: str,
    start: datetime,
    end: datetime,
    *,
    slow_ms: float | None,
    low_quality: float | None,
) -> Usage:
    sent = [
        c
        for c in calls
        if c.source != "cache" and within(c.ts, start, end) and in_scope(scope, c.model, c.feature)
    ]
    usage = Usage(
        calls=len(sent),
        failed=sum(c.status in ERRORS for c in sent),
        rate_limited=sum(c.status == "rate_limited" for c in sent),
        input_tokens=sum(c.input_tokens or 0 for c in sent),
        output_tokens=sum(c.output_tokens or 0 for c in sent),
        cost_usd=sum(c.cost_usd or 0.0 for c in sent),
    )
    if slow_ms is not None:
        usage.slow = sum(c.status == "success" and c.latency_ms > slow_ms for c in sent)
    if low_quality is not None:
        usage.low_quality = len(
            {
                s.call_id
                for s in scores
                if within(s.ts, start, end)
                and s.score < low_quality
                and in_scope(scope, s.model or "", s.feature)
            }
        )
    return usage


def brute_share(
    calls: list[LLMCall], scope: str, control: Control, start: datetime, end: datetime
) -> tuple[int, int] | None:
    """(the scope's calls while in force, those tagged), cache hits included; None when it
    was not in force during the window."""
    until = utc(control.expires_at)
    if control.reverted_at is not None:
        until = min(until, utc(control.reverted_at))
    since, stop = max(utc(control.created_at), start), min(until, end)
    if since >= stop:
        return None
    mine = {f"{control.kind}#{control.id}", f"canary#{control.id}"}
    rows = [c for c in calls if within(c.ts, since, stop) and in_scope(scope, c.model, c.feature)]
    tagged = [c for c in rows if c.controls and mine & set(c.controls.split(","))]
    return len(rows), len(tagged)


@dataclass
class FixedHistory:
    """The signal history, as the detector would read it, stood in for: the onset is given."""

    onset: Onset
    report_lines: ReportLines = field(default_factory=ReportLines)

    def first_bad_minute(self, trigger: str, scope: str, opened_at: datetime) -> Onset:
        return self.onset

    def lines(self) -> ReportLines:
        return self.report_lines


def incident_state(**changes: Any) -> IncidentState:
    state = IncidentState(
        incident_id=INCIDENT,
        trigger=Trigger.ELEVATED_LATENCY,
        scope="global",
        severity=Severity.SEV2,
        status=IncidentStatus.RESOLVED,
        opened_at=OPENED,
        acknowledged_by="U0ALICE00",
        acknowledged_at=OPENED + 2 * MINUTE,
        resolved_by="U0ALICE00",
        resolved_at=RESOLVED,
        runbook="elevated_latency",
        verification="recovered",
        verified_at=OPENED + 9 * MINUTE,
        summary="p95 latency 14.2 s > 8 s",
        metrics={"latency_p95_ms": 14200.0, "cost_usd": float("inf")},
        timeline=[
            TimelineEntry(OPENED, "opened", "SEV2 elevated_latency on global"),
            TimelineEntry(OPENED + MINUTE, "mitigation", "• reroute gpt-4.1 -> gpt-4.1-mini"),
            TimelineEntry(OPENED + 9 * MINUTE, "verified", "mitigation worked: p95 2.1 s"),
            TimelineEntry(RESOLVED, "resolved", "fixed | upstream", "U0ALICE00", "slack"),
        ],
    )
    return replace(state, **changes)


# --- figures against the call log ------------------------------------------------------------


@pytest.mark.parametrize(
    ("trigger", "scope"),
    [
        (Trigger.ELEVATED_LATENCY, "global"),
        (Trigger.QUALITY_DEGRADATION, "model:gpt-4.1"),
        (Trigger.ERROR_RATE, "feature:chat"),
        (Trigger.ELEVATED_LATENCY, "model:gpt-4.1__eu_"),
    ],
)
def test_the_figures_are_the_call_logs(
    seeded: tuple[Engine, Seeded], trigger: Trigger, scope: str
) -> None:
    engine, controls = seeded
    calls, scores = logged(engine), scored(engine)
    state = incident_state(trigger=trigger, scope=scope)
    lines = ReportLines(slow_ms=8000.0, low_quality=0.7)
    report = build_report(engine, state, FixedHistory(Onset(FIRST_BAD, "p95"), lines), RESOLVED)

    assert (report.start, report.end) == (FIRST_BAD, RESOLVED)
    slow = 8000.0 if trigger == Trigger.ELEVATED_LATENCY else None
    low = 0.7 if trigger == Trigger.QUALITY_DEGRADATION else None
    expected = brute_usage(calls, scores, scope, FIRST_BAD, RESOLVED, slow_ms=slow, low_quality=low)
    earlier = brute_usage(
        calls, scores, scope, FIRST_BAD - DAY, RESOLVED - DAY, slow_ms=slow, low_quality=low
    )
    for found, wanted in ((report.during, expected), (report.day_before, earlier)):
        assert found.calls > 0
        assert (found.calls, found.failed, found.rate_limited) == (
            wanted.calls,
            wanted.failed,
            wanted.rate_limited,
        )
        assert (found.slow, found.low_quality) == (wanted.slow, wanted.low_quality)
        assert (found.input_tokens, found.output_tokens) == (
            wanted.input_tokens,
            wanted.output_tokens,
        )
        assert found.cost_usd == pytest.approx(wanted.cost_usd, rel=1e-9, abs=1e-9)
        assert found.affected == wanted.affected
    if slow is not None:
        assert report.during.slow
    if low is not None:
        assert report.during.low_quality

    # Each of the incident's controls (not the other incident's), with its share.
    assert [c.control_id for c in report.controls] == sorted(
        c.id for name, c in controls.controls.items() if name != "other" and c.id is not None
    )
    for share in report.controls:
        control = next(c for c in controls.controls.values() if c.id == share.control_id)
        wanted_share = brute_share(calls, scope, control, FIRST_BAD, RESOLVED)
        if wanted_share is None:
            assert (share.start, share.end, share.share) == (None, None, None)
            continue
        assert (share.calls, share.tagged) == wanted_share
    by_id = {c.control_id: c for c in report.controls}
    reroute = by_id[controls.controls["reroute"].id or 0]
    assert (reroute.start, reroute.end) == (
        OPENED + 50 * timedelta(seconds=1),
        OPENED + 20 * MINUTE,
    )
    assert by_id[controls.controls["cache"].id or 0].end == OPENED + 28 * MINUTE  # expired
    assert by_id[controls.controls["canary"].id or 0].end == RESOLVED
    assert by_id[controls.controls["canary"].id or 0].fraction == 0.1
    assert by_id[controls.controls["late"].id or 0].start is None
    if scope == "global":
        assert all(
            by_id[c.id or 0].tagged
            for n, c in controls.controls.items()
            if n in ("reroute", "canary", "cache")
        )

    # The first control applied is the reroute, 50 s after the opening.
    mitigate = next(t for t in report.times if t.name == "mitigate")
    assert mitigate.seconds == pytest.approx(50.0)


def test_without_a_first_bad_minute_the_window_starts_at_the_opening(
    seeded: tuple[Engine, Seeded],
) -> None:
    engine, _ = seeded
    calls, scores = logged(engine), scored(engine)
    none = Onset(None, why="no enabled rule watches it")
    report = build_report(
        engine, incident_state(trigger=Trigger.ERROR_RATE), FixedHistory(none), RESOLVED
    )
    assert (report.start, report.end) == (OPENED, RESOLVED)
    expected = brute_usage(
        calls, scores, "global", OPENED, RESOLVED, slow_ms=None, low_quality=None
    )
    assert (report.during.calls, report.during.failed) == (expected.calls, expected.failed)
    detect = report.times[0]
    assert (detect.name, detect.seconds, detect.why) == (
        "detect",
        None,
        "no enabled rule watches it",
    )


def test_a_preview_of_an_open_incident_counts_up_to_now(seeded: tuple[Engine, Seeded]) -> None:
    engine, _ = seeded
    calls, scores = logged(engine), scored(engine)
    now = OPENED + 15 * MINUTE
    state = incident_state(status=IncidentStatus.ACKNOWLEDGED, resolved_at=None, resolved_by=None)
    report = build_report(engine, state, FixedHistory(Onset(FIRST_BAD)), now)
    expected = brute_usage(calls, scores, "global", FIRST_BAD, now, slow_ms=8000, low_quality=None)
    assert report.preview
    assert report.end == now
    assert (report.during.calls, report.during.slow) == (expected.calls, expected.slow)
    assert "Preview: the incident is acknowledged" in markdown(report)
    assert next(t for t in report.times if t.name == "resolve").why == "not resolved yet"


def test_an_incident_of_weeks_is_reported_on_its_last_week(store: Engine) -> None:
    long_ago = RESOLVED - timedelta(days=30)
    state = incident_state(opened_at=long_ago, timeline=[])
    report = build_report(store, state, FixedHistory(Onset(long_ago)), RESOLVED)
    assert report.start == RESOLVED - timedelta(days=7)
    assert any("last 7" in note for note in report.notes)
    assert report.times[-1].seconds == pytest.approx((RESOLVED - long_ago).total_seconds())


def test_the_report_is_saved_with_its_figures(seeded: tuple[Engine, Seeded]) -> None:
    engine, _ = seeded
    state = incident_state()
    text = write_report(engine, state, FixedHistory(Onset(FIRST_BAD, "p95")), RESOLVED)
    stored = incident_reports.get(engine, INCIDENT)
    assert stored is not None
    assert (stored.markdown, stored.summary) == (text.markdown, text.summary)
    assert stored.figures["during"]["calls"] > 0
    assert stored.figures["during"]["affected"] == (
        stored.figures["during"]["failed"]
        + stored.figures["during"]["rate_limited"]
        + stored.figures["during"]["slow"]
    )
    assert stored.figures["metrics"]["cost_usd"] == "Infinity"  # JSON, whatever the metric
    assert stored.figures["onset"]["minute"] == FIRST_BAD.isoformat()
    # Written again (a retried activity): one row, the newest.
    again = write_report(
        engine, replace(state, summary="again"), FixedHistory(Onset(None)), RESOLVED
    )
    stored = incident_reports.get(engine, INCIDENT)
    assert stored is not None
    assert stored.markdown == again.markdown
    assert "again" in stored.markdown
    assert incident_reports.get(engine, "incident-unknown") is None


def test_figures_are_json_even_when_poisoned() -> None:
    report = IncidentReport(
        incident_id="i",
        trigger="cost_spike",
        scope="global",
        severity="SEV2",
        status="resolved",
        opened_at=OPENED,
        written_at=RESOLVED,
        start=OPENED,
        end=RESOLVED,
        onset=Onset(None),
        during=Usage(calls=1, cost_usd=float("inf")),
        day_before=Usage(cost_usd=float("nan")),
        resolved_at=RESOLVED,
    )
    found = figures(report)
    assert found["during"]["cost_usd"] == "Infinity"
    assert found["day_before"]["cost_usd"] == "NaN"
    text = markdown(report)
    assert "| Cost | ∞ | NaN | — |" in text


# --- the first bad minute, on the detector's own series --------------------------------------


def series(values: list[float | None], rule_name: str = "error_rate") -> RuleSeries:
    rule = next(r for r in DEFAULT_RULES if r.name == rule_name)
    start = FIRST_BAD - 10 * MINUTE
    return RuleSeries(
        rule=rule,
        scope="global",
        window_seconds=120,
        minutes=tuple(start + i * MINUTE for i in range(len(values))),
        raw=tuple(values),
        samples=tuple(100.0 if v is not None else 0.0 for v in values),
    )


def test_the_first_bad_minute_starts_the_run_that_ends_at_the_opening() -> None:
    bad, fine = 0.09, 0.001
    found = onset_of(series([bad, bad, fine, fine, bad, bad, bad, bad]))
    assert found is not None
    assert found.minute == FIRST_BAD - 6 * MINUTE  # the earlier run does not count
    assert (found.rule, found.line, found.value, found.bounded) == ("error_rate", 0.02, bad, False)
    # A minute or two fine at the very end (the detector judges between minutes) is passed over.
    trailing = onset_of(series([fine, bad, bad, *([fine] * GRACE_MINUTES)]))
    assert trailing is not None
    assert trailing.minute == FIRST_BAD - 9 * MINUTE
    assert onset_of(series([bad, bad, *([fine] * (GRACE_MINUTES + 1))])) is None
    # A gap (too few calls to judge) ends the run; a run reaching the search's start is bounded.
    gap = onset_of(series([bad, None, bad, bad]))
    assert gap is not None
    assert gap.minute == FIRST_BAD - 8 * MINUTE
    reaching = onset_of(series([bad, bad, bad]))
    assert reaching is not None
    assert reaching.bounded


def test_the_first_bad_minute_from_the_stores(store: Engine) -> None:
    """Errors begin at 13:58 (30 calls a minute all along): the detector's 2-minute error
    rate is past its 2% line from that minute on, through the opening at 14:02:11."""
    rng = random.Random(3)
    calls = []
    for minute in range(-40, 5):
        at = FIRST_BAD + minute * MINUTE
        for second in range(1, 31):
            status = "error" if minute >= 0 and rng.random() < 0.3 else "success"
            calls.append(
                CallRecord(
                    ts=at + timedelta(seconds=second * 1.9),
                    model="gpt-4.1",
                    status=status,
                    latency_ms=300.0,
                )
            )
    write_calls(store, calls)
    onsets = IncidentOnsets(store, load_rules(None), 500.0, 300)
    found = onsets.first_bad_minute("error_rate", "global", OPENED)
    assert (found.minute, found.rule, found.bounded) == (FIRST_BAD, "error_rate", False)
    assert onsets.first_bad_minute("error_rate", "model:gpt-4.1", OPENED).minute == FIRST_BAD
    quiet = onsets.first_bad_minute("error_rate", "model:gpt-4.1-mini", OPENED)
    assert quiet.minute is None
    assert "no minute" in quiet.why
    folded = onsets.first_bad_minute("error_rate", "feature:(other)", OPENED)
    assert folded.minute is None
    assert "no history" in folded.why
    assert onsets.lines() == ReportLines(slow_ms=8000, low_quality=0.7)


def test_the_lines_follow_the_rules_file(tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text("[rules.latency_p95]\nwarning = 6000\n[rules.quality]\nwarning = 0.8\n")
    assert report_lines(load_rules(rules)) == ReportLines(slow_ms=6000, low_quality=0.8)


# --- the renderer ----------------------------------------------------------------------------


def test_each_mitigation_is_paired_with_its_verdict() -> None:
    at = [OPENED + i * MINUTE for i in range(10)]
    found = mitigations(
        [
            TimelineEntry(at[0], "diagnosis", "• gpt-4.1 slow"),
            TimelineEntry(at[1], "canary", "canary on 10% of the traffic: reroute gpt-4.1"),
            TimelineEntry(at[2], "mitigation", "• throttle chat\n• cap output tokens"),
            TimelineEntry(at[3], "canary", "canary promoted: faster\n• p95 2.1 s vs 9.3 s"),
            TimelineEntry(at[4], "rolled_back", "no recovery; rolled back: throttle chat"),
            TimelineEntry(at[5], "mitigation", "• pin gpt-4.1-2025-04-14"),
            TimelineEntry(at[6], "verified", "mitigation worked: quality 0.86"),
            TimelineEntry(at[7], "verification", "late, no step open"),
        ]
    )
    assert [(m.kind, m.verdict_kind, m.verdict_at) for m in found] == [
        ("canary", "canary", at[3]),
        ("mitigation", "rolled_back", at[4]),
        ("mitigation", "verified", at[6]),
    ]
    assert found[0].verdict.startswith("canary promoted: faster")


def test_the_times_and_why_some_are_missing() -> None:
    state = incident_state()
    found = {t.name: t for t in times(state, Onset(FIRST_BAD), OPENED + 50 * timedelta(seconds=1))}
    assert found["detect"].seconds == (OPENED - FIRST_BAD).total_seconds()
    assert found["acknowledge"].seconds == 120
    assert found["mitigate"].seconds == 50  # the control, before the timeline's entry
    assert found["verify"].seconds == 540
    assert found["resolve"].seconds == (RESOLVED - OPENED).total_seconds()

    auto = incident_state(
        acknowledged_by=None,
        acknowledged_at=None,
        resolved_by="pagerloop",
        verified_at=None,
        timeline=[],
    )
    missing = {t.name: t for t in times(auto, Onset(None, why="no rule"), None)}
    assert [missing[n].seconds for n in ("detect", "acknowledge", "mitigate", "verify")] == [
        None
    ] * 4
    assert missing["acknowledge"].why == "never acknowledged: auto-resolved"
    assert missing["mitigate"].why.startswith("no control was applied")
    assert missing["verify"].why == "no mitigation to verify"
    rolled = incident_state(
        verified_at=None,
        timeline=[
            TimelineEntry(OPENED + MINUTE, "mitigation", "• throttle"),
            TimelineEntry(OPENED + 5 * MINUTE, "rolled_back", "no recovery"),
        ],
    )
    verify = next(t for t in times(rolled, Onset(None), None) if t.name == "verify")
    assert (verify.seconds, verify.span) == (300, "opened → rolled back: no recovery")


def sample_report() -> IncidentReport:
    state = incident_state()
    return IncidentReport(
        incident_id=INCIDENT,
        trigger="elevated_latency",
        scope="global",
        severity="SEV2",
        status="resolved",
        opened_at=OPENED,
        written_at=RESOLVED + MINUTE,
        start=FIRST_BAD,
        end=RESOLVED,
        onset=Onset(FIRST_BAD, "latency_p95"),
        during=Usage(
            calls=12345,
            failed=1234,
            rate_limited=66,
            slow=400,
            input_tokens=10**6,
            output_tokens=2 * 10**5,
            cost_usd=12.34,
        ),
        day_before=Usage(calls=11900, failed=12, rate_limited=1, slow=10, cost_usd=10.0),
        times=times(state, Onset(FIRST_BAD), OPENED + MINUTE),
        mitigations=mitigations(state.timeline),
        timeline=state.timeline,
        metrics=state.metrics,
        summary=state.summary,
        resolved_by="U0ALICE00",
        resolved_at=RESOLVED,
        runbook="elevated_latency",
        verification="recovered",
        jira_issue="OPS-7",
    )


def test_the_markdown_report() -> None:
    text = markdown(sample_report())
    assert text.startswith("# Postmortem: SEV2 elevated_latency on `global`\n")
    for section in ("## Times", "## Impact", "## Controls", "## Mitigations", "## Timeline"):
        assert section in text
    assert "| Time to detect | 4 min 11 s | first bad minute 13:58 UTC → opened |" in text
    assert "| Time to acknowledge | 2 min 00 s |" in text
    assert "| Calls | 12,345 | 11,900 | +445 (+3.7%) |" in text
    assert "| Slow calls (over 8,000 ms) | 400 | 10 | +390 (+3900.0%) |" in text
    assert "| **Calls affected** | 1,700 | 23 |" in text
    assert "| Cost | $12.34 | $10.00 | +$2.34 (+23.4%) |" in text
    assert "13.8%" in text  # 1,700 of 12,345
    assert (
        "| 14:03:11 | reroute gpt-4.1 -> gpt-4.1-mini | 14:11:11 verified: mitigation worked: "
        "p95 2.1 s |"
    ) in text
    assert "- latency_p95_ms: 14,200" in text
    assert "fixed \\| upstream" in text  # a cell's pipe escaped
    assert "- cost_usd: ∞" in text
    assert "No control was set for this incident." in text


def test_the_slack_summary_is_a_few_lines() -> None:
    text = summary(sample_report())
    lines = text.splitlines()
    assert 5 <= len(lines) <= 8
    assert lines[0].startswith("*Incident report* · SEV2 elevated_latency on `global`")
    assert "resolved by U0ALICE00 after 37 min 52 s" in lines[0]
    assert lines[1] == (
        "Time to detect 4 min 11 s · acknowledge 2 min 00 s · mitigate 1 min 00 s · "
        "verify 9 min 00 s"
    )
    assert (
        "Calls affected: 1,700 of 12,345 (13.8%): 1,234 failed, 66 rate-limited, 400 slow" in text
    )
    assert "Spent $12.34 and 1,200,000 tokens: +$2.34 (+23.4%)" in text
    assert lines[-1] == (
        f"Full report: `pagerloop incidents report {INCIDENT}` and the postmortem on OPS-7"
    )


def test_the_controls_and_their_shares() -> None:
    controlled = replace(
        sample_report(),
        controls=[
            ControlShare(
                3,
                "reroute",
                "reroute gpt-4.1 -> gpt-4.1-mini",
                OPENED + MINUTE,
                RESOLVED,
                None,
                OPENED + MINUTE,
                RESOLVED,
                calls=800,
                tagged=200,
            ),
            ControlShare(
                4,
                "rpm",
                "limit all calls to 100 requests per minute",
                RESOLVED,
                None,
                None,
                None,
                None,
            ),
        ],
    )
    text = markdown(controlled)
    assert (
        "| reroute gpt-4.1 -> gpt-4.1-mini (#3) | 14:03:11 → 14:40:03 | 200 of 800 | 25.0% |"
    ) in text
    assert "| limit all calls to 100 requests per minute (#4) | not in force" in text
    assert "Controls: reroute gpt-4.1 -> gpt-4.1-mini on 25.0% of the calls\n" in summary(
        controlled
    )


def test_took_reads_as_people_say_it() -> None:
    assert [took(s) for s in (None, 45, 251, 3723, 90061)] == [
        "—",
        "45 s",
        "4 min 11 s",
        "1 h 02 min",
        "1 d 1 h 01 min",
    ]
    assert Elapsed("detect", None, "x").seconds is None


def test_the_jira_wiki_markup() -> None:
    text = wiki(markdown(sample_report()))
    lines = text.splitlines()
    assert lines[0] == "h3. Postmortem: SEV2 elevated_latency on {{global}}"
    assert "h4. Times" in lines
    assert "|| || took || measured ||" in lines
    assert not any(line.startswith("|---") for line in lines)
    assert "| *Calls affected* | 1,700 | 23 | +1,677 (+7291.3%) |" in lines
    assert "* cost_usd: ∞" in lines
    assert "fixed \\| upstream" in text
    assert wiki("a {macro} and [link]") == "a \\{macro} and \\[link]"
    assert wiki("> quoted `code`") == "bq. quoted {{code}}"


# --- the Jira postmortem, once per incident ---------------------------------------------------


async def test_the_postmortem_is_posted_once(fake_jira: LosingJira) -> None:
    client = jira.make_client(fake_jira.url, None, "jira-test-token")
    key = jira.open_ticket(client, jira.JiraTicket("i-1", "OPS", "[SEV2] latency", "d"))
    fake_jira.lose_postmortems = 1  # it lands, but the answer says it did not
    with pytest.raises(ApplicationError, match="503"):
        post_postmortem(client, key, "i-1", "h3. Postmortem: one")
    assert not post_postmortem(client, key, "i-1", "h3. Postmortem: one")
    # Another attempt, another run: still the one comment.
    activities = JiraActivities(client)
    env = ActivityEnvironment()
    env.info = replace(ActivityEnvironment.default_info(), attempt=3, workflow_run_id="run-2")
    assert not await env.run(activities.postmortem, JiraPostmortem(key, "i-1", "h3. Postmortem"))
    [comment] = fake_jira.issues[key]["comments"]
    assert comment["body"].startswith("h3. Postmortem: one")
    assert jira.postmortem_key("i-1") in comment["body"]
    # Another incident's postmortem on the same ticket (handed over) is its own.
    assert post_postmortem(client, key, "i-2", "h3. Postmortem: two")
    assert len(fake_jira.issues[key]["comments"]) == 2


# --- whole incidents (time-skipping server) ----------------------------------------------------

POLICY = """
[[levels]]
name = "L1"
description = "On-call"
ack_timeout_seconds = 3600
resolve_timeout_seconds = 7200
jira_project = "OPS"
"""


class LosingJira(FakeJira):
    """Jira that takes the first postmortem, then answers 503 as if it had not (the activity
    retries: the retry must find it there)."""

    lose_postmortems = 0

    async def _comment(self, request: Request) -> Response:
        response = await super()._comment(request)
        _, data = await read_body(request)
        postmortem = str(data.get("body", "")).startswith("h3. Postmortem")
        if request.method == "POST" and self.lose_postmortems and postmortem:
            self.lose_postmortems -= 1
            return JSONResponse({"errorMessages": ["Service Unavailable"], "errors": {}}, 503)
        return response


@pytest.fixture
def fake_jira() -> Iterator[FakeJira]:
    with LosingJira() as server:
        yield server


@dataclass
class Deployment:
    env: WorkflowEnvironment
    settings: Settings
    engine: Engine
    handles: list[WorkflowHandle[Any, Any]] = field(default_factory=list)

    @property
    def client(self) -> Client:
        return self.env.client

    async def open(self, opened: datetime) -> WorkflowHandle[Any, Any]:
        plan = worker.notification_plan(
            self.settings, load_escalation(self.settings.escalation_policy_file)
        )
        assert plan.report
        incident_id = f"incident-error_rate-global-{uuid.uuid4().hex[:8]}"
        handle = await self.client.start_workflow(
            IncidentWorkflow.run,
            IncidentInput(
                incident_id, Trigger.ERROR_RATE, "global", Severity.SEV2, opened, notify=plan
            ),
            id=incident_id,
            task_queue=self.settings.task_queue,
        )
        breach = Breach(Trigger.ERROR_RATE, "global", Severity.SEV2, opened, "error rate 31%")
        await handle.execute_update(IncidentWorkflow.report_breach, breach)
        self.handles.append(handle)
        return handle


@pytest.fixture
async def deployment(
    time_skipping_env: WorkflowEnvironment, settings: Settings, tmp_path: Path
) -> AsyncIterator[Deployment]:
    policy = tmp_path / "escalation.toml"
    policy.write_text(POLICY)
    settings = settings.model_copy(update={"escalation_policy_file": policy})
    async with incident_worker(time_skipping_env.client, settings) as engine:
        deployed = Deployment(time_skipping_env, settings, engine)
        yield deployed
        await close_incidents(deployed.handles)


def error_traffic(now: datetime) -> tuple[list[CallRecord], datetime]:
    """30 calls a minute for the last 20 minutes, a third of them failing for the last 5
    (from `first_bad` on)."""
    first_bad = now.replace(second=0, microsecond=0) - 5 * MINUTE
    calls = []
    for minute in range(-15, 6):
        at = first_bad + minute * MINUTE
        for second in range(30):
            ts = at + timedelta(seconds=1 + second * 1.9)
            if ts > now:
                break
            failing = minute >= 0 and second % 3 == 0
            calls.append(
                CallRecord(
                    ts=ts,
                    model="gpt-4.1",
                    status="error" if failing else "success",
                    latency_ms=250.0,
                    feature="chat",
                    cost_usd=0.002,
                    input_tokens=100,
                    output_tokens=20,
                )
            )
    return calls, first_bad


async def test_a_resolved_incident_is_reported_in_jira_and_slack(
    deployment: Deployment, fake_jira: LosingJira, fake_slack: FakeSlack
) -> None:
    fake_jira.lose_postmortems = 1
    now = datetime.now(UTC)
    calls, first_bad = error_traffic(now)
    write_calls(deployment.engine, calls)
    handle = await deployment.open(now)
    await eventually(lambda: len(fake_jira.issues) == 1 and len(fake_slack.messages) == 1)
    await handle.execute_update(IncidentWorkflow.acknowledge, ActionRequest("U0ALICE00", "slack"))
    await handle.execute_update(IncidentWorkflow.resolve, ActionRequest("U0ALICE00", "slack"))
    result = await handle.result()
    assert result.status == IncidentStatus.RESOLVED
    kinds = [entry.kind for entry in result.timeline]
    assert "notification_failed" not in kinds, result.timeline

    # Saved, with the figures of the call log over its window.
    stored = incident_reports.get(deployment.engine, result.incident_id)
    assert stored is not None
    onset = stored.figures["onset"]
    assert onset["minute"] == first_bad.isoformat()
    assert onset["rule"] == "error_rate"
    start = datetime.fromisoformat(stored.figures["start"])
    end = datetime.fromisoformat(stored.figures["end"])
    assert start == first_bad
    assert end == result.resolved_at
    expected = brute_usage(
        logged(deployment.engine), [], "global", start, end, slow_ms=None, low_quality=None
    )
    during = stored.figures["during"]
    assert (during["calls"], during["failed"]) == (expected.calls, expected.failed)
    assert during["failed"] > 0
    assert "| Time to detect |" in stored.markdown
    assert "| Time to acknowledge |" in stored.markdown

    # Jira: Done, then one postmortem (its first post was answered 503 and retried), last.
    [issue] = fake_jira.issues.values()
    assert issue["status"] == "Done"
    assert fake_jira.lose_postmortems == 0
    bodies = [c["body"] for c in issue["comments"]]
    postmortems = [b for b in bodies if b.startswith("h3. Postmortem")]
    assert len(postmortems) == 1
    assert bodies[-1] == postmortems[0]
    assert "|| || took || measured ||" in postmortems[0]
    assert "Time to acknowledge" in postmortems[0]

    # Slack: the summary in the incident's thread, once.
    [message] = fake_slack.messages.values()
    reports = [r for r in message.replies if r.startswith("*Incident report*")]
    assert len(reports) == 1
    assert stored.summary[:200] in reports[0]
    assert f"and the postmortem on {issue['key']}" in reports[0]


async def test_a_report_that_cannot_be_written_leaves_the_old_postmortem(
    deployment: Deployment, fake_jira: LosingJira, fake_slack: FakeSlack
) -> None:
    """The stores fail under the report: the incident still ends, the timeline says why, Jira
    gets the postmortem from the incident's state, Slack no summary."""
    handle = await deployment.open(datetime.now(UTC))
    await eventually(lambda: len(fake_jira.issues) == 1 and len(fake_slack.messages) == 1)
    with deployment.engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE incident_reports")
    await handle.execute_update(IncidentWorkflow.resolve, ActionRequest("U0ALICE00", "slack"))
    result = await asyncio.wait_for(handle.result(), 120)
    assert result.status == IncidentStatus.RESOLVED
    failed = [e.text for e in result.timeline if e.kind == "notification_failed"]
    assert len(failed) == 1
    assert failed[0].startswith("report build failed")
    [issue] = fake_jira.issues.values()
    assert issue["status"] == "Done"
    assert issue["comments"][-1]["body"].startswith("h3. Postmortem")
    assert "Time to acknowledge" in issue["comments"][-1]["body"]
    [message] = fake_slack.messages.values()
    assert not any(r.startswith("*Incident report*") for r in message.replies)


# --- `pagerloop incidents report` --------------------------------------------------------------

runner = CliRunner()


def cli_env(settings: Settings, env: WorkflowEnvironment) -> dict[str, str]:
    return {
        "PAGERLOOP_DATABASE_URL": settings.database_url,
        "PAGERLOOP_TEMPORAL_ADDRESS": env.client.service_client.config.target_host,
        "PAGERLOOP_TASK_QUEUE": settings.task_queue,
    }


async def test_the_cli_prints_the_stored_report_a_preview_or_says_it_knows_none(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = cli_env(deployment.settings, deployment.env)
    incident_reports.save(
        deployment.engine, "incident-stored", "# Postmortem: stored\n", "s", {}, RESOLVED
    )

    def invoke(*args: str) -> Any:
        return runner.invoke(cli, ["incidents", "report", *args], env=env)

    stored = await asyncio.to_thread(invoke, "incident-stored")
    assert stored.exit_code == 0, stored.output
    assert stored.output == "# Postmortem: stored\n"

    unknown = await asyncio.to_thread(invoke, "incident-nobody-opened")
    assert unknown.exit_code == 1
    assert "no incident 'incident-nobody-opened'" in unknown.output

    now = datetime.now(UTC)
    calls, _ = error_traffic(now)
    write_calls(deployment.engine, calls)
    handle = await deployment.open(now)
    preview = await asyncio.to_thread(invoke, handle.id, "--raw")
    assert preview.exit_code == 0, preview.output
    assert preview.output.startswith("# Postmortem: SEV2 error_rate on `global`")
    assert "Preview: the incident is detected" in preview.output
    assert "| Time to detect | 5 min" in preview.output or "| Time to detect | 6 min" in (
        preview.output
    )
    assert incident_reports.get(deployment.engine, handle.id) is None  # a preview is not kept

    # On a terminal: rendered (no Markdown table rules or heading marks left).
    shown = io.StringIO()
    monkeypatch.setattr(cli_incidents, "out", Console(file=shown, force_terminal=True, width=140))
    rendered = await asyncio.to_thread(invoke, "incident-stored")
    assert rendered.exit_code == 0
    assert "Postmortem: stored" in shown.getvalue()
    assert "# Postmortem" not in shown.getvalue()
