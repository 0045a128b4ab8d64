"""The controls in force, as `GET /v1/controls` tells this process.

Polled every `ttl` seconds (2 by default, `PAGERLOOP_CONTROLS_INTERVAL`) with `If-None-Match`,
so an unchanged answer is a 304 of a few bytes. Each process sends its instance id
(`X-Pagerloop-Instance`, random per process); the API counts the live instances and answers
each with its share of every application-wide limit (`concurrency`, `rpm`, `tpm`), so the
shares of all replicas add up to at most the limit. While the API is unreachable the last
controls stay in force, each until its own `expires_at`. `X-Pagerloop-Capabilities` says what
this SDK can enforce (canaries: "fraction").
"""

from __future__ import annotations

import os
import threading
import uuid
from datetime import datetime
from typing import Any

import httpx

from pagerloop_sdk.controls import DEFAULT_TTL, ControlSource, Rule, enforceable

PATH = "/v1/controls"
TIMEOUT = httpx.Timeout(5.0, connect=2.0)
MIN_INTERVAL, MAX_INTERVAL = 0.1, 3.0  # seconds between polls
# What this SDK can enforce beyond the first API's controls. The API serves a canary (a control
# with a fraction) only to an SDK that says "fraction": an older one would apply it to all calls.
CAPABILITIES_HEADER = "X-Pagerloop-Capabilities"
CAPABILITIES = "fraction"


def new_instance_id() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex[:16]}"


def rule_of(item: dict[str, Any]) -> Rule:
    fraction = item.get("fraction")
    return Rule(
        int(item["id"]),
        str(item["kind"]),
        item.get("feature"),
        item.get("model"),
        str(item.get("value") or ""),
        str(item.get("incident_id") or ""),
        str(item.get("reason") or ""),
        datetime.fromisoformat(item["expires_at"]).timestamp(),
        1.0 if fraction is None else float(fraction),
    )


class HttpControls(ControlSource):
    _shared: dict[tuple[str, str | None], HttpControls] = {}
    _shared_lock = threading.Lock()

    def __init__(
        self,
        url: str,
        authorization: str | None,
        ttl: float = DEFAULT_TTL,
        *,
        instance_id: str | None = None,
        client: httpx.Client | None = None,
    ) -> None:
        self.url = url.rstrip("/") + PATH
        self.instance_id = instance_id or new_instance_id()
        self._headers = {"User-Agent": "pagerloop-sdk", CAPABILITIES_HEADER: CAPABILITIES}
        if authorization:
            self._headers["Authorization"] = authorization
        self._client = client or httpx.Client(timeout=TIMEOUT)
        self._etag: str | None = None
        self.instances = 0  # live instances of the application, as the API last counted
        super().__init__(ttl)

    @classmethod
    def shared(cls, url: str, authorization: str | None) -> HttpControls:
        """The process's one source per API and key (one poll per interval, one instance id,
        however many clients)."""
        with cls._shared_lock:
            key = (url, authorization)
            source = cls._shared.get(key)
            if source is None:
                ttl = float(os.environ.get("PAGERLOOP_CONTROLS_INTERVAL", DEFAULT_TTL))
                # The API counts an instance live for 10 s after its poll, and lets a newcomer
                # take its share 5 s after its first: older ones must have polled by then.
                ttl = min(max(ttl, MIN_INTERVAL), MAX_INTERVAL)
                source = cls._shared[key] = cls(url, authorization, ttl)
            return source

    def read(self) -> tuple[Rule, ...] | None:
        headers = {**self._headers, "X-Pagerloop-Instance": self.instance_id}
        if self._etag:
            headers["If-None-Match"] = self._etag
        response = self._client.get(self.url, headers=headers)
        if response.status_code == 304:
            return None
        response.raise_for_status()
        body = response.json()
        rules = enforceable([rule_of(item) for item in body["controls"]], shares=True)
        # Only once the answer is understood: a 304 must stand for controls actually applied.
        self._etag = response.headers.get("etag")
        self.instances = int(body.get("instances") or 0)
        return rules

    def after_fork(self) -> None:
        # A forked child is another instance with its own share, and must not use the
        # parent's connections.
        self.instance_id = new_instance_id()
        self._etag = None
        self._client = httpx.Client(timeout=TIMEOUT)
