"""DetectorWorkflow: every interval, every rule on every scope; breaches open or update the
incident of their trigger + scope, recoveries are reported to it.

A durable loop rather than a Temporal Schedule: the anti-flap counters (consecutive breaches,
consecutive good evaluations) and the incident on record per trigger + scope live in workflow
state, so they survive worker restarts without a store of their own, and continue-as-new keeps
the history short. Pause and resume it with the `pause` / `resume` signals (Temporal UI:
Signal; CLI: `pagerloop detector pause`); `reconfigure` takes new settings.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from activities.incidents import (
        IncidentActivities,
        OpenIncidentRequest,
        OpenIncidentResult,
        RecoveryReport,
    )
    from activities.metrics import MetricsActivities, WindowQuery
    from activities.policies import OPEN_INCIDENT, STORE_QUERY
    from detectors.config import DetectorRules
    from detectors.correlation import (
        LEGACY_RELATIONS,
        Key,
        Relation,
        Routing,
        key_of,
        route,
    )
    from detectors.evaluation import (
        Evaluation,
        Finding,
        evaluate,
        latency_windows,
        trigger_key,
        windows_read,
    )
    from detectors.rules import RuleState
    from domain.aggregates import FoldedInfo, WindowAggregates
    from domain.escalation import span
    from domain.incident import Breach, Recovery, episode_of, severity_rank
    from domain.scopes import DIMENSIONS, folded_scope, kind_of

PER_SCOPE_PATCH = "detector-per-scope-aggregates"
# A new breach is looked at again after this, not a whole interval later: the confirmation a
# rule's `for_evaluations` asks for costs seconds, not an interval, before the page (P4).
CONFIRM_AFTER = timedelta(seconds=2)
CONFIRM_SOON_PATCH = "confirm-a-new-breach-soon"
# One problem, one incident: the rules' relations (not the legacy api_outage-over-error_rate
# alone) hide targets firing with their source, and apply to open incidents too.
CORRELATE_PATCH = "correlate-open-incidents"
# Each rule reads its own window (2, 5, 10 minutes), all read by one activity call; a run begun
# before reads the detector's window for every rule.
PER_RULE_WINDOWS_PATCH = "per-rule-windows"
# A breach within its rule's cooldown after its incident resolved reopens that incident
# instead of opening (and paging for) a new one.
REOPEN_PATCH = "reopen-within-cooldown"
# Start a fresh run long before the history gets heavy.
EVALUATIONS_PER_RUN = 500
# A firing trigger refreshes its open incident's metrics at most this often (like
# Alertmanager's group_interval); a higher severity is reported at once.
REPORT_INTERVAL = timedelta(seconds=60)
# The store gives at most this many names of a dimension a scope of their own (the settings'
# bound on PAGERLOOP_DETECTOR_MAX_SCOPES): asking to keep more would only grow the input.
KEEP_PER_DIMENSION = 100


@dataclass
class DetectorConfig:
    interval_seconds: int
    window_seconds: int
    daily_budget_usd: float = 500.0
    rules: DetectorRules = field(default_factory=DetectorRules)


@dataclass
class TriggerState:
    """What the detector knows of the incident of one trigger + scope."""

    incident_id: str | None = None
    reported_at: datetime | None = None
    severity: str | None = None
    silenced_by: int | None = None
    # `incident_id` is a wider problem's incident this trigger + scope joined (or was merged
    # into), not its own.
    attached: bool = False
    # Its own incident that closed last (resolved), and when the detector heard of it: a
    # breach within the rule's cooldown reopens that one.
    closed_id: str | None = None
    closed_at: datetime | None = None
    # Which episode of `incident_id` (a reopened incident's are numbered from 1).
    episode: int = 0


@dataclass
class DetectorInput:
    config: DetectorConfig
    rule_states: dict[str, RuleState] = field(default_factory=dict)
    trigger_states: dict[str, TriggerState] = field(default_factory=dict)
    paused: bool = False


@dataclass
class DetectorStatus:
    config: DetectorConfig
    paused: bool
    evaluations: int
    last_evaluated_at: datetime | None
    rule_states: dict[str, RuleState]
    trigger_states: dict[str, TriggerState]
    last_verdicts: dict[str, str]
    firing: list[str]
    inhibited: list[str]
    # By dimension: the names beyond the top ones, summed into `<dimension>:(other)`.
    folded: dict[str, FoldedInfo] = field(default_factory=dict)
    # The windows the last evaluation read (seconds, narrowest first): the rules' own.
    windows: list[int] = field(default_factory=list)


def folded_line(kind: str, info: FoldedInfo) -> str:
    return (
        f"{kind}: {info.values:,} values beyond the top {info.top} folded into "
        f"{folded_scope(kind)} ({info.calls:,} calls)"
    )


def _reopenable(state: TriggerState, finding: Finding, now: datetime) -> str | None:
    """The resolved incident this breach reopens: its own last one, closed within the firing
    rules' cooldown."""
    if state.closed_id is None or state.closed_at is None or finding.cooldown_seconds <= 0:
        return None
    if now - state.closed_at > timedelta(seconds=finding.cooldown_seconds):
        return None
    return state.closed_id


def proposed_incident_id(finding: Finding, at: datetime) -> str:
    return f"incident-{finding.trigger}-{finding.scope}-{at:%Y%m%dT%H%M%SZ}"


@workflow.defn
class DetectorWorkflow:
    @workflow.init
    def __init__(self, input: DetectorInput) -> None:
        self._config = input.config
        self._rule_states = dict(input.rule_states)
        self._triggers = dict(input.trigger_states)
        self._paused = input.paused
        self._evaluations = 0
        self._last_evaluated_at: datetime | None = None
        self._last: Evaluation | None = None
        self._folded: dict[str, FoldedInfo] = {}
        self._windows: list[int] = [input.config.window_seconds]  # read by the last evaluation
        # The last evaluation asked for the rules' windows and got the widest alone.
        self._one_window_read = False
        # Incident id -> the last of its episodes heard closed (a reopened incident keeps its id).
        self._closed: dict[str, int] = {}
        self._wake = False

    @workflow.run
    async def run(self, input: DetectorInput) -> None:
        while self._evaluations < EVALUATIONS_PER_RUN:
            if not self._paused:
                try:
                    await self._evaluate()
                except ActivityError as err:
                    # A store or Temporal hiccup skips one evaluation, never the detector.
                    workflow.logger.warning("evaluation skipped: %s", err.cause or err)
            self._describe()
            self._wake = False
            wait, why = timedelta(seconds=self._config.interval_seconds), "the next evaluation"
            if self._confirming() and workflow.patched(CONFIRM_SOON_PATCH):
                wait, why = min(wait, CONFIRM_AFTER), "a second look at a new breach"
            with contextlib.suppress(asyncio.TimeoutError):
                await workflow.wait_condition(
                    lambda: self._wake, timeout=wait, timeout_summary=f"until {why}"
                )
            if workflow.info().is_continue_as_new_suggested():
                break
        await workflow.wait_condition(workflow.all_handlers_finished)
        workflow.continue_as_new(
            DetectorInput(self._config, self._rule_states, self._triggers, self._paused)
        )

    def _confirming(self) -> bool:
        """A breach seen but not yet confirmed (a rule's `for_evaluations` not yet reached)."""
        last = self._last
        return last is not None and "pending" in last.verdicts.values()

    # --- signals and queries ---------------------------------------------------------------

    @workflow.signal
    def reconfigure(self, config: DetectorConfig) -> None:
        self._config = config
        self._wake = True

    @workflow.signal
    def incident_closed(self, closed: str) -> None:
        """`closed`: the incident's episode key (its id, and which reopening ended)."""
        incident_id, episode = episode_of(closed)
        # Also remembered: an evaluation in flight may be about to write this id back.
        self._closed[incident_id] = max(episode, self._closed.get(incident_id, 0))
        for key, state in self._triggers.items():
            if state.incident_id == incident_id and state.episode <= episode:
                own = not state.attached
                self._triggers[key] = TriggerState(
                    closed_id=incident_id if own else None,
                    closed_at=workflow.now() if own else None,
                )
        self._wake = True

    @workflow.signal
    def pause(self) -> None:
        self._paused = True
        self._wake = True

    @workflow.signal
    def resume(self) -> None:
        self._paused = False
        self._wake = True

    @workflow.query
    def status(self) -> DetectorStatus:
        last = self._last
        return DetectorStatus(
            config=self._config,
            paused=self._paused,
            evaluations=self._evaluations,
            last_evaluated_at=self._last_evaluated_at,
            rule_states=dict(self._rule_states),
            trigger_states=dict(self._triggers),
            last_verdicts=dict(last.verdicts) if last else {},
            firing=[trigger_key(f.trigger, f.scope) for f in last.firing] if last else [],
            inhibited=list(last.inhibited) if last else [],
            folded=dict(self._folded),
            windows=list(self._windows),
        )

    # --- one evaluation --------------------------------------------------------------------

    async def _evaluate(self) -> None:
        now = workflow.now()
        config = self._config
        # A run begun before the folding replays on the per-cell shape it recorded.
        per_scope = workflow.patched(PER_SCOPE_PATCH)
        per_rule = per_scope and workflow.patched(PER_RULE_WINDOWS_PATCH)
        windows = [config.window_seconds]
        query = WindowQuery(
            end=now, window_seconds=config.window_seconds, keep=self._firing_scopes(),
            per_scope=per_scope,
        )  # fmt: skip
        if per_rule:
            # One scan of the widest window answers every rule's: the narrower ones are bands.
            windows = windows_read(config.rules, config.window_seconds)
            query.window_seconds = windows[-1]
            query.windows = windows[:-1]
            query.latency_windows = latency_windows(config.rules, config.window_seconds)
        aggregates: WindowAggregates = await workflow.execute_activity_method(
            MetricsActivities.window_aggregates,
            query,
            start_to_close_timeout=STORE_QUERY.start_to_close,
            schedule_to_close_timeout=STORE_QUERY.schedule_to_close,
            retry_policy=STORE_QUERY.retry,
            summary=f"signals over the last {', '.join(f'{s}s' for s in windows)}",
        )
        self._one_window_read = False
        if per_rule and (missing := aggregates.lacks(query.windows)):
            # A worker from before per-rule windows answered (a rolling deploy): it read the
            # widest window alone. Every rule reads that one, as a run begun before does, and
            # no finding names a window it was not read over. (Decided on the result alone.)
            workflow.logger.warning(
                "the signals came without the windows %s: every rule reads the %ss window "
                "(a worker from before per-rule windows answered)",
                missing,
                query.window_seconds,
            )
            per_rule, windows = False, [query.window_seconds]
            self._one_window_read = True
        correlate = workflow.patched(CORRELATE_PATCH)
        relations = config.rules.relations if correlate else LEGACY_RELATIONS
        evaluation = evaluate(
            config.rules,
            aggregates,
            self._rule_states,
            config.daily_budget_usd,
            relations,
            hold_for_pending=correlate,
            window_seconds=config.window_seconds if per_rule else None,
        )
        self._rule_states = evaluation.rule_states
        self._evaluations += 1
        self._last_evaluated_at = now
        self._last = evaluation
        self._folded = dict(aggregates.folded)
        self._windows = windows
        await self._report_breaches(evaluation.firing, now, relations if correlate else None)
        await self._report_recoveries(evaluation, now)

    def _firing_scopes(self) -> list[str]:
        """Firing model and feature scopes: kept out of the fold while they fire, so that
        they can recover (a scope without data stays firing)."""
        firing = sorted({key.partition("|")[2] for key, s in self._rule_states.items() if s.firing})
        kept: list[str] = []
        for kind in DIMENSIONS:
            named = [s for s in firing if kind_of(s) == kind and s != folded_scope(kind)]
            kept.extend(named[:KEEP_PER_DIMENSION])
        return kept

    def _open_keys(self) -> set[Key]:
        """Triggers + scopes with an open incident of their own."""
        return {
            key_of(key)
            for key, state in self._triggers.items()
            if state.incident_id and not state.attached
        }

    async def _report_breaches(
        self, findings: list[Finding], now: datetime, relations: tuple[Relation, ...] | None
    ) -> None:
        """`relations`: None for a run begun before open incidents were correlated."""
        firing = [(f.trigger, f.scope) for f in findings]
        routing = Routing() if relations is None else route(relations, firing, self._open_keys())
        requests: list[OpenIncidentRequest] = []
        reopening = workflow.patched(REOPEN_PATCH)
        for finding in findings:
            key = (finding.trigger, finding.scope)
            if key in routing.held:
                continue  # its wider problem opens now: it joins at the next evaluation
            state = self._triggers.get(trigger_key(*key), TriggerState())
            wider = routing.joins.get(key)
            joins = self._triggers[trigger_key(*wider)].incident_id if wider else None
            if joins is None and state.attached:
                state = TriggerState()  # its wider problem is over: a problem of its own
            raised = state.severity is not None and severity_rank(finding.severity) > severity_rank(
                state.severity
            )
            due = state.reported_at is None or now - state.reported_at >= REPORT_INTERVAL
            absorbs = [
                incident_id
                for target in routing.absorbs.get(key, ())
                if (incident_id := self._triggers[trigger_key(*target)].incident_id)
            ]
            own = None if state.attached else state.incident_id
            if state.incident_id != (joins or own) or raised or due or absorbs:
                breach = Breach(
                    trigger=finding.trigger,
                    scope=finding.scope,
                    severity=finding.severity,
                    observed_at=now,
                    summary=finding.summary,
                    metrics=finding.metrics,
                    runbook_url=finding.runbook_url,
                )
                proposed = proposed_incident_id(finding, now)
                request = OpenIncidentRequest(breach, proposed, own, joins, absorbs)
                if reopening:
                    # Also for the incident on record: it may be resolved, its close not heard yet.
                    request.cooldown_seconds = finding.cooldown_seconds
                    if own is None:
                        request.reopen = _reopenable(state, finding, now)
                requests.append(request)
        if not requests:
            return
        results: list[OpenIncidentResult] = await workflow.execute_activity_method(
            IncidentActivities.open_or_update,
            requests,
            start_to_close_timeout=OPEN_INCIDENT.start_to_close,
            schedule_to_close_timeout=OPEN_INCIDENT.schedule_to_close,
            retry_policy=OPEN_INCIDENT.retry,
            summary=", ".join(f"{r.breach.trigger} on {r.breach.scope}" for r in requests),
        )
        for request, result in zip(requests, results, strict=True):
            reported = trigger_key(request.breach.trigger, request.breach.scope)
            incident_id = result.incident_id
            if incident_id is not None and result.episode <= self._closed.get(incident_id, -1):
                incident_id = None  # that episode closed while this was asked
            if result.reopen_pending:
                # The resolved run is still finishing (its report): the next evaluation
                # reopens it, while the cooldown lasts.
                continue
            # Without an incident now, the one it closed last may still be reopened.
            before = self._triggers.get(reported, TriggerState())
            self._triggers[reported] = TriggerState(
                incident_id=incident_id,
                reported_at=now if incident_id else None,
                severity=str(request.breach.severity) if incident_id else None,
                silenced_by=result.silenced_by,
                attached=result.joined and incident_id is not None,
                episode=result.episode if incident_id else 0,
                closed_id=None if incident_id else before.closed_id,
                closed_at=None if incident_id else before.closed_at,
            )
            if incident_id is None:
                continue
            for other, state in list(self._triggers.items()):
                if state.incident_id in result.merged:  # now part of this incident
                    self._triggers[other] = replace(state, incident_id=incident_id, attached=True)

    async def _report_recoveries(self, evaluation: Evaluation, now: datetime) -> None:
        reports = []
        for trigger, scope in evaluation.recovered:
            state = self._triggers.get(trigger_key(trigger, scope))
            # A wider problem's incident recovers with its own trigger, not with this one.
            if state is not None and state.incident_id is not None and not state.attached:
                summary = f"{trigger} on {scope} back within thresholds"
                reports.append(
                    RecoveryReport(state.incident_id, Recovery(trigger, scope, now, summary))
                )
        if not reports:
            return
        await workflow.execute_activity_method(
            IncidentActivities.report_recovery,
            reports,
            start_to_close_timeout=OPEN_INCIDENT.start_to_close,
            schedule_to_close_timeout=OPEN_INCIDENT.schedule_to_close,
            retry_policy=OPEN_INCIDENT.retry,
            summary="report recoveries",
        )

    def _describe(self) -> None:
        config = self._config
        windows = ", ".join(span(seconds) for seconds in self._windows)
        lines = [
            f"**detector** every {config.interval_seconds}s over {windows}"
            f"{' (paused)' if self._paused else ''}, {self._evaluations} evaluations this run",
            "",
        ]
        last = self._last
        if last is not None:
            for finding in last.firing:
                state = self._triggers.get(trigger_key(finding.trigger, finding.scope))
                where = state.incident_id if state and state.incident_id else "no incident"
                if state and state.silenced_by:
                    where = f"silenced by #{state.silenced_by}"
                elif state and state.attached:
                    where = f"part of {where}"
                lines.append(
                    f"- firing `{finding.trigger}` on `{finding.scope}` ({finding.severity}): "
                    f"{finding.summary} → {where}"
                )
            for key in last.inhibited:
                lines.append(f"- inhibited `{key}`")
            pending = [k for k, v in last.verdicts.items() if v in ("pending", "recovering")]
            for key in pending:
                lines.append(f"- {last.verdicts[key]} `{key}`")
            if not last.firing and not pending:
                lines.append("- all quiet")
        if self._one_window_read:
            lines.append(
                f"- every rule read over {span(self._windows[-1])}: the worker that read the "
                "signals predates per-rule windows"
            )
        for kind, info in sorted(self._folded.items()):
            lines.append(f"- {folded_line(kind, info)}")
        workflow.set_current_details("\n".join(lines))
