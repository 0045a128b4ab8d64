"""The process-wide recorder `instrument(client)` uses unless it is given one."""

from __future__ import annotations

import threading

from config import load_settings
from instrumentation.pricing import PriceTable
from instrumentation.recorder import Recorder, StoreSink
from stores.engine import create_schema, make_engine

_lock = threading.Lock()
_recorder: Recorder | None = None


def default_recorder() -> Recorder:
    """Writes to the stores of `PAGERLOOP_DATABASE_URL`, with the salt, sample rate and prices
    of the environment; created on first use."""
    global _recorder
    with _lock:
        if _recorder is None:
            settings = load_settings()
            engine = make_engine(settings.database_url)
            create_schema(engine)
            _recorder = Recorder(
                StoreSink(engine),
                salt=settings.user_hash_salt.get_secret_value(),
                prices=PriceTable.from_file(settings.prices_file),
                quality_sample_rate=settings.quality_sample_rate,
            )
        return _recorder
