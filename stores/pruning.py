"""Pruning in passing: tables that grow with every request (the Slack replay cache, the SDK
instances) are pruned by the requests themselves, at most once a minute per process and store,
so no scheduler is needed and a busy API does not prune on every request."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

log = logging.getLogger(__name__)

PRUNE_EVERY_SECONDS = 60.0


class Pruner:
    def __init__(self, prune: Callable[[Engine, datetime], int], what: str) -> None:
        self.prune = prune
        self.what = what
        self.next_at: dict[str, float] = {}  # engine URL -> monotonic time of the next prune
        self._lock = threading.Lock()

    def in_passing(self, engine: Engine, now: datetime) -> None:
        """Prune when due; a failure only postpones it (the request's answer stands)."""
        where = engine.url.render_as_string(hide_password=True)
        with self._lock:
            due = self.next_at.get(where, 0.0) <= time.monotonic()
            if due:
                self.next_at[where] = time.monotonic() + PRUNE_EVERY_SECONDS
        if due:
            try:
                self.prune(engine, now)
            except SQLAlchemyError as exc:
                log.warning("could not prune %s: %s", self.what, type(exc).__name__)
