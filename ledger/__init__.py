"""Postgres state shared by intake and workers; the only code that writes SQL."""
