"""Which model to fall back to (pure data: runbooks reroute with it)."""

from __future__ import annotations

from collections.abc import Mapping

# The faster sibling of a model, for latency.
MINI: dict[str, str] = {
    "gpt-4.1": "gpt-4.1-mini",
    "gpt-4o": "gpt-4o-mini",
    "gpt-5": "gpt-5-mini",
    "o3": "o4-mini",
}

# The cheapest model that still does the job, for cost (the seed: "nano/mini").
CHEAPEST: dict[str, str] = {
    "gpt-4.1": "gpt-4.1-nano",
    "gpt-4.1-mini": "gpt-4.1-nano",
    "gpt-4o": "gpt-4o-mini",
    "gpt-5": "gpt-5-nano",
    "gpt-5-mini": "gpt-5-nano",
    "o3": "o4-mini",
}


def family(model: str) -> str:
    """`gpt-4.1-2025-04-14` -> `gpt-4.1`: a dated snapshot reroutes like its alias."""
    head, _, tail = model.rpartition("-")
    if len(tail) == 2 and tail.isdigit():
        head2, _, month = head.rpartition("-")
        head3, _, year = head2.rpartition("-")
        if len(month) == 2 and len(year) == 4 and year.isdigit():
            return head3
    return model


def fallback_for(model: str, fallbacks: Mapping[str, str]) -> str | None:
    """Where the deployment lets `model` fall back to (PAGERLOOP_FALLBACK_TARGETS): its own
    entry, else its family's (a dated snapshot falls back like its alias). The target is a
    model or `model@endpoint`, as a reroute control takes it; None when there is none, or it
    would send the call where it already goes."""
    target = fallbacks.get(model) or fallbacks.get(family(model))
    if not target or target == model:
        return None
    return target
