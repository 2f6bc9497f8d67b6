"""Alembic migrations: one revision per schema change, run by `etrm-sync migrate`."""
