"""GET and POST /v1/controls through the real FastAPI app, on SQLite and on PostgreSQL: each
app instance's share of app-wide limits, ETags, manual controls; and the pure share maths."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import settings as examples
from hypothesis import strategies as st
from sqlalchemy import Engine, update
from temporalio.testing import WorkflowEnvironment
from typer.testing import CliRunner, Result

from api.controls import matches
from cli.main import app as cli
from config import Settings
from domain.incident import ActionRequest, NotificationPlan
from stores import controls, instances
from stores.instances import LIVE_SECONDS, SETTLE_SECONDS, SdkInstance, share
from tests.conftest import incident_worker
from tests.helpers import api_client, close_incidents, put_control
from tests.test_incident_workflow import Stack
from workflows.incident import IncidentWorkflow

INGEST = "ingest-key-1"
OPERATOR = "operator-key-1"
APP = {"Authorization": f"Bearer {INGEST}"}
ALICE = {"Authorization": f"Bearer {OPERATOR}"}
T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def since(seconds: float) -> datetime:
    """`seconds` before now (the API reads the real clock)."""
    return datetime.now(UTC) - timedelta(seconds=seconds)


def make_api(env: WorkflowEnvironment, engine: Engine) -> httpx.AsyncClient:
    config = Settings(
        _env_file=None,  # type: ignore[call-arg]
        ingest_api_keys=INGEST,
        operator_api_keys=f"alice:{OPERATOR}",
    )
    return api_client(config, engine, env.client)


@pytest.fixture
async def api(
    time_skipping_env: WorkflowEnvironment, store: Engine
) -> AsyncIterator[httpx.AsyncClient]:
    async with make_api(time_skipping_env, store) as client:
        yield client


def settled(engine: Engine, *names: str) -> None:
    """Instances polling for a while already: first seen 8 s ago, last seen 1 s ago."""
    for name in names:
        instances.touch(engine, name, since(8))
        instances.touch(engine, name, since(1))


def put(engine: Engine, kind: str, value: str = "", **target: str) -> controls.Control:
    return put_control(
        engine,
        kind,
        value,
        incident="incident-rate_limit_exhaustion-global-1",
        ttl=timedelta(hours=1),
        reason="429s",
        set_by="runbook:rate_limit_exhaustion",
        **target,
    )


async def poll(api: httpx.AsyncClient, instance: str, **headers: str) -> httpx.Response:
    return await api.get(
        "/v1/controls", headers={**APP, "X-Pagerloop-Instance": instance, **headers}
    )


def values(response: httpx.Response) -> dict[str, tuple[str, int | None]]:
    assert response.status_code == 200, response.text
    return {c["kind"]: (c["value"], c["limit"]) for c in response.json()["controls"]}


# --- the share of one instance (pure) ------------------------------------------------------


def test_a_limit_is_split_evenly_the_oldest_taking_the_remainder() -> None:
    live = [("b", at(-60)), ("a", at(-60)), ("c", at(-30))]  # a and b: same age, by id
    assert [share(4, name, live, T0) for name in "abc"] == [2, 1, 1]
    assert [share(2, name, live, T0) for name in "abc"] == [1, 1, 0]
    assert [share(9, name, live, T0) for name in "abc"] == [3, 3, 3]
    assert share(5, "a", [("a", at(-60))], T0) == 5


def test_a_newcomer_waits_while_an_older_instance_is_live() -> None:
    live = [("old", at(-60)), ("new", at(-SETTLE_SECONDS + 1))]
    assert share(4, "new", live, T0) == 0
    assert share(4, "old", live, T0) == 2  # the newcomer's part goes to nobody
    later = T0 + timedelta(seconds=2)
    assert share(4, "new", live, later) == 2  # settled
    # Alone (the whole app just started), a newcomer has everything at once.
    assert share(4, "new", [("new", T0)], T0) == 4
    # The first of several newcomers has its share; the ones after it wait.
    fresh = [("x", at(-1)), ("y", at(-0.5))]
    assert (share(4, "x", fresh, T0), share(4, "y", fresh, T0)) == (2, 0)
    # Two joining at the same instant: neither is older, both wait.
    tied = [("x", at(-1)), ("y", at(-1))]
    assert (share(4, "x", tied, T0), share(4, "y", tied, T0)) == (0, 0)
    assert (share(4, "x", tied, at(5)), share(4, "y", tied, at(5))) == (2, 2)
    # An instance missing from the list counts as first seen now.
    assert share(4, "z", [("old", at(-60))], T0) == 0


Instances = st.dictionaries(
    st.text("abcdefgh", min_size=1, max_size=3),
    st.floats(min_value=0, max_value=30, allow_nan=False),
    min_size=1,
    max_size=12,
)


@examples(max_examples=300, deadline=None)
@given(limit=st.integers(min_value=1, max_value=50), ages=Instances)
def test_the_shares_never_add_up_to_more_than_the_limit(limit: int, ages: dict[str, float]) -> None:
    live = [(name, T0 - timedelta(seconds=age)) for name, age in ages.items()]
    shares = [share(limit, name, live, T0) for name in ages]
    assert all(s >= 0 for s in shares)
    assert sum(shares) <= limit
    if all(age > SETTLE_SECONDS for age in ages.values()) or len(ages) == 1:
        assert sum(shares) == limit  # nothing held back once everyone has settled


@examples(max_examples=300, deadline=None)
@given(
    limit=st.integers(min_value=1, max_value=50),
    ages=Instances,
    joined=st.floats(min_value=0, max_value=2),
    step=st.floats(min_value=0, max_value=SETTLE_SECONDS - 0.01),  # timedelta keeps µs
    repolled=st.lists(st.booleans(), min_size=12, max_size=12),
)
def test_a_join_never_takes_the_app_over_its_limit(
    limit: int,
    ages: dict[str, float],
    joined: float,
    step: float,
    repolled: list[bool],
) -> None:
    """Instance J joins `joined` s after the others last polled. Until its shares settle, each
    older instance holds either its share from before J (not polled since) or one computed
    with J; what J gets on top of them must keep the app within its limit."""
    before = [(name, T0 - timedelta(seconds=age)) for name, age in ages.items()]
    first = T0 + timedelta(seconds=joined)
    after = [*before, ("J", first)]
    held = [
        share(limit, name, after if again else before, first if again else T0)
        for (name, _), again in zip(before, repolled, strict=False)
    ]
    newcomer = share(limit, "J", after, first + timedelta(seconds=step))
    assert newcomer == 0
    assert sum(held) + newcomer <= limit


# --- the instance registry -------------------------------------------------------------------


def test_instances_are_live_until_ten_seconds_after_their_last_poll(store: Engine) -> None:
    instances.touch(store, "a", at(0))
    instances.touch(store, "b", at(1))
    instances.touch(store, "a", at(4))
    assert instances.live(store, at(5)) == [("a", at(0)), ("b", at(1))]
    assert instances.live(store, at(11)) == [("a", at(0))]  # b left 10 s after its last poll
    assert instances.live(store, at(4 + LIVE_SECONDS)) == []
    # A poll from a replica whose clock is behind does not move last_seen back.
    instances.touch(store, "a", at(2))
    assert instances.live(store, at(13)) == [("a", at(0))]
    # Back after it stopped counting: new again, behind the others.
    for second in (10, 18, 20):
        instances.touch(store, "a", at(second))
    instances.touch(store, "b", at(20))
    assert instances.live(store, at(21)) == [("a", at(0)), ("b", at(20))]


def test_instances_unseen_for_a_day_are_pruned(store: Engine) -> None:
    instances.touch(store, "gone", at(0))
    instances.touch(store, "here", at(3600))
    assert instances.prune(store, at(86_400)) == 0
    assert instances.prune(store, at(86_401)) == 1
    assert instances.live(store, at(3601)) == [("here", at(3600))]


# --- manual controls in the store ------------------------------------------------------------


def test_manual_controls_are_reverted_with_their_incident_but_never_extended(
    store: Engine,
) -> None:
    incident = "incident-rate_limit_exhaustion-global-1"
    runbook = put(store, "concurrency", "4", feature="chat")
    now = datetime.now(UTC)
    manual = controls.set_manual(
        store,
        incident_id=incident,
        kind="concurrency",
        feature="chat",
        model=None,
        value="2",
        reason="by hand",
        set_by="alice",
        expires_at=now + timedelta(minutes=30),
        now=now,
    )
    free = controls.set_manual(
        store,
        incident_id=None,
        kind="rpm",
        feature=None,
        model=None,
        value="600",
        reason="steady",
        set_by="bob",
        expires_at=now + timedelta(minutes=30),
        now=now,
    )
    assert manual.id != runbook.id  # the same target, rows of their own
    assert manual.key == f"manual:{incident}/concurrency/chat/*"
    assert (free.key, free.incident_id) == ("manual:manual/rpm/*/*", "manual")
    assert manual.manual
    assert free.manual
    assert not runbook.manual

    controls.extend(store, incident, now, now + timedelta(hours=4))
    by_id = {c.id: c for c in controls.active(store, now)}
    assert controls.utc(by_id[runbook.id].expires_at) == now + timedelta(hours=4)
    assert controls.utc(by_id[manual.id].expires_at) == now + timedelta(minutes=30)

    # A runbook rolling its own controls back leaves the person's alone...
    controls.revert(store, incident, now, keys=[runbook.key])
    assert {c.id for c in controls.active(store, now)} == {manual.id, free.id}
    # ...and the incident resolving reverts them.
    controls.revert(store, incident, now)
    assert [c.id for c in controls.active(store, now)] == [free.id]


def test_rpm_and_tpm_are_counted_kinds() -> None:
    assert controls.validate("rpm", "600") is None
    assert controls.validate("tpm", "2000000") is None
    for bad in ("0", "-1", "1.5", "many", "", "²", str(controls.COUNT_MAX + 1)):
        assert controls.validate("rpm", bad) is not None
    assert controls.describe("rpm", "chat", None, "60") == (
        "limit feature chat to 60 requests per minute"
    )
    assert controls.describe("tpm", None, None, "90000") == (
        "limit all calls to 90000 tokens per minute"
    )


def test_if_none_match_is_compared_weakly_and_accepts_lists() -> None:
    assert matches('"abc"', '"abc"')
    assert matches('W/"abc"', '"abc"')
    assert matches('"x", "abc"', '"abc"')
    assert matches("*", '"abc"')
    assert not matches('"abd"', '"abc"')
    assert not matches(None, '"abc"')


# --- GET /v1/controls ------------------------------------------------------------------------


async def test_each_instance_gets_its_share_of_app_wide_limits(
    api: httpx.AsyncClient, store: Engine
) -> None:
    put(store, "concurrency", "4", feature="chat")
    put(store, "rpm", "10", feature="chat")
    put(store, "tpm", "2", feature="chat")
    put(store, "reroute", "gpt-4.1-mini", model="gpt-4.1")
    settled(store, "app-1", "app-2", "app-3")

    answers = {name: await poll(api, name) for name in ("app-1", "app-2", "app-3")}
    assert values(answers["app-1"]) == {
        "concurrency": ("2", 4),
        "rpm": ("4", 10),
        "tpm": ("1", 2),
        "reroute": ("gpt-4.1-mini", None),
    }
    assert values(answers["app-2"])["concurrency"] == ("1", 4)
    assert values(answers["app-3"])["concurrency"] == ("1", 4)
    assert values(answers["app-3"])["tpm"] == ("0", 2)  # fewer tokens than instances
    body = answers["app-1"].json()
    assert body["instances"] == 3
    reroute = next(c for c in body["controls"] if c["kind"] == "reroute")
    assert set(reroute) == {
        "id", "kind", "feature", "model", "value", "limit", "expires_at", "incident_id", "reason",
        "fraction",
    }  # fmt: skip
    assert reroute["fraction"] is None
    assert reroute["model"] == "gpt-4.1"
    assert reroute["incident_id"] == "incident-rate_limit_exhaustion-global-1"
    assert reroute["reason"] == "429s"
    assert datetime.fromisoformat(reroute["expires_at"]) > datetime.now(UTC)


async def test_etag_and_304_and_the_poll_still_counts(
    api: httpx.AsyncClient, store: Engine
) -> None:
    put(store, "concurrency", "4")
    first = await poll(api, "app-1")
    etag = first.headers["etag"]
    assert etag.startswith('"')
    assert etag.endswith('"')
    assert first.headers["cache-control"] == "no-cache"
    before = dict(instances.live(store, datetime.now(UTC)))

    again = await poll(api, "app-1", **{"If-None-Match": etag})
    assert again.status_code == 304
    assert again.content == b""
    assert again.headers["etag"] == etag
    with store.connect() as connection:
        [seen] = connection.execute(
            SdkInstance.__table__.select()  # type: ignore[attr-defined]
        ).all()
    assert controls.utc(seen.last_seen) > controls.utc(seen.first_seen)  # touched again
    assert dict(instances.live(store, datetime.now(UTC))) == before

    put(store, "disable", feature="beta")
    changed = await poll(api, "app-1", **{"If-None-Match": etag})
    assert changed.status_code == 200
    assert changed.headers["etag"] != etag
    assert (
        await poll(api, "app-1", **{"If-None-Match": f"W/{changed.headers['etag']}"})
    ).status_code == 304


async def test_a_newcomer_gets_nothing_until_it_has_settled(
    api: httpx.AsyncClient, store: Engine
) -> None:
    put(store, "concurrency", "4")
    settled(store, "old-1", "old-2")
    newcomer = await poll(api, "new-1")
    assert values(newcomer)["concurrency"] == ("0", 4)
    assert newcomer.json()["instances"] == 3
    assert values(await poll(api, "old-1"))["concurrency"] == ("2", 4)  # 4 over 3 instances
    assert values(await poll(api, "old-2"))["concurrency"] == ("1", 4)

    with store.begin() as connection:  # as if it had joined SETTLE_SECONDS ago
        connection.execute(
            update(SdkInstance)
            .where(SdkInstance.instance_id == "new-1")  # type: ignore[arg-type]
            .values(first_seen=since(SETTLE_SECONDS + 1))
        )
    assert values(await poll(api, "new-1"))["concurrency"] == ("1", 4)


async def test_a_departed_instance_stops_counting(api: httpx.AsyncClient, store: Engine) -> None:
    put(store, "rpm", "100")
    settled(store, "app-1", "app-2")
    instances.touch(store, "gone", since(60))
    instances.touch(store, "gone", since(LIVE_SECONDS + 0.5))
    answer = await poll(api, "app-1")
    assert answer.json()["instances"] == 2
    assert values(answer)["rpm"] == ("50", 100)


async def test_get_needs_an_ingest_key_and_an_instance_id(api: httpx.AsyncClient) -> None:
    instance = {"X-Pagerloop-Instance": "app-1"}
    assert (await api.get("/v1/controls", headers=instance)).status_code == 401
    wrong = {**instance, "Authorization": "Bearer nope"}
    assert (await api.get("/v1/controls", headers=wrong)).status_code == 401
    operator = {**instance, **ALICE}  # an operator key is no app
    assert (await api.get("/v1/controls", headers=operator)).status_code == 401

    missing = await api.get("/v1/controls", headers=APP)
    assert missing.status_code == 422
    assert "x-pagerloop-instance" in missing.json()["detail"].lower()
    for bad in (b"", b"a b", b"app/1", b"x" * 129, "ünicode".encode()):
        response = await api.get("/v1/controls", headers={**APP, "X-Pagerloop-Instance": bad})
        assert response.status_code == 422, bad
        assert "x-pagerloop-instance" in response.json()["detail"].lower()
    ok = "pod-7f9c.web_1:8080-" + "x" * 100
    assert (await poll(api, ok)).status_code == 200


# --- POST /v1/controls -----------------------------------------------------------------------


def body(**fields: Any) -> dict[str, Any]:
    return {
        "kind": "rpm",
        "feature": "chat",
        "value": "600",
        "duration_minutes": 30,
        "reason": "keep under the org's quota",
        **fields,
    }


async def test_a_control_set_by_hand_is_in_force_and_listed(
    api: httpx.AsyncClient, store: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = datetime.now(UTC)
    response = await api.post("/v1/controls", json=body(), headers=ALICE)
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["kind"] == "rpm"
    assert (created["feature"], created["model"]) == ("chat", None)
    assert (created["value"], created["limit"]) == ("600", 600)
    assert created["set_by"] == "alice"  # the key's name
    assert created["incident_id"] is None  # set by hand for no incident
    assert created["noted"] is None
    assert created["reason"] == "keep under the org's quota"
    expires = datetime.fromisoformat(created["expires_at"])
    assert timedelta(minutes=29) < expires - started < timedelta(minutes=31)
    assert datetime.fromisoformat(created["created_at"]) >= started - timedelta(seconds=1)

    settled(store, "app-1")
    listed = (await poll(api, "app-1")).json()["controls"]
    assert [(c["id"], c["kind"], c["value"], c["limit"]) for c in listed] == [
        (created["id"], "rpm", "600", 600)
    ]

    # Again on the same target: the same control, refreshed.
    again = await api.post("/v1/controls", json=body(value="300"), headers=ALICE)
    assert again.status_code == 201
    assert again.json()["id"] == created["id"]
    assert again.json()["value"] == "300"

    disable = await api.post(
        "/v1/controls", json=body(kind="disable", value="ignored", model="o3"), headers=ALICE
    )
    assert disable.status_code == 201, disable.text
    assert (disable.json()["value"], disable.json()["limit"]) == ("", None)

    monkeypatch.setenv("PAGERLOOP_DATABASE_URL", store.url.render_as_string(hide_password=False))
    shown = CliRunner().invoke(cli, ["controls", "list"], env={"COLUMNS": "250"})
    assert shown.exit_code == 0, shown.output
    assert "rpm" in shown.output
    assert "300" in shown.output
    assert "alice" in shown.output
    assert "manual" in shown.output
    assert "disable" in shown.output


async def test_post_needs_an_operator_key(api: httpx.AsyncClient, store: Engine) -> None:
    assert (await api.post("/v1/controls", json=body())).status_code == 401
    refused = await api.post("/v1/controls", json=body(), headers=APP)
    assert refused.status_code == 403
    assert controls.active(store, datetime.now(UTC)) == []


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"kind": "throttle"}, "kind"),
        ({"value": "0"}, "value"),
        ({"value": "many"}, "value"),
        ({"value": "²"}, "value"),
        ({"kind": "reroute", "value": ""}, "value"),
        ({"kind": "max_tokens", "value": "1" * 201}, "value"),
        ({"kind": "disable", "feature": None}, "feature"),
        ({"feature": ""}, "feature"),
        ({"model": "m" * 129}, "model"),
        ({"duration_minutes": 0}, "duration_minutes"),
        ({"duration_minutes": 10_081}, "duration_minutes"),
        ({"duration_minutes": "soon"}, "duration_minutes"),
        ({"reason": ""}, "reason"),
        ({"reason": "x" * 1001}, "reason"),
        ({"reason": "nul\x00"}, "reason"),
        ({"incident_id": "i" * 201}, "incident_id"),
        ({"incident_id": "i" * 200, "feature": "f" * 128, "model": "m" * 128}, "incident_id"),
        ({"author": "mallory"}, "author"),
    ],
)
async def test_bad_fields_are_422_naming_them(
    api: httpx.AsyncClient, store: Engine, fields: dict[str, Any], named: str
) -> None:
    sent = {k: v for k, v in body(**fields).items() if v is not None}
    response = await api.post("/v1/controls", json=sent, headers=ALICE)
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith(named), response.json()
    assert controls.active(store, datetime.now(UTC)) == []


async def test_missing_fields_are_named(api: httpx.AsyncClient) -> None:
    for field in ("kind", "duration_minutes", "reason"):
        sent = {k: v for k, v in body().items() if k != field}
        response = await api.post("/v1/controls", json=sent, headers=ALICE)
        assert response.status_code == 422
        assert field in response.json()["detail"]


# --- tied to an incident ---------------------------------------------------------------------


@pytest.fixture
async def incidents(
    time_skipping_env: WorkflowEnvironment, settings: Settings
) -> AsyncIterator[tuple[Stack, httpx.AsyncClient, Engine]]:
    client = time_skipping_env.client
    async with incident_worker(client, settings) as engine:
        stack = Stack(client, settings.task_queue, NotificationPlan(), engine)
        async with make_api(time_skipping_env, engine) as api:
            yield stack, api, engine
        await close_incidents(stack.handles)


async def test_a_control_for_an_incident_goes_on_its_timeline(
    incidents: tuple[Stack, httpx.AsyncClient, Engine],
) -> None:
    stack, api, _ = incidents
    incident_id, handle = await stack.open()
    response = await api.post(
        "/v1/controls", json=body(incident_id=incident_id, kind="tpm", value="90000"), headers=ALICE
    )
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["incident_id"] == incident_id
    assert created["noted"] is True
    timeline = await handle.query(IncidentWorkflow.timeline)
    [note] = [entry for entry in timeline if entry.kind == "note"]
    assert note.actor == "alice"
    assert note.channel == "api"
    assert f"control #{created['id']}" in note.text
    assert "limit feature chat to 90000 tokens per minute" in note.text
    assert "keep under the org's quota" in note.text


async def test_an_unknown_or_resolved_incident_takes_no_control(
    incidents: tuple[Stack, httpx.AsyncClient, Engine],
) -> None:
    stack, api, engine = incidents
    unknown = await api.post(
        "/v1/controls", json=body(incident_id=f"incident-nope-{uuid.uuid4().hex}"), headers=ALICE
    )
    assert unknown.status_code == 404
    assert "no incident" in unknown.json()["detail"]

    incident_id, handle = await stack.open()
    await handle.execute_update(IncidentWorkflow.resolve, ActionRequest("bob", "cli"))
    resolved = await api.post("/v1/controls", json=body(incident_id=incident_id), headers=ALICE)
    assert resolved.status_code == 409
    assert "resolved" in resolved.json()["detail"]

    assert controls.listed(engine, datetime.now(UTC), include_past=True) == []


async def test_the_cli_notes_a_control_on_its_incident_or_refuses_an_unknown_one(
    incidents: tuple[Stack, httpx.AsyncClient, Engine],
    time_skipping_env: WorkflowEnvironment,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stack, _, engine = incidents
    monkeypatch.setenv("PAGERLOOP_DATABASE_URL", engine.url.render_as_string(hide_password=False))
    monkeypatch.setenv(
        "PAGERLOOP_TEMPORAL_ADDRESS", time_skipping_env.client.service_client.config.target_host
    )
    incident_id, handle = await stack.open()

    def run(*args: str) -> Result:
        return CliRunner().invoke(cli, ["controls", "set", *args], env={"COLUMNS": "250"})

    unknown = await asyncio.to_thread(
        run, "concurrency", "--value", "2", "--reason", "r", "--incident", "incident-nope"
    )
    assert unknown.exit_code == 1, unknown.output
    assert "no incident 'incident-nope'" in unknown.output
    assert "no control was set" in unknown.output
    assert controls.listed(engine, datetime.now(UTC), include_past=True) == []

    done = await asyncio.to_thread(
        run, "concurrency", "--feature", "chat", "--value", "2", "--for", "45m",
        "--reason", "shed load", "--incident", incident_id, "--by", "carol",
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    assert "throttle feature chat to 2 calls in flight" in done.output
    [control] = controls.active(engine, datetime.now(UTC))
    assert (control.incident_id, control.set_by) == (incident_id, "carol")
    [note] = [e for e in await handle.query(IncidentWorkflow.timeline) if e.kind == "note"]
    assert (note.actor, note.channel) == ("carol", "cli")
    assert f"control #{control.id} set by hand for 45 min" in note.text

    listed = await asyncio.to_thread(
        CliRunner().invoke, cli, ["controls", "list"], env={"COLUMNS": "250"}
    )
    assert f"{incident_id} (manual)" in listed.output
