"""The cost report (stores.cost_report, GET /v1/costs, `pagerloop costs`) against a brute-force
sum over the call log, on SQLite and PostgreSQL: every `by`, the previous period, the top N,
averages, today's budget, the burn and the runways. No Temporal."""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from sqlalchemy import Engine, select
from typer.testing import CliRunner

from api.costs import read_report, runway_windows, signal_window
from api.signals_export import signal_windows
from cli.costs import change_text, runway_text
from cli.main import app as cli
from config import Settings
from detectors.config import load_rules
from domain.runway import budget_runway, rate_runway
from stores.cost_report import (
    BY_VALUES,
    MAX_SPAN,
    MAX_USER_SPAN,
    MINUTE,
    CostReport,
    Period,
    PeriodError,
    cost_report,
    parse_since,
)
from stores.engine import create_schema, make_engine
from stores.llm_calls import CallRecord, LLMCall, utc
from stores.writer import write_calls
from tests.helpers import api_client

NOW = datetime(2026, 3, 10, 14, 17, 42, tzinfo=UTC)
BUDGET = 50.0
WINDOW = 300

FEATURES = ["chat", "search", "summarize", "classify", None]
TEAMS = ["platform", "content", "ml", None]
MODELS = ["gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano"]
ENVIRONMENTS = ["prod", "staging", None]
USERS = [f"u{i:02d}" for i in range(25)] + [None]
STATUSES = ["success"] * 8 + ["error", "rate_limited", "timeout", "server_error"]


def traffic(seed: int, count: int, start: datetime, end: datetime) -> list[CallRecord]:
    """`count` calls spread over [start, end): every dimension sometimes missing, some
    unpriced, some answered from the response cache."""
    rng = random.Random(seed)
    span = (end - start).total_seconds()
    calls = []
    for _ in range(count):
        priced = rng.random() > 0.05
        calls.append(
            CallRecord(
                ts=start + timedelta(seconds=rng.uniform(0, span)),
                model=rng.choice(MODELS),
                status=rng.choice(STATUSES),
                latency_ms=rng.uniform(50, 5000),
                input_tokens=rng.randint(10, 5000),
                output_tokens=rng.randint(0, 2000),
                cost_usd=round(rng.uniform(0.0001, 0.05), 7) if priced else None,
                feature=rng.choice(FEATURES),
                team=rng.choice(TEAMS),
                environment=rng.choice(ENVIRONMENTS),
                user_hash=rng.choice(USERS),
                source="cache" if rng.random() < 0.05 else "sdk",
            )
        )
    return calls


@dataclass(frozen=True)
class Sums:
    cost: float = 0.0
    calls: int = 0


def logged(engine: Engine) -> list[LLMCall]:
    with engine.connect() as connection:
        return [LLMCall(**row._mapping) for row in connection.execute(select(LLMCall))]


def brute(
    calls: list[LLMCall], by: str | None, start: datetime, end: datetime
) -> dict[str | None, Sums]:
    """Cost and calls per group, summed in Python from the call log: the calls that reached
    OpenAI (not the cache's) with start <= ts < end."""
    found: dict[str | None, Sums] = defaultdict(Sums)
    for call in calls:
        if call.source == "cache" or not start <= utc(call.ts) < end:
            continue
        key = None if by is None else getattr(call, "user_hash" if by == "user" else by) or None
        before = found[key]
        found[key] = Sums(before.cost + (call.cost_usd or 0.0), before.calls + 1)
    return dict(found)


def report(engine: Engine, by: str = "feature", since: str = "1d", **extra: object) -> CostReport:
    options: dict[str, object] = {
        "now": NOW,
        "period": parse_since(since, NOW, by),
        "by": by,
        "daily_budget_usd": BUDGET,
        "burn_window_seconds": WINDOW,
        **extra,
    }
    return cost_report(engine, **options)  # type: ignore[arg-type]


@pytest.fixture
def filled(store: Engine) -> Engine:
    """Three days of calls before NOW, a few in NOW's minute after NOW (counted: the period
    is whole minutes) and in the next minute (not counted), written the real way."""
    write_calls(store, traffic(1, 1500, NOW - timedelta(days=3), NOW))
    write_calls(store, traffic(2, 20, NOW, NOW.replace(second=59)))
    write_calls(
        store,
        traffic(3, 20, NOW.replace(second=0) + timedelta(minutes=1), NOW + timedelta(minutes=3)),
    )
    return store


def approx(value: float) -> object:
    return pytest.approx(value, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("by", BY_VALUES)
def test_the_report_is_the_sum_of_the_call_log(filled: Engine, by: str) -> None:
    calls = logged(filled)
    found = report(filled, by, "1d", top=3)
    period = found.period
    assert period.end == datetime(2026, 3, 10, 14, 18, tzinfo=UTC)
    assert period.start == period.end - timedelta(days=1)
    assert period.previous == Period(period.start - timedelta(days=1), period.start)

    total = brute(calls, None, period.start, period.end)[None]
    before = brute(calls, None, period.previous.start, period.start)[None]
    assert (found.totals.calls, found.totals.cost_usd) == (total.calls, approx(total.cost))
    assert found.previous_totals.calls == before.calls
    assert found.previous_totals.cost_usd == approx(before.cost)
    assert found.change == approx((total.cost - before.cost) / before.cost)
    assert found.totals.avg_cost_per_call == approx(total.cost / total.calls)
    assert found.totals.cost_per_1k_calls == approx(total.cost / total.calls * 1000)

    groups = brute(calls, by, period.start, period.end)
    previous = brute(calls, by, period.previous.start, period.start)
    ranked = sorted(groups.items(), key=lambda item: -item[1].cost)
    assert [g.key for g in found.groups] == [key for key, _ in ranked[:3]]
    for group in found.groups:
        expected, earlier = groups[group.key], previous.get(group.key, Sums())
        assert (group.cost_usd, group.calls) == (approx(expected.cost), expected.calls)
        assert group.previous_cost_usd == approx(earlier.cost)
        assert group.previous_calls == earlier.calls
        assert group.avg_cost_per_call == approx(expected.cost / expected.calls)
        assert group.change == approx((expected.cost - earlier.cost) / earlier.cost)
        assert found.share(group.cost_usd) == approx(expected.cost / total.cost)
    assert found.groups_seen == len(groups)
    assert found.rest.groups == len(groups) - 3
    assert found.rest.cost_usd == approx(sum(s.cost for _, s in ranked[3:]))
    assert found.rest.calls == sum(s.calls for _, s in ranked[3:])
    assert (None in groups) is (by != "model")  # a model is never missing
    everything = report(filled, by, "1d", top=100)
    assert {g.key for g in everything.groups} == set(groups)
    assert everything.rest.groups == 0
    assert everything.rest.cost_usd == approx(0)
    assert sum(everything.share(g.cost_usd) or 0 for g in everything.groups) == approx(1)
    assert everything.groups[-1].cost_usd <= everything.groups[0].cost_usd


def test_any_period_and_the_one_before_it(filled: Engine) -> None:
    calls = logged(filled)
    for since in ("30m", "6h", "2d", "2026-03-08T09:30:45+01:00"):
        found = report(filled, "model", since)
        period = found.period
        total = brute(calls, None, period.start, period.end).get(None, Sums())
        before = brute(calls, None, period.previous.start, period.start).get(None, Sums())
        assert found.totals.calls == total.calls, since
        assert found.totals.cost_usd == approx(total.cost), since
        assert found.previous_totals.cost_usd == approx(before.cost), since
        assert found.period_budget_usd == approx(BUDGET * period.span / timedelta(days=1))
        assert found.period_percent_used == approx(total.cost / found.period_budget_usd * 100)
    assert period.start == datetime(2026, 3, 8, 8, 30, tzinfo=UTC)  # the time's minute


def test_today_the_burn_and_the_runway(filled: Engine) -> None:
    calls = logged(filled)
    found = report(filled)
    midnight = datetime(2026, 3, 10, tzinfo=UTC)
    today = brute(calls, None, midnight, found.period.end)[None]
    assert found.spent_today_usd == approx(today.cost)
    assert found.remaining_today_usd == approx(max(BUDGET - today.cost, 0))
    assert found.percent_used_today == approx(today.cost / BUDGET * 100)
    # The detector's window: the whole minutes from 14:12, the current one as far as it went.
    burn_start = datetime(2026, 3, 10, 14, 12, tzinfo=UTC)
    assert found.burn_window_seconds == (NOW - burn_start).total_seconds()
    burned = brute(calls, None, burn_start, found.period.end)[None].cost
    burn = burned / (NOW - burn_start).total_seconds() * 3600
    assert found.burn_usd_per_hour == approx(burn)
    expected = budget_runway(BUDGET, today.cost, burn, NOW)
    assert found.runway.resets_at == expected.resets_at == datetime(2026, 3, 11, tzinfo=UTC)
    assert found.runway.spent == approx(expected.spent)
    assert found.runway.projected_at_reset == approx(expected.projected_at_reset)
    assert found.runway.seconds_left == approx(expected.seconds_left)


def test_cache_hits_cost_nothing_upstream(store: Engine) -> None:
    paid = CallRecord(ts=NOW, model="gpt-4.1", status="success", latency_ms=5, cost_usd=0.5)
    cached = CallRecord(
        ts=NOW,
        model="gpt-4.1",
        status="success",
        latency_ms=1,
        cost_usd=0.5,
        source="cache",
        user_hash="u1",
    )
    write_calls(store, [paid, cached])
    for by in ("model", "user"):
        found = report(store, by)
        assert (found.totals.calls, found.totals.cost_usd) == (1, 0.5)
        assert [(g.key, g.calls, g.cost_usd) for g in found.groups] == [
            ("gpt-4.1" if by == "model" else None, 1, 0.5)
        ]


def test_an_empty_store(store: Engine) -> None:
    found = report(store, "user")
    assert (found.totals.calls, found.groups, found.groups_seen) == (0, [], 0)
    assert found.change is None
    assert found.totals.avg_cost_per_call is None
    assert found.runway.seconds_left is None  # nothing burning
    assert (found.spent_today_usd, found.remaining_today_usd) == (0, BUDGET)


def test_a_group_new_in_this_period_has_no_change(store: Engine) -> None:
    write_calls(
        store,
        [
            CallRecord(
                ts=NOW - timedelta(hours=30),
                model="m",
                status="success",
                latency_ms=1,
                feature="old",
                cost_usd=1.0,
            ),
            CallRecord(
                ts=NOW - timedelta(hours=1),
                model="m",
                status="success",
                latency_ms=1,
                feature="old",
                cost_usd=3.0,
            ),
            CallRecord(
                ts=NOW - timedelta(hours=1),
                model="m",
                status="success",
                latency_ms=1,
                feature="new",
                cost_usd=2.0,
            ),
        ],
    )
    found = report(store)
    assert [(g.label, g.change) for g in found.groups] == [("old", 2.0), ("new", None)]
    assert found.change == 4.0


def test_token_quotas_and_their_runway(store: Engine) -> None:
    minute = NOW.replace(second=0)
    records = []
    # gpt-4.1: 1,000 tokens at 14:14 and 14:15, 2,000 at 14:16, 1,000 at 14:17 (so far).
    for at, tokens in (
        (minute - timedelta(minutes=3), 1000),
        (minute - timedelta(minutes=2), 1000),
        (minute - timedelta(minutes=1), 2000),
        (minute, 1000),
    ):
        records.append(
            CallRecord(
                ts=at,
                model="gpt-4.1",
                status="success",
                latency_ms=1,
                input_tokens=tokens // 2,
                output_tokens=tokens - tokens // 2,
                cost_usd=0.01,
            )
        )
    records.append(
        CallRecord(
            ts=minute,
            model="gpt-4.1-mini",
            status="success",
            latency_ms=1,
            input_tokens=300,
            output_tokens=0,
            cost_usd=0.001,
        )
    )
    write_calls(store, records)
    quota = {"gpt-4.1": 2_000, "*": 100_000, "o3": 500, "gpt-4.1-mini": 100}
    found = report(store, tpm_quota=quota, tpm_windows=(120, 600))
    quotas = {q.model: q for q in found.token_quotas}
    assert list(quotas) == ["*", "gpt-4.1", "gpt-4.1-mini", "o3"]
    # As the tpm_runway rule reads them: the 2-min window is the minutes from 14:15 (162 s so
    # far), the widest (10 min) those from 14:07 (642 s); their centres are 240 s apart.
    recent_minutes, wide_minutes = 162 / 60, 642 / 60
    gpt = quotas["gpt-4.1"]
    assert gpt.recent_tpm == pytest.approx(4000 / recent_minutes)
    assert gpt.earlier_tpm == pytest.approx(5000 / wide_minutes)
    # 1,481 tokens a minute, up from 467 on the wider average: the quota in about two minutes.
    expected = rate_runway(2000, 4000 / recent_minutes, 5000 / wide_minutes, 240)
    assert gpt.runway_seconds == pytest.approx(expected)
    assert gpt.runway_seconds == pytest.approx(122.7, abs=0.1)
    mini = quotas["gpt-4.1-mini"]
    assert mini.recent_tpm == pytest.approx(300 / recent_minutes)
    assert mini.runway_seconds == 0  # over its quota now
    assert quotas["*"].recent_tpm == pytest.approx(4300 / recent_minutes)
    assert quotas["*"].runway_seconds == pytest.approx(
        rate_runway(100_000, 4300 / recent_minutes, 5300 / wide_minutes, 240)
    )
    assert (quotas["o3"].recent_tpm, quotas["o3"].runway_seconds) == (0, None)


# (since, by, the period's start or the error's words)
SINCE_CASES = [
    ("30m", "feature", datetime(2026, 3, 10, 13, 48, tzinfo=UTC)),
    ("24h", "feature", datetime(2026, 3, 9, 14, 18, tzinfo=UTC)),
    ("7d", "user", datetime(2026, 3, 3, 14, 18, tzinfo=UTC)),
    ("2w", "team", datetime(2026, 2, 24, 14, 18, tzinfo=UTC)),
    ("31d", "model", datetime(2026, 2, 7, 14, 18, tzinfo=UTC)),
    (" 1h ", "feature", datetime(2026, 3, 10, 13, 18, tzinfo=UTC)),
    ("120s", "feature", datetime(2026, 3, 10, 14, 16, tzinfo=UTC)),
    ("2026-03-10T00:00:00Z", "feature", datetime(2026, 3, 10, tzinfo=UTC)),
    ("2026-03-10T09:00:30+09:00", "user", datetime(2026, 3, 10, tzinfo=UTC)),
    ("8d", "user", "at most 7 days for by=user"),
    ("2026-03-01T00:00:00Z", "user", "at most 7 days"),
    ("32d", "feature", "at most 31 days"),
    ("5w", "feature", "at most 31 days"),
    ("999999w", "feature", "at most 31 days"),
    ("0m", "feature", "at least a minute"),
    ("30s", "feature", "at least a minute"),
    ("90s", "feature", "whole minutes"),
    ("999999999w", "team", "at most 31 days"),
    ("2026-03-10T00:00:00", "feature", "UTC offset"),
    ("2026-03-11T00:00:00Z", "feature", "in the past"),
    ("0001-01-01T00:00:00+14:00", "feature", "out of range"),
    ("7 days", "feature", "RFC 3339"),
    ("-1d", "feature", "RFC 3339"),
    ("", "feature", "RFC 3339"),
]


@pytest.mark.parametrize(("since", "by", "expected"), SINCE_CASES)
def test_parse_since(since: str, by: str, expected: datetime | str) -> None:
    if isinstance(expected, str):
        with pytest.raises(PeriodError, match=expected):
            parse_since(since, NOW, by)
        return
    period = parse_since(since, NOW, by)
    assert period.start == expected
    assert period.end == datetime(2026, 3, 10, 14, 18, tzinfo=UTC)


def _settings(tmp_path: Path, rules: str | None) -> Settings:
    path = None
    if rules is not None:
        path = tmp_path / "rules.toml"
        path.write_text(rules)
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        daily_budget_usd=BUDGET,
        detector_window_seconds=WINDOW,
        rules_file=path,
    )


# (the rules file, the burn window, tpm_runway's window, the widest; the notes' words)
WINDOW_CASES = [
    (None, 600, 120, 600, []),
    ("[rules.budget_runway]\nenabled = false\n", WINDOW, 120, 600, ["budget_runway is disabled"]),
    ("[rules.budget_runway]\nwindow_seconds = 180\n", 180, 120, 600, []),
    ("[rules.budget_runway]\nwindow_seconds = 0\n", WINDOW, 120, 600, []),
    (
        '[tpm_quota]\n"*" = 1000\n[rules.tpm_runway]\nenabled = false\n',
        600,
        WINDOW,
        600,
        ["tpm_runway is disabled"],
    ),
    (
        "[rules.budget_runway]\nwindow_seconds = 900\n[rules.tpm_runway]\nwindow_seconds = 300\n",
        900,
        300,
        900,
        [],
    ),
]


@pytest.mark.parametrize(("rules", "burn", "tpm", "widest", "notes"), WINDOW_CASES)
def test_the_report_reads_the_windows_the_detector_reads(
    engine: Engine,
    tmp_path: Path,
    rules: str | None,
    burn: int,
    tpm: int,
    widest: int,
    notes: list[str],
) -> None:
    """The burn over budget_runway's window (600 s by default), the detector's when the rule is
    off; tokens per minute over tpm_runway's against the widest: as /metrics chooses them."""
    settings = _settings(tmp_path, rules)
    loaded = load_rules(settings.rules_file)
    windows = runway_windows(loaded, WINDOW)
    assert (windows.burn_seconds, windows.tpm_seconds, windows.tpm_widest_seconds) == (
        burn,
        tpm,
        widest,
    )
    exported = signal_windows(loaded, WINDOW)
    for signal in ("budget_runway_hours", "tpm_runway_minutes", "error_rate", "nothing"):
        assert signal_window(loaded, signal, WINDOW) == exported.get(signal, WINDOW)
    report, said = read_report(settings, engine, "feature", Period.ending(NOW, MINUTE), 10, NOW)
    # Whole minutes, the current one as far as it went (NOW is 42 s into its minute).
    assert report.burn_window_seconds == burn + 42
    assert len(said) == len(notes)
    for words, note in zip(notes, said, strict=True):
        assert words in note


def test_the_store_refuses_an_unbounded_user_scan(store: Engine) -> None:
    with pytest.raises(PeriodError):
        cost_report(
            store,
            now=NOW,
            period=Period.ending(NOW, MAX_USER_SPAN + timedelta(minutes=1)),
            by="user",
            daily_budget_usd=BUDGET,
            burn_window_seconds=WINDOW,
        )
    assert report(store, "team", "31d").period.span == MAX_SPAN


def _at(hh: int, mm: int = 0) -> datetime:
    return datetime(2026, 3, 10, hh, mm, tzinfo=UTC)


@pytest.mark.parametrize(
    ("now", "spent", "burn", "text"),
    [
        (_at(14), 30, 10, "runs out in 2.0 h at 16:00 UTC"),
        (_at(23, 30), 49, 8, "runs out in 8 min at 23:37 UTC"),
        (
            _at(23, 30),
            47.5,
            4,
            "resets first (00:00 UTC, in 30 min); tomorrow's budget runs out in 13.0 h, "
            "at 03-11 12:30 UTC",
        ),
        (
            _at(23, 30),
            47.5,
            1,
            "resets first (00:00 UTC, in 30 min): $48.00 of $50.00 spent by then at this rate",
        ),
        (_at(12), 10, 0, "not in sight (nothing spent since 11:55 UTC)"),
        (_at(12), 60, 5, "used up; the budget starts again at 00:00 UTC (in 12.0 h)"),
    ],
)
def test_the_runway_in_words(now: datetime, spent: float, burn: float, text: str) -> None:
    seen = SimpleNamespace(
        runway=budget_runway(BUDGET, spent, burn, now), now=now, burn_window_seconds=300
    )
    assert runway_text(seen) == text  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("current", "ratio", "text"),
    [(2, 1.0, "+100 %"), (0, -1.0, "-100 %"), (1, None, "new"), (0, None, "-"), (140, 139, "x140")],
)
def test_changes_in_words(current: float, ratio: float | None, text: str) -> None:
    assert change_text(current, ratio) == text


# --- GET /v1/costs ------------------------------------------------------------------------

INGEST = "cost-ingest-key"
OPERATOR = "cost-operator-key"
ALICE = {"Authorization": f"Bearer {OPERATOR}"}


def _api(engine: Engine) -> httpx.AsyncClient:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        ingest_api_keys=INGEST,
        operator_api_keys=f"alice:{OPERATOR}",
        daily_budget_usd=BUDGET,
    )
    return api_client(settings, engine, None)  # type: ignore[arg-type]  # no Temporal here


@pytest.fixture
async def api(store: Engine) -> AsyncIterator[httpx.AsyncClient]:
    """The API over SQLite and PostgreSQL."""
    async with _api(store) as client:
        yield client


@pytest.fixture
async def sqlite_api(engine: Engine) -> AsyncIterator[httpx.AsyncClient]:
    """The API over SQLite only: refusals do not read the store."""
    async with _api(engine) as client:
        yield client


async def test_the_endpoint_needs_an_operator_key(sqlite_api: httpx.AsyncClient) -> None:
    api = sqlite_api
    assert (await api.get("/v1/costs")).status_code == 401
    wrong = await api.get("/v1/costs", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    ingest = await api.get("/v1/costs", headers={"Authorization": f"Bearer {INGEST}"})
    assert ingest.status_code == 403


@pytest.mark.parametrize(
    ("query", "field", "words"),
    [
        ({"by": "country"}, "query.by", "feature"),
        ({"since": "yesterday"}, "query.since", "RFC 3339"),
        ({"since": "40d"}, "query.since", "at most 31 days"),
        ({"since": "90s"}, "query.since", "whole minutes"),
        ({"since": "2026-03-10T00:00:00"}, "query.since", "UTC offset"),
        ({"since": "8d", "by": "user"}, "query.since", "at most 7 days for by=user"),
        ({"since": "x" * 65}, "query.since", "65"),
        ({"top": "0"}, "query.top", ""),
        ({"top": "101"}, "query.top", ""),
        ({"top": "many"}, "query.top", ""),
    ],
)
async def test_bad_parameters_are_a_422_naming_them(
    sqlite_api: httpx.AsyncClient, query: dict[str, str], field: str, words: str
) -> None:
    answer = await sqlite_api.get("/v1/costs", params=query, headers=ALICE)
    assert answer.status_code == 422, answer.text
    body = answer.json()
    assert [e["field"] for e in body["errors"]] == [field]
    assert words in body["detail"] or words.isdigit()


async def test_the_endpoint_answers_the_report(api: httpx.AsyncClient, store: Engine) -> None:
    now = datetime.now(UTC)
    write_calls(store, traffic(4, 300, now - timedelta(hours=20), now))
    write_calls(store, traffic(5, 100, now - timedelta(hours=44), now - timedelta(hours=24)))
    answer = await api.get(
        "/v1/costs", params={"by": "team", "since": "1d", "top": 2}, headers=ALICE
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    calls = logged(store)
    start = datetime.fromisoformat(body["period"]["since"])
    end = datetime.fromisoformat(body["period"]["until"])
    assert end - start == timedelta(days=1)
    total = brute(calls, None, start, end)[None]
    groups = brute(calls, "team", start, end)
    assert body["calls"] == total.calls
    assert body["total_usd"] == pytest.approx(total.cost, abs=1e-5)
    assert body["budget_usd"] == BUDGET
    assert body["avg_cost_per_call"] == pytest.approx(total.cost / total.calls, abs=1e-6)
    assert (
        body["previous"]["calls"]
        == brute(calls, None, start - timedelta(days=1), start)[None].calls
    )
    assert (len(body["groups"]), body["groups_seen"]) == (2, len(groups))
    for group in body["groups"]:
        key = None if group["missing"] else group["key"]
        assert group["calls"] == groups[key].calls
        assert group["share"] == pytest.approx(groups[key].cost / total.cost, abs=1e-5)
    assert body["other"]["groups"] == len(groups) - 2
    assert body["runway_seconds"] is None or body["runway_seconds"] >= 0
    assert set(body) >= {
        "total_usd",
        "calls",
        "budget_usd",
        "remaining_usd",
        "percent_used",
        "avg_cost_per_call",
        "runway_seconds",
        "groups",
    }
    by_user = await api.get("/v1/costs", params={"by": "user", "since": "7d"}, headers=ALICE)
    assert by_user.status_code == 200
    assert {g["key"] for g in by_user.json()["groups"]} <= {*USERS[:-1], "(none)"}


# --- pagerloop costs ------------------------------------------------------------------------

runner = CliRunner()


@pytest.fixture
def cli_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'stores.db'}"
    monkeypatch.setenv("PAGERLOOP_DATABASE_URL", url)
    monkeypatch.setenv("PAGERLOOP_DAILY_BUDGET_USD", str(BUDGET))
    monkeypatch.delenv("PAGERLOOP_RULES_FILE", raising=False)
    engine = make_engine(url)
    create_schema(engine)
    yield engine
    engine.dispose()


def test_the_command_prints_the_report(cli_store: Engine) -> None:
    now = datetime.now(UTC)
    write_calls(cli_store, traffic(6, 400, now - timedelta(days=6), now))
    result = runner.invoke(cli, ["costs", "--by", "team", "--since", "7d"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for words in ("costs by team", "total", "today", "remaining", "burn", "runway", "share"):
        assert words in result.output
    assert "platform" in result.output
    assert "(none)" in result.output

    as_json = runner.invoke(
        cli, ["costs", "--by", "model", "--since", "2d", "--json", "--top", "2"]
    )
    assert as_json.exit_code == 0, as_json.output
    body = json.loads(as_json.output)
    assert (body["by"], len(body["groups"])) == ("model", 2)
    start = datetime.fromisoformat(body["period"]["since"])
    end = datetime.fromisoformat(body["period"]["until"])
    assert body["calls"] == brute(logged(cli_store), None, start, end)[None].calls

    default = runner.invoke(cli, ["costs"], env={"COLUMNS": "200"})
    assert default.exit_code == 0, default.output
    assert "costs by feature" in default.output


def test_the_command_refuses_bad_options(cli_store: Engine) -> None:
    bad_by = runner.invoke(cli, ["costs", "--by", "country"])
    assert bad_by.exit_code == 2
    assert "--by" in bad_by.output
    too_long = runner.invoke(cli, ["costs", "--by", "user", "--since", "8d"])
    assert too_long.exit_code == 2
    assert "at most 7 days" in too_long.output
    assert runner.invoke(cli, ["costs", "--top", "0"]).exit_code == 2


def test_an_empty_store_on_the_command_line(cli_store: Engine) -> None:
    result = runner.invoke(cli, ["costs", "--by", "user"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "no calls in the period" in result.output
    assert "not in sight" in result.output
