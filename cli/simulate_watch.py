"""The controls in force and the open incidents, as `pagerloop simulate` shows them: read from
the stores and from Temporal, best effort (a store or a Temporal server that does not answer
never stops the run)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from sqlalchemy import Engine
from temporalio.client import Client

from cli.simulate_progress import Progress
from config import Settings
from domain import search_attributes as sa
from stores import controls

CONNECT_TIMEOUT_SECONDS = 3.0


def read_controls(engine: Engine) -> list[str]:
    """One line per active control."""
    return [control.description for control in controls.active(engine, datetime.now(UTC))]


class IncidentWatch:
    """Open incidents of this task queue, by visibility query (as `pagerloop incidents list`)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.client: Client | None = None

    async def fetch(self) -> tuple[list[str] | None, str]:
        """One line per open incident (None when unknown), or why there is none."""
        address = self.settings.temporal_address
        try:
            if self.client is None:
                self.client = await asyncio.wait_for(
                    Client.connect(address, namespace=self.settings.temporal_namespace),
                    CONNECT_TIMEOUT_SECONDS,
                )
        except Exception:  # never stop the run for it
            return None, f"Temporal not reachable at {address}"
        query = (
            "WorkflowType = 'IncidentWorkflow' AND ExecutionStatus = 'Running' "
            f"AND TaskQueue = {sa.literal(self.settings.task_queue)}"
        )
        found = []
        try:
            async for execution in self.client.list_workflows(query, limit=20):
                attrs = execution.typed_search_attributes
                found.append(
                    f"{attrs.get(sa.INCIDENT_SEVERITY)} {attrs.get(sa.INCIDENT_TRIGGER)} · "
                    f"{attrs.get(sa.INCIDENT_SCOPE)} · {attrs.get(sa.INCIDENT_STATUS)} · "
                    f"L{attrs.get(sa.INCIDENT_LEVEL)}  [dim]{execution.id}[/dim]"
                )
        except Exception as exc:  # never stop the run for it
            self.client = None
            return None, f"could not list incidents at {address}: {type(exc).__name__}"
        return found, "" if found else "no open incident"


async def poll_controls(engine: Engine, progress: Progress) -> None:
    try:
        progress.controls = await asyncio.to_thread(read_controls, engine)
        progress.controls_note = "" if progress.controls else "none active"
    except Exception as exc:  # never stop the run for it
        progress.controls_note = f"could not read: {type(exc).__name__}"


async def poll_incidents(watch: IncidentWatch, progress: Progress) -> None:
    progress.incidents, progress.incidents_note = await watch.fetch()
