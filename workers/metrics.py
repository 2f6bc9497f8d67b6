"""Prometheus series a worker exposes on its metrics port."""

from prometheus_client import Counter, Gauge, Histogram

DELIVERIES = Counter(
    "etrm_worker_deliveries_total", "Records that reached a settled state", ["outcome"]
)
DEAD_LETTERS = Counter("etrm_worker_dead_letters_total", "Dead letters by reason", ["reason"])
UPSTREAM_ATTEMPTS = Counter(
    "etrm_worker_upstream_attempts_total",
    "POSTs sent to the upstream, by the status it answered (timeout / error when none)",
    ["status"],
)
END_TO_END = Histogram(
    "etrm_end_to_end_seconds",
    "From the intake's publish (the 202) to the record's settled state",
    ["lane", "outcome"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)
TOKEN_FAILURES = Counter(
    "etrm_worker_token_failures_total",
    "Upstream access-token requests that gave no token (unreachable, refused, malformed)",
)
UPSTREAM_LATENCY = Histogram(
    "etrm_worker_upstream_latency_seconds",
    "Upstream round trip per attempt, by the status it answered (timeout / error when none)",
    ["status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
TOKEN_RENEWALS = Counter("etrm_worker_token_renewals_total", "Upstream access tokens obtained")
HOLDS_OPENED = Counter("etrm_worker_holds_opened_total", "Drift holds opened by this worker")
CONSUMER_LAG = Gauge(
    "etrm_worker_consumer_lag", "Records behind the high watermark", ["topic", "partition"]
)
PUBLISHED_AGAIN = Counter(
    "etrm_worker_records_published_again_total",
    "Queued records published again from the ledger: the broker no longer held their copy",
)
LOG_RESETS = Counter(
    "etrm_worker_partition_log_resets_total",
    "Lane partitions read again from their start: the broker lost the log under the position",
)
OFFSET_COMMITS = Counter("etrm_worker_offset_commits_total", "Offset commits of settled records")
LANE_PAUSED = Gauge(
    "etrm_worker_lane_paused",
    "1 while a lane's partitions are paused (too much unsettled)",
    ["lane"],
)
LANE_WIDENED = Counter(
    "etrm_worker_lane_widened_total",
    "Times a paused lane that settled nothing read past its limit (copies waiting for earlier "
    "records of their contracts not read yet)",
    ["lane"],
)
CONSUMER_RESTARTS = Counter(
    "etrm_worker_consumer_restarts_total",
    "Lane consumers replaced after staying out of their group too long",
    ["lane"],
)
CIRCUIT_STATE = Gauge(
    "etrm_upstream_circuit_state",
    "The upstream circuit breaker as this worker last saw it: 1 for the current state",
    ["state"],
)
MAINTENANCE_ACTIVE = Gauge(
    "etrm_upstream_maintenance_active", "1 while a maintenance window holds every request"
)
CIRCUIT_PROBES = Counter(
    "etrm_upstream_circuit_probes_total",
    "Probes this worker sent while the breaker was open",
    ["result"],
)
HELD_BY_BREAKER = Counter(
    "etrm_worker_held_by_breaker_total",
    "Records handed back unsent (or their failed attempt not charged) because the upstream is "
    "away or in maintenance",
)
