"""Jira: one ticket per incident (found by its label before any create, so a retry or a
crash never makes a second), comments on state changes, Done at resolve, then the postmortem
(the incident report, once per incident)."""

from __future__ import annotations

import asyncio
import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from jira import JIRA, JIRAError
from requests.exceptions import RequestException
from temporalio import activity

from activities.channel import Incident
from activities.vendor_http import VendorErrors, attempt_key, request_unencodable
from domain.incident import IncidentState, LaneAction, NotificationPlan
from domain.incident_machine import Effect, Merged, Notify, Resolved, Tell, TicketOpened
from domain.lanes import Lane
from domain.report import ReportText

DONE_TRANSITIONS = (
    "done",
    "resolve",
    "resolve issue",
    "resolved",
    "close",
    "close issue",
    "closed",
)
# Out of Done when an incident is reopened, the first of these the workflow offers.
REOPEN_TRANSITIONS = ("reopen", "reopen issue", "reopened", "to do", "open", "in progress")
COMMENT_MAX = 30_000
ANCHOR_PREFIX = "pagerloop-"


class JiraPermanentError(Exception):
    """Jira refused the request for a reason a retry cannot fix (credentials, project, type,
    a body it cannot parse), or the request could not even be encoded."""


ERRORS = VendorErrors("Jira", JiraPermanentError, default_retry_after=10)


def make_client(url: str, email: str | None, token: str) -> JIRA:
    auth: dict[str, Any] = {"basic_auth": (email, token)} if email else {"token_auth": token}
    # No retries of its own (Temporal's policy owns them), no server-info call at start.
    return JIRA(server=url, get_server_info=False, max_retries=0, timeout=10, **auth)


def incident_label(incident_id: str) -> str:
    """Jira labels take no spaces; incident ids have none."""
    return f"pagerloop:{incident_id}"


def _translate(exc: JIRAError | RequestException, what: str) -> Exception:
    if request_unencodable(exc):
        return ERRORS.unencodable(what, exc)
    if isinstance(exc, RequestException):
        return ERRORS.unreachable(what, exc)
    headers = exc.response.headers if exc.response is not None else {}
    return ERRORS.answer(what, exc.status_code or 0, headers.get("Retry-After"), exc.text or "")


@dataclass
class JiraTicket:
    incident_id: str
    project: str
    summary: str
    description: str
    issue_type: str = "Task"


@dataclass
class JiraComment:
    issue: str
    text: str


@dataclass
class JiraResolution:
    issue: str
    postmortem: str  # "": Done without a comment (the incident report follows as the postmortem)


@dataclass
class JiraPostmortem:
    issue: str
    incident_id: str
    text: str  # Jira wiki markup


def open_ticket(client: JIRA, ticket: JiraTicket) -> str:
    label = incident_label(ticket.incident_id)
    try:
        found = client.search_issues(
            f'project = {ticket.project} AND labels = "{label}"', maxResults=1
        )
        if found:
            return str(found[0].key)
        issue = client.create_issue(
            fields={
                "project": {"key": ticket.project},
                "summary": ticket.summary[:250],
                "description": ticket.description[:COMMENT_MAX],
                "issuetype": {"name": ticket.issue_type},
                "labels": ["pagerloop", label],
            }
        )
    except (JIRAError, RequestException) as exc:
        raise _translate(exc, "the ticket") from exc
    except (TypeError, ValueError) as exc:
        # A bad answer from Jira surfaces as a RequestException (requests' JSONDecodeError), so
        # a TypeError or ValueError is our request failing to encode, the same on every try.
        raise ERRORS.unencodable("the ticket", exc) from exc
    return str(issue.key)


def anchor(key: str) -> str:
    """Jira wiki markup that renders as nothing: the mark of the attempt that wrote a comment."""
    return f"{{anchor:{ANCHOR_PREFIX}{key}}}"


def _marked(text: str, key: str | None) -> str:
    """The comment's body, cut to Jira's size, its mark (if any) on a last line of its own."""
    if key is None:
        return text[:COMMENT_MAX]
    mark = anchor(key)
    return f"{text[: COMMENT_MAX - len(mark) - 1]}\n{mark}"


def _commented(client: JIRA, issue: str, key: str) -> bool:
    """Whether a comment on `issue` carries `key`'s mark (an earlier attempt wrote it)."""
    mark = anchor(key)
    return any(mark in str(getattr(c, "body", "") or "") for c in client.comments(issue))


def comment(
    client: JIRA, issue: str, text: str, key: str | None = None, retry: bool = False
) -> None:
    """A comment on `issue`, marked with `key`; on a retry, only if no earlier attempt's
    comment carries that mark."""
    try:
        if retry and key is not None and _commented(client, issue, key):
            return
        client.add_comment(issue, _marked(text, key))
    except (JIRAError, RequestException) as exc:
        raise _translate(exc, f"a comment on {issue}") from exc
    except (TypeError, ValueError) as exc:
        raise ERRORS.unencodable(f"a comment on {issue}", exc) from exc


def resolve(
    client: JIRA, issue: str, postmortem: str, key: str | None = None, retry: bool = False
) -> None:
    """The postmortem as the last comment (marked with `key`: a retry finds it there and does
    not post it again), then the issue's Done transition (once: a retry after it finds the
    issue done already)."""
    try:
        current = client.issue(issue, fields="status")
        if str(current.fields.status.name).lower() in DONE_TRANSITIONS:
            return
        if postmortem and not (retry and key is not None and _commented(client, issue, key)):
            client.add_comment(issue, _marked(postmortem, key))
        transitions = client.transitions(issue)
        done = next((t for t in transitions if str(t["name"]).lower() in DONE_TRANSITIONS), None)
        if done is None:
            names = ", ".join(str(t["name"]) for t in transitions)
            raise JiraPermanentError(f"{issue} has no Done transition (it has: {names})")
        client.transition_issue(issue, done["id"])
    except (JIRAError, RequestException) as exc:
        raise _translate(exc, f"resolving {issue}") from exc
    except (TypeError, ValueError) as exc:
        raise ERRORS.unencodable(f"resolving {issue}", exc) from exc


def reopen(client: JIRA, issue: str, text: str, key: str | None, retry: bool) -> None:
    """Back out of Done (a workflow without a way back keeps its status: the comment still
    says the incident is open again), then the comment, once."""
    try:
        current = client.issue(issue, fields="status")
        if str(current.fields.status.name).lower() in DONE_TRANSITIONS:
            offered = {str(t["name"]).lower(): t["id"] for t in client.transitions(issue)}
            back = next((offered[name] for name in REOPEN_TRANSITIONS if name in offered), None)
            if back is not None:
                client.transition_issue(issue, back)
    except (JIRAError, RequestException) as exc:
        raise _translate(exc, f"reopening {issue}") from exc
    comment(client, issue, text, key, retry)


def postmortem_key(incident_id: str) -> str:
    """The mark of an incident's postmortem: one per incident, whatever run or attempt posts it."""
    return "postmortem-" + hashlib.sha256(incident_id.encode()).hexdigest()[:32]


def post_postmortem(client: JIRA, issue: str, incident_id: str, text: str) -> bool:
    """The incident's postmortem as a comment on `issue`, unless one is there already (a
    retry, or a run that posted it before it was cut off); whether it was posted now."""
    key = postmortem_key(incident_id)
    try:
        if _commented(client, issue, key):
            return False
        client.add_comment(issue, _marked(text, key))
    except (JIRAError, RequestException) as exc:
        raise _translate(exc, f"the postmortem on {issue}") from exc
    except (TypeError, ValueError) as exc:
        raise ERRORS.unencodable(f"the postmortem on {issue}", exc) from exc
    return True


class JiraActivities:
    """Registered even when Jira is off, so its steps fail cleanly onto the timeline."""

    def __init__(self, client: JIRA | None, issue_type: str = "Task") -> None:
        self._client = client
        self._issue_type = issue_type

    def _require_client(self) -> JIRA:
        if self._client is None:
            raise JiraPermanentError("Jira is off: PAGERLOOP_JIRA_URL is not set")
        return self._client

    @activity.defn(name="jira.open_ticket")
    async def open_ticket(self, ticket: JiraTicket) -> str:
        ticket.issue_type = self._issue_type
        return await asyncio.to_thread(open_ticket, self._require_client(), ticket)

    @activity.defn(name="jira.comment")
    async def comment(self, request: JiraComment) -> None:
        """One comment: a retry first reads the issue's comments for the one an earlier attempt
        may have added (marked with this activity's key) before it was cut off."""
        info = activity.info()
        await asyncio.to_thread(
            comment,
            self._require_client(),
            request.issue,
            request.text,
            attempt_key(info),
            info.attempt > 1,
        )

    @activity.defn(name="jira.resolve")
    async def resolve(self, request: JiraResolution) -> None:
        info = activity.info()
        await asyncio.to_thread(
            resolve,
            self._require_client(),
            request.issue,
            request.postmortem,
            attempt_key(info),
            info.attempt > 1,
        )

    @activity.defn(name="jira.reopen")
    async def reopen(self, request: JiraComment) -> None:
        info = activity.info()
        await asyncio.to_thread(
            reopen,
            self._require_client(),
            request.issue,
            request.text,
            attempt_key(info),
            info.attempt > 1,
        )

    @activity.defn(name="jira.postmortem")
    async def postmortem(self, request: JiraPostmortem) -> bool:
        return await asyncio.to_thread(
            post_postmortem,
            self._require_client(),
            request.issue,
            request.incident_id,
            request.text,
        )


# --- the postmortem left on the ticket at resolve ------------------------------------------


def _duration(start: datetime, end: datetime | None) -> str:
    if end is None:
        return "-"
    seconds = int((end - start).total_seconds())
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m {seconds:02d}s" if hours else f"{minutes}m {seconds:02d}s"


def runbook_line(state: IncidentState) -> str:
    """The ticket's link to the runbook, a paragraph of its own (wiki markup links a bare URL)."""
    return f"\n\nRunbook: {state.runbook_url}" if state.runbook_url else ""


def postmortem(state: IncidentState) -> str:
    lines = [
        f"h3. Postmortem: {state.severity} {state.trigger} on {state.scope}",
        "",
        f"* Incident: {state.incident_id}",
        f"* Opened: {state.opened_at:%Y-%m-%d %H:%M:%S} UTC, highest level reached: L{state.level}",
        f"* Time to acknowledge: {_duration(state.opened_at, state.acknowledged_at)}"
        + (f" (by {state.acknowledged_by})" if state.acknowledged_by else ""),
        f"* Time to mitigate: {_duration(state.opened_at, state.mitigation_started_at)}",
        f"* Time to resolve: {_duration(state.opened_at, state.resolved_at)}"
        + (f" (by {state.resolved_by})" if state.resolved_by else ""),
        f"* Signal recovered: {state.recovered_at:%H:%M:%S} UTC"
        if state.recovered_at
        else "* Signal recovered: not reported",
        "",
        "h4. Last metrics",
    ]
    lines += [f"* {name}: {value:.4g}" for name, value in state.metrics.items()] or ["* none"]
    if state.runbook:
        lines += [
            "",
            f"h4. Runbook {state.runbook}",
            f"* Verification: {state.verification or '-'}",
        ]
        lines += [f"* {line}" for line in state.diagnosis.splitlines() if line.strip()]
    kinds = ("mitigation", "verified", "verification", "rolled_back", "controls_reverted",
             "controls_kept")  # fmt: skip
    actions = [e for e in state.timeline if e.kind in kinds]
    lines += ["", "h4. Actions"]
    lines += [f"* {e.at:%H:%M:%S} {e.text}" for e in actions] or ["* none recorded"]
    lines += ["", "h4. Timeline"]
    lines += [
        f"* {e.at:%H:%M:%S} {e.kind} ({e.actor} via {e.channel}): {e.text}" for e in state.timeline
    ]
    return "\n".join(lines)


# --- the incident report in Jira's wiki markup --------------------------------------------------

# The report's headings sit below the ticket's own: # -> h3., ## -> h4., ### -> h5.
_HEADING = re.compile(r"^(#{1,3}) (.*)$")
_TABLE_SEPARATOR = re.compile(r"^\|(\s*:?-+:?\s*\|)+\s*$")
_CELL_BREAK = re.compile(r"(?<!\\)\|")
_BOLD = re.compile(r"\*\*(.+?)\*\*")
_CODE = re.compile(r"`([^`]+)`")


def _inline(text: str) -> str:
    # Braces and brackets open macros and links in wiki markup: plain text keeps them as text.
    text = text.replace("{", "\\{").replace("[", "\\[")
    text = _CODE.sub(lambda m: "{{" + m.group(1) + "}}", text)
    return _BOLD.sub(r"*\1*", text)


def _row(row: str, bar: str) -> str:
    """A Markdown table row in wiki markup: `bar` "||" for a header, "|" for the rest."""
    cells = [_inline(cell.strip()) for cell in _CELL_BREAK.split(row.strip())[1:-1]]
    return bar + bar.join(f" {cell} " if cell else " " for cell in cells) + bar


def wiki(markdown: str) -> str:
    """The report's Markdown (headings, bullets, quotes, tables, bold, code) in Jira's wiki
    markup."""
    lines = markdown.splitlines()
    out: list[str] = []
    for index, line in enumerate(lines):
        following = lines[index + 1] if index + 1 < len(lines) else ""
        if _TABLE_SEPARATOR.match(line):
            continue
        if line.startswith("|") and _TABLE_SEPARATOR.match(following):
            out.append(_row(line, "||"))
        elif line.startswith("|"):
            out.append(_row(line, "|"))
        elif heading := _HEADING.match(line):
            out.append(f"h{len(heading.group(1)) + 2}. {_inline(heading.group(2))}")
        elif line.startswith("- "):
            out.append("* " + _inline(line[2:]))
        elif line.startswith("> "):
            out.append("bq. " + _inline(line[2:]))
        else:
            out.append(_inline(line))
    return "\n".join(out)


# --- the channel: what the incident's effects mean for Jira ------------------------------------


class JiraChannel:
    """A ticket opened when a level with Jira is reached, the timeline as comments, the
    postmortem and done at resolve."""

    name = "jira"

    def enabled(self, plan: NotificationPlan) -> bool:
        return plan.jira

    def react(self, effect: Effect, incident: Incident, lane: Lane) -> None:
        match effect:
            case Tell(entry):
                lane.push("comment", text=f"{entry.kind} by {entry.actor} via {entry.channel}: "
                          f"{entry.text}")  # fmt: skip
            case Notify(level, reason, "reopened") if incident.state.jira_issue is not None:
                lane.push("reopen", text=reason)
            case Notify(level):
                target = level.target(self.name)
                opened = incident.state.jira_issue is not None or lane.underway("open")
                if target is not None and not opened:
                    project = target.to[0] if target.to else incident.plan.jira_project
                    lane.push("open", text=project)
            case Resolved():
                lane.push("resolve")
            case Merged():
                lane.push("resolve")  # its own ticket, or one opened after the merge

    async def perform(self, action: LaneAction, incident: Incident) -> None:
        state = incident.state
        if action.kind == "open":
            if state.merged_into:
                return
            key = await incident.call(
                JiraActivities.open_ticket,
                JiraTicket(
                    incident_id=state.incident_id,
                    project=action.text,
                    summary=f"[{state.severity}] {state.trigger} on {state.scope}",
                    description=(
                        f"{state.summary}\n\nOpened by pagerloop at L{state.level}."
                        + runbook_line(state)
                        + (f"\n\nRunbook diagnosis:\n{state.diagnosis}" if state.diagnosis else "")
                    ),
                ),
                summary=f"Jira: open a ticket in {action.text}",
            )
            incident.apply(TicketOpened(key))
        elif action.kind == "reopen" and state.jira_issue is not None:
            await incident.call(
                JiraActivities.reopen,
                JiraComment(state.jira_issue, f"reopened by pagerloop: {action.text}"),
                summary=f"Jira: reopen {state.jira_issue}",
            )
        elif action.kind == "comment" and state.jira_issue is not None:
            await incident.call(
                JiraActivities.comment,
                JiraComment(state.jira_issue, action.text),
                summary=f"Jira: comment on {state.jira_issue}",
            )
        elif action.kind == "resolve" and state.jira_issue is not None:
            if incident.reports() and not state.merged_into:
                await incident.call(
                    JiraActivities.resolve,
                    JiraResolution(state.jira_issue, ""),
                    summary=f"Jira: done on {state.jira_issue} (the postmortem follows)",
                )
                return
            await incident.call(
                JiraActivities.resolve,
                JiraResolution(state.jira_issue, postmortem(state)),
                summary=f"Jira: postmortem and done on {state.jira_issue}",
            )

    async def post_report(self, report: ReportText | None, incident: Incident) -> None:
        """The incident report as the ticket's postmortem; without one (it could not be
        written), the postmortem from the incident's state alone."""
        state = incident.state
        if state.jira_issue is None:
            return
        text = wiki(report.markdown) if report is not None else postmortem(state)
        await incident.call(
            JiraActivities.postmortem,
            JiraPostmortem(state.jira_issue, state.episode_key, text),
            summary=f"Jira: the postmortem on {state.jira_issue}",
        )


JIRA_CHANNEL = JiraChannel()
