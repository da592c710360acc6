"""Value types that cross module lines.

`Reading` is the one record every southbound adapter produces and everything downstream consumes.
It is a NamedTuple rather than a dataclass: ingest makes hundreds of thousands a second, and tuple
construction is several times cheaper than a (frozen) dataclass's.
"""
from __future__ import annotations

from typing import NamedTuple, Union

Value = Union[float, int, bool, str]


class Reading(NamedTuple):
    device: str
    point: str
    value: Value
    unit: str | None
    ts_ns: int
    quality: str = "good"
    source: str = ""


class StoreError(Exception):
    """A commit that did not happen. `data`: the readings themselves could not be stored (a value SQLite or the
    outbox encoding refuses) — resending them cannot help, their source must split the batch and set the culprit
    aside; otherwise (the disk, the database) the source keeps them and retries."""

    def __init__(self, message: str, data: bool = False, full: bool = False) -> None:
        super().__init__(message)
        self.data = data
        self.full = full  # the store is at its quota (store.at_quota = backpressure): smaller writes may still fit


class WriteRefused(Exception):
    """A point write an adapter will not perform; the message is the reason."""


class RejectedInput(Exception):
    """Untrusted input that cannot become readings; `reason` is a short metric label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class ModelHealthError(Exception):
    """A model that loaded but may not serve: its smoke set answers differently, or too slowly, or it does not load
    beside the serving one (the message says which)."""
