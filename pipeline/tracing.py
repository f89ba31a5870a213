"""OpenTelemetry spans, optional (``pip install 'herald[otel]'``).

On when ``HERALD_OTEL_ENABLED=true``, or when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set and ``HERALD_OTEL_ENABLED`` is not ``false``:
spans go to an OTLP/HTTP exporter configured by the SDK's own ``OTEL_*`` variables (endpoint,
headers, ``OTEL_SERVICE_NAME``, ``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*``).

Every span continues a W3C ``traceparent`` carried by a record, and hands its own on:

    herald.publish <event type>   the publisher (API, CLI, services): parent = the caller's
                                  traceparent; the event's envelope and header carry this span
    herald.route <event type>     the router, per event: parent = the event's traceparent; its
                                  intents carry this span
    herald.send <channel>         the sink, per provider call: parent = the intent's
                                  traceparent; the connector's request carries this span
                                  (``traceparent`` header on HTTP providers)

Off, nothing is created and the records' traceparent passes through unchanged. Herald keeps
its own TracerProvider (the global one is left to the application embedding Herald).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator, Mapping
from typing import Any

from pipeline import headers as h

__all__ = ["Span", "configure", "enabled", "now_ns", "reset", "span", "wanted"]

log = logging.getLogger(__name__)

_tracer: Any = None
_provider: Any = None

INSTALL = "pip install 'herald[otel]'"


def wanted(flag: bool | None, environ: Mapping[str, str] | None = None) -> bool:
    """Whether tracing is asked for: ``flag`` (HERALD_OTEL_ENABLED) when set, else whether
    an OTLP endpoint is configured."""
    if flag is not None:
        return flag
    env = os.environ if environ is None else environ
    return bool(
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def configure(service_name: str, exporter: Any = None, *, batch: bool = True) -> None:
    """Start tracing for this process as ``service_name`` (``OTEL_SERVICE_NAME`` wins).
    ``exporter`` defaults to OTLP/HTTP; tests pass the SDK's InMemorySpanExporter with
    ``batch=False``. Raises ImportError with the fix when the ``otel`` extra is missing."""
    global _tracer, _provider
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError as e:
        raise ImportError(f"tracing needs the OpenTelemetry SDK: {INSTALL}") from e
    if exporter is None:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError as e:
            raise ImportError(f"tracing needs the OTLP exporter: {INSTALL}") from e
        exporter = OTLPSpanExporter()
    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": service_name}
    provider = TracerProvider(resource=Resource.create(attributes))
    processor = BatchSpanProcessor(exporter) if batch else SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    reset()
    _provider = provider
    _tracer = provider.get_tracer("herald")


def reset() -> None:
    """Stop tracing, flushing what was recorded."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None


def enabled() -> bool:
    return _tracer is not None


class Span:
    """A started span: its ``traceparent`` (to hand on) and attributes to add."""

    def __init__(self, otel_span: Any) -> None:
        self._span = otel_span
        ctx = otel_span.get_span_context()
        self.trace_id = f"{ctx.trace_id:032x}"
        self.span_id = f"{ctx.span_id:016x}"
        self.traceparent = f"00-{self.trace_id}-{self.span_id}-{int(ctx.trace_flags):02x}"

    def set(self, key: str, value: str | int | float | bool | None) -> None:
        if value is not None:
            self._span.set_attribute(key, value)

    def error(self, description: str) -> None:
        from opentelemetry.trace import Status, StatusCode

        self._span.set_status(Status(StatusCode.ERROR, description))


_KINDS = ("internal", "producer", "consumer", "client", "server")


@contextlib.contextmanager
def span(
    name: str,
    *,
    parent: str | None,
    kind: str = "internal",
    attributes: Mapping[str, str | int | float | bool | None] | None = None,
    start_ns: int | None = None,
) -> Iterator[Span | None]:
    """A span named ``name``, child of the W3C ``parent`` traceparent (a new trace when
    there is none or it is malformed); None while tracing is off. ``start_ns``
    (``time.time_ns()``) backdates its start to when the work began."""
    tracer = _tracer
    if tracer is None:
        yield None
        return
    from opentelemetry.context import Context
    from opentelemetry.trace import SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    valid = h.valid_traceparent(parent)
    ctx = TraceContextTextMapPropagator().extract({"traceparent": valid}) if valid else Context()
    attrs = {k: v for k, v in (attributes or {}).items() if v is not None}
    with tracer.start_as_current_span(
        name,
        context=ctx,
        kind=getattr(SpanKind, kind.upper()) if kind in _KINDS else SpanKind.INTERNAL,
        attributes=attrs,
        start_time=start_ns,
    ) as otel_span:
        yield Span(otel_span)


def now_ns() -> int:
    return time.time_ns()
