"""Golden signals out: /metrics exports what the detector sees (api/signals_export.py), and every
panel of the Grafana dashboard (deploy/grafana/dashboards/pagerloop.json) reads series that
/metrics really exports.

The app runs in this process over a SQLite store, with a stand-in for the Temporal client (the
detector's status query and the open incidents' listing): no Temporal server is needed."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from fastapi import FastAPI
from pagerloop_sdk.pricing import DEFAULT_PRICES
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine
from temporalio.client import Client
from temporalio.common import SearchAttributePair, TypedSearchAttributes

from api.app import create_app
from api.deps import Services
from api.signals_export import (
    MAX_CONTROL_SERIES,
    SignalsExporter,
    exporter_of,
    families,
    read_controls,
    read_signals,
    rule_series,
)
from api.telemetry import INGESTED_CALLS, REJECTED_REQUESTS, REQUEST_SECONDS, SLACK_ACTIONS
from config import Settings
from detectors.config import load_rules
from detectors.detector import DetectorConfig, DetectorStatus
from detectors.evaluation import rule_window, windows_read
from detectors.rules import Level, RuleState
from detectors.signals import Earlier, values
from domain import search_attributes as sa
from domain.runway import budget_runway, in_sight
from stores import controls as control_store
from stores.aggregates import window_aggregates
from stores.engine import make_engine
from stores.llm_calls import CallRecord
from stores.quality import ScoreRecord, write_scores
from stores.writer import write_calls

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "pagerloop.json"
KEY = "dashboard-ingest-key"


# --- a stand-in for the Temporal client ------------------------------------------------------


@dataclass
class FakeTemporal:
    """What the exporter asks Temporal: the detector's status, the running incidents."""

    status: DetectorStatus | None = None
    incidents: list[dict[str, str]] = field(default_factory=list)
    fail: bool = False
    query_delay: float = 0.0
    queries: int = 0
    workflow_ids: list[str] = field(default_factory=list)

    def get_workflow_handle_for(self, run: Any, workflow_id: str) -> FakeTemporal:
        self.workflow_ids.append(workflow_id)
        return self

    async def query(self, query: Any, **_: Any) -> DetectorStatus:
        self.queries += 1
        await asyncio.sleep(self.query_delay)
        if self.fail or self.status is None:
            raise RuntimeError("Temporal away")
        return self.status

    async def list_workflows(self, query: str, **_: Any) -> AsyncIterator[Any]:
        if self.fail:
            raise RuntimeError("Temporal away")
        assert "WorkflowType = 'IncidentWorkflow'" in query
        for i, attrs in enumerate(self.incidents):
            keys = {
                "severity": sa.INCIDENT_SEVERITY,
                "trigger": sa.INCIDENT_TRIGGER,
                "status": sa.INCIDENT_STATUS,
            }
            pairs = [SearchAttributePair(keys[name], value) for name, value in attrs.items()]
            yield _Execution(f"incident-{i}", TypedSearchAttributes(pairs))


@dataclass
class _Execution:
    id: str
    typed_search_attributes: TypedSearchAttributes


def status_of(rules: dict[str, tuple[str, RuleState | None]]) -> DetectorStatus:
    return DetectorStatus(
        config=DetectorConfig(interval_seconds=30, window_seconds=300),
        paused=False,
        evaluations=7,
        last_evaluated_at=datetime.now(UTC) - timedelta(seconds=12),
        rule_states={key: state for key, (_, state) in rules.items() if state is not None},
        trigger_states={},
        last_verdicts={key: verdict for key, (verdict, _) in rules.items()},
        firing=[],
        inhibited=[],
    )


FIRING = RuleState(breaches=3, good=0, firing=True, level=Level.CRITICAL)
PENDING = RuleState(breaches=1, good=0, firing=False, level=Level.WARNING)
RECOVERING = RuleState(breaches=0, good=1, firing=True, level=Level.WARNING)
STATUS = status_of(
    {
        "error_rate|global": ("firing", FIRING),
        "latency_p95|model:gpt-4.1": ("pending", PENDING),
        "rate_limit|feature:search": ("recovering", RECOVERING),
        "quality|feature:chat": ("ok", None),
        # Quiet now, but firing still: shown as firing.
        "latency_p50|feature:checkout": ("insufficient_data", FIRING),
    }
)
INCIDENTS = [
    {"severity": "SEV2", "trigger": "error_rate", "status": "acknowledged"},
    {"severity": "SEV2", "trigger": "error_rate", "status": "detected"},
    {"severity": "SEV1", "trigger": "api_outage", "status": "mitigating"},
]


# --- the stores ---------------------------------------------------------------------------


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    from stores.engine import create_schema

    engine = make_engine(f"sqlite:///{tmp_path / 'stores.db'}")
    create_schema(engine)
    yield engine
    engine.dispose()


def write_traffic(engine: Engine, now: datetime) -> None:
    """Calls of every status on two priced models and two features, quality scores recent and
    from the baseline: every signal has a value on some scope."""
    shapes = [
        ("gpt-4.1", "chat", "success", 800.0, 40),
        ("gpt-4.1", "chat", "error", 1200.0, 3),
        ("gpt-4.1-mini", "search", "rate_limited", 50.0, 2),
        ("gpt-4.1-mini", "search", "timeout", 30_000.0, 1),
        ("gpt-4.1-mini", "search", "server_error", 500.0, 2),
        ("gpt-4.1-mini", None, "success", 300.0, 10),
    ]
    records = [
        CallRecord(
            ts=now - timedelta(seconds=5 + i),
            model=model,
            feature=feature,
            status=status,
            latency_ms=latency + i,
            input_tokens=100,
            output_tokens=20,
            cost_usd=0.01,
        )
        for model, feature, status, latency, n in shapes
        for i in range(n)
    ]
    write_calls(engine, records)
    recent = [
        ScoreRecord(
            f"r{i}", now - timedelta(seconds=5 + i), "scorer", 0.5, model="gpt-4.1", feature="chat"
        )
        for i in range(10)
    ]
    baseline = [
        ScoreRecord(
            f"b{i}",
            now - timedelta(hours=3, minutes=i),
            "scorer",
            0.8 + (i % 2) * 0.1,
            model="gpt-4.1",
            feature="chat",
        )
        for i in range(40)
    ]
    write_scores(engine, recent + baseline)


def settings_for(tmp_path: Path, **overrides: Any) -> Settings:
    rules = tmp_path / "rules.toml"
    rules.write_text('[tpm_quota]\n"*" = 100000\n"gpt-4.1" = 50000\n[rpm_quota]\n"gpt-4.1" = 500\n')
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        ingest_api_keys=KEY,
        user_hash_salt="salt",
        rules_file=rules,
        daily_budget_usd=10.0,
        **overrides,
    )


def make_app(settings: Settings, engine: Engine, temporal: FakeTemporal) -> FastAPI:
    return create_app(Services(settings, engine, cast(Client, temporal), slack=None))


def client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def scrape_text(text: str) -> dict[str, Any]:
    """Family name -> family, as Prometheus' own parser of the text format reads it."""
    return {family.name: family for family in text_string_to_metric_families(text)}


async def scrape(api: httpx.AsyncClient) -> dict[str, Any]:
    answer = await api.get("/metrics")
    assert answer.status_code == 200, answer.text
    return scrape_text(answer.text)


def samples(found: dict[str, Any], name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in found.values()
        for s in family.samples
        if s.name == name
    }


# --- PromQL, as much of it as the dashboard uses ----------------------------------------------

# Functions, aggregations and keywords: names in an expression that are not series.
PROMQL_WORDS = {
    "abs", "absent", "absent_over_time", "avg", "avg_over_time", "bool", "bottomk", "by",
    "ceil", "changes", "clamp", "clamp_max", "clamp_min", "count", "count_over_time",
    "count_values", "day_of_month", "day_of_week", "delta", "deriv", "exp", "floor", "group",
    "group_left", "group_right", "histogram_quantile", "holt_winters", "idelta", "ignoring",
    "increase", "irate", "label_join", "label_replace", "last_over_time", "ln", "log10",
    "log2", "max", "max_over_time", "min", "min_over_time", "offset", "on", "predict_linear",
    "quantile", "quantile_over_time", "rate", "resets", "round", "scalar", "sgn", "sort",
    "sort_desc", "sqrt", "stddev", "stddev_over_time", "stdvar", "sum", "sum_over_time",
    "time", "timestamp", "topk", "vector", "without", "and", "or", "unless", "label_values",
}  # fmt: skip
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
SELECTOR = re.compile(r"(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)\s*(?P<matchers>\{[^}]*\})?")
MATCHER = re.compile(r'(?P<label>[A-Za-z_][A-Za-z0-9_]*)\s*(?P<op>=~|!~|!=|=)\s*"(?P<value>[^"]*)"')


@dataclass
class Selector:
    metric: str
    matchers: list[tuple[str, str, str]]  # (label, op, value)


def parse_promql(expr: str) -> tuple[list[Selector], set[str]]:
    """The series selectors of an expression and the labels it groups by. Names followed by
    `(` are functions, PromQL's words are skipped, durations and numbers are not names."""
    grouped = {
        label.strip()
        for _, labels in GROUPING.findall(expr)
        for label in labels.split(",")
        if label.strip()
    }
    text = GROUPING.sub(" ", expr)
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range selectors: [5m], [$__rate_interval]
    found = []
    for match in SELECTOR.finditer(text):
        name, rest = match["name"], text[match.end() :].lstrip()
        if name in PROMQL_WORDS or (match["matchers"] is None and rest.startswith("(")):
            continue
        if match.start() > 0 and (
            text[match.start() - 1].isdigit() or text[match.start() - 1] == "."
        ):
            continue  # the exponent or unit of a number: 1e3, 2.5e-1
        matchers = [
            (m["label"], m["op"], m["value"]) for m in MATCHER.finditer(match["matchers"] or "")
        ]
        found.append(Selector(name, matchers))
    return found, grouped


def test_the_promql_reader_finds_series_matchers_and_groupings() -> None:
    selectors, grouped = parse_promql(
        'sum by (endpoint, reason) (rate(pagerloop_rejected_requests_total{reason!="x"}[5m]))'
        " / on (endpoint) group_left max(up) * 1e3 - time()"
    )
    assert [(s.metric, s.matchers) for s in selectors] == [
        ("pagerloop_rejected_requests_total", [("reason", "!=", "x")]),
        ("up", []),
    ]
    assert grouped == {"endpoint", "reason"}


def panel_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(panel title, expression, legend) of every query of every panel, rows' panels too."""

    def walk(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in panels:
            yield panel
            yield from walk(panel.get("panels", []))

    for panel in walk(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"], target.get("legendFormat", "")


def exported_names(found: dict[str, Any]) -> set[str]:
    """Every series name the scrape exports, and those a declared family would export once it
    has children (a counter never incremented in this process shows only its HELP and TYPE)."""
    suffixes = {
        "counter": ["_total", "_created"],
        "histogram": ["_bucket", "_sum", "_count", "_created"],
        "summary": ["_sum", "_count", "_created"],
    }
    names = {s.name for family in found.values() for s in family.samples}
    for family in found.values():
        names |= {family.name + suffix for suffix in suffixes.get(family.type, [""])}
    return names


# --- the dashboard against a real scrape -----------------------------------------------------


async def test_every_panel_of_the_dashboard_reads_series_that_metrics_exports(
    engine: Engine, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    write_traffic(engine, now)
    control_store.set_manual(
        engine,
        incident_id=None,
        kind="disable",
        feature="batch",
        model=None,
        value="",
        reason="backfill",
        set_by="alice",
        expires_at=now + timedelta(hours=1),
        now=now,
    )
    control_store.upsert(
        engine,
        incident_id="incident-rate_limit_exhaustion-global-x",
        kind="rpm",
        feature=None,
        model="gpt-4.1",
        value="600",
        reason="throttle",
        set_by="runbook",
        expires_at=now + timedelta(hours=1),
        now=now,
    )
    temporal = FakeTemporal(status=STATUS, incidents=INCIDENTS)
    app = make_app(settings_for(tmp_path), engine, temporal)
    async with client(app) as api:
        call = {"model": "gpt-4.1", "status": "success", "latency_ms": 120, "feature": "chat"}
        answer = await api.post(
            "/v1/llm-calls", json={"calls": [call]}, headers={"Authorization": f"Bearer {KEY}"}
        )
        assert answer.status_code == 202
        found = await scrape(api)

    names = exported_names(found)
    dashboard = json.loads(DASHBOARD.read_text())
    queries = list(panel_queries(dashboard))
    assert len(queries) >= 30
    for variable in dashboard["templating"]["list"]:
        queries.append((f"${variable['name']}", variable["query"]["query"], ""))
    for title, expr, legend in queries:
        where = f"{title}: {expr}"
        label_values = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", expr)
        if label_values:
            metric, label = label_values.groups()
            assert any(label in labels for labels, _ in _labelled(found, metric)), where
            continue
        selectors, grouped = parse_promql(expr)
        assert selectors, where
        labels_seen: set[str] = {"instance", "job"}  # what Prometheus adds to every series
        for selector in selectors:
            assert selector.metric in names, f"{where}: {selector.metric} is not exported"
            series = [labels for labels, _ in _labelled(found, selector.metric)]
            labels_seen |= {label for labels in series for label in labels}
            labels_seen |= declared_labels(selector.metric)
            for label, op, value in selector.matchers:
                if "$" in value or op.startswith("!"):
                    # A dashboard variable: its values come from the series themselves.
                    assert any(label in labels for labels in series), f"{where}: no {label}"
                    continue
                pattern = re.escape(value) if op == "=" else value
                assert any(re.fullmatch(pattern, labels.get(label, "")) for labels in series), (
                    f"{where}: no series with {label}{op}{value!r}"
                )
        assert grouped <= labels_seen, f"{where}: groups by {grouped - labels_seen}"
        assert set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend)) <= grouped | labels_seen, where


def declared_labels(series: str) -> set[str]:
    """The label names of the service's own counters, which a scrape shows only once a child
    was counted in this process (a refused Slack click, say)."""
    own = [INGESTED_CALLS, REJECTED_REQUESTS, SLACK_ACTIONS, REQUEST_SECONDS]
    return {
        label for metric in own if series.startswith(metric._name) for label in metric._labelnames
    }


def _labelled(found: dict[str, Any], metric: str) -> list[tuple[dict[str, str], float]]:
    return [
        (dict(s.labels), s.value)
        for family in found.values()
        for s in family.samples
        if s.name == metric
    ]


def test_the_dashboard_is_grafana_json_with_a_query_in_every_panel() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "pagerloop-golden-signals"
    assert dashboard["schemaVersion"] >= 39
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert all(t["refId"] for t in panel["targets"]), panel["title"]
        position = panel["gridPos"]
        assert position["x"] + position["w"] <= 24, panel["title"]
    titles = {panel["title"] for panel in dashboard["panels"]}
    for wanted in ("Latency p95 (ms)", "Error rate", "429 rate", "Budget runway", "Rule states"):
        assert wanted in titles


# --- the gauges: the detector's numbers --------------------------------------------------------


def detector_values(
    engine: Engine, settings: Settings, end: datetime
) -> tuple[dict[tuple[str, str], float], dict[str, float], Any]:
    """What one detector evaluation ending at `end` computes, from the detector's own parts:
    each rule reads its window (all of them read at once), a signal no rule reads is the
    detector's window's, trends run from the rules' widest window."""
    rules = load_rules(settings.rules_file)
    detector_window = settings.detector_window_seconds
    by_rules = windows_read(rules, detector_window)
    lengths = sorted({*by_rules, detector_window})
    aggregates = window_aggregates(
        engine, end, lengths[-1], max_scopes=settings.detector_max_scopes, windows=lengths[:-1]
    )
    window_of = {}
    for rule in sorted(rules.rules, key=lambda r: -rule_window(r, detector_window)):
        if rule.enabled:
            window_of[rule.signal] = rule_window(rule, detector_window)
    trend = aggregates.over(by_rules[-1])
    expected: dict[tuple[str, str], float] = {}
    seconds: dict[str, float] = {}
    for length in lengths:
        view = aggregates.over(length)
        for scope, aggregate in view.scopes(rules.scopes).items():
            wide = trend.scope(scope)
            tokens = wide.input_tokens + wide.output_tokens
            minutes = trend.window_seconds / 60
            earlier = Earlier(tokens / minutes, trend.window_seconds, wide.calls / minutes)
            computed = values(
                aggregate,
                view.window_seconds,
                scope=scope,
                daily_budget_usd=settings.daily_budget_usd,
                cost_today_usd=aggregates.cost_today_usd,
                tpm_quota=rules.quota_for(scope),
                now=end,
                earlier=earlier if length != by_rules[-1] else None,
                rpm_quota=rules.request_quota_for(scope),
                baseline=view.baselines.get(scope),
            )
            for signal, value in computed.items():
                if value is not None and window_of.get(signal, detector_window) == length:
                    expected[(signal, scope)] = value
                    seconds[signal] = view.window_seconds
    return expected, seconds, aggregates


async def test_the_signal_gauges_are_the_detectors_values_for_the_same_window(
    engine: Engine, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    write_traffic(engine, now)
    settings = settings_for(tmp_path)
    app = make_app(settings, engine, FakeTemporal(status=STATUS, incidents=INCIDENTS))
    async with client(app) as api:
        found = await scrape(api)
    taken_at = exporter_of(app).snapshot.taken_at
    assert taken_at is not None

    expected, seconds, aggregates = detector_values(engine, settings, taken_at)
    exported = {
        (dict(labels)["signal"], dict(labels)["scope"]): value
        for labels, value in samples(found, "pagerloop_signal").items()
    }
    assert exported.keys() == expected.keys()
    for key, value in expected.items():
        assert exported[key] == pytest.approx(value), key
    windows = {
        dict(labels)["signal"]: value
        for labels, value in samples(found, "pagerloop_signal_window_seconds").items()
    }
    assert windows == seconds
    # The numbers themselves, from the traffic written (every call is in every window).
    assert exported[("calls", "global")] == 58
    assert exported[("error_rate", "global")] == pytest.approx(6 / 58)  # 3 errors, 1 timeout, 2 5xx
    assert exported[("rate_limit_rate", "model:gpt-4.1-mini")] == pytest.approx(2 / 15)
    assert exported[("quality_mean", "feature:chat")] == pytest.approx(0.5)
    assert exported[("tpm_quota_ratio", "model:gpt-4.1")] == pytest.approx(
        43 * 120 / (windows["tpm_quota_ratio"] / 60) / 50_000
    )
    assert exported[("quality_drift_z", "global")] < -2
    assert exported[("rpm_quota_ratio", "model:gpt-4.1")] == pytest.approx(
        43 / (windows["rpm_quota_ratio"] / 60) / 500
    )
    # Every signal of the detector has a value on some scope of this traffic, but the runways
    # of the tokens and requests, which need a trend: the same calls in both windows are none.
    every = values(
        aggregates.scope("global"), 300, scope="global", daily_budget_usd=1, cost_today_usd=0,
        tpm_quota=None,
    )  # fmt: skip
    assert set(every) - {signal for signal, _ in exported} <= {
        "tpm_runway_minutes", "rpm_runway_minutes",
    }  # fmt: skip
    assert {scope for _, scope in exported} == {
        "global", "model:gpt-4.1", "model:gpt-4.1-mini", "feature:chat", "feature:search",
    }  # fmt: skip

    runway = budget_runway(
        settings.daily_budget_usd, 58 * 0.01, exported[("cost_usd_per_hour", "global")], taken_at
    )
    budget_rule_window = windows.get("budget_runway_hours")
    if budget_rule_window == windows["cost_usd_per_hour"]:
        assert samples(found, "pagerloop_budget_runway_seconds")[()] == pytest.approx(
            in_sight(runway.seconds_left)
        )
    assert samples(found, "pagerloop_budget_runway_seconds")[()] == pytest.approx(
        exported[("budget_runway_hours", "global")] * 3600
    )
    assert samples(found, "pagerloop_budget_spent_usd")[()] == pytest.approx(0.58)
    assert samples(found, "pagerloop_budget_limit_usd")[()] == 10.0
    assert samples(found, "pagerloop_budget_used_ratio")[()] == pytest.approx(0.058)
    assert exported[("budget_consumed_ratio", "global")] == pytest.approx(0.058)


async def test_rule_states_open_incidents_and_controls(engine: Engine, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    for i, kind in enumerate(["disable", "disable", "max_tokens"]):
        control_store.set_manual(
            engine,
            incident_id=None,
            kind=kind,
            feature=f"f{i}" if kind == "disable" else None,
            model="gpt-4.1" if kind == "max_tokens" else None,
            value="" if kind == "disable" else "256",
            reason="r",
            set_by="alice",
            expires_at=now + timedelta(hours=1),
            now=now,
        )
    temporal = FakeTemporal(status=STATUS, incidents=INCIDENTS)
    settings = settings_for(tmp_path, task_queue="golden")
    async with client(make_app(settings, engine, temporal)) as api:
        found = await scrape(api)
    assert temporal.workflow_ids == ["detector-golden"]

    rules = {
        (labels["rule"], labels["scope"], labels["state"], labels["level"]): value
        for labels, value in _labelled(found, "pagerloop_rule_state")
    }
    assert rules == {
        ("error_rate", "global", "firing", "critical"): 1.0,
        ("latency_p95", "model:gpt-4.1", "pending", "warning"): 1.0,
        ("rate_limit", "feature:search", "recovering", "warning"): 1.0,
        ("latency_p50", "feature:checkout", "firing", "critical"): 1.0,
    }
    states = {labels["state"]: v for labels, v in _labelled(found, "pagerloop_rule_states")}
    assert states == {"firing": 2.0, "pending": 1.0, "recovering": 1.0}
    assert samples(found, "pagerloop_detector_paused")[()] == 0.0

    incidents = {
        (labels["severity"], labels["trigger"]): v
        for labels, v in _labelled(found, "pagerloop_open_incidents")
    }
    assert len(incidents) == 4 * 8  # every severity and trigger, 0 when none is open
    assert incidents[("SEV2", "error_rate")] == 2.0
    assert incidents[("SEV1", "api_outage")] == 1.0
    assert sum(incidents.values()) == 3.0
    by_status = {
        labels["status"]: v for labels, v in _labelled(found, "pagerloop_open_incidents_by_status")
    }
    assert by_status == {"detected": 1.0, "acknowledged": 1.0, "mitigating": 1.0}

    controls = {
        (labels["kind"], labels["feature"], labels["model"], labels["origin"]): v
        for labels, v in _labelled(found, "pagerloop_controls_in_force")
    }
    assert controls == {
        ("disable", "f0", "*", "manual"): 1.0,
        ("disable", "f1", "*", "manual"): 1.0,
        ("max_tokens", "*", "gpt-4.1", "manual"): 1.0,
    }
    assert samples(found, "pagerloop_controls_active")[()] == 3.0
    up = {labels["source"]: v for labels, v in _labelled(found, "pagerloop_signals_source_up")}
    assert up == {"store": 1.0, "detector": 1.0, "incidents": 1.0, "controls": 1.0}


# --- bounded whatever the traffic -------------------------------------------------------------


def test_labels_stay_bounded_with_many_models_and_features(engine: Engine, tmp_path: Path) -> None:
    """Hundreds of made-up models and features: the busiest features up to the detector's
    max_scopes and `feature:(other)`; models outside the price table never become labels."""
    now = datetime.now(UTC)
    records = [
        CallRecord(
            ts=now - timedelta(seconds=5),
            model=f"made-up-model-{i}" if i % 2 else "gpt-4.1",
            feature=f"feature-{i}",
            status="success",
            latency_ms=100.0 + i,
        )
        for i in range(600)
    ]
    records += [  # the busiest feature
        CallRecord(
            ts=now - timedelta(seconds=5),
            model="gpt-4.1",
            feature="checkout",
            status="success",
            latency_ms=5.0,
        )
        for _ in range(20)
    ]
    write_calls(engine, records)
    settings = settings_for(tmp_path, detector_max_scopes=5)
    rules = load_rules(settings.rules_file)
    reading = read_signals(engine, settings, rules, now, prices=DEFAULT_PRICES)

    features = {scope for scope in reading.signals if scope.startswith("feature:")}
    assert "feature:checkout" in features
    assert "feature:(other)" in features
    assert len(features) == 5 + 1
    assert {scope for scope in reading.signals if scope.startswith("model:")} == {
        "model:gpt-4.1",
        "model:(other)",
    }
    # model:(other) holds every call of the made-up models: global minus gpt-4.1.
    calls = {scope: found["calls"] for scope, found in reading.signals.items()}
    assert calls["model:(other)"] == calls["global"] - calls["model:gpt-4.1"] == 300
    assert reading.folded["feature"].values == 601 - 5

    text = b"".join(_exposition(families_of) for families_of in [families_for(reading)]).decode()
    assert "made-up-model" not in text
    assert len(text.splitlines()) < 400

    # The detector's own view, without the price table, judges the models on their own.
    raw = read_signals(engine, settings, rules, now)
    assert "model:(other)" in raw.signals  # folded past max_scopes
    assert any(scope.startswith("model:made-up-model") for scope in raw.signals)


def families_for(reading: Any) -> list[Any]:
    from api.signals_export import Snapshot

    return families(
        Snapshot(taken_at=datetime.now(UTC), up={"store": True}, store=reading), datetime.now(UTC)
    )


def _exposition(metrics: list[Any]) -> bytes:
    from prometheus_client import CollectorRegistry, generate_latest

    class _Fixed:
        def collect(self) -> list[Any]:
            return metrics

    registry = CollectorRegistry()
    registry.register(_Fixed())
    return generate_latest(registry)


def test_rule_states_fold_unpriced_models_and_keep_firing_scopes_out_of_the_fold() -> None:
    status = status_of(
        {f"error_rate|model:made-up-{i}": ("firing", FIRING) for i in range(3)}
        | {
            "error_rate|model:gpt-4.1": ("firing", FIRING),
            "error_rate|feature:checkout": ("pending", PENDING),
        }
    )
    reading = rule_series(status, DEFAULT_PRICES)
    shown = {(r.rule, r.scope, r.state): r.count for r in reading.rules}
    assert shown == {
        ("error_rate", "model:(other)", "firing"): 3,
        ("error_rate", "model:gpt-4.1", "firing"): 1,
        ("error_rate", "feature:checkout", "pending"): 1,
    }
    assert reading.counts == {"firing": 4, "pending": 1, "recovering": 0}
    # The firing scopes are kept out of the store's fold, as the detector keeps them.
    assert set(reading.firing_scopes) == {f"model:made-up-{i}" for i in range(3)} | {
        "model:gpt-4.1"
    }
    capped = rule_series(status, DEFAULT_PRICES, limit=2)
    assert [r.state for r in capped.rules] == ["firing", "firing"]
    assert capped.counts == reading.counts


def test_controls_in_force_are_capped(engine: Engine) -> None:
    now = datetime.now(UTC)
    for i in range(MAX_CONTROL_SERIES + 50):
        control_store.set_manual(
            engine,
            incident_id=None,
            kind="disable",
            feature=f"feature {i}!",  # odd characters: cleaned up as in scope names
            model=None,
            value="",
            reason="r",
            set_by="alice",
            expires_at=now + timedelta(hours=1),
            now=now,
        )
    series = read_controls(engine, now)
    assert len(series) <= MAX_CONTROL_SERIES
    assert sum(s.count for s in series) == MAX_CONTROL_SERIES + 50
    assert ("disable", "(other)", "(other)", "manual") in {
        (s.kind, s.feature, s.model, s.origin) for s in series
    }
    assert ("feature_0_", "*") in {(s.feature, s.model) for s in series}


async def test_the_exporter_reads_the_rules_file_at_each_refresh(
    engine: Engine, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As /v1/costs and /status do: an edited rules file shows at the next refresh; one that
    stopped parsing keeps the rules read before (as the running detector does), with a word."""
    write_traffic(engine, datetime.now(UTC))
    settings = settings_for(tmp_path)
    app = make_app(settings, engine, FakeTemporal(status=STATUS, incidents=INCIDENTS))
    exporter = SignalsExporter(app.state.services, ttl_seconds=0)

    async def windows() -> dict[str, float]:
        await exporter.refresh()
        assert exporter.snapshot.store is not None
        return exporter.snapshot.store.window_seconds

    assert 120 <= (await windows())["error_rate"] < 180
    assert settings.rules_file is not None
    settings.rules_file.write_text("[rules.error_rate]\nwindow_seconds = 600\n")
    assert 600 <= (await windows())["error_rate"] < 660
    settings.rules_file.write_text("[rules.error_rate]\nwindow_seconds = 90\n")
    with caplog.at_level("WARNING"):
        assert 600 <= (await windows())["error_rate"] < 660
        await windows()
    assert exporter.snapshot.up["store"]
    complaints = [r.message for r in caplog.records if "rules read before" in r.message]
    assert len(complaints) == 1  # once per problem, not at every refresh
    assert "rules.error_rate.window_seconds" in complaints[0]
    # Without the budget_runway rule, the burn is the detector window's, as the spend's gauge.
    settings.rules_file.write_text("[rules.budget_runway]\nenabled = false\n")
    assert 300 <= (await windows())["cost_usd_per_hour"] < 360
    store = exporter.snapshot.store
    assert store is not None
    assert store.window_seconds["budget_runway_hours"] == store.window_seconds["cost_usd_per_hour"]
    assert store.budget.burn_per_hour == store.signals["global"]["cost_usd_per_hour"]


# --- /metrics keeps answering --------------------------------------------------------------


async def test_metrics_answers_when_the_store_and_temporal_are_away(tmp_path: Path) -> None:
    broken = make_engine(f"sqlite:///{tmp_path / 'no-such-dir' / 'stores.db'}")
    app = make_app(settings_for(tmp_path), broken, FakeTemporal(fail=True))
    async with client(app) as api:
        answer = await api.get("/metrics")
    assert answer.status_code == 200
    found = scrape_text(answer.text)
    up = {labels["source"]: v for labels, v in _labelled(found, "pagerloop_signals_source_up")}
    assert up == {"store": 0.0, "detector": 0.0, "incidents": 0.0, "controls": 0.0}
    assert not samples(found, "pagerloop_signal")
    assert not samples(found, "pagerloop_open_incidents")  # unknown is not 0
    assert "pagerloop_ingested_calls" in found  # the service's own metrics are still there
    broken.dispose()


async def test_a_burst_of_scrapes_reads_once_and_a_slow_read_does_not_hold_the_scrape(
    engine: Engine, tmp_path: Path
) -> None:
    temporal = FakeTemporal(status=STATUS, incidents=INCIDENTS)
    app = make_app(settings_for(tmp_path), engine, temporal)
    async with client(app) as api:
        await asyncio.gather(*(scrape(api) for _ in range(5)))
        assert exporter_of(app).reads == 1
        assert temporal.queries == 1

    slow = FakeTemporal(status=STATUS, incidents=INCIDENTS, query_delay=0.5)
    app = make_app(settings_for(tmp_path), engine, slow)
    services = app.state.services
    app.state.signals_exporter = SignalsExporter(services, wait_seconds=0.05)
    async with client(app) as api:
        started = time.monotonic()
        first = await scrape(api)
        assert time.monotonic() - started < 0.4  # served at once, with what there was
        assert not samples(first, "pagerloop_rule_state")
        await asyncio.sleep(0.6)  # the read went on, and serves the next scrape
        second = await scrape(api)
    assert samples(second, "pagerloop_rule_state")
    assert slow.queries == 1
