"""The contract's search attributes: what operators filter incidents by in the Temporal UI."""

from __future__ import annotations

from temporalio.common import SearchAttributeKey

INCIDENT_STATUS = SearchAttributeKey.for_keyword("IncidentStatus")
INCIDENT_SEVERITY = SearchAttributeKey.for_keyword("IncidentSeverity")
INCIDENT_TRIGGER = SearchAttributeKey.for_keyword("IncidentTrigger")
INCIDENT_SCOPE = SearchAttributeKey.for_keyword("IncidentScope")
INCIDENT_LEVEL = SearchAttributeKey.for_int("IncidentLevel")
# Set on an incident merged into another (the other's id): `IncidentMergedInto IS NOT NULL`
# finds every incident a merge closed.
INCIDENT_MERGED_INTO = SearchAttributeKey.for_keyword("IncidentMergedInto")

ALL: tuple[SearchAttributeKey[str] | SearchAttributeKey[int], ...] = (
    INCIDENT_STATUS,
    INCIDENT_SEVERITY,
    INCIDENT_TRIGGER,
    INCIDENT_SCOPE,
    INCIDENT_LEVEL,
    INCIDENT_MERGED_INTO,
)


def dev_server_flags() -> list[str]:
    """`--search-attribute Name=Type` flags for `temporal server start-dev`."""
    flags = []
    for key in ALL:
        flags += ["--search-attribute", f"{key.name}={key.indexed_value_type.name.title()}"]
    return flags


def literal(value: str) -> str:
    """`value` as a quoted literal of a visibility query; quotes inside are refused, since a
    scope built from ingested model or feature names must never rewrite the query."""
    if any(char in value for char in "'\"\\`"):
        raise ValueError(f"not usable in a visibility query: {value!r}")
    return f"'{value}'"
