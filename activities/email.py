"""Email: one message when an incident opens, escalates and resolves, threaded per incident.

Messages go out over SMTP through aiosmtplib (STARTTLS, implicit TLS, or plain for a local
relay), each with a text/plain and a text/html part. Mail clients show an incident as one
conversation: every message's Message-ID is derived from the incident id and the event (and
the level, for an escalation), the "opened" message is the root, and every later message names
the root in `In-Reply-To` and `References` under the same subject after `Re: ` (Gmail and
Outlook thread only messages whose subjects match once such prefixes are dropped).

Exactly one message per event across retries and worker crashes: SMTP cannot be asked what it
already took, so the Message-IDs sent are recorded in the stores (`stores.email_ledger`). The
activity looks its Message-ID up before it connects and records it once the server has taken
the message; a retry, or a second request for the same event, finds it and sends nothing. A
crash between the server's 250 and the record's commit re-sends the same Message-ID, which
receiving systems and clients treat as the same message.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import html
import logging
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.errors import HeaderParseError
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime, getaddresses
from typing import TYPE_CHECKING, Literal, get_args
from urllib.parse import quote, urlsplit

import aiosmtplib
from pydantic import SecretStr
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.channel import Incident, reached_targets, told_before
from activities.finite import human_number
from activities.vendor_http import VendorErrors
from domain.incident import IncidentState, LaneAction, NotificationPlan
from domain.incident_machine import ChannelFailed, Delivered, Effect, Merged, Notify, Resolved
from domain.lanes import Lane
from stores import email_ledger

if TYPE_CHECKING:
    from config.settings import Settings

_log = logging.getLogger(__name__)

EmailEvent = Literal["opened", "escalated", "reopened", "resolved"]
EVENTS: tuple[str, ...] = get_args(EmailEvent)

# Bounds on what one message carries (hostile or runaway values are cut, never refused).
MAX_RECIPIENTS = 50
SUBJECT_MAX = 200
SUMMARY_MAX = 4000
REASON_MAX = 2000
FIELD_MAX = 300  # one-line values: names, scope, runbook, controls, level
METRICS_MAX = 50
CONTROLS_MAX = 20
URL_MAX = 2000
MESSAGE_ID_DOMAIN = "pagerloop"
# How long one delivery (connect, TLS, login, the message, quit) may take in all: keep it
# below the activity's start-to-close timeout (30 s for vendor calls), or a delivery cut off
# by that timeout may land and be sent again by the retry.
DEFAULT_TIMEOUT_SECONDS = 20.0


class EmailPermanentError(Exception):
    """The mail server refused for good (5xx: recipients, sender, credentials, message), the
    configuration cannot work (email off, no AUTH offered, STARTTLS not offered), or the request
    itself is invalid (no recipients, an address that does not parse, an unknown event)."""


@dataclass(frozen=True)
class SmtpConfig:
    """Where and how to send. `starttls` upgrades a plain connection (port 587) and fails when
    the server does not offer it; `use_tls` is implicit TLS from the first byte (port 465);
    neither: plain, for a local relay. `cafile` trusts that CA bundle instead of the system's
    (a private CA, or a test's self-signed certificate)."""

    host: str
    from_address: str
    port: int = 587
    username: str | None = None
    password: SecretStr | None = None
    starttls: bool = True
    use_tls: bool = False
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    validate_certs: bool = True
    cafile: str | None = None

    def __post_init__(self) -> None:
        if self.starttls and self.use_tls:
            raise ValueError(
                "SMTP: choose STARTTLS (port 587) or implicit TLS (port 465), not both"
            )


def make_config(settings: Settings) -> SmtpConfig | None:
    """The SMTP configuration from the settings; None when email is off."""
    if settings.smtp_host is None or settings.email_from is None:  # the settings require both
        return None
    return SmtpConfig(
        host=settings.smtp_host,
        from_address=settings.email_from,
        port=settings.smtp_port,
        username=settings.smtp_username or None,
        password=settings.smtp_password,
        starttls=settings.smtp_starttls,
        use_tls=settings.smtp_tls,
    )


@dataclass
class EmailRequest:
    """One email for one incident event. `state` goes without its timeline (the workflow sends
    `dataclasses.replace(state, timeline=[])`; the email never reads it). `recipients` are
    already resolved (a level's `email_to`, else PAGERLOOP_EMAIL_TO). `level` names the level
    an escalation reached (default: the state's); `reason` says why, in a line. The URLs may be
    empty; only http(s) ones become links."""

    state: IncidentState
    event: EmailEvent
    recipients: list[str]
    level: str = ""
    reason: str = ""
    status_url: str = ""
    temporal_ui_url: str = ""


@dataclass
class EmailSent:
    message_id: str
    # The envelope recipients the server took (empty when `already_sent`).
    recipients: list[str] = field(default_factory=list)
    # Recipients the server refused while it took the others: recipient -> its answer. The
    # message is not sent again for them (the others would get it twice).
    refused: dict[str, str] = field(default_factory=dict)
    # True: an earlier attempt (or an earlier request for the same event) sent it; nothing
    # was sent this time.
    already_sent: bool = False


# --- identity and threading ---------------------------------------------------------------


def _incident_hash(incident_id: str) -> str:
    return hashlib.sha256(incident_id.encode()).hexdigest()[:32]


_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,32}")


def _level_token(level: str) -> str:
    """A level name as it is when it is a safe token (L2), else a short digest of it."""
    if _TOKEN.fullmatch(level):
        return level
    return "h" + hashlib.sha256(level.encode()).hexdigest()[:12]


def root_message_id(incident_id: str) -> str:
    """The Message-ID of the incident's "opened" message, which every later one refers to."""
    return message_id(incident_id, "opened")


def message_id(incident_id: str, event: str, level: str = "") -> str:
    """The Message-ID of one event's message: the same on every attempt, different for every
    other incident, event, and (for escalations) level."""
    tag = f"escalated-{_level_token(level)}" if event == "escalated" else event
    return f"<{_incident_hash(incident_id)}.{tag}@{MESSAGE_ID_DOMAIN}>"


def request_message_id(request: EmailRequest) -> str:
    # A reopened incident's messages are new ones (its second resolve is not its first), in the
    # same thread: the root stays the incident's own.
    return message_id(request.state.episode_key, request.event, _event_level(request))


def _event_level(request: EmailRequest) -> str:
    return request.level or request.state.level_name


# --- rendering (pure) ------------------------------------------------------------------------


def _one_line(text: str, limit: int) -> str:
    """Control characters (line breaks included) become spaces; cut to `limit`."""
    flat = "".join(" " if unicodedata.category(c).startswith("C") else c for c in text)
    flat = " ".join(flat.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def base_subject(state: IncidentState) -> str:
    """The incident's subject: the same for each of its messages, so clients thread them."""
    return _one_line(f"[{state.severity}] {state.trigger} on {state.scope}", SUBJECT_MAX)


def subject(request: EmailRequest) -> str:
    base = base_subject(request.state)
    return base if request.event == "opened" else f"Re: {base}"


def headline(request: EmailRequest) -> str:
    """The first line of the message (what an inbox shows beside the subject)."""
    state = request.state
    if request.event == "opened":
        words = "Incident opened"
    elif request.event == "escalated":
        words = f"Escalated to {_one_line(_event_level(request), FIELD_MAX)}"
    elif request.event == "reopened":
        words = f"Reopened at {_one_line(_event_level(request), FIELD_MAX)}"
    else:
        words = "Resolved"
        if state.resolved_by:
            words += f" by {_one_line(state.resolved_by, FIELD_MAX)}"
    reason = _one_line(request.reason, REASON_MAX)
    return f"{words}: {reason}" if reason else words


def _date(at: datetime | None) -> str:
    if at is None:
        return ""
    at = at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)
    return f"{at:%Y-%m-%d %H:%M} UTC"


def _facts(request: EmailRequest) -> list[tuple[str, str]]:
    """(label, value) rows: the incident's state at this event."""
    state = request.state
    rows = [
        ("Status", str(state.status)),
        ("Severity", str(state.severity)),
        ("Trigger", str(state.trigger)),
        ("Scope", state.scope),
        ("Level", _event_level(request)),
        ("Opened", _date(state.opened_at)),
    ]
    if state.acknowledged_by:
        rows.append(("Acknowledged by", state.acknowledged_by))
    if state.resolved_by:
        rows.append(("Resolved by", state.resolved_by))
    if state.resolved_at:
        rows.append(("Resolved", _date(state.resolved_at)))
    if state.runbook:
        phase = state.verification or state.runbook_phase or "starting"
        rows.append(("Runbook", f"{state.runbook} ({phase})"))
    rows += [("Control in force", control) for control in state.controls[:CONTROLS_MAX]]
    return [(label, _one_line(value, FIELD_MAX)) for label, value in rows]


def _metrics(state: IncidentState) -> list[tuple[str, str]]:
    rows = []
    for name, value in list(state.metrics.items())[:METRICS_MAX]:
        shown = human_number(value, percent=name.endswith(("_rate", "_ratio")))
        rows.append((_one_line(name, FIELD_MAX), _one_line(shown, FIELD_MAX)))
    return rows


def _links(request: EmailRequest) -> list[tuple[str, str]]:
    """(label, url) of the links that are http(s) URLs with a host; anything else is left
    out (a `javascript:` URL, a URL with line breaks, one too long)."""
    links = []
    for label, url in (
        ("Runbook", request.state.runbook_url or ""),
        ("Status page", request.status_url),
        ("Temporal UI", request.temporal_ui_url),
    ):
        url = url.strip()
        if not url or len(url) > URL_MAX or _one_line(url, URL_MAX) != url:
            continue
        try:
            parts = urlsplit(url)
            usable = parts.scheme.lower() in {"http", "https"} and bool(parts.hostname)
        except ValueError:
            usable = False
        if usable:
            links.append((label, url))
    return links


def render_text(request: EmailRequest) -> str:
    state = request.state
    lines = [headline(request), "", base_subject(state)]
    summary = _cut(state.summary.strip(), SUMMARY_MAX)
    if summary:
        lines.append(summary)
    lines.append("")
    facts = _facts(request)
    width = max(len(label) for label, _ in facts)
    lines += [f"{label:<{width}}  {value}" for label, value in facts]
    metrics = _metrics(state)
    if metrics:
        lines += ["", "Metrics"]
        lines += [f"  {name}: {value}" for name, value in metrics]
    links = _links(request)
    if links:
        lines.append("")
        lines += [f"{label}: {url}" for label, url in links]
    lines += ["", f"Incident {_one_line(state.incident_id, FIELD_MAX)}", ""]
    return "\n".join(lines)


def render_html(request: EmailRequest) -> str:
    """The same as `render_text`, every dynamic value HTML-escaped."""
    state = request.state

    def esc(text: str) -> str:
        return html.escape(text, quote=True)

    def table(rows: Sequence[tuple[str, str]]) -> str:
        cells = "".join(
            f'<tr><th align="left" style="padding:2px 12px 2px 0">{esc(k)}</th>'
            f"<td>{esc(v)}</td></tr>"
            for k, v in rows
        )
        return f'<table cellspacing="0" style="border-collapse:collapse">{cells}</table>'

    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8"></head>',
        '<body style="font-family:sans-serif">',
        f"<h2>{esc(headline(request))}</h2>",
        f"<p><strong>{esc(base_subject(state))}</strong></p>",
    ]
    summary = _cut(state.summary.strip(), SUMMARY_MAX)
    if summary:
        parts.append(f'<p style="white-space:pre-wrap">{esc(summary)}</p>')
    parts.append(table(_facts(request)))
    metrics = _metrics(state)
    if metrics:
        parts += ["<h3>Metrics</h3>", table(metrics)]
    links = _links(request)
    if links:
        anchors = " · ".join(f'<a href="{esc(url)}">{esc(label)}</a>' for label, url in links)
        parts.append(f"<p>{anchors}</p>")
    parts.append(
        f'<p style="color:#666">Incident <code>{esc(_one_line(state.incident_id, FIELD_MAX))}'
        "</code></p>"
    )
    parts.append("</body></html>")
    return "\n".join(parts)


def _address(text: str, what: str) -> Address:
    """One address (`a@b` or `Name <a@b>`), or EmailPermanentError naming `what`."""
    if any(unicodedata.category(c).startswith("C") for c in text):
        raise EmailPermanentError(f"{what}: an address with control characters")
    pairs = getaddresses([text])
    if len(pairs) != 1 or "@" not in pairs[0][1]:
        raise EmailPermanentError(f"{what}: not one email address: {text[:100]!r}")
    name, addr = pairs[0]
    try:
        return Address(display_name=name, addr_spec=addr)
    except (ValueError, IndexError, HeaderParseError) as exc:
        raise EmailPermanentError(f"{what}: not an email address: {addr[:100]!r}") from exc


def recipients_of(request: EmailRequest) -> list[Address]:
    """The request's recipients, parsed, duplicates dropped; at least one, at most
    MAX_RECIPIENTS."""
    found: dict[str, Address] = {}
    for text in request.recipients:
        if text.strip():
            address = _address(text.strip(), "recipient")
            found.setdefault(address.addr_spec.lower(), address)
    if not found:
        raise EmailPermanentError("no recipients (a level's email_to, or PAGERLOOP_EMAIL_TO)")
    if len(found) > MAX_RECIPIENTS:
        raise EmailPermanentError(f"{len(found)} recipients: at most {MAX_RECIPIENTS}")
    return list(found.values())


def build_message(request: EmailRequest, from_address: str, now: datetime) -> EmailMessage:
    """The whole message: headers (threading included) and its text and HTML parts."""
    if request.event not in EVENTS:
        raise EmailPermanentError(f"unknown email event {request.event!r}: one of {EVENTS}")
    state = request.state
    sender = _address(from_address, "PAGERLOOP_EMAIL_FROM")
    to = recipients_of(request)
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = subject(request)
    message["Date"] = format_datetime(now.astimezone(UTC))
    message["Message-ID"] = request_message_id(request)
    if request.event != "opened":
        root = root_message_id(state.incident_id)
        message["In-Reply-To"] = root
        message["References"] = root
    # No vacation replies or bounces-to-list loops (RFC 3834).
    message["Auto-Submitted"] = "auto-generated"
    message["X-Pagerloop-Incident"] = quote(state.incident_id, safe=":@/+-_.~")[: FIELD_MAX * 3]
    message["X-Pagerloop-Event"] = request.event
    message.set_content(render_text(request))
    message.add_alternative(render_html(request), subtype="html")
    return message


# --- sending ---------------------------------------------------------------------------------


# SMTP names no throttling pause; "EmailError" is the retryable type.
ERRORS = VendorErrors("Email", EmailPermanentError, default_retry_after=60)


def _retryable(text: str) -> ApplicationError:
    return ApplicationError(text, type=ERRORS.retryable)


def _translate(exc: Exception, host: str, timeout_seconds: float) -> Exception:
    """aiosmtplib's errors as ours (through the vendors' one mapping): a 5xx answer is for
    good, a 4xx one, or a connection that failed or timed out, is worth another try."""
    where = f"the message via {host}"
    if isinstance(exc, aiosmtplib.SMTPRecipientsRefused):
        said = "; ".join(f"{r.recipient}: {r.code} {r.message}" for r in exc.recipients)
        permanent = all(500 <= r.code < 600 for r in exc.recipients)
        return ERRORS.answer(f"{where}: every recipient", 0, detail=said, refused=permanent)
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        what = f"{where}: {type(exc).__name__.removeprefix('SMTP')}"
        refused = 500 <= exc.code < 600
        return ERRORS.answer(what, 0, detail=f"{exc.code} {exc.message}", refused=refused)
    if isinstance(exc, TimeoutError) and not str(exc):
        exc = TimeoutError(f"no answer within {timeout_seconds:g}s")
    return ERRORS.unreachable(where, exc)


async def deliver(
    config: SmtpConfig, message: EmailMessage, sender: str, recipients: list[str]
) -> dict[str, str]:
    """Send `message` to `recipients` (envelope addresses); returns the recipients refused
    while the others were taken (recipient -> the server's answer). Raises EmailPermanentError
    or a retryable ApplicationError."""
    client = aiosmtplib.SMTP(
        hostname=config.host,
        port=config.port,
        use_tls=config.use_tls,
        start_tls=False,  # below, once the server is known to offer it
        validate_certs=config.validate_certs,
        cert_bundle=config.cafile,
        timeout=config.timeout_seconds,
    )
    try:
        async with asyncio.timeout(config.timeout_seconds):
            await client.connect()
            if config.starttls and not config.use_tls:
                await client.ehlo()
                if not client.supports_extension("starttls"):
                    raise EmailPermanentError(
                        f"SMTP server {config.host} does not offer STARTTLS, but "
                        "PAGERLOOP_SMTP_STARTTLS is on"
                    )
                await client.starttls()
            if config.username:
                if client.is_ehlo_or_helo_needed:  # after STARTTLS: the extensions anew
                    await client.ehlo()
                if not client.supports_extension("auth"):
                    raise EmailPermanentError(
                        f"SMTP server {config.host} offers no AUTH, but "
                        "PAGERLOOP_SMTP_USERNAME is set"
                    )
                password = config.password.get_secret_value() if config.password else ""
                await client.login(config.username, password)
            errors, _ = await client.send_message(message, sender=sender, recipients=recipients)
    except EmailPermanentError:
        client.close()
        raise
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
        client.close()
        raise _translate(exc, config.host, config.timeout_seconds) from exc
    except BaseException:
        client.close()
        raise
    # Taken: nothing that goes wrong from here on may fail the send.
    with contextlib.suppress(Exception):
        async with asyncio.timeout(min(5.0, config.timeout_seconds)):
            await client.quit()
    client.close()
    return {who: f"{answer.code} {answer.message}" for who, answer in errors.items()}


class EmailActivities:
    """Registered even when email is off, so an incident opened while it was on fails its
    email steps cleanly (on its timeline) instead of waiting for a worker that has them.
    `engine` holds the sent ledger (`email_sent`)."""

    def __init__(self, config: SmtpConfig | None, engine: Engine) -> None:
        self._config = config
        self._engine = engine

    def _require_config(self) -> SmtpConfig:
        if self._config is None:
            raise EmailPermanentError("Email is off: PAGERLOOP_SMTP_HOST is not set")
        return self._config

    @activity.defn(name="email.send_incident_email")
    async def send_incident_email(self, request: EmailRequest) -> EmailSent:
        """One message for one incident event, once: a message whose Message-ID the ledger
        holds is not sent again."""
        config = self._require_config()
        state = request.state
        message = build_message(request, config.from_address, datetime.now(UTC))
        mid = str(message["Message-ID"])
        try:
            sent = await asyncio.to_thread(email_ledger.was_sent, self._engine, mid)
        except SQLAlchemyError as exc:
            raise _retryable(f"the sent-email ledger is unreachable: {exc}") from exc
        if sent:
            _log.info("email %s for %s already sent: not sent again", mid, state.incident_id)
            return EmailSent(message_id=mid, already_sent=True)
        sender = _address(config.from_address, "PAGERLOOP_EMAIL_FROM").addr_spec
        recipients = [a.addr_spec for a in recipients_of(request)]
        refused = await deliver(config, message, sender, recipients)
        try:
            await asyncio.to_thread(
                email_ledger.record_sent, self._engine, mid, state.incident_id, datetime.now(UTC)
            )
        except SQLAlchemyError as exc:
            # Sent: failing now would only make the retry send it again. Without the record,
            # only a retry of this very attempt (its result lost) would repeat it.
            _log.warning("email %s sent but not recorded in the ledger: %s", mid, exc)
        if refused:
            _log.warning(
                "email %s for %s: the server refused %s",
                mid,
                state.incident_id,
                "; ".join(f"{who}: {answer}" for who, answer in refused.items()),
            )
        _log.info(
            "email %s (%s) for %s sent to %d recipient(s)",
            mid,
            request.event,
            state.incident_id,
            len(recipients) - len(refused),
        )
        return EmailSent(
            message_id=mid,
            recipients=[r for r in recipients if r not in refused],
            refused=refused,
        )


def temporal_ui_link(ui_base_url: str, namespace: str, workflow_id: str) -> str:
    """The Temporal UI page of a workflow (`""` without a UI base URL)."""
    if not ui_base_url:
        return ""
    base = ui_base_url.rstrip("/")
    return f"{base}/namespaces/{quote(namespace, safe='')}/workflows/{quote(workflow_id, safe='')}"


# --- the channel: what the incident's effects mean for email ----------------------------------


class EmailChannel:
    """A message when the incident opens or escalates to a level that emails, and one when it
    resolves (to everyone emailed so far), in one thread per incident."""

    name = "email"

    def enabled(self, plan: NotificationPlan) -> bool:
        return plan.email

    def react(self, effect: Effect, incident: Incident, lane: Lane) -> None:
        match effect:
            case Notify(level, reason, kind) if kind != "reminded" and level.target(self.name):
                target = level.target(self.name)
                to = list(target.to) if target and target.to else incident.plan.email_to
                lane.push(kind, text=reason, level=level.name, to=to)
            case Resolved() | Merged():
                lane.push("resolved")

    async def perform(self, action: LaneAction, incident: Incident) -> None:
        plan, event = incident.plan, action.kind
        if event == "resolved":
            if not told_before(incident, self.name):
                return  # nobody was emailed: nothing to close
            reached = reached_targets(incident, self.name)
            recipients = sorted({a for t in reached for a in (t.to or plan.email_to)})
        else:
            recipients = action.to
        if event not in EVENTS:
            return  # a reminder: email tells of openings, escalations and the resolve only
        if not recipients:
            why = "no recipients (PAGERLOOP_EMAIL_TO or the level's email_to)"
            incident.apply(ChannelFailed(self.name, event, why))
            return
        state = incident.state
        sent = await incident.call(
            EmailActivities.send_incident_email,
            EmailRequest(
                state=incident.shown(),
                event=event,  # type: ignore[arg-type]  # one of EVENTS, checked above
                recipients=recipients,
                level=action.level,
                reason=action.text,
                status_url=plan.status_url,
                temporal_ui_url=plan.temporal_ui_url + quote(state.incident_id, safe=""),
            ),
            summary=f"Email: {event} to {len(recipients)} recipient(s)",
        )
        to = recipients if sent.already_sent else sent.recipients
        incident.apply(Delivered(self.name, f"email ({event}) to {', '.join(to)}"))


EMAIL = EmailChannel()
