from __future__ import annotations

from pathlib import Path

import pytest

from config import ConfigurationError, Settings, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("PAGERLOOP_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env


def test_defaults_follow_the_contract() -> None:
    settings = load_settings()
    assert settings.database_url == "sqlite:///.pagerloop/stores.db"
    assert settings.temporal_address == "localhost:7233"
    assert settings.temporal_namespace == "default"
    assert settings.task_queue == "pagerloop"
    assert settings.temporal_ui_port == 8233
    assert (settings.api_host, settings.api_port) == ("127.0.0.1", 8080)
    assert settings.detector_interval_seconds == 30
    assert settings.detector_window_seconds == 300
    assert str(settings.slack_api_url) == "https://slack.com/api/"
    assert str(settings.pagerduty_events_url) == "https://events.pagerduty.com/"
    assert settings.daily_budget_usd == 500
    assert not (settings.slack_enabled)
    assert not (settings.pagerduty_enabled)
    assert not (settings.jira_enabled)


def test_a_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGERLOOP_API_PORT", "eighty")
    monkeypatch.setenv("PAGERLOOP_DETECTOR_INTERVAL_SECONDS", "0")
    with pytest.raises(ConfigurationError) as error:
        load_settings()
    assert "PAGERLOOP_API_PORT" in str(error.value)
    assert "PAGERLOOP_DETECTOR_INTERVAL_SECONDS" in str(error.value)


def test_lists_are_comma_separated_and_secrets_stay_hidden(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PAGERLOOP_INGEST_API_KEYS", "key-one, key-two,")
    monkeypatch.setenv("PAGERLOOP_SLACK_ALLOWED_USERS", "U1,U2")
    monkeypatch.setenv("PAGERLOOP_SLACK_BOT_TOKEN", "xoxb-very-secret")
    settings = load_settings()
    assert [k.get_secret_value() for k in settings.ingest_api_keys] == ["key-one", "key-two"]
    assert settings.slack_allowed_users == ["U1", "U2"]
    assert settings.slack_enabled
    shown = repr(settings) + str(settings.model_dump())
    assert "xoxb-very-secret" not in shown
    assert "key-one" not in shown


def test_dotenv_is_read(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("PAGERLOOP_TASK_QUEUE=from-dotenv\nPAGERLOOP_API_PORT=9999\n")
    settings = load_settings()
    assert (settings.task_queue, settings.api_port) == ("from-dotenv", 9999)


def test_outside_dev_mode_inbound_secrets_are_required() -> None:
    settings = Settings(slack_bot_token="xoxb-1", ingest_api_keys="k", user_hash_salt="salt")
    with pytest.raises(ConfigurationError) as error:
        settings.require_inbound_secrets()
    assert "PAGERLOOP_SLACK_SIGNING_SECRET" in str(error.value)

    no_keys = Settings(user_hash_salt="salt")
    with pytest.raises(ConfigurationError) as error:
        no_keys.require_inbound_secrets()
    assert "PAGERLOOP_INGEST_API_KEYS" in str(error.value)

    Settings(
        slack_bot_token="xoxb-1", slack_signing_secret="s", ingest_api_keys="k", user_hash_salt="x"
    ).require_inbound_secrets()
    Settings(dev_mode=True).require_inbound_secrets()  # dev mode starts without them


def test_outside_dev_mode_the_user_hash_salt_is_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGERLOOP_INGEST_API_KEYS", "k")
    monkeypatch.setenv("PAGERLOOP_USER_HASH_SALT", "")  # as compose passes an unset one
    settings = load_settings()
    [missing] = settings.missing_inbound_secrets()
    assert missing.startswith("PAGERLOOP_USER_HASH_SALT")
    with pytest.raises(ConfigurationError, match="PAGERLOOP_USER_HASH_SALT") as error:
        settings.require_inbound_secrets()
    assert "PAGERLOOP_INGEST_API_KEYS" not in str(error.value)

    monkeypatch.setenv("PAGERLOOP_USER_HASH_SALT", "a-random-secret")
    load_settings().require_inbound_secrets()  # nothing missing: it starts
    monkeypatch.setenv("PAGERLOOP_USER_HASH_SALT", "")
    monkeypatch.setenv("PAGERLOOP_DEV_MODE", "true")
    load_settings().require_inbound_secrets()  # dev mode hashes with no salt


def test_empty_optional_secrets_mean_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGERLOOP_SLACK_BOT_TOKEN", "")
    monkeypatch.setenv("PAGERLOOP_JIRA_URL", "")
    settings = load_settings()
    assert not settings.slack_enabled
    assert not settings.jira_enabled


def test_operator_keys_are_named_and_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGERLOOP_OPERATOR_API_KEYS", "alice:k-one, ci-bot:k:two")
    settings = load_settings()
    assert {n: k.get_secret_value() for n, k in settings.operator_api_keys.items()} == {
        "alice": "k-one",
        "ci-bot": "k:two",
    }
    assert "k-one" not in repr(settings)


@pytest.mark.parametrize("value", ["nokey", ":key", "alice:", "a b:key", "alice:1,alice:2"])
def test_bad_operator_keys_stop_the_start(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("PAGERLOOP_OPERATOR_API_KEYS", value)
    with pytest.raises(ConfigurationError, match="PAGERLOOP_OPERATOR_API_KEYS"):
        load_settings()


def test_public_endpoints_default_and_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().public_endpoints == ["metrics", "status"]
    monkeypatch.setenv("PAGERLOOP_PUBLIC_ENDPOINTS", "metrics,secrets")
    with pytest.raises(ConfigurationError, match="PAGERLOOP_PUBLIC_ENDPOINTS"):
        load_settings()
    monkeypatch.setenv("PAGERLOOP_DETECTOR_MAX_SCOPES", "1000")
    monkeypatch.setenv("PAGERLOOP_PUBLIC_ENDPOINTS", "")
    with pytest.raises(ConfigurationError, match="PAGERLOOP_DETECTOR_MAX_SCOPES"):
        load_settings()


def test_an_operator_key_cannot_also_be_an_ingest_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGERLOOP_INGEST_API_KEYS", "app-key,shared")
    monkeypatch.setenv("PAGERLOOP_OPERATOR_API_KEYS", "alice:shared")
    with pytest.raises(ConfigurationError, match="alice"):
        load_settings()
