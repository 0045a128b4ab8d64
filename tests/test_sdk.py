"""The app side as an application installs it: `pagerloop-sdk` alone, talking HTTP to the API.

Real OpenAI SDK against llmock, the real API app (uvicorn) over real stores, gzipped batches.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from llmock.pytest_plugin import LLMock
from pagerloop_sdk import FeatureDisabled, Recorder, instrument, llm_context
from pagerloop_sdk.http_controls import HttpControls
from pagerloop_sdk.http_sink import HttpSink
from pagerloop_sdk.privacy import hash_user_id
from sqlalchemy import Engine
from sqlmodel import Session, select

from stores.llm_calls import LLMCall
from stores.quality import QualityScore
from tests.conftest import INGEST_KEY
from tests.fakes.server import ThreadedServer
from tests.helpers import put_control

ROOT = Path(__file__).resolve().parent.parent
SERVER_MODULES = {
    "temporalio", "fastapi", "starlette", "sqlalchemy", "sqlmodel", "alembic", "psycopg",
    "slack_sdk", "jira", "pdpyras", "llmock", "uvicorn", "typer",
    "api", "activities", "cli", "config", "detectors", "instrumentation", "runbooks", "stores",
    "worker", "workflows",
}  # fmt: skip
CHAT = [{"role": "user", "content": "Summarize the quarter in one line."}]
APP_SALT = "app-salt"
OUTAGE, DOWN = "incident-api_outage-global-1", "OpenAI is down"
RAW_USER = "customer_7@example.com"


def rows(engine: Engine) -> list[LLMCall]:
    with Session(engine) as session:
        return list(session.exec(select(LLMCall).order_by(LLMCall.id)))


def wait_for(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


IMPORT_CHECK = """
import json, sys
import openai
from pagerloop_sdk import instrument, llm_context
client = instrument(openai.OpenAI(base_url="http://127.0.0.1:9/v1", api_key="k"), controls=False)
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def test_importing_the_sdk_imports_no_server_module() -> None:
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_CHECK], check=True, capture_output=True, text=True
    )
    loaded = set(json.loads(out.stdout))
    assert "pagerloop_sdk" in loaded
    assert loaded & SERVER_MODULES == set()


def test_the_sdk_installs_alone_in_a_clean_virtualenv(tmp_path: Path) -> None:
    venv = tmp_path / "app"
    subprocess.run(["uv", "venv", "-q", "--python", sys.executable, str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        ["uv", "pip", "install", "-q", "--python", str(python), str(ROOT / "sdk")],
        check=True,
        timeout=300,
    )
    out = subprocess.run(
        [str(python), "-c", IMPORT_CHECK], check=True, capture_output=True, text=True
    )
    assert "pagerloop_sdk" in json.loads(out.stdout)
    listed = subprocess.run(
        ["uv", "pip", "list", "--python", str(python), "--format", "json"],
        check=True,
        capture_output=True,
        text=True,
    )
    installed = {package["name"].lower() for package in json.loads(listed.stdout)}
    assert {"pagerloop-sdk", "openai", "httpx"} <= installed
    assert installed & {"temporalio", "fastapi", "sqlalchemy", "sqlmodel", "pagerloop"} == set()


@pytest.fixture
def http_recorder(ingest_api: ThreadedServer) -> Iterator[Recorder]:
    recorder = Recorder(
        HttpSink(ingest_api.url, INGEST_KEY),
        salt=APP_SALT,
        quality_sample_rate=1.0,
        flush_interval=0.05,
    )
    yield recorder
    recorder.close()


def test_calls_reach_the_stores_over_http(
    llmock: LLMock, http_recorder: Recorder, engine: Engine
) -> None:
    client = instrument(
        openai.OpenAI(base_url=llmock.base_url(), api_key="k"),
        recorder=http_recorder,
        controls=False,
    )
    with llm_context(feature="summary", team="finance", user_id=RAW_USER, session_id="s1"):
        for _ in range(3):
            client.chat.completions.create(model="gpt-4.1", messages=CHAT)
    assert http_recorder.flush()
    found = rows(engine)
    assert len(found) == 3
    assert {(r.feature, r.team, r.session_id, r.source) for r in found} == {
        ("summary", "finance", "s1", "sdk")
    }
    # The pseudonym left the app, and the API hashed it again with its own salt ("s").
    assert {r.user_hash for r in found} == {hash_user_id(hash_user_id(RAW_USER, APP_SALT), "s")}
    assert all(r.cost_usd and r.cost_usd > 0 for r in found)  # priced by the API
    with Session(engine) as session:
        scores = list(session.exec(select(QualityScore)))
    assert {s.call_id for s in scores} == {r.call_id for r in found}
    assert {s.source for s in scores} == {"scorer"}
    assert RAW_USER.encode() not in Path(str(engine.url.database)).read_bytes()


def test_ingest_takes_gzip_and_refuses_a_bomb(ingest_api: ThreadedServer, engine: Engine) -> None:
    headers = {
        "Authorization": f"Bearer {INGEST_KEY}",
        "Content-Type": "application/json",
        "Content-Encoding": "gzip",
    }
    call = {"model": "gpt-4.1", "status": "success", "latency_ms": 12.5, "feature": "gz"}
    body = gzip.compress(json.dumps({"calls": [call]}).encode())
    answer = httpx.post(f"{ingest_api.url}/v1/llm-calls", content=body, headers=headers)
    assert answer.status_code == 202, answer.text
    assert [r.feature for r in rows(engine)] == ["gz"]

    bomb = gzip.compress(b'{"calls": [' + b" " * 50_000_000 + b"]}")
    answer = httpx.post(f"{ingest_api.url}/v1/llm-calls", content=bomb, headers=headers)
    assert answer.status_code == 413
    assert "inflates" in answer.json()["detail"]

    answer = httpx.post(f"{ingest_api.url}/v1/llm-calls", content=b"not gzip", headers=headers)
    assert answer.status_code == 400


class SaysRetryLater:
    """The API, except that its first `refusals` ingest requests get 503 Retry-After: 1."""

    def __init__(self, app: Any, refusals: int) -> None:
        self.app = app
        self.refusals = refusals
        self.attempts: list[float] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/v1/llm-calls":
            self.attempts.append(time.monotonic())
            if len(self.attempts) <= self.refusals:
                await send(
                    {"type": "http.response.start", "status": 503,
                     "headers": [(b"retry-after", b"1"), (b"content-type", b"text/plain")]}
                )  # fmt: skip
                await send({"type": "http.response.body", "body": b"busy"})
                return
        await self.app(scope, receive, send)


def test_the_recorder_waits_as_long_as_retry_after_asks(
    llmock: LLMock, ingest_api: ThreadedServer, engine: Engine
) -> None:
    api = SaysRetryLater(ingest_api.app, refusals=2)
    with ThreadedServer(api) as server:
        recorder = Recorder(
            HttpSink(server.url, INGEST_KEY),
            quality_sample_rate=0,
            flush_interval=0.02,
            retry_base=0.01,  # its own backoff alone would retry within milliseconds
        )
        client = instrument(
            openai.OpenAI(base_url=llmock.base_url(), api_key="k"),
            recorder=recorder,
            controls=False,
        )
        client.chat.completions.create(model="gpt-4.1", messages=CHAT)
        wait_for(lambda: len(rows(engine)) == 1, timeout=15)
        recorder.close()
    assert len(api.attempts) == 3
    gaps = [later - earlier for earlier, later in zip(api.attempts, api.attempts[1:], strict=False)]
    assert min(gaps) >= 0.95, gaps
    assert recorder.stats().dropped == 0


def test_an_unreachable_api_never_reaches_the_caller_and_loses_nothing(
    llmock: LLMock, ingest_api: ThreadedServer, engine: Engine, tmp_path: Path
) -> None:
    closed = ThreadedServer(ingest_api.app).start()
    url = closed.url
    closed.stop()  # nothing listens there any more
    spool = tmp_path / "spool"
    recorder = Recorder(
        HttpSink(url, INGEST_KEY), quality_sample_rate=0, flush_interval=0.02, spool_dir=spool
    )
    client = instrument(
        openai.OpenAI(base_url=llmock.base_url(), api_key="k"), recorder=recorder, controls=False
    )
    started = time.perf_counter()
    for _ in range(20):
        client.chat.completions.create(model="gpt-4.1", messages=CHAT)
    elapsed = time.perf_counter() - started
    assert elapsed < 5  # the calls never waited for the API
    recorder.close(timeout=2)
    assert recorder.stats().dropped == 0
    assert rows(engine) == []

    # The API is back: the next recorder on the spool delivers the records, once each.
    again = Recorder(HttpSink(ingest_api.url, INGEST_KEY), flush_interval=0.02, spool_dir=spool)
    wait_for(lambda: len(rows(engine)) == 20, timeout=15)
    again.close()
    assert len({r.call_id for r in rows(engine)}) == 20


def test_controls_come_over_http_and_unchanged_ones_cost_a_304(
    llmock: LLMock, ingest_api: ThreadedServer, http_recorder: Recorder, engine: Engine
) -> None:
    source = HttpControls(ingest_api.url, f"Bearer {INGEST_KEY}", ttl=0.1)
    client = instrument(
        openai.OpenAI(base_url=llmock.base_url(), api_key="k"),
        recorder=http_recorder,
        controls=source,
    )
    with llm_context(feature="digest"):
        client.chat.completions.create(model="gpt-4.1", messages=CHAT)
    put_control(engine, "disable", feature="digest", incident=OUTAGE, reason=DOWN)
    wait_for(lambda: any(r.kind == "disable" for r in source.refresh().rules))
    with llm_context(feature="digest"), pytest.raises(FeatureDisabled) as refused:
        client.chat.completions.create(model="gpt-4.1", messages=CHAT)
    assert refused.value.incident_id == OUTAGE
    assert DOWN in str(refused.value)
    assert source.read() is None  # nothing changed: the API answered 304
    assert source.instances == 1
    source.close()


def test_the_last_controls_stay_while_the_api_is_away_each_until_its_expiry(
    ingest_api: ThreadedServer, engine: Engine
) -> None:
    put_control(engine, "disable", feature="short", ttl=timedelta(seconds=2))
    put_control(engine, "disable", feature="long")
    with ThreadedServer(ingest_api.app) as api:
        source = HttpControls(api.url, f"Bearer {INGEST_KEY}", ttl=3600)
        assert {r.feature for r in source.refresh().rules} == {"short", "long"}
    # The API is gone: reads fail, the controls read last stay in force...
    assert {r.feature for r in source.refresh().rules} == {"short", "long"}
    time.sleep(2.1)
    # ...each until its own expiry.
    assert {r.feature for r in source.refresh().rules} == {"long"}
    source.close()


EXIT_WITH_A_BACKLOG = """
import sys
from datetime import datetime, timezone
from pagerloop_sdk import Recorder
from pagerloop_sdk.http_sink import HttpSink
from pagerloop_sdk.records import CallRecord

recorder = Recorder(HttpSink(sys.argv[1], sys.argv[2]), flush_interval=3600, batch_size=5000)
now = datetime.now(timezone.utc)
for _ in range(2500):  # more than one request's worth: the batch's parts go in parallel
    recorder.enqueue(CallRecord(ts=now, model="gpt-4.1", status="success", latency_ms=1.0))
"""  # the app exits at once: the atexit hook delivers them


def test_a_backlog_of_several_requests_is_delivered_at_exit(
    ingest_api: ThreadedServer, engine: Engine
) -> None:
    subprocess.run(
        [sys.executable, "-c", EXIT_WITH_A_BACKLOG, ingest_api.url, INGEST_KEY],
        check=True,
        timeout=60,
    )
    assert len(rows(engine)) == 2500


def test_snapshot_names_are_priced_as_their_model_however_many_names_come() -> None:
    from pagerloop_sdk.pricing import RESOLVED_MAX, PriceTable

    table = PriceTable()
    base = table.cost_usd("gpt-4.1", 1000, 100)
    assert base is not None
    assert table.cost_usd("gpt-4.1-2025-04-14", 1000, 100) == base
    for index in range(RESOLVED_MAX * 2):  # names past the memo's bound are still priced
        assert table.cost_usd(f"no-such-model-{index}", 1000, 100) is None
    assert table.cost_usd("gpt-4.1-2026-11-01", 1000, 100) == base
    assert len(table._resolved) <= RESOLVED_MAX
