"""GET /status: the overall state and the open incidents, as JSON or as a page.

The page (Accept: text/html) shows, per open incident, its trigger's signal over the last hour
against the rule's thresholds (an inline SVG drawn on the server: no script, nothing fetched
from elsewhere), the runbook that answers it with its link (the incident's: the firing rule's
page, else the runbook's) and the controls in force on its scope. Those come from the stores
within what is left of the page's deadline: an incident whose chart fails or is late says so,
and the page carries on.

The page may be public, so what one load costs is bounded: each chart (and the controls) is
read once per incident and minute and kept `DETAILS_TTL_SECONDS` (`DetailsCache`, one per
app), a burst of loads shares the reads in flight, and the reads run on `DETAILS_READERS`
threads of their own. A read the page gave up on goes on and serves the next load.

GET /runbooks/<name>: the service's own page of a built-in runbook (what it does, when, who is
called), which incidents link when neither their rule nor their runbook names a page.
"""

from __future__ import annotations

import asyncio
import html
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel
from temporalio.service import RPCError

from activities.incidents import open_incidents_query
from api.auth import readable_by
from api.deps import Services, services
from api.errors import RETRY_AFTER_SECONDS
from detectors.config import load_rules
from detectors.series import IncidentCharts
from domain import search_attributes as sa
from domain.incident import IncidentState
from domain.scopes import GLOBAL, kind_of, scope_name
from runbooks import RUNBOOKS, runbook_for
from runbooks.base import RunbookSpec
from stores import controls as control_store
from stores.controls import Control

router = APIRouter()
STATUS_DEADLINE_SECONDS = 3
# The page charts this many open incidents at most (the busiest day must not make it slow).
CHARTED_INCIDENTS_MAX = 20
# Charts and controls get what the listing left of the deadline, but at least this much.
DETAILS_MIN_SECONDS = 0.5
# A chart (or the controls) read in a minute serves the loads of that minute for this long.
DETAILS_TTL_SECONDS = 15.0
# The page's store reads run on this many threads, whatever the number of loads.
DETAILS_READERS = 2
_readers = ThreadPoolExecutor(max_workers=DETAILS_READERS, thread_name_prefix="status-details")
# An incident's runbook link is its workflow's to say (the rule that fired may name a page):
# asked with this deadline, kept like a chart, and waited for at most LINK_WAIT_SECONDS past
# the page's other reads (the runbook's own link stands in until it answers).
LINK_QUERY_SECONDS = 5.0
LINK_WAIT_SECONDS = 0.5
RUNBOOK_NAME_MAX = 100

AnyFuture = Future[Any] | asyncio.Future[Any]

_log = logging.getLogger(__name__)


class OpenIncident(BaseModel):
    id: str
    status: str | None
    severity: str | None
    trigger: str | None
    scope: str | None
    level: int | None
    opened_at: datetime | None


class StatusPage(BaseModel):
    overall: str
    open_incidents: list[OpenIncident]


def overall_state(incidents: list[OpenIncident]) -> str:
    active = [i for i in incidents if i.status != "resolved"]
    if any(i.severity == "SEV1" or i.trigger == "api_outage" for i in active):
        return "outage"
    return "degraded" if active else "operational"


async def open_incidents(svc: Services) -> list[OpenIncident]:
    found = []
    query = open_incidents_query(svc.settings.task_queue)
    async for execution in svc.temporal.list_workflows(query, limit=200):
        attrs = execution.typed_search_attributes
        found.append(
            OpenIncident(
                id=execution.id,
                status=attrs.get(sa.INCIDENT_STATUS),
                severity=attrs.get(sa.INCIDENT_SEVERITY),
                trigger=attrs.get(sa.INCIDENT_TRIGGER),
                scope=attrs.get(sa.INCIDENT_SCOPE),
                level=attrs.get(sa.INCIDENT_LEVEL),
                opened_at=execution.start_time,
            )
        )
    return found


@router.get("/status", response_model=StatusPage, dependencies=[readable_by("status")])
async def status_page(request: Request, svc: Annotated[Services, Depends(services)]) -> Response:
    code = 200
    started = time.monotonic()
    try:
        async with asyncio.timeout(STATUS_DEADLINE_SECONDS):
            incidents = await open_incidents(svc)
        page = StatusPage(overall=overall_state(incidents), open_incidents=incidents)
    except (TimeoutError, RPCError, RuntimeError):
        # Temporal is away (a lazy client fails to connect with RuntimeError): say so.
        page, code = StatusPage(overall="unknown", open_incidents=[]), 503
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if code == 503 else {}
    if "text/html" in request.headers.get("accept", ""):
        left = max(STATUS_DEADLINE_SECONDS - (time.monotonic() - started), DETAILS_MIN_SECONDS)
        cache = details_cache_of(request.app)
        details = await incident_details(svc, page.open_incidents, left, cache)
        return HTMLResponse(_render(page, details), status_code=code, headers=headers)
    return JSONResponse(page.model_dump(mode="json"), status_code=code, headers=headers)


@dataclass
class Details:
    """What the page shows of one incident besides its row."""

    chart: str | None = None  # the SVG
    no_chart: str = ""  # why there is none
    runbook: RunbookSpec | None = None
    runbook_url: str | None = None
    controls: list[Control] = field(default_factory=list)
    controls_unknown: bool = False


def applies_to(control: Control, scope: str, incident_id: str) -> bool:
    """A control set for the incident, or one that changes calls in the incident's scope (one
    for any model changes some of every model's calls)."""
    if control.incident_id == incident_id or scope == GLOBAL:
        return True
    kind = kind_of(scope)
    if kind == "model":
        return control.model is None or scope_name("model", control.model) == scope
    if kind == "feature":
        return control.feature is None or scope_name("feature", control.feature) == scope
    return False


def status_now() -> datetime:
    return datetime.now(UTC)


def _minute(at: datetime) -> datetime:
    return at.replace(second=0, microsecond=0)


@dataclass
class _Read:
    key: Hashable  # what was read: the minute, with the trigger and scope of a chart
    at: float  # monotonic, when it was asked for
    future: AnyFuture


class DetailsCache:
    """The page's store reads by name (`chart <incident id>`, `controls`): one per name in
    flight, shared by every load that asks meanwhile; once done, kept for the same key (the
    minute) for `ttl` seconds, a failure too (a store that is down is not asked again at once).
    Only the event loop uses it."""

    def __init__(
        self, ttl: float = DETAILS_TTL_SECONDS, executor: ThreadPoolExecutor = _readers
    ) -> None:
        self._ttl = ttl
        self._executor = executor
        self._reads: dict[str, _Read] = {}
        self.reads = 0  # reads started, for tests and curiosity

    def get(self, name: str, key: Hashable, read: Callable[[], Any]) -> AnyFuture:
        found = self._found(name, key)
        if found is not None:
            return found
        self.reads += 1
        return self._started(name, key, self._executor.submit(read))

    def ask(self, name: str, key: Hashable, read: Callable[[], Awaitable[Any]]) -> AnyFuture:
        """As `get`, for a read that awaits (a workflow query): a task on the event loop, no
        thread."""
        found = self._found(name, key)
        if found is not None:
            return found
        return self._started(name, key, asyncio.ensure_future(read()))

    def _found(self, name: str, key: Hashable) -> AnyFuture | None:
        found = self._reads.get(name)
        if found is not None and (
            not found.future.done()  # in flight (maybe for an earlier minute): wait for it
            or (found.key == key and time.monotonic() - found.at < self._ttl)
        ):
            return found.future
        return None

    def _started(self, name: str, key: Hashable, future: AnyFuture) -> AnyFuture:
        future.add_done_callback(partial(_log_failure, name))  # once per read, not per load
        self._reads[name] = _Read(key, time.monotonic(), future)
        return future

    def keep(self, names: Iterable[str]) -> None:
        """Forget the finished reads of other names (incidents no longer open)."""
        kept = set(names)
        for name in [n for n, r in self._reads.items() if n not in kept and r.future.done()]:
            del self._reads[name]


def _log_failure(name: str, future: AnyFuture) -> None:
    if not future.cancelled() and (error := future.exception()) is not None:
        _log.warning("status page: %s failed: %s: %s", name, type(error).__name__, error)


def details_cache_of(app: FastAPI) -> DetailsCache:
    """The app's cache, made on first use (apps made in tests never share one)."""
    cache: DetailsCache | None = getattr(app.state, "status_details", None)
    if cache is None:
        cache = app.state.status_details = DetailsCache()
    return cache


def _outcome(future: AnyFuture) -> tuple[bool, Any, BaseException | None]:
    """(done, result, error) of a read, without raising."""
    if not future.done() or future.cancelled():
        return False, None, None
    error = future.exception()
    return True, (None if error is not None else future.result()), error


async def _wait(futures: list[AnyFuture], seconds: float) -> None:
    """Until every read is done or `seconds` have passed; the reads are never cancelled."""
    waiters = [asyncio.wrap_future(f) for f in futures if not f.done()]
    if not waiters:
        return
    for waiter in waiters:  # a read finishing after the page: its error is the cache's
        waiter.add_done_callback(lambda w: w.cancelled() or w.exception())
    await asyncio.wait(waiters, timeout=seconds)


def own_link(spec: RunbookSpec | None) -> str | None:
    """The runbook's link before its incident says otherwise: its own page, else the service's
    (relative to /status, so it holds behind a proxy's prefix)."""
    if spec is None:
        return None
    return spec.runbook_url or f"runbooks/{quote(spec.name, safe='')}"


async def asked_link(svc: Services, incident_id: str) -> str | None:
    """The incident's runbook link as its workflow holds it (runbooks.base.runbook_link)."""
    state: IncidentState = await svc.temporal.get_workflow_handle(incident_id).query(
        "state", result_type=IncidentState, rpc_timeout=timedelta(seconds=LINK_QUERY_SECONDS)
    )
    return state.runbook_url


async def incident_details(
    svc: Services, incidents: list[OpenIncident], seconds: float, cache: DetailsCache
) -> dict[str, Details]:
    """Each incident's chart, runbook and controls, within `seconds`; whatever fails or is
    late is said on the page instead."""
    until = time.monotonic() + seconds
    now = status_now()
    minute = _minute(now)
    details = {}
    for incident in incidents:
        spec = runbook_for(incident.trigger or "")
        details[incident.id] = Details(runbook=spec, runbook_url=own_link(spec))
    if not incidents:
        return details
    try:
        charts: IncidentCharts | None = IncidentCharts(
            svc.engine,
            load_rules(svc.settings.rules_file),
            svc.settings.daily_budget_usd,
            svc.settings.detector_window_seconds,
        )
    except Exception as exc:  # a rules file that stopped parsing: the page still answers
        _log.warning("status page without charts: %s", exc)
        charts = None
    by_id = {incident.id: incident for incident in incidents}
    reads: dict[str, AnyFuture] = {}
    links = {
        incident.id: cache.ask(
            f"runbook {incident.id}", None, partial(asked_link, svc, incident.id)
        )
        for incident in incidents[:CHARTED_INCIDENTS_MAX]
    }
    for index, incident in enumerate(incidents):
        if charts is None:
            details[incident.id].no_chart = "the detector's rules could not be read"
        elif index >= CHARTED_INCIDENTS_MAX:
            details[incident.id].no_chart = f"only the first {CHARTED_INCIDENTS_MAX} are charted"
        elif not incident.trigger or not incident.scope:
            details[incident.id].no_chart = "its trigger and scope are not known yet"
        else:
            trigger, scope = incident.trigger, incident.scope
            reads[incident.id] = cache.get(
                f"chart {incident.id}",
                (trigger, scope, minute),
                partial(charts.svg, trigger, scope, now),
            )
    in_force = cache.get("controls", minute, partial(control_store.active, svc.engine, now))
    cache.keep(
        [
            "controls",
            *(f"chart {incident_id}" for incident_id in reads),
            *(f"runbook {incident_id}" for incident_id in links),
        ]
    )
    await _wait([*reads.values(), in_force], seconds)
    await _wait(list(links.values()), max(0.0, min(LINK_WAIT_SECONDS, until - time.monotonic())))
    for incident_id, link in links.items():
        done, url, error = _outcome(link)
        if done and error is None and url:
            details[incident_id].runbook_url = url
    for incident_id, read in reads.items():
        found = details[incident_id]
        done, svg, error = _outcome(read)
        if not done:
            found.no_chart = f"not drawn within the page's {STATUS_DEADLINE_SECONDS} s"
        elif error is not None:  # logged when it failed
            found.no_chart = "it could not be drawn (see the API's log)"
        elif svg is None:
            assert charts is not None
            incident = by_id[incident_id]
            found.no_chart = charts.why_none(incident.trigger or "", incident.scope or "")
        else:
            found.chart = svg
    done, active, error = _outcome(in_force)
    if done and error is None:
        for incident in incidents:
            details[incident.id].controls = [
                c for c in active if applies_to(c, incident.scope or GLOBAL, incident.id)
            ]
    else:
        for found in details.values():
            found.controls_unknown = True
    return details


_STYLE = (
    "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em;color:#111827}"
    "td,th{padding:.3em .8em;text-align:left}"
    "th{color:#6b7280;font-weight:600}"
    ".incident{border:1px solid #e5e7eb;border-radius:8px;padding:1em 1.5em;margin:1.5em 0;"
    "max-width:1100px}"
    ".incident h2{margin:.2em 0;font-size:1.2em}"
    ".meta,.note{color:#6b7280}"
    ".sev-SEV1,.sev-SEV2{color:#c8102e}.sev-SEV3{color:#d97706}"
    ".columns{display:flex;gap:3em;flex-wrap:wrap}.columns>div{flex:1;min-width:280px}"
    ".chart svg{width:100%;max-width:1000px;height:auto}"
    "code{background:#f3f4f6;padding:0 .3em;border-radius:3px}"
)


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _steps(spec: RunbookSpec) -> list[str]:
    """The runbook module's docstring, a paragraph each: what it does, step by step."""
    module = inspect.getmodule(spec.workflow)
    text = (module.__doc__ or "").strip() if module else ""
    return [" ".join(part.split()) for part in text.split("\n\n") if part.strip()]


def _href(url: str | None) -> str | None:
    """The URL when it is one to link (http(s), or a path of ours), else None."""
    if not url:
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.scheme.lower() in {"http", "https"}:
        return url
    # A path of ours only: "//host/..." would leave the page for another host.
    return url if not parts.scheme and not parts.netloc else None


def _link_html(url: str | None, label: str = "Runbook page") -> str:
    href = _href(url)
    return f"<p><a href='{_e(href)}'>{_e(label)}</a></p>" if href else ""


def _runbook_html(spec: RunbookSpec | None, url: str | None = None, *, whole: bool = False) -> str:
    """What the runbook does (its docstring's first paragraph; `whole`: all of it, with its
    triggers and approvals), when it acts, whom each level calls; and `url`, linked."""
    if spec is None:
        none = "<p class='note'>No runbook answers this trigger: the responders decide.</p>"
        return none + _link_html(url)
    steps = _steps(spec) or [""]
    when = "at once" if spec.mitigate_before_ack else "once someone acknowledges"
    path = "".join(
        f"<li>L{level}: {_e(step)}</li>" for level, step in enumerate(spec.escalation_path, 1)
    )
    parts = [f"<p><code>{_e(spec.name)}</code>: {_e(steps[0])}</p>"]
    if whole:
        parts += [f"<p>{_e(step)}</p>" for step in steps[1:]]
        triggers = ", ".join(f"<code>{_e(trigger)}</code>" for trigger in spec.triggers)
        parts.append(f"<p>Answers {triggers}.</p>")
    parts.append(
        f"<p>Mitigates {when}; expected resolution within "
        f"{spec.expected_resolution_minutes} min.</p>"
    )
    if path:
        parts.append(f"<p>Escalation path:</p><ul>{path}</ul>")
    if whole and spec.approvals:
        asks = "".join(
            f"<li><code>{_e(step)}</code> at {_e(', '.join(severities))}</li>"
            for step, severities in spec.approvals
        )
        parts.append(f"<p>Asks a person before these steps:</p><ul>{asks}</ul>")
    parts.append(_link_html(url, "Runbook page" if not whole else "The team's page"))
    return "".join(parts)


def _controls_html(found: Details, incident_id: str) -> str:
    if found.controls_unknown:
        return "<p class='note'>The controls could not be read in time.</p>"
    if not found.controls:
        return "<p class='note'>None.</p>"
    items = []
    for control in found.controls:
        if control.incident_id == incident_id:
            who = f"{control.set_by} for this incident" if control.manual else "its runbook"
        elif control.manual:
            who = f"{control.set_by}, by hand"
        else:
            who = f"the runbook of {control.incident_id}"
        expires = control.expires_at.strftime("%Y-%m-%d %H:%M UTC")
        items.append(
            f"<li>{_e(control.description)} <span class='note'>· set by {_e(who)} · "
            f"until {_e(expires)}</span></li>"
        )
    return f"<ul>{''.join(items)}</ul>"


def _when(incident: OpenIncident) -> str:
    at = incident.opened_at
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if at else "?"


def _incident_html(incident: OpenIncident, found: Details) -> str:
    chart = (
        f"<div class='chart'>{found.chart}</div>"
        if found.chart is not None
        else f"<p class='note'>No chart: {_e(found.no_chart)}.</p>"
    )
    opened = _when(incident)
    return (
        f"<section class='incident' id='{_e(incident.id)}'>"
        f"<h2><span class='sev-{_e(incident.severity)}'>{_e(incident.severity)}</span> · "
        f"{_e(incident.trigger)} · {_e(incident.scope)}</h2>"
        f"<p class='meta'>{_e(incident.status)} at L{_e(incident.level)} · opened {_e(opened)}"
        f" · <code>{_e(incident.id)}</code></p>"
        f"{chart}<div class='columns'>"
        f"<div><h3>Runbook</h3>{_runbook_html(found.runbook, found.runbook_url)}</div>"
        f"<div><h3>Controls in force</h3>{_controls_html(found, incident.id)}</div>"
        "</div></section>"
    )


def _render(page: StatusPage, details: dict[str, Details] | None = None) -> str:
    details = details or {}
    rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(str(value))}</td>"
            for value in (i.severity, i.trigger, i.scope, i.status, f"L{i.level}", _when(i))
        )
        + f"<td><a href='#{_e(i.id)}'>{_e(i.id)}</a></td>"
        + f"<td>{_runbook_cell(details.get(i.id, Details()))}</td></tr>"
        for i in page.open_incidents
    )
    sections = "".join(_incident_html(i, details.get(i.id, Details())) for i in page.open_incidents)
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>pagerloop status</title>"
        f"<style>{_STYLE}</style></head><body>"
        f"<h1>pagerloop: {html.escape(page.overall)}</h1>"
        "<table><tr><th>severity</th><th>trigger</th><th>scope</th><th>status</th><th>level</th>"
        f"<th>opened</th><th>incident</th><th>runbook</th></tr>{rows}</table>{sections}"
        "</body></html>"
    )


def _runbook_cell(found: Details) -> str:
    href = _href(found.runbook_url)
    name = found.runbook.name if found.runbook else "runbook"
    return f"<a href='{_e(href)}'>{_e(name)}</a>" if href else "-"


def runbook_facts(spec: RunbookSpec) -> dict[str, Any]:
    """The runbook's declaration and its steps (the module's docstring), as JSON."""
    return {
        "name": spec.name,
        "triggers": list(spec.triggers),
        "mitigate_before_ack": spec.mitigate_before_ack,
        "expected_resolution_minutes": spec.expected_resolution_minutes,
        "escalation_path": list(spec.escalation_path),
        "approvals": {step: list(severities) for step, severities in spec.approvals},
        "steps": _steps(spec),
        "runbook_url": spec.runbook_url,
    }


def _runbook_page(spec: RunbookSpec) -> str:
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>pagerloop runbook: {_e(spec.name)}</title>"
        f"<style>{_STYLE}</style></head><body>"
        f"<h1>Runbook <code>{_e(spec.name)}</code></h1>"
        f"<div class='incident'>{_runbook_html(spec, spec.runbook_url, whole=True)}</div>"
        "<p class='note'><a href='../status'>Status page</a></p></body></html>"
    )


@router.get("/runbooks/{name}", dependencies=[readable_by("status")])
async def runbook_doc(
    request: Request, name: Annotated[str, Path(max_length=RUNBOOK_NAME_MAX)]
) -> Response:
    """A built-in runbook's page (JSON; HTML for browsers): the link of its incidents when
    neither their rule nor the runbook names a page of the team's."""
    spec = next((spec for spec in RUNBOOKS if spec.name == name), None)
    if spec is None:
        known = ", ".join(spec.name for spec in RUNBOOKS)
        raise HTTPException(404, f"no runbook by that name; the runbooks are: {known}")
    if "text/html" in request.headers.get("accept", ""):
        return HTMLResponse(_runbook_page(spec))
    return JSONResponse(runbook_facts(spec))
