"""One flat JSON line per LLM call through standard `logging` (logger `pagerloop.llm_calls`).

The primary dimensions (model, status, latency, tokens, cost, feature...) are top-level keys
and metadata is nested, as the seed's schema has it. The message itself is the JSON line, so
any handler writes it as is; formatters that want the fields find them in `record.llm_call`.
Level by status: success INFO, rate_limited / timeout WARNING, error / server_error ERROR.
"""

from __future__ import annotations

import json
import logging
from dataclasses import fields
from operator import attrgetter
from typing import Any

from pagerloop_sdk.records import CallRecord

logger = logging.getLogger("pagerloop.llm_calls")

LEVELS = {
    "success": logging.INFO,
    "rate_limited": logging.WARNING,
    "timeout": logging.WARNING,
    "error": logging.ERROR,
    "server_error": logging.ERROR,
}


_FIELDS = tuple(f.name for f in fields(CallRecord) if f.name != "ts")
_values = attrgetter(*_FIELDS)


def as_log_fields(record: CallRecord) -> dict[str, Any]:
    found = {k: v for k, v in zip(_FIELDS, _values(record), strict=True) if v is not None}
    found["timestamp"] = record.ts.isoformat()
    found["total_tokens"] = (record.input_tokens or 0) + (record.output_tokens or 0)
    found["event"] = f"llm_call_{record.status}"
    return found


def emit(records: list[CallRecord]) -> None:
    """Log a batch; the levels are checked once, so a quiet logger costs nothing per record."""
    enabled = {status for status, level in LEVELS.items() if logger.isEnabledFor(level)}
    if not enabled:
        return
    for record in records:
        if record.status in enabled or record.status not in LEVELS:
            fields = as_log_fields(record)
            level = LEVELS.get(record.status, logging.ERROR)
            logger.log(level, json.dumps(fields, default=str), extra={"llm_call": fields})
