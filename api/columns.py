"""The columnar form of a `POST /v1/llm-calls` batch, which the pagerloop SDK sends.

`{"columns": {"model": [...], "status": [...], ...}}` under `Content-Type: COLUMNS_TYPE`: one
array per field of `CallIn`, named as in the row form, all of one length (a call per index).
A column left out is the field left out of every call; `null` at an index is the field left
out of that call (its default applies: a column holds a null where a row would leave a key out,
so `retry_count: null`, which the row form refuses, means 0 here). Otherwise validation is the
row form's: each column's items have the type and bounds of the field (generated from `CallIn`,
never restated), so a batch is accepted or refused as its rows would be, and an error names the
column and the index.

Why a second form: pydantic validates a list of numbers or strings in Rust at a few tens of
nanoseconds an item, a model per call costs microseconds, and the keys of every call are not
sent again; the SDK's encoding gets cheaper the same way (P8 in the README).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from api.bounds import MAX_CALLS_PER_BATCH
from api.ingest_types import CallIn

REQUIRED = tuple(name for name, info in CallIn.model_fields.items() if info.is_required())


def _column(name: str) -> Any:
    info = CallIn.model_fields[name]
    item: Any = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
    if not info.is_required():
        item = item | None  # null: this call leaves the field out (its default applies)
    # fail_fast, as the row form's list of calls: a column of a million bad values is refused
    # at its first, not after building a million errors (seconds holding the GIL).
    column = Annotated[
        list[item], Field(min_length=1, max_length=MAX_CALLS_PER_BATCH, fail_fast=True)
    ]
    return (column, ...) if info.is_required() else (column | None, None)


class _Columns(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _one_length(self) -> _Columns:
        count = len(getattr(self, REQUIRED[0]))
        for name in type(self).model_fields:
            column = getattr(self, name)
            if column is not None and len(column) != count:
                raise ValueError(
                    f"column {name!r} has {len(column)} values, column {REQUIRED[0]!r} {count}: "
                    "every column holds one value per call"
                )
        return self

    def call_ids(self) -> Sequence[str | None]:
        ids: Sequence[str | None] | None = getattr(self, "call_id", None)
        return ids or ()

    def filled(self) -> dict[str, list[Any]]:
        """The batch as one list per CallIn field, with the defaults filled in."""
        count = len(getattr(self, REQUIRED[0]))
        columns = {}
        for name, info in CallIn.model_fields.items():
            column = getattr(self, name)
            default = info.get_default(call_default_factory=True)
            if column is None:
                column = [default] * count
            elif not info.is_required() and default is not None and None in column:
                column = [default if value is None else value for value in column]
            columns[name] = column
        return columns


if TYPE_CHECKING:
    CallColumnsBody = _Columns
else:
    CallColumnsBody = create_model(
        "CallColumnsBody",
        __base__=_Columns,
        **{name: _column(name) for name in CallIn.model_fields},
    )


class CallColumns(BaseModel):
    model_config = ConfigDict(extra="forbid")

    columns: CallColumnsBody
