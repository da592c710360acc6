"""Store benchmark (not a test): readings/s the store commits on its own, beside SQLite's raw insert rate.

    python tests/bench/bench_store.py [--readings 200000] [--batch 5000]

The store's figure includes everything a commit does: rows with series ids, the outbox JSON
chunks, the registry, synchronous=FULL. The peer is a bare executemany into a table of the same
shape in the same run: the ratio is what the store's own work costs.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from edge_agent.config import StoreConfig  # noqa: E402
from edge_agent.metrics import Metrics  # noqa: E402
from edge_agent.records import Reading  # noqa: E402
from edge_agent.store import Store  # noqa: E402

POINTS = ["temperature", "pressure", "flow", "running", "vibration"]


async def store_rate(readings: list[Reading], batch: int, directory: str) -> float:
    s = Store(StoreConfig(), directory, Metrics())
    await s.open()
    t = time.perf_counter()
    await asyncio.gather(*(s.write(readings[i:i + batch]) for i in range(0, len(readings), batch)))
    rate = len(readings) / (time.perf_counter() - t)
    await s.close()
    return rate


def raw_rate(n: int, batch: int, directory: str) -> float:
    c = sqlite3.connect(os.path.join(directory, "raw.db"), isolation_level=None)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("PRAGMA synchronous=FULL")
    c.execute("CREATE TABLE readings (seq INTEGER PRIMARY KEY, series INTEGER, ts_ns INTEGER, value, quality TEXT)")
    now = time.time_ns()
    rows = [(i, i % 500, now + i, 1.5, "good") for i in range(1, n + 1)]
    t = time.perf_counter()
    for i in range(0, n, batch):
        c.execute("BEGIN")
        c.executemany("INSERT INTO readings VALUES (?,?,?,?,?)", rows[i:i + batch])
        c.execute("COMMIT")
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--readings", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=5000)
    a = ap.parse_args()
    now = time.time_ns()
    readings = [Reading(f"dev-{i % 100:03d}", POINTS[i % 5], 20.0 + i % 7, None, now + i, "good", "mqtt")
                for i in range(a.readings)]
    with tempfile.TemporaryDirectory() as d:
        store = asyncio.run(store_rate(readings, a.batch, d))
        raw = raw_rate(a.readings, a.batch, d)
    print(f"store (rows, outbox JSON, registry, synchronous=FULL): {store:9.0f} readings/s")
    print(f"bare executemany of the readings rows alone          : {raw:9.0f} readings/s   ratio {store / raw:.2f}")


if __name__ == "__main__":
    main()
