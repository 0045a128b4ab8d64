"""`pagerloop simulate`: each scenario, a few seconds of real traffic through the instrumented
client against in-process llmock, shows its fault in the stored call records."""

from __future__ import annotations

import statistics
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import openai
import pytest
from llmock.testing import LLMockServer
from pagerloop_sdk import quality
from pagerloop_sdk.pricing import DEFAULT_PRICES
from sqlalchemy import Engine
from sqlmodel import Session, select
from typer.testing import CliRunner

from cli import scenarios
from cli.scenarios import NEW_SNAPSHOT, SNAPSHOT, Scenario, build
from cli.simulate import Progress, run
from config import Settings, load_settings
from stores import controls
from stores.engine import create_schema, make_engine
from stores.llm_calls import LLMCall
from stores.quality import QualityScore

CLOSED_PORT = "127.0.0.1:1"  # no Temporal here: the run must carry on regardless
HOURLY_BUDGET = 500 / 24  # the default PAGERLOOP_DAILY_BUDGET_USD


def settings_for(tmp_path: Path) -> Settings:
    return load_settings(
        database_url=f"sqlite:///{tmp_path / 'stores.db'}",
        temporal_address=CLOSED_PORT,
        quality_sample_rate=1.0,
    )


def simulate(tmp_path: Path, scenario: Scenario, seconds: float) -> tuple[Progress, Engine]:
    settings = settings_for(tmp_path)
    progress = run(scenario, duration=seconds, quiet=True, settings=settings)
    return progress, make_engine(settings.database_url)


def calls(engine: Engine) -> list[LLMCall]:
    with Session(engine) as session:
        return list(session.exec(select(LLMCall)))


def scores(engine: Engine) -> list[QualityScore]:
    with Session(engine) as session:
        return list(session.exec(select(QualityScore)))


def share(rows: list[LLMCall], status: str) -> float:
    return sum(row.status == status for row in rows) / len(rows)


def test_rate_limit_exhaustion_gets_429s_from_a_real_quota(tmp_path: Path) -> None:
    # 6 s: on a loaded machine 4 s made 56 calls and only 4 of them met the quota.
    progress, engine = simulate(tmp_path, Scenario.RATE_LIMIT_EXHAUSTION, 6)
    rows = calls(engine)
    assert len(rows) == progress.total > 50
    assert share(rows, "rate_limited") > 0.05  # the detector's warning line is 1 %
    # One quota for the whole app: it refuses calls of whichever features come when it is
    # spent (which ones is chance: chat sends a quarter of the calls).
    assert len({row.feature for row in rows if row.status == "rate_limited"}) >= 2
    assert all(row.http_status == 429 for row in rows if row.status == "rate_limited")
    # Nothing else went wrong, and no Temporal did not stop the run.
    assert {row.status for row in rows} == {"success", "rate_limited"}
    assert progress.incidents is None
    assert progress.incidents_note.startswith("Temporal not reachable")


def test_elevated_latency_makes_gpt_4_1_slow_and_leaves_mini_fast(tmp_path: Path) -> None:
    _, engine = simulate(tmp_path, Scenario.ELEVATED_LATENCY, 4.5)
    rows = [row for row in calls(engine) if row.status == "success"]
    slow = [row.latency_ms for row in rows if row.model == "gpt-4.1"]
    fast = [row.latency_ms for row in rows if row.model == "gpt-4.1-mini"]
    assert len(slow) >= 3
    assert statistics.median(slow) > 2000  # the p50 warning line
    assert statistics.median(fast) < 1000


def test_quality_degradation_moves_gpt_4_1_to_a_poor_snapshot(tmp_path: Path) -> None:
    _, engine = simulate(tmp_path, Scenario.QUALITY_DEGRADATION, 4)
    answered_as = {row.call_id: row.response_model for row in calls(engine)}
    by_snapshot: dict[str, list[float]] = {}
    for score in scores(engine):
        by_snapshot.setdefault(answered_as[score.call_id] or "", []).append(score.score)
    # Before the fault the alias answered well as the snapshot the runbook will pin...
    assert statistics.mean(by_snapshot[SNAPSHOT]) > 0.9
    # ... then poorly as the new one, enough to fire the quality rule.
    assert len(by_snapshot[NEW_SNAPSHOT]) >= 20  # the rule's min_samples
    assert statistics.mean(by_snapshot[NEW_SNAPSHOT]) < 0.5  # the critical line
    assert statistics.mean(by_snapshot["gpt-4.1-mini"]) > 0.9
    assert {row.model for row in calls(engine) if row.response_model != "gpt-4.1-mini"} == {
        "gpt-4.1"
    }


def test_cost_spike_spends_faster_than_the_default_budget(tmp_path: Path) -> None:
    seconds = 4.0
    _, engine = simulate(tmp_path, Scenario.COST_SPIKE, seconds)
    rows = calls(engine)
    per_hour = sum(row.cost_usd or 0 for row in rows) / seconds * 3600
    assert per_hour > 1.5 * HOURLY_BUDGET  # the cost_rate rule's critical line
    summaries = [row for row in rows if row.feature == "summaries" and row.status == "success"]
    assert max(row.input_tokens or 0 for row in summaries) > 5000
    assert max(row.output_tokens or 0 for row in summaries) > 2500


def test_api_outage_from_the_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cli.main import app

    database = tmp_path / "stores.db"
    monkeypatch.setenv("PAGERLOOP_DATABASE_URL", f"sqlite:///{database}")
    monkeypatch.setenv("PAGERLOOP_TEMPORAL_ADDRESS", CLOSED_PORT)
    # 6 s: the healthy start is a tenth of the run; 0.3 s of it left a loaded machine no call
    # answered before the outage.
    result = CliRunner().invoke(app, ["simulate", "api_outage", "--duration", "6", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "pagerloop simulate api_outage: done" in result.output
    assert "server_error" in result.output
    rows = calls(make_engine(f"sqlite:///{database}"))
    assert share(rows, "server_error") > 0.5  # the api_outage rule's line
    assert all(row.http_status == 503 for row in rows if row.status == "server_error")
    assert any(row.status == "success" for row in rows)  # the healthy start


def test_controls_in_the_store_act_on_the_traffic_and_are_shown(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    engine = make_engine(settings.database_url)
    create_schema(engine)
    now = datetime.now(UTC)
    for kind, feature, model, value in (
        ("disable", "summaries", None, ""),
        ("cache", None, None, ""),
        ("reroute", None, "gpt-4.1", "gpt-4.1-mini"),
    ):
        controls.upsert(
            engine,
            incident_id="incident-api_outage-global-test",
            kind=kind,
            feature=feature,
            model=model,
            value=value,
            reason="test",
            set_by="test",
            expires_at=now + timedelta(hours=1),
            now=now,
        )
    # 6 s, not 3: a cache hit needs a prompt asked twice, and a CI machine running two test
    # files at once made too few calls in 3 s for one (seen once in five runs).
    progress = run(Scenario.API_OUTAGE, duration=6, quiet=True, settings=settings)
    assert progress.counts["disabled"] > 0
    assert progress.counts["cached"] > 0
    assert "gpt-4.1" not in progress.sent  # every chat call rerouted before it left
    assert progress.served["gpt-4.1-mini"] > 0
    assert progress.controls is not None
    assert "reroute gpt-4.1 -> gpt-4.1-mini" in progress.controls
    assert len(progress.controls) == 3


def test_the_runbook_mitigations_help() -> None:
    """What each runbook switches to answers well: the snapshot (reporting itself), the mini
    model fast, the nano model cheaply."""
    with LLMockServer() as server:
        client = openai.OpenAI(base_url=server.base_url(), api_key="k", max_retries=0)

        def apply(scenario: Scenario) -> None:
            server.state.scenarios.clear()
            from llmock.scenarios import behavior_from_dict

            server.state.scenarios.add(
                *(behavior_from_dict(b) for b in build(scenario).behaviors(faulty=True))
            )

        def ask(model: str, prompt: str, json_output: bool = False) -> tuple[str, str]:
            kwargs = {"response_format": {"type": "json_object"}} if json_output else {}
            response = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}], **kwargs
            )
            return response.model, response.choices[0].message.content or ""

        apply(Scenario.QUALITY_DEGRADATION)
        prompt = scenarios.SEARCH_PROMPTS[0]
        _, poor = ask("gpt-4.1", prompt, json_output=True)
        served, good = ask(SNAPSHOT, prompt, json_output=True)
        assert served == SNAPSHOT
        assert quality.score(poor, prompt, "json").composite < 0.3
        assert quality.score(good, prompt, "json").composite > 0.9

        apply(Scenario.ELEVATED_LATENCY)
        started = time.perf_counter()
        ask("gpt-4.1-mini", prompt)
        assert time.perf_counter() - started < 1

        apply(Scenario.COST_SPIKE)
        costs = {}
        for model in ("gpt-4.1", "gpt-4.1-nano"):
            response = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": scenarios.LARGE_DOCUMENT}],
            )
            assert response.usage is not None
            costs[model] = DEFAULT_PRICES.cost_usd(
                model, response.usage.prompt_tokens, response.usage.completion_tokens
            )
        assert costs["gpt-4.1-nano"] * 20 < costs["gpt-4.1"]  # type: ignore[operator]
