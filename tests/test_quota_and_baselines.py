"""Issue #16, items 4 to 6: requests per minute against the account's quota (`rpm_quota`, its
rule and runway), the error rate with 429s on demand (`include_rate_limited`), and quality
baselines set by hand per feature (the store on SQLite and PostgreSQL, the CLI, and the drift
rule reading them instead of the rolling 7 days until cleared)."""

from __future__ import annotations

import math
import random
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine
from typer.testing import CliRunner

from cli.main import app
from detectors.config import DetectorRules, RulesFileError, load_rules
from detectors.evaluation import Evaluation, evaluate, reading, window_signals
from detectors.rules import DEFAULT_RULES, RuleState
from detectors.series import to_chart, trigger_series
from detectors.signals import TREND_SIGNALS, Earlier, values
from domain.aggregates import Aggregate, WindowAggregates, WindowSums
from domain.baselines import QualityBaseline
from domain.incident import Severity, Trigger
from stores import quality_baselines
from stores.aggregates import window_aggregates
from stores.engine import create_schema, make_engine
from stores.quality import ScoreRecord, write_scores
from stores.quality_baselines import BaselineRefusedError

RULES = {rule.name: rule for rule in DEFAULT_RULES}
END = datetime(2026, 11, 26, 12, 0, 30, tzinfo=UTC)
NOW = datetime(2026, 11, 26, 12, 0, 45, tzinfo=UTC)
DETECTOR_WINDOW = 300


def rules_file(tmp_path: Path, content: str) -> DetectorRules:
    path = tmp_path / "rules.toml"
    path.write_text(content)
    return load_rules(path)


def windows(by_window: dict[int, dict[str, Aggregate]]) -> WindowAggregates:
    """A result as the store gives it: the widest window's sums and the narrower ones'."""
    widest = max(by_window)
    return WindowAggregates.of_scopes(
        END,
        widest + 30,
        by_window[widest],
        windows={
            seconds: WindowSums.of_scopes(seconds + 30, scopes)
            for seconds, scopes in by_window.items()
            if seconds != widest
        },
    )


def per_rule(aggregates: WindowAggregates, rules: DetectorRules, times: int = 2) -> Evaluation:
    states: dict[str, RuleState] = {}
    for _ in range(times):
        found = evaluate(rules, aggregates, states, 500, window_seconds=DETECTOR_WINDOW)
        states = found.rule_states
    return found


# --- the rules file --------------------------------------------------------------------------


def test_the_rules_file_sets_request_quotas_and_the_error_rates_429s(tmp_path: Path) -> None:
    rules = rules_file(
        tmp_path,
        """
[tpm_quota]
"gpt-4.1" = 2000000

[rpm_quota]
"*" = 20000
"gpt-4.1" = 10000

[rules.error_rate]
include_rate_limited = true
warning = 0.03
""",
    )
    assert rules.request_quota_for("global") == 20_000
    assert rules.request_quota_for("model:gpt-4.1") == 10_000
    assert rules.request_quota_for("model:o3") is None
    assert rules.request_quota_for("feature:chat") is None  # quotas are the account's, per model
    assert rules.quota_for("model:gpt-4.1") == 2_000_000  # the tokens' own, apart
    by_name = {rule.name: rule for rule in rules.rules}
    assert by_name["error_rate"].signal == "non_200_rate"
    assert by_name["error_rate"].warning == 0.03
    assert by_name["rate_limit"].signal == "rate_limit_rate"  # the 429s keep their own rule

    # Without the option, or with it false, 429s stay out of the error rate.
    for content in ("", "[rules.error_rate]\ninclude_rate_limited = false\n"):
        plain = {rule.name: rule for rule in rules_file(tmp_path, content).rules}
        assert plain["error_rate"].signal == "error_rate"
        assert rules_file(tmp_path, content).rpm_quota == {}


@pytest.mark.parametrize("rule", ["rate_limit", "api_outage", "quality"])
def test_only_the_error_rate_takes_include_rate_limited(tmp_path: Path, rule: str) -> None:
    with pytest.raises(RulesFileError) as refused:
        rules_file(tmp_path, f"[rules.{rule}]\ninclude_rate_limited = true\n")
    assert f"rules.{rule}.include_rate_limited: only rules.error_rate takes it" in str(
        refused.value
    )


def test_a_request_quota_must_be_a_number(tmp_path: Path) -> None:
    with pytest.raises(RulesFileError, match=re.escape("rpm_quota.gpt-4.1")):
        rules_file(tmp_path, '[rpm_quota]\n"gpt-4.1" = "lots"\n')


def test_the_rpm_rules_are_the_tokens_twins() -> None:
    quota, runway = RULES["rpm_quota"], RULES["rpm_runway"]
    assert (quota.signal, quota.trigger, quota.above) == (
        "rpm_quota_ratio",
        Trigger.TOKEN_QUOTA,
        True,
    )
    assert (quota.warning, quota.critical, quota.min_samples) == (0.80, 0.95, 1)
    assert quota.window_seconds is None
    assert (runway.signal, runway.trigger, runway.above) == (
        "rpm_runway_minutes", Trigger.TOKEN_QUOTA, False,
    )  # fmt: skip
    assert (runway.warning, runway.critical, runway.window_seconds) == (30.0, 5.0, 120)
    assert "rpm_runway_minutes" in TREND_SIGNALS


# --- the signals -----------------------------------------------------------------------------


def test_request_and_non_200_signals() -> None:
    a = Aggregate(calls=600, successes=560, errors=6, timeouts=2, server_errors=2, rate_limited=30)
    found = values(
        a, 300, scope="model:gpt-4.1", daily_budget_usd=240, cost_today_usd=0, tpm_quota=None,
        rpm_quota=150,
    )  # fmt: skip
    assert found["requests_per_minute"] == pytest.approx(120)  # 600 calls in 5 minutes
    assert found["rpm_quota_ratio"] == pytest.approx(0.8)
    assert found["error_rate"] == pytest.approx(10 / 600)  # 429s are the rate limit's
    assert found["non_200_rate"] == pytest.approx(40 / 600)  # the seed's: every non-200
    assert found["rpm_runway_minutes"] is None  # no trend without an earlier window
    without = values(
        a, 300, scope="model:gpt-4.1", daily_budget_usd=240, cost_today_usd=0, tpm_quota=None
    )
    assert without["rpm_quota_ratio"] is None
    assert values(Aggregate(), 300, scope="global", daily_budget_usd=1, cost_today_usd=0,
                  tpm_quota=None)["non_200_rate"] is None  # fmt: skip


@pytest.mark.parametrize(
    ("recent", "earlier", "minutes"),
    [
        # 80 requests a minute over 2 min (centre 1 min ago), 50 over 10 (5 min ago): +7.5 a
        # minute, 20 to go to 100: 2.7 min.
        pytest.param(80, 50, 20 / 7.5, id="rising"),
        pytest.param(100, 50, 0.0, id="at-the-quota"),
        pytest.param(60, 70, 48 * 60, id="falling-out-of-sight"),
    ],
)
def test_the_request_runway_follows_the_trend(
    recent: float, earlier: float, minutes: float
) -> None:
    found = values(
        Aggregate(calls=int(recent * 2)), 120, scope="global", daily_budget_usd=1,
        cost_today_usd=0, tpm_quota=None, rpm_quota=100,
        earlier=Earlier(tokens_per_minute=0, window_seconds=600, requests_per_minute=earlier),
    )  # fmt: skip
    assert found["rpm_runway_minutes"] == pytest.approx(minutes, abs=0.01)
    assert found["tpm_runway_minutes"] is None  # no token quota
    # An earlier window from a caller that knows no requests: no trend of them.
    old = values(
        Aggregate(calls=int(recent * 2)), 120, scope="global", daily_budget_usd=1,
        cost_today_usd=0, tpm_quota=None, rpm_quota=100, earlier=Earlier(0, 600),
    )  # fmt: skip
    assert old["rpm_runway_minutes"] is None


def test_a_baseline_set_by_hand_replaces_the_rolling_one() -> None:
    rolling = [0.8, 0.9] * 20  # mean 0.85, sd ~0.0506
    a = Aggregate(
        quality_count=20, quality_sum=20 * 0.8,
        baseline_count=40, baseline_sum=sum(rolling), baseline_sumsq=sum(x * x for x in rolling),
    )  # fmt: skip

    def drift(a: Aggregate, baseline: QualityBaseline | None = None) -> float | None:
        found = values(
            a, 600, scope="feature:chat", daily_budget_usd=1, cost_today_usd=0, tpm_quota=None,
            baseline=baseline,
        )  # fmt: skip
        return found["quality_drift_z"]

    assert drift(a) == pytest.approx((0.8 - 0.85) / 0.0506, abs=0.01)
    hand = QualityBaseline(0.95, 0.05)
    assert drift(a, hand) == pytest.approx(-3.0)
    # A feature too new for 30 scores of history is judged against the one set by hand.
    new = Aggregate(quality_count=20, quality_sum=20 * 0.8)
    assert drift(new) is None
    assert drift(new, hand) == pytest.approx(-3.0)
    assert drift(Aggregate(), hand) is None  # no recent scores: nothing to judge


# --- evaluations -----------------------------------------------------------------------------


def requests(per_minute: float, seconds: int) -> Aggregate:
    calls = int(per_minute * (seconds + 30) / 60)  # the windows are read 30 s into a minute
    return Aggregate(calls=calls, successes=calls)


@pytest.mark.parametrize(
    ("per_minute", "severity", "shown"),
    [
        pytest.param(78, None, None, id="under-80"),
        pytest.param(80, None, None, id="at-80"),  # the lines are strict
        pytest.param(84, Severity.SEV3,
                     "requests/min of quota 84.0% > 80.0% over 5 min (462 calls)", id="80"),
        pytest.param(96, Severity.SEV2,
                     "requests/min of quota 96.0% > 95.0% over 5 min (528 calls)", id="95"),
    ],
)  # fmt: skip
def test_the_request_quota_fires_at_80_and_95_percent(
    per_minute: float, severity: Severity | None, shown: str | None
) -> None:
    """Steady requests (no trend: the runway stays out of sight) against 100 a minute."""
    rules = DetectorRules(rpm_quota={"gpt-4.1": 100})
    steady = {
        seconds: {"global": requests(per_minute, seconds),
                  "model:gpt-4.1": requests(per_minute, seconds)}
        for seconds in (120, 300, 600)
    }  # fmt: skip
    found = per_rule(windows(steady), rules)
    assert found.verdicts["rpm_quota|global"] == "insufficient_data"  # no "*" quota
    quota = [f for f in found.firing if f.trigger == Trigger.TOKEN_QUOTA]
    if severity is None:
        assert quota == []
        assert found.verdicts["rpm_quota|model:gpt-4.1"] == "ok"
        return
    [finding] = quota
    assert (finding.scope, finding.severity, finding.rules) == (
        "model:gpt-4.1", severity, ["rpm_quota"],
    )  # fmt: skip
    assert finding.summary == shown
    assert finding.metrics["rpm_quota_ratio"] == pytest.approx(per_minute / 100)
    assert found.verdicts["rpm_runway|model:gpt-4.1"] == "ok"  # flat: out of sight


def test_no_request_quota_no_request_rules() -> None:
    busy = {seconds: {"global": requests(10_000, seconds)} for seconds in (120, 300, 600)}
    found = per_rule(windows(busy), DetectorRules(tpm_quota={"*": 10**9}))
    assert found.verdicts["rpm_quota|global"] == "insufficient_data"
    assert found.verdicts["rpm_runway|global"] == "insufficient_data"
    assert found.firing == []


def test_a_rising_request_rate_fires_the_runway_on_the_quotas_incident() -> None:
    rules = DetectorRules(rpm_quota={"*": 100})
    rising = {120: {"global": requests(80, 120)}, 300: {"global": requests(70, 300)},
              600: {"global": requests(50, 600)}}  # fmt: skip
    found = per_rule(windows(rising), rules)
    [finding] = found.firing
    assert (finding.trigger, finding.severity, finding.rules) == (
        Trigger.TOKEN_QUOTA, Severity.SEV2, ["rpm_runway"],
    )  # fmt: skip
    assert finding.summary.startswith(
        "requests/min reach the quota in 3 min (at 12:03 UTC) < 5 min"
    )
    assert ", at the trend of the last 2 min" in finding.summary
    assert finding.metrics["rpm_runway_minutes"] == pytest.approx(2.67, abs=0.05)
    assert finding.metrics["requests_per_minute"] == pytest.approx(80)
    assert reading(RULES["rpm_runway"], 0.0) == "requests/min at the quota"
    # The same numbers the exporter and the charts read.
    signals = window_signals(rules, windows(rising), 500, DETECTOR_WINDOW)
    assert signals[120]["global"]["rpm_runway_minutes"] == finding.metrics["rpm_runway_minutes"]


@pytest.mark.parametrize(
    ("include", "fires"), [pytest.param(False, False, id="429s-apart"),
                           pytest.param(True, True, id="429s-included")]
)  # fmt: skip
def test_the_error_rate_counts_429s_only_when_asked(
    tmp_path: Path, include: bool, fires: bool
) -> None:
    """1 % errors and 9 % 429s: the rate limit fires either way; the error rate only with
    `include_rate_limited` (its relation to the rate limit then takes it in)."""
    rules = rules_file(
        tmp_path, f"[rules.error_rate]\ninclude_rate_limited = {str(include).lower()}\n"
    )
    mixed = Aggregate(calls=100, successes=90, errors=1, rate_limited=9)
    found = per_rule(windows({120: {"global": mixed}, 600: {"global": mixed}}), rules)
    assert found.rule_states["rate_limit|global"].firing
    assert found.rule_states.get("error_rate|global", RuleState()).firing is fires
    if fires:
        assert "error_rate|global" in found.inhibited  # one problem, one incident
    assert [f.trigger for f in found.firing] == [Trigger.RATE_LIMIT_EXHAUSTION]


def test_the_non_200_error_rate_says_what_it_counts(tmp_path: Path) -> None:
    rules = rules_file(
        tmp_path,
        "[rules.error_rate]\ninclude_rate_limited = true\n[rules.rate_limit]\nenabled = false\n",
    )
    mixed = Aggregate(calls=100, successes=90, errors=1, rate_limited=9)
    found = per_rule(windows({120: {"global": mixed}, 600: {"global": mixed}}), rules)
    [finding] = found.firing
    assert finding.trigger == Trigger.ERROR_RATE
    assert finding.summary == "non-200 rate 10.0% > 5.0% over 2 min (100 calls)"
    assert finding.metrics == {"calls": 100.0, "non_200_rate": pytest.approx(0.1)}


# --- the baselines' store, on SQLite and PostgreSQL -------------------------------------------


def test_set_show_and_clear_baselines(store: Engine) -> None:
    assert quality_baselines.listed(store) == []
    typed = quality_baselines.set_baseline(store, "chat", 0.82, 0.05, set_by="alice", at=NOW)
    assert (typed.scores, typed.source) == (None, "set by hand")
    quality_baselines.set_baseline(
        store, "search", 0.7, 0.1, set_by="bob", at=NOW, scores=400, source="from the last 7d"
    )
    assert quality_baselines.get(store, "chat") == typed
    assert [b.feature for b in quality_baselines.listed(store)] == ["chat", "search"]
    # Setting again replaces it.
    again = quality_baselines.set_baseline(store, "chat", 0.9, 0.02, set_by="carol", at=NOW)
    assert quality_baselines.get(store, "chat") == again
    assert len(quality_baselines.listed(store)) == 2
    # The detector's view: by the scope the feature makes.
    quality_baselines.set_baseline(store, "x' OR 1=1", 0.5, 0.1, set_by="eve", at=NOW)
    with store.connect() as connection:
        scoped = quality_baselines.by_scope(connection)
    assert scoped == {
        "feature:chat": QualityBaseline(0.9, 0.02),
        "feature:search": QualityBaseline(0.7, 0.1, "from the last 7d"),
        "feature:x__OR_1_1": QualityBaseline(0.5, 0.1),
    }
    assert quality_baselines.clear(store, "chat") is True
    assert quality_baselines.clear(store, "chat") is False
    assert quality_baselines.get(store, "chat") is None
    assert quality_baselines.for_scope(store, "feature:chat") is None


@pytest.mark.parametrize(
    ("feature", "mean", "stddev", "field"),
    [
        ("chat", 1.2, 0.05, "mean"),
        ("chat", -0.1, 0.05, "mean"),
        ("chat", math.nan, 0.05, "mean"),
        ("chat", 0.8, 0.0, "stddev"),
        ("chat", 0.8, -0.05, "stddev"),
        ("", 0.8, 0.05, "feature"),
        ("x" * 129, 0.8, 0.05, "feature"),
    ],
)
def test_a_baseline_out_of_bounds_is_refused(
    engine: Engine, feature: str, mean: float, stddev: float, field: str
) -> None:
    with pytest.raises(BaselineRefusedError) as refused:
        quality_baselines.set_baseline(engine, feature, mean, stddev, set_by="a", at=NOW)
    assert refused.value.field == field
    assert quality_baselines.listed(engine) == []


def scattered_scores(seed: int = 11) -> list[ScoreRecord]:
    """Scores over the last 10 days, on two features, a few without a model."""
    rng = random.Random(seed)
    scores = []
    for i in range(2000):
        age = timedelta(minutes=rng.uniform(0, 10 * 24 * 60))
        scores.append(
            ScoreRecord(
                f"c{i}", NOW - age, "eval", round(rng.uniform(0.4, 1.0), 3),
                model=rng.choice(["gpt-4.1", "o3", None]), feature=rng.choice(["chat", "search"]),
            )
        )  # fmt: skip
    return scores


def hour_of(ts: datetime) -> datetime:
    return ts.replace(minute=0, second=0, microsecond=0)


@pytest.mark.parametrize("days", [7, 1, 0.5])
def test_a_baseline_from_a_window_is_the_scores_of_its_hours(store: Engine, days: float) -> None:
    scores = scattered_scores()
    write_scores(store, scores)
    since = NOW - timedelta(days=days)
    kept = [s.score for s in scores if s.feature == "chat" and since <= hour_of(s.ts) <= NOW]
    n = len(kept)
    mean = sum(kept) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in kept) / (n - 1))
    found = quality_baselines.from_window(store, "chat", days, NOW)
    assert found.scores == n
    assert found.mean == pytest.approx(mean, rel=1e-9)
    assert found.stddev == pytest.approx(sd, rel=1e-9)


def test_a_window_with_too_few_scores_is_refused(store: Engine) -> None:
    write_scores(
        store,
        [ScoreRecord(f"c{i}", NOW - timedelta(hours=i), "eval", 0.8, feature="new")
         for i in range(29)]
        + [ScoreRecord(f"d{i}", NOW - timedelta(hours=2), "eval", 0.9, feature="flat")
           for i in range(40)],
    )  # fmt: skip
    with pytest.raises(BaselineRefusedError, match="29 quality scores for feature 'new'"):
        quality_baselines.from_window(store, "new", 7, NOW)
    with pytest.raises(BaselineRefusedError, match="no spread"):
        quality_baselines.from_window(store, "flat", 7, NOW)
    with pytest.raises(BaselineRefusedError, match="a window from"):
        quality_baselines.from_window(store, "new", 365, NOW)


# --- the drift rule with a baseline set by hand, from the store ------------------------------


def quality_traffic(engine: Engine, now: datetime) -> None:
    """Feature chat: a week of history around 0.78 (sd ~0.05, three hours ago), and 25 scores
    over the last few minutes at 0.75: normal against that history (-0.6 sd), above the
    quality rule's 0.7."""
    history = [
        ScoreRecord(f"h{i}", now - timedelta(hours=3, minutes=i), "eval", 0.73 + 0.1 * (i % 2),
                    model="gpt-4.1", feature="chat")
        for i in range(40)
    ]  # fmt: skip
    recent = [
        ScoreRecord(f"r{i}", now - timedelta(seconds=10 + 10 * i), "scorer", 0.75,
                    model="gpt-4.1", feature="chat")
        for i in range(25)
    ]  # fmt: skip
    write_scores(engine, history + recent)


def detector_reads(engine: Engine, now: datetime) -> WindowAggregates:
    """The store's answer to the detector's query: the rules' windows in one scan."""
    return window_aggregates(engine, now, 600, windows=[120, 300])


def evaluate_store(engine: Engine, now: datetime, states: dict[str, RuleState]) -> Evaluation:
    return evaluate(
        DetectorRules(), detector_reads(engine, now), states, 500, window_seconds=DETECTOR_WINDOW
    )


def test_the_drift_rule_reads_the_baseline_set_by_hand_until_cleared(store: Engine) -> None:
    quality_traffic(store, NOW)
    rolling = evaluate_store(store, NOW, {})
    assert rolling.verdicts["quality_drift|feature:chat"] == "ok"
    assert rolling.verdicts["quality|feature:chat"] == "ok"
    assert detector_reads(store, NOW).baselines == {}

    quality_baselines.set_baseline(store, "chat", 0.92, 0.05, set_by="alice", at=NOW)
    result = detector_reads(store, NOW)
    assert result.baselines == {"feature:chat": QualityBaseline(0.92, 0.05)}
    first = evaluate_store(store, NOW, {})
    assert first.verdicts["quality_drift|feature:chat"] == "pending"
    found = evaluate_store(store, NOW, first.rule_states)
    [finding] = found.firing
    assert (finding.trigger, finding.scope, finding.severity) == (
        Trigger.QUALITY_DEGRADATION, "feature:chat", Severity.SEV3,
    )  # fmt: skip
    assert finding.rules == ["quality_drift"]
    # (0.75 - 0.92) / 0.05
    assert finding.metrics["quality_drift_z"] == pytest.approx(-3.4)
    assert finding.metrics["quality_baseline_mean"] == 0.92
    assert finding.metrics["quality_baseline_sd"] == 0.05
    assert finding.metrics["quality_baseline_hand_set"] == 1.0
    assert finding.summary == (  # scores only: no calls to count
        "quality drift -3.40 < -2.00 over 10 min, against the baseline set by hand (0.920 ± 0.050)"
    )
    # Global, the same scores against the rolling baseline: nothing.
    assert found.verdicts["quality_drift|global"] == "ok"

    # The chart of the incident measures the same drift, and says against what.
    series = trigger_series(
        store, Trigger.QUALITY_DEGRADATION, "feature:chat", NOW, config=DetectorRules(),
        daily_budget_usd=500, window_seconds=DETECTOR_WINDOW, minutes=5,
    )  # fmt: skip
    [drift] = [s for s in series if s.rule.name == "quality_drift"]
    assert drift.raw[-1] == pytest.approx(finding.metrics["quality_drift_z"])
    assert "against the baseline set by hand (0.920 ± 0.050)" in to_chart(drift, "q").subtitle

    # Cleared: the rolling baseline again, and the rule recovers.
    assert quality_baselines.clear(store, "chat")
    states = found.rule_states
    for _ in range(RULES["quality_drift"].recover_evaluations):
        later = evaluate_store(store, NOW, states)
        states = later.rule_states
    assert later.verdicts["quality_drift|feature:chat"] == "recovered"
    assert (Trigger.QUALITY_DEGRADATION, "feature:chat") in later.recovered
    cleared = trigger_series(
        store, Trigger.QUALITY_DEGRADATION, "feature:chat", NOW, config=DetectorRules(),
        daily_budget_usd=500, window_seconds=DETECTOR_WINDOW, minutes=5,
    )  # fmt: skip
    [again] = [s for s in cleared if s.rule.name == "quality_drift"]
    assert again.baseline is None
    assert again.raw[-1] == pytest.approx(-0.6, abs=0.05)


def test_a_measured_baseline_is_said_to_be_one(engine: Engine) -> None:
    quality_traffic(engine, NOW)
    measured = QualityBaseline(0.95, 0.05, "from the last 7d")
    result = detector_reads(engine, NOW)
    result.baselines["feature:chat"] = measured
    states: dict[str, RuleState] = {}
    for _ in range(2):
        found = evaluate(DetectorRules(), result, states, 500, window_seconds=DETECTOR_WINDOW)
        states = found.rule_states
    [finding] = found.firing
    assert "against the baseline set by hand (0.950 ± 0.050, from the last 7d)" in finding.summary


# --- the command line ------------------------------------------------------------------------

runner = CliRunner()


@pytest.fixture
def cli_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Engine:
    url = f"sqlite:///{tmp_path / 'stores.db'}"
    monkeypatch.setenv("PAGERLOOP_DATABASE_URL", url)
    engine = make_engine(url)
    create_schema(engine)
    return engine


def cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["quality", "baseline", *args], env={"COLUMNS": "200"})
    return result.exit_code, result.output


def test_the_cli_sets_shows_and_clears_baselines(cli_store: Engine) -> None:
    code, text = cli("show")
    assert (code, "no baselines set" in text) == (0, True)

    code, text = cli("set", "--feature", "chat", "--mean", "0.82", "--stddev", "0.05",
                     "--author", "alice")  # fmt: skip
    assert code == 0, text
    assert "feature chat: baseline 0.820 ± 0.050 (set by hand)" in text
    stored = quality_baselines.get(cli_store, "chat")
    assert stored is not None
    assert (stored.mean, stored.stddev, stored.set_by, stored.scores) == (0.82, 0.05, "alice", None)

    now = datetime.now(UTC)
    write_scores(
        cli_store,
        [ScoreRecord(f"s{i}", now - timedelta(hours=i % 20), "eval", 0.6 + 0.1 * (i % 3),
                     feature="search") for i in range(60)],
    )  # fmt: skip
    code, text = cli("set", "--feature", "search", "--from-window", "24h")
    assert code == 0, text
    assert "from 60 scores (from the last 24h)" in text
    measured = quality_baselines.get(cli_store, "search")
    assert measured is not None
    assert measured.mean == pytest.approx(0.7)
    assert measured.stddev == pytest.approx(math.sqrt(60 * (0.02 / 3) / 59))

    code, text = cli("show")
    assert code == 0
    for shown in ("chat", "search", "alice", "from the last 24h", "-"):
        assert shown in text
    code, text = cli("show", "--feature", "search")
    assert "search" in text
    assert "chat" not in text
    code, text = cli("show", "--feature", "other")
    assert "feature other: no baseline set" in text

    code, text = cli("clear", "--feature", "chat")
    assert code == 0, text
    assert quality_baselines.get(cli_store, "chat") is None
    code, text = cli("clear", "--feature", "chat")
    assert code == 1
    assert "feature chat: no baseline set; set for: search" in text


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--mean", "1.5", "--stddev", "0.05"], "mean 1.5: a quality score, from 0 to 1"),
        (["--mean", "0.8", "--stddev", "0"], "stddev 0.0: above 0"),
        (["--mean", "0.8"], "a typed baseline needs --mean and --stddev"),
        (["--from-window", "7d", "--mean", "0.8"], "either --mean and --stddev, or --from-window"),
        ([], "either --mean and --stddev, or --from-window"),
        (["--from-window", "7 days"], "hours or days, like 24h or 7d"),
        (["--from-window", "120d"], "from 1h to 90d"),
        (["--from-window", "7d"], "0 quality scores for feature 'chat'"),
    ],
)
def test_the_cli_refuses_a_bad_baseline(cli_store: Engine, args: list[str], complaint: str) -> None:
    code, text = cli("set", "--feature", "chat", *args)
    assert code == 2, text
    assert complaint in " ".join(text.replace("│", " ").split())
    assert quality_baselines.listed(cli_store) == []


def test_a_runbooks_re_read_judges_drift_and_requests_as_the_detector_does() -> None:
    """The re-read that verifies a mitigation reads the hand-set baseline and the request quota
    too: else a drift judged against 0.92 by the detector would read as recovered against the
    rolling week, and a request-quota incident would have nothing to verify."""
    from activities.diagnosis import SignalCheck
    from detectors.reading import read_signal

    now = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
    # 40 scores averaging 0.75, a rolling week averaging 0.76 (sd 0.1): -0.1 sd, calm...
    chat = Aggregate(
        calls=40, successes=40, quality_sum=30.0, quality_count=40,
        baseline_count=100, baseline_sum=76.0, baseline_sumsq=76.0**2 / 100 + 0.99,
    )  # fmt: skip
    hand_set = {"feature:chat": QualityBaseline(0.92, 0.05, "set by hand")}
    seen = WindowAggregates.of_scopes(now, 180, {"feature:chat": chat}, baselines=hand_set)
    drift = read_signal(
        SignalCheck("quality_degradation", "feature:chat", now, 180), seen, DetectorRules(), 500
    )
    assert drift.breached  # ... but 3.4 sd under the baseline set by hand
    assert drift.values["quality_drift_z"] == pytest.approx((0.75 - 0.92) / 0.05)

    busy = Aggregate(calls=3 * 480, successes=3 * 480)  # 480 requests a minute of 500
    seen = WindowAggregates.of_scopes(now, 180, {"model:gpt-4.1": busy})
    rules = DetectorRules(rpm_quota={"gpt-4.1": 500})
    quota = read_signal(SignalCheck("token_quota", "model:gpt-4.1", now, 180), seen, rules, 500)
    assert quota.breached
    assert quota.values["rpm_quota_ratio"] == pytest.approx(0.96)
    assert "tokens/min" not in quota.summary  # no token quota set: its rules are not read
