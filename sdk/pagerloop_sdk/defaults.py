"""The process-wide recorder `instrument(client)` uses unless it is given one: records over
HTTP to the pagerloop API named by the environment (or by `url=` / `api_key=`)."""

from __future__ import annotations

import logging
import os
import threading

from pagerloop_sdk.http_sink import HttpSink
from pagerloop_sdk.recorder import DEFAULT_SPOOL_MAX_BYTES, Recorder

log = logging.getLogger(__name__)

# `pagerloop dev` serves its API here, and accepts records without a key.
DEV_URL = "http://127.0.0.1:8080"

_lock = threading.Lock()
_recorders: dict[tuple[str, str | None], Recorder] = {}


def http_recorder(url: str | None = None, api_key: str | None = None) -> Recorder:
    """One recorder per API and key, made on first use. The environment supplies what the
    arguments leave out:

    - `PAGERLOOP_URL` (the embedded dev stack's API when unset) and `PAGERLOOP_API_KEY`;
    - `PAGERLOOP_SPOOL_DIR`, `PAGERLOOP_SPOOL_MAX_BYTES`: where records wait on disk while
      the API is away (in memory only when unset);
    - `PAGERLOOP_USER_HASH_SALT`: the salt of the pseudonym that replaces end-user ids before
      they leave the process (for OpenAI's `user` and for pagerloop, which hashes it again);
    - `PAGERLOOP_QUALITY_SAMPLE_RATE` (0.1).

    The API prices the calls with its own price table.
    """
    env = os.environ
    url = url or env.get("PAGERLOOP_URL") or DEV_URL
    api_key = api_key or env.get("PAGERLOOP_API_KEY") or None
    with _lock:
        recorder = _recorders.get((url, api_key))
        if recorder is None:
            if url == DEV_URL and "PAGERLOOP_URL" not in env:
                log.info("PAGERLOOP_URL is unset: sending LLM call records to %s", url)
            recorder = _recorders[(url, api_key)] = Recorder(
                HttpSink(url, api_key),
                salt=env.get("PAGERLOOP_USER_HASH_SALT", ""),
                quality_sample_rate=float(env.get("PAGERLOOP_QUALITY_SAMPLE_RATE", "0.1")),
                spool_dir=env.get("PAGERLOOP_SPOOL_DIR") or None,
                spool_max_bytes=int(env.get("PAGERLOOP_SPOOL_MAX_BYTES", DEFAULT_SPOOL_MAX_BYTES)),
            )
        return recorder
