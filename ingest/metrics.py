"""Prometheus series the intake exposes on /metrics."""

from prometheus_client import Counter, Gauge, Histogram

ACCEPTED = Counter("etrm_intake_records_accepted_total", "Records accepted", ["desk", "lane"])
HOLDS_OPEN = Gauge("etrm_holds_open", "Drift holds awaiting review")
DEAD_LETTERS_OPEN = Gauge("etrm_dead_letters_open", "Dead letters not yet replayed")
PUBLISH_FAILURES = Counter("etrm_intake_publish_failures_total", "Requests the broker refused")
LEDGER_UNAVAILABLE = Counter(
    "etrm_intake_ledger_unavailable_total", "Requests answered 503 because the database was away"
)
AUTH_FAILURES = Counter(
    "etrm_intake_auth_failures_total",
    "Requests refused by authentication (401) or authorization (403)",
    ["status", "code"],
)
OLDEST_OPEN_AGE = Gauge(
    "etrm_oldest_undelivered_age_seconds",
    "Age of the oldest accepted record not yet final (queued or delivering); 0 when none",
)
REQUEST_LATENCY = Histogram(
    "etrm_intake_request_seconds",
    "Intake request latency",
    ["route", "status"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
