"""`pagerloop controls list / set / revert` against a real store."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import typer
from sqlalchemy import Engine
from typer.testing import CliRunner

from cli.controls import control_minutes
from cli.main import app
from stores import controls
from stores.engine import create_schema, make_engine
from tests.helpers import put_control

runner = CliRunner()


@pytest.fixture
def engine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Engine:
    url = f"sqlite:///{tmp_path / 'stores.db'}"
    monkeypatch.setenv("PAGERLOOP_DATABASE_URL", url)
    engine = make_engine(url)
    create_schema(engine)
    return engine


def put(engine: Engine, kind: str, value: str = "", **target: str) -> controls.Control:
    return put_control(
        engine,
        kind,
        value,
        incident="incident-cost_spike-global-1",
        ttl=timedelta(hours=4),
        reason="cost spike",
        set_by="runbook:cost_spike",
        **target,
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


# --- controls set ----------------------------------------------------------------------------


def test_set_puts_a_manual_control_in_force_and_the_list_shows_it(engine: Engine) -> None:
    started = datetime.now(UTC)
    result = runner.invoke(
        app,
        ["controls", "set", "rpm", "--feature", "chat", "--value", "600", "--for", "30m",
         "--reason", "stay under the org quota", "--by", "bob"],
        env={"COLUMNS": "250"},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "limit feature chat to 600 requests per minute" in result.output
    assert "set by bob" in result.output
    [control] = controls.active(engine, datetime.now(UTC))
    assert control.manual
    assert (control.kind, control.feature, control.model) == ("rpm", "chat", None)
    assert (control.value, control.set_by, control.incident_id) == ("600", "bob", "manual")
    assert control.reason == "stay under the org quota"
    lasts = controls.utc(control.expires_at) - started
    assert timedelta(minutes=29) < lasts <= timedelta(minutes=30, seconds=5)
    assert f"control #{control.id}" in result.output

    # A runbook control on the same target is another row; both are listed.
    put(engine, "rpm", "100", feature="chat")
    listed = runner.invoke(app, ["controls", "list"], env={"COLUMNS": "250"})
    assert listed.exit_code == 0, listed.output
    assert "bob" in listed.output
    assert "runbook:cost_spike" in listed.output
    assert listed.output.count("rpm") == 2

    # Set again: the same control, refreshed; a disable needs no value.
    again = runner.invoke(
        app,
        ["controls", "set", "rpm", "--feature", "chat", "--value", "300", "--for", "2h",
         "--reason", "tighter"],
    )  # fmt: skip
    assert again.exit_code == 0, again.output
    assert f"control #{control.id}" in again.output
    off = runner.invoke(
        app, ["controls", "set", "disable", "--model", "o3", "--for", "1d", "--reason", "pricey"]
    )
    assert off.exit_code == 0, off.output
    assert "disable model o3" in off.output
    assert len(controls.active(engine, datetime.now(UTC))) == 3


@pytest.mark.parametrize(
    ("text", "minutes"), [("30m", 30), ("1h", 60), ("2d", 2880), (" 7d ", 10080), ("1m", 1)]
)
def test_for_takes_minutes_hours_and_days(text: str, minutes: int) -> None:
    assert control_minutes(text) == minutes


@pytest.mark.parametrize("text", ["0m", "8d", "10081m", "90s", "1.5h", "1 h", "", "soon", "-1h"])
def test_for_refuses_anything_else(text: str) -> None:
    with pytest.raises(typer.BadParameter, match="at most 7d"):
        control_minutes(text)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["throttle", "--value", "3"], "unknown control kind"),
        (["rpm", "--value", "0"], "--value"),
        (["tpm", "--value", "lots"], "whole number"),
        (["reroute", "--model", "gpt-4.1"], "model to use instead"),
        (["disable"], "--feature"),
        (["rpm", "--value", "5", "--for", "8d"], "--for"),
        (["rpm", "--value", "5", "--reason", ""], "--reason"),
    ],
)
def test_set_refuses_bad_input_and_writes_nothing(
    engine: Engine, args: list[str], says: str
) -> None:
    result = runner.invoke(
        app, ["controls", "set", *args, *([] if "--reason" in args else ["--reason", "r"])],
        env={"COLUMNS": "250"},
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert says in result.output
    assert controls.listed(engine, datetime.now(UTC), include_past=True) == []
