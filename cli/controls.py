"""`pagerloop controls ...`: the controls in force (runbook and manual ones), setting one by
hand and taking one out."""

from __future__ import annotations

import asyncio
import getpass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Column, Table

import worker
from api.controls import (
    MAX_CONTROL_MINUTES,
    ControlIn,
    IncidentRefusedError,
    key_problem,
    set_by_hand,
    target_problem,
)
from cli.silences import parse_duration
from cli.stores import open_stores
from config import load_settings
from stores import controls
from stores.controls import Control
from stores.llm_calls import utc

app = typer.Typer(
    help="Runbook and manual controls: list them, set one by hand, revert one.",
    no_args_is_help=True,
)
out = Console()
err = Console(stderr=True)


def _until(control: Control, now: datetime) -> str:
    if control.reverted_at is not None:
        return f"reverted {control.reverted_at:%m-%d %H:%M} by {control.reverted_by}"
    if not control.active_at(now):
        return f"expired {control.expires_at:%m-%d %H:%M}"
    return f"until {control.expires_at:%m-%d %H:%M}"


def _incident(control: Control) -> str:
    if control.manual and control.incident_id != controls.MANUAL:
        return f"{control.incident_id} (manual)"
    return control.incident_id


def _traffic(control: Control) -> str:
    return "all" if control.fraction is None else f"{controls.percent(control.fraction)} canary"


@app.command("list")
def list_controls(
    all_: Annotated[bool, typer.Option("--all", help="include reverted and expired ones")] = False,
) -> None:
    """Controls in force (or every control ever set, newest first)."""
    now = datetime.now(UTC)
    found = controls.listed(open_stores(), now, include_past=all_)
    # Narrow terminals fold long ids rather than cut them: they are what people copy.
    fold: dict[str, Any] = {"overflow": "fold"}
    table = Table(
        Column("id", no_wrap=True),
        Column("kind", no_wrap=True, min_width=len("concurrency")),
        Column("target", **fold),
        Column("value", **fold),
        Column("traffic", no_wrap=True),
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
            _traffic(c),
            _incident(c),
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
    found = controls.revert_id(open_stores(), control_id, now, reverted_by=by, reason=reason)
    if found is None:
        err.print(f"[red]no control #{control_id}[/red]")
        raise typer.Exit(1)
    control, reverted = found
    if reverted:
        out.print(f"reverted #{control_id}: {control.description}")
    else:
        out.print(f"control #{control_id} was not in force ({_until(control, now)})")


# CLI options of the body's fields, for the errors that name them.
_OPTION = {
    "kind": "KIND",
    "value": "--value",
    "feature": "--feature",
    "model": "--model",
    "reason": "--reason",
    "incident_id": "--incident",
    "duration_minutes": "--for",
    "fraction": "--fraction",
}


def control_minutes(text: str) -> int:
    """`--for` in whole minutes: 30m, 1h, 2d; from 1 minute to 7 days."""
    hint = f"use minutes, hours or days, like 30m, 1h, 2d (at most {MAX_CONTROL_MINUTES // 1440}d)"
    try:
        duration = parse_duration(text)
    except typer.BadParameter:
        raise typer.BadParameter(f"{text!r}: {hint}", param_hint="--for") from None
    minutes = duration // timedelta(minutes=1)
    if not 1 <= minutes <= MAX_CONTROL_MINUTES:
        raise typer.BadParameter(f"{text!r}: {hint}", param_hint="--for")
    return minutes


@app.command("set")
def set_control(
    kind: Annotated[
        str, typer.Argument(metavar="KIND", help=f"one of {', '.join(controls.KINDS)}")
    ],
    reason: Annotated[str, typer.Option(help="why (shown on the list and the timeline)")],
    duration: Annotated[
        str, typer.Option("--for", help="how long: 30m, 1h, 2d (at most 7d)")
    ] = "1h",
    value: Annotated[
        str,
        typer.Option(
            help="a whole number for concurrency, rpm, tpm (the whole app's), max_tokens, "
            "backoff; the model to use for reroute, pin; none for disable, cache"
        ),
    ] = "",
    feature: Annotated[str | None, typer.Option(help="only this feature (default: all)")] = None,
    model: Annotated[str | None, typer.Option(help="only this model (default: all)")] = None,
    incident: Annotated[
        str | None,
        typer.Option(help="an open incident: noted on its timeline, reverted when it resolves"),
    ] = None,
    by: Annotated[str | None, typer.Option(help="who is acting (default: your login)")] = None,
    fraction: Annotated[
        float | None,
        typer.Option(
            help="a canary: only this share of the target's calls, between 0 and 1 (0.1: 10%), "
            "each session staying on one side; again without it: all calls (default: all)"
        ),
    ] = None,
) -> None:
    """Put a control in force by hand for a while (again on the same target: refresh it, or
    promote a canary to all calls)."""
    try:
        body = ControlIn(
            kind=kind,
            feature=feature,
            model=model,
            value=value,
            duration_minutes=control_minutes(duration),
            reason=reason,
            incident_id=incident,
            fraction=fraction,
        )
    except ValidationError as exc:
        error = exc.errors(include_input=False, include_url=False)[0]
        field = str(error["loc"][0]) if error["loc"] else ""
        message = str(error["msg"]).removeprefix("Value error, ")
        raise typer.BadParameter(message, param_hint=_OPTION.get(field, field)) from None
    for option, problem in (
        ("--feature", target_problem(body.kind, body.feature, body.model)),
        ("--incident", key_problem(body.incident_id, body.kind, body.feature, body.model)),
    ):
        if problem is not None:
            raise typer.BadParameter(problem, param_hint=option)
    author = by or getpass.getuser()
    engine = open_stores()

    async def put() -> tuple[Control, bool | None]:
        client = None
        if incident is not None:
            try:
                client = await worker.connect_temporal(load_settings())
            except RuntimeError as exc:
                raise IncidentRefusedError(503, f"could not reach Temporal ({exc})") from None
        return await set_by_hand(engine, client, body, author, "cli", datetime.now(UTC))

    try:
        control, noted = asyncio.run(put())
    except IncidentRefusedError as exc:
        err.print(f"[red]{exc.message}: no control was set[/red]")
        raise typer.Exit(1) from None
    out.print(
        f"control #{control.id}: {control.description}, "
        f"until {utc(control.expires_at):%Y-%m-%d %H:%M} UTC "
        f"(set by {control.set_by}, {control.incident_id})"
    )
    if noted is False:
        err.print(
            f"[yellow]incident {incident} did not answer in time: its timeline does not "
            "record this control[/yellow]"
        )
