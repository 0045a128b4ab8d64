"""The response cache an app opts into with `instrument(client, response_cache=N)`.

Filled always, served only under a `cache` control. Every successful non-streamed response of
such a client is kept (the last N requests, least recently used out), whatever controls are in
force, so that the answers are there when they are needed: when OpenAI is down, every call
fails and nothing could be cached any more. A `cache` control (the api_outage runbook's "serve
cached responses") serves them while it is in force, for the calls it matches, and only
answers younger than the cache's `max_age` (DEFAULT_MAX_AGE, 24 h, unless the app chose
another): past that an answer is too stale to pass for a fresh one, and the call goes to
OpenAI instead.

The key is the request as it is sent (after the controls rewrote it: a rerouted or capped
request is another request), but without the user and metadata the instrumentation adds,
which vary per session while the answer does not. It does not name any control, so answers
kept before an incident serve during it.

Entries are kept pickled: one C-level pass on the caller's path (about 9 us for a chat
completion, half a deep copy; a tenth of one for embeddings), immutable whatever the caller
later does to its response, each hit a fresh object, and their size known: besides N entries,
the cache holds at most `max_bytes` (DEFAULT_MAX_BYTES, 64 MiB). The pickles never leave the
process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_MAX_AGE = 24 * 3600.0  # seconds: older answers are not served
DEFAULT_MAX_BYTES = 64 << 20  # whatever N says: a few large responses must not eat the heap


def _canonical(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return dump()
    return repr(value)


# One encoder for every key: json.dumps would build it again per call.
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=_canonical)


def cache_key(operation: str, kwargs: Mapping[str, Any]) -> str:
    """Identical requests, whatever their keyword order, share a key."""
    canonical = _ENCODER.encode([operation, kwargs])
    return hashlib.blake2b(canonical.encode(), digest_size=16).hexdigest()


class ResponseCache:
    """The responses to the last `size` requests by key (at most `max_bytes` of them, kept
    pickled), each served for `max_age` seconds after it was answered. Callers get copies: one
    caller mutating its response cannot change what the next one is served."""

    def __init__(
        self,
        size: int,
        max_age: float = DEFAULT_MAX_AGE,
        max_bytes: int = DEFAULT_MAX_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if size <= 0 or max_age <= 0 or max_bytes <= 0:
            raise ValueError("a response cache needs a positive size, max_age and max_bytes")
        self.size = size
        self.max_age = max_age
        self.max_bytes = max_bytes
        self._clock = clock
        self._items: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        _CACHES.add(self)

    def get(self, key: str) -> Any | None:
        """A copy of the answer to `key`, or None when there is none young enough."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            answered, data = item
            if self._clock() - answered > self.max_age:
                self._drop(key)
                return None
            self._items.move_to_end(key)
            self.hits += 1
        return pickle.loads(data)  # noqa: S301 (our own pickle, made in this process)

    def put(self, key: str, response: Any) -> None:
        try:
            data = pickle.dumps(response, pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # an odd response type: not cached, the call is unaffected
            _warn_once(type(response), exc)
            return
        answered = self._clock()
        with self._lock:
            if key in self._items:
                self._drop(key)
            if len(data) > self.max_bytes:
                return  # would push out everything else
            self._items[key] = (answered, data)
            self._bytes += len(data)
            while len(self._items) > self.size or self._bytes > self.max_bytes:
                self._drop(next(iter(self._items)))  # the least recently used

    def _drop(self, key: str) -> None:
        _, data = self._items.pop(key)
        self._bytes -= len(data)

    def __len__(self) -> int:
        return len(self._items)


_CACHES: weakref.WeakSet[ResponseCache] = weakref.WeakSet()
_unpicklable: set[type] = set()


def _warn_once(kind: type, exc: Exception) -> None:
    if kind not in _unpicklable:
        _unpicklable.add(kind)
        log.warning("responses of type %s cannot be cached: %s", kind.__qualname__, exc)


def _after_fork_in_child() -> None:
    # The parent's threads are gone and a lock may be held: the child gets fresh locks.
    for cache in list(_CACHES):
        cache._lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
