"""One flat JSON line per LLM call through standard `logging` (logger `pagerloop.llm_calls`).

The primary dimensions (model, status, latency, tokens, cost, feature...) are top-level keys
and metadata is nested, as the seed's schema has it. The message itself is the JSON line, so
any handler writes it as is; formatters that want the fields find them in `record.llm_call`.
Level by status: success INFO, rate_limited / timeout WARNING, error / server_error ERROR.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from typing import Any

from stores.llm_calls import CallRecord

logger = logging.getLogger("pagerloop.llm_calls")

LEVELS = {
    "success": logging.INFO,
    "rate_limited": logging.WARNING,
    "timeout": logging.WARNING,
    "error": logging.ERROR,
    "server_error": logging.ERROR,
}


def as_log_fields(record: CallRecord) -> dict[str, Any]:
    fields = {k: v for k, v in asdict(record).items() if v is not None and v != ""}
    fields["timestamp"] = record.ts.isoformat()
    fields.pop("ts", None)
    fields["total_tokens"] = (record.input_tokens or 0) + (record.output_tokens or 0)
    fields["event"] = f"llm_call_{record.status}"
    return fields


def emit(record: CallRecord) -> None:
    level = LEVELS.get(record.status, logging.ERROR)
    if not logger.isEnabledFor(level):
        return
    fields = as_log_fields(record)
    logger.log(level, json.dumps(fields, default=str), extra={"llm_call": fields})
