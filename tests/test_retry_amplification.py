"""Retry amplification (runbooks.retries), the retries per feature the diagnosis reads for it
(SQLite and PostgreSQL), and the fallback a deployment configures per model family
(runbooks.models.fallback_for)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine

from activities.diagnosis import DiagnosisQuery, FeatureUsage, ModelRateLimits, top_features
from config import Settings
from runbooks.models import fallback_for
from runbooks.retries import retry_amplification
from stores.llm_calls import CallRecord
from stores.writer import write_calls

NOW = datetime(2026, 11, 26, 12, 0, 25, tzinfo=UTC)  # mid-minute: rollups and rows both answer


def usage(feature: str, calls: int, retries: int) -> FeatureUsage:
    return FeatureUsage(
        feature=feature,
        calls=calls,
        tokens=0,
        cost_usd=0.0,
        rate_limited=0,
        share_of_cost=0.0,
        concurrency=0.0,
        retries=retries,
    )


# --- the judgement ---------------------------------------------------------------------------


def test_more_retries_than_calls_is_a_storm_and_half_as_many_a_warning() -> None:
    findings = retry_amplification(
        [
            usage("search", calls=100, retries=60),  # warning
            usage("chat", calls=100, retries=250),  # storm
            usage("summaries", calls=100, retries=50),  # exactly half: fine
            usage("", calls=40, retries=44),  # storm, calls without a feature
            ModelRateLimits("gpt-4.1", calls=1000, rate_limited=300, share=0.3, retries=1200),
        ]
    )
    assert findings == [
        "retry storm: feature chat retried 250 times for 100 calls "
        "(2.50 retries per call, 3.5x the requests and their cost)",
        "retry storm: model gpt-4.1 retried 1200 times for 1000 calls "
        "(1.20 retries per call, 2.2x the requests and their cost)",
        "retry storm: calls without a feature retried 44 times for 40 calls "
        "(1.10 retries per call, 2.1x the requests and their cost)",
        "retry amplification (warning): feature search retried 60 times for 100 calls "
        "(0.60 retries per call, 1.6x the requests and their cost)",
    ]


def test_exactly_one_retry_per_call_is_a_warning_not_a_storm() -> None:
    [finding] = retry_amplification([usage("chat", calls=100, retries=100)])
    assert finding.startswith("retry amplification (warning): feature chat")


def test_a_handful_of_calls_or_no_retries_say_nothing() -> None:
    assert retry_amplification([usage("chat", calls=3, retries=9)]) == []
    assert retry_amplification([usage("chat", calls=3, retries=9)], min_calls=1) != []
    assert retry_amplification([usage("chat", calls=100, retries=0)]) == []
    assert retry_amplification([usage("chat", calls=0, retries=5)], min_calls=0) == []
    assert retry_amplification([]) == []


# --- the retries the diagnosis reads, per feature ------------------------------------------------


def call(seconds_ago: float, feature: str | None, retries: int, **extra: object) -> CallRecord:
    fields: dict[str, object] = {"model": "gpt-4.1", "latency_ms": 200.0, **extra}
    return CallRecord(
        ts=NOW - timedelta(seconds=seconds_ago),
        status=str(fields.pop("status", "success")),
        feature=feature,
        retry_count=retries,
        **fields,  # type: ignore[arg-type]
    )


def test_the_diagnosis_counts_each_features_retries_in_the_window(store: Engine) -> None:
    write_calls(
        store,
        [
            # search: a retry storm, in whole minutes (rollups) and partial ones (rows)
            *(call(s, "search", 3, status="rate_limited") for s in (5, 70, 130, 400)),
            *(call(s, "search", 0) for s in (10, 200)),
            call(20, "search", 2, model="o3"),  # another model, same feature: added
            call(90, "chat", 1),
            call(100, "chat", 0),
            call(30, None, 4),  # no feature
            call(950, "search", 50),  # before the window
            call(-5, "search", 50),  # after it
            call(15, "cached", 9, source="cache"),  # never reached OpenAI
        ],
    )
    query = DiagnosisQuery(scope="global", end=NOW, window_seconds=900, limit=10)
    found = {f.feature: f for f in top_features(store, query)}
    assert {name: f.retries for name, f in found.items()} == {"search": 14, "chat": 1, "": 4}
    assert {name: (f.calls, f.successes) for name, f in found.items()} == {
        "search": (7, 3),
        "chat": (2, 2),
        "": (1, 1),
    }
    assert retry_amplification(found.values(), min_calls=2) == [
        "retry storm: feature search retried 14 times for 7 calls "
        "(2.00 retries per call, 3.0x the requests and their cost)"
    ]

    scoped = DiagnosisQuery(scope="model:o3", end=NOW, window_seconds=900, limit=10)
    assert [(f.feature, f.retries) for f in top_features(store, scoped)] == [("search", 2)]


# --- the fallback of a model family ----------------------------------------------------------


FALLBACKS = {"gpt-4.1": "gpt-4.1@azure-east", "gpt-4o": "gpt-4o-mini", "o3": "o3"}


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4.1", "gpt-4.1@azure-east"),
        ("gpt-4.1-2025-04-14", "gpt-4.1@azure-east"),  # a dated snapshot: its family's
        ("gpt-4o-2024-08-06", "gpt-4o-mini"),
        ("gpt-4.1-mini", None),  # another family
        ("o3", None),  # to itself: nothing to do
        ("gpt-5", None),
    ],
)
def test_a_model_falls_back_to_its_familys_target(model: str, expected: str | None) -> None:
    assert fallback_for(model, FALLBACKS) == expected


def test_a_snapshots_own_entry_wins_over_its_familys() -> None:
    own = {**FALLBACKS, "gpt-4.1-2025-04-14": "gpt-4.1-mini"}
    assert fallback_for("gpt-4.1-2025-04-14", own) == "gpt-4.1-mini"
    assert fallback_for("gpt-4.1", {}) is None


def test_the_fallbacks_come_from_the_settings() -> None:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        fallback_targets="gpt-4.1 = gpt-4.1@azure-east, gpt-4o=gpt-4o-mini,",
    )
    assert settings.fallback_targets == {"gpt-4.1": "gpt-4.1@azure-east", "gpt-4o": "gpt-4o-mini"}
    for bad in ("gpt-4.1", "gpt-4.1=", "gpt-4.1=mini@Azure East", "=gpt-4o-mini"):
        with pytest.raises(ValueError, match="fallback_targets"):
            Settings(_env_file=None, fallback_targets=bad)  # type: ignore[call-arg]
