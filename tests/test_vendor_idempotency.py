"""A Slack thread reply, a heads-up in another channel, a Jira comment and the Jira postmortem are
each told once although Temporal retries them: a retry (attempt > 1) first looks for what an
earlier attempt of the same activity posted, by a key stable across its attempts (the workflow
run and activity id) carried in the Slack message's metadata or as an invisible anchor in the
Jira comment. A first attempt makes no extra call.

The activities run in an `ActivityEnvironment` whose `activity.Info` says which attempt it is,
against the vendor fakes, and once for real on a Temporal server: an attempt that lands but is
not heard back from in time (start-to-close timeout) is retried, and the retry skips.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment
from temporalio.worker import Worker

from activities import jira, slack
from activities.jira import JiraActivities, JiraComment, JiraResolution, JiraTicket
from activities.slack import SlackActivities, SlackPostRequest, SlackReplyRequest
from activities.vendor_http import attempt_key
from domain.incident import IncidentState, IncidentStatus, Severity, SlackMessageRef, Trigger
from tests.fakes.jira import FakeJira
from tests.fakes.slack import FakeSlack, Message

CHANNEL = "#llm-oncall"
L2_CHANNEL = "#llm-platform"


def state() -> IncidentState:
    return IncidentState(
        incident_id="incident-quality_degradation-global-1",
        trigger=Trigger.QUALITY_DEGRADATION,
        scope="global",
        severity=Severity.SEV2,
        status=IncidentStatus.DETECTED,
        opened_at=datetime.now(UTC),
        summary="quality 0.41 < 0.5",
    )


def attempt(number: int, activity_id: str = "7", run: str = "run-1") -> ActivityEnvironment:
    """An environment whose activity is attempt `number` of activity `activity_id` of `run`,
    first scheduled a moment ago."""
    env = ActivityEnvironment()
    now = datetime.now(UTC)
    env.info = replace(
        ActivityEnvironment.default_info(),
        attempt=number,
        activity_id=activity_id,
        workflow_run_id=run,
        scheduled_time=now - timedelta(seconds=40),
        current_attempt_scheduled_time=now,
    )
    return env


# --- Slack ---------------------------------------------------------------------------------


@pytest.fixture
def slack_activities(fake_slack: FakeSlack) -> SlackActivities:
    return SlackActivities(slack.make_client("xoxb-test", fake_slack.api_url))


def incident_message(fake_slack: FakeSlack) -> tuple[SlackMessageRef, Message]:
    client = slack.make_client("xoxb-test", fake_slack.api_url)
    ref = slack.post_message(client, CHANNEL, "incident", incident_id="i-1")
    return ref, fake_slack.messages[(ref.channel, ref.ts)]


async def test_a_retried_thread_reply_whose_first_attempt_landed_is_not_posted_again(
    fake_slack: FakeSlack, slack_activities: SlackActivities
) -> None:
    ref, message = incident_message(fake_slack)
    request = SlackReplyRequest(message=ref, text="*acknowledged* by U1 via slack: looking")

    await attempt(1).run(slack_activities.reply, request)
    assert message.replies == [request.text]
    assert fake_slack.calls("conversations.replies") == []  # the first attempt only posts
    [reply] = message.thread
    assert reply.metadata is not None
    assert reply.metadata["event_type"] == slack.REPLY_EVENT

    # The worker died before it heard back: the retry finds the reply and posts nothing.
    await attempt(2).run(slack_activities.reply, request)
    await attempt(3).run(slack_activities.reply, request)
    assert message.replies == [request.text]
    [looked, _] = fake_slack.calls("conversations.replies")
    assert looked["ts"] == ref.ts
    assert looked["include_all_metadata"] in ("1", "true")
    assert len(fake_slack.calls("chat.postMessage")) == 2  # the incident's message, one reply


async def test_a_retried_thread_reply_whose_first_attempt_did_not_land_is_posted(
    fake_slack: FakeSlack, slack_activities: SlackActivities
) -> None:
    ref, message = incident_message(fake_slack)
    request = SlackReplyRequest(message=ref, text="*note* by U1 via slack: same words")
    # The same words told by another activity (another note), and attempt 1 failing outright.
    await attempt(1, activity_id="3").run(slack_activities.reply, request)
    fake_slack.fail_next("chat.postMessage", "internal_error", status=500)
    with pytest.raises(Exception, match="internal_error"):
        await attempt(1).run(slack_activities.reply, request)

    await attempt(2).run(slack_activities.reply, request)
    assert message.replies == [request.text, request.text]
    assert len(fake_slack.calls("conversations.replies")) == 1


async def test_a_retry_pages_through_a_long_thread(
    fake_slack: FakeSlack, slack_activities: SlackActivities
) -> None:
    ref, message = incident_message(fake_slack)
    request = SlackReplyRequest(message=ref, text="*reminder*")
    for n in range(slack.LOOKUP_PAGE + 10):
        await attempt(1, activity_id=f"earlier-{n}").run(slack_activities.reply, request)
    await attempt(1, activity_id="landed").run(slack_activities.reply, request)

    await attempt(2, activity_id="landed").run(slack_activities.reply, request)
    assert len(message.replies) == slack.LOOKUP_PAGE + 11
    assert [c.get("cursor") for c in fake_slack.calls("conversations.replies")] == [
        None,
        str(slack.LOOKUP_PAGE),
    ]


async def test_a_retry_whose_look_up_slack_refuses_for_good_posts_anyway(
    fake_slack: FakeSlack, slack_activities: SlackActivities
) -> None:
    ref, message = incident_message(fake_slack)
    request = SlackReplyRequest(message=ref, text="*escalated* to L2")
    fake_slack.fail_next("conversations.replies", "missing_scope")
    await attempt(2).run(slack_activities.reply, request)
    assert message.replies == [request.text]  # told, rather than not told


async def test_a_retried_look_up_that_fails_for_now_is_retried_without_posting(
    fake_slack: FakeSlack, slack_activities: SlackActivities
) -> None:
    ref, message = incident_message(fake_slack)
    request = SlackReplyRequest(message=ref, text="*escalated* to L2")
    fake_slack.fail_next("conversations.replies", "service_unavailable", status=503)
    with pytest.raises(Exception, match="service_unavailable"):
        await attempt(2).run(slack_activities.reply, request)
    assert message.replies == []


async def test_a_retried_notify_whose_first_attempt_landed_is_not_posted_again(
    fake_slack: FakeSlack, slack_activities: SlackActivities
) -> None:
    request = SlackPostRequest(channel=L2_CHANNEL, state=state(), note="escalated to L2")
    incident_message(fake_slack)  # another channel's message does not count

    await attempt(1).run(slack_activities.notify, request)
    assert len(fake_slack.posts()) == 2
    assert fake_slack.calls("conversations.history") == []
    await attempt(2).run(slack_activities.notify, request)
    assert len(fake_slack.posts()) == 2
    [looked] = fake_slack.calls("conversations.history")
    assert looked["channel"] == fake_slack.channel_id(L2_CHANNEL)
    assert float(looked["oldest"]) < datetime.now(UTC).timestamp() - 40

    # Another activity (the reminder an hour on) tells the channel again.
    await attempt(2, activity_id="8").run(slack_activities.notify, request)
    channel = fake_slack.channel_id(L2_CHANNEL)
    told = [m for m in fake_slack.top_level() if m.channel == channel]
    assert len(told) == 2
    assert all(m.metadata and m.metadata["event_type"] == slack.NOTIFY_EVENT for m in told)


async def test_a_retried_notify_to_a_channel_never_posted_to_posts(
    fake_slack: FakeSlack, slack_activities: SlackActivities
) -> None:
    request = SlackPostRequest(channel=L2_CHANNEL, state=state(), note="escalated to L2")
    await attempt(2).run(slack_activities.notify, request)
    assert len(fake_slack.posts()) == 1


def test_the_key_is_the_same_for_every_attempt_of_one_activity_only() -> None:
    info = ActivityEnvironment.default_info()
    again = replace(info, attempt=5, current_attempt_scheduled_time=datetime.now(UTC))
    assert attempt_key(info) == attempt_key(again)
    assert attempt_key(info) != attempt_key(replace(info, activity_id="other"))
    assert attempt_key(info) != attempt_key(replace(info, workflow_run_id="next"))


# --- Jira ----------------------------------------------------------------------------------


class FlakyJira(FakeJira):
    """The Jira fake, which can also fail the next transition (after the postmortem landed)."""

    fail_transition = False

    async def _transitions(self, request: Request) -> Response:
        if request.method == "POST" and self.fail_transition:
            self.fail_transition = False
            await self._recorded(request)
            return JSONResponse({"errorMessages": ["Service Unavailable"], "errors": {}}, 503)
        return await super()._transitions(request)


@pytest.fixture
def flaky_jira() -> Iterator[FlakyJira]:
    with FlakyJira() as server:
        yield server


def jira_activities(fake: FakeJira) -> JiraActivities:
    return JiraActivities(jira.make_client(fake.url, None, "jira-test-token"))


async def open_issue(activities: JiraActivities) -> str:
    return await attempt(1, activity_id="1").run(
        activities.open_ticket, JiraTicket("i-1", "OPS", "[SEV2] quality", "description")
    )


def comment_reads(fake: FakeJira, key: str) -> int:
    return sum(r.method == "GET" for r in fake.received(f"/rest/api/2/issue/{key}/comment"))


async def test_a_retried_comment_whose_first_attempt_landed_is_not_posted_again(
    fake_jira: FakeJira,
) -> None:
    activities = jira_activities(fake_jira)
    key = await open_issue(activities)
    request = JiraComment(key, "acknowledged by U1 via slack: looking")

    await attempt(1).run(activities.comment, request)
    assert comment_reads(fake_jira, key) == 0  # the first attempt only posts
    [posted] = fake_jira.issues[key]["comments"]
    text, mark = posted["body"].rsplit("\n", 1)
    assert text == request.text
    assert mark == jira.anchor(attempt_key(attempt(1).info))  # renders as nothing

    await attempt(2).run(activities.comment, request)
    assert len(fake_jira.issues[key]["comments"]) == 1
    assert comment_reads(fake_jira, key) == 1

    # The same words from another activity are another comment.
    await attempt(2, activity_id="9").run(activities.comment, request)
    assert [c["body"].split("\n")[0] for c in fake_jira.issues[key]["comments"]] == [
        request.text,
        request.text,
    ]


async def test_a_long_comment_keeps_its_mark(fake_jira: FakeJira) -> None:
    activities = jira_activities(fake_jira)
    key = await open_issue(activities)
    await attempt(1).run(activities.comment, JiraComment(key, "x" * (jira.COMMENT_MAX + 50)))
    await attempt(2).run(activities.comment, JiraComment(key, "x" * (jira.COMMENT_MAX + 50)))
    [posted] = fake_jira.issues[key]["comments"]
    assert len(posted["body"]) == jira.COMMENT_MAX
    assert posted["body"].endswith(jira.anchor(attempt_key(attempt(1).info)))


async def test_a_resolve_cut_off_after_the_postmortem_posts_it_once(
    flaky_jira: FlakyJira,
) -> None:
    activities = jira_activities(flaky_jira)
    key = await open_issue(activities)
    request = JiraResolution(key, "h3. Postmortem\nTime to acknowledge: 3 min")

    flaky_jira.fail_transition = True
    with pytest.raises(Exception, match="HTTP 503"):
        await attempt(1).run(activities.resolve, request)
    assert comment_reads(flaky_jira, key) == 0
    assert flaky_jira.issues[key]["status"] == "To Do"

    await attempt(2).run(activities.resolve, request)
    issue = flaky_jira.issues[key]
    assert issue["status"] == "Done"
    assert [c["body"].startswith("h3. Postmortem") for c in issue["comments"]] == [True]

    # Done already: a later retry changes nothing and reads no comments.
    await attempt(3).run(activities.resolve, request)
    assert len(issue["comments"]) == 1
    assert comment_reads(flaky_jira, key) == 1


async def test_a_first_resolve_posts_the_postmortem_and_transitions(fake_jira: FakeJira) -> None:
    activities = jira_activities(fake_jira)
    key = await open_issue(activities)
    await attempt(1).run(activities.resolve, JiraResolution(key, "h3. Postmortem"))
    issue = fake_jira.issues[key]
    assert issue["status"] == "Done"
    assert len(issue["comments"]) == 1
    assert comment_reads(fake_jira, key) == 0


# --- on a Temporal server: an attempt that landed, not heard back from in time ------------------


class SlowJira(FakeJira):
    """The Jira fake, holding back its answer to the next new comment."""

    comment_delay = 0.0

    async def _comment(self, request: Request) -> Response:
        answer = await super()._comment(request)
        if request.method == "POST" and self.comment_delay:
            delay, self.comment_delay = self.comment_delay, 0.0
            await asyncio.sleep(delay)
        return answer


@workflow.defn(sandboxed=False)
class TellOnce:
    """Replies in a thread and comments on a ticket with a start-to-close timeout shorter than
    the vendors take to answer: each first attempt lands, times out, and is retried."""

    @workflow.run
    async def run(self, reply: SlackReplyRequest, comment: JiraComment) -> None:
        timeout = timedelta(seconds=2)
        retry = RetryPolicy(initial_interval=timedelta(milliseconds=200))
        await workflow.execute_activity_method(
            SlackActivities.reply, reply, start_to_close_timeout=timeout, retry_policy=retry
        )
        await workflow.execute_activity_method(
            JiraActivities.comment, comment, start_to_close_timeout=timeout, retry_policy=retry
        )


async def test_activities_retried_by_temporal_after_a_timeout_tell_once(
    dev_env: WorkflowEnvironment, fake_slack: FakeSlack
) -> None:
    with SlowJira() as slow_jira:
        slack_acts = SlackActivities(slack.make_client("xoxb-test", fake_slack.api_url))
        jira_acts = jira_activities(slow_jira)
        key = await open_issue(jira_acts)
        ref, message = incident_message(fake_slack)
        fake_slack.delay_next("chat.postMessage", 4.0)
        slow_jira.comment_delay = 4.0
        queue = f"test-{uuid.uuid4().hex[:12]}"
        async with Worker(
            dev_env.client,
            task_queue=queue,
            workflows=[TellOnce],
            activities=[slack_acts.reply, jira_acts.comment],
        ):
            handle = await dev_env.client.start_workflow(
                TellOnce.run,
                args=[SlackReplyRequest(ref, "*acknowledged* by U1"), JiraComment(key, "ack")],
                id=f"tell-once-{uuid.uuid4().hex[:8]}",
                task_queue=queue,
                execution_timeout=timedelta(seconds=60),
            )
            await handle.result()
            history = await handle.fetch_history()
        attempts = [
            event.activity_task_started_event_attributes.attempt
            for event in history.events
            if event.HasField("activity_task_started_event_attributes")
        ]
        assert attempts == [2, 2]  # each timed out once, then its retry succeeded
        assert message.replies == ["*acknowledged* by U1"]
        assert len(fake_slack.calls("conversations.replies")) == 1
        assert [c["body"].split("\n")[0] for c in slow_jira.issues[key]["comments"]] == ["ack"]
        assert comment_reads(slow_jira, key) == 1
