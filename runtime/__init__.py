"""Settings, logging and the one place that builds real adapters."""
