"""The service's own Prometheus metrics, exposed at GET /metrics."""

from __future__ import annotations

from prometheus_client import REGISTRY, Counter, Histogram

__all__ = ["INGESTED_CALLS", "REGISTRY", "REJECTED_REQUESTS", "REQUEST_SECONDS", "SLACK_ACTIONS"]

INGESTED_CALLS = Counter(
    "pagerloop_ingested_calls_total",
    "LLM call records accepted by the ingest endpoints.",
    ["endpoint"],
)
REJECTED_REQUESTS = Counter(
    "pagerloop_rejected_requests_total",
    "Inbound requests refused, by endpoint and reason.",
    ["endpoint", "reason"],
)
SLACK_ACTIONS = Counter(
    "pagerloop_slack_actions_total",
    "Slack button clicks, by action and outcome.",
    ["action", "outcome"],
)
REQUEST_SECONDS = Histogram(
    "pagerloop_http_request_duration_seconds",
    "Time to answer an HTTP request, by route.",
    ["route"],
)
