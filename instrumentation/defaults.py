"""The process-wide recorder `instrument(client)` uses unless it is given one."""

from __future__ import annotations

import logging
import threading

from sqlalchemy.exc import InterfaceError, OperationalError

from config import load_settings
from instrumentation.pricing import PriceTable
from instrumentation.recorder import Recorder, StoreSink
from stores.engine import PATIENT_LOCK_SECONDS, create_schema, make_engine

log = logging.getLogger(__name__)
_lock = threading.Lock()
_recorder: Recorder | None = None


def default_recorder() -> Recorder:
    """Writes to the stores of `PAGERLOOP_DATABASE_URL`, with the salt, sample rate, prices and
    spool directory of the environment; created on first use."""
    global _recorder
    with _lock:
        if _recorder is None:
            settings = load_settings()
            # Bounded waits (PostgreSQL also connects within 30 s): a store that hangs holds the
            # recorder's thread that long at most, then is retried like one that is down.
            engine = make_engine(settings.database_url, lock_timeout_seconds=PATIENT_LOCK_SECONDS)
            try:
                create_schema(engine)
                schema_due = False
            except (OperationalError, InterfaceError) as exc:  # the store is away: not the app
                log.warning("the stores are unavailable (%s): records wait for them", exc)
                schema_due = True
            _recorder = Recorder(
                StoreSink(engine, create_schema=schema_due),
                salt=settings.user_hash_salt.get_secret_value(),
                prices=PriceTable.from_file(settings.prices_file),
                quality_sample_rate=settings.quality_sample_rate,
                spool_dir=settings.spool_dir,
                spool_max_bytes=settings.spool_max_bytes,
            )
        return _recorder
