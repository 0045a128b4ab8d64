"""`pagerloop calls ...`: search the call log, and sum it up per group, straight from the stores
(as `GET /v1/calls` and `GET /v1/calls/stats` do; `--json` prints their documents)."""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table
from sqlalchemy import ColumnElement

from api.calls import CallOut, CallsOut, GroupOut, StatsOut, stats_out
from api.waterfall import WaterfallCallOut, WaterfallOut, waterfall_out
from cli.stores import open_stores
from config import load_settings
from domain.waterfall import bar, draw
from stores import call_search
from stores.call_search import (
    CALL_COLUMNS,
    DEFAULT_LIMIT,
    ERROR_STATUSES,
    MAX_GROUPS,
    MAX_LIMIT,
    STATS_BY,
    ParameterError,
    QueryError,
    SearchTimeoutError,
)
from stores.waterfall import TRACE_ID_MAX_LENGTH, trace_calls

app = typer.Typer(
    help="Search the call log, sum it up by group, show a trace's calls.", no_args_is_help=True
)
out = Console()
err = Console(stderr=True)

QueryArgument = Annotated[
    str,
    typer.Argument(
        metavar="QUERY",
        help="Lucene-style: status:error AND model:gpt-4.1, latency_ms:>2000, "
        "feature:chat* ... (empty: every call)",
        show_default=False,
    ),
]
SinceOption = Annotated[
    str | None,
    typer.Option(
        help="from: a duration back (90s, 30m, 1h, 7d) or an RFC 3339 time with its offset; "
        "1h (with --cursor: the first page's)",
        show_default=False,
    ),
]
UntilOption = Annotated[
    str | None,
    typer.Option(
        help="until (excluded): a duration back or an RFC 3339 time; now "
        "(with --cursor: the first page's)",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="print the API's JSON document")]
CsvOption = Annotated[bool, typer.Option("--csv", help="print CSV, a line per row")]


def _utc_now() -> datetime:
    return datetime.now(UTC)


clock: Callable[[], datetime] = _utc_now  # the tests move it
_OPTIONS = {"since": "--since", "until": "--until", "cursor": "--cursor"}


def _bad(exc: ParameterError) -> typer.BadParameter:
    return typer.BadParameter(exc.message, param_hint=_OPTIONS.get(exc.field, exc.field))


def _window(since: str | None, until: str | None) -> tuple[datetime, datetime]:
    try:
        return call_search.time_range(since, until, clock())
    except ParameterError as exc:
        raise _bad(exc) from None


def _where(query: str) -> ColumnElement[bool]:
    salt = load_settings().user_hash_salt.get_secret_value()
    try:
        return call_search.compile_query(query, user_salt=salt)
    except QueryError as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        shown = query.replace("\n", " ").replace("\t", " ")
        if len(shown) <= 200:
            err.print(f"  {escape(shown)}\n  {' ' * exc.position}^", highlight=False)
        raise typer.Exit(2) from None


def _one_format(json_: bool, csv_: bool) -> None:
    if json_ and csv_:
        raise typer.BadParameter("give --json or --csv, not both", param_hint="--csv")


def _wide() -> Console:
    # Piped or captured, each row stays on one line, for grep and scripts.
    return out if out.is_terminal else Console(width=1_000)


def _cost(value: float | None) -> str:
    return "-" if value is None else f"${value:.6f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} ms"


def _tokens(inputs: int | None, outputs: int | None) -> str:
    if inputs is None and outputs is None:
        return "-"
    return f"{inputs if inputs is not None else '-'}/{outputs if outputs is not None else '-'}"


def _status(status: str) -> str:
    return f"[green]{status}[/green]" if status == "success" else f"[red]{status}[/red]"


def _text(value: object) -> str:
    return "-" if value is None else escape(str(value))


def _calls_table(calls: list[dict[str, Any]]) -> Table:
    fold: dict[str, Any] = {"overflow": "fold"}
    table = Table(
        Column("time (UTC)", no_wrap=True),
        Column("model", **fold),
        Column("status", no_wrap=True),
        Column("http", justify="right"),
        Column("latency", justify="right", no_wrap=True),
        Column("tokens in/out", justify="right"),
        Column("cost", justify="right"),
        Column("feature", **fold),
        Column("error_type", **fold),
        Column("request_id", **fold),
    )
    for c in calls:
        table.add_row(
            f"{c['timestamp']:%Y-%m-%d %H:%M:%S}",
            _text(c["model"]),
            _status(c["status"]),
            _text(c["http_status"]),
            _ms(c["latency_ms"]),
            _tokens(c["input_tokens"], c["output_tokens"]),
            _cost(c["cost_usd"]),
            _text(c["feature"]),
            _text(c["error_type"]),
            _text(c["request_id"]),
        )
    return table


def _csv_value(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"))
    return "" if value is None else value


@app.command()
def search(
    query: QueryArgument = "",
    since: SinceOption = None,
    until: UntilOption = None,
    limit: Annotated[
        int, typer.Option(min=1, max=MAX_LIMIT, help=f"calls per page (1-{MAX_LIMIT:,})")
    ] = DEFAULT_LIMIT,
    cursor: Annotated[
        str | None,
        typer.Option(
            help="the next page: the cursor the previous one printed (give the same QUERY)"
        ),
    ] = None,
    json_: JsonOption = False,
    csv_: CsvOption = False,
) -> None:
    """The calls matching QUERY, newest first: `pagerloop calls search 'status:error AND
    model:gpt-4.1' --since 1h`."""
    _one_format(json_, csv_)
    try:
        sweep, after = call_search.sweep_of(query, since, until, cursor, clock())
    except ParameterError as exc:
        raise _bad(exc) from None
    start, end = sweep.since, sweep.until
    where = _where(query)
    try:
        page = call_search.search(
            open_stores(),
            where,
            since=start,
            until=end,
            limit=limit,
            after=None if after is None else after.after,
        )
    except SearchTimeoutError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    following = sweep.next(page)
    if json_:
        document = CallsOut(
            calls=[CallOut.model_validate(c) for c in page.calls],
            next=following,
            since=start,
            until=end,
        )
        sys.stdout.write(document.model_dump_json(indent=2) + "\n")
        return
    if csv_:
        writer = csv.writer(sys.stdout)
        names = ["timestamp" if name == "ts" else name for name in CALL_COLUMNS]
        writer.writerow(names)
        for call in page.calls:
            writer.writerow([_csv_value(call[name]) for name in names])
        if following:
            err.print(f"more: --cursor {following}", highlight=False, soft_wrap=True)
        return
    console = _wide()
    if not page.calls:
        console.print(f"no calls from {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC")
        return
    console.print(_calls_table(page.calls))
    shown = f"{len(page.calls)} call{'s' if len(page.calls) != 1 else ''}, newest first"
    more = f"; more: --cursor {following}" if following else ""
    # soft_wrap: the cursor stays one word, whatever the terminal's width, for copy and paste
    console.print(f"{shown}{more}", highlight=False, soft_wrap=True)


def _pct(value: float) -> str:
    return f"{value:.2f} %"


def _stats_table(found: StatsOut) -> Table:
    table = Table(
        Column(found.by, overflow="fold"),
        Column("calls", justify="right"),
        Column("error %", justify="right"),
        Column("429 %", justify="right"),
        Column("p50", justify="right", no_wrap=True),
        Column("p95", justify="right", no_wrap=True),
        Column("p99", justify="right", no_wrap=True),
        Column("tokens in", justify="right"),
        Column("tokens out", justify="right"),
        Column("cost", justify="right"),
    )
    for g in found.groups:
        table.add_row(
            "(none)" if g.key is None else escape(str(g.key)),
            f"{g.calls:,}",
            _pct(g.error_pct),
            _pct(g.rate_limited_pct),
            _ms(g.latency_p50_ms),
            _ms(g.latency_p95_ms),
            _ms(g.latency_p99_ms),
            f"{g.input_tokens:,}",
            f"{g.output_tokens:,}",
            f"${g.cost_usd:,.4f}",
        )
    return table


@app.command()
def stats(
    query: QueryArgument = "",
    by: Annotated[str, typer.Option(help=f"group by: {', '.join(STATS_BY)}")] = "model",
    since: SinceOption = None,
    until: UntilOption = None,
    json_: JsonOption = False,
    csv_: CsvOption = False,
) -> None:
    """Per group of the calls matching QUERY: calls, error % (statuses error, timeout,
    server_error), 429 %, p50/p95/p99 latency, tokens, cost."""
    _one_format(json_, csv_)
    if by not in STATS_BY:
        raise typer.BadParameter(f"{by!r}: one of {', '.join(STATS_BY)}", param_hint="--by")
    start, end = _window(since, until)
    where = _where(query)
    try:
        found = call_search.stats(open_stores(), where, by=by, since=start, until=end)
    except SearchTimeoutError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    document = stats_out(found, start, end)
    if json_:
        sys.stdout.write(document.model_dump_json(indent=2) + "\n")
        return
    if csv_:
        writer = csv.writer(sys.stdout)
        names = list(GroupOut.model_fields)
        writer.writerow(names)
        for g in document.groups:
            row = g.model_dump()
            writer.writerow(["" if row[n] is None else row[n] for n in names])
        return
    console = _wide()
    if not document.groups:
        console.print(f"no calls from {start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC")
        return
    console.print(_stats_table(document))
    shown = len(document.groups)
    cut = f" (the {MAX_GROUPS} largest shown)" if document.groups_total > shown else ""
    console.print(
        f"{document.calls:,} calls in {document.groups_total:,} groups{cut}; "
        f"error % counts {', '.join(ERROR_STATUSES)}; 429 % counts rate_limited",
        highlight=False,
    )


# --- the request waterfall -----------------------------------------------------------------------

TRACE_WIDTH = 40  # columns of the time axis


def _axis(total_ms: float, width: int) -> str:
    """The bar column's header: the axis from 0 to the trace's duration, `width` wide."""
    end = _ms(total_ms)
    return "0" + end.rjust(width - 1) if width > len(end) + 1 else end.rjust(width)


def _notes(c: WaterfallCallOut) -> str:
    notes = []
    if c.cache_hit:
        notes.append("cache hit")
    if c.retry_count:
        notes.append(f"{c.retry_count} retr{'y' if c.retry_count == 1 else 'ies'}")
    if c.controls:
        notes.append(c.controls)
    if c.error_type:
        notes.append(c.error_type)
    return escape(", ".join(notes)) or "-"


def _waterfall_table(document: WaterfallOut, width: int) -> Table:
    fold: dict[str, Any] = {"overflow": "fold"}
    table = Table(
        Column("start", justify="right", no_wrap=True),
        Column(_axis(document.duration_ms, width), no_wrap=True, min_width=width),
        Column("duration", justify="right", no_wrap=True),
        Column("model", **fold),
        Column("status", no_wrap=True),
        Column("tokens in/out", justify="right"),
        Column("cost", justify="right"),
        Column("feature", **fold),
        Column("notes", **fold),
    )
    for c in document.calls:
        start, columns = bar(c.offset_ms, c.duration_ms, document.duration_ms, width)
        colour = "cyan" if c.cache_hit else "green" if c.status == "success" else "red"
        table.add_row(
            f"+{_ms(c.offset_ms)}",
            f"[{colour}]{draw(start, columns, width)}[/{colour}]",
            _ms(c.duration_ms),
            _text(c.model),
            _status(c.status),
            _tokens(c.input_tokens, c.output_tokens),
            _cost(c.cost_usd),
            _text(c.feature),
            _notes(c),
        )
    return table


def _trace_id(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = "\x00"  # refused below, as the API refuses it
    if not 1 <= len(value) <= TRACE_ID_MAX_LENGTH or "\x00" in value:
        raise typer.BadParameter(
            f"1 to {TRACE_ID_MAX_LENGTH} characters, without NUL", param_hint="TRACE_ID"
        )
    return value


@app.command()
def trace(
    trace_id: Annotated[
        str,
        typer.Argument(
            metavar="TRACE_ID",
            help="the trace id the calls carry (OpenTelemetry's: 32 hex digits)",
            show_default=False,
        ),
    ],
    width: Annotated[int, typer.Option(min=10, max=400, help="columns of the time axis")] = (
        TRACE_WIDTH
    ),
    json_: JsonOption = False,
) -> None:
    """Every call of one trace on a time axis (the request waterfall): offset from the first
    call, a bar for when it ran, duration, model, status, tokens, cost (as `GET
    /v1/waterfall/TRACE_ID`; `--json` prints its document)."""
    trace_id = _trace_id(trace_id)
    try:
        found = trace_calls(open_stores(), trace_id)
    except SearchTimeoutError:
        err.print("[red]reading the trace's calls took too long: retry later[/red]")
        raise typer.Exit(1) from None
    if not found.calls:
        err.print(f"no call in the call log carries trace id {escape(trace_id)}", highlight=False)
        raise typer.Exit(1)
    document = waterfall_out(found)
    if json_:
        sys.stdout.write(document.model_dump_json(indent=2) + "\n")
        return
    console = _wide()
    count = len(document.calls)
    console.print(
        f"trace {escape(document.trace_id)}: {count} call{'s' if count != 1 else ''} "
        f"in {_ms(document.duration_ms)} from {document.started_at:%Y-%m-%d %H:%M:%S} UTC, "
        f"{document.input_tokens:,}/{document.output_tokens:,} tokens, "
        f"${document.cost_usd:.6f}",
        highlight=False,
    )
    console.print(_waterfall_table(document, width))
    if document.truncated:
        console.print(
            f"the first {count:,} calls by start; more carry this trace id", highlight=False
        )
