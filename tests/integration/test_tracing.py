"""One OpenTelemetry trace links the four hops of a record — intake, Kafka, worker, upstream —
and its id is the `trace_id` the desk was given (real Tansu, Postgres and simulator)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from runtime import tracing
from schemas import samples
from tests.conftest import Pipeline
from tests.support import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """An SDK tracer for this test only (the global provider can be set once per process)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "tracer", provider.get_tracer("etrm-sync-test"))
    yield exporter
    provider.shutdown()


def child_of(child: ReadableSpan, parent: ReadableSpan) -> bool:
    return (
        child.parent is not None
        and parent.context is not None
        and child.parent.span_id == parent.context.span_id
    )


async def test_one_trace_spans_intake_kafka_worker_and_upstream(
    pipeline: Pipeline, spans: InMemorySpanExporter
) -> None:
    desk = pipeline.client()
    run = samples.run_id()
    answer = await desk.post(
        "/v1/settlements/sync",
        json=samples.otc_confirmation(run, "OTC-TRACE-0001"),
        headers={"X-Settlement-Run-ID": run},
    )
    assert answer.status_code == 202
    body = answer.json()
    trace_id = int(body["trace_id"], 16)

    def ours() -> list[ReadableSpan]:
        return [
            s for s in spans.get_finished_spans() if s.context and s.context.trace_id == trace_id
        ]

    await wait_for(lambda: any(s.name == "POST upstream" for s in ours()))
    by_name = {s.name: s for s in ours()}
    server = by_name["POST /v1/settlements/sync"]
    publish = by_name["kafka publish"]
    deliver = by_name["kafka deliver"]
    post = by_name["POST upstream"]
    assert [server.kind, publish.kind, deliver.kind, post.kind] == [
        SpanKind.SERVER,
        SpanKind.PRODUCER,
        SpanKind.CONSUMER,
        SpanKind.CLIENT,
    ]
    # Each hop is the child of the one before; the worker's parent came over Kafka.
    assert child_of(publish, server)
    assert child_of(deliver, publish)
    assert deliver.parent is not None
    assert deliver.parent.is_remote
    assert child_of(post, deliver)
    assert post.attributes is not None
    assert post.attributes["http.response.status_code"] == 201
    assert deliver.attributes is not None
    assert deliver.attributes["message_id"] == body["message_id"]
