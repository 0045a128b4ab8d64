"""The fakes answer the real vendor clients as the vendors do: if these fail, a fake lies."""

from __future__ import annotations

import pytest
from jira import JIRA, JIRAError
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError

from activities.pagerduty import make_session
from tests.fakes.jira import FakeJira
from tests.fakes.pagerduty import FakePagerDuty
from tests.fakes.slack import FakeSlack


def slack_client(fake: FakeSlack, token: str = "xoxb-test") -> WebClient:
    return WebClient(token=token, base_url=fake.api_url, retry_handlers=[])


def test_slack_post_update_and_ephemeral(fake_slack: FakeSlack) -> None:
    client = slack_client(fake_slack)
    posted = client.chat_postMessage(channel="#llm-oncall", text="hello", blocks=[])
    channel, ts = posted["channel"], posted["ts"]
    assert channel.startswith("C")

    client.chat_update(channel=channel, ts=ts, text="edited")
    client.chat_postEphemeral(channel=channel, user="U123", text="only you")

    message = fake_slack.messages[(channel, ts)]
    assert message.text == "edited"
    assert [edit["text"] for edit in message.edits] == ["hello"]
    assert fake_slack.ephemeral[0]["user"] == "U123"
    assert fake_slack.calls("chat.postMessage")[0]["channel"] == "#llm-oncall"


def test_slack_errors_have_slack_shapes(fake_slack: FakeSlack) -> None:
    fake_slack.missing_channels.add("nowhere")
    with pytest.raises(SlackApiError) as missing:
        slack_client(fake_slack).chat_postMessage(channel="#nowhere", text="x")
    assert missing.value.response["error"] == "channel_not_found"
    assert missing.value.response.status_code == 200

    with pytest.raises(SlackApiError) as bad_token:
        slack_client(fake_slack, token="not-a-token").chat_postMessage(channel="#a", text="x")
    assert bad_token.value.response["error"] == "invalid_auth"

    client = slack_client(fake_slack)
    channel = client.chat_postMessage(channel="#a", text="x")["channel"]
    with pytest.raises(SlackApiError) as unknown_ts:
        client.chat_update(channel=channel, ts="1.000000", text="y")
    assert unknown_ts.value.response["error"] == "message_not_found"

    fake_slack.fail_next("chat.postMessage", "ratelimited", status=429, retry_after=7)
    with pytest.raises(SlackApiError) as limited:
        slack_client(fake_slack).chat_postMessage(channel="#a", text="x")
    assert limited.value.response.status_code == 429
    assert limited.value.response.headers["Retry-After"] == "7"


def test_slack_enforces_block_kit_limits(fake_slack: FakeSlack) -> None:
    header = {"type": "header", "text": {"type": "plain_text", "text": "h" * 151}}
    with pytest.raises(SlackApiError) as too_long:
        slack_client(fake_slack).chat_postMessage(channel="#a", text="x", blocks=[header])
    assert too_long.value.response["error"] == "invalid_blocks"

    many = [{"type": "divider"}] * 51
    with pytest.raises(SlackApiError) as too_many:
        slack_client(fake_slack).chat_postMessage(channel="#a", text="x", blocks=many)
    assert too_many.value.response["error"] == "invalid_blocks"


def test_pagerduty_events_lifecycle(fake_pagerduty: FakePagerDuty) -> None:
    session = make_session("R" * 32, fake_pagerduty.url)
    key = session.trigger("db down", "pagerloop/global", dedup_key="incident-1", severity="error")
    assert key == "incident-1"
    assert fake_pagerduty.alerts["incident-1"] == "triggered"
    session.acknowledge("incident-1")
    assert fake_pagerduty.alerts["incident-1"] == "acknowledged"
    session.resolve("incident-1")
    assert fake_pagerduty.alerts["incident-1"] == "resolved"

    [trigger] = fake_pagerduty.events("trigger")
    assert trigger["routing_key"] == "R" * 32
    assert trigger["payload"] == {
        "summary": "db down",
        "source": "pagerloop/global",
        "severity": "error",
    }


def test_pagerduty_rejects_invalid_events(fake_pagerduty: FakePagerDuty) -> None:
    import pdpyras

    session = make_session("R" * 32, fake_pagerduty.url)
    with pytest.raises(pdpyras.PDHTTPError) as invalid:
        session.trigger("x", "src", dedup_key="k", severity="apocalyptic")
    assert invalid.value.response.status_code == 400
    assert "payload.severity" in invalid.value.response.json()["errors"][0]

    fake_pagerduty.fail_next(429, retry_after=3)
    fake_pagerduty.fail_next(429, retry_after=3)
    with pytest.raises(pdpyras.PDHTTPError) as throttled:
        session.trigger("x", "src", dedup_key="k", severity="info")
    assert throttled.value.response.status_code == 429


def test_jira_issue_comment_transition_and_search(fake_jira: FakeJira) -> None:
    jira = JIRA(server=fake_jira.url, token_auth="t0ken", get_server_info=False)
    issue = jira.create_issue(
        fields={
            "project": {"key": "OPS"},
            "summary": "error rate 12% on global",
            "issuetype": {"name": "Incident"},
            "labels": ["pagerloop", "incident-abc"],
        }
    )
    assert issue.key == "OPS-1"
    assert issue.fields.summary == "error rate 12% on global"

    jira.add_comment(issue.key, "acknowledged by alice")
    jira.transition_issue(issue.key, "Done")
    again = jira.issue(issue.key)
    assert again.fields.status.name == "Done"
    assert [c.body for c in again.fields.comment.comments] == ["acknowledged by alice"]

    found = jira.search_issues('project = OPS AND labels = "incident-abc"')
    assert [i.key for i in found] == ["OPS-1"]
    assert list(jira.search_issues('labels = "incident-other"')) == []


def test_jira_errors_have_jira_shapes(fake_jira: FakeJira) -> None:
    jira = JIRA(server=fake_jira.url, token_auth="t0ken", get_server_info=False, max_retries=0)
    with pytest.raises(JIRAError) as missing:
        jira.issue("OPS-404")
    assert missing.value.status_code == 404
    with pytest.raises(JIRAError) as bad:
        jira.create_issue(fields={"project": {"key": "OPS"}, "issuetype": {"name": "Task"}})
    assert bad.value.status_code == 400
    assert "summary" in bad.value.text
