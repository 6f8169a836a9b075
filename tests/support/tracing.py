"""Traces kept in memory: the `spans` fixture turns the gateway's tracing on for one test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from server import tracing


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """The gateway traces into this exporter (every span, as it ends) during the test."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.enable(provider)
    try:
        yield exporter
    finally:
        tracing.enable(None)
        provider.shutdown()


def by_name(finished: tuple[ReadableSpan, ...] | list[ReadableSpan]) -> dict[str, ReadableSpan]:
    """Spans by name; fails when a name is used twice."""
    named = {span.name: span for span in finished}
    assert len(named) == len(finished), [span.name for span in finished]
    return named
