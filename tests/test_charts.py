"""Charts of an incident's signal: the pure drawing (SVG and PNG from one geometry), the series
against the detector's own window query minute by minute, the status page showing it, and the
PNG uploaded once to the incident's Slack thread (also when the post is retried)."""

from __future__ import annotations

import asyncio
import io
import random
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from PIL import Image
from sqlalchemy import Engine
from temporalio.client import Client
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment

import worker
from activities import slack
from activities.incidents import IncidentActivities, OpenIncidentRequest
from activities.policies import VENDOR_CALL
from activities.slack import SlackActivities, SlackPostRequest
from api import status
from api.app import create_app
from api.deps import Services
from config import Settings
from config.escalation import load_escalation
from detectors import evaluation
from detectors.config import DetectorRules
from detectors.rules import DEFAULT_RULES
from detectors.series import (
    RUNWAY_SIGNALS,
    IncidentCharts,
    RuleSeries,
    most_relevant,
    point_ends,
    trigger_series,
)
from domain import runway
from domain import search_attributes as sa
from domain.chart import (
    CRITICAL,
    HEIGHT,
    PNG_SCALE,
    SIGNAL,
    WARNING,
    WIDTH,
    Chart,
    Layout,
    render_png,
    render_svg,
)
from domain.incident import Breach, IncidentState, IncidentStatus, Severity, Trigger
from domain.workflow_names import INCIDENT_WORKFLOW
from stores import controls as control_store
from stores.aggregates import window_aggregates
from stores.llm_calls import CallRecord
from stores.quality import ScoreRecord, write_scores
from stores.writer import write_calls
from tests.conftest import incident_worker
from tests.fakes.slack import FakeSlack
from tests.helpers import eventually
from workflows.incident import IncidentWorkflow

SVG = "{http://www.w3.org/2000/svg}"


def parse(svg: str) -> ET.Element:
    return ET.fromstring(svg)  # noqa: S314 (our own output, under test)


NOW = datetime(2026, 11, 3, 14, 7, 31, tzinfo=UTC)
CHANNEL = "#llm-oncall"


def minutes(values_: Sequence[float | None], end: datetime = NOW) -> list[tuple[datetime, Any]]:
    last = end.replace(second=0, microsecond=0)
    n = len(values_)
    return [(last - timedelta(minutes=n - 1 - i), v) for i, v in enumerate(values_)]


def error_chart(values_: Sequence[float | None], title: str = "error rate · global") -> Chart:
    return Chart(title, minutes(values_), unit="%", warning=2.0, critical=5.0, subtitle="sub")


# --- the drawing -----------------------------------------------------------------------------


def polylines(root: ET.Element) -> list[list[tuple[float, float]]]:
    return [
        [tuple(map(float, p.split(","))) for p in line.attrib["points"].split()]  # type: ignore[misc]
        for line in root.iter(f"{SVG}polyline")
        if line.attrib["class"] == "signal"
    ]


def test_the_svg_is_well_formed_with_its_lines_where_the_values_are() -> None:
    # Minute 10 sits exactly on the warning line, minute 20 on the critical one.
    series: list[float | None] = [1.0] * 60
    series[10], series[20], series[59] = 2.0, 5.0, 12.0
    root = parse(render_svg(error_chart(series)))
    assert root.tag == f"{SVG}svg"
    assert (root.attrib["width"], root.attrib["height"]) == (str(WIDTH), str(HEIGHT))
    lines = {
        line.attrib["data-threshold"]: line
        for line in root.iter(f"{SVG}line")
        if "data-threshold" in line.attrib
    }
    assert set(lines) == {"warning", "critical"}
    assert lines["warning"].attrib["stroke"] == WARNING
    assert lines["critical"].attrib["stroke"] == CRITICAL
    [line] = polylines(root)
    assert len(line) == 60
    warning_y = float(lines["warning"].attrib["y1"])
    critical_y = float(lines["critical"].attrib["y1"])
    assert line[10][1] == pytest.approx(warning_y, abs=0.051)
    assert line[20][1] == pytest.approx(critical_y, abs=0.051)
    assert critical_y < warning_y < line[0][1]  # higher values higher up
    assert line[59][1] < critical_y
    assert [x for x, _ in line] == sorted(x for x, _ in line)
    labels = " ".join(t.text or "" for t in root.iter(f"{SVG}text"))
    for label in ("warning 2%", "critical 5%", "13:15", "14:00"):  # quarter hours 13:08-14:07
        assert label in labels
    assert root.find(f"{SVG}title") is not None


def test_a_rule_that_breaches_below_its_lines_shades_below() -> None:
    chart = Chart("quality · global", minutes([0.9] * 50 + [0.4] * 10), warning=0.7,
                  critical=0.5, above=False)  # fmt: skip
    layout = Layout.of(chart)
    bands = layout.breach_bands()
    assert [round(bottom) for _, bottom, _ in bands] == [round(layout.bottom)] * 2
    assert layout.y(0.5) > layout.y(0.7)
    parse(render_svg(chart))


def test_minutes_without_a_value_are_gaps_not_lines() -> None:
    series: list[float | None] = [1.0] * 20 + [None] * 5 + [3.0] * 20 + [None, 4.0, None]
    series += [float("nan"), float("inf")] + [1.0] * 11
    root = parse(render_svg(error_chart(series)))
    runs = polylines(root)
    assert [len(run) for run in runs] == [20, 20, 11]
    [dot] = list(root.iter(f"{SVG}circle"))  # the lone 4.0 between two gaps
    assert float(dot.attrib["cx"]) == pytest.approx(Layout.of(error_chart(series)).x(46), abs=0.1)


def test_a_hostile_scope_name_is_text_not_markup() -> None:
    hostile = 'feature:x"/><script>alert(1)</script><text x="'
    chart = error_chart([1.0] * 60, title=f"error rate · {hostile}")
    svg = render_svg(chart)
    root = parse(svg)
    assert "<script" not in svg
    assert not list(root.iter(f"{SVG}script"))
    title = next(t for t in root.iter(f"{SVG}text") if t.attrib.get("class") == "title")
    assert title.text == f"error rate · {hostile}"
    assert hostile in root.attrib["aria-label"]


def test_an_empty_hour_says_so() -> None:
    root = parse(render_svg(error_chart([None] * 60)))
    assert not polylines(root)
    assert any(t.text == "no data in this hour" for t in root.iter(f"{SVG}text"))
    Image.open(io.BytesIO(render_png(error_chart([None] * 60)))).verify()


def colour(hex_colour: str) -> tuple[int, int, int]:
    return int(hex_colour[1:3], 16), int(hex_colour[3:5], 16), int(hex_colour[5:7], 16)


def test_the_png_decodes_at_its_size_with_both_lines_and_the_signal_drawn() -> None:
    series: list[float | None] = [1.0] * 30 + [None] * 5 + [8.0] * 25
    image = Image.open(io.BytesIO(render_png(error_chart(series)))).convert("RGB")
    assert image.size == (WIDTH * PNG_SCALE, HEIGHT * PNG_SCALE)
    counts = {rgb: n for n, rgb in image.getcolors(maxcolors=1 << 20) or []}
    for drawn in (WARNING, CRITICAL, SIGNAL):
        assert counts.get(colour(drawn), 0) > 200, drawn
    # The critical line is where the geometry says: its colour along that row of pixels.
    layout = Layout.of(error_chart(series))
    y = round(layout.y(5.0) * PNG_SCALE)
    row = [image.getpixel((x, y)) for x in range(int(layout.left * PNG_SCALE), 1200)]
    assert row.count(colour(CRITICAL)) > 200


# --- the series, against the detector's window query, minute by minute -------------------------


def traffic(seed: int = 7) -> tuple[list[CallRecord], list[ScoreRecord]]:
    """75 minutes of calls on three raw model names that make two scopes (`gpt 4.1` and
    `gpt_4.1` are both model:gpt_4.1), some feature-less, a quiet stretch, errors, 429s, slow
    calls and spend rising near the end; quality scores, and a week of baseline hours."""
    rng = random.Random(seed)
    calls, scores = [], []
    for minute in range(75, -1, -1):
        if 30 <= minute <= 36:
            continue  # nothing at all: windows without samples
        start = NOW - timedelta(minutes=minute)
        late = minute < 15
        for _ in range(rng.randint(8, 30)):
            ts = start - timedelta(seconds=rng.uniform(0, 59))
            if ts > NOW:
                continue
            status = rng.choices(
                ["success", "error", "timeout", "rate_limited", "server_error"],
                [70, 8 if late else 2, 3, 6 if late else 1, 2],
            )[0]
            model = rng.choice(["gpt-4.1", "gpt 4.1", "gpt_4.1", "gpt-4o"])
            feature = rng.choice(["chat", "search", None])
            calls.append(
                CallRecord(
                    ts=ts,
                    model=model,
                    status=status,
                    latency_ms=rng.lognormvariate(7.5 if late else 6.5, 0.8),
                    input_tokens=rng.randint(100, 3000),
                    output_tokens=rng.randint(10, 800),
                    cost_usd=rng.uniform(0.001, 0.05) * (6 if late else 1),
                    feature=feature,
                )
            )
            if rng.random() < 0.6:
                scores.append(
                    ScoreRecord(
                        call_id=calls[-1].call_id, ts=ts, source="scorer",
                        score=rng.uniform(0.2, 0.6) if late else rng.uniform(0.6, 1.0),
                        model=model, feature=feature,
                    )
                )  # fmt: skip
    for hours in range(2, 24 * 7, 5):  # the drift baseline's hours
        ts = NOW - timedelta(hours=hours)
        for i in range(8):
            scores.append(
                ScoreRecord(f"base-{hours}-{i}", ts, "eval", rng.uniform(0.7, 0.95),
                            model=rng.choice(["gpt-4.1", "gpt 4.1"]), feature="chat")
            )  # fmt: skip
    return calls, scores


CHECKED = [
    (Trigger.ERROR_RATE, "global"),
    (Trigger.ERROR_RATE, "model:gpt_4.1"),
    (Trigger.ELEVATED_LATENCY, "feature:chat"),
    (Trigger.RATE_LIMIT_EXHAUSTION, "model:gpt-4o"),
    (Trigger.API_OUTAGE, "global"),
    (Trigger.TOKEN_QUOTA, "model:gpt-4.1"),
    (Trigger.COST_SPIKE, "feature:search"),
    (Trigger.BUDGET_EXHAUSTION, "global"),
    (Trigger.QUALITY_DEGRADATION, "model:gpt_4.1"),
    (Trigger.QUALITY_DEGRADATION, "global"),
]


# Checked at every minute (the others at one in six): the quiet stretch, and the drift baseline.
EVERY_MINUTE = {(Trigger.ERROR_RATE, "global"), (Trigger.QUALITY_DEGRADATION, "model:gpt_4.1")}


class DetectorView:
    """What the detector computes for a window ending at `end`: its own query (the widest
    window the rules read, the narrower ones beside it, as `DetectorWorkflow._evaluate` asks
    for them) and its own evaluation's signals (`now` the end, the tokens' trend from the
    widest window); read once per scope and end."""

    def __init__(self, engine: Engine, config: DetectorRules, budget: float) -> None:
        self._engine, self._config, self._budget = engine, config, budget
        self._read: dict[tuple[str, datetime], evaluation._Signals] = {}

    def found(self, scope: str, window: int, end: datetime) -> dict[str, float | None]:
        key = (scope, end)
        if key not in self._read:
            windows = evaluation.windows_read(self._config, DETECTOR_WINDOW)
            aggregates = window_aggregates(
                self._engine, end, windows[-1], keep=[scope], windows=windows[:-1]
            )
            self._read[key] = evaluation._Signals(
                self._config, aggregates, self._budget, DETECTOR_WINDOW
            )
        return self._read[key].found(window, scope)


DETECTOR_WINDOW = 300


def check_against_the_detector(
    found: list[RuleSeries], detector: DetectorView, every: bool = True
) -> int:
    """Each point of each series against the detector's signal over the window ending there
    (a scope without data in the window: nothing measured, nothing judged). How many points
    were compared with a value."""
    compared = 0
    for series in found:
        assert len(series.raw) == 60
        for index, (minute, end) in enumerate(point_ends(NOW, 60)):
            assert series.minutes[index] == minute
            if not every and index % 6 and index != 59:
                continue  # one minute in six, and the current one, is enough
            expected = detector.found(series.scope, series.window_seconds, end)
            where = (series.rule.name, series.scope, minute)
            if not expected:  # no data there: the detector judges nothing, nor does the chart
                assert series.points[index][1] is None, where
                continue
            want = expected.get(series.rule.signal)
            got = series.raw[index]
            if want is None:
                assert got is None, where
            else:
                assert got == pytest.approx(want, rel=1e-9, abs=1e-12), where
                compared += 1
            samples = float(expected.get(series.rule.sample_signal) or 0.0)
            assert series.samples[index] == pytest.approx(samples), where
    return compared


def test_the_series_is_the_detectors_signal_at_every_minute(store: Engine) -> None:
    calls, scores = traffic()
    write_calls(store, calls)
    write_scores(store, scores)
    config = DetectorRules(tpm_quota={"*": 50_000, "gpt-4.1": 20_000})
    budget = 20.0
    detector = DetectorView(store, config, budget)
    for trigger, scope in CHECKED:
        found = trigger_series(
            store, trigger, scope, NOW, config=config, daily_budget_usd=budget,
            window_seconds=DETECTOR_WINDOW, minutes=60,
        )  # fmt: skip
        assert found, (trigger, scope)
        check_against_the_detector(found, detector, every=(trigger, scope) in EVERY_MINUTE)
        # The 7 quiet minutes are a gap in every rule with a shorter window that needs samples.
        for series in found:
            if series.rule.min_samples > 0 and series.window_seconds <= 300:
                assert any(v is None for _, v in series.points), (series.rule.name, scope)
            if series.rule.signal in RUNWAY_SIGNALS:  # dated and trended: a value everywhere
                assert all(v is not None for v in series.raw), (series.rule.name, scope)


def rising_tokens() -> list[CallRecord]:
    """75 minutes of 30 calls a minute on gpt-4.1, each minute's with more tokens (the tokens
    per minute rise from 12k to 68k) and a higher cost (the burn from $3.6 to $30 an hour)."""
    calls = []
    for minute in range(75, -1, -1):
        grown = 75 - minute
        for i in range(30):
            ts = NOW - timedelta(minutes=minute, seconds=2 * i)
            calls.append(
                CallRecord(
                    ts=ts, model="gpt-4.1", status="success", latency_ms=800.0,
                    input_tokens=300 + 20 * grown, output_tokens=100 + 5 * grown,
                    cost_usd=0.002 * (1 + grown / 10), feature="chat",
                )
            )  # fmt: skip
    return calls


def test_the_runways_are_charted_as_the_detector_dates_and_trends_them(store: Engine) -> None:
    write_calls(store, rising_tokens())
    config = DetectorRules(tpm_quota={"gpt-4.1": 80_000})
    budget = 40.0
    detector = DetectorView(store, config, budget)
    horizon = runway.HORIZON_SECONDS
    for trigger, scope, rule, unit in (
        (Trigger.TOKEN_QUOTA, "model:gpt-4.1", "tpm_runway", 60),
        (Trigger.BUDGET_EXHAUSTION, "global", "budget_runway", 3600),
    ):
        found = trigger_series(
            store, trigger, scope, NOW, config=config, daily_budget_usd=budget,
            window_seconds=DETECTOR_WINDOW, minutes=60,
        )  # fmt: skip
        assert check_against_the_detector(found, detector) >= 60 * len(found)
        [series] = [s for s in found if s.rule.name == rule]
        judged = [v for _, v in series.points]
        # In sight at every minute, shortening as the tokens and the burn rise.
        assert all(v is not None and 0 < v * unit < horizon for v in judged), judged
        assert judged[-1] < judged[0]  # type: ignore[operator]
        latest = series.latest()
        assert latest is not None
        assert series.rule.level(latest) is not None  # breaching now
        chosen = most_relevant(found)
        assert chosen is not None
        if rule == "budget_runway":
            # The SEV1 rule of the trigger is the one charted (spend is at half the budget).
            assert chosen.rule.name == "budget_runway"
            chart = IncidentCharts(store, config, budget, DETECTOR_WINDOW).chart(
                trigger, scope, NOW
            )
            assert chart is not None
            assert chart.title == "hours until the daily budget runs out · global"
            assert (chart.warning, chart.critical, chart.above) == (6.0, 1.0, False)
            assert chart.values[-1] == pytest.approx(latest)


def test_a_runway_out_of_sight_is_drawn_at_the_edge_of_its_lines(engine: Engine) -> None:
    calls = [c for c in rising_tokens() if c.ts < NOW - timedelta(minutes=20)]
    write_calls(engine, calls)  # no spend over the last 20 minutes: out of sight there
    charts = IncidentCharts(engine, DetectorRules(), 40.0, DETECTOR_WINDOW)
    chart = charts.chart(Trigger.BUDGET_EXHAUSTION, "global", NOW)
    assert chart is not None
    assert chart.title.startswith("hours until the daily budget runs out")
    assert max(chart.values) == pytest.approx(24.0)  # four times the warning line, not 48 h
    assert "over 24 h drawn at it" in chart.subtitle
    parse(render_svg(chart))


def test_the_most_relevant_rule_is_the_one_breaching_worst_now(engine: Engine) -> None:
    calls, _ = traffic()
    write_calls(engine, calls)
    config = DetectorRules(
        rules=tuple(
            replace(r, warning=1.0, critical=2.0) if r.name == "latency_p50" else r
            for r in DEFAULT_RULES
        )
    )
    found = trigger_series(
        engine, Trigger.ELEVATED_LATENCY, "global", NOW, config=config, daily_budget_usd=1.0,
        window_seconds=300,
    )  # fmt: skip
    assert [s.rule.name for s in found] == ["latency_p50", "latency_p95"]
    chosen = most_relevant(found)
    assert chosen is not None
    assert chosen.rule.name == "latency_p50"  # critical at 1-2 ms
    charts = IncidentCharts(engine, config, 1.0, 300)
    chart = charts.chart(Trigger.ELEVATED_LATENCY, "global", NOW)
    assert chart is not None
    assert chart.unit == " s"
    assert chart.critical == pytest.approx(0.002)
    assert charts.png(Trigger.ERROR_RATE, "global", NOW - timedelta(days=2)) is None  # no data
    assert charts.chart(Trigger.ERROR_RATE, "model:(other)", NOW) is None  # folded: no history


# --- the status page -------------------------------------------------------------------------


async def open_incident_without_worker(
    client: Client, task_queue: str, trigger: str, scope: str
) -> str:
    """An IncidentWorkflow as the listing sees it (running, its search attributes set), with no
    worker to run it: nothing but the status page's view is under test."""
    incident_id = f"incident-{trigger}-{scope}-{uuid.uuid4().hex[:8]}"
    await client.start_workflow(
        INCIDENT_WORKFLOW,
        id=incident_id,
        task_queue=task_queue,
        search_attributes=TypedSearchAttributes(
            [
                SearchAttributePair(sa.INCIDENT_STATUS, "detected"),
                SearchAttributePair(sa.INCIDENT_SEVERITY, "SEV2"),
                SearchAttributePair(sa.INCIDENT_TRIGGER, trigger),
                SearchAttributePair(sa.INCIDENT_SCOPE, scope),
                SearchAttributePair(sa.INCIDENT_LEVEL, 1),
            ]
        ),
    )
    return incident_id


def recent_traffic(engine: Engine) -> None:
    """The fixed traffic moved to end now, so the page (which charts up to now) shows it."""
    calls, scores = traffic()
    shift = datetime.now(UTC) - NOW
    write_calls(engine, [replace(c, ts=c.ts + shift) for c in calls])
    write_scores(engine, [replace(s, ts=s.ts + shift) for s in scores])


async def status_html(settings: Settings, client: Client, engine: Engine, n: int) -> str:
    app = create_app(Services(settings, engine, client, slack=None))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as api:

        async def listed() -> str:
            page = await api.get("/status", headers={"Accept": "text/html"})
            assert page.status_code == 200
            return page.text if page.text.count("<section class='incident'") == n else ""

        return await eventually(listed, timeout=20)


async def test_the_status_page_charts_each_open_incident(
    dev_env: WorkflowEnvironment,
    settings: Settings,
    task_queue: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = settings.model_copy(update={"dev_mode": True})
    client = dev_env.client
    engine = worker.open_store(settings)
    recent_traffic(engine)
    now = datetime.now(UTC)
    control_store.set_manual(
        engine, incident_id=None, kind="concurrency", feature="chat", model=None, value="4",
        reason="hand brake", set_by="alice", expires_at=now + timedelta(hours=1), now=now,
    )  # fmt: skip
    # One chart fails, one takes longer than the page's deadline (until the test is over, so
    # that no later load finds it drawn): the page answers anyway.
    drawn = IncidentCharts.svg
    late = threading.Event()

    def svg(self: IncidentCharts, trigger: str, scope: str, at: datetime) -> str | None:
        if scope == "model:boom":
            raise RuntimeError("the store went away")
        if scope == "model:slow":
            late.wait(timeout=30)
        return drawn(self, trigger, scope, at)

    monkeypatch.setattr(IncidentCharts, "svg", svg)
    monkeypatch.setattr(status, "STATUS_DEADLINE_SECONDS", 1.5)
    opened = [
        ("error_rate", "global"),
        ("elevated_latency", "model:gpt_4.1"),
        ("cost_spike", "feature:(other)"),
        ("error_rate", "model:boom"),
        ("rate_limit_exhaustion", "model:slow"),
    ]
    ids = [await open_incident_without_worker(client, task_queue, *o) for o in opened]
    try:
        started = time.monotonic()
        page = await status_html(settings, client, engine, n=len(opened))
        assert time.monotonic() - started < 20
    finally:
        late.set()
        for incident_id in ids:
            await client.get_workflow_handle(incident_id).terminate("test over")
    assert "<script" not in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert page.count("<svg") == 2
    assert "error rate · global" in page
    assert "latency · model:gpt_4.1" in page
    assert "feature:(other) sums the names beyond the busiest" in page
    assert "No chart: it could not be drawn" in page
    assert "No chart: not drawn within the page&#x27;s 1.5 s" in page
    assert "<code>elevated_latency</code>" in page  # its runbook
    assert "cap max_tokens" in page
    assert "No runbook answers this trigger" in page  # error_rate has none
    # A control on one feature changes some calls of every model and of global, not of
    # another feature (the folded one).
    assert page.count("throttle feature chat to 4 calls in flight") == 4
    assert "alice, by hand" in page
    # Every section's SVG is well-formed on its own.
    for chunk in page.split("<svg")[1:]:
        parse("<svg" + chunk.split("</svg>")[0] + "</svg>")
    engine.dispose()


async def test_a_burst_of_page_loads_reads_each_chart_once(
    dev_env: WorkflowEnvironment,
    settings: Settings,
    task_queue: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The page may be public: loads in the same minute share one read of each chart and of
    the controls, and the reads run on the page's few threads, however many loads come."""
    settings = settings.model_copy(update={"dev_mode": True})
    client = dev_env.client
    engine = worker.open_store(settings)
    recent_traffic(engine)
    minute = datetime.now(UTC)
    monkeypatch.setattr(status, "status_now", lambda: minute)  # no minute ends mid-test
    drawn, active = IncidentCharts.svg, control_store.active
    charted: list[str] = []
    running, most = [0], [0]
    lock = threading.Lock()

    def svg(self: IncidentCharts, trigger: str, scope: str, at: datetime) -> str | None:
        with lock:
            charted.append(scope)
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            time.sleep(0.2)  # long enough for the loads to overlap
            return drawn(self, trigger, scope, at)
        finally:
            with lock:
                running[0] -= 1

    controls_read: list[datetime] = []

    def controls(engine_: Engine, now: datetime) -> list[control_store.Control]:
        controls_read.append(now)
        return active(engine_, now)

    monkeypatch.setattr(IncidentCharts, "svg", svg)
    monkeypatch.setattr(control_store, "active", controls)
    scopes = ["global", "model:gpt_4.1", "model:gpt-4o", "feature:chat", "feature:search"]
    ids = [
        await open_incident_without_worker(client, task_queue, "error_rate", scope)
        for scope in scopes
    ]
    app = create_app(Services(settings, engine, client, slack=None))
    # Kept for the whole test: on a loaded machine the listing may take longer than the
    # cache's 15 s to show every incident, and a read expiring is not what is tested here.
    app.state.status_details = status.DetailsCache(ttl=3600)
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as api:

            async def page() -> str:
                found = await api.get("/status", headers={"Accept": "text/html"})
                assert found.status_code == 200
                return found.text

            async def all_listed() -> str:  # the listing is eventually consistent
                text = await page()
                return text if text.count("<section class='incident'") == len(scopes) else ""

            listed: str = await eventually(all_listed, timeout=20)
            assert listed
            pages = await asyncio.gather(*(page() for _ in range(8)))
            pages.append(await page())
    finally:
        for incident_id in ids:
            await client.get_workflow_handle(incident_id).terminate("test over")
    assert sorted(charted) == sorted(scopes)  # once each, whatever the number of loads
    assert len(controls_read) == 1
    assert most[0] <= status.DETAILS_READERS
    assert status.details_cache_of(app).reads == len(scopes) + 1
    assert all(text.count("<svg") == len(scopes) for text in pages[-2:])
    engine.dispose()


# --- the chart in the incident's Slack thread ------------------------------------------------


def incident_state() -> IncidentState:
    return IncidentState(
        incident_id=f"incident-error_rate-global-{uuid.uuid4().hex[:8]}",
        trigger=Trigger.ERROR_RATE,
        scope="global",
        severity=Severity.SEV2,
        status=IncidentStatus.DETECTED,
        opened_at=datetime.now(UTC),
        summary="error rate 9.0% > 5%",
    )


def attempt(number: int, started_ago: float = 0.0) -> ActivityEnvironment:
    """The attempt of slack.post_incident (its VENDOR_CALL timeouts) begun `started_ago`
    seconds ago."""
    env = ActivityEnvironment()
    started = datetime.now(UTC) - timedelta(seconds=started_ago)
    env.info = replace(
        ActivityEnvironment.default_info(),
        attempt=number,
        scheduled_time=started - timedelta(minutes=number - 1),
        current_attempt_scheduled_time=started,
        started_time=started,
        start_to_close_timeout=VENDOR_CALL.start_to_close,
        schedule_to_close_timeout=VENDOR_CALL.schedule_to_close,
    )
    return env


PNG = render_png(error_chart([1.0] * 50 + [9.0] * 10))


async def test_the_chart_lands_in_the_thread_once_across_retries(fake_slack: FakeSlack) -> None:
    asked: list[tuple[str, str]] = []

    def chart(trigger: str, scope: str, now: datetime) -> bytes | None:
        asked.append((trigger, scope))
        return PNG

    activities = SlackActivities(slack.make_client("xoxb-test", fake_slack.api_url), chart)
    request = SlackPostRequest(channel=CHANNEL, state=incident_state())
    ref = await attempt(1).run(activities.post_incident, request)
    # The worker died before it heard back: the retries find the message and its chart.
    assert await attempt(2).run(activities.post_incident, request) == ref
    assert await attempt(3).run(activities.post_incident, request) == ref
    [uploaded] = fake_slack.uploaded()
    assert (uploaded.channel, uploaded.thread_ts) == (ref.channel, ref.ts)
    assert uploaded.data == PNG
    assert uploaded.filename == slack.chart_filename(request.state.incident_id)
    assert "error_rate on global" in (uploaded.title or "")
    assert asked == [("error_rate", "global")]
    assert len(fake_slack.posts()) == 1
    assert len(fake_slack.calls("files.getUploadURLExternal")) == 1
    message = fake_slack.messages[(ref.channel, ref.ts)]
    [share] = message.thread
    assert share.files[0]["name"] == uploaded.filename
    assert message.replies == []  # the timeline's replies are unchanged


async def test_a_retry_after_the_post_but_before_the_chart_uploads_it(
    fake_slack: FakeSlack,
) -> None:
    activities = SlackActivities(slack.make_client("xoxb-test", fake_slack.api_url), lambda *_: PNG)
    request = SlackPostRequest(channel=CHANNEL, state=incident_state())
    fake_slack.fail_next("files.getUploadURLExternal", "internal_error", status=500)
    ref = await attempt(1).run(activities.post_incident, request)  # the chart failed: logged
    assert fake_slack.uploaded() == []
    await attempt(2).run(activities.post_incident, request)
    [uploaded] = fake_slack.uploaded(thread_ts=ref.ts)
    assert uploaded.data == PNG


async def test_a_failing_chart_never_fails_the_message(fake_slack: FakeSlack) -> None:
    def broken(trigger: str, scope: str, now: datetime) -> bytes | None:
        raise RuntimeError("the store is away")

    client = slack.make_client("xoxb-test", fake_slack.api_url)
    for chart in (broken, lambda *_: None):
        request = SlackPostRequest(channel=CHANNEL, state=incident_state())
        ref = await attempt(1).run(SlackActivities(client, chart).post_incident, request)
        assert (ref.channel, ref.ts) in fake_slack.messages
    fake_slack.fail_next("files.completeUploadExternal", "missing_scope")
    request = SlackPostRequest(channel=CHANNEL, state=incident_state())
    await attempt(1).run(SlackActivities(client, lambda *_: PNG).post_incident, request)
    assert len(fake_slack.posts()) == 3
    assert fake_slack.uploaded() == []


def test_the_chart_gets_what_the_attempt_has_left_before_its_deadline() -> None:
    info = attempt(1).info
    started = info.started_time
    assert slack.chart_seconds(info, started) == slack.CHART_DEADLINE_SECONDS
    # The post took 15 s of the 30: 15 left, 8 of them the margin.
    at = started + timedelta(seconds=15)
    assert slack.chart_seconds(info, at) == pytest.approx(15 - slack.CHART_MARGIN_SECONDS)
    assert slack.chart_seconds(info, started + timedelta(seconds=29)) < 0
    # Nearly out of the 24 h schedule-to-close: that deadline counts too.
    late = replace(info, scheduled_time=started - timedelta(hours=24) + timedelta(seconds=12))
    assert slack.chart_seconds(late, started) == pytest.approx(12 - slack.CHART_MARGIN_SECONDS)
    untimed = replace(info, start_to_close_timeout=None, schedule_to_close_timeout=None)
    assert slack.chart_seconds(untimed, started) == slack.CHART_DEADLINE_SECONDS


async def test_a_post_near_its_deadline_returns_without_the_chart(fake_slack: FakeSlack) -> None:
    asked: list[str] = []

    def chart(trigger: str, scope: str, now: datetime) -> bytes | None:
        asked.append(scope)
        return PNG

    activities = SlackActivities(slack.make_client("xoxb-test", fake_slack.api_url), chart)
    request = SlackPostRequest(channel=CHANNEL, state=incident_state())
    # 21 s of the 30 gone: 9 left, less than the margin and the least a chart gets.
    ref = await attempt(1, started_ago=21).run(activities.post_incident, request)
    assert (ref.channel, ref.ts) in fake_slack.messages
    assert asked == []
    assert fake_slack.uploaded() == []


async def test_an_incident_posts_its_chart_to_its_thread_through_the_worker(
    dev_env: WorkflowEnvironment, settings: Settings, fake_slack: FakeSlack
) -> None:
    """The worker as worker.py wires it: the chart comes from the stores' traffic."""
    client = dev_env.client
    settings = settings.model_copy(update={"runbooks_enabled": False})
    async with incident_worker(client, settings) as engine:
        recent_traffic(engine)
        plan = worker.notification_plan(settings, load_escalation(None))
        opener = IncidentActivities(client, settings.task_queue, plan, engine)
        breach = Breach(
            Trigger.ERROR_RATE, "global", Severity.SEV2, datetime.now(UTC),
            "error rate 9.0% > 5%", {"error_rate": 0.09},
        )  # fmt: skip
        [opened] = await opener.open_or_update(
            [OpenIncidentRequest(breach, f"incident-error_rate-global-{uuid.uuid4().hex[:8]}")]
        )
        assert opened.incident_id is not None
        handle = client.get_workflow_handle_for(IncidentWorkflow.run, opened.incident_id)
        try:
            await eventually(lambda: len(fake_slack.uploaded()) == 1, timeout=30)
            state = await handle.query(IncidentWorkflow.state)
            assert state.slack_message is not None
            [uploaded] = fake_slack.uploaded()
            assert uploaded.thread_ts == state.slack_message.ts
            image = Image.open(io.BytesIO(uploaded.data or b""))
            assert image.size == (WIDTH * PNG_SCALE, HEIGHT * PNG_SCALE)
        finally:
            await handle.terminate("test over")
