"""`pagerloop detector ...`: see, pause and resume the detector."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import typer
from rich.console import Console
from rich.table import Table
from temporalio.client import WorkflowHandle

import worker
from config import load_settings
from detectors.detector import DetectorStatus, DetectorWorkflow, folded_line
from domain.workflow_names import detector_workflow_id

app = typer.Typer(help="The detector: its verdicts, and pausing it.", no_args_is_help=True)
out = Console()


async def _handle() -> WorkflowHandle[DetectorWorkflow, None]:
    settings = load_settings()
    client = await worker.connect_temporal(settings)
    return client.get_workflow_handle_for(
        DetectorWorkflow.run, detector_workflow_id(settings.task_queue)
    )


@app.command()
def status() -> None:
    """What the last evaluation found."""

    async def fetch() -> DetectorStatus:
        handle = await _handle()
        result: DetectorStatus = await handle.query(DetectorWorkflow.status)
        return result

    found = asyncio.run(fetch())
    config = found.config
    out.print(
        f"every {config.interval_seconds}s over {config.window_seconds}s, "
        f"{'paused' if found.paused else 'running'}, last at {found.last_evaluated_at}"
    )
    for kind, info in sorted(found.folded.items()):
        out.print(folded_line(kind, info), markup=False)
    table = Table("rule | scope", "verdict", "breaches", "good", "level")
    for key, verdict in sorted(found.last_verdicts.items()):
        if verdict in ("ok", "insufficient_data") and key not in found.rule_states:
            continue
        state = found.rule_states.get(key)
        table.add_row(
            key,
            verdict,
            str(state.breaches if state else 0),
            str(state.good if state else 0),
            str(state.level or "") if state else "",
        )
    out.print(table)
    for key, trigger in sorted(found.trigger_states.items()):
        silenced = f"silenced by #{trigger.silenced_by}" if trigger.silenced_by else "-"
        where = trigger.incident_id or silenced
        out.print(f"{key}: {where}")


@app.command()
def pause() -> None:
    """Stop evaluating until resumed (no new incidents, none updated)."""
    asyncio.run(_signal(DetectorWorkflow.pause))
    out.print("detector paused")


@app.command()
def resume() -> None:
    """Evaluate again."""
    asyncio.run(_signal(DetectorWorkflow.resume))
    out.print("detector resumed")


async def _signal(signal: Callable[[DetectorWorkflow], None]) -> None:
    handle = await _handle()
    await handle.signal(signal)
