"""The one backoff every retry loop uses."""
from __future__ import annotations

import asyncio
import time

import pytest

from edge_agent.backoff import Backoff
from edge_agent.metrics import Metrics


def test_capped_exponential_with_jitter_reset_and_counted():
    m = Metrics()
    b = Backoff(0.1, 1.0, m.backoff_waits.labels("t"))
    waits = [b.next() for _ in range(8)]
    steps = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0]
    assert all(s / 2 <= w <= s for w, s in zip(waits, steps)), waits
    b.reset()
    assert 0.05 <= b.next() <= 0.1
    assert m.value("edge_agent_backoff_waits_total", {"loop": "t"}) == 9
    with pytest.raises(ValueError):
        Backoff(0, 1)
    with pytest.raises(ValueError):
        Backoff(2, 1)


def test_wait_returns_early_when_stopped():
    async def main():
        stop = asyncio.Event()
        b = Backoff(30, 60)
        asyncio.get_running_loop().call_later(0.05, stop.set)
        t = time.monotonic()
        await b.wait(stop)
        return time.monotonic() - t
    assert asyncio.run(main()) < 1.0
