"""The SDK's controls read straight from the stores: what the server's in-process clients
enforce (embedded mode, `pagerloop simulate`, tests). Apps poll `GET /v1/controls` instead
(`pagerloop_sdk.http_controls`), which splits the application-wide limits between them."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable
from datetime import UTC, datetime

from pagerloop_sdk.controls import DEFAULT_TTL, ControlSource, Rule, enforceable
from sqlalchemy import Engine

from stores import controls as store
from stores.llm_calls import utc


def rules_from(rows: Iterable[store.Control]) -> tuple[Rule, ...]:
    """The enforceable rules of store rows; a row that cannot be enforced is skipped."""
    return enforceable(
        Rule(
            row.id,
            row.kind,
            row.feature,
            row.model,
            row.value,
            row.incident_id,
            row.reason,
            utc(row.expires_at).timestamp(),
            1.0 if row.fraction is None else row.fraction,
        )
        for row in rows
        if row.id is not None
    )


class StoreControls(ControlSource):
    """The active controls of one store: this process is the whole application, so a limit
    is its own."""

    def __init__(self, engine: Engine, ttl: float = DEFAULT_TTL) -> None:
        self.engine = engine
        super().__init__(ttl)

    def read(self) -> tuple[Rule, ...]:
        return rules_from(store.active(self.engine, datetime.now(UTC)))

    def after_fork(self) -> None:
        self.engine.dispose(close=False)


_by_engine: weakref.WeakValueDictionary[int, StoreControls] = weakref.WeakValueDictionary()
_by_engine_lock = threading.Lock()


def source_for(engine: Engine) -> StoreControls:
    """The process's one source for `engine` (one store read per TTL, however many clients)."""
    with _by_engine_lock:
        source = _by_engine.get(id(engine))
        if source is None or source.engine is not engine:
            source = _by_engine[id(engine)] = StoreControls(engine)
        return source
