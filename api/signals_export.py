"""Golden signals out: what the detector sees, as Prometheus gauges on GET /metrics.

At scrape time, from a snapshot at most `SNAPSHOT_TTL_SECONDS` old:

- every signal of every scope, read from the stores as the detector reads them
  (`stores.aggregates.window_aggregates`: the busiest `PAGERLOOP_DETECTOR_MAX_SCOPES` models
  and features and their `(other)` folds, every window the rules read in one scan, then
  `detectors.evaluation.window_signals`, the evaluation's own code), each signal over the
  window its rule reads (`PAGERLOOP_DETECTOR_WINDOW_SECONDS` for a signal no rule reads), with
  the rules file as it is at the refresh:
  `pagerloop_signal{signal, scope}`, a signal without a value (no calls, no quota, no baseline)
  left out, and `pagerloop_signal_window_seconds{signal}`; the daily budget's spend and runway;
- the detector's rule states (its `status` query): `pagerloop_rule_state{rule, scope, state,
  level}` for every pending, firing or recovering rule;
- the open incidents by severity and trigger (Temporal visibility, as `GET /status` reads them);
- the controls in force (the controls store), by kind, feature and model.

Label values stay bounded whatever the traffic: scopes are the fold's (at most 1 + 2 *
(max_scopes + 1)), and, as everywhere on /metrics, a model outside the price table is never a
label: its scope is summed into `model:(other)` here (the detector still judges it on its own).
Rules and scopes of rule states are the detector's (the same model policy, capped again here),
severities and triggers are the contract's, and controls are capped at `MAX_CONTROL_SERIES`.

One refresh at a time: a burst of scrapes shares one read, a scrape waits at most
`SCRAPE_WAIT_SECONDS` for it and is answered with the last snapshot otherwise (the read goes on
and serves the next scrape). The store is read in worker threads, never on the event loop, and
the Temporal calls have short deadlines. A source that fails (store locked or down, Temporal
away, no detector running) leaves its series out and says so in
`pagerloop_signals_source_up{source}`: /metrics itself keeps answering.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from fastapi import FastAPI
from pagerloop_sdk.controls import KINDS as CONTROL_KINDS
from pagerloop_sdk.pricing import PriceTable
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy import Engine

from activities.incidents import open_incidents_query
from api.deps import Services
from config import Settings
from detectors.config import DetectorRules, RulesFileError, load_rules
from detectors.detector import KEEP_PER_DIMENSION, DetectorStatus, DetectorWorkflow
from detectors.evaluation import rule_window, window_signals, windows_read
from detectors.signals import HISTOGRAM_SIGNALS
from domain import search_attributes as sa
from domain.aggregates import Aggregate, FoldedInfo, WindowAggregates, WindowSums
from domain.incident import IncidentStatus, Severity, Trigger
from domain.runway import BudgetRunway, budget_runway, in_sight
from domain.scopes import DIMENSIONS, GLOBAL, OTHER, folded_scope, kind_of, scope_name
from domain.workflow_names import detector_workflow_id
from stores import controls as control_store
from stores.aggregates import window_aggregates

log = logging.getLogger(__name__)

# A burst of scrapes (several Prometheus servers, a person reloading) costs one read.
SNAPSHOT_TTL_SECONDS = 5.0
# Under Prometheus' default scrape timeout (10 s): past it, the last snapshot is served.
SCRAPE_WAIT_SECONDS = 5.0
# Each Temporal call (the detector's status query, the open incidents' listing).
TEMPORAL_DEADLINE_SECONDS = 2.0
# Bounds on the series of one family, whatever the detector or the stores hold.
MAX_RULE_STATE_SERIES = 1000
MAX_CONTROL_SERIES = 100
# One open incident per trigger and scope: far fewer than this in any deployment.
MAX_OPEN_INCIDENTS = 1000

SOURCES = ("store", "detector", "incidents", "controls")
RULE_STATES = ("pending", "firing", "recovering")
OPEN_STATUSES = tuple(str(s) for s in IncidentStatus if s != IncidentStatus.RESOLVED)
ANY = "*"  # a control's feature or model when it applies to all of them
UNKNOWN = "unknown"  # a severity, trigger or status outside the contract's

T = TypeVar("T")


# --- what one refresh read ---------------------------------------------------------------


@dataclass(frozen=True)
class StoreReading:
    """The detector's view of the window: signals per scope, the fold, the budget."""

    # signal -> the seconds it is read over (whole minutes, the current one included)
    window_seconds: dict[str, float]
    # scope -> signal -> value; signals without a value are left out.
    signals: dict[str, dict[str, float]]
    folded: dict[str, FoldedInfo]
    budget: BudgetRunway


@dataclass(frozen=True)
class RuleSeries:
    rule: str
    scope: str
    state: str  # pending | firing | recovering
    level: str  # warning | critical | none
    count: int = 1  # more than one only where scopes were summed into `model:(other)`


@dataclass(frozen=True)
class DetectorReading:
    rules: list[RuleSeries]
    counts: dict[str, int]  # state -> rules in it (all of them, before the series cap)
    paused: bool
    last_evaluated_at: datetime | None
    firing_scopes: list[str]  # kept out of the fold, as the detector keeps them


@dataclass(frozen=True)
class ControlSeries:
    kind: str
    feature: str
    model: str
    origin: str  # manual | runbook
    count: int


@dataclass(frozen=True)
class Snapshot:
    taken_at: datetime | None = None
    took_seconds: float = 0.0
    up: dict[str, bool] = field(default_factory=dict)
    store: StoreReading | None = None
    detector: DetectorReading | None = None
    # (severity, trigger, status) -> open incidents
    incidents: dict[tuple[str, str, str], int] | None = None
    controls: list[ControlSeries] | None = None


# --- the store parts (sync: they run in worker threads) ------------------------------------


def signal_windows(rules: DetectorRules, detector_window: int) -> dict[str, int]:
    """The window each signal is shown over: the one its rule reads (the narrowest, should
    two rules read it over different windows), else the detector's."""
    found: dict[str, int] = {}
    for rule in rules.rules:
        if rule.enabled:
            window = rule_window(rule, detector_window)
            found[rule.signal] = min(found.get(rule.signal, window), window)
    return found


def read_signals(
    engine: Engine,
    settings: Settings,
    rules: DetectorRules,
    now: datetime,
    keep: Sequence[str] = (),
    prices: PriceTable | None = None,
) -> StoreReading:
    """Every scope's signals as one detector evaluation computes them (`window_signals`, the
    evaluation's own code): one read of the widest window the rules read, the narrower ones
    beside it, each signal over its rule's window (`signal_windows`), a trend against the
    rules' widest; and the daily budget's runway at the burn its rule reads. With `prices`,
    the scopes of models without a price are summed into `model:(other)` first
    (`labelled_scope`)."""
    detector_window = settings.detector_window_seconds
    read = sorted({*windows_read(rules, detector_window), detector_window})
    shown = signal_windows(rules, detector_window)
    aggregates = window_aggregates(
        engine,
        now,
        read[-1],
        max_scopes=settings.detector_max_scopes,
        keep=keep,
        windows=read[:-1],
        latency_windows=sorted({shown.get(s, detector_window) for s in HISTOGRAM_SIGNALS}),
    )
    computed = window_signals(
        rules,
        _labelled(aggregates, prices),
        settings.daily_budget_usd,
        detector_window,
        also=[detector_window],
    )
    signals: dict[str, dict[str, float]] = {}
    for window, scopes in computed.items():
        for name, found in scopes.items():
            for signal, value in found.items():
                if value is not None and shown.get(signal, detector_window) == window:
                    signals.setdefault(name, {})[signal] = float(value)
    # The runway at the burn the budget_runway rule reads (the detector's window when the rule
    # is disabled: the window the other spend signals are shown over).
    budget_window = shown.get("budget_runway_hours", detector_window)
    burn = computed[budget_window].get(GLOBAL, {}).get("cost_usd_per_hour") or 0.0
    budget = budget_runway(settings.daily_budget_usd, aggregates.cost_today_usd, burn, now)
    windows = {
        signal: aggregates.over(shown.get(signal, detector_window)).window_seconds
        for signal in {name for found in signals.values() for name in found}
    }
    return StoreReading(windows, signals, dict(aggregates.folded), budget)


def _labelled(aggregates: WindowAggregates, prices: PriceTable | None) -> WindowAggregates:
    """The result with the scopes of models without a price summed into `model:(other)`, in
    every window."""
    if prices is None:
        return aggregates

    def merged(scopes: dict[str, Aggregate]) -> dict[str, Aggregate]:
        found: dict[str, Aggregate] = {}
        for name, aggregate in scopes.items():
            found.setdefault(labelled_scope(name, prices), Aggregate()).add(aggregate)
        return found

    return WindowAggregates.of_scopes(
        aggregates.end,
        aggregates.window_seconds,
        merged(aggregates.scopes()),
        aggregates.cost_today_usd,
        aggregates.folded,
        {
            seconds: WindowSums.of_scopes(
                sums.window_seconds, merged(aggregates.over(seconds).scopes())
            )
            for seconds, sums in aggregates.windows.items()
        },
    )


def labelled_scope(scope: str, prices: PriceTable | None) -> str:
    """The scope as a label value: a model scope whose model has no price (a name any client
    can make up) is `model:(other)`; the rest as they are. `prices=None`: every scope as is."""
    if prices is None or kind_of(scope) != "model" or scope == folded_scope("model"):
        return scope
    return scope if prices.price(scope.partition(":")[2]) is not None else folded_scope("model")


def _name(kind: str, raw: str | None) -> str:
    """A control's feature or model as a label: the scope's cleaned-up name, `*` for any."""
    return ANY if not raw else scope_name(kind, raw).partition(":")[2]


def read_controls(
    engine: Engine, now: datetime, limit: int = MAX_CONTROL_SERIES
) -> list[ControlSeries]:
    """The controls in force, counted by (kind, feature, model, origin). Past `limit` series,
    the smallest are summed per kind and origin into feature and model `(other)`."""
    counts: Counter[tuple[str, str, str, str]] = Counter()
    for control in control_store.active(engine, now):
        kind = control.kind if control.kind in CONTROL_KINDS else "other"
        origin = "manual" if control.manual else "runbook"
        key = (kind, _name("feature", control.feature), _name("model", control.model), origin)
        counts[key] += 1
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    if len(ranked) > limit:
        # Room for the folded series: one per kind (and "other") and origin.
        kept = ranked[: max(limit - _FOLDED_CONTROL_SERIES, 0)]
        rest = ranked[len(kept) :]
        folded: Counter[tuple[str, str, str, str]] = Counter()
        for (kind, _, _, origin), count in rest:
            folded[(kind, OTHER, OTHER, origin)] += count
        ranked = kept + sorted(folded.items())
    return [ControlSeries(*key, count) for key, count in ranked]


_FOLDED_CONTROL_SERIES = 2 * (len(CONTROL_KINDS) + 1)


# --- the Temporal parts ------------------------------------------------------------------


def rule_series(
    status: DetectorStatus,
    prices: PriceTable | None = None,
    limit: int = MAX_RULE_STATE_SERIES,
) -> DetectorReading:
    """The rules that are pending, firing or recovering, from the detector's status: its last
    verdict where it says one of those, else what the kept state says (a firing rule whose
    scope went quiet stays firing). Scopes are labelled as the signals' (`labelled_scope`)."""
    counts: Counter[tuple[str, str, str, str]] = Counter()
    for key in sorted(set(status.rule_states) | set(status.last_verdicts)):
        rule, _, scope = key.partition("|")
        verdict = status.last_verdicts.get(key, "")
        state = status.rule_states.get(key)
        if verdict in RULE_STATES:
            shown = verdict
        elif state is not None and state.firing:
            shown = "firing"
        elif state is not None and state.breaches > 0:
            shown = "pending"
        else:
            continue
        level = str(state.level) if state is not None and state.level is not None else "none"
        counts[(rule, labelled_scope(scope, prices), shown, level)] += 1
    totals = {state: 0 for state in RULE_STATES}
    for (_, _, shown, _), count in counts.items():
        totals[shown] += count
    # Over the cap, the firing ones first: they are what a dashboard is opened for.
    order = {"firing": 0, "recovering": 1, "pending": 2}
    ranked = sorted(counts.items(), key=lambda item: (order[item[0][2]], item[0]))
    kept = [RuleSeries(*key, count) for key, count in ranked[:limit]]
    firing = sorted({key.partition("|")[2] for key, s in status.rule_states.items() if s.firing})
    keep: list[str] = []
    for kind in DIMENSIONS:
        named = [s for s in firing if kind_of(s) == kind and s != folded_scope(kind)]
        keep.extend(named[:KEEP_PER_DIMENSION])
    return DetectorReading(kept, totals, status.paused, status.last_evaluated_at, keep)


async def read_detector(svc: Services) -> DetectorReading:
    handle = svc.temporal.get_workflow_handle_for(
        DetectorWorkflow.run, detector_workflow_id(svc.settings.task_queue)
    )
    async with asyncio.timeout(TEMPORAL_DEADLINE_SECONDS):
        status: DetectorStatus = await handle.query(
            DetectorWorkflow.status, rpc_timeout=timedelta(seconds=TEMPORAL_DEADLINE_SECONDS)
        )
    return rule_series(status, svc.prices)


def _known(value: object, known: Iterable[str]) -> str:
    return str(value) if value is not None and str(value) in set(known) else UNKNOWN


async def read_open_incidents(svc: Services) -> dict[tuple[str, str, str], int]:
    """Running incidents of this deployment by (severity, trigger, status); every severity and
    trigger of the contract is there, at 0 when none is open."""
    counts: Counter[tuple[str, str, str]] = Counter()
    query = open_incidents_query(svc.settings.task_queue)
    async with asyncio.timeout(TEMPORAL_DEADLINE_SECONDS):
        async for execution in svc.temporal.list_workflows(
            query,
            limit=MAX_OPEN_INCIDENTS,
            rpc_timeout=timedelta(seconds=TEMPORAL_DEADLINE_SECONDS),
        ):
            attrs = execution.typed_search_attributes
            key = (
                _known(attrs.get(sa.INCIDENT_SEVERITY), (str(s) for s in Severity)),
                _known(attrs.get(sa.INCIDENT_TRIGGER), (str(t) for t in Trigger)),
                _known(attrs.get(sa.INCIDENT_STATUS), OPEN_STATUSES),
            )
            counts[key] += 1
    for severity in Severity:
        for trigger in Trigger:
            counts.setdefault((str(severity), str(trigger), str(IncidentStatus.DETECTED)), 0)
    return dict(counts)


# --- the exporter: one per app -------------------------------------------------------------


class SignalsExporter:
    """The snapshot behind the gauges, refreshed on demand, and the registry that shows it."""

    def __init__(
        self,
        svc: Services,
        *,
        ttl_seconds: float = SNAPSHOT_TTL_SECONDS,
        wait_seconds: float = SCRAPE_WAIT_SECONDS,
    ) -> None:
        self._svc = svc
        self._ttl = ttl_seconds
        self._wait = wait_seconds
        self._rules: DetectorRules | None = None  # the last rules file read
        self._rules_problem: str | None = None  # what is wrong with the file now
        self._snapshot = Snapshot()
        self._refreshed: float | None = None  # monotonic time of the last completed refresh
        self._task: asyncio.Task[None] | None = None
        self._up: dict[str, bool] = {}
        self.reads = 0  # completed refreshes, for tests and curiosity
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SignalsCollector(self))

    @property
    def snapshot(self) -> Snapshot:
        return self._snapshot

    async def refresh(self) -> None:
        """A snapshot at most the TTL old, or the last one if a fresh one takes too long."""
        if self._refreshed is not None and time.monotonic() - self._refreshed < self._ttl:
            return
        loop = asyncio.get_running_loop()
        task = self._task
        if task is None or task.done() or task.get_loop() is not loop:
            task = self._task = loop.create_task(self._read())
        try:
            async with asyncio.timeout(self._wait):
                await asyncio.shield(task)
        except TimeoutError:
            log.warning(
                "golden signals: the refresh takes over %ss; last snapshot served", self._wait
            )

    async def _read(self) -> None:
        started = time.monotonic()
        now = datetime.now(UTC)
        previous = self._snapshot
        keep = previous.detector.firing_scopes if previous.detector else []
        store, controls, detector, incidents = await asyncio.gather(
            self._guard("store", self._read_store(now, keep)),
            self._guard("controls", asyncio.to_thread(read_controls, self._svc.engine, now)),
            self._guard("detector", read_detector(self._svc)),
            self._guard("incidents", read_open_incidents(self._svc)),
        )
        self._snapshot = Snapshot(
            taken_at=now,
            took_seconds=time.monotonic() - started,
            up=dict(self._up),
            store=store,
            detector=detector,
            incidents=incidents,
            controls=controls,
        )
        self._refreshed = time.monotonic()
        self.reads += 1

    async def _read_store(self, now: datetime, keep: Sequence[str]) -> StoreReading:
        svc = self._svc
        return await asyncio.to_thread(
            lambda: read_signals(svc.engine, svc.settings, self.rules(), now, keep, svc.prices)
        )

    def rules(self) -> DetectorRules:
        """The rules file as it is now: read again at each refresh (a small TOML file, at most
        once per TTL), as /v1/costs and /status read it per request, so that the gauges
        follow an edited file. One that stopped parsing keeps the last rules read in force,
        as the running detector does (with a warning, once per problem); with none read yet,
        the store's series are left out. Blocking."""
        try:
            rules = load_rules(self._svc.settings.rules_file)
        except RulesFileError as exc:
            if self._rules is None:
                raise
            if str(exc) != self._rules_problem:
                log.warning("golden signals: %s; the rules read before stay in force", exc)
            self._rules_problem = str(exc)
            return self._rules
        self._rules, self._rules_problem = rules, None
        return rules

    async def _guard(self, source: str, work: Awaitable[T]) -> T | None:
        try:
            result = await work
        except Exception as exc:  # any failure of a source: its series are left out
            if self._up.get(source, True):
                log.warning(
                    "golden signals: %s unavailable: %s: %s", source, type(exc).__name__, exc
                )
            else:
                log.debug("golden signals: %s still unavailable: %s", source, exc)
            self._up[source] = False
            return None
        if not self._up.get(source, True):
            log.info("golden signals: %s available again", source)
        self._up[source] = True
        return result


def exporter_of(app: FastAPI) -> SignalsExporter:
    """The app's exporter, made on first use: one per app, so apps made in tests never share
    a snapshot, nor register twice in the process-wide registry."""
    exporter: SignalsExporter | None = getattr(app.state, "signals_exporter", None)
    if exporter is None:
        exporter = app.state.signals_exporter = SignalsExporter(app.state.services)
    return exporter


# --- the gauges --------------------------------------------------------------------------


class SignalsCollector:
    """A prometheus-client collector over the exporter's last snapshot (collect() only reads)."""

    def __init__(self, exporter: SignalsExporter) -> None:
        self._exporter = exporter

    def collect(self) -> Iterator[Metric]:
        return iter(families(self._exporter.snapshot, datetime.now(UTC)))


def _gauge(name: str, documentation: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=list(labels))


def families(snapshot: Snapshot, now: datetime) -> list[Metric]:
    """The metric families of a snapshot."""
    up = _gauge(
        "pagerloop_signals_source_up",
        "1 when the last refresh read this source (store, detector, incidents, controls); "
        "0 when it failed, and its series are left out.",
        ["source"],
    )
    for source in SOURCES:
        up.add_metric([source], 1.0 if snapshot.up.get(source) else 0.0)
    found: list[Metric] = [up]
    if snapshot.taken_at is not None:
        age = _gauge(
            "pagerloop_signals_snapshot_age_seconds",
            "How old the snapshot behind the golden-signal gauges is.",
        )
        age.add_metric([], max((now - snapshot.taken_at).total_seconds(), 0.0))
        took = _gauge(
            "pagerloop_signals_refresh_seconds",
            "How long the last refresh of the golden-signal gauges took.",
        )
        took.add_metric([], snapshot.took_seconds)
        found += [age, took]
    if snapshot.store is not None:
        found += _store_families(snapshot.store)
    if snapshot.detector is not None:
        found += _detector_families(snapshot.detector)
    if snapshot.incidents is not None:
        found += _incident_families(snapshot.incidents)
    if snapshot.controls is not None:
        controls = _gauge(
            "pagerloop_controls_in_force",
            "Controls in force, by kind, feature and model (`*`: any) and origin (runbook or "
            "manual).",
            ["kind", "feature", "model", "origin"],
        )
        for c in snapshot.controls:
            controls.add_metric([c.kind, c.feature, c.model, c.origin], float(c.count))
        total = _gauge("pagerloop_controls_active", "Controls in force, all kinds.")
        total.add_metric([], float(sum(c.count for c in snapshot.controls)))
        found += [controls, total]
    return found


def _store_families(store: StoreReading) -> list[Metric]:
    signal = _gauge(
        "pagerloop_signal",
        "The detector's signals per scope over the window (latency_p50_ms, error_rate, "
        "cost_usd_per_hour, quality_mean, ...); a signal without a value is left out.",
        ["signal", "scope"],
    )
    for scope, measured in store.signals.items():
        for name, value in measured.items():
            signal.add_metric([name, scope], value)
    window = _gauge(
        "pagerloop_signal_window_seconds",
        "The window each signal is read over: its rule's, else PAGERLOOP_DETECTOR_WINDOW_SECONDS "
        "(whole minutes, the current one included).",
        ["signal"],
    )
    for name, seconds in sorted(store.window_seconds.items()):
        window.add_metric([name], seconds)
    folded_values = _gauge(
        "pagerloop_scopes_folded",
        "Distinct names of a dimension beyond the busiest ones, summed into <dimension>:(other).",
        ["dimension"],
    )
    folded_calls = _gauge(
        "pagerloop_scopes_folded_calls",
        "Calls in the window of the names folded into <dimension>:(other).",
        ["dimension"],
    )
    for kind in DIMENSIONS:
        info = store.folded.get(kind, FoldedInfo())
        folded_values.add_metric([kind], float(info.values))
        folded_calls.add_metric([kind], float(info.calls))
    budget = store.budget
    simple = [
        (
            "pagerloop_budget_limit_usd",
            "The daily budget (PAGERLOOP_DAILY_BUDGET_USD).",
            budget.limit,
        ),
        ("pagerloop_budget_spent_usd", "Spent today (UTC).", budget.spent),
        (
            "pagerloop_budget_used_ratio",
            "Spent today / the daily budget.",
            budget.used_ratio if budget.used_ratio is not None else 0.0,
        ),
        (
            "pagerloop_budget_burn_usd_per_hour",
            "The spend rate over the window.",
            budget.burn_per_hour,
        ),
        (
            "pagerloop_budget_runway_seconds",
            "Until the budget runs out at this burn (past midnight UTC: tomorrow's budget); "
            "172800 (two days) when not in sight.",
            in_sight(budget.seconds_left),
        ),
        (
            "pagerloop_budget_projected_at_reset_usd",
            "Spent by midnight UTC at this burn.",
            budget.projected_at_reset,
        ),
    ]
    found: list[Metric] = [signal, window, folded_values, folded_calls]
    for name, documentation, value in simple:
        gauge = _gauge(name, documentation)
        gauge.add_metric([], float(value))
        found.append(gauge)
    return found


def _detector_families(detector: DetectorReading) -> list[Metric]:
    rules = _gauge(
        "pagerloop_rule_state",
        "1 for each rule on a scope that is pending, firing or recovering, with its level (the "
        "number of them on model:(other), which sums the models without a price).",
        ["rule", "scope", "state", "level"],
    )
    for r in detector.rules:
        rules.add_metric([r.rule, r.scope, r.state, r.level], float(r.count))
    counts = _gauge(
        "pagerloop_rule_states",
        "Rules on scopes in each state (pending, firing, recovering).",
        ["state"],
    )
    for state in RULE_STATES:
        counts.add_metric([state], float(detector.counts.get(state, 0)))
    paused = _gauge("pagerloop_detector_paused", "1 while the detector is paused.")
    paused.add_metric([], 1.0 if detector.paused else 0.0)
    found: list[Metric] = [rules, counts, paused]
    if detector.last_evaluated_at is not None:
        last = _gauge(
            "pagerloop_detector_last_evaluation_timestamp_seconds",
            "When the detector last evaluated its rules (Unix time).",
        )
        last.add_metric([], detector.last_evaluated_at.timestamp())
        found.append(last)
    return found


def _incident_families(incidents: dict[tuple[str, str, str], int]) -> list[Metric]:
    by_severity: Counter[tuple[str, str]] = Counter()
    by_status: Counter[str] = Counter({status: 0 for status in OPEN_STATUSES})
    for (severity, trigger, status), count in incidents.items():
        by_severity[(severity, trigger)] += count
        by_status[status] += count
    open_incidents = _gauge(
        "pagerloop_open_incidents",
        "Open incidents by severity and trigger (every pair of the contract, 0 when none).",
        ["severity", "trigger"],
    )
    for (severity, trigger), count in sorted(by_severity.items()):
        open_incidents.add_metric([severity, trigger], float(count))
    statuses = _gauge(
        "pagerloop_open_incidents_by_status",
        "Open incidents by status (detected, acknowledged, mitigating).",
        ["status"],
    )
    for status, count in sorted(by_status.items()):
        statuses.add_metric([status], float(count))
    return [open_incidents, statuses]


__all__ = [
    "ControlSeries",
    "DetectorReading",
    "RuleSeries",
    "SignalsCollector",
    "SignalsExporter",
    "Snapshot",
    "StoreReading",
    "exporter_of",
    "families",
    "labelled_scope",
    "read_controls",
    "read_open_incidents",
    "read_signals",
    "rule_series",
]
