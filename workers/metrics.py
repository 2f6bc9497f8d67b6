"""Prometheus series a worker exposes on its metrics port."""

from prometheus_client import Counter, Gauge, Histogram

DELIVERIES = Counter(
    "etrm_worker_deliveries_total", "Messages that reached a final state", ["outcome"]
)
DEAD_LETTERS = Counter("etrm_worker_dead_letters_total", "Dead letters by reason", ["reason"])
UPSTREAM_ATTEMPTS = Counter("etrm_worker_upstream_attempts_total", "POSTs sent to the upstream")
UPSTREAM_LATENCY = Histogram(
    "etrm_worker_upstream_latency_seconds",
    "Upstream round trip per attempt",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
TOKEN_RENEWALS = Counter("etrm_worker_token_renewals_total", "Upstream access tokens obtained")
HOLDS_OPEN = Gauge("etrm_worker_holds_opened", "Holds opened by this worker since start")
CONSUMER_LAG = Gauge(
    "etrm_worker_consumer_lag", "Records behind the high watermark", ["topic", "partition"]
)
BATCHES = Counter("etrm_worker_polled_batches_total", "Polled batches finished and committed")
