"""The app instances polling `GET /v1/controls`, and each one's share of an app-wide limit.

`concurrency`, `rpm` and `tpm` controls limit the whole application, however many processes
(replicas, workers) it runs. Every process of the app polls the API every couple of seconds
with an instance id of its own; each poll records the instance here (`touch`), and the live
instances split the limit between them (`share`). Several API replicas share this table, so
they hand out the same shares.

An instance is live until LIVE_SECONDS after its last poll; rows unseen for PRUNE_AFTER are
deleted (at most once a minute per process, in passing, by `poll`), so the table stays as
small as the fleet. An instance that comes back after it stopped being live counts as new
again (its `first_seen` restarts), since the others' shares no longer leave room for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import Column, DateTime, Engine, Index, case, delete, select
from sqlmodel import Field, SQLModel, col

from stores import dialect
from stores.llm_calls import utc
from stores.pruning import Pruner

INSTANCE_ID_MAX = 128
# An instance stops counting this long after its last poll (the SDK polls every 2 s).
LIVE_SECONDS = 10.0
# A newcomer gets nothing this long, while the older instances shrink to make room for it at
# their next poll: the app runs below its limit for a few seconds, never above it.
SETTLE_SECONDS = 5.0
PRUNE_AFTER = timedelta(days=1)

# (instance_id, first_seen) of a live instance.
Live = tuple[str, datetime]


class SdkInstance(SQLModel, table=True):
    __tablename__ = "sdk_instances"
    __table_args__ = (Index("ix_sdk_instances_last_seen", "last_seen"),)

    instance_id: str = Field(primary_key=True, max_length=INSTANCE_ID_MAX)
    first_seen: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))
    last_seen: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


# --- the share of one instance (pure) ------------------------------------------------------


def share(
    limit: int,
    instance_id: str,
    live: Sequence[Live],
    now: datetime,
    settle: float = SETTLE_SECONDS,
) -> int:
    """This instance's part of an app-wide `limit`, given the live instances.

    The live instances in order of (first_seen, instance_id) split the limit evenly, the
    first ones getting the remainder: 4 over 3 instances is 2, 1, 1; 2 over 3 is 1, 1, 0. A
    newcomer (first seen less than `settle` seconds ago) gets 0 while another instance first
    seen no later than it is live, and its part goes to nobody: the older instances still hold
    shares computed without it until their next poll (which must come sooner than `settle`).
    The shares of the live instances never add up to more than the limit, nor do the shares
    held across a join (an instance's part only shrinks as instances join). An instance
    missing from `live` counts as first seen `now`.
    """
    if limit <= 0:
        return 0
    seen = {name: utc(first) for name, first in live}
    now = utc(now)
    seen.setdefault(instance_id, now)
    mine = seen[instance_id]
    if mine > now - timedelta(seconds=settle) and any(
        first <= mine for name, first in seen.items() if name != instance_id
    ):
        return 0  # two joining at the same instant both wait: neither is older
    order = sorted(seen.items(), key=lambda item: (item[1], item[0]))
    position = next(i for i, (name, _) in enumerate(order) if name == instance_id)
    base, extra = divmod(limit, len(order))
    return base + (1 if position < extra else 0)


# --- the registry ----------------------------------------------------------------------------


def touch(engine: Engine, instance_id: str, now: datetime) -> None:
    """Record a poll of `instance_id` at `now` (one upsert). Its `last_seen` never goes back
    (API replicas' clocks differ a little); its `first_seen` restarts when it was not live."""
    now = utc(now)
    table = SdkInstance.__table__  # type: ignore[attr-defined]
    statement = dialect.insert(engine)(table).values(
        instance_id=instance_id, first_seen=now, last_seen=now
    )
    gone = table.c.last_seen <= now - timedelta(seconds=LIVE_SECONDS)
    statement = statement.on_conflict_do_update(
        index_elements=[table.c.instance_id],
        set_={
            # Evaluated on the row as it was: both see the old last_seen.
            "first_seen": case((gone, statement.excluded.first_seen), else_=table.c.first_seen),
            "last_seen": case(
                (table.c.last_seen < statement.excluded.last_seen, statement.excluded.last_seen),
                else_=table.c.last_seen,
            ),
        },
    )
    with engine.begin() as connection:
        connection.execute(statement)


def live(engine: Engine, now: datetime, within: float = LIVE_SECONDS) -> list[Live]:
    """(instance_id, first_seen) of the instances seen in the last `within` seconds, oldest
    first."""
    since = utc(now) - timedelta(seconds=within)
    query = (
        select(col(SdkInstance.instance_id), col(SdkInstance.first_seen))
        .where(col(SdkInstance.last_seen) > since)
        .order_by(col(SdkInstance.first_seen), col(SdkInstance.instance_id))
    )
    with engine.connect() as connection:
        return [(name, utc(first)) for name, first in connection.execute(query)]


def prune(engine: Engine, now: datetime, older_than: timedelta = PRUNE_AFTER) -> int:
    """Delete the instances unseen for `older_than`; returns how many."""
    statement = delete(SdkInstance).where(col(SdkInstance.last_seen) < utc(now) - older_than)
    with engine.begin() as connection:
        return int(connection.execute(statement).rowcount)


_pruner = Pruner(prune, "departed SDK instances")


def poll(engine: Engine, instance_id: str, now: datetime) -> list[Live]:
    """`touch`, then the live instances (this one among them); and, at most once every
    PRUNE_EVERY_SECONDS per process and store, a prune of the long-gone ones (whose failure
    only postpones it)."""
    touch(engine, instance_id, now)
    found = live(engine, now)
    _pruner.in_passing(engine, now)
    return found
