"""Workers: consume the settlement lanes, deduplicate against the ledger, forward upstream."""
