"""Scopes: what a signal, a rule, an incident or a silence is about.

`global`, `model:<name>` or `feature:<name>`; and per dimension one `<kind>:(other)` scope
holding the names beyond the busiest ones, so that the detectors' answer has a bounded size
however many distinct names the traffic carries.
"""

from __future__ import annotations

import re

GLOBAL = "global"
SCOPE_KINDS = ("global", "model", "feature")
DIMENSIONS = ("model", "feature")
OTHER = "(other)"
SCOPE_NAME_MAX = 140
_UNSAFE = re.compile(r"[^A-Za-z0-9._:/@+-]")


def scope_name(kind: str, value: str = "") -> str:
    """`global`, `model:<name>`, `feature:<name>`; odd characters become `_` so that a scope is
    always safe in a visibility query and a workflow id."""
    if kind == GLOBAL:
        return GLOBAL
    return f"{kind}:{_UNSAFE.sub('_', value)[:SCOPE_NAME_MAX] or '_'}"


def folded_scope(kind: str) -> str:
    """`model:(other)` / `feature:(other)`: the names beyond the top ones, summed. Unlike a
    name from the traffic, its parentheses stay, so it cannot be mistaken for one."""
    return f"{kind}:{OTHER}"


def kind_of(scope: str) -> str:
    return GLOBAL if scope == GLOBAL else scope.partition(":")[0]


def in_scope(name: str, model: str, feature: str | None) -> bool:
    """Whether a call to `model` from `feature` ("" or None for none) counts in scope `name`:
    the detector's test, which the runbooks' queries apply to the raw names of the calls."""
    if name == GLOBAL:
        return True
    kind = name.partition(":")[0]
    if kind == "model":
        return scope_name("model", model) == name
    if kind == "feature" and feature:
        return scope_name("feature", feature) == name
    return False
