"""Slack: the incident message with its buttons, posted once and updated in place."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError, SlackClientError
from temporalio import activity

from activities.channel import Incident
from activities.finite import human_number
from activities.vendor_http import VendorErrors, attempt_key
from domain.escalation import span
from domain.incident import (
    Approval,
    IncidentState,
    IncidentStatus,
    LaneAction,
    NotificationPlan,
    SlackMessageRef,
)
from domain.incident_machine import (
    ApprovalPosted,
    AskApproval,
    Effect,
    Merged,
    Notify,
    Refresh,
    ShowApproval,
    SlackPosted,
    Tell,
    last_resolve,
)
from domain.lanes import Lane
from domain.report import ReportText

ACK_ACTION = "incident_acknowledge"
RESOLVE_ACTION = "incident_resolve"
RESOLVE_KEEP_ACTION = "incident_resolve_keep_controls"
ESCALATE_ACTION = "incident_escalate"
SNOOZE_ACTION = "incident_snooze"
SNOOZE_MINUTES = 30
# A link button (it opens the runbook's page; the click Slack also sends us is ignored).
RUNBOOK_ACTION = "incident_runbook"
# A runbook step's ask (Steps.approve): its buttons carry approval_value(...).
APPROVE_ACTION = "approve_step"
DENY_ACTION = "deny_step"
APPROVAL_EVENT = "pagerloop_approval"  # metadata of an ask's message: a retry finds it
# Slack message metadata marking an incident's message, so a retried post finds the first.
METADATA_EVENT = "pagerloop_incident"
# Metadata marking a thread reply / a heads-up in another channel with its activity's attempt
# key, so a retry of the same activity finds what an earlier attempt posted before it was cut off.
REPLY_EVENT = "pagerloop_reply"
NOTIFY_EVENT = "pagerloop_notify"
# A retry looks for an earlier attempt's message from this long before the activity was first
# scheduled (Temporal's clock and Slack's may disagree), not through the whole conversation.
LOOKBACK_SKEW = timedelta(minutes=5)
LOOKUP_PAGE = 200
# The chart of the incident's signal goes to its thread right after the first post; making and
# uploading it may take this long, and a chart that fails or is late is logged and left out: it
# never fails the incident's message. It gets less when the attempt's start-to-close deadline
# (30 s) is nearer than this plus CHART_MARGIN_SECONDS (the post took long, the clocks differ):
# an attempt that posted must return before Temporal times it out. Under CHART_MIN_SECONDS
# left, no chart.
CHART_DEADLINE_SECONDS = 10.0
CHART_MARGIN_SECONDS = 8.0
CHART_MIN_SECONDS = 2.0

# (trigger, scope, now) -> the PNG of the trigger's signal over the last hour, or None when
# there is nothing to show. The worker builds it (detectors.series); activities cannot.
ChartSource = Callable[[str, str, datetime], bytes | None]

_log = logging.getLogger(__name__)

# Slack's published Block Kit limits.
HEADER_MAX = 150
SECTION_MAX = 3000
FALLBACK_TEXT_MAX = 3000
MAX_BLOCKS = 50
URL_MAX = 3000  # a button's url

# Slack errors worth another try; any other `ok: false` error gets the same answer however
# often the request is sent (bad token, unknown channel, invalid blocks, missing scope...).
_TRANSIENT_ERRORS = frozenset(
    {"ratelimited", "service_unavailable", "fatal_error", "internal_error", "request_timeout"}
)

_STATUS_ICON = {
    IncidentStatus.DETECTED: ":rotating_light:",
    IncidentStatus.ACKNOWLEDGED: ":eyes:",
    IncidentStatus.MITIGATING: ":hammer_and_wrench:",
    IncidentStatus.RESOLVED: ":white_check_mark:",
}


class SlackPermanentError(Exception):
    """Slack refused the request for a reason a retry cannot fix (including a body that could
    not be encoded, or that Slack answered `invalid_json` / `invalid_blocks` to)."""


ERRORS = VendorErrors(
    "Slack", SlackPermanentError, default_retry_after=1, throttled_type="SlackRateLimited"
)


def make_client(token: str, base_url: str) -> WebClient:
    # No retry handlers: Temporal's retry policy owns retries and their backoff.
    return WebClient(token=token, base_url=base_url, timeout=15, retry_handlers=[])


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _format_metric(name: str, value: float) -> str:
    # An infinite cost reads "∞", not "inf%" or a 300-digit integer.
    return human_number(value, percent=name.endswith(("_rate", "_ratio")))


def fallback_text(state: IncidentState) -> str:
    """The notification text; also what screen readers and old clients show."""
    return _truncate(
        f"[{state.severity}] {state.trigger} · {state.scope} is {state.status}: {state.summary}",
        FALLBACK_TEXT_MAX,
    )


def incident_blocks(state: IncidentState) -> list[dict[str, Any]]:
    """The Block Kit message for an incident in its current state."""
    icon = _STATUS_ICON[state.status]
    header = f"{state.severity} · {state.trigger} · {state.scope} · {state.status.upper()}"
    fields = [
        f"*Status*\n{icon} {state.status}",
        f"*Severity*\n{state.severity}",
        f"*Level*\n{state.level_name}",
        f"*Opened*\n{_date(state.opened_at)}",
    ]
    upcoming = [
        (at, what)
        for at, what in (
            (state.ack_by, "acknowledged"),
            (state.resolve_by, "resolved"),
            (state.remind_at, "reminded"),
        )
        if at is not None
    ]
    if upcoming and state.status != IncidentStatus.RESOLVED:
        at, what = min(upcoming)
        fields.append(f"*Next deadline*\n{what} by {_date(at)}")
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": _truncate(header, HEADER_MAX)}},
        {
            "type": "section",
            "text": {
                "type": "mrkdwn",
                "text": _truncate(state.summary or header, SECTION_MAX),
            },
            "fields": [{"type": "mrkdwn", "text": f} for f in fields],
        },
    ]
    if state.metrics:
        lines = [f"• {name}: *{_format_metric(name, v)}*" for name, v in state.metrics.items()]
        blocks.append(
            {
                "type": "section",
                "text": {"type": "mrkdwn", "text": _truncate("\n".join(lines), SECTION_MAX)},
            }
        )
    if state.runbook:
        blocks.append(
            {
                "type": "section",
                "text": {"type": "mrkdwn", "text": _truncate(_runbook_text(state), SECTION_MAX)},
            }
        )
    if merged := state.correlation_lines():
        text = _truncate("\n".join(f":link: {line}" for line in merged), SECTION_MAX)
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": text}})
    context = [f"Incident `{state.incident_id}`"]
    if state.acknowledged_by:
        context.append(f"acknowledged by {_mention(state.acknowledged_by)}")
    if state.resolved_by:
        context.append(f"resolved by {_mention(state.resolved_by)}")
    if state.reopened and state.reopened_at is not None:
        times = "" if state.reopened == 1 else f" ({state.reopened} times)"
        context.append(f"reopened {_date(state.reopened_at)}{times}")
    blocks.append(
        {
            "type": "context",
            "elements": [{"type": "mrkdwn", "text": _truncate(" · ".join(context), 3000)}],
        }
    )
    buttons = []
    if state.acknowledged_by is None and state.status != IncidentStatus.RESOLVED:
        buttons.append(_button("Acknowledge", ACK_ACTION, state.incident_id, style="primary"))
    if state.status != IncidentStatus.RESOLVED:
        buttons.append(_button("Resolve", RESOLVE_ACTION, state.incident_id, style="danger"))
        if state.controls:  # plain Resolve reverts them
            keep = _button("Resolve, keep controls", RESOLVE_KEEP_ACTION, state.incident_id)
            buttons.append(keep)
        buttons.append(_button("Escalate", ESCALATE_ACTION, state.incident_id))
        buttons.append(_button(f"Snooze {SNOOZE_MINUTES} min", SNOOZE_ACTION, state.incident_id))
    # Still worth reading once resolved (the postmortem); a URL cut short would mislead.
    if state.runbook_url and len(state.runbook_url) <= URL_MAX:
        runbook = _button("Runbook", RUNBOOK_ACTION, state.incident_id)
        buttons.append(runbook | {"url": state.runbook_url})
    if buttons:
        blocks.append({"type": "actions", "block_id": "incident_actions", "elements": buttons})
    return blocks[:MAX_BLOCKS]


def _runbook_text(state: IncidentState) -> str:
    verdict = {
        "recovered": "mitigation verified: the signal recovered",
        "not_recovered": "mitigation did not help: rolled back",
        "inconclusive": "verification inconclusive: controls kept",
    }
    phase = {
        "": "starting",
        "diagnosed": "diagnosed: mitigates once acknowledged",
        "running": "running",
    }
    done = verdict.get(state.verification or "", "finished")
    lines = [f"*Runbook* `{state.runbook}`: {phase.get(state.runbook_phase, done)}"]
    lines += [f"• in force: {control}" for control in state.controls]
    return "\n".join(lines)


def _mention(user: str) -> str:
    # Slack user ids (U…/W…) render as mentions; other actors (CLI users, PagerDuty) as text.
    return f"<@{user}>" if user[:1] in {"U", "W"} and user.isalnum() else user


def _date(at: datetime) -> str:
    return f"<!date^{int(at.timestamp())}^{{date_short}} {{time}}|{at:%Y-%m-%d %H:%M} UTC>"


def _button(text: str, action_id: str, value: str, style: str = "") -> dict[str, Any]:
    button = {
        "type": "button",
        "text": {"type": "plain_text", "text": text},
        "action_id": action_id,
        "value": value,
    }
    if style:
        button["style"] = style
    return button


def _translate(exc: SlackClientError, what: str) -> Exception:
    if not isinstance(exc, SlackApiError):
        return ERRORS.unreachable(what, exc)
    response = exc.response
    if response is None:
        return ERRORS.answer(what, 0)
    error = str(response.get("error", ""))
    return ERRORS.answer(
        what,
        response.status_code,
        response.headers.get("Retry-After"),
        error,
        throttled=error == "ratelimited",
        # Slack answers 200 with `ok: false` and an error: that error is the verdict.
        refused=bool(error) and error not in _TRANSIENT_ERRORS and response.status_code < 500,
    )


def post_message(
    client: WebClient,
    channel: str,
    text: str,
    blocks: list[dict[str, Any]] | None = None,
    *,
    thread_ts: str | None = None,
    incident_id: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> SlackMessageRef:
    if incident_id:
        metadata = {"event_type": METADATA_EVENT, "event_payload": {"incident_id": incident_id}}
    try:
        response = client.chat_postMessage(
            channel=channel, text=text, blocks=blocks, thread_ts=thread_ts, metadata=metadata
        )
    except SlackClientError as exc:
        raise _translate(exc, "chat.postMessage") from exc
    except (TypeError, ValueError) as exc:
        # slack-sdk decodes answers itself (a bad one is a SlackApiError): a TypeError or
        # ValueError out of a call is our request failing to encode, the same on every try.
        raise ERRORS.unencodable("chat.postMessage", exc) from exc
    return SlackMessageRef(channel=str(response["channel"]), ts=str(response["ts"]))


def find_incident_message(
    client: WebClient, channel: str, incident_id: str
) -> SlackMessageRef | None:
    """The incident's message if an earlier attempt did post it (found by its metadata)."""
    try:
        channel_id = channel if not channel.startswith("#") else _channel_id(client, channel)
        if channel_id is None:
            return None
        history = client.conversations_history(
            channel=channel_id, include_all_metadata=True, limit=100
        )
    except SlackClientError as exc:
        raise _translate(exc, "conversations.history") from exc
    messages: list[dict[str, Any]] = history.get("messages", [])
    for message in messages:
        metadata = message.get("metadata") or {}
        ours = metadata.get("event_type") == METADATA_EVENT
        if ours and (metadata.get("event_payload") or {}).get("incident_id") == incident_id:
            return SlackMessageRef(channel=channel_id, ts=str(message["ts"]))
    return None


def keyed_metadata(event_type: str, key: str) -> dict[str, Any]:
    return {"event_type": event_type, "event_payload": {"key": key}}


def lookback_oldest(info: activity.Info) -> str | None:
    """Slack's `oldest` for a retry's look-up: a little before the first attempt was scheduled."""
    since = info.scheduled_time - LOOKBACK_SKEW
    return f"{since.timestamp():.6f}" if since.timestamp() > 0 else None


def find_keyed_message(
    client: WebClient,
    channel: str,
    event_type: str,
    key: str,
    *,
    thread_ts: str | None = None,
    oldest: str | None = None,
) -> str | None:
    """The ts of the message in the channel's history (or, with `thread_ts`, that thread) since
    `oldest` whose metadata carries `key` (an earlier attempt of the same activity posted it),
    or None."""
    method = "conversations.replies" if thread_ts else "conversations.history"
    try:
        channel_id = _conversation_id(client, channel)
        if channel_id is None:
            raise SlackPermanentError(f"Slack {method}: no channel {channel}")
        cursor: str | None = None
        while True:
            if thread_ts:
                page = client.conversations_replies(
                    channel=channel_id,
                    ts=thread_ts,
                    include_all_metadata=True,
                    oldest=oldest,
                    limit=LOOKUP_PAGE,
                    cursor=cursor,
                )
            else:
                page = client.conversations_history(
                    channel=channel_id,
                    include_all_metadata=True,
                    oldest=oldest,
                    limit=LOOKUP_PAGE,
                    cursor=cursor,
                )
            messages: list[dict[str, Any]] = page.get("messages", [])
            for message in messages:
                metadata = message.get("metadata") or {}
                if metadata.get("event_type") == event_type and (
                    (metadata.get("event_payload") or {}).get("key") == key
                ):
                    return str(message["ts"])
            cursor = (page.get("response_metadata") or {}).get("next_cursor")
            if not cursor:
                return None
    except SlackClientError as exc:
        raise _translate(exc, method) from exc


def post_once(
    client: WebClient,
    channel: str,
    text: str,
    *,
    event_type: str,
    key: str,
    retry: bool,
    thread_ts: str | None = None,
    oldest: str | None = None,
) -> None:
    """Post `text` with `key` in its metadata; on a retry, only if no earlier attempt did. A
    look-up Slack refuses for good (a scope or channel membership it lacks) does not stop the
    post: told twice is better than not told."""
    if retry:
        try:
            if find_keyed_message(
                client, channel, event_type, key, thread_ts=thread_ts, oldest=oldest
            ):
                return
        except SlackPermanentError as exc:
            _log.warning("posting without looking for an earlier attempt's message: %s", exc)
    post_message(
        client, channel, text, thread_ts=thread_ts, metadata=keyed_metadata(event_type, key)
    )


_CONVERSATION_ID = re.compile(r"[CGD][A-Z0-9]{6,}")


def _conversation_id(client: WebClient, channel: str) -> str | None:
    """A conversation id as it is; a channel name (`#name` or `name`) looked up."""
    if _CONVERSATION_ID.fullmatch(channel):
        return channel
    return _channel_id(client, channel)


def _channel_id(client: WebClient, name: str) -> str | None:
    wanted = name.lstrip("#")
    cursor = None
    while True:
        page = client.conversations_list(limit=1000, cursor=cursor, exclude_archived=True)
        channels: list[dict[str, Any]] = page.get("channels", [])
        for channel in channels:
            if channel.get("name") == wanted:
                return str(channel["id"])
        cursor = (page.get("response_metadata") or {}).get("next_cursor")
        if not cursor:
            return None


def update_message(
    client: WebClient, ref: SlackMessageRef, text: str, blocks: list[dict[str, Any]]
) -> None:
    try:
        client.chat_update(channel=ref.channel, ts=ref.ts, text=text, blocks=blocks)
    except SlackClientError as exc:
        raise _translate(exc, "chat.update") from exc
    except (TypeError, ValueError) as exc:
        raise ERRORS.unencodable("chat.update", exc) from exc


def post_ephemeral(client: WebClient, channel: str, user: str, text: str) -> None:
    try:
        client.chat_postEphemeral(channel=channel, user=user, text=text)
    except SlackClientError as exc:
        raise _translate(exc, "chat.postEphemeral") from exc
    except (TypeError, ValueError) as exc:
        raise ERRORS.unencodable("chat.postEphemeral", exc) from exc


def chart_filename(incident_id: str) -> str:
    """The chart's file name: how a retry recognises the chart an earlier attempt uploaded."""
    return f"pagerloop-{incident_id}-last-hour.png"


def find_thread_file(client: WebClient, ref: SlackMessageRef, filename: str) -> bool:
    """Whether the message's thread holds a file share of `filename`."""
    cursor: str | None = None
    try:
        while True:
            page = client.conversations_replies(
                channel=ref.channel, ts=ref.ts, limit=LOOKUP_PAGE, cursor=cursor
            )
            messages: list[dict[str, Any]] = page.get("messages", [])
            for message in messages:
                if any(f.get("name") == filename for f in message.get("files") or []):
                    return True
            cursor = (page.get("response_metadata") or {}).get("next_cursor")
            if not cursor:
                return False
    except SlackClientError as exc:
        raise _translate(exc, "conversations.replies") from exc


def attach_chart(
    client: WebClient,
    ref: SlackMessageRef,
    state: IncidentState,
    chart: ChartSource,
    *,
    look_first: bool,
    now: datetime,
) -> bool:
    """Upload the chart of the incident's signal to its thread (slack-sdk's files_upload_v2:
    files.getUploadURLExternal, the upload, files.completeUploadExternal). `look_first`: an
    earlier attempt of the post may have uploaded it already; then nothing is uploaded.
    Whether a chart was uploaded."""
    filename = chart_filename(state.incident_id)
    if look_first and find_thread_file(client, ref, filename):
        return False
    png = chart(str(state.trigger), state.scope, now)
    if png is None:
        return False
    try:
        client.files_upload_v2(
            channel=ref.channel,
            thread_ts=ref.ts,
            file=png,
            filename=filename,
            title=f"{state.trigger} on {state.scope}: the last hour",
            alt_txt=(
                f"The {state.trigger} signal on {state.scope} minute by minute over the last "
                "hour, against its warning and critical thresholds"
            ),
        )
    except SlackClientError as exc:
        raise _translate(exc, "files.upload") from exc
    return True


def chart_seconds(info: activity.Info, now: datetime) -> float:
    """What the chart may take: CHART_DEADLINE_SECONDS, or less, what this attempt has left
    before its start-to-close (and the activity before its schedule-to-close) deadline, less
    CHART_MARGIN_SECONDS."""
    deadlines = []
    if info.start_to_close_timeout:
        deadlines.append(info.started_time + info.start_to_close_timeout)
    if info.schedule_to_close_timeout:
        deadlines.append(info.scheduled_time + info.schedule_to_close_timeout)
    left = min((d - now).total_seconds() for d in deadlines) if deadlines else float("inf")
    return min(CHART_DEADLINE_SECONDS, left - CHART_MARGIN_SECONDS)


# --- a runbook step's ask: Approve / Deny in the incident's thread ----------------------------


def approval_value(incident_id: str, approval_id: str) -> str:
    """What the ask's buttons carry back (Slack hands it to /slack/interactions as is)."""
    return json.dumps({"incident_id": incident_id, "approval_id": approval_id})


def parse_approval_value(value: str) -> tuple[str, str] | None:
    """(incident id, approval id) from a button's value; None when it is not one of ours."""
    try:
        parsed = json.loads(value)
        incident_id, approval_id = parsed["incident_id"], parsed["approval_id"]
    except (ValueError, TypeError, KeyError):
        return None
    if not isinstance(incident_id, str) or not isinstance(approval_id, str):
        return None
    return (incident_id, approval_id) if incident_id and approval_id else None


_OUTCOME_ICON = {
    "approved": ":white_check_mark:",
    "denied": ":no_entry:",
    "expired": ":hourglass:",
    "withdrawn": ":heavy_minus_sign:",
}


def approval_text(approval: Approval) -> str:
    """The ask as it stands, in a line: the message's fallback text and its first section."""
    waited = span((approval.expires_at - approval.asked_at).total_seconds())
    if approval.outcome in ("approved", "denied"):
        said = f"{approval.outcome.capitalize()} by {_mention(approval.decided_by)}"
        said += f" ({approval.reason})" if approval.reason else ""
    elif approval.outcome == "expired":
        went = "proceeding" if approval.approved else "denied"
        said = f"No answer in {waited}: {went}"
    elif approval.outcome == "withdrawn":
        said = f"No longer asked ({approval.reason or 'the runbook ended'})"
    else:
        then = "it goes ahead" if approval.on_timeout == "proceed" else "denied"
        said = f"Approval needed (no answer in {waited}: {then})"
    icon = _OUTCOME_ICON.get(approval.outcome, ":raised_hand:")
    return _truncate(f"{icon} {said}: {approval.action}", FALLBACK_TEXT_MAX)


def approval_blocks(incident_id: str, approval: Approval) -> list[dict[str, Any]]:
    step = f" · step `{approval.step}`" if approval.step else ""
    blocks: list[dict[str, Any]] = [
        {
            "type": "section",
            "text": {"type": "mrkdwn", "text": _truncate(approval_text(approval), SECTION_MAX)},
        },
        {
            "type": "context",
            "elements": [
                {
                    "type": "mrkdwn",
                    "text": _truncate(
                        f"Asked {_date(approval.asked_at)}{step} · `{approval.approval_id}`", 3000
                    ),
                }
            ],
        },
    ]
    if approval.pending:
        value = approval_value(incident_id, approval.approval_id)
        blocks.append(
            {
                "type": "actions",
                "block_id": "approval_actions",
                "elements": [
                    _button("Approve", APPROVE_ACTION, value, style="primary"),
                    _button("Deny", DENY_ACTION, value, style="danger"),
                ],
            }
        )
    return blocks


@dataclass
class SlackApprovalRequest:
    """An ask to post (`thread`: the incident's message, when there is one) or to show again."""

    channel: str
    incident_id: str
    approval: Approval
    thread: SlackMessageRef | None = None


def post_approval(
    client: WebClient, request: SlackApprovalRequest, *, retry: bool
) -> SlackMessageRef:
    """Post the ask once: a retry first looks for the message an earlier attempt posted."""
    approval, thread = request.approval, request.thread
    channel = thread.channel if thread else request.channel
    if retry:
        try:
            found = find_keyed_message(
                client,
                channel,
                APPROVAL_EVENT,
                approval.approval_id,
                thread_ts=thread.ts if thread else None,
            )
        except SlackPermanentError as exc:
            _log.warning("posting without looking for an earlier attempt's ask: %s", exc)
            found = None
        if found is not None:
            try:  # chat.update wants the channel's id (a thread's is one already)
                channel_id = thread.channel if thread else _conversation_id(client, channel)
            except SlackClientError as exc:
                raise _translate(exc, "conversations.list") from exc
            return SlackMessageRef(channel=channel_id or channel, ts=found)
    return post_message(
        client,
        channel,
        approval_text(approval),
        approval_blocks(request.incident_id, approval),
        thread_ts=thread.ts if thread else None,
        metadata=keyed_metadata(APPROVAL_EVENT, approval.approval_id),
    )


@dataclass
class SlackPostRequest:
    channel: str
    state: IncidentState
    note: str = ""


@dataclass
class SlackUpdateRequest:
    message: SlackMessageRef
    state: IncidentState


@dataclass
class SlackReplyRequest:
    message: SlackMessageRef
    text: str


class SlackActivities:
    """Registered even when Slack is off, so an incident opened while it was on fails its
    Slack steps cleanly (on its timeline) instead of waiting for a worker that has them."""

    def __init__(self, client: WebClient | None, chart: ChartSource | None = None) -> None:
        self._client = client
        self._chart = chart

    def _require_client(self) -> WebClient:
        if self._client is None:
            raise SlackPermanentError("Slack is off: PAGERLOOP_SLACK_BOT_TOKEN is not set")
        return self._client

    @activity.defn(name="slack.post_incident")
    async def post_incident(self, request: SlackPostRequest) -> SlackMessageRef:
        """Exactly one message per incident: a retry first looks for the message an earlier
        attempt may have posted before it was cut off."""
        state = request.state
        client = self._require_client()
        found: SlackMessageRef | None = None
        if activity.info().attempt > 1:
            found = await asyncio.to_thread(
                find_incident_message, client, request.channel, state.incident_id
            )
        if found is not None:
            ref = found
        else:
            ref = await asyncio.to_thread(
                partial(post_message, incident_id=state.incident_id),
                client,
                request.channel,
                fallback_text(state),
                incident_blocks(state),
            )
        # Found: an earlier attempt posted it, and may have uploaded the chart too.
        await self._attach_chart(client, ref, state, look_first=found is not None)
        return ref

    async def _attach_chart(
        self, client: WebClient, ref: SlackMessageRef, state: IncidentState, *, look_first: bool
    ) -> None:
        """The chart in the thread, once; any failure is logged and the message stands."""
        if self._chart is None:
            return
        seconds = chart_seconds(activity.info(), datetime.now(UTC))
        if seconds < CHART_MIN_SECONDS:
            _log.warning(
                "no chart for %s: %.1fs left before the post's deadline",
                state.incident_id,
                seconds + CHART_MARGIN_SECONDS,
            )
            return
        try:
            await asyncio.wait_for(
                asyncio.to_thread(
                    partial(attach_chart, look_first=look_first, now=datetime.now(UTC)),
                    client,
                    ref,
                    state,
                    self._chart,
                ),
                seconds,
            )
        except TimeoutError:
            _log.warning(
                "no chart for %s: not made and uploaded within %.1fs", state.incident_id, seconds
            )
        except Exception as exc:  # a chart is a nicety: never the reason a post fails
            _log.warning("no chart for %s: %s", state.incident_id, exc, exc_info=True)

    @activity.defn(name="slack.reply")
    async def reply(self, request: SlackReplyRequest) -> None:
        """One reply in the incident's thread: a retry first reads the thread for the reply an
        earlier attempt may have posted (marked with this activity's key) before it was cut off."""
        info = activity.info()
        await asyncio.to_thread(
            partial(
                post_once,
                event_type=REPLY_EVENT,
                key=attempt_key(info),
                retry=info.attempt > 1,
                thread_ts=request.message.ts,
                oldest=lookback_oldest(info),
            ),
            self._require_client(),
            request.message.channel,
            _truncate(request.text, FALLBACK_TEXT_MAX),
        )

    @activity.defn(name="slack.notify")
    async def notify(self, request: SlackPostRequest) -> None:
        """A heads-up in another channel (an escalation level's own), once: a retry first reads
        that channel's recent history for an earlier attempt's message."""
        state = request.state
        text = f"{fallback_text(state)}\n{request.note}"
        info = activity.info()
        await asyncio.to_thread(
            partial(
                post_once,
                event_type=NOTIFY_EVENT,
                key=attempt_key(info),
                retry=info.attempt > 1,
                oldest=lookback_oldest(info),
            ),
            self._require_client(),
            request.channel,
            _truncate(text, 3000),
        )

    @activity.defn(name="slack.ask_approval")
    async def ask_approval(self, request: SlackApprovalRequest) -> SlackMessageRef:
        """The ask with its Approve / Deny buttons, in the incident's thread."""
        client = self._require_client()
        retry = activity.info().attempt > 1
        return await asyncio.to_thread(partial(post_approval, retry=retry), client, request)

    @activity.defn(name="slack.show_approval")
    async def show_approval(self, request: SlackApprovalRequest) -> None:
        """The ask's message once answered (or expired, or withdrawn): who decided, no buttons."""
        message = request.approval.message
        if message is None:
            return
        await asyncio.to_thread(
            update_message,
            self._require_client(),
            message,
            approval_text(request.approval),
            approval_blocks(request.incident_id, request.approval),
        )

    @activity.defn(name="slack.update_incident")
    async def update_incident(self, request: SlackUpdateRequest) -> None:
        state = request.state
        await asyncio.to_thread(
            update_message,
            self._require_client(),
            request.message,
            fallback_text(state),
            incident_blocks(state),
        )


# --- the channel: what the incident's effects mean for Slack -----------------------------------


def reopened_reply(state: IncidentState, reason: str) -> str:
    """The thread's word that the incident is back, to whoever resolved it: a Slack user is
    mentioned (Slack notifies them), anyone else named."""
    resolved = last_resolve(state)
    who = ""
    if resolved is not None and resolved.actor != "pagerloop":
        who = f"{_mention(resolved.actor)}: "
    return f"*reopened* {who}{reason} (at {state.level_name}, acknowledge again)"


class SlackChannel:
    """One message per incident in the incident's channel, kept up to date; the timeline told
    in its thread; a heads-up in a level's own channel when it is reached."""

    name = "slack"

    def enabled(self, plan: NotificationPlan) -> bool:
        return plan.slack_channel is not None

    def react(self, effect: Effect, incident: Incident, lane: Lane) -> None:
        state = incident.state
        match effect:
            case Notify(level, reason, kind):
                target = level.target(self.name)
                if target is None:
                    return
                if state.slack_message is None and not lane.underway("post"):
                    lane.push("post")
                else:
                    lane.push("update")
                if kind == "reopened":
                    lane.push("reply", text=reopened_reply(state, reason))
                for other in target.to:
                    if other != incident.plan.slack_channel:
                        lane.push("notify", text=reason or state.summary, level=other)
            case Refresh():
                lane.push("update")
            case Merged():
                # Says where the problem went on: on its own message, or (handed over) on one
                # that landed after the merge.
                lane.push("update")
            case Tell(entry):
                said = f"by {entry.actor} via {entry.channel}: {entry.text}"
                lane.push("reply", text=f"*{entry.kind.replace('_', ' ')}* {said}")
            case AskApproval(approval_id):
                lane.push("approval", text=approval_id)
            case ShowApproval(approval_id):
                lane.push("approval_update", text=approval_id)

    async def perform(self, action: LaneAction, incident: Incident) -> None:
        channel = incident.plan.slack_channel
        state = incident.state
        if channel is None:
            return
        if action.kind == "post":
            if state.merged_into:
                return  # never told of it: the incident it joined tells of the problem
            ref = await incident.call(
                SlackActivities.post_incident,
                SlackPostRequest(channel=channel, state=incident.shown()),
                summary=f"Slack: post incident to {channel}",
            )
            incident.apply(SlackPosted(ref, channel))
        elif action.kind == "update":
            if incident.lane(self.name).queued("update") or state.slack_message is None:
                return  # a later update renders the same state: one call is enough
            await incident.call(
                SlackActivities.update_incident,
                SlackUpdateRequest(message=state.slack_message, state=incident.shown()),
                summary=f"Slack: show {state.status} at {state.level_name}",
            )
        elif action.kind == "reply" and state.slack_message is not None:
            await incident.call(
                SlackActivities.reply,
                SlackReplyRequest(message=state.slack_message, text=action.text),
                summary="Slack: thread reply",
            )
        elif action.kind in ("approval", "approval_update"):
            await self._approval(action, incident, channel)
        elif action.kind == "notify" and not state.merged_into:
            await incident.call(
                SlackActivities.notify,
                SlackPostRequest(channel=action.level, state=incident.shown(), note=action.text),
                summary=f"Slack: tell {action.level}",
            )

    async def _approval(self, action: LaneAction, incident: Incident, channel: str) -> None:
        """Post an ask's buttons in the thread, or show what became of it there."""
        state = incident.state
        approval = state.approval(action.text)
        if approval is None:
            return
        request = SlackApprovalRequest(channel, state.incident_id, approval, state.slack_message)
        if action.kind == "approval_update":
            if approval.message is not None:  # else its post shows the answer when it lands
                await incident.call(
                    SlackActivities.show_approval,
                    request,
                    summary=f"Slack: approval {approval.outcome or 'pending'}",
                )
            return
        if approval.message is None and approval.pending:
            ref = await incident.call(
                SlackActivities.ask_approval, request, summary=f"Slack: ask to {approval.step}"
            )
            incident.apply(ApprovalPosted(approval.approval_id, ref))

    async def post_report(self, report: ReportText | None, incident: Incident) -> None:
        """The incident report's summary in the incident's thread."""
        state = incident.state
        if report is None or state.slack_message is None or incident.plan.slack_channel is None:
            return
        await incident.call(
            SlackActivities.reply,
            SlackReplyRequest(message=state.slack_message, text=report.summary),
            summary="Slack: the incident report's summary in the thread",
        )


SLACK = SlackChannel()
