"""Southbound adapters: one per protocol, each a component with `run()`, `stop()` and
`write_point()`, handed a sink (`await sink(readings)` returns once they are committed)."""
from __future__ import annotations

from typing import Awaitable, Callable

from edge_agent.records import Reading

Sink = Callable[[list[Reading]], Awaitable[int]]
DeadLetter = Callable[[str, str, str, str, bytes], Awaitable[None]]


class WriteRefused(Exception):
    """A point write the adapter will not perform; the message is the reason."""
