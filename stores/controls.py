"""Runbook controls: what a runbook (or a responder) changed about how the application calls
OpenAI, until when, and why. The app's instrumentation enforces the active ones (read over
`GET /v1/controls`, or from the store in embedded mode).

One row per idempotency key (`<incident>/<kind>/<feature or *>/<model or *>`): setting a
control again refreshes that row, so a retried activity never leaves two behind. A control is
active while it is not reverted and its expiry is ahead; expired rows stay for the record.

Controls set by hand (`POST /v1/controls`, `pagerloop controls set`) have keys of their own,
`manual:<incident or "manual">/<kind>/<feature or *>/<model or *>`: a runbook setting the same
kind on the same target refreshes its own row, never the person's, and a runbook rolling its
controls back (by key) leaves them alone. A manual control tied to an incident is reverted
with the incident's controls when it resolves (`revert` without keys), but the incident's
keep-alive (`extend`) does not push its expiry back: it lasts what the person asked for.

A control with a `fraction` is a canary: it applies to that share of the calls in its target,
chosen per session by the SDK (pagerloop_sdk.controls), which tags each call of the slice
`canary#<id>`. Only SDKs that say they can slice get it from `GET /v1/controls`.

`concurrency`, `rpm` and `tpm` are limits of the whole application; `GET /v1/controls` hands
each app instance its share (stores.instances).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from pagerloop_sdk import controls as sdk_controls
from pagerloop_sdk.endpoints import split_route
from sqlalchemy import Column, DateTime, Engine, Float, Index, update
from sqlmodel import Field, Session, SQLModel, col, select

from stores import dialect
from stores.llm_calls import big, utc

# The kinds, which take a count, and which are limits of the whole application shared out among
# its live instances: as the SDK that enforces them knows them.
KINDS = sdk_controls.KINDS
COUNTED = sdk_controls.COUNTED
SHARED = sdk_controls.SHARED
# The largest count a control may carry: far above any real limit (OpenAI's largest tiers
# allow tens of millions of tokens per minute), far inside 64 bits.
COUNT_MAX = 10**12
KEY_MAX = 400
# The incident id of a manual control tied to no incident, and the key prefix of every manual one.
MANUAL = "manual"
MANUAL_PREFIX = "manual:"


def _ts(nullable: bool = False) -> Any:
    return Field(
        default=None if nullable else ...,
        sa_column=Column(DateTime(timezone=True), nullable=nullable),
    )


class Control(SQLModel, table=True):
    __tablename__ = "controls"
    __table_args__ = (Index("ix_controls_incident_id", "incident_id"),)

    id: int | None = big(None, primary_key=True)
    key: str = Field(max_length=KEY_MAX, unique=True)
    kind: str = Field(max_length=32)
    feature: str | None = Field(default=None, max_length=128)  # None: any feature
    model: str | None = Field(default=None, max_length=128)  # None: any model
    value: str = Field(default="", max_length=200)
    # The share of the calls in its target it applies to (a canary); None: all of them.
    fraction: float | None = Field(default=None, sa_column=Column(Float, nullable=True))
    incident_id: str = Field(max_length=200)
    reason: str = Field(default="", max_length=1000)
    set_by: str = Field(max_length=128)
    created_at: datetime = _ts()
    updated_at: datetime = _ts()
    expires_at: datetime = _ts()
    reverted_at: datetime | None = _ts(nullable=True)
    reverted_by: str | None = Field(default=None, max_length=128)
    revert_reason: str | None = Field(default=None, max_length=1000)

    def active_at(self, when: datetime) -> bool:
        return self.reverted_at is None and utc(self.expires_at) > utc(when)

    @property
    def target(self) -> str:
        return target(self.feature, self.model)

    @property
    def description(self) -> str:
        return describe(self.kind, self.feature, self.model, self.value, self.fraction)

    @property
    def manual(self) -> bool:
        """Set by hand (the API or the CLI), not by a runbook."""
        return self.key.startswith(MANUAL_PREFIX)


def control_key(incident_id: str, kind: str, feature: str | None, model: str | None) -> str:
    return f"{incident_id}/{kind}/{feature or '*'}/{model or '*'}"


def manual_key(incident_id: str | None, kind: str, feature: str | None, model: str | None) -> str:
    return MANUAL_PREFIX + control_key(incident_id or MANUAL, kind, feature, model)


def target(feature: str | None, model: str | None) -> str:
    parts = [f"feature {feature}" if feature else "", f"model {model}" if model else ""]
    return ", ".join(p for p in parts if p) or "all calls"


def describe(
    kind: str, feature: str | None, model: str | None, value: str, fraction: float | None = None
) -> str:
    """One line for Slack, Jira and the CLI."""
    return _what(kind, feature, model, value) + canary_text(fraction)


def percent(fraction: float) -> str:
    """0.1 -> "10%", 0.025 -> "2.5%" (two decimals at most, no float noise)."""
    return f"{round(fraction * 100, 2):g}%"


def canary_text(fraction: float | None) -> str:
    return "" if fraction is None else f" on {percent(fraction)} of the traffic (canary)"


def _what(kind: str, feature: str | None, model: str | None, value: str) -> str:
    where = target(feature, model)
    scope = f" ({target(feature, None)})" if feature else ""
    if kind == "concurrency":
        return f"throttle {where} to {value} calls in flight"
    if kind == "rpm":
        return f"limit {where} to {value} requests per minute"
    if kind == "tpm":
        return f"limit {where} to {value} tokens per minute"
    if kind in ("reroute", "pin"):
        verb = "reroute" if kind == "reroute" else "pin"
        instead, endpoint = split_route(value)
        at = f" at endpoint {endpoint}" if endpoint is not None else ""
        return f"{verb} {model or 'any model'} -> {instead}{at}{scope}"
    if kind == "max_tokens":
        return f"cap output tokens at {value} for {where}"
    if kind == "disable":
        return f"disable {where}"
    if kind == "cache":
        return f"serve repeated requests from cache for {where}"
    if kind == "backoff":
        return f"back off on 429s, up to {value} attempts, for {where}"
    if kind == "queue":
        return f"queue {where} at {value} requests per minute"
    if kind == "validate":
        return f"validate output of {where} with check {value}, retry once"
    return f"{kind} {value} for {where}"


def validate(kind: str, value: str) -> str | None:
    """Why a control cannot be enforced, or None when it can. A `validate` control's check is
    only checked for its form here: whether the app knows it is the app's to say (its SDK skips
    a check it does not know)."""
    problem = sdk_controls.problem(kind, value)
    if problem is None and kind in COUNTED and int(value) > COUNT_MAX:
        return f"a {kind} control needs a whole number from 1 to {COUNT_MAX}, not {value!r}"
    return problem


def fraction_problem(fraction: float | None) -> str | None:
    """Why a control cannot apply to `fraction` of its traffic, or None when it can (None:
    all of it)."""
    if fraction is None or 0 < fraction < 1:  # NaN fails both comparisons
        return None
    return f"a canary's fraction is between 0 and 1 (exclusive), not {fraction!r}"


def upsert(
    engine: Engine,
    *,
    incident_id: str,
    kind: str,
    feature: str | None,
    model: str | None,
    value: str,
    reason: str,
    set_by: str,
    expires_at: datetime,
    now: datetime,
    key: str | None = None,
    fraction: float | None = None,
) -> Control:
    """Set a control, idempotently: the same key refreshes its value, reason, expiry and
    fraction, and brings a reverted one back. One statement, so concurrent retries cannot
    collide. The key is the runbook's (`control_key`) unless given; it leaves the fraction out,
    so setting a canary again with `fraction=None` promotes that same control to all traffic."""
    now, expires_at = utc(now), utc(expires_at)
    key = key or control_key(incident_id, kind, feature, model)
    refreshed = {
        "value": value,
        "fraction": fraction,
        "reason": reason,
        "set_by": set_by,
        "updated_at": now,
        "expires_at": expires_at,
        "reverted_at": None,
        "reverted_by": None,
        "revert_reason": None,
    }
    statement = dialect.insert(engine)(Control).values(
        key=key,
        kind=kind,
        feature=feature,
        model=model,
        incident_id=incident_id,
        created_at=now,
        **refreshed,
    )
    statement = statement.on_conflict_do_update(index_elements=["key"], set_=refreshed)
    with Session(engine) as session:
        session.execute(statement)
        session.commit()
        return session.exec(select(Control).where(Control.key == key)).one()


def set_manual(
    engine: Engine,
    *,
    incident_id: str | None,
    kind: str,
    feature: str | None,
    model: str | None,
    value: str,
    reason: str,
    set_by: str,
    expires_at: datetime,
    now: datetime,
    fraction: float | None = None,
) -> Control:
    """Set a control by hand (idempotently, on its `manual_key`), for `incident_id` or for
    none (`MANUAL`). Setting the same kind on the same target again refreshes it."""
    return upsert(
        engine,
        incident_id=incident_id or MANUAL,
        kind=kind,
        feature=feature,
        model=model,
        value=value,
        reason=reason,
        set_by=set_by,
        expires_at=expires_at,
        now=now,
        key=manual_key(incident_id, kind, feature, model),
        fraction=fraction,
    )


def _revert(
    engine: Engine, where: Sequence[Any], now: datetime, reverted_by: str, reason: str
) -> list[Control]:
    now = utc(now)
    # UPDATE ... RETURNING: of two concurrent reverts, each row is reported by one only.
    statement = (
        update(Control)
        .where(col(Control.reverted_at).is_(None), col(Control.expires_at) > now, *where)
        .values(reverted_at=now, reverted_by=reverted_by, revert_reason=reason or None)
        .returning(Control)
    )
    with Session(engine) as session:
        reverted = list(session.scalars(statement))
        session.commit()
        for control in reverted:
            session.refresh(control)
    return sorted(reverted, key=lambda c: c.id or 0)


def revert(
    engine: Engine,
    incident_id: str,
    now: datetime,
    *,
    keys: Sequence[str] | None = None,
    reverted_by: str = "pagerloop",
    reason: str = "",
) -> list[Control]:
    """Revert the incident's active controls (or those of `keys`); returns those reverted by
    this call, so a retry reverts and reports nothing twice."""
    where: list[Any] = [Control.incident_id == incident_id]
    if keys is not None:
        if not keys:
            return []
        where.append(col(Control.key).in_(list(keys)))
    return _revert(engine, where, now, reverted_by, reason)


def revert_id(
    engine: Engine, control_id: int, now: datetime, *, reverted_by: str, reason: str = ""
) -> tuple[Control, bool] | None:
    """Revert one control by id: the control and whether this call reverted it (False: it was
    not in force); None when there is no such control."""
    reverted = _revert(engine, [Control.id == control_id], now, reverted_by, reason)
    if reverted:
        return reverted[0], True
    with Session(engine) as session:
        control = session.get(Control, control_id)
    return None if control is None else (control, False)


def extend(engine: Engine, incident_id: str, now: datetime, until: datetime) -> list[Control]:
    """Push the expiry of the incident's runbook controls in force to `until` (never earlier);
    its manual ones keep the expiry they were given. Returns all its controls in force."""
    now, until = utc(now), utc(until)
    statement = (
        update(Control)
        .where(
            col(Control.incident_id) == incident_id,
            col(Control.key).not_like(f"{MANUAL_PREFIX}%"),
            col(Control.reverted_at).is_(None),
            col(Control.expires_at) > now,
            col(Control.expires_at) < until,
        )
        .values(expires_at=until, updated_at=now)
    )
    with Session(engine) as session:
        session.execute(statement)
        session.commit()
    return active(engine, now, incident_id)


def active(engine: Engine, now: datetime, incident_id: str | None = None) -> list[Control]:
    query = select(Control).where(
        col(Control.reverted_at).is_(None), col(Control.expires_at) > utc(now)
    )
    if incident_id is not None:
        query = query.where(Control.incident_id == incident_id)
    with Session(engine) as session:
        return list(session.exec(query.order_by(col(Control.id))))


def listed(engine: Engine, now: datetime, include_past: bool = False) -> list[Control]:
    """The active controls, or every control ever set (newest first) with `include_past`."""
    if not include_past:
        return active(engine, now)
    with Session(engine) as session:
        return list(session.exec(select(Control).order_by(col(Control.id).desc())))
