"""Who may call what: apps hold ingest keys, people and their tools hold operator keys.

An ingest key writes records; it cannot silence, set controls or act on incidents (403 there).
An operator key is `name:key`; the name, not anything the caller sends, is the author recorded.
Keys are compared in constant time and checked before a body is read.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import Depends, Header, HTTPException, status
from pydantic import SecretStr

from api.deps import Services, services
from api.telemetry import REJECTED_REQUESTS

DEV_OPERATOR = "dev"
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def _bearer(authorization: str | None) -> str | None:
    scheme, _, presented = (authorization or "").partition(" ")
    return presented.strip() if scheme.lower() == "bearer" and presented.strip() else None


def _matches(presented: str, key: SecretStr) -> bool:
    # Non-ASCII text is fine to compare as UTF-8 bytes; compare_digest refuses non-ASCII str.
    return hmac.compare_digest(presented.encode(), key.get_secret_value().encode())


def _operator_named(svc: Services, presented: str) -> str | None:
    found = None
    for name, key in svc.settings.operator_api_keys.items():
        if _matches(presented, key):
            found = name  # no early exit: the time taken says nothing about which key
    return found


def _is_ingest_key(svc: Services, presented: str) -> bool:
    return any([_matches(presented, key) for key in svc.settings.ingest_api_keys])


def _unauthorized(endpoint: str, reason: str, message: str) -> HTTPException:
    REJECTED_REQUESTS.labels(endpoint, reason).inc()
    return HTTPException(status.HTTP_401_UNAUTHORIZED, message, headers=_CHALLENGE)


def require_ingest_key(
    svc: Annotated[Services, Depends(services)],
    authorization: Annotated[str | None, Header()] = None,
) -> None:
    if not svc.settings.ingest_api_keys:
        if svc.settings.dev_mode:
            return
        raise _unauthorized(
            "ingest", "disabled", "ingest is disabled: set PAGERLOOP_INGEST_API_KEYS"
        )
    presented = _bearer(authorization)
    if presented is None or not _is_ingest_key(svc, presented):
        raise _unauthorized(
            "ingest", "bad_key", "a valid bearer key is required (Authorization: Bearer <key>)"
        )


def require_operator(
    svc: Annotated[Services, Depends(services)],
    authorization: Annotated[str | None, Header()] = None,
) -> str:
    """The operator's name; 403 for an app's ingest key, 401 for anything else."""
    presented = _bearer(authorization)
    if not svc.settings.operator_api_keys:
        if svc.settings.dev_mode:
            return DEV_OPERATOR
        raise _unauthorized(
            "operator", "disabled", "operator actions are disabled: set PAGERLOOP_OPERATOR_API_KEYS"
        )
    name = _operator_named(svc, presented) if presented else None
    if name is not None:
        return name
    if presented is not None and _is_ingest_key(svc, presented):
        REJECTED_REQUESTS.labels("operator", "ingest_key").inc()
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            "an ingest key cannot do this: use an operator key (PAGERLOOP_OPERATOR_API_KEYS)",
        )
    raise _unauthorized(
        "operator", "bad_key", "an operator key is required (Authorization: Bearer <key>)"
    )


Operator = Annotated[str, Depends(require_operator)]


def readable_by(endpoint: str) -> Any:
    """Open to anyone when `endpoint` is in PAGERLOOP_PUBLIC_ENDPOINTS (or in dev mode), else
    to operators."""

    def check(
        svc: Annotated[Services, Depends(services)],
        authorization: Annotated[str | None, Header()] = None,
    ) -> None:
        public = svc.settings.public_endpoints
        if (
            svc.settings.dev_mode
            or endpoint in public
            or (endpoint == "openapi" and "docs" in public)
        ):
            return
        require_operator(svc, authorization)

    return Depends(check)
