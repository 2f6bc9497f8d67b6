"""Prometheus series a worker exposes on its metrics port."""

from prometheus_client import Counter, Gauge, Histogram

DELIVERIES = Counter(
    "etrm_worker_deliveries_total", "Records that reached a settled state", ["outcome"]
)
DEAD_LETTERS = Counter("etrm_worker_dead_letters_total", "Dead letters by reason", ["reason"])
UPSTREAM_ATTEMPTS = Counter("etrm_worker_upstream_attempts_total", "POSTs sent to the upstream")
UPSTREAM_LATENCY = Histogram(
    "etrm_worker_upstream_latency_seconds",
    "Upstream round trip per attempt",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
TOKEN_RENEWALS = Counter("etrm_worker_token_renewals_total", "Upstream access tokens obtained")
HOLDS_OPENED = Counter("etrm_worker_holds_opened_total", "Drift holds opened by this worker")
CONSUMER_LAG = Gauge(
    "etrm_worker_consumer_lag", "Records behind the high watermark", ["topic", "partition"]
)
OFFSET_COMMITS = Counter("etrm_worker_offset_commits_total", "Offset commits of settled records")
LANE_PAUSED = Gauge(
    "etrm_worker_lane_paused",
    "1 while a lane's partitions are paused (too much unsettled)",
    ["lane"],
)
CONSUMER_RESTARTS = Counter(
    "etrm_worker_consumer_restarts_total",
    "Lane consumers replaced after staying out of their group too long",
    ["lane"],
)
