"""OpenTelemetry traces: intake → Kafka → worker → upstream, as one trace whose id is the
`trace_id` the desk was given.

Off by default. The standard variables switch it on: `OTEL_EXPORTER_OTLP_ENDPOINT` (or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) exports spans over OTLP/HTTP; `OTEL_SERVICE_NAME`,
`OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`… are read by the SDK as usual. Without them
the API's no-op tracer is used and nothing is recorded.

The W3C `traceparent` header travels on every Kafka message (and to the upstream), so a worker
continues the trace the intake started.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()
tracer = trace.get_tracer("etrm-sync")
_DEFAULT_TRACER = tracer
_OFF_SPAN: AbstractContextManager[Span] = nullcontext(trace.INVALID_SPAN)  # reusable, reentrant
_installed = False


def active() -> bool:
    """Whether spans are recorded: setup_tracing installed an exporting provider, or the
    module's tracer was replaced (tests). Otherwise every span would be the API's no-op span,
    and making one (the API looks its provider up in the environment each time) cost ~5 % of a
    worker's CPU per delivery in a py-spy profile."""
    return _installed or tracer is not _DEFAULT_TRACER


def setup_tracing(service: str) -> bool:
    """Install an exporting tracer provider when the OTLP endpoint is configured."""
    if not (
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    ):
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    name = os.environ.get("OTEL_SERVICE_NAME") or f"etrm-sync-{service}"
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    global _installed  # noqa: PLW0603 - set once, at start-up
    _installed = True
    return True


def desk_trace(trace_id: str) -> Context:
    """A parent context carrying the desk-facing trace id (32 hex digits), so the spans of
    this request belong to the trace the desk can quote."""
    try:
        number = int(trace_id, 16)
    except ValueError:
        return Context()
    if not 0 < number < 1 << 128:
        return Context()
    parent = trace.SpanContext(
        trace_id=number,
        span_id=secrets.randbits(64) or 1,
        is_remote=True,
        trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
    )
    return trace.set_span_in_context(trace.NonRecordingSpan(parent))


def traceparent() -> str | None:
    """The current span as a W3C `traceparent` value (None when nothing is being traced)."""
    if not active():
        return None
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent")


def from_headers(headers: Sequence[tuple[str, bytes | None]]) -> Context:
    """The context a Kafka message carries in its `traceparent` header (empty if none)."""
    if not active():
        return Context()
    for name, value in headers:
        if name == "traceparent" and value:
            try:
                return _PROPAGATOR.extract({"traceparent": value.decode("ascii")})
            except UnicodeDecodeError:
                break
    return Context()


def span(
    name: str, kind: SpanKind, context: Context | None = None, **attributes: str | int
) -> AbstractContextManager[Span]:
    """A span as the current one, or (tracing off) one shared no-op context: nothing is made
    per call."""
    if not active():
        return _OFF_SPAN
    return tracer.start_as_current_span(name, context=context, kind=kind, attributes=attributes)
