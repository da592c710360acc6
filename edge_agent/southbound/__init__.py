"""Southbound adapters: one per protocol, each a component with `run()` and `stop()`, handed a sink
(`await sink(readings)` returns once they are committed); an adapter that can write points (OPC UA) also has
`owns(device)` and `write_point()`, which raises `records.WriteRefused` with the reason."""
from __future__ import annotations

from typing import Awaitable, Callable

from edge_agent.records import Reading

Sink = Callable[[list[Reading]], Awaitable[int]]
DeadLetter = Callable[[str, str, str, str, bytes], Awaitable[None]]
