"""GET /v1/costs: the cost report (operator key).

`since` is a duration back from now (`30m`, `24h`, `7d`, `2w`) or an RFC 3339 time with its
offset (domain.periods, as `GET /v1/calls` reads it; whole minutes here); the period is whole
minutes ending with the current one, at most 31 days (7 for `by=user`, which scans the call log
instead of the rollups: stores.cost_report). `by` is one of feature, team, model, user,
environment; `top` 1..100 groups. Anything else is a 422 naming the parameter.
`pagerloop costs --json` prints the same document.

Money is in US dollars, rounded to the micro-dollar (averages per call to the nano-dollar,
per 1k calls to the micro-dollar); `share` and `change` are fractions
(0.25: a quarter, +25 %), `percent_used` percents. `budget_usd`, `remaining_usd`,
`percent_used` and the runway are about today (UTC), the budget that can still run out;
`period_budget_usd` is the daily budget times the period's length in days.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from sqlalchemy import Engine

from api.auth import Operator
from api.deps import Services, services
from api.errors import OPERATOR_ERRORS
from config import Settings
from detectors.config import DetectorRules, RulesFileError, load_rules
from detectors.evaluation import rule_window, windows_read
from stores.cost_report import (
    DEFAULT_SINCE,
    DEFAULT_TOP,
    MAX_TOP,
    By,
    CostReport,
    Group,
    Period,
    PeriodError,
    TokenQuota,
    cost_report,
    parse_since,
)

log = logging.getLogger(__name__)
router = APIRouter(responses=OPERATOR_ERRORS)
SINCE_MAX_LENGTH = 64


def _money(value: float) -> float:
    return round(value, 6)


def _ratio(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def _per_call(value: float | None) -> float | None:
    """A call's cost may be a few millionths of a dollar: kept to the nano-dollar."""
    return None if value is None else round(value, 9)


class PeriodOut(BaseModel):
    since: datetime
    until: datetime  # exclusive: the end of the current minute
    seconds: float


class GroupOut(BaseModel):
    """One group of the period. `key` is "(none)" for calls without the dimension (then
    `missing` is true); `change` is against the previous period, null when it had no cost."""

    key: str
    missing: bool
    cost_usd: float
    calls: int
    share: float | None
    avg_cost_per_call: float | None
    previous_cost_usd: float
    previous_calls: int
    change: float | None


class OtherOut(BaseModel):
    """The groups beyond the top ones, together."""

    groups: int
    cost_usd: float
    calls: int
    share: float | None


class PreviousOut(BaseModel):
    since: datetime
    until: datetime
    total_usd: float
    calls: int
    avg_cost_per_call: float | None


class TokenQuotaOut(BaseModel):
    """A `tpm_quota` of the rules file ("*": all models): tokens per minute over the
    `tpm_runway` rule's window (`recent_tpm`) against the detector's widest (`earlier_tpm`), and
    when that trend reaches the quota (null: not in sight; 0: over it now), as the rule sees it."""

    model: str
    quota_tpm: float
    recent_tpm: float
    earlier_tpm: float
    percent_used: float | None
    runway_seconds: float | None


class CostReportOut(BaseModel):
    by: str
    generated_at: datetime
    period: PeriodOut
    total_usd: float
    calls: int
    avg_cost_per_call: float | None
    cost_per_1k_calls: float | None
    input_tokens: int
    output_tokens: int
    unpriced_calls: int
    previous: PreviousOut
    change: float | None
    budget_usd: float
    spent_today_usd: float
    remaining_usd: float
    percent_used: float | None
    period_budget_usd: float
    period_percent_used: float | None
    burn_usd_per_hour: float
    burn_window_seconds: float
    runway_seconds: float | None
    runs_out_at: datetime | None
    runs_out_before_reset: bool
    budget_resets_at: datetime
    groups: list[GroupOut]
    groups_seen: int
    other: OtherOut
    token_quotas: list[TokenQuotaOut]
    notes: list[str]


def _group(report: CostReport, group: Group) -> GroupOut:
    return GroupOut(
        key=group.label,
        missing=group.key is None,
        cost_usd=_money(group.cost_usd),
        calls=group.calls,
        share=_ratio(report.share(group.cost_usd)),
        avg_cost_per_call=_per_call(group.avg_cost_per_call),
        previous_cost_usd=_money(group.previous_cost_usd),
        previous_calls=group.previous_calls,
        change=_ratio(group.change),
    )


def _quota(quota: TokenQuota) -> TokenQuotaOut:
    used = quota.used_ratio
    return TokenQuotaOut(
        model=quota.model,
        quota_tpm=quota.quota_tpm,
        recent_tpm=round(quota.recent_tpm, 3),
        earlier_tpm=round(quota.earlier_tpm, 3),
        percent_used=None if used is None else round(used * 100, 3),
        runway_seconds=None if quota.runway_seconds is None else round(quota.runway_seconds, 1),
    )


def report_out(report: CostReport, notes: list[str] | None = None) -> CostReportOut:
    """The report as `GET /v1/costs` answers it (and `pagerloop costs --json` prints it)."""
    totals, previous, runway = report.totals, report.previous_totals, report.runway
    seconds = runway.seconds_left
    percent = report.percent_used_today
    period_percent = report.period_percent_used
    return CostReportOut(
        by=report.by,
        generated_at=report.now,
        period=PeriodOut(
            since=report.period.start,
            until=report.period.end,
            seconds=report.period.span.total_seconds(),
        ),
        total_usd=_money(totals.cost_usd),
        calls=totals.calls,
        avg_cost_per_call=_per_call(totals.avg_cost_per_call),
        cost_per_1k_calls=_ratio(totals.cost_per_1k_calls),
        input_tokens=totals.input_tokens,
        output_tokens=totals.output_tokens,
        unpriced_calls=totals.unpriced_calls,
        previous=PreviousOut(
            since=report.period.previous.start,
            until=report.period.previous.end,
            total_usd=_money(previous.cost_usd),
            calls=previous.calls,
            avg_cost_per_call=_per_call(previous.avg_cost_per_call),
        ),
        change=_ratio(report.change),
        budget_usd=_money(report.daily_budget_usd),
        spent_today_usd=_money(report.spent_today_usd),
        remaining_usd=_money(report.remaining_today_usd),
        percent_used=None if percent is None else round(percent, 3),
        period_budget_usd=_money(report.period_budget_usd),
        period_percent_used=None if period_percent is None else round(period_percent, 3),
        burn_usd_per_hour=_money(report.burn_usd_per_hour),
        burn_window_seconds=report.burn_window_seconds,
        runway_seconds=None if seconds is None else round(seconds, 1),
        runs_out_at=runway.exhausted_at(report.now),
        runs_out_before_reset=seconds is not None and runway.before_reset,
        budget_resets_at=runway.resets_at,
        groups=[_group(report, group) for group in report.groups],
        groups_seen=report.groups_seen,
        other=OtherOut(
            groups=report.rest.groups,
            cost_usd=_money(report.rest.cost_usd),
            calls=report.rest.calls,
            share=_ratio(report.share(report.rest.cost_usd)),
        ),
        token_quotas=[_quota(quota) for quota in report.token_quotas],
        notes=notes or [],
    )


BURN_SIGNAL = "budget_runway_hours"
TPM_SIGNAL = "tpm_runway_minutes"


def signal_window(rules: DetectorRules, signal: str, detector_window: int) -> int:
    """The seconds `signal` is read over, as the detector reads it and /metrics shows it: the
    narrowest window of the enabled rules reading it (a rule's `window_seconds`, else the
    detector's), the detector's (`PAGERLOOP_DETECTOR_WINDOW_SECONDS`) when no enabled rule
    reads it. (`api.signals_export.signal_windows(...).get(signal, detector_window)` is the
    same choice, for every signal at once.)"""
    found = [
        rule_window(rule, detector_window)
        for rule in rules.rules
        if rule.enabled and rule.signal == signal
    ]
    return min(found, default=detector_window)


def read_by_rule(rules: DetectorRules, signal: str) -> bool:
    """Whether an enabled rule reads `signal` (else it is read over the detector's window)."""
    return any(rule.enabled and rule.signal == signal for rule in rules.rules)


@dataclass(frozen=True)
class RunwayWindows:
    """The windows the report's burn and token trends are read over, as the detector reads
    them: the budget's burn over `budget_runway`'s, the tokens per minute over `tpm_runway`'s
    against the widest window the enabled rules read."""

    burn_seconds: int
    tpm_seconds: int
    tpm_widest_seconds: int


def runway_windows(rules: DetectorRules, detector_window: int) -> RunwayWindows:
    return RunwayWindows(
        burn_seconds=signal_window(rules, BURN_SIGNAL, detector_window),
        tpm_seconds=signal_window(rules, TPM_SIGNAL, detector_window),
        tpm_widest_seconds=windows_read(rules, detector_window)[-1],
    )


def read_report(
    settings: Settings, engine: Engine, by: str, period: Period, top: int, now: datetime
) -> tuple[CostReport, list[str]]:
    """The report, its burn and token trends read over the windows the detector reads them
    (`runway_windows`: so the report, the rules and /metrics agree); a rules file that cannot
    be read leaves the quotas out, with a note (the worker refuses to start on it anyway).
    Blocking."""
    detector_window = settings.detector_window_seconds
    notes: list[str] = []
    try:
        rules = load_rules(settings.rules_file)
    except RulesFileError as exc:
        log.warning("cost report without token quotas: %s", exc)
        rules = DetectorRules(tpm_quota={})
        notes.append("token quotas left out: PAGERLOOP_RULES_FILE cannot be read")
    windows = runway_windows(rules, detector_window)
    if not read_by_rule(rules, BURN_SIGNAL):
        notes.append(
            "budget_runway is disabled: the burn is read over the detector's window "
            f"(PAGERLOOP_DETECTOR_WINDOW_SECONDS, {detector_window} s)"
        )
    if rules.tpm_quota and not read_by_rule(rules, TPM_SIGNAL):
        notes.append(
            "tpm_runway is disabled: tokens per minute are read over the detector's window "
            f"(PAGERLOOP_DETECTOR_WINDOW_SECONDS, {detector_window} s)"
        )
    report = cost_report(
        engine,
        now=now,
        period=period,
        by=by,
        top=top,
        daily_budget_usd=settings.daily_budget_usd,
        burn_window_seconds=windows.burn_seconds,
        tpm_quota={k: float(v) for k, v in rules.tpm_quota.items()},
        tpm_windows=(windows.tpm_seconds, windows.tpm_widest_seconds),
    )
    return report, notes


def build_report(
    settings: Settings, engine: Engine, by: str, period: Period, top: int, now: datetime
) -> CostReportOut:
    """Read the stores and shape the answer (blocking: run it in a thread)."""
    return report_out(*read_report(settings, engine, by, period, top, now))


@router.get("/v1/costs")
async def get_costs(
    _: Operator,
    svc: Annotated[Services, Depends(services)],
    by: Annotated[By, Query(description="the dimension the groups are made of")] = "feature",
    since: Annotated[
        str,
        Query(
            min_length=1,
            max_length=SINCE_MAX_LENGTH,
            description="30m, 24h, 7d, 2w back from now, or an RFC 3339 time; "
            "at most 31 days (7 for by=user)",
        ),
    ] = DEFAULT_SINCE,
    top: Annotated[int, Query(ge=1, le=MAX_TOP, description="groups listed")] = DEFAULT_TOP,
) -> CostReportOut:
    """Total, budget, remaining, runway and the top groups of a period, against the one
    before it."""
    now = datetime.now(UTC)
    try:
        period = parse_since(since, now, by)
    except PeriodError as exc:
        raise RequestValidationError(
            [{"loc": ("query", "since"), "msg": str(exc), "type": "value_error"}]
        ) from None
    return await asyncio.to_thread(build_report, svc.settings, svc.engine, by, period, top, now)
