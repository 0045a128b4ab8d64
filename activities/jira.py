"""Jira: one ticket per incident (found by its label before any create, so a retry or a
crash never makes a second), comments on state changes, the postmortem, then Done."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from jira import JIRA, JIRAError
from requests.exceptions import RequestException
from temporalio import activity

from activities.vendor_http import VendorErrors, attempt_key, request_unencodable

DONE_TRANSITIONS = (
    "done",
    "resolve",
    "resolve issue",
    "resolved",
    "close",
    "close issue",
    "closed",
)
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
    postmortem: str


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
        if not (retry and key is not None and _commented(client, issue, key)):
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
