"""A worker's metrics and health port: when taken, the worker keeps delivering without it (no
crash later inside the HTTP server) — the port is claimed, bound and listening, before the
worker starts; its /metrics can require a scrape token."""

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


async def test_a_workers_metrics_can_require_a_scrape_token() -> None:
    import httpx
    from pydantic import SecretStr

    from runtime.settings import WorkerSettings
    from workers.app import health_app

    settings = WorkerSettings.model_construct(metrics_token=SecretStr("scrape-secret"))
    app = health_app(lambda: True, settings.metrics_allowed)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://worker") as client:
        assert (await client.get("/metrics")).status_code == 401
        assert (await client.get("/healthz")).status_code == 200
        right = {"Authorization": "Bearer scrape-secret"}
        assert (await client.get("/metrics", headers=right)).status_code == 200
