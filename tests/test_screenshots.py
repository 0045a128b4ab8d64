"""The pictures as people see them: the status page, served by the real API on localhost, in a
real headless Chromium (Debian's /usr/bin/chromium), and the chart as the incident's Slack thread
receives it (the PNG uploaded to the fake Slack).

The shots go to a temporary directory; with PAGERLOOP_UPDATE_SCREENSHOTS=1 they overwrite
docs/status-page.png and docs/slack-chart.png (the README shows those). Without Chromium the test
is skipped, or fails when PAGERLOOP_REQUIRE_CHROMIUM=1 (CI sets it).
"""

from __future__ import annotations

import asyncio
import io
import math
import os
import random
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageStat
from temporalio.testing import WorkflowEnvironment

import worker
from activities import slack
from activities.slack import SlackActivities, SlackPostRequest
from config import Settings
from domain.chart import CRITICAL, HEIGHT, PNG_SCALE, SIGNAL, WARNING, WIDTH
from domain.incident import IncidentState, IncidentStatus, Severity, Trigger
from stores import controls as control_store
from stores.llm_calls import CallRecord
from stores.writer import write_calls
from tests.conftest import serving_api
from tests.fakes.slack import FakeSlack
from tests.test_charts import attempt, open_incident_without_worker

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("PAGERLOOP_CHROMIUM", "/usr/bin/chromium")
WINDOW = (1400, 1000)


def chromium() -> str:
    found = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    if found is None:
        reason = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
        if os.environ.get("PAGERLOOP_REQUIRE_CHROMIUM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def shots_dir(tmp_path: Path) -> Path:
    return REPO / "docs" if os.environ.get("PAGERLOOP_UPDATE_SCREENSHOTS") == "1" else tmp_path


async def screenshot(url: str, out: Path, profile: Path) -> None:
    """Chromium's own --screenshot of the page at WINDOW: the page is static (no script), so
    what is there once it has loaded is what people see."""
    process = await asyncio.create_subprocess_exec(
        chromium(),
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        f"--screenshot={out}",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout=90)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode == 0, output.decode(errors="replace")[-2000:]
    assert out.exists(), output.decode(errors="replace")[-2000:]


def a_bad_hour(now: datetime) -> list[CallRecord]:
    """75 minutes of 40 calls a minute; over the last 20 the answers slow down (p50 from 0.9 s
    to 8 s) and fail more often (0.5 % to 8.5 %)."""
    rng = random.Random(14)
    calls = []
    for minute in range(75, -1, -1):
        worse = max(0, 20 - minute)
        for _ in range(40):
            ts = now - timedelta(minutes=minute, seconds=rng.uniform(0, 59))
            if ts > now:
                continue
            failed = rng.random() < 0.005 + worse * 0.004
            calls.append(
                CallRecord(
                    ts=ts,
                    model=rng.choice(["gpt-4.1", "gpt-4.1-mini"]),
                    feature=rng.choice(["chat", "search", "summaries"]),
                    status="server_error" if failed else "success",
                    latency_ms=(900 + worse * 355) * math.exp(rng.gauss(0, 0.35)),
                    input_tokens=rng.randint(200, 2000),
                    output_tokens=rng.randint(50, 600),
                )
            )
    return calls


def near(rgb: tuple[int, ...], hex_colour: str, within: int = 40) -> bool:
    want = (int(hex_colour[1:3], 16), int(hex_colour[3:5], 16), int(hex_colour[5:7], 16))
    return sum(abs(a - b) for a, b in zip(rgb[:3], want, strict=True)) <= within


async def test_the_status_page_and_the_slack_chart_as_people_see_them(
    dev_env: WorkflowEnvironment,
    settings: Settings,
    task_queue: str,
    fake_slack: FakeSlack,
    tmp_path: Path,
) -> None:
    chromium()  # skip (or fail) before setting anything up
    out = shots_dir(tmp_path)
    settings = settings.model_copy(update={"dev_mode": True})
    client = dev_env.client
    engine = worker.open_store(settings)
    now = datetime.now(UTC)
    write_calls(engine, a_bad_hour(now))
    ids = [await open_incident_without_worker(client, task_queue, "error_rate", "global")]
    ids.append(await open_incident_without_worker(client, task_queue, "elevated_latency", "global"))
    latency_incident = ids[-1]
    runbook_controls = (("max_tokens", "gpt-4.1", "512"), ("reroute", "gpt-4.1", "gpt-4.1-mini"))
    for kind, model, value in runbook_controls:
        control_store.upsert(
            engine, incident_id=latency_incident, kind=kind, feature=None, model=model,
            value=value, reason="runbook elevated_latency: p50 8.0s > 5s",
            set_by="runbook:elevated_latency", expires_at=now + timedelta(hours=4), now=now,
        )  # fmt: skip
    control_store.set_manual(
        engine, incident_id=None, kind="disable", feature="summaries", model=None, value="",
        reason="shed load", set_by="alice", expires_at=now + timedelta(hours=1), now=now,
    )  # fmt: skip
    page = out / "status-page.png"
    try:
        async with serving_api(settings, client, engine) as base:
            # The listing is eventually consistent: wait until both incidents show.
            async with httpx.AsyncClient() as http:
                for _ in range(100):
                    html = (await http.get(f"{base}/status", headers={"Accept": "text/html"})).text
                    if html.count("<svg") == 2:
                        break
                    await asyncio.sleep(0.2)
            assert html.count("<svg") == 2, html[:2000]
            await screenshot(f"{base}/status", page, tmp_path / "chromium")
    finally:
        for incident_id in ids:
            await client.get_workflow_handle(incident_id).terminate("test over")

    shot = Image.open(page).convert("RGB")
    assert shot.size == WINDOW
    assert max(ImageStat.Stat(shot).var) > 500  # not blank: text, lines, colour
    # The chart of the newest incident (listed first) is drawn: its signal and both lines.
    found = shot.getcolors(WINDOW[0] * WINDOW[1]) or []
    colours = [(n, rgb) for n, rgb in found if isinstance(rgb, tuple)]
    for drawn in (SIGNAL, CRITICAL, WARNING):
        assert sum(n for n, rgb in colours if near(rgb, drawn)) > 300, drawn

    # The same chart as the incident's Slack thread gets it, through the fake Slack.
    charts = worker.incident_charts(settings, engine)
    state = IncidentState(
        incident_id=latency_incident,
        trigger=Trigger.ELEVATED_LATENCY,
        scope="global",
        severity=Severity.SEV2,
        status=IncidentStatus.DETECTED,
        opened_at=now,
        summary="p50 latency 8.0s > 5.0s",
    )
    activities = SlackActivities(slack.make_client("xoxb-test", fake_slack.api_url), charts.png)
    env = attempt(1)  # begun now, with the post's timeouts: the chart has its time
    ref = await env.run(activities.post_incident, SlackPostRequest("#llm-oncall", state))
    [uploaded] = fake_slack.uploaded(thread_ts=ref.ts)
    assert uploaded.data is not None
    chart = Image.open(io.BytesIO(uploaded.data)).convert("RGB")
    assert chart.size == (WIDTH * PNG_SCALE, HEIGHT * PNG_SCALE)
    assert max(ImageStat.Stat(chart).var) > 500
    (out / "slack-chart.png").write_bytes(uploaded.data)
    engine.dispose()
