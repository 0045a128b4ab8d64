"""DetectorWorkflow: evaluates the rules every interval and opens incidents on breaches.

A durable loop rather than a Schedule: the consecutive-breach counts live in workflow state,
so they survive worker restarts without a store of their own, and continue-as-new keeps the
history short. Reconfigure it with the `reconfigure` signal; pause it from the Temporal UI by
suspending nothing more than this one workflow (or `temporal workflow signal`).
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
    )
    from activities.metrics import MetricsActivities
    from detectors.rules import ERROR_RATE_RULE, RuleState, ThresholdRule, Verdict, evaluate
    from detectors.signals import ErrorRateSignal, WindowQuery
    from workflows.incident_types import Breach
    from workflows.policies import OPEN_INCIDENT, STORE_QUERY

GLOBAL_SCOPE = "global"
# Start a fresh run long before the history gets heavy.
EVALUATIONS_PER_RUN = 500
# A firing rule refreshes its open incident's metrics at most this often (like Alertmanager's
# group_interval), so a week-long incident's history stays small.
REPORT_INTERVAL = timedelta(seconds=60)


@dataclass
class DetectorConfig:
    interval_seconds: int
    window_seconds: int


@dataclass
class DetectorInput:
    config: DetectorConfig
    rule_states: dict[str, RuleState] = field(default_factory=dict)
    paused: bool = False


@dataclass
class DetectorStatus:
    config: DetectorConfig
    paused: bool
    evaluations: int
    last_evaluated_at: datetime | None
    rule_states: dict[str, RuleState]
    last_verdicts: dict[str, str]


def rule_key(rule: ThresholdRule, scope: str) -> str:
    return f"{rule.trigger}|{scope}"


def proposed_incident_id(rule: ThresholdRule, scope: str, at: datetime) -> str:
    return f"incident-{rule.trigger}-{scope}-{at:%Y%m%dT%H%M%SZ}"


@workflow.defn
class DetectorWorkflow:
    @workflow.init
    def __init__(self, input: DetectorInput) -> None:
        self._config = input.config
        self._rule_states = dict(input.rule_states)
        self._paused = input.paused
        self._evaluations = 0
        self._last_evaluated_at: datetime | None = None
        self._last_verdicts: dict[str, str] = {}
        self._closed: set[str] = set()
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
            with contextlib.suppress(asyncio.TimeoutError):
                await workflow.wait_condition(
                    lambda: self._wake,
                    timeout=timedelta(seconds=self._config.interval_seconds),
                    timeout_summary="until the next evaluation",
                )
            if workflow.info().is_continue_as_new_suggested():
                break
        await workflow.wait_condition(workflow.all_handlers_finished)
        workflow.continue_as_new(
            DetectorInput(config=self._config, rule_states=self._rule_states, paused=self._paused)
        )

    @workflow.signal
    def reconfigure(self, config: DetectorConfig) -> None:
        self._config = config
        self._wake = True

    @workflow.signal
    def incident_closed(self, incident_id: str) -> None:
        # Also remembered: an evaluation in flight may be about to write this id back.
        self._closed.add(incident_id)
        for key, state in self._rule_states.items():
            if state.incident_id == incident_id:
                self._rule_states[key] = replace(state, incident_id=None, reported_at=None)
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
        return DetectorStatus(
            config=self._config,
            paused=self._paused,
            evaluations=self._evaluations,
            last_evaluated_at=self._last_evaluated_at,
            rule_states=dict(self._rule_states),
            last_verdicts=dict(self._last_verdicts),
        )

    async def _evaluate(self) -> None:
        now = workflow.now()
        signal: ErrorRateSignal = await workflow.execute_activity_method(
            MetricsActivities.error_rate,
            WindowQuery(end=now, window_seconds=self._config.window_seconds),
            start_to_close_timeout=STORE_QUERY.start_to_close,
            schedule_to_close_timeout=STORE_QUERY.schedule_to_close,
            retry_policy=STORE_QUERY.retry,
            summary="error rate over the window",
        )
        self._evaluations += 1
        self._last_evaluated_at = now
        await self._apply(ERROR_RATE_RULE, GLOBAL_SCOPE, signal.rate, signal.total, now, signal)

    async def _apply(
        self,
        rule: ThresholdRule,
        scope: str,
        value: float,
        samples: int,
        now: datetime,
        signal: ErrorRateSignal,
    ) -> None:
        key = rule_key(rule, scope)
        state, verdict = evaluate(rule, self._rule_states.get(key, RuleState()), value, samples)
        self._last_verdicts[key] = str(verdict)
        due = state.reported_at is None or now - state.reported_at >= REPORT_INTERVAL
        if verdict == Verdict.FIRING and (state.incident_id is None or due):
            state = await self._open_or_update(rule, scope, state, now, value, signal)
            if state.incident_id in self._closed:
                state = replace(state, incident_id=None, reported_at=None)
        self._rule_states[key] = state

    async def _open_or_update(
        self,
        rule: ThresholdRule,
        scope: str,
        state: RuleState,
        now: datetime,
        value: float,
        signal: ErrorRateSignal,
    ) -> RuleState:
        breach = Breach(
            trigger=rule.trigger,
            scope=scope,
            severity=rule.severity,
            observed_at=now,
            summary=(
                f"{rule.signal.replace('_', ' ')} {value:.1%} > {rule.threshold:.0%} "
                f"({signal.errors}/{signal.total} calls in {self._config.window_seconds}s)"
            ),
            metrics={rule.signal: value, "calls": signal.total, "errors": signal.errors},
        )
        if state.incident_id is not None:
            result = await self._open(state.incident_id, breach, join_open_incident=False)
            if result.incident_id is not None:
                return replace(state, incident_id=result.incident_id, reported_at=now)
        # No incident on record, or the one on record is over: a new one opens.
        incident_id = proposed_incident_id(rule, scope, now)
        if incident_id == state.incident_id:
            return replace(state, incident_id=None)  # resolved this very second: next time
        result = await self._open(incident_id, breach, join_open_incident=True)
        return replace(state, incident_id=result.incident_id, reported_at=now)

    async def _open(
        self, incident_id: str, breach: Breach, join_open_incident: bool
    ) -> OpenIncidentResult:
        return await workflow.execute_activity_method(
            IncidentActivities.open_or_update,
            OpenIncidentRequest(incident_id, breach, join_open_incident),
            start_to_close_timeout=OPEN_INCIDENT.start_to_close,
            schedule_to_close_timeout=OPEN_INCIDENT.schedule_to_close,
            retry_policy=OPEN_INCIDENT.retry,
            summary=f"open or update the {breach.trigger} incident on {breach.scope}",
        )

    def _describe(self) -> None:
        lines = [
            f"**detector** every {self._config.interval_seconds}s over "
            f"{self._config.window_seconds}s{' (paused)' if self._paused else ''}",
            "",
        ]
        for key, verdict in sorted(self._last_verdicts.items()):
            state = self._rule_states.get(key, RuleState())
            incident = f" → {state.incident_id}" if state.incident_id else ""
            lines.append(f"- `{key}`: {verdict} ({state.consecutive_breaches} in a row){incident}")
        workflow.set_current_details("\n".join(lines))
