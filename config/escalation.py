"""`PAGERLOOP_ESCALATION_POLICY_FILE`: the escalation policies, and the PagerDuty routing keys
per level (secrets: they stay in the worker and never enter an incident's history).

    repeat_interval_seconds = 1800
    auto_resolve_quiet_seconds = 900 # optional: resolve a verified mitigation after this quiet
    [[levels]]                       # the policy of every severity without its own
    name = "L1"
    description = "On-call engineer"
    ack_timeout_seconds = 300
    resolve_timeout_seconds = 1800
    slack_channel = "#llm-oncall"    # optional: the incident's channel otherwise
    pagerduty_routing_key = "..."    # optional: PAGERLOOP_PAGERDUTY_ROUTING_KEY otherwise
    page = true                      # optional: by severity otherwise (SEV1/2 at once, ...)
    jira_project = "OPS"             # optional: open a ticket when this level is reached

    [[severities.SEV4.levels]]       # a severity's own policy
    name = "L1"
    ...
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from config.tomlfile import read_toml
from domain.escalation import DEFAULT_POLICIES, EscalationLevel, EscalationPolicy
from domain.incident import Severity


class PolicyFileError(ValueError):
    pass


class LevelIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=16)
    description: str = ""
    ack_timeout_seconds: int = Field(gt=0)
    resolve_timeout_seconds: int = Field(gt=0)
    slack: bool = True
    slack_channel: str | None = None
    page: bool | None = None
    pagerduty_routing_key: SecretStr | None = None
    jira: bool | None = None
    jira_project: str | None = None


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

    def routing_key(self, severity: str, level: str, default: SecretStr | None) -> SecretStr | None:
        return self.routing_keys.get(f"{severity}/{level}", default)


def _pages_by_severity(severity: str, number: int) -> bool:
    return {"SEV1": True, "SEV2": True, "SEV3": number >= 2}.get(severity, number >= 3)


def _policy(
    severity: str,
    levels: list[LevelIn],
    repeat: int,
    keys: dict[str, SecretStr],
    auto_resolve: int | None,
) -> EscalationPolicy:
    built = []
    for number, level in enumerate(levels, start=1):
        if level.pagerduty_routing_key is not None:
            keys[f"{severity}/{level.name}"] = level.pagerduty_routing_key
        page = level.page
        if page is None:
            page = level.pagerduty_routing_key is not None or _pages_by_severity(severity, number)
        built.append(
            EscalationLevel(
                name=level.name,
                description=level.description,
                ack_timeout_seconds=level.ack_timeout_seconds,
                resolve_timeout_seconds=level.resolve_timeout_seconds,
                slack=level.slack,
                slack_channel=level.slack_channel,
                page=page,
                jira=level.jira if level.jira is not None else level.jira_project is not None,
                jira_project=level.jira_project,
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
    policies = dict(DEFAULT_POLICIES)
    for severity in (s.value for s in Severity):
        own = parsed.severities.get(Severity(severity))
        if own is not None:
            repeat = own.repeat_interval_seconds or parsed.repeat_interval_seconds
            quiet = own.auto_resolve_quiet_seconds or parsed.auto_resolve_quiet_seconds
            policies[severity] = _policy(severity, own.levels, repeat, keys, quiet)
        elif parsed.levels is not None:
            policies[severity] = _policy(
                severity,
                parsed.levels,
                parsed.repeat_interval_seconds,
                keys,
                parsed.auto_resolve_quiet_seconds,
            )
    return Escalation(policies, keys)
