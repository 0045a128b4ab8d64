"""The one configuration object of pagerloop, read from `PAGERLOOP_*` variables and `.env`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, HttpUrl, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class ConfigurationError(Exception):
    """The configuration cannot run the service; the message names the variables."""


_OPERATOR_NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _split_pairs(value: object, expected: str) -> object:
    """`a=b,c=d` as {"a": "b", "c": "d"} (blank items skipped); `expected` names the form in the
    error, e.g. "feature=priority". Anything but a string (a dict from code) passes through."""
    if not isinstance(value, str):
        return value
    pairs = {}
    for item in value.split(","):
        if not item.strip():
            continue
        key, sep, target = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected {expected}, got {item!r}")
        pairs[key.strip()] = target.strip()
    return pairs


FeaturePriority = Literal["critical", "high", "normal", "low"]
PublicEndpoint = Literal["metrics", "status", "openapi", "docs"]
# Prometheus scrapes and a status page are meant to be read without a key; the schema and the
# docs map the whole API, so they are an operator's unless listed.
DEFAULT_PUBLIC: tuple[PublicEndpoint, ...] = ("metrics", "status")


def checked_webhook_urls(urls: list[SecretStr]) -> list[SecretStr]:
    """http(s) URLs with a host, each once; refused by position, never quoted (a receiver's
    URL may hold its token)."""
    seen: dict[str, int] = {}
    for position, url in enumerate(urls, start=1):
        try:
            parts = urlsplit(url.get_secret_value())
            usable = parts.scheme in ("http", "https") and bool(parts.hostname)
        except ValueError:
            usable = False
        if not usable:
            raise ValueError(f"URL {position} is not an http(s) URL with a host")
        if url.get_secret_value() in seen:
            raise ValueError(f"URL {position} repeats URL {seen[url.get_secret_value()]}")
        seen[url.get_secret_value()] = position
    return urls


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PAGERLOOP_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
    )

    dev_mode: bool = False
    data_dir: Path = Path(".pagerloop")
    log_level: str = "INFO"

    database_url: str = "sqlite:///.pagerloop/stores.db"

    temporal_address: str = "localhost:7233"
    temporal_namespace: str = "default"
    task_queue: str = "pagerloop"
    temporal_ui_port: int = Field(default=8233, ge=1, le=65535)
    # Where people open the Temporal UI (links in emails and webhook alerts); unset: the
    # embedded dev server's UI in dev mode, no link otherwise.
    temporal_ui_url: str = ""

    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8080, ge=1, le=65535)
    public_url: str = ""
    ingest_api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    # "alice:key1,ci-bot:key2": the name is the author recorded for what the key does.
    operator_api_keys: Annotated[dict[str, SecretStr], NoDecode] = Field(default_factory=dict)
    # Which of the informational endpoints answer without a key (outside dev mode).
    public_endpoints: Annotated[list[PublicEndpoint], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_PUBLIC)
    )
    max_active_silences: int = Field(default=200, ge=1, le=10_000)
    ingest_max_body_bytes: int = Field(default=5_000_000, gt=0)
    user_hash_salt: SecretStr = SecretStr("")
    quality_sample_rate: float = Field(default=0.1, ge=0, le=1)
    prices_file: Path | None = None
    # Where the SDK's recorder keeps records it cannot deliver yet (store down, app exiting),
    # up to spool_max_bytes; unset: they wait in memory only (up to its queue bound).
    spool_dir: Path | None = None
    spool_max_bytes: int = Field(default=1_000_000_000, gt=0)
    retention_days: int = Field(default=30, ge=1)
    rollup_retention_days: int = Field(default=400, ge=1)

    detector_interval_seconds: int = Field(default=30, ge=1)
    detector_window_seconds: int = Field(default=300, ge=10)
    # Scopes per dimension (model, feature) evaluated, by volume; the rest fold into
    # `<dimension>:(other)`. Bounded so the detector's activity result stays far below
    # Temporal's 2 MB payload limit.
    detector_max_scopes: int = Field(default=50, ge=1, le=100)

    slack_bot_token: SecretStr | None = None
    slack_signing_secret: SecretStr | None = None
    slack_channel: str = "#llm-oncall"
    slack_api_url: HttpUrl = HttpUrl("https://slack.com/api/")
    slack_allowed_users: Annotated[list[str], NoDecode] = Field(default_factory=list)

    pagerduty_routing_key: SecretStr | None = None
    pagerduty_events_url: HttpUrl = HttpUrl("https://events.pagerduty.com")
    pagerduty_webhook_secret: SecretStr | None = None

    jira_url: HttpUrl | None = None
    jira_email: str | None = None
    jira_token: SecretStr | None = None
    jira_project: str = "OPS"
    jira_issue_type: str = "Task"

    # Email is off while the host is unset. STARTTLS (port 587) by default; PAGERLOOP_SMTP_TLS
    # for implicit TLS (port 465); both off: plain, for a local relay.
    smtp_host: str | None = None
    smtp_port: int = Field(default=587, ge=1, le=65535)
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_starttls: bool = True
    smtp_tls: bool = False
    email_from: str | None = None
    email_to: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Alertmanager-format receivers, comma-separated http(s) URLs (a comma inside one as %2C).
    # Secrets: hosted receivers put their token in the URL.
    webhook_urls: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    webhook_secret: SecretStr | None = None

    daily_budget_usd: float = Field(default=500.0, gt=0)

    escalation_policy_file: Path | None = None
    rules_file: Path | None = None

    runbooks_enabled: bool = True
    runbook_verify_seconds: int = Field(default=180, ge=10)
    runbook_diagnosis_window_seconds: int = Field(default=900, ge=60)
    # "chat=critical,summaries=low": what runbooks keep and what they shed first.
    feature_priorities: Annotated[dict[str, FeaturePriority], NoDecode] = Field(
        default_factory=dict
    )
    # "gpt-4.1=gpt-4.1@azure-east,gpt-4o=gpt-4o-mini": what the latency runbook may reroute a
    # model family to; `model@name` is an endpoint the apps name themselves
    # (PAGERLOOP_ENDPOINT_<NAME>_*, pagerloop_sdk.endpoints), so no key comes here.
    fallback_targets: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    # Where the outage runbook tells the app's users (a signed JSON POST: activities.hooks);
    # unset: nobody is told. Signed with PAGERLOOP_NOTIFY_USERS_SECRET, else
    # PAGERLOOP_WEBHOOK_SECRET. Secret: a hosted receiver's URL may hold its token.
    notify_users_url: SecretStr | None = None
    notify_users_secret: SecretStr | None = None
    # The app's public status page, linked in what users are told.
    status_page_url: str = ""
    # "extract=json,invoices=schema:invoice": the check the quality runbook puts on a critical
    # feature's output (a `validate` control, retried once); the app registers its schemas and
    # checks (pagerloop_sdk.register_schema / register_validator).
    output_checks: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    # The SRE's golden-set eval, asked by the quality runbook before it pins a snapshot (a
    # signed JSON POST: activities.golden_set); unset: pins are not evaluated. Signed with
    # PAGERLOOP_GOLDEN_SET_SECRET, else PAGERLOOP_WEBHOOK_SECRET. Secret: the URL may hold a token.
    golden_set_url: SecretStr | None = None
    golden_set_secret: SecretStr | None = None

    @field_validator("ingest_api_keys", "slack_allowed_users", "public_endpoints", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("operator_api_keys", mode="before")
    @classmethod
    def _named_keys(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        keys: dict[str, str] = {}
        for item in value.split(","):
            if not item.strip():
                continue
            name, sep, key = str(item).partition(":")
            if not sep or not _OPERATOR_NAME.fullmatch(name.strip()) or not key.strip():
                raise ValueError(
                    "expected name:key pairs, comma-separated, names of letters, digits, "
                    "`._@-` (at most 64)"
                )
            if name.strip() in keys:
                raise ValueError(f"operator name {name.strip()!r} is given twice")
            keys[name.strip()] = key.strip()
        return keys

    @field_validator("feature_priorities", mode="before")
    @classmethod
    def _pairs(cls, value: object) -> object:
        return _split_pairs(value, "feature=priority")

    @field_validator("fallback_targets", mode="before")
    @classmethod
    def _fallbacks(cls, value: object) -> object:
        # The SDK's own rule for a route, loaded (with openai) only when the setting is given.
        from pagerloop_sdk.endpoints import route_problem

        value = _split_pairs(value, "model=fallback")
        if isinstance(value, dict):
            for model, target in value.items():
                problem = route_problem("reroute", str(target))
                if problem is not None:
                    raise ValueError(f"{model}: {problem}")
        return value

    @field_validator("output_checks", mode="before")
    @classmethod
    def _checks(cls, value: object) -> object:
        # The SDK's own rule for a check name, loaded (with openai) only when the setting is given.
        from pagerloop_sdk.controls import check_problem

        value = _split_pairs(value, "feature=check")
        if isinstance(value, dict):
            for feature, check in value.items():
                problem = check_problem(str(check))
                if problem is not None:
                    raise ValueError(f"{feature}: {problem}")
        return value

    @field_validator("golden_set_url", "notify_users_url")
    @classmethod
    def _hook_url_http(cls, url: SecretStr | None) -> SecretStr | None:
        # A hook's URL is checked (and never quoted) as a webhook receiver's is.
        return None if url is None else checked_webhook_urls([url])[0]

    @field_validator(
        "slack_bot_token",
        "slack_signing_secret",
        "pagerduty_routing_key",
        "pagerduty_webhook_secret",
        "jira_token",
        "jira_url",
        "webhook_secret",
        "golden_set_url",
        "golden_set_secret",
        "notify_users_url",
        "notify_users_secret",
        "smtp_host",
        "smtp_username",
        "smtp_password",
        "email_from",
        "spool_dir",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # An empty variable (`PAGERLOOP_X=` in a .env) means unset, not an empty value.
        return None if value == "" else value

    @field_validator("webhook_urls", mode="before")
    @classmethod
    def _webhook_urls_csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("webhook_urls")
    @classmethod
    def _webhook_urls_http(cls, urls: list[SecretStr]) -> list[SecretStr]:
        return checked_webhook_urls(urls)

    @field_validator("email_to", mode="before")
    @classmethod
    def _email_to_csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("email_from")
    @classmethod
    def _email_from_address(cls, value: str | None) -> str | None:
        if value is not None and "@" not in value:
            raise ValueError("expected an email address")
        return value

    @field_validator("email_to")
    @classmethod
    def _email_to_addresses(cls, value: list[str]) -> list[str]:
        for position, address in enumerate(value, start=1):
            if "@" not in address:
                raise ValueError(f"address {position} ({address[:64]!r}) is not an email address")
        return value

    @model_validator(mode="after")
    def _keys_kept_apart(self) -> Settings:
        ingest = {key.get_secret_value() for key in self.ingest_api_keys}
        shared = [n for n, k in self.operator_api_keys.items() if k.get_secret_value() in ingest]
        if shared:
            # An app holding it could silence and act on incidents: keys must not be shared.
            raise ValueError(
                f"the operator key of {', '.join(shared)} is also an ingest key "
                "(PAGERLOOP_INGEST_API_KEYS): give operators keys of their own"
            )
        return self

    @model_validator(mode="after")
    def _smtp_one_tls(self) -> Settings:
        if self.smtp_tls and self.smtp_starttls:
            if "smtp_starttls" in self.model_fields_set:
                raise ValueError(
                    "PAGERLOOP_SMTP_TLS (implicit TLS, port 465) and PAGERLOOP_SMTP_STARTTLS "
                    "(port 587) are both true: choose one"
                )
            self.smtp_starttls = False  # implicit TLS replaces the STARTTLS default
        if self.smtp_host is not None and self.email_from is None:
            raise ValueError("PAGERLOOP_EMAIL_FROM is required when PAGERLOOP_SMTP_HOST is set")
        return self

    @property
    def slack_enabled(self) -> bool:
        return self.slack_bot_token is not None

    @property
    def pagerduty_enabled(self) -> bool:
        return self.pagerduty_routing_key is not None

    @property
    def jira_enabled(self) -> bool:
        return self.jira_url is not None

    @property
    def email_enabled(self) -> bool:
        return self.smtp_host is not None

    @property
    def webhook_enabled(self) -> bool:
        return bool(self.webhook_urls)

    @property
    def notify_users_enabled(self) -> bool:
        return self.notify_users_url is not None

    @property
    def golden_set_enabled(self) -> bool:
        return self.golden_set_url is not None

    @property
    def api_url(self) -> str:
        return self.public_url or f"http://{self.api_host}:{self.api_port}"

    def missing_inbound_secrets(self) -> list[str]:
        """The secrets the API cannot serve without: inbound integrations that are configured
        but could not verify who is calling, and the salt the end-user ids it takes in are
        hashed with."""
        missing = []
        if self.slack_enabled and self.slack_signing_secret is None:
            missing.append(
                "PAGERLOOP_SLACK_SIGNING_SECRET (Slack is on: PAGERLOOP_SLACK_BOT_TOKEN is set)"
            )
        if not self.ingest_api_keys:
            missing.append("PAGERLOOP_INGEST_API_KEYS (the ingest endpoints need bearer keys)")
        if not self.user_hash_salt.get_secret_value():
            missing.append(
                "PAGERLOOP_USER_HASH_SALT (without it end-user ids are hashed with no secret, "
                "so a known id can be matched to its hash)"
            )
        return missing

    def require_inbound_secrets(self) -> None:
        """Refuse to serve outside dev mode when a request could not be verified or an
        end-user id could not be hashed with a secret."""
        if self.dev_mode:
            return
        missing = self.missing_inbound_secrets()
        if missing:
            raise ConfigurationError(
                "refusing to start outside dev mode without the secrets that verify inbound "
                "requests and hash end-user ids: "
                + "; ".join(missing)
                + ". Set them, or run `pagerloop dev`."
            )


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, with a readable error naming each bad variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"])
            problems.append(f"PAGERLOOP_{field.upper()}: {error['msg']}")
        raise ConfigurationError("invalid configuration: " + "; ".join(problems)) from None
