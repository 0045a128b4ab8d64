"""`pagerloop costs`: the cost report, read straight from the stores (as `GET /v1/costs` is):
total, today's budget and runway, and the top groups of a period against the one before."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from api.costs import read_report, report_out
from cli.stores import open_stores
from config import load_settings
from domain.runway import describe
from stores.cost_report import (
    BY_VALUES,
    DEFAULT_SINCE,
    DEFAULT_TOP,
    MAX_TOP,
    CostReport,
    PeriodError,
    parse_since,
)

# A command of its own (`pagerloop costs --by team`), registered as a group by cli.main:
# no subcommands, so none in its usage line either.
app = typer.Typer(
    help="What the LLM traffic cost, by group, against the budget.", subcommand_metavar=""
)
out = Console()
err = Console(stderr=True)


def usd(value: float) -> str:
    """Dollars with the precision the amount needs: $1,234.56, $0.0123, $0.000456."""
    if value == 0:
        return "$0"
    if abs(value) >= 1:
        return f"${value:,.2f}"
    if abs(value) >= 0.01:
        return f"${value:.4f}"
    return f"${value:.6f}"


def percent(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio * 100:.1f} %"


def percents(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} %"


def change_text(current: float, ratio: float | None) -> str:
    """+12 %, -100 %; "x140" from ten times as much on; "new" after nothing."""
    if ratio is None:
        return "new" if current > 0 else "-"
    if ratio >= 9:
        return f"x{ratio + 1:,.0f}"
    return f"{ratio * 100:+.0f} %"


def _span(seconds: float) -> str:
    minutes = round(seconds / 60)
    if minutes % (24 * 60) == 0:
        return f"{minutes // (24 * 60)} d"
    if minutes % 60 == 0:
        return f"{minutes // 60} h"
    return f"{minutes} min"


def runway_text(report: CostReport) -> str:
    """When today's budget runs out at the recent burn, counting the reset at midnight UTC."""
    runway, now = report.runway, report.now
    to_reset = describe((runway.resets_at - now).total_seconds())
    if runway.limit <= 0 or runway.spent >= runway.limit:
        return f"used up; the budget starts again at 00:00 UTC (in {to_reset})"
    if runway.burn_per_hour <= 0:
        burn_since = now - timedelta(seconds=report.burn_window_seconds)
        return f"not in sight (nothing spent since {burn_since:%H:%M} UTC)"
    at = runway.exhausted_at(now)
    if at is not None and runway.before_reset:
        return f"runs out in {describe(runway.seconds_left)} at {at:%H:%M} UTC"
    if at is not None:
        return (
            f"resets first (00:00 UTC, in {to_reset}); tomorrow's budget runs out in "
            f"{describe(runway.seconds_left)}, at {at:%m-%d %H:%M} UTC"
        )
    return (
        f"resets first (00:00 UTC, in {to_reset}): {usd(runway.projected_at_reset)} "
        f"of {usd(runway.limit)} spent by then at this rate"
    )


def _header(report: CostReport, since: str) -> Panel:
    totals, previous = report.totals, report.previous_totals
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    per_call = totals.avg_cost_per_call
    per_1k = totals.cost_per_1k_calls
    grid.add_row(
        "total",
        f"{usd(totals.cost_usd)} over {totals.calls:,} calls"
        + ("" if per_call is None else f" · {usd(per_call)} a call · {usd(per_1k or 0)} per 1k"),
    )
    grid.add_row(
        "before",
        f"{usd(previous.cost_usd)} over {previous.calls:,} calls in the "
        f"{_span(report.period.span.total_seconds())} before "
        f"({change_text(totals.cost_usd, report.change)})",
    )
    grid.add_row(
        "today",
        f"{usd(report.spent_today_usd)} of the {usd(report.daily_budget_usd)} daily budget "
        f"({percents(report.percent_used_today)} used) · "
        f"{usd(report.remaining_today_usd)} remaining",
    )
    burn_since = report.now - timedelta(seconds=report.burn_window_seconds)
    grid.add_row(
        "burn",
        f"{usd(report.burn_usd_per_hour)}/h since {burn_since:%H:%M} UTC "
        "(the detector's burn window)",
    )
    grid.add_row("runway", runway_text(report))
    grid.add_row(
        "period",
        f"{usd(report.period_budget_usd)} budget for "
        f"{_span(report.period.span.total_seconds())} ({usd(report.daily_budget_usd)} a day) · "
        f"{percents(report.period_percent_used)} used",
    )
    if totals.unpriced_calls:
        grid.add_row(
            "unpriced",
            f"{totals.unpriced_calls:,} calls of models without a price are not in the totals",
        )
    start, end = report.period.start, report.period.end
    title = f"costs by {report.by} · since {since} · {start:%m-%d %H:%M} → {end:%m-%d %H:%M} UTC"
    return Panel(grid, title=title, title_align="left", expand=False)


def _groups(report: CostReport) -> Table:
    table = Table(
        report.by,
        "cost",
        "share",
        "calls",
        "per call",
        "before",
        "change",
        title=f"top {len(report.groups)} of {report.groups_seen} by cost",
        title_justify="left",
    )
    for column in table.columns[1:]:
        column.justify = "right"
    for group in report.groups:
        avg = group.avg_cost_per_call
        table.add_row(
            group.label,
            usd(group.cost_usd),
            percent(report.share(group.cost_usd)),
            f"{group.calls:,}",
            "-" if avg is None else usd(avg),
            usd(group.previous_cost_usd),
            change_text(group.cost_usd, group.change),
        )
    rest = report.rest
    if rest.groups:
        table.add_row(
            f"({rest.groups:,} more)",
            usd(rest.cost_usd),
            percent(report.share(rest.cost_usd)),
            f"{rest.calls:,}",
            "",
            "",
            "",
            style="dim",
        )
    return table


def _quotas(report: CostReport) -> Table:
    table = Table(
        "model",
        "quota tpm",
        "now tpm",
        "used",
        "before tpm",
        "reaches the quota",
        title="token quotas (tokens per minute: the tpm_runway rule's window against the widest)",
        title_justify="left",
    )
    for column in table.columns[1:]:
        column.justify = "right"
    for quota in report.token_quotas:
        runway = quota.runway_seconds
        table.add_row(
            "all models" if quota.model == "*" else quota.model,
            f"{quota.quota_tpm:,.0f}",
            f"{quota.recent_tpm:,.0f}",
            percent(quota.used_ratio),
            f"{quota.earlier_tpm:,.0f}",
            "over it now" if runway == 0 else describe(runway),
        )
    return table


def render(report: CostReport, since: str) -> Group:
    parts: list[Panel | Table | Text] = [_header(report, since)]
    parts.append(_groups(report) if report.groups else Text("no calls in the period"))
    if report.token_quotas:
        parts.append(_quotas(report))
    return Group(*parts)


@app.callback(invoke_without_command=True)
def costs(
    by: Annotated[str, typer.Option(help=f"group by one of: {', '.join(BY_VALUES)}")] = "feature",
    since: Annotated[
        str,
        typer.Option(
            help="30m, 24h, 7d, 2w back from now, or an RFC 3339 time; at most 31 days "
            "(7 for --by user)"
        ),
    ] = DEFAULT_SINCE,
    top: Annotated[int, typer.Option(min=1, max=MAX_TOP, help="groups listed")] = DEFAULT_TOP,
    as_json: Annotated[
        bool, typer.Option("--json", help="the JSON of GET /v1/costs instead of tables")
    ] = False,
) -> None:
    """Total, today's budget, remaining and runway, and the top groups of the period with
    their share and their change against the period before."""
    if by not in BY_VALUES:
        raise typer.BadParameter(f"{by!r}: use one of {', '.join(BY_VALUES)}", param_hint="--by")
    now = datetime.now(UTC)
    try:
        period = parse_since(since, now, by)
    except PeriodError as exc:
        raise typer.BadParameter(str(exc), param_hint="--since") from None
    report, notes = read_report(load_settings(), open_stores(), by, period, top, now)
    if as_json:
        typer.echo(report_out(report, notes).model_dump_json(indent=2))
        return
    out.print(render(report, since))
    for note in notes:
        err.print(f"[yellow]{note}[/yellow]")
