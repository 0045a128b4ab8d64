"""`pagerloop incidents ...`: operate incidents without Slack."""

from __future__ import annotations

import asyncio
import getpass
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markdown import Markdown
from rich.table import Table
from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.service import RPCError, RPCStatusCode

import worker
from activities.reports import build_report
from cli.stores import open_stores
from config import load_settings
from domain import search_attributes as sa
from domain.incident import (
    ActionRequest,
    Approval,
    ApprovalDecision,
    IncidentState,
    SnoozeRequest,
)
from domain.report import markdown
from stores import incident_reports
from workflows.incident import IncidentWorkflow

app = typer.Typer(help="List, inspect, acknowledge and resolve incidents.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)

User = Annotated[str | None, typer.Option(help="who is acting (default: your login)")]
Note = Annotated[str, typer.Option(help="a note for the timeline")]


async def _client() -> Client:
    return await worker.connect_temporal(load_settings())


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]{message}[/red]")
    return typer.Exit(1)


@app.command("list")
def list_incidents(
    all_: Annotated[bool, typer.Option("--all", help="include closed incidents")] = False,
    status: Annotated[str | None, typer.Option(help="only this IncidentStatus")] = None,
) -> None:
    """Open incidents (or all of them), newest first."""
    settings = load_settings()
    query = f"WorkflowType = 'IncidentWorkflow' AND TaskQueue = {sa.literal(settings.task_queue)}"
    if not all_:
        query += " AND ExecutionStatus = 'Running'"
    if status:
        try:
            query += f" AND IncidentStatus = {sa.literal(status)}"
        except ValueError as exc:
            raise _fail(str(exc)) from None

    async def fetch() -> list[Any]:
        client = await worker.connect_temporal(settings)
        return [execution async for execution in client.list_workflows(query, limit=500)]

    executions = asyncio.run(fetch())
    table = Table("incident", "severity", "trigger", "scope", "status", "level", "opened")
    for execution in executions:
        attrs = execution.typed_search_attributes
        table.add_row(
            execution.id,
            attrs.get(sa.INCIDENT_SEVERITY),
            attrs.get(sa.INCIDENT_TRIGGER),
            attrs.get(sa.INCIDENT_SCOPE),
            _status(attrs.get(sa.INCIDENT_STATUS), attrs.get(sa.INCIDENT_MERGED_INTO)),
            f"L{attrs.get(sa.INCIDENT_LEVEL)}",
            f"{execution.start_time:%Y-%m-%d %H:%M:%S}",
        )
    out.print(table if executions else "no incidents")


def _status(status: str | None, merged_into: str | None) -> str:
    return f"merged into {merged_into}" if merged_into else str(status)


@app.command()
def show(incident_id: str) -> None:
    """An incident's state and timeline."""

    async def fetch() -> IncidentState:
        client = await _client()
        handle = client.get_workflow_handle_for(IncidentWorkflow.run, incident_id)
        return await handle.query(IncidentWorkflow.state)

    try:
        state = asyncio.run(fetch())
    except RPCError as exc:
        raise _unknown(incident_id, exc) from None
    out.print(
        f"[bold]{state.incident_id}[/bold]  {state.severity} {state.trigger} on {state.scope}"
        f"  [bold]{state.status}[/bold]  {state.level_name}"
    )
    deadlines = [
        (state.ack_by, "acknowledge"),
        (state.resolve_by, "resolve"),
        (state.remind_at, "reminder"),
    ]
    for at, what in deadlines:
        if at is not None:
            out.print(f"  {what} by {at:%Y-%m-%d %H:%M:%S} UTC")
    for line in state.correlation_lines():
        out.print(f"  {line}")
    if state.jira_issue:
        out.print(f"  ticket {state.jira_issue}")
    if state.runbook:
        verdict = f", verification: {state.verification}" if state.verification else ""
        out.print(f"  runbook {state.runbook} ({state.runbook_phase or 'starting'}{verdict})")
        for control in state.controls:
            out.print(f"    in force: {control}")
    for approval in state.pending_approvals():
        out.print(f"  {_asked(approval)}")
    if state.summary:
        out.print(state.summary)
    for name, value in state.metrics.items():
        out.print(f"  {name}: {value:.4g}")
    table = Table("at (UTC)", "what", "who", "via", "text")
    for entry in state.timeline:
        table.add_row(
            f"{entry.at:%Y-%m-%d %H:%M:%S}", entry.kind, entry.actor, entry.channel, entry.text
        )
    out.print(table)


Raw = Annotated[
    bool, typer.Option("--raw", help="print the Markdown as it is (always, when not a terminal)")
]


@app.command()
def report(incident_id: str, raw: Raw = False) -> None:
    """The incident report (Markdown), as written when it resolved; for an incident still
    open, a preview from its state and the call log now."""
    engine = open_stores()
    try:
        stored = incident_reports.get(engine, incident_id)
        if stored is not None:
            text = stored.markdown
        else:
            state = _state(incident_id)
            if state.resolved_at is not None:
                err.print("no report was written when it resolved: built now from the call log")
            onsets = worker.incident_onsets(load_settings(), engine)
            text = markdown(build_report(engine, state, onsets, datetime.now(UTC)))
    finally:
        engine.dispose()
    if raw or not out.is_terminal:
        typer.echo(text, nl=False)
    else:
        out.print(Markdown(text))


def _state(incident_id: str) -> IncidentState:
    async def fetch() -> IncidentState:
        client = await _client()
        handle = client.get_workflow_handle_for(IncidentWorkflow.run, incident_id)
        return await handle.query(IncidentWorkflow.state)

    try:
        return asyncio.run(fetch())
    except RPCError as exc:
        raise _unknown(incident_id, exc) from None


def _unknown(incident_id: str, exc: RPCError) -> typer.Exit:
    if exc.status == RPCStatusCode.NOT_FOUND:
        return _fail(f"no incident {incident_id!r}: see `pagerloop incidents list --all`")
    return _fail(f"could not reach incident {incident_id!r}: {exc}")


def _act(incident_id: str, update: Any, request: ActionRequest | SnoozeRequest) -> IncidentState:
    async def send() -> IncidentState:
        client = await _client()
        state: IncidentState = await client.get_workflow_handle(incident_id).execute_update(
            update, request, result_type=IncidentState
        )
        return state

    try:
        return asyncio.run(send())
    except WorkflowUpdateFailedError as exc:
        raise _fail(f"refused: {getattr(exc.cause, 'message', exc.cause)}") from None
    except RPCError as exc:
        raise _unknown(incident_id, exc) from None


@app.command()
def ack(incident_id: str, user: User = None, note: Note = "") -> None:
    """Acknowledge an incident."""
    request = ActionRequest(user or getpass.getuser(), "cli", note)
    state = _act(incident_id, IncidentWorkflow.acknowledge, request)
    out.print(f"{state.incident_id} is {state.status} (by {state.acknowledged_by})")


@app.command()
def resolve(
    incident_id: str,
    user: User = None,
    note: Note = "",
    keep_controls: Annotated[
        bool, typer.Option(help="leave the runbook's controls in force (they expire by themselves)")
    ] = False,
) -> None:
    """Resolve an incident (and revert the controls its runbook set)."""
    request = ActionRequest(user or getpass.getuser(), "cli", note, keep_controls=keep_controls)
    state = _act(incident_id, IncidentWorkflow.resolve, request)
    out.print(f"{state.incident_id} is {state.status} (by {state.resolved_by})")
    if keep_controls and state.controls:
        out.print("controls kept: " + "; ".join(state.controls))


@app.command()
def escalate(incident_id: str, reason: Note = "", user: User = None) -> None:
    """Hand an incident to its next escalation level now."""
    request = ActionRequest(user or getpass.getuser(), "cli", reason)
    state = _act(incident_id, IncidentWorkflow.escalate, request)
    out.print(f"{state.incident_id} is at {state.level_name}")


@app.command()
def snooze(incident_id: str, minutes: int = 30, user: User = None) -> None:
    """Push the incident's escalation deadlines back."""
    request = SnoozeRequest(user or getpass.getuser(), minutes, "cli")
    state = _act(incident_id, IncidentWorkflow.snooze, request)
    out.print(f"{state.incident_id}: next deadline pushed to at least {minutes} min from now")


@app.command()
def note(incident_id: str, text: str, user: User = None) -> None:
    """Add a note to the incident's timeline (and its Slack thread and ticket)."""
    _act(
        incident_id,
        IncidentWorkflow.add_note,
        ActionRequest(user or getpass.getuser(), "cli", text),
    )
    out.print("noted")


ApprovalId = Annotated[
    str | None,
    typer.Option("--approval", help="which ask (needed only when several wait for an answer)"),
]
By = Annotated[str | None, typer.Option("--by", help="who decides (default: your login)")]
Reason = Annotated[str, typer.Option(help="why, for the timeline")]


@app.command()
def approve(
    incident_id: str, approval: ApprovalId = None, by: By = None, reason: Reason = ""
) -> None:
    """Let a runbook step that asked for approval go ahead."""
    _decide(incident_id, approval, by, reason, approved=True)


@app.command()
def deny(incident_id: str, approval: ApprovalId = None, by: By = None, reason: Reason = "") -> None:
    """Stop a runbook step that asked for approval (the runbook goes on without it)."""
    _decide(incident_id, approval, by, reason, approved=False)


def _decide(
    incident_id: str, approval_id: str | None, by: str | None, reason: str, *, approved: bool
) -> None:
    async def send() -> IncidentState:
        client = await _client()
        handle = client.get_workflow_handle_for(IncidentWorkflow.run, incident_id)
        chosen = approval_id or _the_one_waiting(await handle.query(IncidentWorkflow.state))
        decision = ApprovalDecision(chosen, approved, by or getpass.getuser(), reason, "cli")
        return await handle.execute_update(IncidentWorkflow.decide_approval, decision)

    try:
        state = asyncio.run(send())
    except WorkflowUpdateFailedError as exc:
        raise _fail(f"refused: {getattr(exc.cause, 'message', exc.cause)}") from None
    except RPCError as exc:
        raise _unknown(incident_id, exc) from None
    decided = next((e for e in reversed(state.timeline) if e.kind in ("approved", "denied")), None)
    out.print(decided.text if decided else "decided")


def _the_one_waiting(state: IncidentState) -> str:
    """The approval id when exactly one ask waits; otherwise say what waits and stop."""
    waiting = state.pending_approvals()
    if len(waiting) == 1:
        return waiting[0].approval_id
    if not waiting:
        raise _fail(f"{state.incident_id} has no runbook step waiting for approval")
    for approval in waiting:
        err.print(f"  {_asked(approval)}")
    raise _fail(f"{len(waiting)} steps wait for approval: choose one with --approval ID")


def _asked(approval: Approval) -> str:
    then = "goes ahead" if approval.on_timeout == "proceed" else "denied"
    return (
        f"awaiting approval {approval.approval_id}: {approval.action} "
        f"(until {approval.expires_at:%H:%M:%S} UTC, then {then})"
    )
