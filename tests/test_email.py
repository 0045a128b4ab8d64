"""The email channel against a real SMTP server in-process (aiosmtpd): one message per incident
event with text and HTML parts, threaded by Message-ID / In-Reply-To / References, sent once
across retries (the sent ledger in the stores, SQLite and PostgreSQL), STARTTLS and implicit
TLS with a certificate made for the test, AUTH, and the SMTP answers mapped to permanent and
retryable errors. Once on a Temporal server, through the data converter the worker uses."""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any, cast

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session
from pydantic import SecretStr
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import Session as DbSession
from sqlmodel import select
from temporalio import workflow
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment
from temporalio.worker import Worker

from activities import email
from activities.email import (
    EmailActivities,
    EmailPermanentError,
    EmailRequest,
    EmailSent,
    SmtpConfig,
)
from activities.policies import VENDOR_CALL
from config.settings import ConfigurationError, Settings, load_settings
from domain.incident import IncidentState, IncidentStatus, Severity, Trigger
from stores import email_ledger
from stores.email_ledger import SentEmail
from tests.conftest import free_port

SENDER = "pagerloop@example.com"
ONCALL = "oncall@example.com"
LEAD = "Team Lead <lead@example.com>"
USER = "pagerloop-smtp"
PASSWORD = "s3cret-Pa55word!"
STATUS_URL = "https://pagerloop.example.com/status"
UI_URL = "https://temporal.example.com/namespaces/default/workflows/incident-1"


# --- an SMTP server in-process -----------------------------------------------------------------


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage
    tls: bool
    authenticated: bool

    def header(self, name: str) -> str | None:
        value = self.message[name]
        return None if value is None else str(value)

    def text(self) -> str:
        part = self.message.get_body(("plain",))
        assert part is not None
        return str(cast(EmailMessage, part).get_content())

    def html(self) -> str:
        part = self.message.get_body(("html",))
        assert part is not None
        return str(cast(EmailMessage, part).get_content())


class Mailbox:
    """An aiosmtpd handler keeping what it is sent. Recipients whose local part starts with
    `refused` get 550, with `later` 451; `fail_data` answers the next DATA with that reply."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        self.fail_data: str | None = None

    async def handle_RCPT(  # noqa: N802 - aiosmtpd's hook names
        self,
        server: Any,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if address.startswith("refused"):
            return "550 5.1.1 no such user here"
        if address.startswith("later"):
            return "451 4.3.0 mailbox busy, try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(  # noqa: N802
        self, server: Any, session: Session, envelope: Envelope
    ) -> str:
        if self.fail_data is not None:
            answer, self.fail_data = self.fail_data, None
            return answer
        content = envelope.original_content or envelope.content
        assert isinstance(content, bytes)
        message = cast(EmailMessage, message_from_bytes(content, policy=policy.default))
        self.received.append(
            Received(
                mail_from=str(envelope.mail_from),
                rcpt_tos=list(envelope.rcpt_tos),
                message=message,
                # STARTTLS sets session.ssl; implicit TLS shows on the connection only.
                tls=session.ssl is not None
                or server.transport.get_extra_info("ssl_object") is not None,
                authenticated=bool(session.authenticated),
            )
        )
        return "250 2.0.0 queued"


def authenticate(
    server: Any, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and auth_data == (USER.encode(), PASSWORD.encode())
    return AuthResult(success=ok, handled=False)  # not handled: aiosmtpd answers 535


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, made for this run: (cert, key)."""
    folder = tmp_path_factory.mktemp("smtp-tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def server_tls(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    return context


@pytest.fixture
def mailbox() -> Mailbox:
    return Mailbox()


def serve(mailbox: Mailbox, **params: Any) -> Iterator[int]:
    port = free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port, **params)
    controller.start()
    try:
        yield port
    finally:
        controller.stop()


@pytest.fixture
def plain_port(mailbox: Mailbox) -> Iterator[int]:
    """A relay that takes mail without TLS or AUTH."""
    yield from serve(mailbox)


@pytest.fixture
def starttls_port(mailbox: Mailbox, certificate: tuple[Path, Path]) -> Iterator[int]:
    """A submission server: STARTTLS required before anything else, then AUTH required."""
    yield from serve(
        mailbox,
        tls_context=server_tls(certificate),
        require_starttls=True,
        authenticator=authenticate,
        auth_required=True,
        auth_require_tls=True,
    )


@pytest.fixture
def tls_port(mailbox: Mailbox, certificate: tuple[Path, Path]) -> Iterator[int]:
    """Implicit TLS from the first byte (port 465's way), AUTH required."""
    yield from serve(
        mailbox,
        ssl_context=server_tls(certificate),
        authenticator=authenticate,
        auth_required=True,
        auth_require_tls=False,  # aiosmtpd counts only STARTTLS as TLS; this one is TLS throughout
    )


def plain(port: int, **changes: Any) -> SmtpConfig:
    config = SmtpConfig(
        host="127.0.0.1", port=port, from_address=SENDER, starttls=False, timeout_seconds=5.0
    )
    return replace(config, **changes)


def secured(port: int, certificate: tuple[Path, Path], **changes: Any) -> SmtpConfig:
    config = SmtpConfig(
        host="127.0.0.1",
        port=port,
        from_address=SENDER,
        username=USER,
        password=SecretStr(PASSWORD),
        cafile=str(certificate[0]),
        timeout_seconds=5.0,
    )
    return replace(config, **changes)


# --- incidents and attempts --------------------------------------------------------------------

OPENED_AT = datetime(2026, 12, 8, 12, 0, tzinfo=UTC)


def incident(**changes: Any) -> IncidentState:
    state = IncidentState(
        incident_id=f"incident-cost_spike-feature:search-{uuid.uuid4().hex[:8]}",
        trigger=Trigger.COST_SPIKE,
        scope="feature:search",
        severity=Severity.SEV4,
        status=IncidentStatus.DETECTED,
        opened_at=OPENED_AT,
        summary="cost $41.20/h over $10.00/h for 5 min",
        metrics={"cost_usd_per_hour": 41.2, "error_rate": 0.04},
    )
    return replace(state, **changes)


def request(state: IncidentState, event: str = "opened", **changes: Any) -> EmailRequest:
    base = EmailRequest(
        state=state,
        event=event,  # type: ignore[arg-type]
        recipients=[ONCALL, LEAD],
        status_url=STATUS_URL,
        temporal_ui_url=UI_URL,
    )
    return replace(base, **changes)


def attempt(number: int) -> ActivityEnvironment:
    env = ActivityEnvironment()
    now = datetime.now(UTC)
    env.info = replace(
        ActivityEnvironment.default_info(),
        attempt=number,
        activity_id="email-1",
        workflow_run_id="run-1",
        scheduled_time=now - timedelta(seconds=40),
        current_attempt_scheduled_time=now,
    )
    return env


async def send(activities: EmailActivities, req: EmailRequest, number: int = 1) -> EmailSent:
    result: EmailSent = await attempt(number).run(activities.send_incident_email, req)
    return result


def ledger(engine: Engine) -> list[SentEmail]:
    with DbSession(engine) as session:
        return list(session.exec(select(SentEmail)))


def without_re(subject: str | None) -> str:
    assert subject is not None
    return subject.removeprefix("Re: ")


# --- one message per event, its headers and parts ----------------------------------------------


async def test_an_opened_incident_sends_one_message_with_text_and_html(
    mailbox: Mailbox, plain_port: int, engine: Engine
) -> None:
    state = incident()
    sent = await send(EmailActivities(plain(plain_port), engine), request(state))

    [mail] = mailbox.received
    assert mail.mail_from == SENDER
    assert mail.rcpt_tos == [ONCALL, "lead@example.com"]
    assert sent == EmailSent(message_id=sent.message_id, recipients=mail.rcpt_tos)
    assert mail.header("From") == SENDER
    assert mail.header("To") == f"{ONCALL}, {LEAD}"
    assert mail.header("Subject") == "[SEV4] cost_spike on feature:search"
    assert mail.header("Message-ID") == sent.message_id == email.root_message_id(state.incident_id)
    assert re.fullmatch(r"<[0-9a-f]{32}\.opened@pagerloop>", sent.message_id)
    assert mail.header("In-Reply-To") is None
    assert mail.header("References") is None
    assert mail.header("Auto-Submitted") == "auto-generated"
    assert mail.header("Date") is not None
    assert mail.message.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in mail.message.iter_parts()] == [
        "text/plain",
        "text/html",
    ]
    for body in (mail.text(), mail.html()):
        assert "Incident opened" in body
        assert "cost $41.20/h over $10.00/h for 5 min" in body
        assert "cost_usd_per_hour" in body
        assert "41.2" in body
        assert "error_rate" in body
        assert "4.0%" in body
        assert STATUS_URL in body
        assert UI_URL in body
        assert state.incident_id in body
    assert f'<a href="{STATUS_URL}">Status page</a>' in mail.html()
    assert f'<a href="{UI_URL}">Temporal UI</a>' in mail.html()
    assert f"Status page: {STATUS_URL}" in mail.text()
    [row] = ledger(engine)
    assert (row.message_id, row.incident_id) == (sent.message_id, state.incident_id)


async def test_escalated_and_resolved_messages_thread_under_the_opened_one(
    mailbox: Mailbox, plain_port: int, engine: Engine
) -> None:
    activities = EmailActivities(plain(plain_port), engine)
    state = incident()
    await send(activities, request(state))
    escalated = replace(state, level=2, level_name="L2")
    await send(
        activities,
        request(escalated, "escalated", reason="not acknowledged within 5 minutes"),
    )
    await send(activities, request(replace(escalated, level=3, level_name="L3"), "escalated"))
    resolved = replace(
        escalated, status=IncidentStatus.RESOLVED, resolved_by="alice", resolved_at=OPENED_AT
    )
    await send(activities, request(resolved, "resolved", reason="cost back under budget"))

    opened, to_l2, to_l3, done = mailbox.received
    root = opened.header("Message-ID")
    assert root == email.root_message_id(state.incident_id)
    ids = [m.header("Message-ID") for m in mailbox.received]
    assert len(set(ids)) == 4
    assert ids[1:] == [
        email.message_id(state.incident_id, "escalated", "L2"),
        email.message_id(state.incident_id, "escalated", "L3"),
        email.message_id(state.incident_id, "resolved"),
    ]
    for reply in (to_l2, to_l3, done):
        assert reply.header("In-Reply-To") == root
        assert reply.header("References") == root
        assert reply.header("Subject") == f"Re: {opened.header('Subject')}"
    assert {without_re(m.header("Subject")) for m in mailbox.received} == {
        "[SEV4] cost_spike on feature:search"
    }
    assert to_l2.text().startswith("Escalated to L2: not acknowledged within 5 minutes")
    assert to_l3.text().startswith("Escalated to L3")
    assert done.text().startswith("Resolved by alice: cost back under budget")
    assert "<h2>Resolved by alice: cost back under budget</h2>" in done.html()
    # Another incident's messages are another conversation.
    await send(activities, request(incident()))
    assert mailbox.received[-1].header("Message-ID") not in ids
    assert len(ledger(engine)) == 5


async def test_hostile_values_are_escaped_in_the_html_and_cannot_add_headers(
    mailbox: Mailbox, plain_port: int, engine: Engine
) -> None:
    state = incident(
        scope="feature:<script>alert(1)</script>\r\nBcc: victim@example.org",
        summary='</table><a href="javascript:alert(2)">click</a> & "quotes"',
        metrics={"<img src=x onerror=alert(3)>": 1.0},
        acknowledged_by="<b>mallory</b>",
        controls=["throttle <iframe>"],
    )
    req = request(
        state,
        reason="<svg onload=alert(4)>",
        status_url="javascript:alert(5)",
        temporal_ui_url='https://ui.example.com/"><script>alert(6)</script>',
    )
    await send(EmailActivities(plain(plain_port), engine), req)

    [mail] = mailbox.received
    html = mail.html()
    for raw in ("<script>", "<img", "<svg", "<iframe>", "<b>mallory", '<a href="javascript'):
        assert raw not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=alert(3)&gt;" in html
    assert "&lt;/table&gt;&lt;a href=&quot;javascript:alert(2)&quot;&gt;" in html
    assert "&amp; &quot;quotes&quot;" in html
    assert "&lt;svg onload=alert(4)&gt;" in html
    assert "javascript:alert(5)" not in html
    assert "javascript:alert(5)" not in mail.text()
    assert 'href="https://ui.example.com/&quot;&gt;&lt;script&gt;' in html
    # The line break in the scope did not become a header; the text part keeps the words.
    assert mail.header("Bcc") is None
    assert mail.rcpt_tos == [ONCALL, "lead@example.com"]
    assert "\n" not in str(mail.header("Subject"))
    assert "<script>alert(1)</script> Bcc: victim@example.org" in mail.text()


def test_a_runaway_request_is_bounded() -> None:
    state = incident(
        summary="x" * 100_000,
        metrics={f"metric_{i}": float(i) for i in range(500)},
        scope="feature:" + "s" * 10_000,
    )
    message = email.build_message(request(state), SENDER, OPENED_AT)
    assert len(str(message["Subject"])) <= email.SUBJECT_MAX
    text = email.render_text(request(state))
    assert text.count("metric_") == email.METRICS_MAX
    assert len(text) < 20_000
    too_many = request(state, recipients=[f"u{i}@example.com" for i in range(51)])
    with pytest.raises(EmailPermanentError, match="at most 50"):
        email.build_message(too_many, SENDER, OPENED_AT)


# --- once, across retries and crashes (SQLite and PostgreSQL ledgers) --------------------------


async def test_a_retried_attempt_whose_first_attempt_sent_does_not_send_again(
    mailbox: Mailbox, plain_port: int, store: Engine
) -> None:
    activities = EmailActivities(plain(plain_port), store)
    req = request(incident())
    first = await send(activities, req, number=1)
    # The worker died before Temporal heard back: attempts 2 and 3 find the ledger's row.
    second = await send(activities, req, number=2)
    third = await send(activities, req, number=3)

    assert len(mailbox.received) == 1
    assert not first.already_sent
    assert second == third == EmailSent(message_id=first.message_id, already_sent=True)
    [row] = ledger(store)
    assert row.message_id == first.message_id
    assert row.incident_id == req.state.incident_id
    assert email_ledger.was_sent(store, first.message_id)
    assert not email_ledger.record_sent(store, first.message_id, "other", OPENED_AT)


async def test_a_first_attempt_the_server_turned_away_is_sent_by_the_retry(
    mailbox: Mailbox, plain_port: int, store: Engine
) -> None:
    activities = EmailActivities(plain(plain_port), store)
    req = request(incident(), "escalated", level="L2")
    mailbox.fail_data = "451 4.3.0 queue full, try later"
    with pytest.raises(ApplicationError) as failed:
        await send(activities, req, number=1)
    assert failed.value.type == "EmailError"
    assert not failed.value.non_retryable
    assert "451" in str(failed.value)
    assert mailbox.received == []
    assert ledger(store) == []

    sent = await send(activities, req, number=2)
    [mail] = mailbox.received
    assert mail.header("Message-ID") == sent.message_id
    assert not sent.already_sent
    assert [row.message_id for row in ledger(store)] == [sent.message_id]


async def test_the_crash_window_resends_under_the_same_message_id(
    mailbox: Mailbox, plain_port: int, store: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server took the message but the ledger's row was never committed (the worker died
    in between, or the store failed): the retry sends it again, under the same Message-ID, which
    mail systems take for the same message. A ledger failure after the send does not fail it."""
    activities = EmailActivities(plain(plain_port), store)
    req = request(incident())

    def store_down(*args: object) -> bool:
        raise OperationalError("INSERT", {}, Exception("the store is away"))

    with monkeypatch.context() as patched:
        patched.setattr(email_ledger, "record_sent", store_down)
        first = await send(activities, req, number=1)
    assert not first.already_sent
    assert ledger(store) == []

    second = await send(activities, req, number=2)
    assert not second.already_sent
    assert [m.header("Message-ID") for m in mailbox.received] == [first.message_id] * 2
    assert len(ledger(store)) == 1
    assert (await send(activities, req, number=3)).already_sent
    assert len(mailbox.received) == 2


async def test_a_ledger_that_cannot_be_read_sends_nothing_and_is_retried(
    mailbox: Mailbox, plain_port: int, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def store_down(*args: object) -> bool:
        raise OperationalError("SELECT", {}, Exception("the store is away"))

    monkeypatch.setattr(email_ledger, "was_sent", store_down)
    with pytest.raises(ApplicationError, match="ledger is unreachable") as failed:
        await send(EmailActivities(plain(plain_port), engine), request(incident()))
    assert failed.value.type == "EmailError"
    assert not failed.value.non_retryable
    assert mailbox.received == []


# --- TLS and AUTH --------------------------------------------------------------------------------


async def test_starttls_and_auth_against_a_server_that_requires_them(
    mailbox: Mailbox,
    starttls_port: int,
    certificate: tuple[Path, Path],
    engine: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    config = secured(starttls_port, certificate)
    sent = await send(EmailActivities(config, engine), request(incident()))

    [mail] = mailbox.received
    assert mail.tls
    assert mail.authenticated
    assert mail.header("Message-ID") == sent.message_id
    assert PASSWORD not in repr(config)
    ours = [r for r in caplog.records if not r.name.startswith("mail.log")]
    assert any(sent.message_id in r.getMessage() for r in ours)
    assert not any(PASSWORD in r.getMessage() for r in ours)


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
async def test_implicit_tls_and_auth(
    mailbox: Mailbox, tls_port: int, certificate: tuple[Path, Path], engine: Engine
) -> None:
    config = secured(tls_port, certificate, starttls=False, use_tls=True)
    await send(EmailActivities(config, engine), request(incident()))
    [mail] = mailbox.received
    assert mail.tls
    assert mail.authenticated


async def test_a_certificate_the_client_does_not_trust_sends_nothing(
    mailbox: Mailbox, starttls_port: int, certificate: tuple[Path, Path], engine: Engine
) -> None:
    config = secured(starttls_port, certificate, cafile=None)  # the system's CAs only
    with pytest.raises(ApplicationError, match="CERTIFICATE_VERIFY_FAILED") as failed:
        await send(EmailActivities(config, engine), request(incident()))
    # Retried: a lapsed certificate gets renewed, and the retries carry the message past it.
    assert failed.value.type == "EmailError"
    assert mailbox.received == []
    assert ledger(engine) == []


async def test_a_wrong_password_is_permanent_and_not_repeated(
    mailbox: Mailbox,
    starttls_port: int,
    certificate: tuple[Path, Path],
    engine: Engine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "not-the-Pa55word"
    config = secured(starttls_port, certificate, password=SecretStr(wrong))
    with pytest.raises(EmailPermanentError, match="535") as failed:
        await send(EmailActivities(config, engine), request(incident()))
    assert wrong not in str(failed.value)
    assert wrong not in repr(config)
    assert not any(wrong in r.getMessage() for r in caplog.records)
    assert mailbox.received == []
    assert ledger(engine) == []


async def test_no_starttls_against_a_server_that_requires_it_is_permanent(
    mailbox: Mailbox, starttls_port: int, engine: Engine
) -> None:
    with pytest.raises(EmailPermanentError, match="530"):
        await send(EmailActivities(plain(starttls_port), engine), request(incident()))
    assert mailbox.received == []


async def test_credentials_for_a_server_without_auth_are_permanent(
    mailbox: Mailbox, plain_port: int, engine: Engine
) -> None:
    config = plain(plain_port, username=USER, password=SecretStr(PASSWORD))
    with pytest.raises(EmailPermanentError, match="offers no AUTH"):
        await send(EmailActivities(config, engine), request(incident()))
    assert mailbox.received == []


async def test_starttls_on_a_server_that_does_not_offer_it_is_permanent(
    mailbox: Mailbox, plain_port: int, engine: Engine
) -> None:
    config = plain(plain_port, starttls=True)
    with pytest.raises(EmailPermanentError, match=r"(?i)starttls"):
        await send(EmailActivities(config, engine), request(incident()))
    assert mailbox.received == []


def test_starttls_and_implicit_tls_at_once_are_refused() -> None:
    with pytest.raises(ValueError, match="not both"):
        SmtpConfig(host="mx", from_address=SENDER, starttls=True, use_tls=True)


# --- what the server refuses ---------------------------------------------------------------------


async def test_a_recipient_refused_with_550_is_a_permanent_error(
    mailbox: Mailbox, plain_port: int, engine: Engine
) -> None:
    req = request(incident(), recipients=["refused@example.com"])
    with pytest.raises(EmailPermanentError, match="550") as failed:
        await send(EmailActivities(plain(plain_port), engine), req)
    assert "refused@example.com" in str(failed.value)
    assert type(failed.value).__name__ in VENDOR_CALL.retry.non_retryable_error_types
    assert mailbox.received == []
    assert ledger(engine) == []


async def test_a_recipient_refused_for_now_is_retryable(
    mailbox: Mailbox, plain_port: int, engine: Engine
) -> None:
    req = request(incident(), recipients=["later@example.com"])
    with pytest.raises(ApplicationError, match="451") as failed:
        await send(EmailActivities(plain(plain_port), engine), req)
    assert failed.value.type == "EmailError"
    assert not failed.value.non_retryable
    assert ledger(engine) == []


async def test_some_recipients_refused_still_sends_to_the_others_once(
    mailbox: Mailbox, plain_port: int, engine: Engine
) -> None:
    activities = EmailActivities(plain(plain_port), engine)
    req = request(incident(), recipients=[ONCALL, "refused@example.com"])
    sent = await send(activities, req)
    [mail] = mailbox.received
    assert mail.rcpt_tos == [ONCALL]
    assert sent.recipients == [ONCALL]
    assert list(sent.refused) == ["refused@example.com"]
    assert sent.refused["refused@example.com"].startswith("550")
    assert (await send(activities, req, number=2)).already_sent
    assert len(mailbox.received) == 1


async def test_a_refused_connection_is_retryable(engine: Engine) -> None:
    port = free_port()  # nothing listens there
    with pytest.raises(ApplicationError, match="unreachable") as failed:
        await send(EmailActivities(plain(port), engine), request(incident()))
    assert failed.value.type == "EmailError"
    assert not failed.value.non_retryable
    assert ledger(engine) == []


async def test_a_server_that_never_answers_is_retryable_within_the_timeout(
    engine: Engine,
) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(ApplicationError, match=r"no answer within 0\.5s") as failed:
            await send(
                EmailActivities(plain(port, timeout_seconds=0.5), engine), request(incident())
            )
        assert asyncio.get_running_loop().time() - started < 5
    finally:
        server.close()
    assert failed.value.type == "EmailError"
    assert not failed.value.non_retryable


async def test_email_off_or_no_recipients_is_permanent(plain_port: int, engine: Engine) -> None:
    with pytest.raises(EmailPermanentError, match="PAGERLOOP_SMTP_HOST"):
        await send(EmailActivities(None, engine), request(incident()))
    activities = EmailActivities(plain(plain_port), engine)
    with pytest.raises(EmailPermanentError, match="no recipients"):
        await send(activities, request(incident(), recipients=[" "]))
    with pytest.raises(EmailPermanentError, match="not one email address"):
        await send(activities, request(incident(), recipients=["oncall"]))
    with pytest.raises(EmailPermanentError, match="control characters"):
        await send(activities, request(incident(), recipients=["a@example.com\r\nBcc: x@y.z"]))
    with pytest.raises(EmailPermanentError, match="unknown email event"):
        await send(activities, request(incident(), "snoozed"))
    assert ledger(engine) == []


# --- pure parts ----------------------------------------------------------------------------------


def test_message_ids_are_stable_and_distinct() -> None:
    a, b = "incident-cost_spike-global-20261208T120000Z", "incident-error_rate-global-1"
    assert email.message_id(a, "opened") == email.message_id(a, "opened")
    assert email.root_message_id(a) == email.message_id(a, "opened")
    ids = {
        email.message_id(a, "opened"),
        email.message_id(a, "escalated", "L2"),
        email.message_id(a, "escalated", "L3"),
        email.message_id(a, "resolved"),
        email.message_id(b, "opened"),
    }
    assert len(ids) == 5
    odd = email.message_id(a, "escalated", "level <two>\r\n")
    assert re.fullmatch(r"<[0-9a-f]{32}\.escalated-h[0-9a-f]{12}@pagerloop>", odd)


def test_temporal_ui_link() -> None:
    assert email.temporal_ui_link("", "default", "x") == ""
    assert (
        email.temporal_ui_link("http://localhost:8233/", "default", "incident-a:b c")
        == "http://localhost:8233/namespaces/default/workflows/incident-a%3Ab%20c"
    )


# --- settings ------------------------------------------------------------------------------------


def test_email_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    off = Settings(_env_file=None)  # type: ignore[call-arg]
    assert not off.email_enabled
    assert email.make_config(off) is None
    assert (off.smtp_port, off.smtp_starttls, off.smtp_tls, off.email_to) == (587, True, False, [])

    for name, value in {
        "SMTP_HOST": "smtp.example.com",
        "SMTP_USERNAME": USER,
        "SMTP_PASSWORD": PASSWORD,
        "EMAIL_FROM": SENDER,
        "EMAIL_TO": f"{ONCALL}, ops@example.com,",
    }.items():
        monkeypatch.setenv(f"PAGERLOOP_{name}", value)
    on = load_settings(_env_file=None)
    assert on.email_enabled
    assert on.email_to == [ONCALL, "ops@example.com"]
    assert PASSWORD not in repr(on)
    config = email.make_config(on)
    assert config == SmtpConfig(
        host="smtp.example.com",
        from_address=SENDER,
        port=587,
        username=USER,
        password=on.smtp_password,
        starttls=True,
        use_tls=False,
    )

    monkeypatch.setenv("PAGERLOOP_SMTP_TLS", "true")  # implicit TLS turns the default off
    implicit = load_settings(_env_file=None)
    assert (implicit.smtp_tls, implicit.smtp_starttls) == (True, False)
    monkeypatch.setenv("PAGERLOOP_SMTP_STARTTLS", "true")
    with pytest.raises(ConfigurationError, match=r"PAGERLOOP_SMTP_TLS .* both true"):
        load_settings(_env_file=None)

    monkeypatch.setenv("PAGERLOOP_SMTP_STARTTLS", "false")
    monkeypatch.setenv("PAGERLOOP_SMTP_PASSWORD", "")
    monkeypatch.setenv("PAGERLOOP_SMTP_USERNAME", "")
    unset = load_settings(_env_file=None)
    assert unset.smtp_password is None
    assert unset.smtp_username is None

    monkeypatch.setenv("PAGERLOOP_EMAIL_TO", "oncall")
    with pytest.raises(ConfigurationError, match="PAGERLOOP_EMAIL_TO"):
        load_settings(_env_file=None)
    monkeypatch.setenv("PAGERLOOP_EMAIL_TO", ONCALL)
    monkeypatch.setenv("PAGERLOOP_EMAIL_FROM", "")
    with pytest.raises(ConfigurationError, match="PAGERLOOP_EMAIL_FROM is required"):
        load_settings(_env_file=None)


def test_email_permanent_errors_are_not_retried_by_vendor_calls() -> None:
    assert EmailPermanentError.__name__ in VENDOR_CALL.retry.non_retryable_error_types
    assert email.ERRORS.retryable not in VENDOR_CALL.retry.non_retryable_error_types


# --- on a Temporal server ------------------------------------------------------------------------


@workflow.defn(sandboxed=False)
class EmailEvents:
    """Sends each request's email in turn under the vendor-call policy."""

    @workflow.run
    async def run(self, requests: list[EmailRequest]) -> list[EmailSent]:
        results = []
        for req in requests:
            sent = await workflow.execute_activity_method(
                EmailActivities.send_incident_email,
                req,
                start_to_close_timeout=VENDOR_CALL.start_to_close,
                schedule_to_close_timeout=timedelta(seconds=30),
                retry_policy=replace(
                    VENDOR_CALL.retry, initial_interval=timedelta(milliseconds=100)
                ),
            )
            results.append(sent)
        return results


async def test_an_incident_emails_through_temporal_once_per_event(
    dev_env: WorkflowEnvironment, mailbox: Mailbox, plain_port: int, engine: Engine
) -> None:
    activities = EmailActivities(plain(plain_port), engine)
    state = replace(incident(), timeline=[])
    escalated = replace(state, level=2, level_name="L2")
    resolved = replace(escalated, status=IncidentStatus.RESOLVED, resolved_by="bob")
    requests = [
        request(state),
        request(escalated, "escalated", reason="no acknowledgement"),
        request(resolved, "resolved"),
        request(resolved, "resolved"),  # asked twice: sent once
    ]
    queue = f"test-{uuid.uuid4().hex[:12]}"
    async with Worker(
        dev_env.client,
        task_queue=queue,
        workflows=[EmailEvents],
        activities=[activities.send_incident_email],
    ):
        results = await dev_env.client.execute_workflow(
            EmailEvents.run,
            requests,
            id=f"email-events-{uuid.uuid4().hex[:8]}",
            task_queue=queue,
            execution_timeout=timedelta(seconds=60),
        )
        refused = dev_env.client.execute_workflow(
            EmailEvents.run,
            [request(incident(), recipients=["refused@example.com"])],
            id=f"email-refused-{uuid.uuid4().hex[:8]}",
            task_queue=queue,
            execution_timeout=timedelta(seconds=60),
        )
        with pytest.raises(WorkflowFailureError) as failed:
            await refused
    assert [r.already_sent for r in results] == [False, False, False, True]
    assert len(mailbox.received) == 3
    assert [m.header("X-Pagerloop-Event") for m in mailbox.received] == [
        "opened",
        "escalated",
        "resolved",
    ]
    assert results[3].message_id == results[2].message_id
    # Refused for good: failed at once, not retried for a day.
    cause = failed.value.__cause__
    assert isinstance(cause, Exception)
    assert isinstance(cause.__cause__, ApplicationError)
    assert cause.__cause__.type == "EmailPermanentError"
    assert "550" in str(cause.__cause__)
