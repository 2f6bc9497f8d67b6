"""The operations desk's rules as plain functions: who may approve, what needs a second
operator. No I/O."""

from __future__ import annotations

from collections.abc import Collection

DB_MODE_PREFIX = "db:"


def _who(name: str) -> str:
    # A command run against the database without a token acts as `db:<OS user>`: the same
    # person approving with a token of the same name is still the same person.
    return name.strip().casefold().removeprefix(DB_MODE_PREFIX).strip()


def same_operator(requested_by: str, approver: str) -> bool:
    """Four eyes compare stable subjects, case-insensitively (`Op-Alice` is `op-alice`, and
    `db:alice`, who requested from the database, is `alice` holding a token)."""
    return _who(requested_by) == _who(approver)


def needs_approval(count: int, desks: Collection[str], threshold: int) -> bool:
    """A replay of more records than the threshold, or of more than one desk's records,
    waits for a second operator."""
    return count > threshold or len(set(desks)) > 1


def replay_id_valid(replay_id: str) -> bool:
    return replay_id.startswith("replay_") and len(replay_id) <= 64 and replay_id.isascii()
