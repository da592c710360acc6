"""Southbound adapters: one per protocol, each a component with `run()` and `stop()`, handed a sink
(`await sink(readings)` returns once they are committed; `since=`: the monotonic time the oldest of them
arrived, where the adapter held them to gather a batch — store.batch_max_delay_ms counts from then); an adapter that can write points (OPC UA) also has
`owns(device)` and `write_point()`, which raises `records.WriteRefused` with the reason."""
from __future__ import annotations

from typing import Awaitable, Callable

from edge_agent.records import Reading

Sink = Callable[..., Awaitable[int]]
DeadLetter = Callable[[str, str, str, str, bytes], Awaitable[None]]
