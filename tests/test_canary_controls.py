"""Canary controls: a control that applies to a fraction of the calls in its target, each
session staying on one side. The store (SQLite and PostgreSQL) and its migration, the
activity, the SDK's slice (pure, then through the real OpenAI SDK against llmock), the API
serving canaries only to SDKs that can slice, and the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import openai
import pytest
from llmock.pytest_plugin import LLMock
from pagerloop_sdk import Recorder, instrument, llm_context
from pagerloop_sdk import controls as ctl
from pagerloop_sdk.context import LLMContext
from pagerloop_sdk.http_controls import HttpControls
from pagerloop_sdk.records import CONTROLS_MAX
from sqlalchemy import Engine
from sqlmodel import Session
from temporalio.api.common.v1 import Payload
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment
from typer.testing import CliRunner

from activities.controls import ControlActivities, ControlRef, ControlSpec, SetControl
from cli.main import app as cli
from config import Settings
from instrumentation.store_sink import StoreSink
from stores import controls, schema
from tests.conftest import INGEST_KEY
from tests.fakes.server import ThreadedServer
from tests.helpers import api_client, recorded

NOW = datetime(2026, 12, 14, 12, 0, tzinfo=UTC)
INCIDENT = "incident-latency-global-1"
CHAT = [{"role": "user", "content": "Summarize the quarter in one line."}]
OPERATOR = "operator-key-1"
APP = {"Authorization": f"Bearer {INGEST_KEY}", "X-Pagerloop-Instance": "app-1"}
ALICE = {"Authorization": f"Bearer {OPERATOR}"}
CAN_SLICE = {"X-Pagerloop-Capabilities": "fraction"}


def put(
    engine: Engine,
    kind: str,
    value: str = "",
    *,
    fraction: float | None = None,
    now: datetime | None = None,
    **target: str,
) -> controls.Control:
    """A runbook's control of INCIDENT, in force for an hour from `now`."""
    now = now or datetime.now(UTC)
    return controls.upsert(
        engine,
        incident_id=INCIDENT,
        kind=kind,
        feature=target.get("feature"),
        model=target.get("model"),
        value=value,
        reason="canary",
        set_by="runbook:test",
        expires_at=now + timedelta(hours=1),
        now=now,
        fraction=fraction,
    )


def stored(engine: Engine, control_id: int | None) -> controls.Control:
    with Session(engine) as session:
        found = session.get(controls.Control, control_id)
        assert found is not None
        return found


# --- the store ------------------------------------------------------------------------------


def test_a_canary_is_stored_and_promoted_in_place(store: Engine) -> None:
    canary = put(store, "reroute", "gpt-4.1-mini", model="gpt-4.1", fraction=0.1, now=NOW)
    assert stored(store, canary.id).fraction == pytest.approx(0.1)
    assert canary.description == "reroute gpt-4.1 -> gpt-4.1-mini on 10% of the traffic (canary)"

    wider = put(store, "reroute", "gpt-4.1-mini", model="gpt-4.1", fraction=0.25, now=NOW)
    assert wider.id == canary.id
    assert stored(store, canary.id).fraction == pytest.approx(0.25)

    later = NOW + timedelta(minutes=5)
    promoted = put(store, "reroute", "gpt-4.1-mini", model="gpt-4.1", now=later)
    assert (promoted.id, promoted.key) == (canary.id, canary.key)
    assert stored(store, canary.id).fraction is None  # NULL: all traffic
    assert promoted.description == "reroute gpt-4.1 -> gpt-4.1-mini"
    assert [c.id for c in controls.active(store, later)] == [canary.id]


@pytest.mark.parametrize(
    ("fraction", "text"),
    [(0.1, "10%"), (0.025, "2.5%"), (0.5, "50%"), (1 / 3, "33.33%"), (0.001, "0.1%")],
)
def test_the_share_reads_as_a_plain_percentage(fraction: float, text: str) -> None:
    assert controls.describe("max_tokens", "chat", None, "256", fraction) == (
        f"cap output tokens at 256 for feature chat on {text} of the traffic (canary)"
    )


def test_controls_set_before_the_fraction_column_read_as_all_traffic(store: Engine) -> None:
    before = put(store, "pin", "gpt-4.1-2025-04-14", model="gpt-4.1", now=NOW)
    schema.downgrade(store, "0008")
    schema.upgrade(store)
    assert schema.current_revision(store) == schema.head_revision()
    kept = stored(store, before.id)
    assert (kept.value, kept.fraction) == ("gpt-4.1-2025-04-14", None)


# --- the activity ---------------------------------------------------------------------------


async def test_the_activity_sets_a_canary_then_promotes_the_same_control(store: Engine) -> None:
    env = ActivityEnvironment()
    activities = ControlActivities(store)
    spec = ControlSpec("reroute", model="gpt-4.1", value="gpt-4.1-mini", fraction=0.1)
    canary = await env.run(activities.set, SetControl(INCIDENT, spec, "runbook:latency"))
    assert canary.fraction == pytest.approx(0.1)
    assert canary.description.endswith(" on 10% of the traffic (canary)")

    spec.fraction = None
    promoted = await env.run(activities.set, SetControl(INCIDENT, spec, "runbook:latency"))
    assert (promoted.id, promoted.key) == (canary.id, canary.key)
    assert promoted.fraction is None
    assert promoted.description == "reroute gpt-4.1 -> gpt-4.1-mini"
    assert stored(store, canary.id).fraction is None


@pytest.mark.parametrize("fraction", [0.0, 1.0, 1.5, -0.1, math.nan, math.inf])
async def test_a_canary_outside_zero_to_one_is_refused_for_good(
    engine: Engine, fraction: float
) -> None:
    spec = ControlSpec("concurrency", value="4", fraction=fraction)
    with pytest.raises(ApplicationError) as raised:
        await ActivityEnvironment().run(
            ControlActivities(engine).set, SetControl(INCIDENT, spec, "runbook:test")
        )
    assert raised.value.type == "InvalidControl"
    assert raised.value.non_retryable
    assert controls.listed(engine, NOW, include_past=True) == []


def test_a_control_ref_recorded_before_canaries_still_decodes() -> None:
    old = {"id": 3, "key": "k", "kind": "pin", "feature": None, "model": "gpt-4.1",
           "value": "gpt-4.1-2025-04-14", "description": "pin gpt-4.1 -> gpt-4.1-2025"}  # fmt: skip
    payload = Payload(metadata={"encoding": b"json/plain"}, data=json.dumps(old).encode())
    [ref] = pydantic_data_converter.payload_converter.from_payloads([payload], [ControlRef])
    assert (ref.id, ref.value, ref.fraction) == (3, "gpt-4.1-2025-04-14", None)


# --- the slice (pure) -----------------------------------------------------------------------


def canary(id: int, kind: str, value: str = "", fraction: float = 0.1, **target: Any) -> ctl.Rule:
    return ctl.Rule(id, kind, value=value, incident_id=INCIDENT, fraction=fraction, **target)


def routed(snapshot: ctl.Snapshot, session: str, model: str = "gpt-4.1") -> ctl.Decision | None:
    with llm_context(session_id=session):
        return snapshot.decide("chat", None, model)


def rerouted(snapshot: ctl.Snapshot, session: str, model: str = "gpt-4.1") -> bool:
    decision = routed(snapshot, session, model)
    return decision is not None and decision.route is not None


def test_a_tenth_canary_takes_a_tenth_of_the_sessions_each_always_on_its_side() -> None:
    reroute = canary(7, "reroute", "gpt-4.1-mini", model="gpt-4.1")
    cap = ctl.Rule(8, "max_tokens", value="512")  # all traffic
    first, second = ctl.Snapshot((reroute, cap)), ctl.Snapshot((reroute, cap))
    sessions = [f"session-{n}" for n in range(20_000)]

    inside = set()
    for session in sessions:
        decision = routed(first, session)
        assert decision is not None
        assert decision.cap == cap  # in the slice or not, every other control applies
        if decision.route is not None:
            assert decision.canary == (reroute,)
            inside.add(session)
        else:
            assert decision.canary == ()
    assert 0.09 <= len(inside) / len(sessions) <= 0.11
    # The same sessions on the same side: again, and in another snapshot of the same controls.
    assert {s for s in sessions if rerouted(first, s)} == inside
    assert {s for s in sessions if rerouted(second, s)} == inside
    assert inside == {s for s in sessions if ctl.in_slice(reroute, s)}
    # Out of its target the canary does nothing, in its slice or not.
    assert not any(rerouted(first, s, "o3") for s in inside)


def test_a_promoted_canary_keeps_its_sessions() -> None:
    sessions = [f"user-{n}" for n in range(2_000)]
    tenth = {s for s in sessions if ctl.in_slice(canary(1, "cache", fraction=0.1), s)}
    half = {s for s in sessions if ctl.in_slice(canary(1, "cache", fraction=0.5), s)}
    assert tenth < half
    assert 0.45 <= len(half) / len(sessions) <= 0.55


# The slice of these keys, pinned: a change of hash would move live sessions across a canary.
PINNED = {
    "session-1": 0.17975172248257887,
    "session-2": 0.9820068660092007,
    "user-42": 0.07179758441941676,
    "trace-abc": 0.1365684151814831,
    "séance": 0.280059039231421,
}
UNITS_IN_A_FRESH_PROCESS = """
import json, sys
from pagerloop_sdk.controls import unit
print(json.dumps({key: unit(sys.argv[1], key) for key in json.loads(sys.argv[2])}))
"""


@pytest.mark.parametrize("seed", ["0", "4242"])
def test_the_slice_is_the_same_in_every_process_whatever_the_hash_seed(seed: str) -> None:
    assert {key: ctl.unit(INCIDENT, key) for key in PINNED} == PINNED
    assert [k for k in PINNED if ctl.in_slice(canary(1, "cache", fraction=0.1), k)] == ["user-42"]
    done = subprocess.run(
        [sys.executable, "-c", UNITS_IN_A_FRESH_PROCESS, INCIDENT, json.dumps(list(PINNED))],
        env={**os.environ, "PYTHONHASHSEED": seed},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert json.loads(done.stdout) == PINNED


def test_the_session_key_is_the_session_else_the_user_else_the_trace() -> None:
    assert ctl.session_key(LLMContext(session_id="s", user_id="u", trace_id="t")) == "s"
    assert ctl.session_key(LLMContext(user_id="u", trace_id="t")) == "u"
    assert ctl.session_key(LLMContext(trace_id="t")) == "t"
    assert ctl.session_key(LLMContext()) is None


def test_calls_without_a_session_are_sliced_one_by_one() -> None:
    snapshot = ctl.Snapshot((canary(2, "reroute", "gpt-4.1-mini", fraction=0.2),))
    sides = [snapshot.decide("chat", None, "gpt-4.1") is not None for _ in range(5_000)]
    assert 0.17 <= sum(sides) / len(sides) <= 0.23


def test_only_a_snapshot_with_a_canary_decides_per_session() -> None:
    plain = ctl.Snapshot((ctl.Rule(1, "reroute", value="gpt-4.1-mini"),))
    assert type(plain) is ctl.Snapshot  # the plain memoized lookup, unchanged
    assert type(ctl.Snapshot((canary(2, "cache"),))) is ctl.CanarySnapshot


def test_a_canary_with_a_fraction_it_cannot_mean_is_not_enforced() -> None:
    rules = [canary(1, "cache", fraction=f) for f in (0.0, -0.5, 1.5, math.nan)]
    assert ctl.enforceable([*rules, canary(2, "cache", fraction=0.3)]) == (
        canary(2, "cache", fraction=0.3),
    )


# --- through the real OpenAI SDK against llmock ---------------------------------------------


@pytest.fixture
def recorder(engine: Engine) -> Iterator[Recorder]:
    recorder = Recorder(StoreSink(engine), quality_sample_rate=0.0, flush_interval=0.05)
    yield recorder
    recorder.close()


def test_only_calls_in_the_slice_are_rerouted_and_all_of_them_are_tagged(
    llmock: LLMock, recorder: Recorder, engine: Engine
) -> None:
    reroute = put(engine, "reroute", "gpt-4.1-mini", model="gpt-4.1", fraction=0.1)
    idle = put(engine, "backoff", "3", feature="digest", fraction=0.5)  # changes no call here
    cap = put(engine, "max_tokens", "256")  # all traffic
    rule = ctl.Rule(reroute.id or 0, "reroute", incident_id=INCIDENT, fraction=0.1)
    client = instrument(
        openai.OpenAI(base_url=llmock.base_url(), api_key="k", max_retries=0), recorder=recorder
    )

    sessions = [f"session-{n}" for n in range(150)]
    for session in [*sessions, *sessions[:30]]:  # some sessions call twice
        with llm_context(session_id=session, feature="chat"):
            client.chat.completions.create(model="gpt-4.1", messages=CHAT)
    with llm_context(user_id="user-42", feature="digest"):
        client.chat.completions.create(model="o3", messages=CHAT)

    inside = {s for s in sessions if ctl.in_slice(rule, s)}
    assert 3 <= len(inside) <= 40
    sent = [r.body["model"] for r in llmock.requests]
    expected = ["gpt-4.1-mini" if s in inside else "gpt-4.1" for s in [*sessions, *sessions[:30]]]
    assert sent[:-1] == expected

    rows = recorded(recorder, engine)
    assert len(rows) == 181
    for row, session in zip(rows[:-1], [*sessions, *sessions[:30]], strict=True):
        assert row.model == "gpt-4.1"
        if session in inside:
            assert row.controls == f"canary#{reroute.id},reroute#{reroute.id},max_tokens#{cap.id}"
        else:
            assert row.controls == f"max_tokens#{cap.id}"
    backoff = ctl.Rule(idle.id or 0, "backoff", incident_id=INCIDENT, fraction=0.5)
    digest = rows[-1]
    assert ctl.in_slice(backoff, "user-42")  # 0.07 < 0.5: tagged, though it changed nothing
    assert digest.controls == f"canary#{idle.id},max_tokens#{cap.id}"


def test_the_canary_tags_survive_a_label_cut_short(
    llmock: LLMock, recorder: Recorder, engine: Engine
) -> None:
    # 30 throttles of other incidents on the feature: their tags alone pass CONTROLS_MAX.
    for n in range(30):
        controls.upsert(
            engine, incident_id=f"incident-other-{n}", kind="concurrency", feature="f1",
            model=None, value="100", reason="r", set_by="runbook:test",
            expires_at=datetime.now(UTC) + timedelta(hours=1), now=datetime.now(UTC),
        )  # fmt: skip
    wide = put(engine, "cache", feature="f1", fraction=0.999)  # session-1 is in its slice
    client = instrument(
        openai.OpenAI(base_url=llmock.base_url(), api_key="k", max_retries=0), recorder=recorder
    )
    with llm_context(feature="f1", session_id="session-1"):
        client.chat.completions.create(model="gpt-4.1", messages=CHAT)
    [row] = recorded(recorder, engine)
    assert row.controls is not None
    assert len(row.controls) == CONTROLS_MAX  # cut short...
    assert row.controls.startswith(f"canary#{wide.id},concurrency#")  # ...at the other end


# --- the API --------------------------------------------------------------------------------


@pytest.fixture
async def api(
    time_skipping_env: WorkflowEnvironment, store: Engine
) -> AsyncIterator[httpx.AsyncClient]:
    config = Settings(
        _env_file=None,  # type: ignore[call-arg]
        ingest_api_keys=INGEST_KEY,
        operator_api_keys=f"alice:{OPERATOR}",
    )
    async with api_client(config, store, time_skipping_env.client) as client:
        yield client


async def test_only_sdks_that_can_slice_get_a_canary_and_each_its_own_etag(
    api: httpx.AsyncClient, store: Engine
) -> None:
    full = put(store, "max_tokens", "512")
    tenth = put(store, "reroute", "gpt-4.1-mini", model="gpt-4.1", fraction=0.1)

    old = await api.get("/v1/controls", headers=APP)
    assert old.status_code == 200
    assert [(c["id"], c["fraction"]) for c in old.json()["controls"]] == [(full.id, None)]
    new = await api.get("/v1/controls", headers={**APP, **CAN_SLICE})
    assert [(c["id"], c["fraction"]) for c in new.json()["controls"]] == [
        (full.id, None),
        (tenth.id, 0.1),
    ]
    # Listed among others, in any case and spacing.
    loose = await api.get(
        "/v1/controls", headers={**APP, "x-pagerloop-capabilities": "zstd , Fraction"}
    )
    assert loose.json() == new.json()
    assert loose.headers["etag"] == new.headers["etag"]
    assert "X-Pagerloop-Capabilities" in old.headers["vary"]

    # Neither answer stands for the other, even once they are the same controls.
    assert old.headers["etag"] != new.headers["etag"]
    crossed = await api.get(
        "/v1/controls", headers={**APP, **CAN_SLICE, "If-None-Match": old.headers["etag"]}
    )
    assert crossed.status_code == 200
    assert len(crossed.json()["controls"]) == 2
    for headers, answer in ((APP, old), ({**APP, **CAN_SLICE}, new)):
        again = await api.get(
            "/v1/controls", headers={**headers, "If-None-Match": answer.headers["etag"]}
        )
        assert again.status_code == 304
    controls.revert_id(store, tenth.id or 0, datetime.now(UTC), reverted_by="t")
    same_controls = await api.get(
        "/v1/controls", headers={**APP, **CAN_SLICE, "If-None-Match": old.headers["etag"]}
    )
    assert same_controls.status_code == 200
    assert same_controls.json()["controls"] == old.json()["controls"]

    # Promoted, the control goes to every SDK.
    put(store, "reroute", "gpt-4.1-mini", model="gpt-4.1")
    assert len((await api.get("/v1/controls", headers=APP)).json()["controls"]) == 2


def manual(**fields: Any) -> dict[str, Any]:
    return {"kind": "reroute", "model": "gpt-4.1", "value": "gpt-4.1-mini",
            "duration_minutes": 30, "reason": "try the mini model", **fields}  # fmt: skip


@pytest.mark.parametrize("fraction", [1.5, 1, 0, -0.2, "a tenth"])
async def test_a_canary_set_by_hand_outside_zero_to_one_is_422_naming_it(
    api: httpx.AsyncClient, store: Engine, fraction: object
) -> None:
    response = await api.post("/v1/controls", json=manual(fraction=fraction), headers=ALICE)
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith("fraction"), response.json()
    assert controls.active(store, datetime.now(UTC)) == []


async def test_a_canary_set_by_hand_is_promoted_by_setting_it_without_a_fraction(
    api: httpx.AsyncClient, store: Engine
) -> None:
    first = await api.post("/v1/controls", json=manual(fraction=0.25), headers=ALICE)
    assert first.status_code == 201, first.text
    assert first.json()["fraction"] == 0.25
    promoted = await api.post("/v1/controls", json=manual(), headers=ALICE)
    assert promoted.status_code == 201, promoted.text
    assert (promoted.json()["id"], promoted.json()["fraction"]) == (first.json()["id"], None)
    assert stored(store, first.json()["id"]).fraction is None


# --- the HTTP source and the CLI ------------------------------------------------------------


def test_the_sdk_says_it_can_slice_and_gets_the_canary_over_http(
    ingest_api: ThreadedServer, engine: Engine
) -> None:
    tenth = put(engine, "reroute", "gpt-4.1-mini", model="gpt-4.1", fraction=0.1)
    source = HttpControls(ingest_api.url, f"Bearer {INGEST_KEY}", ttl=3600)
    [rule] = source.refresh().rules
    assert (rule.id, rule.kind, rule.incident_id, rule.fraction) == (
        tenth.id,
        "reroute",
        INCIDENT,
        0.1,
    )
    assert isinstance(source.refresh(), ctl.CanarySnapshot)
    source.close()
    # What an SDK that does not say so gets: no canary.
    older = httpx.get(
        ingest_api.url + "/v1/controls",
        headers={"Authorization": f"Bearer {INGEST_KEY}", "X-Pagerloop-Instance": "old-sdk"},
    )
    assert older.json()["controls"] == []


def test_the_cli_sets_lists_and_refuses_a_canary(
    store: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAGERLOOP_DATABASE_URL", store.url.render_as_string(hide_password=False))

    def run(*args: str) -> Any:
        return CliRunner().invoke(cli, ["controls", *args], env={"COLUMNS": "250"})

    refused = run("set", "reroute", "--model", "gpt-4.1", "--value", "gpt-4.1-mini",
                  "--reason", "r", "--fraction", "1.5")  # fmt: skip
    assert refused.exit_code == 2
    assert "--fraction" in refused.output
    assert controls.listed(store, datetime.now(UTC), include_past=True) == []

    done = run("set", "reroute", "--model", "gpt-4.1", "--value", "gpt-4.1-mini",
               "--reason", "r", "--fraction", "0.025")  # fmt: skip
    assert done.exit_code == 0, done.output
    assert "on 2.5% of the traffic (canary)" in done.output
    [control] = controls.active(store, datetime.now(UTC))
    assert control.fraction == pytest.approx(0.025)
    assert "2.5% canary" in run("list").output

    promoted = run(
        "set", "reroute", "--model", "gpt-4.1", "--value", "gpt-4.1-mini", "--reason", "r"
    )
    assert promoted.exit_code == 0, promoted.output
    listed = run("list").output
    assert "canary" not in listed
    assert f"{control.id} " in listed
