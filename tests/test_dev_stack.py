"""`pagerloop dev` as a user runs it: a real process tree, killed and started again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from tests.conftest import SIGNING_SECRET, free_port, incident_ids
from tests.fakes.pagerduty import FakePagerDuty
from tests.fakes.slack import FakeSlack, button_click
from tests.helpers import eventually
from worker import answers
from workflows.incident import IncidentWorkflow

PAGERLOOP = str(Path(sys.executable).parent / "pagerloop")


class DevStack:
    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd = cwd
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None
        self.log = cwd / "dev.log"

    @property
    def temporal(self) -> str:
        return self.env["PAGERLOOP_TEMPORAL_ADDRESS"]

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.env['PAGERLOOP_API_PORT']}"

    @property
    def ui(self) -> str:
        return f"http://127.0.0.1:{self.env['PAGERLOOP_TEMPORAL_UI_PORT']}"

    def start(self, expect_ui: bool = True) -> float:
        """Start `pagerloop dev`; return the seconds until the UI and the API both answer."""
        started = time.monotonic()
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [PAGERLOOP, "dev"],
                cwd=self.cwd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = started + 60
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            try:
                ui_ok = not expect_ui or httpx.get(self.ui, timeout=1).status_code == 200
                health = httpx.get(f"{self.api}/healthz", timeout=1)
                if ui_ok and health.status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"pagerloop dev did not come up:\n{self.log.read_text()}")

    def kill_tree(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def interrupt(self) -> int:
        """Ctrl-C in the terminal: SIGINT to the foreground process group."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGINT)
        return self.process.wait(30)


@pytest.fixture
def stack(
    tmp_path: Path, fake_slack: FakeSlack, fake_pagerduty: FakePagerDuty
) -> Iterator[DevStack]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAGERLOOP_")}
    env |= {
        "PAGERLOOP_TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}",
        "PAGERLOOP_TEMPORAL_UI_PORT": str(free_port()),
        "PAGERLOOP_API_PORT": str(free_port()),
        "PAGERLOOP_DETECTOR_INTERVAL_SECONDS": "2",
        "PAGERLOOP_SLACK_BOT_TOKEN": "xoxb-dev",
        "PAGERLOOP_SLACK_SIGNING_SECRET": SIGNING_SECRET,
        "PAGERLOOP_SLACK_API_URL": fake_slack.api_url,
        "PAGERLOOP_PAGERDUTY_ROUTING_KEY": "R" * 32,
        "PAGERLOOP_PAGERDUTY_EVENTS_URL": fake_pagerduty.url,
    }
    stack = DevStack(tmp_path, env)
    yield stack
    if stack.process is not None and stack.process.poll() is None:
        stack.kill_tree()


async def test_dev_stack_pages_survives_a_kill_and_stops_cleanly(
    stack: DevStack, fake_slack: FakeSlack, fake_pagerduty: FakePagerDuty
) -> None:
    seconds = stack.start()
    assert seconds < 30, f"took {seconds:.1f}s to serve the UI and the API"
    assert (stack.cwd / ".pagerloop" / "temporal.db").exists()
    assert (stack.cwd / ".pagerloop" / "stores.db").exists()
    banner = stack.log.read_text()
    assert stack.ui in banner
    assert stack.api in banner

    failed = {"model": "gpt-4.1", "status": "server_error", "latency_ms": 700}
    async with httpx.AsyncClient(base_url=stack.api) as api:
        response = await api.post("/v1/llm-calls", json={"calls": [failed] * 50})
    assert response.status_code == 202  # dev mode: ingest without keys

    client = await Client.connect(stack.temporal, data_converter=pydantic_data_converter)
    # An API outage's runbook acts before anyone acknowledges: the incident is mitigating.
    [incident_id] = await eventually(
        lambda: incident_ids(client, "pagerloop", "AND IncidentStatus = 'mitigating'"), timeout=30
    )
    assert incident_id.startswith("incident-api_outage-global-")
    await eventually(lambda: len(fake_slack.messages) == 1)
    await eventually(lambda: len(fake_pagerduty.events("trigger")) == 1)

    # Killed once the incident has recorded both (a page sent but not yet recorded is sent
    # again after a restart, which PagerDuty deduplicates but this count would not).
    async def notified() -> bool:
        handle = client.get_workflow_handle_for(IncidentWorkflow.run, incident_id)
        state = await handle.query(IncidentWorkflow.state)
        return state.slack_message is not None and bool(state.paged)

    await eventually(notified)
    stack.kill_tree()  # the Temporal server goes too (it dies with its parent)
    await eventually(lambda: not answers(stack.temporal), timeout=10)

    stack.start()
    client = await Client.connect(stack.temporal, data_converter=pydantic_data_converter)
    assert await incident_ids(client, "pagerloop", "AND ExecutionStatus = 'Running'") == [
        incident_id
    ]

    # The restarted stack still runs that incident: a click acknowledges it.
    [message] = fake_slack.messages.values()
    body, headers = button_click(message, "incident_acknowledge", "U024BE7LH", SIGNING_SECRET)
    async with httpx.AsyncClient(base_url=stack.api) as api:
        clicked = await api.post("/slack/interactions", content=body, headers=headers)
    assert clicked.status_code == 200
    # The killed worker's sticky task queue must time out before the new worker takes over.
    await eventually(lambda: len(fake_pagerduty.events("acknowledge")) == 1, timeout=60)
    assert len(fake_slack.posts()) == 1
    assert len(fake_pagerduty.events("trigger")) == 1

    assert stack.interrupt() == 0
    assert "pagerloop dev stopped" in stack.log.read_text()
    assert not answers(stack.temporal)
    assert not answers(f"127.0.0.1:{stack.env['PAGERLOOP_API_PORT']}")


async def test_dev_uses_a_temporal_server_that_already_answers(
    stack: DevStack, dev_env: WorkflowEnvironment
) -> None:
    existing = dev_env.client.service_client.config.target_host
    stack.env["PAGERLOOP_TEMPORAL_ADDRESS"] = existing
    stack.env["PAGERLOOP_TASK_QUEUE"] = "dev-on-existing-server"
    stack.start(expect_ui=False)
    assert not (stack.cwd / ".pagerloop" / "temporal.db").exists()
    assert f"using the Temporal server already at {existing}" in stack.log.read_text()

    failed = {"model": "gpt-4.1", "status": "timeout", "latency_ms": 30_000}
    async with httpx.AsyncClient(base_url=stack.api) as api:
        await api.post("/v1/llm-calls", json={"calls": [failed] * 30})
    await eventually(lambda: incident_ids(dev_env.client, "dev-on-existing-server"), timeout=30)

    assert stack.interrupt() == 0
    assert answers(existing), "pagerloop dev must leave a server it did not start running"
    await dev_env.client.get_workflow_handle("detector-dev-on-existing-server").terminate()


def test_dev_stops_with_a_clear_error_when_the_api_port_is_taken(stack: DevStack) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", int(stack.env["PAGERLOOP_API_PORT"])))
        taken.listen()
        with stack.log.open("ab") as log:
            process = subprocess.Popen(
                [PAGERLOOP, "dev"], cwd=stack.cwd, env=stack.env, stdout=log, stderr=log,
                start_new_session=True,
            )  # fmt: skip
        try:
            assert process.wait(60) != 0
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    output = stack.log.read_text()
    assert "could not listen on 127.0.0.1" in output
    assert "pagerloop dev stopped" in output
    assert not answers(stack.temporal)  # the embedded server went down with it
