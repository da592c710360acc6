"""The store's room on the disk: the quota, the reserve file, what happens at the quota, and retention.

The effective quota is store.quota_bytes or half the room the disk has (its free space and what the store holds,
less the reserve), whichever is smaller. At it, with store.at_quota = "evict" (the default), log lines give up
their room first, then the oldest outbox readings go (counted, logged: they will not reach the cloud); with
"backpressure" new readings wait with their source until the cloud's acknowledgements free room. The reserve file
(store.disk_reserve_bytes) is room only the store gives back, when the disk fills, so that acknowledgements and
deletes can still commit. Retention keeps the readings window within store.retention_s and store.retention_rows.

Writer thread only.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import time
from typing import TYPE_CHECKING

from edge_agent.logs import RateLimited
from edge_agent.records import Reading

if TYPE_CHECKING:
    from edge_agent.store import Store

log = logging.getLogger("edge_agent.store")

MAX_READING_BYTES = 4 * (1024 + 400)  # a reading's most disk use: table row + outbox JSON, each in the WAL first


class Space:
    def __init__(self, store: Store) -> None:
        self.store, self.cfg, self.metrics = store, store.cfg, store.metrics
        self.ballast = store.path.with_name("edge-agent.reserve")  # room set aside for acks and deletes
        self.used = 0
        self.reusable = 0
        self.limit = self.cfg.quota_bytes  # the effective quota, as last computed
        self.full = False  # at the quota with store.at_quota = backpressure: new readings wait with their source
        self.full_log = RateLimited(log, interval_s=60, burst=1)

    @staticmethod
    def disk_bytes(readings: list[Reading]) -> int:
        """What committing these readings may take on disk: each is stored twice (the window and the outbox's
        JSON), and written to the WAL before the database file. Computed only near the quota."""
        return 4 * sum((len(r.value) if type(r.value) is str else 16) + len(r.device) + len(r.point) + 120
                       for r in readings)

    def used_bytes(self, conn: sqlite3.Connection) -> int:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        self.reusable = free * page_size  # inside the file, free for SQLite to reuse (the disk does not see it)
        try:
            wal_size = os.path.getsize(self.store.wal)
        except OSError:
            wal_size = 0
        return (pages - free) * page_size + wal_size

    def _disk(self) -> tuple[int, int]:
        """(free bytes, filesystem size) of the state directory's filesystem."""
        st = os.statvfs(self.store.path.parent)
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize

    def _reserve(self) -> int:
        return min(self.cfg.disk_reserve_bytes, self._disk()[1] // 8)

    def _disk_nearly_full(self) -> bool:
        return self._disk()[0] < max(self._reserve() // 2, 64 << 10)

    def ensure_ballast(self) -> None:
        """The reserve file, made (again) only while there is plenty of room."""
        reserve = self._reserve()
        if reserve <= 0 or self.ballast.exists() or self._disk()[0] < 3 * reserve:
            return
        try:
            fd = os.open(self.ballast, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return
        try:
            try:
                os.posix_fallocate(fd, 0, reserve)
            except (AttributeError, OSError):
                zeros = bytes(1 << 20)
                for off in range(0, reserve, len(zeros)):
                    os.write(fd, zeros[:min(len(zeros), reserve - off)])
            os.fsync(fd)
        except OSError as e:
            os.close(fd)
            self.ballast.unlink(missing_ok=True)
            log.warning("reserve file not made", extra={"path": str(self.ballast), "error": str(e)})
            return
        os.close(fd)

    def quota(self) -> int:
        """The effective quota: the configured one, or half the room the disk has (its free space and what the store
        holds, less the reserve), whichever is smaller. Half, because in WAL mode deleting (acknowledged outbox
        rows, evictions) first writes the pages it changes to the WAL: the store must always be able to delete all
        it holds. The reserve file, while it exists, already holds the reserve."""
        free, _ = self._disk()
        held = self.ballast.exists()
        room = self.used + self.reusable + free - (0 if held else self._reserve())
        return min(self.cfg.quota_bytes, room // 2)

    def room_for_writes(self, conn: sqlite3.Connection, n_readings: int) -> int | None:
        """Before a commit that writes readings: at the effective quota, hold new readings back (backpressure) or
        make room now (evict) — not a second later, when the disk may have filled. Returns the bytes the writes may
        still take where that is close to the quota (backpressure), else None."""
        self.used = self.used_bytes(conn)
        self.limit = self.quota()
        if self.used >= self.limit:
            if self.cfg.at_quota == "backpressure":
                self.set_full(True)
            else:
                self.enforce_quota(conn)
        if self.cfg.at_quota == "backpressure" and self.used + n_readings * MAX_READING_BYTES > self.limit:
            return self.limit - self.used
        return None

    def set_full(self, full: bool) -> None:
        if full == self.full:
            return
        self.full = full
        self.metrics.store_full.set(1 if full else 0)
        if full:
            self.full_log.warning("store_full", "store at its quota: new readings wait with their source",
                                  used_bytes=self.used, quota_bytes=self.limit,
                                  outbox_readings=self.store.outbox_readings)
        else:
            log.info("store below its quota again: taking readings", extra={"used_bytes": self.used})

    def disk_full(self, conn: sqlite3.Connection) -> bool:
        """After a failed commit or maintenance pass: is the disk full? Then give up the reserve file (so that
        acknowledgements and deletes can commit), shrink the WAL, and hold new readings back (backpressure) or evict
        at the next pass. Classified by the disk's free space, not by the error's text."""
        if not self._disk_nearly_full():
            return False
        if self.ballast.exists():
            self.ballast.unlink()
            log.warning("disk full: released the reserve file so acknowledgements and deletes still commit",
                        extra={"path": str(self.ballast)})
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            pass
        if self.cfg.at_quota == "backpressure":
            self.set_full(True)
        return True

    def full_reason(self) -> str:
        return (f"the store is at its quota ({self.limit} bytes: store.quota_bytes or the free disk less "
                "store.disk_reserve_bytes) and store.at_quota = backpressure: the readings wait with their source "
                "until the cloud's acknowledgements free room")

    def enforce_quota(self, conn: sqlite3.Connection) -> None:
        """Over the effective quota: first drop window rows the cloud already has, then log lines (their room is
        given up before any reading's); then, with store.at_quota = evict, the oldest outbox rows (and their window
        rows) until 10 % under the quota, counted and logged; with backpressure, new readings are refused (their
        sources keep them) until 10 % under. The reserve file is made again once there is room."""
        store = self.store
        self.used = self.used_bytes(conn)
        quota = self.limit = self.quota()
        self.ensure_ballast()
        if self.used <= quota and not self.full:
            return
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        target = int(quota * 0.9)
        n = conn.execute("DELETE FROM readings WHERE seq <= ?", (store.acked_seq,)).rowcount
        if n > 0:
            self.metrics.window_evicted.labels("quota").inc(n)
        if store.log_bytes and self.used_bytes(conn) > target:
            conn.execute("BEGIN IMMEDIATE")
            gone, lines = store.drop_logs(conn, store.log_bytes)
            conn.execute("COMMIT")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            store.log_bytes -= gone
            self.metrics.logs_dropped.labels("quota").inc(lines)
        if self.cfg.at_quota == "backpressure":
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self.used = self.used_bytes(conn)
            self.set_full(self.used > target)
            return
        evicted = 0
        step = max(1, store.outbox_readings // self.cfg.outbox_chunk_readings // 10)
        while self.used_bytes(conn) > target:
            rows = conn.execute("SELECT first_seq, last_seq, count, length(payload) FROM outbox ORDER BY first_seq "
                                "LIMIT ?", (step,)).fetchall()
            if not rows:
                # nothing left for the cloud: trim the window alone
                lo = conn.execute("SELECT min(seq) FROM readings").fetchone()[0]
                if lo is None:
                    break
                k = conn.execute("DELETE FROM readings WHERE seq < ?", (lo + 10000,)).rowcount
                self.metrics.window_evicted.labels("quota").inc(k)
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                continue
            upto = rows[-1][1]
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("DELETE FROM outbox WHERE first_seq <= ?", (rows[-1][0],))
            conn.execute("DELETE FROM readings WHERE seq <= ?", (upto,))
            conn.execute("COMMIT")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            cnt = sum(r[2] for r in rows)
            store.evicted(rows[-1][0])
            evicted += cnt
            store.outbox_readings -= cnt
            store.outbox_bytes -= sum(r[3] for r in rows)
        self.used = self.used_bytes(conn)
        if evicted:
            self.metrics.outbox_evicted.inc(evicted)
            log.warning("disk quota reached: evicted the oldest outbox readings; they will not reach the cloud",
                        extra={"evicted": evicted, "quota_bytes": quota, "used_bytes": self.used})

    def retention(self, conn: sqlite3.Connection) -> None:
        """The readings window within store.retention_s (by (time, seq) marks: a primary-key range delete) and
        store.retention_rows."""
        next_seq = self.store.next_seq
        now = time.time_ns()
        last = conn.execute("SELECT max(ts_ns) FROM seq_marks").fetchone()[0]
        if last is None or now - last >= 60 * 1_000_000_000:
            conn.execute("INSERT OR REPLACE INTO seq_marks VALUES (?, ?)", (now, next_seq))
        cutoff_ns = now - self.cfg.retention_s * 1_000_000_000
        row = conn.execute("SELECT max(seq) FROM seq_marks WHERE ts_ns <= ?", (cutoff_ns,)).fetchone()
        by_age = row[0] or 0
        by_rows = next_seq - self.cfg.retention_rows
        for reason, below in (("age", by_age), ("rows", by_rows)):
            if below > 0:
                n = conn.execute("DELETE FROM readings WHERE seq < ?", (below,)).rowcount
                if n > 0:
                    self.metrics.window_evicted.labels(reason).inc(n)
        conn.execute("DELETE FROM seq_marks WHERE ts_ns < ?", (cutoff_ns - 86400 * 1_000_000_000,))
