"""OpenTelemetry for each call, when the app has configured a tracer or meter provider:
a CLIENT span with the GenAI semantic conventions (a child of the app's current span), the
seed's `llm.latency_ms` and `llm.cost_usd` beside them, and the
`gen_ai.client.operation.duration` / `gen_ai.client.token.usage` histograms."""

from __future__ import annotations

import os
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.environment_variables import (
    OTEL_PYTHON_METER_PROVIDER,
    OTEL_PYTHON_TRACER_PROVIDER,
)
from opentelemetry.metrics import _internal as metrics_internal
from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as gen_ai
from opentelemetry.semconv._incubating.metrics import gen_ai_metrics
from opentelemetry.semconv.attributes import error_attributes, server_attributes
from opentelemetry.trace import SpanKind, Status, StatusCode

from pagerloop_sdk.capture import PendingCall, call_cost
from pagerloop_sdk.pricing import DEFAULT_PRICES, PriceTable

PROVIDER = "openai"
# The seed's own span attributes (its LLMTracer's LLM span), beside the GenAI ones: what a
# trace backend's waterfall shows without knowing the price table.
LLM_LATENCY_MS = "llm.latency_ms"
LLM_COST_USD = "llm.cost_usd"
OPERATION_NAMES = {"chat": "chat", "responses": "chat", "embeddings": "embeddings"}
_DURATION_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                     40.96, 81.92]  # fmt: skip
_TOKEN_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                  16777216, 67108864]  # fmt: skip


def _configured(provider: object, proxy: type, noop: type) -> bool:
    return not isinstance(provider, (proxy, noop))


_UNKNOWN = object()


def _global(module: Any, name: str, from_environment: bool) -> object:
    """The global provider as set (None: not set), read without the environment lookup of
    `get_tracer_provider()` on every call; `_UNKNOWN` when the public getter is to be asked:
    an environment variable names the provider to load, or this OpenTelemetry keeps it
    elsewhere."""
    provider = getattr(module, name, _UNKNOWN)
    return _UNKNOWN if provider is None and from_environment else provider


class Telemetry:
    """Caches the tracer and instruments per provider; costs one isinstance when unconfigured.

    Without explicit providers it follows the global ones, which the app may set at any time.
    """

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        prices: PriceTable = DEFAULT_PRICES,
    ) -> None:
        self._prices = prices
        self._fixed_tracer_provider = tracer_provider
        self._fixed_meter_provider = meter_provider
        self._tracer_provider: object = None
        self._tracer: trace.Tracer | None = None
        self._meter_provider: object = None
        self._duration: Any = None
        self._tokens: Any = None
        # Whether the environment names providers to load (read once, not on every call).
        self._tracer_from_environment = OTEL_PYTHON_TRACER_PROVIDER in os.environ
        self._meter_from_environment = OTEL_PYTHON_METER_PROVIDER in os.environ

    def tracer(self) -> trace.Tracer | None:
        provider: Any = self._fixed_tracer_provider
        if provider is None:
            provider = _global(trace, "_TRACER_PROVIDER", self._tracer_from_environment)
            if provider is None:
                return None  # none set: the proxy, which records nothing
            if provider is _UNKNOWN:
                provider = trace.get_tracer_provider()
        if provider is not self._tracer_provider:
            self._tracer_provider = provider
            self._tracer = (
                provider.get_tracer("pagerloop.instrumentation")
                if _configured(provider, trace.ProxyTracerProvider, trace.NoOpTracerProvider)
                else None
            )
        return self._tracer

    def histograms(self) -> tuple[Any, Any] | None:
        provider: Any = self._fixed_meter_provider
        if provider is None:
            provider = _global(metrics_internal, "_METER_PROVIDER", self._meter_from_environment)
            if provider is None:
                return None
            if provider is _UNKNOWN:
                provider = metrics.get_meter_provider()
        if provider is not self._meter_provider:
            self._meter_provider = provider
            proxy = metrics._internal._ProxyMeterProvider
            if _configured(provider, proxy, metrics.NoOpMeterProvider):
                meter = provider.get_meter("pagerloop.instrumentation")
                self._duration = meter.create_histogram(
                    gen_ai_metrics.GEN_AI_CLIENT_OPERATION_DURATION,
                    unit="s",
                    description="GenAI operation duration",
                    explicit_bucket_boundaries_advisory=_DURATION_BUCKETS,
                )
                self._tokens = meter.create_histogram(
                    gen_ai_metrics.GEN_AI_CLIENT_TOKEN_USAGE,
                    unit="{token}",
                    description="Measures number of input and output tokens used",
                    explicit_bucket_boundaries_advisory=_TOKEN_BUCKETS,
                )
            else:
                self._duration = self._tokens = None
        if self._duration is None:
            return None
        return self._duration, self._tokens

    def start(self, call: PendingCall, server: tuple[str, int] | None) -> trace.Span | None:
        tracer = self.tracer()
        if tracer is None:
            # The app's span, if any, is read from its context off the caller's path.
            context = otel_context.get_current()
            if context:
                call.otel_context = context
            return None
        operation = OPERATION_NAMES[call.operation]
        attributes: dict[str, Any] = {
            gen_ai.GEN_AI_OPERATION_NAME: operation,
            gen_ai.GEN_AI_PROVIDER_NAME: PROVIDER,
            gen_ai.GEN_AI_REQUEST_MODEL: call.model,
        }
        if server is not None:
            attributes[server_attributes.SERVER_ADDRESS] = server[0]
            attributes[server_attributes.SERVER_PORT] = server[1]
        span = tracer.start_span(
            f"{operation} {call.model}", kind=SpanKind.CLIENT, attributes=attributes
        )
        call.trace_id = format(span.get_span_context().trace_id, "032x")
        return span

    def finish(self, call: PendingCall, span: trace.Span | None) -> None:
        """End the span and record the histograms; reads usage on the caller's thread."""
        histograms = self.histograms()
        if span is None and histograms is None:
            return
        call.read_headers()
        if call.response is not None:
            call._response(call.response)
        attributes: dict[str, Any] = {
            gen_ai.GEN_AI_OPERATION_NAME: OPERATION_NAMES[call.operation],
            gen_ai.GEN_AI_PROVIDER_NAME: PROVIDER,
            gen_ai.GEN_AI_REQUEST_MODEL: call.model,
        }
        if call.response_model:
            attributes[gen_ai.GEN_AI_RESPONSE_MODEL] = call.response_model
        if call.status != "success":
            attributes[error_attributes.ERROR_TYPE] = call.error_type or call.status
        if span is not None:
            span.set_attributes(attributes)
            if call.request_id:
                span.set_attribute(gen_ai.GEN_AI_RESPONSE_ID, call.request_id)
            if call.finish_reason:
                span.set_attribute(gen_ai.GEN_AI_RESPONSE_FINISH_REASONS, [call.finish_reason])
            if call.input_tokens is not None:
                span.set_attribute(gen_ai.GEN_AI_USAGE_INPUT_TOKENS, call.input_tokens)
            if call.output_tokens is not None:
                span.set_attribute(gen_ai.GEN_AI_USAGE_OUTPUT_TOKENS, call.output_tokens)
            if call.cached_input_tokens:
                span.set_attribute(
                    gen_ai.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS, call.cached_input_tokens
                )
            span.set_attributes(llm_attributes(call, self._prices))
            if call.status != "success":
                span.set_status(Status(StatusCode.ERROR, call.error_message or call.status))
            span.end()
        if histograms is not None:
            duration, tokens = histograms
            duration.record(call.ended - call.started, attributes)
            for kind, count in (("input", call.input_tokens), ("output", call.output_tokens)):
                if count is not None:
                    tokens.record(count, {**attributes, gen_ai.GEN_AI_TOKEN_TYPE: kind})


def llm_attributes(call: PendingCall, prices: PriceTable) -> dict[str, float]:
    """The seed's `llm.latency_ms` and `llm.cost_usd` of a finished call: the SDK's own price
    (an API that prices with a table of its own may store another cost for the record)."""
    attributes: dict[str, float] = {}
    if call.ended >= call.started:
        attributes[LLM_LATENCY_MS] = round((call.ended - call.started) * 1000, 3)
    if (cost := call_cost(call, prices)) is not None:
        attributes[LLM_COST_USD] = cost
    return attributes
