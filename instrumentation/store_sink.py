"""The SDK's recorder writing straight into the stores (SQLite file or PostgreSQL): what the
server runs in-process (embedded mode, `pagerloop simulate`, tests). Apps send over HTTP
instead (`pagerloop_sdk.http_sink`)."""

from __future__ import annotations

from collections.abc import Sequence

from pagerloop_sdk.recorder import RecordsRefusedError
from pagerloop_sdk.records import CallRecord, ScoreRecord
from sqlalchemy import Engine
from sqlalchemy.exc import DataError, IntegrityError

from stores.engine import create_schema
from stores.quality import write_scores
from stores.writer import write_calls


class StoreSink:
    """With `create_schema`, the first write creates (or upgrades) the stores' tables first:
    for a recorder made while the store was away."""

    def __init__(self, engine: Engine, *, create_schema: bool = False) -> None:
        self.engine = engine
        self._schema_due = create_schema

    def write(self, calls: Sequence[CallRecord], scores: Sequence[ScoreRecord]) -> None:
        if self._schema_due:
            create_schema(self.engine)
            self._schema_due = False
        try:
            write_calls(self.engine, calls)
            write_scores(self.engine, scores)
        except (DataError, IntegrityError) as exc:
            # A value the store cannot take, a constraint it breaks: for good, not a retry.
            raise RecordsRefusedError(str(exc)) from exc

    def controls(self) -> object:
        """The controls to enforce for calls recorded here: the same store's."""
        from instrumentation.store_controls import source_for

        return source_for(self.engine)
