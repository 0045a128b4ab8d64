"""The SDK's recorder as the server runs it in-process (embedded mode, `pagerloop simulate`):
writing straight into the configured stores, with the server's salt, prices and spool."""

from __future__ import annotations

import logging

from pagerloop_sdk.pricing import PriceTable
from pagerloop_sdk.recorder import Recorder
from sqlalchemy import Engine
from sqlalchemy.exc import InterfaceError, OperationalError

from config import Settings
from instrumentation.store_sink import StoreSink
from stores.engine import PATIENT_LOCK_SECONDS, create_schema, make_engine

log = logging.getLogger(__name__)


def store_recorder(settings: Settings) -> tuple[Recorder, Engine]:
    """A recorder into the stores of `settings`, and their engine. The store may be away: the
    records then wait for it (the schema is made at the first write)."""
    # Bounded waits (PostgreSQL also connects within 30 s): a store that hangs holds the
    # recorder's thread that long at most, then is retried like one that is down.
    engine = make_engine(settings.database_url, lock_timeout_seconds=PATIENT_LOCK_SECONDS)
    try:
        create_schema(engine)
        schema_due = False
    except (OperationalError, InterfaceError) as exc:  # the store is away: not the app
        log.warning("the stores are unavailable (%s): records wait for them", exc)
        schema_due = True
    recorder = Recorder(
        StoreSink(engine, create_schema=schema_due),
        salt=settings.user_hash_salt.get_secret_value(),
        prices=PriceTable.from_file(settings.prices_file),
        quality_sample_rate=settings.quality_sample_rate,
        spool_dir=settings.spool_dir,
        spool_max_bytes=settings.spool_max_bytes,
    )
    return recorder, engine
