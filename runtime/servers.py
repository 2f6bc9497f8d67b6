"""Embedded HTTP servers (a worker's health port, test servers) that leave signals to the
process hosting them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import uvicorn


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server inside a process that handles its own signals: it must not take
    SIGINT/SIGTERM away from its host."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
