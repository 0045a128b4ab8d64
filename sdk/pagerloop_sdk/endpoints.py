"""Fallback endpoints: where a `reroute` or `pin` control whose value is `model@name` sends the
call (another OpenAI-compatible base URL, or an Azure OpenAI resource) instead of the app's own
client.

The app names its endpoints in its own process, so no key ever reaches the pagerloop server:

    PAGERLOOP_ENDPOINT_AZURE_EAST_BASE_URL=https://my-resource.openai.azure.com
    PAGERLOOP_ENDPOINT_AZURE_EAST_API_KEY=...
    PAGERLOOP_ENDPOINT_AZURE_EAST_API_VERSION=2024-10-21   # set: Azure OpenAI

or `register_endpoint("azure-east", base_url=..., api_key=..., api_version=...)`. The name in
the variables is the endpoint's, upper-cased, `-` as `_`. With an API version the endpoint is an
Azure OpenAI resource: the model part of the control's value is the deployment name.

One openai client is built per endpoint (sync and async apart) on first use, and copied per
(timeout, max_retries) of the calling client, so a rerouted call gives up when the app's own
would have. A route to an endpoint this process does not know is not followed
(`pagerloop_sdk.enforce.routed`), and neither is one without an http(s) base URL or a key.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import openai

from pagerloop_sdk.openai_hooks import hook_responses

NAME = re.compile(r"[a-z0-9_-]{1,40}")
ENV_PREFIX = "PAGERLOOP_ENDPOINT_"


@dataclass(frozen=True)
class Endpoint:
    name: str
    base_url: str
    # Always its own: the openai client would fall back to OPENAI_API_KEY, a key meant for
    # OpenAI, which must not go to another host.
    api_key: str = field(default="", repr=False)
    api_version: str | None = None

    @property
    def azure(self) -> bool:
        return self.api_version is not None


def split_route(value: str) -> tuple[str, str | None]:
    """`gpt-4.1-mini@azure-east` -> ("gpt-4.1-mini", "azure-east"); `gpt-4.1` -> ("gpt-4.1",
    None)."""
    model, sep, name = value.partition("@")
    return model, (name if sep else None)


def route_problem(kind: str, value: str) -> str | None:
    """Why a reroute / pin value cannot be enforced, or None."""
    model, name = split_route(value)
    if not model:
        return f"a {kind} control needs the model to use instead"
    if name is not None and not NAME.fullmatch(name):
        return (
            f"a {kind} control's endpoint (after '@') is 1 to 40 of a-z, 0-9, '_' and '-', "
            f"not {name[:60]!r}"
        )
    return None


_registered: dict[str, Endpoint] = {}
_lock = threading.Lock()
# (endpoint, async, max_retries, timeout) -> client; a changed configuration builds anew.
_clients: dict[tuple[Endpoint, bool, int, str], Any] = {}


def register_endpoint(
    name: str, *, base_url: str, api_key: str, api_version: str | None = None
) -> None:
    """Name an endpoint for `model@name` routes (it wins over the environment's of that name)."""
    if not NAME.fullmatch(name):
        raise ValueError(f"an endpoint name is 1 to 40 of a-z, 0-9, '_' and '-', not {name!r}")
    problem = _problem(base_url, api_key)
    if problem is not None:
        raise ValueError(f"endpoint {name!r}: {problem}")
    with _lock:
        _registered[name] = Endpoint(name, base_url, api_key, api_version or None)


def _problem(base_url: str, api_key: str) -> str | None:
    """Why an endpoint cannot take calls: checked before a route is followed, so that a call
    is never sent to an address that could only fail."""
    try:
        parts = urlsplit(base_url)
        usable = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError:
        usable = False
    if not usable:
        return "base_url is not an http(s) URL with a host"
    if not api_key:
        return "no api_key"
    return None


def unregister_endpoint(name: str) -> None:
    with _lock:
        _registered.pop(name, None)


def env_prefix(name: str) -> str:
    return f"{ENV_PREFIX}{name.upper().replace('-', '_')}_"


def configured(name: str) -> Endpoint | None:
    """The endpoint of that name in this process (registered, else from the environment), or
    None when there is none that can take calls."""
    found = _registered.get(name)
    if found is not None:
        return found
    prefix = env_prefix(name)
    base_url = os.environ.get(prefix + "BASE_URL", "")
    api_key = os.environ.get(prefix + "API_KEY", "")
    if _problem(base_url, api_key) is not None:
        return None
    return Endpoint(name, base_url, api_key, os.environ.get(prefix + "API_VERSION") or None)


def client_for(endpoint: Endpoint, is_async: bool, timeout: Any, max_retries: int) -> Any:
    """The openai client that sends to `endpoint`, with the caller's timeout and retries; its
    HTTP responses are noted for the call in progress like the app's own client's."""
    key = (endpoint, is_async, max_retries, repr(timeout))
    client = _clients.get(key)
    if client is not None:
        return client
    with _lock:
        client = _clients.get(key)
        if client is None:
            for stale in [k for k in _clients if k[0].name == endpoint.name and k[0] != endpoint]:
                del _clients[stale]
            client = _build(endpoint, is_async, timeout, max_retries)
            _clients[key] = client
    return client


def _build(endpoint: Endpoint, is_async: bool, timeout: Any, max_retries: int) -> Any:
    options: dict[str, Any] = {"api_key": endpoint.api_key, "max_retries": max_retries}
    if timeout is not None:
        options["timeout"] = timeout
    client: Any
    if endpoint.azure:
        azure = openai.AsyncAzureOpenAI if is_async else openai.AzureOpenAI
        client = azure(
            azure_endpoint=endpoint.base_url, api_version=endpoint.api_version, **options
        )
    else:
        plain = openai.AsyncOpenAI if is_async else openai.OpenAI
        client = plain(base_url=endpoint.base_url, **options)
    hook_responses(client)
    return client


def _after_fork_in_child() -> None:
    # A child must not share the parent's connections (nor a lock the parent may hold).
    global _lock
    _lock = threading.Lock()
    _clients.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
