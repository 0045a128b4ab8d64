"""`PAGERLOOP_ESCALATION_POLICY_FILE`: the escalation policies, and the secrets some levels
carry: PagerDuty routing keys and webhook URLs (they stay in the worker and never enter an
incident's history).

    repeat_interval_seconds = 1800
    auto_resolve_quiet_seconds = 900 # optional: resolve a verified mitigation after this quiet
    [[levels]]                       # the policy of every severity without its own
    name = "L1"
    description = "On-call engineer"
    ack_timeout_seconds = 300
    resolve_timeout_seconds = 1800
    channels = ["slack", "pagerduty", "email", "webhook"]  # who this level tells, each once
    slack_channel = "#llm-oncall"    # optional: the incident's channel otherwise
    pagerduty_routing_key = "..."    # optional: PAGERLOOP_PAGERDUTY_ROUTING_KEY otherwise
    email_to = ["oncall@example.com"]  # optional: PAGERLOOP_EMAIL_TO otherwise
    webhook_urls = ["https://..."]   # optional: PAGERLOOP_WEBHOOK_URLS otherwise
    # jira_project = "OPS"           # with "jira" in channels: PAGERLOOP_JIRA_PROJECT otherwise

    [[severities.SEV4.levels]]       # a severity's own policy
    name = "L1"
    ...

A channel's option (`slack_channel`, `pagerduty_routing_key`, `jira_project`, `email_to`,
`webhook_urls`) needs its channel in `channels`. The channel names are checked against the
registry by the worker (this layer sits below it).

Files written before `channels` still work: without it, a level tells Slack unless
`slack = false`; pages PagerDuty when `page = true`, when it has a routing key, or by
severity otherwise (SEV1/2 at once, SEV3 from L2, SEV4 from L3); opens a Jira ticket when
`jira = true` or `jira_project` is set; emails when `email_to` is set; and posts to the webhook
receivers (none unless some are configured). `slack`, `page` and `jira` cannot be combined with
`channels`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from email.utils import parseaddr
from pathlib import Path
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from config.settings import checked_webhook_urls
from config.tomlfile import read_toml
from domain.escalation import DEFAULT_POLICIES, ChannelTarget, EscalationLevel, EscalationPolicy
from domain.incident import Severity


class PolicyFileError(ValueError):
    pass


# Simple on purpose (the mail server has the last word): one @, no spaces, a dot in the domain.
_EMAIL = re.compile(r"[^@\s<>,;]+@[^@\s<>,;.]+(\.[^@\s<>,;.]+)+")

# Each option of a level, and the channel it belongs to.
_OPTIONS = {
    "slack_channel": "slack",
    "pagerduty_routing_key": "pagerduty",
    "jira_project": "jira",
    "email_to": "email",
    "webhook_urls": "webhook",
}


class LevelIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=16)
    description: str = ""
    ack_timeout_seconds: int = Field(gt=0)
    resolve_timeout_seconds: int = Field(gt=0)
    channels: list[str] | None = Field(default=None, min_length=1)
    slack_channel: str | None = None
    pagerduty_routing_key: SecretStr | None = None
    jira_project: str | None = None
    email_to: list[str] | None = Field(default=None, min_length=1)
    webhook_urls: list[SecretStr] | None = Field(default=None, min_length=1)
    # Any listed channel's own addresses, for channels without a named option above (a
    # channel added later: `to = { ntfy = ["oncall-topic"] }`).
    to: dict[str, list[str]] = {}
    # Before `channels`: Slack (None: yes), PagerDuty and Jira (None: decided as documented).
    slack: bool | None = None
    page: bool | None = None
    jira: bool | None = None

    @field_validator("channels")
    @classmethod
    def _channel_names(cls, names: list[str] | None) -> list[str] | None:
        seen = set()
        for position, name in enumerate(names or [], start=1):
            if not name.strip():
                raise ValueError(f"channel {position} has no name")
            if name in seen:
                raise ValueError(f"channel {name!r} is listed twice")
            seen.add(name)
        return names

    @field_validator("email_to")
    @classmethod
    def _email_addresses(cls, addresses: list[str] | None) -> list[str] | None:
        seen = set()
        for position, address in enumerate(addresses or [], start=1):
            _, bare = parseaddr(address)  # "Team Lead <lead@example.com>" is fine too
            if not _EMAIL.fullmatch(bare):
                raise ValueError(f"address {position} ({address[:64]!r}) is not an email address")
            if bare.lower() in seen:
                raise ValueError(f"address {position} ({address[:64]!r}) is given twice")
            seen.add(bare.lower())
        return addresses

    @field_validator("webhook_urls")
    @classmethod
    def _webhook_urls(cls, urls: list[SecretStr] | None) -> list[SecretStr] | None:
        return None if urls is None else checked_webhook_urls(urls)

    @model_validator(mode="after")
    def _options_of_listed_channels(self) -> Self:
        if self.channels is None:
            if self.to:
                raise ValueError("to names channels: list them in channels")
            return self
        legacy = [key for key in ("slack", "page", "jira") if getattr(self, key) is not None]
        if legacy:
            raise ValueError(
                f"{' and '.join(legacy)} cannot be combined with channels: use channels "
                "(list the channel, or leave it out)"
            )
        for option, channel in _OPTIONS.items():
            if getattr(self, option) is not None and channel not in self.channels:
                raise ValueError(f"{option} is given but {channel!r} is not in channels")
        for channel in self.to:
            if channel not in self.channels:
                raise ValueError(f"to.{channel} is given but {channel!r} is not in channels")
            if channel in _OPTIONS.values():
                option = next(o for o, c in _OPTIONS.items() if c == channel)
                raise ValueError(f"to.{channel}: use {option} for {channel!r}")
        return self


class PolicyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repeat_interval_seconds: int | None = Field(default=None, gt=0)
    auto_resolve_quiet_seconds: int | None = Field(default=None, gt=0)
    levels: list[LevelIn] = Field(min_length=1, max_length=5)


class PolicyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    repeat_interval_seconds: int = Field(default=1800, gt=0)
    auto_resolve_quiet_seconds: int | None = Field(default=None, gt=0)
    levels: list[LevelIn] | None = Field(default=None, min_length=1, max_length=5)
    severities: dict[Severity, PolicyIn] = {}


@dataclass(frozen=True)
class Escalation:
    policies: dict[str, EscalationPolicy] = field(default_factory=lambda: dict(DEFAULT_POLICIES))
    # "SEV2/L2" -> routing key; levels without one page with PAGERLOOP_PAGERDUTY_ROUTING_KEY.
    routing_keys: dict[str, SecretStr] = field(default_factory=dict)
    # "SEV2/L2#1" -> URL, the receivers of levels with their own `webhook_urls`; the level's
    # webhook target lists these names (the workflow never sees a URL). Levels without them
    # post to PAGERLOOP_WEBHOOK_URLS.
    webhook_targets: dict[str, SecretStr] = field(default_factory=dict)

    def routing_key(self, severity: str, level: str, default: SecretStr | None) -> SecretStr | None:
        return self.routing_keys.get(f"{severity}/{level}", default)


def _pages_by_severity(severity: str, number: int) -> bool:
    return {"SEV1": True, "SEV2": True, "SEV3": number >= 2}.get(severity, number >= 3)


def _listed(severity: str, number: int, level: LevelIn) -> list[str]:
    """The channels a level tells: its `channels`, or what the keys before them said."""
    if level.channels is not None:
        return level.channels
    page = level.page
    if page is None:
        page = level.pagerduty_routing_key is not None or _pages_by_severity(severity, number)
    told = {
        "slack": level.slack is not False,
        "pagerduty": page,
        "jira": level.jira if level.jira is not None else level.jira_project is not None,
        "email": level.email_to is not None,
        "webhook": True,  # no receivers, no posts; the built-in policies post on every level
    }
    return [channel for channel, yes in told.items() if yes]


def _policy(
    severity: str,
    levels: list[LevelIn],
    repeat: int,
    auto_resolve: int | None,
    keys: dict[str, SecretStr],
    webhooks: dict[str, SecretStr],
) -> EscalationPolicy:
    built = []
    for number, level in enumerate(levels, start=1):
        if level.pagerduty_routing_key is not None:
            keys[f"{severity}/{level.name}"] = level.pagerduty_routing_key
        receivers = {
            f"{severity}/{level.name}#{position}": url
            for position, url in enumerate(level.webhook_urls or [], start=1)
        }
        webhooks.update(receivers)
        to = {
            "slack": (level.slack_channel,) if level.slack_channel else (),
            "jira": (level.jira_project,) if level.jira_project else (),
            "email": tuple(level.email_to or ()),
            "webhook": tuple(receivers),
            **{channel: tuple(addresses) for channel, addresses in level.to.items()},
        }
        built.append(
            EscalationLevel(
                name=level.name,
                description=level.description,
                ack_timeout_seconds=level.ack_timeout_seconds,
                resolve_timeout_seconds=level.resolve_timeout_seconds,
                channels=tuple(
                    ChannelTarget(channel, to.get(channel, ()))
                    for channel in _listed(severity, number, level)
                ),
            )
        )
    return EscalationPolicy(
        tuple(built), repeat_interval_seconds=repeat, auto_resolve_quiet_seconds=auto_resolve
    )


def load_escalation(path: Path | None) -> Escalation:
    if path is None:
        return Escalation()
    parsed = read_toml(path, PolicyFile, "PAGERLOOP_ESCALATION_POLICY_FILE", PolicyFileError)
    keys: dict[str, SecretStr] = {}
    webhooks: dict[str, SecretStr] = {}
    policies = dict(DEFAULT_POLICIES)
    for severity in (s.value for s in Severity):
        own = parsed.severities.get(Severity(severity))
        if own is not None:
            repeat = own.repeat_interval_seconds or parsed.repeat_interval_seconds
            quiet = own.auto_resolve_quiet_seconds or parsed.auto_resolve_quiet_seconds
            policies[severity] = _policy(severity, own.levels, repeat, quiet, keys, webhooks)
        elif parsed.levels is not None:
            policies[severity] = _policy(
                severity,
                parsed.levels,
                parsed.repeat_interval_seconds,
                parsed.auto_resolve_quiet_seconds,
                keys,
                webhooks,
            )
    return Escalation(policies, keys, webhooks)
