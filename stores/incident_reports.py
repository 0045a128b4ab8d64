"""Incident reports, as written at resolve: one row per incident (its Markdown, its Slack
summary and its figures as JSON), so `pagerloop incidents report ID` prints what was posted,
long after the call log that it was computed from has been purged.

Writing one again (a retried activity, a rebuilt report) replaces it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, DateTime, Engine, Text, select
from sqlmodel import Field, SQLModel

from stores import dialect
from stores.llm_calls import utc

INCIDENT_ID_MAX = 1000  # Temporal's default limit on workflow ids


class IncidentReportRow(SQLModel, table=True):
    __tablename__ = "incident_reports"

    incident_id: str = Field(primary_key=True, max_length=INCIDENT_ID_MAX)
    markdown: str = Field(sa_column=Column(Text, nullable=False))
    summary: str = Field(sa_column=Column(Text, nullable=False))
    figures: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False))


_table = IncidentReportRow.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True)
class StoredReport:
    incident_id: str
    markdown: str
    summary: str
    figures: dict[str, Any]
    created_at: datetime


def save(
    engine: Engine,
    incident_id: str,
    markdown: str,
    summary: str,
    figures: dict[str, Any],
    at: datetime,
) -> None:
    """Write the incident's report, replacing any earlier one (one statement: two retries
    racing leave one row)."""
    values = {"markdown": markdown, "summary": summary, "figures": figures, "created_at": utc(at)}
    statement = (
        dialect.insert(engine)(_table)
        .values(incident_id=incident_id, **values)
        .on_conflict_do_update(index_elements=[_table.c.incident_id], set_=values)
    )
    with engine.begin() as connection:
        connection.execute(statement)


def get(engine: Engine, incident_id: str) -> StoredReport | None:
    with engine.connect() as connection:
        row = connection.execute(select(_table).where(_table.c.incident_id == incident_id)).first()
    if row is None:
        return None
    return StoredReport(
        incident_id=row.incident_id,
        markdown=row.markdown,
        summary=row.summary,
        figures=dict(row.figures),
        created_at=utc(row.created_at),
    )
