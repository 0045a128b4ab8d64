"""`llm_context(...)`: who and what the calls inside it are for.

A ContextVar, so concurrent asyncio tasks and threads each see their own context; nested
contexts add to (and override) the outer one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any


@dataclass(frozen=True)
class LLMContext:
    feature: str | None = None
    team: str | None = None
    environment: str | None = None
    user_id: str | None = None
    session_id: str | None = None
    trace_id: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)


EMPTY = LLMContext()
_current: ContextVar[LLMContext] = ContextVar("pagerloop_llm_context", default=EMPTY)


def current() -> LLMContext:
    return _current.get()


@contextlib.contextmanager
def llm_context(
    *,
    feature: str | None = None,
    team: str | None = None,
    environment: str | None = None,
    user_id: str | None = None,
    session_id: str | None = None,
    trace_id: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Iterator[LLMContext]:
    """Attribute the LLM calls made inside this block (and the tasks it starts)."""
    outer = _current.get()
    inner = replace(
        outer,
        feature=feature if feature is not None else outer.feature,
        team=team if team is not None else outer.team,
        environment=environment if environment is not None else outer.environment,
        user_id=user_id if user_id is not None else outer.user_id,
        session_id=session_id if session_id is not None else outer.session_id,
        trace_id=trace_id if trace_id is not None else outer.trace_id,
        metadata={**outer.metadata, **(metadata or {})},
    )
    token = _current.set(inner)
    try:
        yield inner
    finally:
        _current.reset(token)
