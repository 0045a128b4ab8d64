"""`pagerloop silences ...`: maintenance windows from the command line."""

from __future__ import annotations

import getpass
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cli.stores import open_stores
from config import load_settings
from domain.incident import Trigger
from stores import silence_rules, silences
from stores.silences import Silence

app = typer.Typer(help="Silence triggers and scopes for a while.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)
_DURATION = re.compile(r"^(\d+)([mhd])$")


def parse_duration(text: str) -> timedelta:
    match = _DURATION.match(text.strip())
    if match is None:
        raise typer.BadParameter(f"{text!r}: use minutes, hours or days, like 30m, 2h, 1d")
    amount, unit = int(match.group(1)), match.group(2)
    unit_name = {"m": "minutes", "h": "hours", "d": "days"}[unit]
    if amount > silence_rules.MAX_SILENCE / timedelta(**{unit_name: 1}):
        raise typer.BadParameter(
            f"{text!r}: a silence lasts at most {silence_rules.MAX_SILENCE.days} days",
            param_hint="--for",
        )
    return timedelta(**{unit_name: amount})


@app.command()
def add(
    reason: Annotated[str, typer.Option(help="why (shown on the detector and the list)")],
    trigger: Annotated[
        str | None, typer.Option(help=f"one of {', '.join(t.value for t in Trigger)}")
    ] = None,
    scope: Annotated[
        str | None, typer.Option(help="a scope or a glob: global, model:gpt-4.1, feature:*")
    ] = None,
    duration: Annotated[
        str, typer.Option("--for", help="how long: 30m, 2h, 1d (at most 30d)")
    ] = "1h",
    author: Annotated[str | None, typer.Option(help="default: your login")] = None,
    match_all: Annotated[
        bool, typer.Option("--match-all", help="required to silence every trigger everywhere")
    ] = False,
) -> None:
    """Keep new incidents from opening for a trigger and/or scope."""
    if trigger is not None and trigger not in {t.value for t in Trigger}:
        raise typer.BadParameter(f"unknown trigger {trigger!r}", param_hint="--trigger")
    now = datetime.now(UTC)
    settings = load_settings()
    try:
        silence = silence_rules.create_checked(
            open_stores(),
            Silence(
                trigger=trigger,
                scope=scope,
                starts_at=now,
                ends_at=now + parse_duration(duration),
                author=author or getpass.getuser(),
                reason=reason,
                created_at=now,
            ),
            now,
            settings.max_active_silences,
            match_all,
        )
    except silence_rules.SilenceRefusedError as exc:
        hint = {"ends_at": "--for", "match_all": "--match-all"}.get(exc.field, exc.field)
        raise typer.BadParameter(str(exc), param_hint=hint) from None
    except silence_rules.TooManySilencesError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    out.print(f"silence #{silence.id} until {silence.ends_at:%Y-%m-%d %H:%M} UTC")


@app.command("list")
def list_silences(
    all_: Annotated[bool, typer.Option("--all", help="include expired ones")] = False,
) -> None:
    """Silences in force (or all of them)."""
    now = datetime.now(UTC)
    found = silences.listed(open_stores(), now, include_past=all_)
    table = Table("id", "trigger", "scope", "from", "until", "by", "reason", "active")
    for s in found:
        table.add_row(
            str(s.id),
            s.trigger or "any",
            s.scope or "any",
            f"{s.starts_at:%m-%d %H:%M}",
            f"{s.ends_at:%m-%d %H:%M}",
            s.author,
            s.reason,
            "yes" if s.active_at(now) else "no",
        )
    out.print(table if found else "no silences")


@app.command()
def expire(silence_id: int) -> None:
    """End a silence now."""
    expired = silences.expire(open_stores(), silence_id, datetime.now(UTC))
    if expired is None:
        err.print(f"[red]no silence #{silence_id}[/red]")
        raise typer.Exit(1)
    out.print(f"silence #{silence_id} expired")
