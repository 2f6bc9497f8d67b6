"""A worker whose metrics port is taken keeps delivering without it (no crash later inside the
HTTP server): the port is claimed — bound and listening — before the worker starts."""

from __future__ import annotations

from ops.dev.stack import free_port
from workers.app import bind_health_port


def test_a_taken_metrics_port_is_detected_up_front() -> None:
    port = free_port()
    first = bind_health_port("127.0.0.1", port)
    assert first is not None
    try:
        assert bind_health_port("127.0.0.1", port) is None
    finally:
        first.close()
