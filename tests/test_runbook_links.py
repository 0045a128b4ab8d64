"""A runbook link on every page (issue #16): the rules file's `runbook_url` and the
RunbookSpec's, which one an incident links, and the link in the Slack message, the PagerDuty
event, the Jira ticket, the email and the status page; the service's own page of each built-in
runbook (`GET /runbooks/<name>`). Pure functions first, then one incident on the time-skipping
server, then the detector opening incidents on the local dev server."""

from __future__ import annotations

import html
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine
from temporalio.client import Client, WorkflowHandle
from temporalio.testing import WorkflowEnvironment

import runbooks
from activities import email, jira, pagerduty
from activities.incidents import IncidentActivities, OpenIncidentRequest
from activities.slack import RUNBOOK_ACTION, incident_blocks
from api import status
from api.app import create_app
from api.deps import Services
from config.settings import Settings
from detectors.config import DetectorRules, RulesFileError, load_rules
from detectors.evaluation import evaluate
from detectors.rules import DEFAULT_RULES
from domain.aggregates import Aggregate, WindowAggregates
from domain.escalation import ChannelTarget, EscalationLevel, EscalationPolicy
from domain.histogram import bucket
from domain.incident import (
    Breach,
    IncidentState,
    IncidentStatus,
    NotificationPlan,
    RunbookPlan,
    Severity,
    Trigger,
)
from domain.incident_machine import BreachReported, Policy, decide
from runbooks import rate_limit_exhaustion
from runbooks.base import runbook_link, runbook_page
from tests.conftest import INGEST_KEY, OPERATOR_KEY, incident_ids, incident_worker
from tests.fakes.jira import FakeJira
from tests.fakes.pagerduty import FakePagerDuty
from tests.fakes.slack import FakeSlack, block_errors
from tests.helpers import close_incidents, eventually
from workflows.incident import IncidentWorkflow

RULE_PAGE = "https://wiki.example.com/runbooks/error-rate"
TEAM_PAGE = "https://wiki.example.com/runbooks/rate-limits"
STATUS_URL = "https://pagerloop.example.com/status"
NOW = datetime(2026, 11, 26, 12, tzinfo=UTC)


def write_rules(tmp_path: Path, content: str) -> Path:
    path = tmp_path / "rules.toml"
    path.write_text(content)
    return path


# --- the rules file ---------------------------------------------------------------------------


def test_a_rule_names_its_runbook_page_in_the_rules_file(tmp_path: Path) -> None:
    path = write_rules(tmp_path, f'[rules.error_rate]\nrunbook_url = "{RULE_PAGE}"\n')
    by_name = {rule.name: rule for rule in load_rules(path).rules}
    assert by_name["error_rate"].runbook_url == RULE_PAGE
    assert isinstance(by_name["error_rate"].runbook_url, str)  # plain data for Temporal
    assert by_name["latency_p95"].runbook_url is None  # the others keep none


def test_the_built_in_rules_and_runbooks_name_no_page() -> None:
    assert [rule.name for rule in DEFAULT_RULES if rule.runbook_url] == []
    assert [spec.name for spec in runbooks.RUNBOOKS if spec.runbook_url] == []


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("/runbooks/error-rate", "relative URL without a base"),
        ("ftp://wiki.example.com/error-rate", "URL scheme should be 'http' or 'https'"),
        ("javascript:alert(1)", "URL scheme should be 'http' or 'https'"),
        ("wiki page", "relative URL without a base"),
        ("https://wiki.example.com/" + "x" * 2000, "at most 2000 characters"),
    ],
)
def test_a_runbook_url_that_is_no_absolute_http_url_is_refused_with_the_field_named(
    tmp_path: Path, url: str, complaint: str
) -> None:
    path = write_rules(tmp_path, f'[rules.error_rate]\nrunbook_url = "{url}"\n')
    with pytest.raises(RulesFileError) as error:
        load_rules(path)
    assert "rules.error_rate.runbook_url" in str(error.value)
    assert complaint in str(error.value)


# --- which link an incident carries -------------------------------------------------------------


def test_the_rules_page_comes_first_then_the_runbooks_then_the_services() -> None:
    spec = rate_limit_exhaustion.SPEC
    own = replace(spec, runbook_url=TEAM_PAGE)
    assert runbook_link(RULE_PAGE, own, STATUS_URL) == RULE_PAGE
    assert runbook_link(RULE_PAGE, None, "") == RULE_PAGE  # a trigger without a runbook too
    assert runbook_link(None, own, STATUS_URL) == TEAM_PAGE
    assert runbook_link(None, own, "") == TEAM_PAGE
    assert (
        runbook_link(None, spec, STATUS_URL)
        == "https://pagerloop.example.com/runbooks/rate_limit_exhaustion"
    )
    assert runbook_link(None, spec, "") is None  # the service does not know its address
    assert runbook_link(None, None, STATUS_URL) is None
    assert runbook_link("", None, STATUS_URL) is None


def test_the_services_page_sits_beside_its_status_page() -> None:
    assert runbook_page("http://127.0.0.1:8080/status", "cost_spike") == (
        "http://127.0.0.1:8080/runbooks/cost_spike"
    )
    assert runbook_page("https://ops.example.com/pagerloop/status/", "a b/c") == (
        "https://ops.example.com/pagerloop/runbooks/a%20b%2Fc"
    )


def latency_window(p50_ms: float, p95_ms: float) -> WindowAggregates:
    """100 calls, half at `p50_ms`, the slowest tenth at `p95_ms`."""
    latencies = [p50_ms] * 90 + [p95_ms] * 10
    histogram: dict[int, int] = {}
    for value in latencies:
        histogram[bucket(value)] = histogram.get(bucket(value), 0) + 1
    aggregate = Aggregate(calls=100, successes=100, latency_histogram=histogram)
    return WindowAggregates(
        end=NOW, window_seconds=300, cells={"gpt-4.1": {"": aggregate}}, cost_today_usd=0.0
    )


def finding_page(rules: DetectorRules, window: WindowAggregates) -> str | None:
    first = evaluate(rules, window, {}, daily_budget_usd=500)
    second = evaluate(rules, window, first.rule_states, daily_budget_usd=500)
    [finding] = [f for f in second.firing if f.scope == "global"]
    assert finding.trigger == Trigger.ELEVATED_LATENCY
    return finding.runbook_url


def with_pages(**pages: str) -> DetectorRules:
    return DetectorRules(
        rules=tuple(replace(rule, runbook_url=pages.get(rule.name)) for rule in DEFAULT_RULES),
        scopes=("global",),
    )


def test_a_finding_links_the_page_of_its_most_severe_firing_rule() -> None:
    # p50 3 s: latency_p50 at warning (SEV3); p95 20 s: latency_p95 at critical (SEV2).
    both = latency_window(3000.0, 20_000.0)
    p50, p95 = "https://wiki.example.com/p50", "https://wiki.example.com/p95"
    assert finding_page(with_pages(latency_p50=p50, latency_p95=p95), both) == p95
    # The worst rule names none: the next one that does.
    assert finding_page(with_pages(latency_p50=p50), both) == p50
    assert finding_page(with_pages(), both) is None
    # A rule that is not firing gives the finding nothing.
    only_p95 = latency_window(1000.0, 20_000.0)
    assert finding_page(with_pages(latency_p50=p50, latency_p95=p95), only_p95) == p95
    assert finding_page(with_pages(latency_p50=p50), only_p95) is None


def state(**changes: Any) -> IncidentState:
    base = IncidentState(
        incident_id="incident-error_rate-global-20261126T120000Z",
        trigger=Trigger.ERROR_RATE,
        scope="global",
        severity=Severity.SEV2,
        status=IncidentStatus.DETECTED,
        opened_at=NOW,
        summary="error rate 40.0% > 5.0% over 2 min (50 calls)",
        metrics={"error_rate": 0.4, "calls": 50.0},
    )
    return replace(base, **changes)


def breach(runbook_url: str | None = RULE_PAGE, trigger: Trigger = Trigger.ERROR_RATE) -> Breach:
    return Breach(
        trigger=trigger,
        scope="global",
        severity=Severity.SEV2,
        observed_at=datetime.now(UTC),
        summary="error rate 40.0% > 5.0% over 2 min (50 calls)",
        metrics={"error_rate": 0.4, "calls": 50.0},
        runbook_url=runbook_url,
    )


def test_a_breach_naming_its_rules_page_takes_the_place_of_the_runbooks() -> None:
    default = runbook_page(STATUS_URL, "rate_limit_exhaustion")
    opened = state(runbook_url=default)
    told, _ = decide(opened, BreachReported(breach(RULE_PAGE)), Policy(), NOW)
    assert told.runbook_url == RULE_PAGE
    # A later breach of a rule that names none leaves the link as it was.
    again, _ = decide(told, BreachReported(breach(None)), Policy(), NOW)
    assert again.runbook_url == RULE_PAGE
    kept, _ = decide(opened, BreachReported(breach(None)), Policy(), NOW)
    assert kept.runbook_url == default
    assert opened.runbook_url == default  # decide works on a copy


# --- each channel ----------------------------------------------------------------------------


def runbook_buttons(blocks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        element
        for block in blocks
        if block["type"] == "actions"
        for element in block["elements"]
        if element["action_id"] == RUNBOOK_ACTION
    ]


@pytest.mark.parametrize("status", [IncidentStatus.DETECTED, IncidentStatus.RESOLVED])
def test_the_slack_message_has_a_runbook_link_button(status: IncidentStatus) -> None:
    blocks = incident_blocks(state(status=status, runbook_url=RULE_PAGE))
    [button] = runbook_buttons(blocks)
    assert (button["type"], button["text"]["text"], button["url"]) == (
        "button",
        "Runbook",
        RULE_PAGE,
    )
    assert block_errors(blocks) == []


def test_the_slack_message_without_a_link_has_no_runbook_button() -> None:
    assert runbook_buttons(incident_blocks(state())) == []
    too_long = "https://wiki.example.com/" + "x" * 3000  # cut short, it would mislead
    assert runbook_buttons(incident_blocks(state(runbook_url=too_long))) == []


def test_the_pagerduty_event_links_the_runbook_then_the_status_page() -> None:
    plan = NotificationPlan(status_url=STATUS_URL)
    assert pagerduty.page_links(state(runbook_url=RULE_PAGE), plan) == [
        {"href": RULE_PAGE, "text": "Runbook"},
        {"href": STATUS_URL, "text": "pagerloop status"},
    ]
    assert pagerduty.page_links(state(), plan) == [{"href": STATUS_URL, "text": "pagerloop status"}]
    assert pagerduty.page_links(state(), NotificationPlan()) == []


def test_the_jira_ticket_says_where_the_runbook_is() -> None:
    assert jira.runbook_line(state(runbook_url=RULE_PAGE)) == f"\n\nRunbook: {RULE_PAGE}"
    assert jira.runbook_line(state()) == ""


def email_request(runbook_url: str | None) -> email.EmailRequest:
    return email.EmailRequest(
        state=state(runbook_url=runbook_url),
        event="opened",
        recipients=["oncall@example.com"],
        status_url=STATUS_URL,
    )


def test_the_email_links_the_runbook_in_its_text_and_html() -> None:
    request = email_request(RULE_PAGE)
    assert f"Runbook: {RULE_PAGE}" in email.render_text(request).splitlines()
    assert f'<a href="{RULE_PAGE}">Runbook</a>' in email.render_html(request)
    plain = email_request(None)
    assert "Runbook" not in email.render_text(plain)
    assert ">Runbook</a>" not in email.render_html(plain)
    # Only an http(s) URL becomes a link, whatever a state carries.
    hostile = email_request("javascript:alert(1)")
    assert "javascript" not in email.render_text(hostile) + email.render_html(hostile)


# --- the status page ---------------------------------------------------------------------------


@pytest.fixture
async def api(
    time_skipping_env: WorkflowEnvironment, settings: Settings, engine: Engine
) -> AsyncIterator[httpx.AsyncClient]:
    """The API app with the status page public (the default)."""
    app = create_app(Services(settings, engine, time_skipping_env.client, slack=None))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        yield client


async def test_the_service_serves_a_page_for_each_built_in_runbook(
    api: httpx.AsyncClient,
) -> None:
    for spec in runbooks.RUNBOOKS:
        page = await api.get(f"/runbooks/{spec.name}", headers={"Accept": "text/html"})
        assert page.status_code == 200, spec.name
        assert page.headers["content-type"].startswith("text/html")
        assert f"<code>{spec.name}</code>" in page.text
        for trigger in spec.triggers:
            assert f"<code>{trigger}</code>" in page.text
        for level, step in enumerate(spec.escalation_path, 1):
            assert f"<li>L{level}: {html.escape(step)}</li>" in page.text
        assert f"expected resolution within {spec.expected_resolution_minutes} min" in page.text
        assert "<script" not in page.text

    cost = (await api.get("/runbooks/cost_spike", headers={"Accept": "text/html"})).text
    assert "Mitigates at once" in cost
    assert "<code>reroute_all</code> at SEV1, SEV2, SEV3, SEV4" in cost  # its approvals
    # Every paragraph of the module's docstring: the steps, not only the first.
    assert "serve repeated requests from cache" in cost
    assert "Critical features keep a capable model" in cost
    quality = await api.get("/runbooks/quality_degradation", headers={"Accept": "text/html"})
    assert "Mitigates once someone acknowledges" in quality.text


async def test_the_runbook_page_as_json(api: httpx.AsyncClient) -> None:
    found = await api.get("/runbooks/elevated_latency")
    assert found.status_code == 200
    body = found.json()
    spec = next(s for s in runbooks.RUNBOOKS if s.name == "elevated_latency")
    assert body["name"] == "elevated_latency"
    assert body["triggers"] == ["elevated_latency"]
    assert body["mitigate_before_ack"] is True
    assert body["expected_resolution_minutes"] == spec.expected_resolution_minutes
    assert body["escalation_path"] == list(spec.escalation_path)
    assert body["approvals"] == {"fallback_provider": ["SEV1", "SEV2", "SEV3", "SEV4"]}
    assert body["steps"][0].startswith("Elevated latency (the seed: p95 > 15 s)")
    assert len(body["steps"]) == 2
    assert body["runbook_url"] is None


async def test_an_unknown_runbook_is_a_404_saying_which_exist(api: httpx.AsyncClient) -> None:
    missing = await api.get("/runbooks/error_rate", headers={"Accept": "text/html"})
    assert missing.status_code == 404
    detail = missing.json()["detail"]
    assert detail.startswith("no runbook by that name")
    assert all(spec.name in detail for spec in runbooks.RUNBOOKS)
    long = await api.get("/runbooks/" + "x" * 500)
    assert long.status_code == 422
    assert "name" in long.json()["detail"]


async def test_the_runbook_pages_are_read_as_the_status_page_is(
    time_skipping_env: WorkflowEnvironment, settings: Settings, engine: Engine
) -> None:
    private = settings.model_copy(update={"public_endpoints": ["metrics"]})
    app = create_app(Services(private, engine, time_skipping_env.client, slack=None))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/status")).status_code == 401
        assert (await client.get("/runbooks/api_outage")).status_code == 401
        key = {"Authorization": f"Bearer {OPERATOR_KEY}"}
        assert (await client.get("/runbooks/api_outage", headers=key)).status_code == 200


def test_the_status_page_links_a_runbook_before_its_incident_says_otherwise() -> None:
    spec = rate_limit_exhaustion.SPEC
    # Relative to /status: it holds behind a proxy's prefix, and names no host of its own.
    assert status.own_link(spec) == "runbooks/rate_limit_exhaustion"
    assert status.own_link(replace(spec, runbook_url=TEAM_PAGE)) == TEAM_PAGE
    assert status.own_link(None) is None


# --- one incident, every channel (time-skipping server) ------------------------------------


def told(*channels: str) -> tuple[ChannelTarget, ...]:
    return tuple(ChannelTarget(channel) for channel in channels)


PLAN = NotificationPlan(
    slack_channel="#llm-oncall",
    pagerduty=True,
    jira=True,
    jira_project="OPS",
    status_url=STATUS_URL,
    policies={
        "SEV2": EscalationPolicy(
            (
                EscalationLevel("L1", "On-call", channels=told("slack", "pagerduty", "jira")),
                EscalationLevel("L2", "Platform", channels=told("slack", "pagerduty")),
            )
        )
    },
    runbook=RunbookPlan(enabled=False),
)


@pytest.fixture
async def opener(
    time_skipping_env: WorkflowEnvironment, settings: Settings
) -> AsyncIterator[tuple[IncidentActivities, list[WorkflowHandle[Any, Any]]]]:
    client = time_skipping_env.client
    handles: list[WorkflowHandle[Any, Any]] = []
    async with incident_worker(client, settings) as engine:
        yield IncidentActivities(client, settings.task_queue, PLAN, engine), handles
        await close_incidents(handles)


async def test_a_rules_page_reaches_slack_pagerduty_and_jira(
    opener: tuple[IncidentActivities, list[WorkflowHandle[Any, Any]]],
    time_skipping_env: WorkflowEnvironment,
    fake_slack: FakeSlack,
    fake_pagerduty: FakePagerDuty,
    fake_jira: FakeJira,
) -> None:
    activities, handles = opener
    incident_id = f"incident-error_rate-global-{uuid.uuid4().hex[:8]}"
    # The detector's request: update-with-start, the breach carrying its rule's page.
    request = OpenIncidentRequest(breach(RULE_PAGE), incident_id, known_id=incident_id)
    [result] = await activities.open_or_update([request])
    assert result.incident_id == incident_id
    handle = time_skipping_env.client.get_workflow_handle_for(IncidentWorkflow.run, incident_id)
    handles.append(handle)

    await eventually(lambda: len(fake_pagerduty.events("trigger")) == 1)
    await eventually(lambda: len(fake_slack.messages) == 1 and len(fake_jira.issues) == 1)
    opened: IncidentState = await handle.query(IncidentWorkflow.state)
    assert opened.runbook_url == RULE_PAGE

    [message] = fake_slack.top_level()
    [button] = runbook_buttons(message.blocks)
    assert button["url"] == RULE_PAGE
    [trigger] = fake_pagerduty.events("trigger")
    # Events API v2: `links` at the top level of the event, beside `payload`.
    assert trigger["links"] == [
        {"href": RULE_PAGE, "text": "Runbook"},
        {"href": STATUS_URL, "text": "pagerloop status"},
    ]
    [issue] = fake_jira.issues.values()
    assert f"Runbook: {RULE_PAGE}" in issue["fields"]["description"].splitlines()


# --- the detector opens them (local dev server) ----------------------------------------------


@pytest.fixture
def settings(settings: Settings, tmp_path: Path) -> Settings:
    """The shared settings with a rules file naming the error rate's page."""
    rules = write_rules(tmp_path, f'[rules.error_rate]\nrunbook_url = "{RULE_PAGE}"\n')
    return settings.model_copy(update={"rules_file": rules})


async def post_calls(settings: Settings, count: int, status_: str) -> None:
    calls = [{"model": "gpt-4.1", "status": status_, "latency_ms": 500}] * count
    async with httpx.AsyncClient(base_url=settings.api_url) as client:
        response = await client.post(
            "/v1/llm-calls",
            json={"calls": calls},
            headers={"Authorization": f"Bearer {INGEST_KEY}"},
        )
    assert response.status_code == 202


async def opened_state(client: Client, settings: Settings) -> IncidentState:
    async def listed() -> list[str]:
        return await incident_ids(client, settings.task_queue)

    found: list[str] = await eventually(listed, timeout=30)
    [incident_id] = found
    handle = client.get_workflow_handle_for(IncidentWorkflow.run, incident_id)
    return await handle.query(IncidentWorkflow.state)


async def test_the_detector_carries_the_rules_page_to_the_incident_and_the_status_page(
    running: Client, settings: Settings, fake_slack: FakeSlack
) -> None:
    await post_calls(settings, 50, "error")
    incident = await opened_state(running, settings)
    assert incident.trigger == Trigger.ERROR_RATE
    assert incident.runbook is None  # no runbook answers error_rate: the rule's page links
    assert incident.runbook_url == RULE_PAGE

    def button_url() -> str | None:
        buttons = [b for m in fake_slack.top_level() for b in runbook_buttons(m.blocks)]
        return buttons[0]["url"] if buttons else None

    assert await eventually(button_url) == RULE_PAGE

    async def status_row() -> str:
        async with httpx.AsyncClient(base_url=settings.api_url) as client:
            page = await client.get("/status", headers={"Accept": "text/html"})
        assert page.status_code == 200
        return page.text if f"<a href='{RULE_PAGE}'>runbook</a>" in page.text else ""

    # The incident's own link, from its workflow: the row and its section.
    page: str = await eventually(status_row, timeout=20)
    assert f"<a href='{RULE_PAGE}'>Runbook page</a>" in page


async def test_an_incident_without_a_rules_page_links_the_services_page_of_its_runbook(
    running: Client, settings: Settings
) -> None:
    await post_calls(settings, 50, "rate_limited")
    incident = await opened_state(running, settings)
    assert incident.runbook == "rate_limit_exhaustion"
    assert incident.runbook_url == f"{settings.api_url}/runbooks/rate_limit_exhaustion"

    async with httpx.AsyncClient() as client:
        page = await client.get(incident.runbook_url, headers={"Accept": "text/html"})
    assert page.status_code == 200
    assert "<code>rate_limit_exhaustion</code>" in page.text
    assert "Platform team: request an emergency quota increase" in page.text
