"""The `pagerloop` command line."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

import typer
from rich.console import Console

import worker
from cli import calls, controls, costs, detector, incidents, quality, silences
from cli.simulate import command as simulate_command
from config import ConfigurationError, Settings, load_settings

app = typer.Typer(
    help="pagerloop: incident automation for applications that call the OpenAI API.",
    no_args_is_help=True,
)
app.add_typer(incidents.app, name="incidents")
app.add_typer(silences.app, name="silences")
app.add_typer(controls.app, name="controls")
app.add_typer(detector.app, name="detector")
app.add_typer(calls.app, name="calls")
app.add_typer(costs.app, name="costs")
app.add_typer(quality.app, name="quality")
app.command("simulate")(simulate_command)
err = Console(stderr=True)


def settings_or_exit(**overrides: object) -> Settings:
    try:
        settings = load_settings(**overrides)
    except ConfigurationError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    logging.basicConfig(level=settings.log_level, format=worker.LOG_FORMAT)
    return settings


@app.command()
def dev() -> None:
    """Run everything on this machine: Temporal dev server with UI, API, worker, detector."""
    asyncio.run(worker.run_dev(settings_or_exit()))


@app.command("worker")
def run_worker() -> None:
    """Run a worker (workflows, activities, detector) against the configured Temporal."""
    asyncio.run(worker.serve(settings_or_exit(), run_api=False, run_worker=True))


@app.command()
def api(
    with_worker: Annotated[bool, typer.Option(help="also run a worker in this process")] = False,
) -> None:
    """Serve the HTTP API against the configured Temporal and stores."""
    settings = settings_or_exit()
    try:
        settings.require_inbound_secrets()
    except ConfigurationError as exc:
        err.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    asyncio.run(worker.serve(settings, run_api=True, run_worker=with_worker))


@app.command()
def check(
    temporal: Annotated[bool, typer.Option(help="check the Temporal frontend")] = True,
    store: Annotated[bool, typer.Option(help="check the stores' database")] = True,
) -> None:
    """Check that Temporal and the stores answer; exit 1 if one does not."""
    results = asyncio.run(worker.check_dependencies(settings_or_exit(), temporal, store))
    for name, result in results.items():
        Console().print(f"{name}: {result}")
    if any(result != "ok" for result in results.values()):
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
