"""The notification channels, by the name escalation levels use (`channels = ["slack", ...]`).
Adding a channel is a module beside these (see README "Add a channel") and a line here; the
incident workflow drains each channel's lane in this order."""

from __future__ import annotations

from activities.channel import Channel, ReportChannel
from activities.email import EMAIL
from activities.jira import JIRA_CHANNEL
from activities.pagerduty import PAGERDUTY
from activities.slack import SLACK
from activities.webhook import WEBHOOK

CHANNELS: dict[str, Channel] = {
    channel.name: channel for channel in (SLACK, PAGERDUTY, JIRA_CHANNEL, EMAIL, WEBHOOK)
}

# The channels that tell of the incident report at resolve: the postmortem on the ticket, the
# summary in the Slack thread.
REPORTS_TO: dict[str, ReportChannel] = {channel.name: channel for channel in (SLACK, JIRA_CHANNEL)}
