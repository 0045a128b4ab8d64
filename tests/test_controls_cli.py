"""`pagerloop controls list / revert` against a real store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine
from typer.testing import CliRunner

from cli.main import app
from stores import controls
from stores.engine import create_schema, make_engine

runner = CliRunner()


@pytest.fixture
def engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Engine:
    url = f"sqlite:///{tmp_path / 'stores.db'}"
    monkeypatch.setenv("PAGERLOOP_DATABASE_URL", url)
    engine = make_engine(url)
    create_schema(engine)
    return engine


def put(engine: Engine, kind: str, value: str = "", **target: str) -> controls.Control:
    now = datetime.now(UTC)
    return controls.upsert(
        engine,
        incident_id="incident-cost_spike-global-1",
        kind=kind,
        feature=target.get("feature"),
        model=target.get("model"),
        value=value,
        reason="cost spike",
        set_by="runbook:cost_spike",
        expires_at=now + timedelta(hours=4),
        now=now,
    )


def test_list_shows_the_controls_in_force(engine: Engine) -> None:
    empty = runner.invoke(app, ["controls", "list"])
    assert empty.exit_code == 0
    assert "no controls in force" in empty.output

    reroute = put(engine, "reroute", "gpt-4.1-mini", model="gpt-4.1")
    put(engine, "concurrency", "3", feature="batch")
    result = runner.invoke(app, ["controls", "list"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "reroute" in result.output
    assert "gpt-4.1-mini" in result.output
    assert "model gpt-4.1" in result.output
    assert "feature batch" in result.output
    assert "incident-cost_spike-global-1" in result.output
    assert "runbook:cost_spike" in result.output

    assert reroute.id is not None
    reverted = runner.invoke(
        app, ["controls", "revert", str(reroute.id), "--user", "alice", "--reason", "done"]
    )
    assert reverted.exit_code == 0, reverted.output
    assert f"reverted #{reroute.id}" in reverted.output
    assert [c.kind for c in controls.active(engine, datetime.now(UTC))] == ["concurrency"]

    current = runner.invoke(app, ["controls", "list"], env={"COLUMNS": "250"})
    assert "gpt-4.1-mini" not in current.output
    everything = runner.invoke(app, ["controls", "list", "--all"], env={"COLUMNS": "250"})
    assert "gpt-4.1-mini" in everything.output
    assert "by alice" in everything.output


def test_revert_says_when_there_is_nothing_to_revert(engine: Engine) -> None:
    control = put(engine, "disable", feature="beta")
    assert control.id is not None
    runner.invoke(app, ["controls", "revert", str(control.id)])
    again = runner.invoke(app, ["controls", "revert", str(control.id)])
    assert again.exit_code == 0
    assert "was not in force" in again.output
    missing = runner.invoke(app, ["controls", "revert", "999"])
    assert missing.exit_code == 1
