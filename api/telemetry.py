"""The service's own Prometheus metrics, exposed at GET /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

INGESTED_CALLS = Counter(
    "pagerloop_ingested_calls_total",
    "LLM call records accepted by the ingest endpoints.",
    ["endpoint"],
    registry=REGISTRY,
)
REJECTED_REQUESTS = Counter(
    "pagerloop_rejected_requests_total",
    "Inbound requests refused, by endpoint and reason.",
    ["endpoint", "reason"],
    registry=REGISTRY,
)
SLACK_ACTIONS = Counter(
    "pagerloop_slack_actions_total",
    "Slack button clicks, by action and outcome.",
    ["action", "outcome"],
    registry=REGISTRY,
)
REQUEST_SECONDS = Histogram(
    "pagerloop_http_request_duration_seconds",
    "Time to answer an HTTP request, by route.",
    ["route"],
    registry=REGISTRY,
)
