"""Escalation policies: who is told at each level, and how long each level has (pure data).

An incident starts at L1 of its severity's policy. A level that does not acknowledge within
`ack_timeout_seconds`, or does not resolve within `resolve_timeout_seconds` of being reached,
hands the incident to the next level; at the top level the targets are reminded every
`repeat_interval_seconds` while the incident stays unacknowledged (or unresolved past its
deadline). Routing follows the seed: SEV1 and SEV2 page PagerDuty at once, SEV3 starts in
Slack, SEV4 starts as a Jira ticket.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta


@dataclass(frozen=True)
class ChannelTarget:
    """A channel a level tells, and where. `to` is the channel's own kind of address (a Slack
    channel, a Jira project, email addresses, webhook receiver names); empty: the channel's
    default from the settings."""

    channel: str
    to: tuple[str, ...] = ()


@dataclass(frozen=True)
class EscalationLevel:
    name: str
    description: str = ""
    ack_timeout_seconds: int = 300
    resolve_timeout_seconds: int = 1800
    channels: tuple[ChannelTarget, ...] = ()
    # Levels recorded before they listed channels (in the input of incidents still open) said
    # who to tell with these; a level that has them and no channels is read as they said.
    slack: bool | None = None
    slack_channel: str | None = None
    page: bool | None = None
    jira: bool | None = None
    jira_project: str | None = None

    def __post_init__(self) -> None:
        if self.channels or (self.slack, self.page, self.jira) == (None, None, None):
            return
        told = (
            # Slack was on unless a level said otherwise.
            ChannelTarget("slack", _some(self.slack_channel)) if self.slack is not False else None,
            ChannelTarget("pagerduty") if self.page else None,
            ChannelTarget("jira", _some(self.jira_project)) if self.jira else None,
        )
        object.__setattr__(self, "channels", tuple(t for t in told if t is not None))

    def target(self, channel: str) -> ChannelTarget | None:
        """Where this level tells `channel`, or None when it does not use it."""
        return next((t for t in self.channels if t.channel == channel), None)


def _some(value: str | None) -> tuple[str, ...]:
    return (value,) if value else ()


@dataclass(frozen=True)
class EscalationPolicy:
    levels: tuple[EscalationLevel, ...]
    repeat_interval_seconds: int = 1800
    # After a runbook's mitigation is verified, resolve by itself if the signal stays quiet
    # this long; None: propose the resolve and leave it to a person.
    auto_resolve_quiet_seconds: int | None = None

    def level(self, number: int) -> EscalationLevel:
        return self.levels[min(max(number, 1), len(self.levels)) - 1]

    @property
    def top(self) -> int:
        return len(self.levels)

    def described(self, who: tuple[str, ...]) -> EscalationPolicy:
        """The same levels, described by a runbook's escalation path (L1 first)."""
        levels = tuple(
            replace(level, description=who[i]) if i < len(who) else level
            for i, level in enumerate(self.levels)
        )
        return replace(self, levels=levels)

    def resolving_within(self, seconds: int) -> EscalationPolicy:
        """The same policy with the first level's resolve deadline set to `seconds`."""
        first, *rest = self.levels
        return replace(self, levels=(replace(first, resolve_timeout_seconds=seconds), *rest))


def _levels(timeouts: list[tuple[int, int]], channels: list[str]) -> tuple[EscalationLevel, ...]:
    who = ("On-call engineer", "Platform team", "Engineering leadership")
    return tuple(
        EscalationLevel(
            name=f"L{i + 1}",
            description=who[i],
            ack_timeout_seconds=ack * 60,
            resolve_timeout_seconds=resolve * 60,
            channels=tuple(ChannelTarget(name) for name in channels[i].split()),
        )
        for i, (ack, resolve) in enumerate(timeouts)
    )


# Every level posts to the webhook receivers (none unless PAGERLOOP_WEBHOOK_URLS is set), as
# Alertmanager re-sends a firing alert; email is the seed's SEV4 channel.
DEFAULT_POLICIES: dict[str, EscalationPolicy] = {
    "SEV1": EscalationPolicy(
        _levels(
            [(5, 30), (10, 60), (15, 120)],
            [
                "slack pagerduty webhook",
                "slack pagerduty jira webhook",
                "slack pagerduty jira webhook",
            ],
        ),
        repeat_interval_seconds=15 * 60,
    ),
    "SEV2": EscalationPolicy(
        _levels(
            [(10, 60), (15, 120), (30, 240)],
            [
                "slack pagerduty webhook",
                "slack pagerduty jira webhook",
                "slack pagerduty jira webhook",
            ],
        ),
        repeat_interval_seconds=30 * 60,
    ),
    "SEV3": EscalationPolicy(
        _levels(
            [(30, 240), (30, 480), (60, 1440)],
            ["slack webhook", "slack pagerduty webhook", "slack pagerduty jira webhook"],
        ),
        repeat_interval_seconds=60 * 60,
        auto_resolve_quiet_seconds=15 * 60,
    ),
    "SEV4": EscalationPolicy(
        _levels(
            [(1440, 4320), (1440, 10080), (1440, 20160)],
            ["jira email webhook", "slack jira webhook", "slack pagerduty jira webhook"],
        ),
        repeat_interval_seconds=24 * 60 * 60,
        auto_resolve_quiet_seconds=15 * 60,
    ),
}


@dataclass
class Deadlines:
    """The escalation clock of an incident at its current level."""

    level_entered_at: datetime
    ack_by: datetime | None
    resolve_by: datetime | None
    remind_at: datetime | None = None

    def next(self) -> tuple[datetime, str] | None:
        """The earliest deadline still pending, and what it is for."""
        pending = [
            (at, what)
            for at, what in (
                (self.ack_by, "acknowledged"),
                (self.resolve_by, "resolved"),
                (self.remind_at, "reminder"),
            )
            if at is not None
        ]
        return min(pending) if pending else None


def enter_level(level: EscalationLevel, at: datetime, acknowledged: bool) -> Deadlines:
    return Deadlines(
        level_entered_at=at,
        ack_by=None if acknowledged else at + timedelta(seconds=level.ack_timeout_seconds),
        resolve_by=at + timedelta(seconds=level.resolve_timeout_seconds),
    )


def snooze(deadlines: Deadlines, now: datetime, minutes: int) -> Deadlines:
    """Push every pending deadline to at least `minutes` from now."""
    later = now + timedelta(minutes=minutes)

    def push(at: datetime | None) -> datetime | None:
        return None if at is None else max(at, later)

    return Deadlines(
        level_entered_at=deadlines.level_entered_at,
        ack_by=push(deadlines.ack_by),
        resolve_by=push(deadlines.resolve_by),
        remind_at=push(deadlines.remind_at),
    )


def span(seconds: float) -> str:
    """A timeout or a window as people say it: 20 s, 5 min, 90 s stays 1 min 30 s, 2 h
    (to the second)."""
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole % 3600 == 0:
        return f"{whole // 3600} h"
    minutes, rest = divmod(whole, 60)
    return f"{minutes} min" + (f" {rest} s" if rest else "")
