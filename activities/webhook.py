"""Webhook channel: the incident as an Alertmanager webhook notification (version "4").

Whatever was written to receive Alertmanager's `webhook_config` POSTs (bridges to Microsoft
Teams, Discord, Telegram, Opsgenie, Grafana OnCall, ...) takes pagerloop's incidents unchanged.
Each POST carries one alert, the incident:

    {"receiver": "pagerloop", "status": "firing" | "resolved",
     "alerts": [{"status", "labels", "annotations", "startsAt", "endsAt",
                 "generatorURL", "fingerprint"}],
     "groupLabels", "commonLabels", "commonAnnotations", "externalURL",
     "version": "4", "groupKey", "truncatedAlerts": 0}

- `fingerprint` is the incident id; `groupKey` is `{}:{alertname="<trigger>",
  incident_id="<id>"}`, the same for every notification of one incident.
- labels: `alertname` (the trigger), `trigger`, `scope`, `severity` (Alertmanager's usual
  `critical` / `error` / `warning` / `info`, so receivers colour and route as they already do),
  `incident_severity` (`SEV1`..`SEV4`), `incident_id`, `level` (the escalation level told).
- annotations, when there is something to say: `summary`, `description` (the metrics, one per
  line), `event`, `incident_status`, `acknowledged_by`, `resolved_by`, `runbook`,
  `runbook_url`, `status_url`, `temporal_ui_url`.
- `status` is "firing" while the incident is open (opened, escalated, reminded) and "resolved"
  at resolve; `startsAt` is when it opened; `endsAt` is "0001-01-01T00:00:00Z" while firing (as
  Alertmanager sends it) and the resolve time once resolved. Times are RFC 3339, UTC.
- `generatorURL` links the incident in the Temporal UI (the status page without one);
  `externalURL` is pagerloop's own public URL.
- Bounds: label values at most LABEL_MAX characters, annotations ANNOTATION_MAX; text that is
  not valid Unicode (lone surrogates) is replaced, so every body is valid UTF-8 JSON.

Delivery. One activity per receiver URL, so one failing receiver never holds back or re-sends
to another. The URLs themselves stay in the worker (Discord, Slack, Grafana OnCall and most
hosted receivers put their token in the URL): the workflow names a *target* (`name_targets`),
and neither the URL's path nor the secret is logged or put in an error. Redirects are not
followed (the signed body would go to a host nobody configured): fix the URL instead.

- 2xx: delivered.
- 429 and 503 with `Retry-After` (seconds or an HTTP date, capped at MAX_RETRY_AFTER): retried
  after that long (`ApplicationError.next_retry_delay`); without it, with the policy's backoff.
- other 5xx, 408, 425, timeouts and network errors: retryable `WebhookError`.
- any other 4xx (400, 401, 403, 404, 405, 410, 413, 415, 422, ...), a 3xx, an unknown target or
  a URL that is not http(s): `WebhookPermanentError` (non-retryable in VENDOR_CALL).

This is Alertmanager's own at-least-once contract: a POST whose answer is lost (a timeout, a
worker crash) is sent again, so a receiver may see the same notification twice. Receivers
already deduplicate by `fingerprint` + `status`; every attempt of one delivery also carries the
same `X-Pagerloop-Delivery` id and, given the same request, the same body.

Signature. With `PAGERLOOP_WEBHOOK_SECRET` set, every POST carries

    X-Pagerloop-Signature: sha256=<hex HMAC-SHA256(secret, body)>
    X-Pagerloop-Timestamp: <unix seconds when sent>
    X-Pagerloop-Timestamp-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>." + body)>

`body` is the raw request body, byte for byte, before any JSON parsing. To verify (Python):

    expected = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
    ok = hmac.compare_digest(expected, headers["X-Pagerloop-Signature"])

To also refuse replays, check the timestamped signature and the age instead:

    ts = headers["X-Pagerloop-Timestamp"]
    signed = ts.encode() + b"." + body
    expected = "sha256=" + hmac.new(secret, signed, hashlib.sha256).hexdigest()
    ok = hmac.compare_digest(expected, headers["X-Pagerloop-Timestamp-Signature"]) and (
        abs(time.time() - int(ts)) <= 300
    )

The first form is the one generic receivers (GitHub-style `sha256=` HMAC) already check; a
replayed body passes it, which the fingerprint + status dedupe makes a repeat, not news. Without
a secret none of the three headers is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any, Literal, get_args
from urllib.parse import quote, urlsplit

import httpx
from pydantic import SecretStr
from temporalio import activity
from temporalio.exceptions import ActivityError, ApplicationError

from activities.channel import Incident, reached_targets, told_before
from activities.finite import human_number
from activities.vendor_http import attempt_key
from domain.incident import IncidentState, LaneAction, NotificationPlan, Severity
from domain.incident_machine import ChannelFailed, Delivered, Effect, Merged, Notify, Resolved
from domain.lanes import Lane

_log = logging.getLogger(__name__)

VERSION = "4"
RECEIVER = "pagerloop"
# What Alertmanager sends as a firing alert's endsAt (Go's zero time).
ZERO_TIME = "0001-01-01T00:00:00Z"
LABEL_MAX = 1024
ANNOTATION_MAX = 4096
# The policy's own backoff cap (VENDOR_CALL): a receiver asking for longer is asked again then.
MAX_RETRY_AFTER = timedelta(minutes=5)
# Of a refusal's body, this much goes into the error (the timeline shows it).
ERROR_BODY_MAX = 300
USER_AGENT = "pagerloop-webhook/1"

SIGNATURE_HEADER = "X-Pagerloop-Signature"
TIMESTAMP_HEADER = "X-Pagerloop-Timestamp"
TIMESTAMP_SIGNATURE_HEADER = "X-Pagerloop-Timestamp-Signature"
DELIVERY_HEADER = "X-Pagerloop-Delivery"
EVENT_HEADER = "X-Pagerloop-Event"

WebhookEvent = Literal["opened", "escalated", "reminded", "reopened", "resolved"]
EVENTS: frozenset[str] = frozenset(get_args(WebhookEvent))

# Alertmanager receivers expect the Prometheus convention in `severity`.
ALERT_SEVERITY = {
    Severity.SEV1: "critical",
    Severity.SEV2: "error",
    Severity.SEV3: "warning",
    Severity.SEV4: "info",
}

# Answers a retry may change: the receiver's timeout, "too early", throttling.
_RETRYABLE_4XX = frozenset({408, 425, 429})


class WebhookPermanentError(Exception):
    """The receiver refused the notification (4xx, a redirect), or it cannot be sent at all
    (unknown target, not an http(s) URL): retrying cannot help."""


@dataclass
class WebhookRequest:
    """One notification to one receiver. `state` travels without its timeline (`of` drops it):
    the payload does not use it, and it would grow every activity input in the history."""

    state: IncidentState
    event: WebhookEvent
    level: str
    # The name of a receiver configured in the worker (`name_targets`), never the URL.
    target: str
    # pagerloop's public URL (Alertmanager's `externalURL`).
    external_url: str = ""
    status_url: str = ""
    # The incident in the Temporal UI (the alert's `generatorURL`).
    ui_url: str = ""
    runbook_url: str = ""

    @classmethod
    def of(
        cls,
        state: IncidentState,
        event: WebhookEvent,
        level: str,
        target: str,
        **links: str,
    ) -> WebhookRequest:
        return cls(replace(state, timeline=[]), event, level, target, **links)


def name_targets(urls: Sequence[SecretStr | str], prefix: str = "") -> dict[str, SecretStr]:
    """Names for receiver URLs, as the workflow carries them: `<prefix><host>#<position>`
    (e.g. `alerts.example.com#1`), readable on the timeline without the URL's path or query."""
    named: dict[str, SecretStr] = {}
    for position, url in enumerate(urls, start=1):
        secret = url if isinstance(url, SecretStr) else SecretStr(url)
        named[f"{prefix}{_host(secret.get_secret_value())}#{position}"] = secret
    return named


class _RedactUrls(logging.Filter):
    """httpx logs every request's full URL at INFO; for a receiver's URL (its token in the
    path or query) it logs `scheme://host/…` instead. Only the URLs registered here change."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and self.urls:
            record.args = tuple(
                _redacted(str(arg)) if str(arg) in self.urls else arg for arg in record.args
            )
        return True


_REDACT = _RedactUrls()


def _redacted(url: str) -> str:
    try:
        scheme = urlsplit(url).scheme
    except ValueError:
        scheme = "?"
    return f"{scheme}://{_host(url)}/…"


def _host(url: str) -> str:
    try:
        return urlsplit(url).netloc.rpartition("@")[2] or "?"
    except ValueError:
        return "?"


def _text(value: object, limit: int) -> str:
    """Valid Unicode (lone surrogates replaced), at most `limit` characters."""
    text = str(value).encode("utf-8", "replace").decode("utf-8")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def rfc3339(moment: datetime) -> str:
    """UTC with a `Z`, as Go writes time.Time; a naive time is taken as UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _metrics(metrics: Mapping[str, object]) -> str:
    lines = []
    for name, value in metrics.items():
        percent = name.endswith(("_rate", "_ratio"))
        lines.append(f"{name}: {human_number(value, percent=percent)}")
    return "\n".join(lines)


def group_key(labels: Mapping[str, str]) -> str:
    """Alertmanager's form: the route (the root, `{}`) and the group labels, sorted, quoted."""
    pairs = ", ".join(
        f"{name}={json.dumps(labels[name], ensure_ascii=False)}" for name in sorted(labels)
    )
    return "{}:{" + pairs + "}"


def alertmanager_payload(
    request: WebhookRequest, resolved_at: datetime | None = None
) -> dict[str, Any]:
    """The Alertmanager webhook body for `request`; pure. `resolved_at` stands in for the
    state's when a resolve arrives without one."""
    if request.event not in EVENTS:
        raise WebhookPermanentError(f"unknown webhook event {request.event!r}")
    state = request.state
    resolved = request.event == "resolved"
    status = "resolved" if resolved else "firing"
    severity = Severity(state.severity)
    labels = {
        "alertname": str(state.trigger),
        "trigger": str(state.trigger),
        "scope": state.scope,
        "severity": ALERT_SEVERITY[severity],
        "incident_severity": str(severity),
        "incident_id": state.incident_id,
        "level": request.level,
    }
    labels = {name: _text(value, LABEL_MAX) for name, value in sorted(labels.items())}
    summary = state.summary or f"[{severity}] {state.trigger} on {state.scope}"
    annotations = {
        "summary": summary,
        "description": _metrics(state.metrics),
        "event": request.event,
        "incident_status": str(state.status),
        "acknowledged_by": state.acknowledged_by or "",
        "resolved_by": state.resolved_by or "",
        "runbook": state.runbook or "",
        "runbook_url": request.runbook_url,
        "status_url": request.status_url,
        "temporal_ui_url": request.ui_url,
    }
    annotations = {
        name: _text(value, ANNOTATION_MAX) for name, value in sorted(annotations.items()) if value
    }
    ends = state.resolved_at or resolved_at
    alert = {
        "status": status,
        "labels": labels,
        "annotations": annotations,
        "startsAt": rfc3339(state.opened_at),
        "endsAt": rfc3339(ends) if resolved and ends is not None else ZERO_TIME,
        "generatorURL": request.ui_url or request.status_url,
        "fingerprint": state.incident_id,
    }
    group_labels = {name: labels[name] for name in ("alertname", "incident_id")}
    # In Alertmanager's order (its Go struct's); one alert, so every label and annotation is
    # common to the group.
    return {
        "receiver": RECEIVER,
        "status": status,
        "alerts": [alert],
        "groupLabels": group_labels,
        "commonLabels": dict(labels),
        "commonAnnotations": dict(annotations),
        "externalURL": request.external_url,
        "version": VERSION,
        "groupKey": group_key(group_labels),
        "truncatedAlerts": 0,
    }


def encode(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def _sha256(secret: bytes, data: bytes) -> str:
    return "sha256=" + hmac.new(secret, data, hashlib.sha256).hexdigest()


def sign(secret: bytes, body: bytes, timestamp: int) -> dict[str, str]:
    """The signature headers for `body` sent at `timestamp` (unix seconds)."""
    return {
        SIGNATURE_HEADER: _sha256(secret, body),
        TIMESTAMP_HEADER: str(timestamp),
        TIMESTAMP_SIGNATURE_HEADER: _sha256(secret, str(timestamp).encode() + b"." + body),
    }


def retry_after(value: str | None, now: datetime) -> timedelta | None:
    """`Retry-After` as seconds or an HTTP date, between 0 and MAX_RETRY_AFTER; None when
    absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        delay = timedelta(seconds=int(value[:8]))
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        delay = when - now
    return max(timedelta(0), min(delay, MAX_RETRY_AFTER))


def make_client(timeout: float = 10.0) -> httpx.AsyncClient:
    """The client the worker injects: shorter than VENDOR_CALL's start-to-close, so a hung
    receiver fails its attempt instead of outliving it; no redirects."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout), follow_redirects=False, headers={"User-Agent": USER_AGENT}
    )


def _failure(status: int, headers: httpx.Headers, reason: str, where: str) -> Exception:
    delay = retry_after(headers.get("Retry-After"), datetime.now(UTC))
    what = f"webhook {where} answered HTTP {status}"
    if reason:
        what += f": {reason}"
    if status == 429:
        return ApplicationError(
            f"{what}; retrying" + (f" after {delay.total_seconds():.0f}s" if delay else ""),
            type="WebhookThrottled",
            next_retry_delay=delay,
        )
    if status >= 500:
        return ApplicationError(
            what, type="WebhookError", next_retry_delay=delay if status == 503 else None
        )
    if status in _RETRYABLE_4XX:
        return ApplicationError(what, type="WebhookError")
    return WebhookPermanentError(what)


class WebhookActivities:
    """Registered even when no receiver is configured, so a step naming one fails cleanly
    onto the timeline.

    `targets` maps the names the workflow carries (`name_targets`) to receiver URLs; `clock`
    gives the signature's timestamp (unix seconds)."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        secret: SecretStr | None,
        targets: Mapping[str, SecretStr | str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._secret = secret
        self._targets = {
            name: url if isinstance(url, SecretStr) else SecretStr(url)
            for name, url in (targets or {}).items()
        }
        self._clock = clock
        if _REDACT not in logging.getLogger("httpx").filters:
            logging.getLogger("httpx").addFilter(_REDACT)
        for url in self._targets.values():
            # As httpx prints it (normalised: a bare host gains its `/`).
            with contextlib.suppress(httpx.InvalidURL):
                _REDACT.urls.add(str(httpx.URL(url.get_secret_value())))

    def _url(self, target: str) -> str:
        url = self._targets.get(target)
        if url is None:
            raise WebhookPermanentError(f"no webhook receiver named {target!r} in this worker")
        value = url.get_secret_value()
        if urlsplit(value).scheme not in ("http", "https"):
            raise WebhookPermanentError(f"webhook {target} is not an http(s) URL")
        return value

    def headers(self, body: bytes, event: str, delivery: str) -> dict[str, str]:
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            EVENT_HEADER: event,
            DELIVERY_HEADER: delivery,
        }
        if self._secret is not None and self._secret.get_secret_value():
            secret = self._secret.get_secret_value().encode()
            headers.update(sign(secret, body, int(self._clock())))
        return headers

    @activity.defn(name="webhook.post_alert")
    async def post_alert(self, request: WebhookRequest) -> None:
        info = activity.info()
        url = self._url(request.target)
        # A resolve without its time (it should not happen) still ends at a stable moment:
        # when this delivery was first scheduled, the same for every retry.
        body = encode(alertmanager_payload(request, resolved_at=info.scheduled_time))
        headers = self.headers(body, request.event, attempt_key(info))
        where = request.target
        try:
            async with self._client.stream(
                "POST", url, content=body, headers=headers, follow_redirects=False
            ) as response:
                if response.is_success:
                    _log.info(
                        "webhook %s took %s of %s (HTTP %s)",
                        where,
                        request.event,
                        request.state.incident_id,
                        response.status_code,
                    )
                    return
                reason = await _reason(response)
        except (httpx.UnsupportedProtocol, httpx.InvalidURL):
            raise WebhookPermanentError(f"webhook {where} is not a usable URL") from None
        except httpx.TimeoutException as exc:
            raise ApplicationError(
                f"webhook {where} did not answer in time ({type(exc).__name__})",
                type="WebhookError",
            ) from None
        except httpx.TransportError as exc:
            # The exception's text may quote the URL: name the kind only.
            raise ApplicationError(
                f"webhook {where} unreachable ({type(exc).__name__})", type="WebhookError"
            ) from None
        if response.is_redirect:
            raise WebhookPermanentError(
                f"webhook {where} answered HTTP {response.status_code} (a redirect, not "
                "followed: configure the URL it points to)"
            )
        raise _failure(response.status_code, response.headers, reason, where)


async def _reason(response: httpx.Response) -> str:
    """The start of a refusal's body, on one line: what the receiver said was wrong."""
    chunks = []
    size = 0
    try:
        async for chunk in response.aiter_bytes():
            chunks.append(chunk)
            size += len(chunk)
            if size >= ERROR_BODY_MAX:
                break
    except httpx.HTTPError:
        return ""
    text = b"".join(chunks)[:ERROR_BODY_MAX].decode("utf-8", "replace")
    return " ".join(text.split())


# --- the channel: what the incident's effects mean for webhook receivers ----------------------


class WebhookChannel:
    """A firing alert to a level's receivers when the incident opens, escalates or reminds, and
    the resolved alert to every receiver that was sent one. Each receiver is its own activity:
    one that fails does not hold back the others' delivery (only this lane's next action)."""

    name = "webhook"

    def enabled(self, plan: NotificationPlan) -> bool:
        """Receivers for every level (PAGERLOOP_WEBHOOK_URLS) or a level's own."""
        return bool(plan.webhook_receivers) or any(
            target.to
            for policy in plan.policies.values()
            for level in policy.levels
            if (target := level.target(self.name)) is not None
        )

    def react(self, effect: Effect, incident: Incident, lane: Lane) -> None:
        match effect:
            case Notify(level, _, kind) if (target := level.target(self.name)) is not None:
                receivers = list(target.to) or incident.plan.webhook_receivers
                lane.push(kind, level=level.name, to=receivers)
            case Resolved() | Merged():
                lane.push("resolved")

    async def perform(self, action: LaneAction, incident: Incident) -> None:
        plan, state, event = incident.plan, incident.state, action.kind
        if event == "resolved":
            known = [*plan.webhook_receivers]
            known += [r for t in reached_targets(incident, self.name) for r in t.to]
            receivers = [r for r in dict.fromkeys(known) if told_before(incident, self.name, r)]
        else:
            receivers = action.to
        if event not in EVENTS:
            return
        links = {
            "status_url": plan.status_url,
            "ui_url": plan.temporal_ui_url + quote(state.incident_id, safe=""),
            "runbook_url": state.runbook_url or "",
        }
        level = action.level or state.level_name
        posts = [
            incident.call(
                WebhookActivities.post_alert,
                WebhookRequest.of(state, event, level, receiver, **links),  # type: ignore[arg-type]
                summary=f"Webhook: {event} alert to {receiver}",
            )
            for receiver in receivers
        ]
        results = await asyncio.gather(*posts, return_exceptions=True)
        for receiver, result in zip(receivers, results, strict=True):
            if isinstance(result, ActivityError):
                incident.apply(ChannelFailed(self.name, event, f"{receiver}: {result.cause}"))
            elif isinstance(result, BaseException):
                raise result
            else:
                incident.apply(Delivered(self.name, f"{event} alert to {receiver}"))


WEBHOOK = WebhookChannel()
