"""What `pagerloop simulate` shows: the live view while it runs (`render`) and the summary at
the end (`summary`), both drawn from its `Progress`."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from cli.scenarios import FEATURE_PRIORITIES
from cli.simulate_progress import RECENT_SECONDS, STATUSES, Progress, percentile

STYLES = {
    "success": "green",
    "cached": "cyan",
    "rate_limited": "yellow",
    "server_error": "red",
    "error": "red",
    "disabled": "magenta",
}


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes:02d}:{secs:02d}"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.0f} ms"


def _status_table(progress: Progress) -> Table:
    table = Table(title="calls by status", title_justify="left", expand=False)
    for status in STATUSES:
        table.add_column(status, justify="right", style=STYLES[status])
    total = progress.total or 1
    table.add_row(
        *(
            f"{progress.counts[s]:,} ({progress.counts[s] / total:.0%})"
            if progress.counts[s]
            else "0"
            for s in STATUSES
        )
    )
    return table


def _models_table(progress: Progress, recent: bool = True) -> Table:
    """Requests sent per model (after any reroute or pin), and answers per model they came
    back as (a snapshot, or a cached answer)."""
    table = Table(title="models", title_justify="left")
    table.add_column("model")
    if recent:
        table.add_column(f"requests, last {RECENT_SECONDS:.0f} s", justify="right")
    table.add_column("requests", justify="right")
    table.add_column("answered as", justify="right")
    last = progress.recent_models()
    for model in sorted(set(progress.sent) | set(progress.served)):
        counts = [progress.sent[model], progress.served[model]]
        if recent:
            counts.insert(0, last[model])
        table.add_row(model, *(f"{count:,}" for count in counts))
    return table


def _lines(title: str, lines: list[str] | None, note: str) -> Text:
    text = Text.from_markup(f"[bold]{title}[/bold]: ")
    if lines:
        text.append_text(Text.from_markup("\n  " + "\n  ".join(lines)))
    else:
        text.append(note, style="dim")
    return text


def render(progress: Progress) -> RenderableType:
    setup = progress.setup
    header = Text.from_markup(
        f"[bold]pagerloop simulate {setup.scenario}[/bold]  "
        f"{_clock(progress.elapsed())} / {_clock(progress.duration)}  phase: "
        f"[{'red' if progress.phase == 'fault' else 'green'}]{progress.phase}[/]\n"
        f"[dim]fault:[/dim] {setup.fault}\n[dim]runbook:[/dim] {setup.mitigation}"
        + (f"\n[yellow]{setup.hint}[/yellow]" if setup.hint else "")
    )
    p95 = Text.from_markup(
        f"[bold]p95 latency, last {RECENT_SECONDS:.0f} s[/bold]: {_ms(progress.recent_p95())}"
        f"   [bold]calls[/bold]: {progress.total:,}"
        f" ({progress.total / max(progress.elapsed(), 1e-3):.1f}/s)"
    )
    parts: list[RenderableType] = [
        header,
        _status_table(progress),
        p95,
        _models_table(progress),
        _lines("active controls", progress.controls, progress.controls_note),
        _lines("open incidents", progress.incidents, progress.incidents_note),
    ]
    parts += [Text(note, style="yellow") for note in progress.notes[-3:]]
    return Group(*parts)


def summary(progress: Progress) -> RenderableType:
    setup = progress.setup
    how = "interrupted" if progress.interrupted else "done"
    lines: list[RenderableType] = [
        Text.from_markup(
            f"[bold]pagerloop simulate {setup.scenario}[/bold]: {how} after "
            f"{_clock(progress.elapsed())}, {progress.total:,} calls, p50 "
            f"{_ms(percentile(progress.latencies, 0.5))}, p95 "
            f"{_ms(percentile(progress.latencies, 0.95))}"
        ),
        _status_table(progress),
        _models_table(progress, recent=False),
        _lines("active controls", progress.controls, progress.controls_note),
        _lines("open incidents", progress.incidents, progress.incidents_note),
        *(Text(note, style="yellow") for note in [*progress.notes, setup.hint] if note),
        Text.from_markup(
            "[dim]next: `uv run pagerloop incidents list`, the Temporal UI, "
            f"and PAGERLOOP_FEATURE_PRIORITIES={FEATURE_PRIORITIES} on the worker[/dim]"
        ),
    ]
    return Group(*lines)
