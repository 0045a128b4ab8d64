"""The webhook channel: Alertmanager's version "4" webhook body, signed, posted to receivers
written for Alertmanager (tests/fakes/webhook.py stands in for one), with vendor-style error
mapping, and once on a Temporal server where the receiver fails twice before it takes the alert.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from temporalio import workflow
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment
from temporalio.worker import Worker

from activities import webhook
from activities.policies import VENDOR_CALL
from activities.webhook import (
    WebhookActivities,
    WebhookPermanentError,
    WebhookRequest,
    alertmanager_payload,
    name_targets,
)
from config import ConfigurationError, Settings, load_settings
from domain.incident import IncidentState, IncidentStatus, Severity, TimelineEntry, Trigger
from tests.fakes.webhook import FakeWebhookReceiver, shape_errors

SECRET = "whsec-test-4f1c"
INCIDENT = "incident-error_rate-global-20261126T120000"
OPENED = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
RESOLVED = datetime(2026, 11, 26, 12, 42, 7, 250000, tzinfo=UTC)
TARGET = "receiver"
HOSTILE = (
    'quote " backslash \\ newline \n tab \t nul \x00 <script>alert(1)</script> '
    "&amp; ünïcødé 日本語 🔥 \u202e rtl {{ .Labels }} ${jndi:ldap://x} ' OR 1=1 --"
)


def state(**changes: Any) -> IncidentState:
    base = IncidentState(
        incident_id=INCIDENT,
        trigger=Trigger.ERROR_RATE,
        scope="global",
        severity=Severity.SEV2,
        status=IncidentStatus.DETECTED,
        opened_at=OPENED,
        summary="error rate 12.0% > 5.0% for 2m",
        metrics={"error_rate": 0.12, "p95_latency_ms": 8200.0},
        timeline=[TimelineEntry(OPENED, "detected", "error rate 12.0% > 5.0%")],
    )
    return replace(base, **changes)


LINKS = {
    "external_url": "https://pagerloop.example.com",
    "status_url": "https://pagerloop.example.com/status",
    "ui_url": "http://temporal.example.com:8233/namespaces/default/workflows/" + INCIDENT,
}


def request(
    event: webhook.WebhookEvent = "opened",
    level_name: str = "L1",
    target: str = TARGET,
    **changes: Any,
) -> WebhookRequest:
    """A request telling `level_name`; `changes` are the incident state's."""
    return WebhookRequest.of(state(**changes), event, level_name, target, **LINKS)


@pytest.fixture
def receiver() -> Iterator[FakeWebhookReceiver]:
    with FakeWebhookReceiver(secret=SECRET) as server:
        yield server


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with webhook.make_client() as http:
        yield http


def activities(
    client: httpx.AsyncClient, url: str, secret: str | None = SECRET
) -> WebhookActivities:
    return WebhookActivities(
        client, SecretStr(secret) if secret is not None else None, {TARGET: SecretStr(url)}
    )


async def post(acts: WebhookActivities, req: WebhookRequest) -> None:
    await ActivityEnvironment().run(acts.post_alert, req)


# --- the payload -------------------------------------------------------------------------


def test_a_firing_payload_is_alertmanagers_version_4_field_by_field() -> None:
    labels = {
        "alertname": "error_rate",
        "incident_id": INCIDENT,
        "incident_severity": "SEV2",
        "level": "L1",
        "scope": "global",
        "severity": "error",
        "trigger": "error_rate",
    }
    annotations = {
        "description": "error_rate: 12.0%\np95_latency_ms: 8200",
        "event": "opened",
        "incident_status": "detected",
        "status_url": LINKS["status_url"],
        "summary": "error rate 12.0% > 5.0% for 2m",
        "temporal_ui_url": LINKS["ui_url"],
    }
    payload = alertmanager_payload(request("opened"))
    assert payload == {
        "receiver": "pagerloop",
        "status": "firing",
        "alerts": [
            {
                "status": "firing",
                "labels": labels,
                "annotations": annotations,
                "startsAt": "2026-11-26T12:00:00Z",
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": LINKS["ui_url"],
                "fingerprint": INCIDENT,
            }
        ],
        "groupLabels": {"alertname": "error_rate", "incident_id": INCIDENT},
        "commonLabels": labels,
        "commonAnnotations": annotations,
        "externalURL": "https://pagerloop.example.com",
        "version": "4",
        "groupKey": '{}:{alertname="error_rate", incident_id="' + INCIDENT + '"}',
        "truncatedAlerts": 0,
    }
    # Alertmanager's key order (its Go struct), and labels sorted as Go writes maps.
    assert list(payload) == [
        "receiver",
        "status",
        "alerts",
        "groupLabels",
        "commonLabels",
        "commonAnnotations",
        "externalURL",
        "version",
        "groupKey",
        "truncatedAlerts",
    ]
    assert list(payload["alerts"][0]["labels"]) == sorted(labels)
    assert shape_errors(json.loads(webhook.encode(payload))) == []


def test_a_resolved_payload_ends_when_the_incident_resolved() -> None:
    firing = alertmanager_payload(request("opened"))
    resolved = alertmanager_payload(
        request(
            "resolved",
            status=IncidentStatus.RESOLVED,
            resolved_at=RESOLVED,
            resolved_by="U42",
            acknowledged_by="U7",
        )
    )
    assert resolved["status"] == "resolved"
    [alert] = resolved["alerts"]
    assert alert["status"] == "resolved"
    assert alert["startsAt"] == "2026-11-26T12:00:00Z"
    assert alert["endsAt"] == "2026-11-26T12:42:07.250000Z"
    assert datetime.fromisoformat(alert["endsAt"]) == RESOLVED
    assert alert["annotations"]["event"] == "resolved"
    assert alert["annotations"]["resolved_by"] == "U42"
    assert alert["annotations"]["acknowledged_by"] == "U7"
    assert alert["annotations"]["incident_status"] == "resolved"
    # What receivers pair a resolve with its firing by.
    assert alert["fingerprint"] == firing["alerts"][0]["fingerprint"] == INCIDENT
    assert resolved["groupKey"] == firing["groupKey"]
    assert resolved["groupLabels"] == firing["groupLabels"]
    assert shape_errors(json.loads(webhook.encode(resolved))) == []


def test_a_resolve_without_its_time_ends_when_the_delivery_was_scheduled() -> None:
    scheduled = datetime(2026, 11, 26, 13, 0, tzinfo=UTC)
    payload = alertmanager_payload(request("resolved"), resolved_at=scheduled)
    assert payload["alerts"][0]["endsAt"] == "2026-11-26T13:00:00Z"


@pytest.mark.parametrize(("event", "level"), [("escalated", "L2"), ("reminded", "L3")])
def test_an_open_incident_told_again_is_still_firing_with_the_same_keys(
    event: webhook.WebhookEvent, level: str
) -> None:
    opened = alertmanager_payload(request("opened"))
    again = alertmanager_payload(
        request(event, level, status=IncidentStatus.ACKNOWLEDGED, acknowledged_by="U7", level=2)
    )
    [alert] = again["alerts"]
    assert (again["status"], alert["status"], alert["endsAt"]) == (
        "firing",
        "firing",
        "0001-01-01T00:00:00Z",
    )
    assert alert["labels"]["level"] == level
    assert alert["annotations"]["event"] == event
    assert alert["annotations"]["acknowledged_by"] == "U7"
    assert (again["groupKey"], alert["fingerprint"], alert["startsAt"]) == (
        opened["groupKey"],
        INCIDENT,
        "2026-11-26T12:00:00Z",
    )


@pytest.mark.parametrize(
    ("severity", "label"),
    [
        (Severity.SEV1, "critical"),
        (Severity.SEV2, "error"),
        (Severity.SEV3, "warning"),
        (Severity.SEV4, "info"),
    ],
)
def test_severity_speaks_alertmanagers_convention_and_keeps_ours(
    severity: Severity, label: str
) -> None:
    labels = alertmanager_payload(request(severity=severity))["alerts"][0]["labels"]
    assert (labels["severity"], labels["incident_severity"]) == (label, str(severity))


def test_the_request_leaves_the_timeline_behind() -> None:
    req = request()
    assert req.state.timeline == []
    assert state().timeline  # the incident's own state keeps it


def test_runbook_links_and_infinite_metrics_read_as_text() -> None:
    req = replace(
        request(runbook="reroute_model", metrics={"cost_usd": float("inf")}),
        runbook_url="https://wiki.example.com/runbooks/error-rate",
    )
    annotations = alertmanager_payload(req)["alerts"][0]["annotations"]
    assert annotations["runbook"] == "reroute_model"
    assert annotations["runbook_url"] == "https://wiki.example.com/runbooks/error-rate"
    assert annotations["description"] == "cost_usd: ∞"
    webhook.encode(alertmanager_payload(req))  # strict JSON: no Infinity token


def test_without_links_the_urls_are_empty_and_no_link_annotation_is_sent() -> None:
    payload = alertmanager_payload(WebhookRequest.of(state(), "opened", "L1", TARGET))
    assert payload["externalURL"] == ""
    assert payload["alerts"][0]["generatorURL"] == ""
    assert not {"status_url", "temporal_ui_url", "runbook_url"} & set(
        payload["alerts"][0]["annotations"]
    )


def test_an_unknown_event_is_refused_for_good() -> None:
    with pytest.raises(WebhookPermanentError, match="unknown webhook event"):
        alertmanager_payload(request("acknowledged"))  # type: ignore[arg-type]


def test_long_text_is_bounded() -> None:
    payload = alertmanager_payload(request(summary="s" * 50_000, scope="feature:" + "f" * 5000))
    [alert] = payload["alerts"]
    assert len(alert["annotations"]["summary"]) == webhook.ANNOTATION_MAX
    assert alert["annotations"]["summary"].endswith("…")
    assert len(alert["labels"]["scope"]) == webhook.LABEL_MAX
    assert len(webhook.encode(payload)) < 64_000


async def test_hostile_strings_reach_the_receiver_intact(
    receiver: FakeWebhookReceiver, client: httpx.AsyncClient
) -> None:
    req = request(
        summary=HOSTILE,
        scope="feature:" + HOSTILE,
        acknowledged_by=HOSTILE,
        metrics={HOSTILE: 1.5},
    )
    await post(activities(client, receiver.alerts_url), replace(req, level=HOSTILE))
    [delivery] = receiver.deliveries()
    [alert] = delivery.payload["alerts"]
    assert alert["annotations"]["summary"] == HOSTILE
    assert alert["annotations"]["acknowledged_by"] == HOSTILE
    assert alert["annotations"]["description"] == f"{HOSTILE}: 1.5"
    assert alert["labels"]["scope"] == "feature:" + HOSTILE
    assert alert["labels"]["level"] == HOSTILE
    assert delivery.payload["commonLabels"]["scope"] == "feature:" + HOSTILE
    # The groupKey quotes its values: a quote in one cannot end it early.
    assert json.loads(delivery.payload["groupKey"].split("incident_id=", 1)[1][:-1]) == INCIDENT
    delivery.body.decode("utf-8")  # strict UTF-8


async def test_text_that_is_not_unicode_is_replaced_not_fatal(
    receiver: FakeWebhookReceiver, client: httpx.AsyncClient
) -> None:
    await post(activities(client, receiver.alerts_url), request(summary="lone \ud800 surrogate"))
    [delivery] = receiver.deliveries()
    assert delivery.payload["alerts"][0]["annotations"]["summary"] == "lone ? surrogate"


# --- the signature -----------------------------------------------------------------------


async def test_the_signature_verifies_with_the_secret_over_the_exact_body(
    receiver: FakeWebhookReceiver, client: httpx.AsyncClient
) -> None:
    await post(activities(client, receiver.alerts_url), request())
    [delivery] = receiver.deliveries()  # the receiver checked both forms (else 401)
    headers, body = delivery.headers, delivery.body
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert headers["x-pagerloop-signature"] == expected
    stamp = headers["x-pagerloop-timestamp"]
    stamped = hmac.new(SECRET.encode(), stamp.encode() + b"." + body, hashlib.sha256)
    assert headers["x-pagerloop-timestamp-signature"] == "sha256=" + stamped.hexdigest()
    tampered = body.replace(b'"firing"', b'"resolved"', 1)
    assert tampered != body
    wrong = "sha256=" + hmac.new(SECRET.encode(), tampered, hashlib.sha256).hexdigest()
    assert wrong != headers["x-pagerloop-signature"]
    assert headers["content-type"] == "application/json"
    assert headers["x-pagerloop-event"] == "opened"


def readme_recipe() -> Any:
    """The verification function exactly as the README gives it."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("### Webhook receivers", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict[str, Any] = {}
    exec(code, scope)  # noqa: S102 - our own README
    return scope["verified"]


async def test_the_readme_recipe_verifies_a_delivery_and_refuses_a_tampered_one(
    receiver: FakeWebhookReceiver, client: httpx.AsyncClient
) -> None:
    verified = readme_recipe()
    await post(activities(client, receiver.alerts_url), request())
    [delivery] = receiver.deliveries()
    headers = httpx.Headers(delivery.headers)  # as a receiver's framework: any case
    assert verified(SECRET.encode(), delivery.body, headers)
    assert not verified(SECRET.encode(), delivery.body + b" ", headers)
    assert not verified(b"another-secret", delivery.body, headers)
    stale = httpx.Headers({**delivery.headers, "x-pagerloop-timestamp": "1000000000"})
    assert not verified(SECRET.encode(), delivery.body, stale)


def test_the_timestamped_signature_covers_the_time() -> None:
    body = b'{"status":"firing"}'
    now = webhook.sign(SECRET.encode(), body, 1_800_000_000)
    later = webhook.sign(SECRET.encode(), body, 1_800_000_900)
    assert now[webhook.SIGNATURE_HEADER] == later[webhook.SIGNATURE_HEADER]
    assert now[webhook.TIMESTAMP_SIGNATURE_HEADER] != later[webhook.TIMESTAMP_SIGNATURE_HEADER]


async def test_an_old_timestamp_is_refused_by_a_receiver_checking_replays(
    receiver: FakeWebhookReceiver, client: httpx.AsyncClient
) -> None:
    acts = WebhookActivities(
        client, SecretStr(SECRET), {TARGET: receiver.alerts_url}, clock=lambda: 1_000_000_000.0
    )
    with pytest.raises(WebhookPermanentError, match="HTTP 401"):
        await post(acts, request())
    assert receiver.deliveries() == []


async def test_without_a_secret_nothing_is_signed(client: httpx.AsyncClient) -> None:
    with FakeWebhookReceiver(secret=None) as open_receiver:
        await post(activities(client, open_receiver.alerts_url, secret=None), request())
        [delivery] = open_receiver.deliveries()
    assert not {
        "x-pagerloop-signature",
        "x-pagerloop-timestamp",
        "x-pagerloop-timestamp-signature",
    } & set(delivery.headers)
    assert delivery.headers["x-pagerloop-delivery"]


async def test_a_receiver_with_another_secret_refuses_for_good(
    receiver: FakeWebhookReceiver, client: httpx.AsyncClient
) -> None:
    with pytest.raises(WebhookPermanentError, match="HTTP 401"):
        await post(activities(client, receiver.alerts_url, secret="not-the-secret"), request())
    assert len(receiver.requests) == 1
    assert receiver.deliveries() == []


# --- error mapping -------------------------------------------------------------------------


async def test_429_with_retry_after_sets_the_next_retry_delay(
    receiver: FakeWebhookReceiver, client: httpx.AsyncClient
) -> None:
    receiver.fail_next(429, retry_after=17)
    with pytest.raises(ApplicationError) as raised:
        await post(activities(client, receiver.alerts_url), request())
    assert raised.value.type == "WebhookThrottled"
    assert not raised.value.non_retryable
    assert raised.value.next_retry_delay == timedelta(seconds=17)


async def test_503_with_retry_after_sets_the_next_retry_delay(
    receiver: FakeWebhookReceiver, client: httpx.AsyncClient
) -> None:
    receiver.fail_next(503, retry_after=format_datetime(datetime.now(UTC) + timedelta(seconds=90)))
    with pytest.raises(ApplicationError) as raised:
        await post(activities(client, receiver.alerts_url), request())
    assert raised.value.type == "WebhookError"
    assert raised.value.next_retry_delay is not None
    assert timedelta(seconds=85) <= raised.value.next_retry_delay <= timedelta(seconds=90)


def test_retry_after_reads_seconds_and_dates_and_is_bounded() -> None:
    now = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    assert webhook.retry_after("5", now) == timedelta(seconds=5)
    assert webhook.retry_after(" 120 ", now) == timedelta(seconds=120)
    assert webhook.retry_after("99999999999", now) == webhook.MAX_RETRY_AFTER
    in_a_minute = format_datetime(now + timedelta(minutes=1), usegmt=True)
    assert webhook.retry_after(in_a_minute, now) == timedelta(minutes=1)
    assert webhook.retry_after(format_datetime(now - timedelta(hours=1)), now) == timedelta(0)
    for unreadable in (None, "", "soon", "-5", "1.5", "²"):
        assert webhook.retry_after(unreadable, now) is None


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 429])
async def test_server_errors_and_throttling_are_retryable(
    receiver: FakeWebhookReceiver, client: httpx.AsyncClient, status: int
) -> None:
    receiver.fail_next(status)
    with pytest.raises(ApplicationError) as raised:
        await post(activities(client, receiver.alerts_url), request())
    assert raised.value.type in {"WebhookError", "WebhookThrottled"}
    assert raised.value.type not in (VENDOR_CALL.retry.non_retryable_error_types or [])
    assert not raised.value.non_retryable
    assert raised.value.next_retry_delay is None  # no Retry-After: the policy's backoff
    assert f"HTTP {status}" in str(raised.value)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 405, 410, 413, 415, 422])
async def test_refusals_are_permanent(
    receiver: FakeWebhookReceiver, client: httpx.AsyncClient, status: int
) -> None:
    receiver.fail_next(status)
    with pytest.raises(WebhookPermanentError, match=f"HTTP {status}"):
        await post(activities(client, receiver.alerts_url), request())
    assert "WebhookPermanentError" in (VENDOR_CALL.retry.non_retryable_error_types or [])


async def test_the_receivers_reason_is_in_the_error(
    receiver: FakeWebhookReceiver, client: httpx.AsyncClient
) -> None:
    # An unsigned POST to the signing receiver: its own 401 body says why.
    with pytest.raises(WebhookPermanentError, match="bad signature"):
        await post(activities(client, receiver.alerts_url, secret=None), request())


async def test_a_redirect_is_not_followed_and_is_permanent(
    receiver: FakeWebhookReceiver,
) -> None:
    receiver.fail_next(307, headers={"Location": receiver.alerts_url})
    # Even a client told to follow redirects does not, for a signed POST.
    async with httpx.AsyncClient(follow_redirects=True) as following:
        with pytest.raises(WebhookPermanentError, match="redirect"):
            await post(activities(following, receiver.alerts_url), request())
    assert len(receiver.requests) == 1
    assert receiver.deliveries() == []


async def test_an_unreachable_receiver_is_retryable_and_its_url_is_not_told(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    with FakeWebhookReceiver() as gone:
        url = f"{gone.url}/hooks/T0KEN-SECRET-PATH"
    acts = WebhookActivities(client, SecretStr(SECRET), name_targets([url]))
    [target] = name_targets([url])
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ApplicationError) as raised:
        await post(acts, request(target=target))
    assert raised.value.type == "WebhookError"
    assert not raised.value.non_retryable
    assert target in str(raised.value)
    told = str(raised.value) + repr(raised.value.__cause__) + caplog.text
    assert "T0KEN-SECRET-PATH" not in told
    assert SECRET not in told


async def test_a_delivered_alert_logs_neither_url_nor_secret(
    receiver: FakeWebhookReceiver, client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await post(activities(client, receiver.alerts_url + "?token=T0KEN-IN-QUERY"), request())
    assert len(receiver.deliveries()) == 1
    assert "T0KEN-IN-QUERY" not in caplog.text
    assert SECRET not in caplog.text
    assert "webhook receiver took opened" in caplog.text
    assert f"POST http://127.0.0.1:{receiver.port}/…" in caplog.text  # httpx's own line


async def test_an_unknown_target_or_a_non_http_url_is_permanent(
    client: httpx.AsyncClient,
) -> None:
    acts = WebhookActivities(client, None, {"ftp": "ftp://files.example.com/alerts"})
    with pytest.raises(WebhookPermanentError, match="no webhook receiver named 'other'"):
        await post(acts, request(target="other"))
    with pytest.raises(WebhookPermanentError, match="not an http"):
        await post(acts, request(target="ftp"))


def test_targets_are_named_by_host_and_position_without_the_path() -> None:
    named = name_targets(
        [
            "https://oncall.example.com/integrations/v1/alertmanager/T0KEN/",
            SecretStr("http://user:pw@prom2teams:8089/v2/Connector"),
            "https://oncall.example.com/other",
        ],
        prefix="SEV1/L2:",
    )
    assert list(named) == [
        "SEV1/L2:oncall.example.com#1",
        "SEV1/L2:prom2teams:8089#2",
        "SEV1/L2:oncall.example.com#3",
    ]
    assert all(isinstance(url, SecretStr) for url in named.values())
    assert "T0KEN" not in repr(named)


# --- settings ------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("PAGERLOOP_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no stray .env


@pytest.mark.usefixtures("clean_env")
def test_webhook_settings_are_off_by_default_and_read_a_comma_separated_list(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    off = load_settings()
    assert (off.webhook_urls, off.webhook_secret, off.webhook_enabled) == ([], None, False)

    monkeypatch.setenv(
        "PAGERLOOP_WEBHOOK_URLS",
        " https://oncall.example.com/am/T0KEN , http://prom2teams:8089/v2/Connector,,",
    )
    monkeypatch.setenv("PAGERLOOP_WEBHOOK_SECRET", SECRET)
    on = load_settings()
    assert [u.get_secret_value() for u in on.webhook_urls] == [
        "https://oncall.example.com/am/T0KEN",
        "http://prom2teams:8089/v2/Connector",
    ]
    assert on.webhook_secret is not None
    assert on.webhook_secret.get_secret_value() == SECRET
    assert on.webhook_enabled
    assert "T0KEN" not in repr(on)
    assert SECRET not in repr(on)


@pytest.mark.usefixtures("clean_env")
def test_an_empty_webhook_secret_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGERLOOP_WEBHOOK_SECRET", "")
    assert load_settings().webhook_secret is None


@pytest.mark.usefixtures("clean_env")
@pytest.mark.parametrize(
    ("urls", "problem"),
    [
        ("https://ok.example.com/a,ftp://files.example.com/T0KEN", "URL 2 is not an http(s) URL"),
        ("hooks.example.com/T0KEN", "URL 1 is not an http(s) URL"),
        ("https:///T0KEN", "URL 1 is not an http(s) URL"),
        ("https://a.example.com/T0KEN,https://a.example.com/T0KEN", "URL 2 repeats URL 1"),
    ],
)
def test_a_bad_webhook_url_is_named_by_position_not_quoted(
    monkeypatch: pytest.MonkeyPatch, urls: str, problem: str
) -> None:
    monkeypatch.setenv("PAGERLOOP_WEBHOOK_URLS", urls)
    with pytest.raises(ConfigurationError) as error:
        load_settings()
    assert "PAGERLOOP_WEBHOOK_URLS" in str(error.value)
    assert problem in str(error.value)
    assert "T0KEN" not in str(error.value)


def test_settings_take_webhook_values_directly() -> None:
    settings = Settings(_env_file=None, webhook_urls="http://127.0.0.1:9/alerts")
    assert settings.webhook_enabled
    assert list(name_targets(settings.webhook_urls)) == ["127.0.0.1:9#1"]


# --- on a Temporal server --------------------------------------------------------------------


@workflow.defn(sandboxed=False)
class NotifyReceiver:
    """Tells one receiver, as the incident workflow does: VENDOR_CALL's timeouts and retries."""

    @workflow.run
    async def run(self, req: WebhookRequest) -> None:
        await workflow.execute_activity_method(
            WebhookActivities.post_alert, req, **VENDOR_CALL.options()
        )


async def test_a_receiver_failing_twice_gets_the_alert_exactly_once(
    time_skipping_env: WorkflowEnvironment,
    receiver: FakeWebhookReceiver,
    client: httpx.AsyncClient,
) -> None:
    receiver.fail_next(503, retry_after=120)  # honoured: the next try comes 2 minutes on
    receiver.fail_next(503)  # the policy's own backoff
    acts = WebhookActivities(client, SecretStr(SECRET), name_targets([receiver.alerts_url]))
    [target] = name_targets([receiver.alerts_url])
    queue = f"test-{uuid.uuid4().hex[:12]}"
    async with Worker(
        time_skipping_env.client,
        task_queue=queue,
        workflows=[NotifyReceiver],
        activities=[acts.post_alert],
    ):
        handle = await time_skipping_env.client.start_workflow(
            NotifyReceiver.run,
            request("opened", target=target),
            id=f"webhook-{uuid.uuid4().hex[:8]}",
            task_queue=queue,
        )
        await handle.result()
        history = await handle.fetch_history()

    [delivery] = receiver.deliveries()
    assert delivery.payload["status"] == "firing"
    assert delivery.payload["alerts"][0]["fingerprint"] == INCIDENT
    tries = receiver.received("/alerts")
    assert len(tries) == 3
    # Every attempt of the one delivery: the same body and the same delivery id.
    assert {t.body for t in tries} == {delivery.body}
    assert len({t.headers["x-pagerloop-delivery"] for t in tries}) == 1
    [started] = [
        e.activity_task_started_event_attributes.attempt
        for e in history.events
        if e.HasField("activity_task_started_event_attributes")
    ]
    assert started == 3
    times = [e.event_time.ToDatetime() for e in history.events]
    assert times[-1] - times[0] >= timedelta(seconds=120)  # the Retry-After, skipped here
