"""The one backoff: capped exponential with jitter, reset on success, counted.

Every retry loop (the uplink's and the adapters' reconnects, CoAP re-registration, the supervisor's restarts) waits
through one of these, so they all behave alike: the first wait is `min_s`, each failure doubles it up to `max_s`,
and each wait is drawn uniformly from [half, all] of the step (a fleet that lost its broker at the same moment does
not come back in lockstep). Each wait is counted in `edge_agent_backoff_waits_total{loop}`.
"""
from __future__ import annotations

import asyncio
import random


class Backoff:
    def __init__(self, min_s: float, max_s: float, counter=None) -> None:
        if not 0 < min_s <= max_s:
            raise ValueError(f"backoff needs 0 < min_s <= max_s, got {min_s}, {max_s}")
        self.min_s, self.max_s = min_s, max_s
        self.step = min_s
        self._counter = counter  # a prometheus counter child, or None

    def next(self) -> float:
        """The delay to wait now; the step doubles (capped) for the next failure."""
        delay = self.step * random.uniform(0.5, 1.0)
        self.step = min(self.step * 2, self.max_s)
        if self._counter is not None:
            self._counter.inc()
        return delay

    def reset(self) -> None:
        """After a success: the next failure waits the shortest step again."""
        self.step = self.min_s

    async def wait(self, stop: asyncio.Event | None = None, delay: float | None = None) -> float:
        """Sleep the next delay (or `delay`, already drawn with next()), returning early when `stop` is set."""
        d = self.next() if delay is None else delay
        if stop is None:
            await asyncio.sleep(d)
        else:
            try:
                await asyncio.wait_for(stop.wait(), d)
            except (asyncio.TimeoutError, TimeoutError):
                pass
        return d
