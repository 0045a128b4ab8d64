"""`validate` controls: an answer that fails its check (JSON, a registered JSON schema, an app's
own check) is sent exactly once more; the caller gets the second answer, and when that fails too
the call's record and a quality score of 0 say so. Unknown or broken checks never break a call.
Through the real OpenAI SDK against llmock, with the controls and records in a real store."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from llmock.pytest_plugin import LLMock
from pagerloop_sdk import Recorder, instrument, register_schema, register_validator, validation
from pagerloop_sdk import controls as ctl
from pagerloop_sdk.context import llm_context
from sqlalchemy import Engine
from sqlmodel import Session, select

from instrumentation.store_controls import source_for
from instrumentation.store_sink import StoreSink
from stores import controls
from stores.quality import QualityScore
from tests.helpers import put_control, recorded

CHAT = [{"role": "user", "content": "Extract the invoice as JSON"}]
GOOD = '{"invoice": "A-1", "total": 12}'


@pytest.fixture
def recorder(engine: Engine) -> Iterator[Recorder]:
    # Every answer sampled: a failed one is scored 0 only when sampled, like any other.
    recorder = Recorder(StoreSink(engine), quality_sample_rate=1.0, flush_interval=0.05)
    yield recorder
    recorder.close()


@pytest.fixture(autouse=True)
def _forget_checks() -> Iterator[None]:
    yield
    for name in ("schema:invoice", "short", "broken"):
        validation.unregister(name)


def client_for(llmock: LLMock, recorder: Recorder) -> openai.OpenAI:
    return instrument(
        openai.OpenAI(base_url=llmock.base_url(), api_key="k", max_retries=0), recorder=recorder
    )


def ask(client: openai.OpenAI, feature: str = "extract", **kwargs: Any) -> str:
    with llm_context(feature=feature):
        answer = client.chat.completions.create(model="gpt-4.1", messages=CHAT, **kwargs)
    return answer.choices[0].message.content or ""


def scores(engine: Engine) -> list[QualityScore]:
    """The scores of answers that failed their check (the others get the heuristic's)."""
    with Session(engine) as session:
        found = session.exec(select(QualityScore).where(QualityScore.label == "validation_failed"))
        return list(found)


def test_an_unsampled_failure_is_not_scored_so_the_quality_mean_stays_unbiased(
    llmock: LLMock, engine: Engine
) -> None:
    recorder = Recorder(StoreSink(engine), quality_sample_rate=0.0, flush_interval=0.05)
    try:
        put_control(engine, "validate", "json", feature="extract")
        client = client_for(llmock, recorder)
        llmock.reply("not JSON", times=2)
        assert ask(client) == "not JSON"
        [row] = recorded(recorder, engine)
        assert row.metadata_ == {"validation": "failed: json"}  # the failure is still noted
        with Session(engine) as session:
            assert list(session.exec(select(QualityScore))) == []
    finally:
        recorder.close()


# --- json ---------------------------------------------------------------------------------------


def test_a_bad_json_answer_is_sent_exactly_once_more(
    llmock: LLMock, recorder: Recorder, engine: Engine
) -> None:
    check = put_control(engine, "validate", "json", feature="extract")
    client = client_for(llmock, recorder)
    llmock.reply("Sure! Here is the invoice: total 12", times=1)
    llmock.reply(GOOD, times=1)

    assert json.loads(ask(client)) == {"invoice": "A-1", "total": 12}
    assert len(llmock.requests) == 2
    assert llmock.requests[0].body == llmock.requests[1].body  # the same request again

    llmock.reply(GOOD, times=1)
    ask(client)  # passes at once: one request, nothing to name
    assert len(llmock.requests) == 3

    retried, passed = recorded(recorder, engine)
    assert (retried.status, retried.controls, retried.retry_count) == (
        "success",
        f"validate#{check.id}",
        1,
    )
    assert not (retried.metadata_ or {}).get("validation")
    assert (passed.controls, passed.retry_count) == (None, 0)
    assert scores(engine) == []  # nothing failed in the end


def test_when_both_answers_fail_the_second_is_returned_and_the_failure_recorded(
    llmock: LLMock, recorder: Recorder, engine: Engine
) -> None:
    check = put_control(engine, "validate", "json", feature="extract")
    client = client_for(llmock, recorder)
    llmock.reply("first, not JSON", times=1)
    llmock.reply("second, not JSON either", times=1)

    assert ask(client) == "second, not JSON either"
    assert len(llmock.requests) == 2  # one retry, not more

    [row] = recorded(recorder, engine)
    assert (row.status, row.controls) == ("success", f"validate#{check.id}")
    assert row.metadata_ == {"validation": "failed: json"}
    [score] = scores(engine)
    assert (score.call_id, score.score, score.source, score.label) == (
        row.call_id,
        0.0,
        "scorer",
        "validation_failed",
    )
    assert score.feature == "extract"
    assert score.comment is not None
    assert score.comment.startswith("json: not JSON")


def test_a_second_attempt_that_raises_leaves_the_first_answer(
    llmock: LLMock, recorder: Recorder, engine: Engine
) -> None:
    put_control(engine, "validate", "short")

    def short_then_an_outage(text: str) -> bool:
        llmock.fail(500, times=1)  # checked between the attempts: the second one fails
        return len(text) < 5

    register_validator("short", short_then_an_outage)
    client = client_for(llmock, recorder)
    llmock.reply("far too long", times=1)

    assert ask(client) == "far too long"  # what the app would have had without the control
    assert [r.status for r in llmock.requests] == [200, 500]
    [row] = recorded(recorder, engine)
    assert (row.status, row.http_status) == ("success", 200)
    assert row.metadata_ == {"validation": "failed: short"}
    [score] = scores(engine)
    assert score.comment is not None
    assert "second attempt raised InternalServerError" in score.comment


async def test_async_clients_retry_once_too(
    llmock: LLMock, recorder: Recorder, engine: Engine
) -> None:
    check = put_control(engine, "validate", "json", model="gpt-4.1")
    client = instrument(
        openai.AsyncOpenAI(base_url=llmock.base_url(), api_key="k", max_retries=0),
        recorder=recorder,
    )
    llmock.reply("no", times=1)
    llmock.reply(GOOD, times=1)
    answer = await client.chat.completions.create(model="gpt-4.1", messages=CHAT)
    assert answer.choices[0].message.content == GOOD
    llmock.reply("no", times=2)
    raw = await client.chat.completions.with_raw_response.create(model="gpt-4.1", messages=CHAT)
    assert raw.parse().choices[0].message.content == "no"
    assert len(llmock.requests) == 4
    rows = recorded(recorder, engine)
    assert [r.controls for r in rows] == [f"validate#{check.id}"] * 2
    assert [bool(r.metadata_) for r in rows] == [False, True]


def test_responses_are_checked_streams_and_embeddings_are_not(
    llmock: LLMock, recorder: Recorder, engine: Engine
) -> None:
    put_control(engine, "validate", "json")
    client = client_for(llmock, recorder)
    llmock.reply("nope", times=1)
    llmock.reply(GOOD, times=1)
    assert client.responses.create(model="gpt-4.1", input="invoice?").output_text == GOOD
    assert len(llmock.requests) == 2

    # A stream is the caller's as it arrives: it passes unchecked.
    llmock.reply("streamed, not JSON", times=1)
    stream = client.chat.completions.create(model="gpt-4.1", messages=CHAT, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert len(llmock.requests) == 3
    client.embeddings.create(model="text-embedding-3-small", input="hello")
    assert len(llmock.requests) == 4
    assert not ctl.Rule(1, "validate", value="json").matches("embeddings", None, "m")


# --- schemas and the app's own checks -----------------------------------------------------------

INVOICE = {
    "type": "object",
    "required": ["invoice", "total"],
    "properties": {"invoice": {"type": "string"}, "total": {"type": "number", "minimum": 0}},
    "additionalProperties": False,
}


def test_a_registered_schema_is_the_check(
    llmock: LLMock, recorder: Recorder, engine: Engine
) -> None:
    check = put_control(engine, "validate", "schema:invoice", feature="extract")
    register_schema("invoice", INVOICE)
    client = client_for(llmock, recorder)
    llmock.reply('{"invoice": "A-1", "total": "twelve"}', times=1)  # JSON, not the schema
    llmock.reply(GOOD, times=1)
    assert ask(client) == GOOD
    llmock.reply('{"invoice": "A-2"}', times=2)
    assert ask(client) == '{"invoice": "A-2"}'
    assert len(llmock.requests) == 4
    rows = recorded(recorder, engine)
    assert [r.controls for r in rows] == [f"validate#{check.id}"] * 2
    [score] = scores(engine)
    assert score.call_id == rows[1].call_id
    assert score.comment is not None
    assert "total" in score.comment


def test_an_apps_own_check_and_its_reason(
    llmock: LLMock, recorder: Recorder, engine: Engine
) -> None:
    put_control(engine, "validate", "short", feature="extract")
    register_validator("short", lambda text: len(text) < 20 or f"{len(text)} characters")
    client = client_for(llmock, recorder)
    llmock.reply("x" * 50, times=1)
    llmock.reply("ok", times=1)
    assert ask(client) == "ok"
    llmock.reply("y" * 30, times=2)
    assert ask(client) == "y" * 30
    assert len(llmock.requests) == 4
    [score] = scores_after(recorder, engine)
    assert score.comment == "short: 30 characters"


def scores_after(recorder: Recorder, engine: Engine) -> list[QualityScore]:
    assert recorder.flush()
    return scores(engine)


def test_unknown_and_broken_checks_are_skipped_with_one_warning(
    llmock: LLMock, recorder: Recorder, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    unknown = put_control(engine, "validate", "no-such-check", feature="extract")
    client = client_for(llmock, recorder)
    with caplog.at_level(logging.WARNING, logger="pagerloop_sdk.controls"):
        ask(client)
        ask(client)
    assert len(llmock.requests) == 2  # never retried
    warned = [r.getMessage() for r in caplog.records if "no-such-check" in r.getMessage()]
    assert len(warned) == 1
    assert f"#{unknown.id}" in warned[0]

    put_control(engine, "validate", "broken", feature="other", incident="inc-broken")
    source_for(engine).refresh()  # the client reads the store every 2 s: now

    def broken(text: str) -> bool:
        raise RuntimeError("bug in the app's check")

    register_validator("broken", broken)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pagerloop_sdk.controls"):
        ask(client, feature="other")
        ask(client, feature="other")
    assert len(llmock.requests) == 4
    assert len([r for r in caplog.records if "raised RuntimeError" in r.getMessage()]) == 1
    assert all(not r.controls or "validate" not in r.controls for r in recorded(recorder, engine))


# --- pure parts ---------------------------------------------------------------------------------


def test_validate_controls_are_checked_and_described() -> None:
    for good in ("json", "schema:invoice", "my_check.v2"):
        assert ctl.problem("validate", good) is None
        assert controls.validate("validate", good) is None
    for bad in ("", "schema:", "two words", "x" * 101):
        assert controls.validate("validate", bad) is not None
    assert controls.describe("validate", "chat", None, "json") == (
        "validate output of feature chat with check json, retry once"
    )
    with pytest.raises(ValueError, match="json"):
        register_validator("json", lambda text: True)
    with pytest.raises(ValueError, match="schema name"):
        register_schema("two words", INVOICE)


def test_the_built_in_schema_subset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "jsonschema_rs", None)  # as in an app without it
    check = validation._schema_check(INVOICE)
    assert check(GOOD) is None
    assert check("[1]") is not None
    assert "'total' is missing" in (check('{"invoice": "A"}') or "")
    assert "not of type number" in (check('{"invoice": "A", "total": "x"}') or "")
    assert "less than 0" in (check('{"invoice": "A", "total": -1}') or "")
    assert "nothing is allowed" in (check('{"invoice": "A", "total": 1, "extra": 1}') or "")
    assert check("not json") == check("not json") is not None
    listed = validation._schema_check(
        {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1}
    )
    assert listed('["a", "b"]') is None
    assert listed("[]") is not None
    assert listed('["c"]') is not None
    either = validation._schema_check({"anyOf": [{"type": "integer"}, {"type": "null"}]})
    assert either("3") is None
    assert either("null") is None
    assert either('"x"') is not None
    with pytest.raises(ValueError, match="pattern"):
        validation._schema_check({"type": "string", "pattern": "^A"})  # more than the subset
