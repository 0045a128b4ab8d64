"""`pagerloop controls ...`: the runbook controls in force, and taking one out by hand."""

from __future__ import annotations

import getpass
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Column, Table
from sqlalchemy import Engine

from config import load_settings
from stores import controls
from stores.controls import Control
from stores.engine import create_schema, make_engine

app = typer.Typer(help="Runbook controls: list them, revert one.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)


def _engine() -> Engine:
    engine = make_engine(load_settings().database_url)
    create_schema(engine)
    return engine


def _until(control: Control, now: datetime) -> str:
    if control.reverted_at is not None:
        return f"reverted {control.reverted_at:%m-%d %H:%M} by {control.reverted_by}"
    if not control.active_at(now):
        return f"expired {control.expires_at:%m-%d %H:%M}"
    return f"until {control.expires_at:%m-%d %H:%M}"


@app.command("list")
def list_controls(
    all_: Annotated[bool, typer.Option("--all", help="include reverted and expired ones")] = False,
) -> None:
    """Controls in force (or every control ever set, newest first)."""
    now = datetime.now(UTC)
    found = controls.listed(_engine(), now, include_past=all_)
    # Narrow terminals fold long ids rather than cut them: they are what people copy.
    fold: dict[str, Any] = {"overflow": "fold"}
    table = Table(
        Column("id", no_wrap=True),
        Column("kind", no_wrap=True, min_width=len("concurrency")),
        Column("target", **fold),
        Column("value", **fold),
        Column("incident", **fold),
        Column("reason"),
        Column("set by", **fold),
        Column("expires / reverted"),
    )
    for c in found:
        table.add_row(
            str(c.id),
            c.kind,
            c.target,
            c.value,
            c.incident_id,
            c.reason,
            c.set_by,
            _until(c, now),
        )
    # Piped or captured, each control stays on one line, for grep and scripts.
    console = out if out.is_terminal else Console(width=1_000)
    console.print(table if found else "no controls" if all_ else "no controls in force")


@app.command()
def revert(
    control_id: Annotated[int, typer.Argument(help="the id `pagerloop controls list` shows")],
    reason: Annotated[str, typer.Option(help="why, for the record")] = "",
    user: Annotated[str | None, typer.Option(help="who is acting (default: your login)")] = None,
) -> None:
    """Take one control out of force now (the runbook's incident keeps running)."""
    now = datetime.now(UTC)
    by = user or getpass.getuser()
    found = controls.revert_id(_engine(), control_id, now, reverted_by=by, reason=reason)
    if found is None:
        err.print(f"[red]no control #{control_id}[/red]")
        raise typer.Exit(1)
    control, reverted = found
    if reverted:
        out.print(f"reverted #{control_id}: {control.description}")
    else:
        out.print(f"control #{control_id} was not in force ({_until(control, now)})")
