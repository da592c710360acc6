"""The memory engine: per requester, the frame of the conversation — the last resolved call or plan, the writes that
last ran with the values they replaced, the pending confirmation — bounded, expiring, never shared.

- A requester is the channel and the operator key (`Request.who`, `Request.signer`) and, where the client sends one,
  its conversation id: two requesters never see each other's frame.
- At most `ask.max_requesters` frames; beyond, the least recently seen is forgotten (counted `memory_evicted`).
- A frame unseen for `ask.memory_ttl_s` is forgotten (counted `memory_expired`); the clock is injectable.
- A frame is at most `MAX_FRAME_BYTES` as canonical JSON: a frame over it is not kept (counted `frame_too_large`),
  the requester then has no memory rather than a truncated one.
- In memory only: gone at restart (a restart forgets what "it" was; nothing must run on a stale frame).
"""
from __future__ import annotations

import collections
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

MAX_FRAME_BYTES = 4096


@dataclass
class Frame:
    """What one requester's follow-ups may lean on."""
    last: dict | None = None          # the last resolved output (a call or {"plan": [...]}), as ask --dry-run prints it
    writes: list[dict] = field(default_factory=list)  # the last writes that ran: {device, point, old, new}
    texts: list = field(default_factory=list)  # the words each step of `last` came from (the write guard's input)
    pending: str | None = None        # the token of this requester's pending confirmation
    seen: float = 0.0

    def devices(self) -> list[str]:
        """The concrete devices the last call or plan named, in order (a fan-out's devices are not concrete)."""
        if self.last is None:
            return []
        steps = self.last.get("plan") or [self.last]
        out: list[str] = []
        for s in steps:
            d = s.get("args", {}).get("device")
            if isinstance(d, str) and d not in out:
                out.append(d)
        return out


def size(frame: Frame) -> int:
    return len(json.dumps(asdict(frame), separators=(",", ":"), sort_keys=True, default=str).encode())


class Memory:
    """The frames of every requester: bounded, expiring, one per key."""

    def __init__(self, ttl_s: float, max_requesters: int, events: Callable[[str], Any] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s, self.max_requesters, self.clock = ttl_s, max_requesters, clock
        self._events = events
        self._frames: collections.OrderedDict[tuple, Frame] = collections.OrderedDict()

    def _count(self, event: str) -> None:
        if self._events is not None:
            self._events(event)

    def __len__(self) -> int:
        return len(self._frames)

    def get(self, key: tuple) -> Frame:
        """The requester's frame (a fresh, empty one when there is none or it expired)."""
        now = self.clock()
        self._expire(now)
        frame = self._frames.get(key)
        if frame is None:
            return Frame(seen=now)
        frame.seen = now  # seen now: the order of the table stays the order of last sight
        self._frames.move_to_end(key)
        return frame

    def put(self, key: tuple, frame: Frame) -> bool:
        """Keep the requester's frame; False (and the requester has no memory) where it is over MAX_FRAME_BYTES."""
        now = self.clock()
        self._expire(now)
        frame.seen = now
        if size(frame) > MAX_FRAME_BYTES:
            self._frames.pop(key, None)
            self._count("frame_too_large")
            return False
        self._frames[key] = frame
        self._frames.move_to_end(key)
        while len(self._frames) > self.max_requesters:
            self._frames.popitem(last=False)
            self._count("memory_evicted")
        return True

    def sizes(self) -> list[int]:
        """The size of each requester's frame (canonical JSON bytes, as MAX_FRAME_BYTES is checked)."""
        return [size(f) for f in self._frames.values()]

    def forget(self, key: tuple) -> None:
        self._frames.pop(key, None)

    def _expire(self, now: float) -> None:
        while self._frames:
            key, oldest = next(iter(self._frames.items()))
            if now - oldest.seen <= self.ttl_s:
                break
            del self._frames[key]
            self._count("memory_expired")
