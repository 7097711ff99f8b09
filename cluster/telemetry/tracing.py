"""OpenTelemetry: a trace per request, continued from the caller's W3C traceparent.

Exporting is opt-in through the standard variables (OTEL_EXPORTER_OTLP_ENDPOINT /
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_TRACES_EXPORTER, OTEL_SERVICE_NAME) or the config's
telemetry.otlp_endpoint. Engine-side spans are written after the fact from the request's own
timestamps (queue, prefill, decode in sampled slices), so the engine thread never blocks on
tracing and decode costs one span per `trace_decode_every` tokens, not one per token.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.trace import SpanKind

log = logging.getLogger(__name__)

_configured: dict[str, trace.TracerProvider] = {}


def setup_tracing(service_name: str, otlp_endpoint: str | None = None) -> trace.Tracer:
    """A tracer for this process. Installs an OTLP/gRPC exporter when an endpoint is configured;
    otherwise spans are created (context still propagates) and dropped."""
    endpoint = otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or \
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if os.environ.get("OTEL_TRACES_EXPORTER", "").lower() == "none":
        endpoint = None
    if service_name not in _configured:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider

        provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name)}))
        if endpoint:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            insecure = not endpoint.startswith("https://")
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=insecure),
                                                           schedule_delay_millis=200))
            log.info("exporting traces over OTLP to %s", endpoint)
        _configured[service_name] = provider
        if len(_configured) == 1:  # the process's global provider: library code uses trace.get_tracer
            trace.set_tracer_provider(provider)
    return _configured[service_name].get_tracer("expertmesh")


def flush_tracing(timeout_ms: int = 5000) -> None:
    for provider in _configured.values():
        provider.force_flush(timeout_ms)


def context_from_metadata(metadata) -> otel_context.Context:
    """The caller's trace context from gRPC invocation metadata (traceparent/tracestate)."""
    carrier = {k.lower(): v for k, v in (metadata or ()) if isinstance(v, str)}
    return extract(carrier)


def metadata_for(ctx: otel_context.Context | None = None) -> list[tuple[str, str]]:
    carrier: dict[str, str] = {}
    inject(carrier, context=ctx)
    return list(carrier.items())


def _ns(monotonic_t: float) -> int:
    """A time.monotonic() instant as epoch nanoseconds."""
    return time.time_ns() - int((time.monotonic() - monotonic_t) * 1e9)


@dataclass
class RequestTrace:
    """Engine-side spans of one request: engine.generate ⊃ queue, prefill, decode[i..j] slices."""

    tracer: trace.Tracer
    parent: otel_context.Context
    request_id: str
    decode_every: int = 16
    arrival: float = field(default_factory=time.monotonic)
    root: trace.Span | None = None
    _first: float | None = None
    _slice_start: float | None = None
    _slice_tokens: int = 0
    _tokens: int = 0

    def start(self) -> None:
        self.root = self.tracer.start_span("engine.generate", context=self.parent, kind=SpanKind.INTERNAL,
                                           start_time=_ns(self.arrival),
                                           attributes={"expertmesh.request_id": self.request_id})

    def _child(self, name: str, start: float, end: float, **attrs) -> None:
        ctx = trace.set_span_in_context(self.root)
        span = self.tracer.start_span(name, context=ctx, start_time=_ns(start), attributes=attrs)
        span.end(end_time=_ns(end))

    def on_delta(self, n_tokens: int, queue_time_s: float | None = None, cached_tokens: int = 0,
                 prompt_tokens: int = 0) -> None:
        now = time.monotonic()
        if n_tokens and self._first is None:
            self._first = now
            admitted = self.arrival + (queue_time_s or 0.0)
            self._child("queue", self.arrival, admitted)
            self._child("prefill", admitted, now, **{"expertmesh.prompt_tokens": prompt_tokens,
                                                      "expertmesh.cached_tokens": cached_tokens})
            self._slice_start, self._tokens = now, n_tokens
            return
        self._tokens += n_tokens
        self._slice_tokens += n_tokens
        if self._slice_tokens >= self.decode_every:
            self._flush_slice(now)

    def _flush_slice(self, now: float) -> None:
        if self._slice_tokens and self._slice_start is not None:
            self._child("decode", self._slice_start, now, **{"expertmesh.tokens": self._slice_tokens})
        self._slice_start, self._slice_tokens = now, 0

    def finish(self, finish_reason: str | None, completion_tokens: int) -> None:
        self._flush_slice(time.monotonic())
        if self.root is not None:
            self.root.set_attribute("expertmesh.finish_reason", finish_reason or "")
            self.root.set_attribute("expertmesh.completion_tokens", completion_tokens)
            self.root.end()
