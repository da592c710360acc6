"""The writer thread: takes jobs, batches them by the load, commits each batch in one transaction, answers, and
keeps the tables within their bounds once a second. It knows no job kind (store/jobs.py declares them).

Batching that follows the load: a commit goes when it holds store.batch_max_rows readings or when a job taken has
waited its bound since it was handed over (store.batch_max_delay_ms; store.lazy_max_delay_ms for the lazy kinds),
never later; everything already queued then goes with it, up to the row bound.
"""
from __future__ import annotations

import concurrent.futures
import logging
import queue
import sqlite3
import time
from typing import TYPE_CHECKING

from edge_agent.records import StoreError
from edge_agent.store.jobs import KINDS, Job, LogLine, Tx, WriteReadings

if TYPE_CHECKING:
    from edge_agent.store import Store

log = logging.getLogger("edge_agent.store")

STOP = object()
MAINTENANCE_INTERVAL_S = 1.0


class Writer:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.retry: list[Job] = []  # acks and alerts of a commit the full disk failed: tried again each second
        self.last_maintenance = 0.0

    def run(self, ready: concurrent.futures.Future) -> None:
        store = self.store
        try:
            conn = store.connect()
            store.create(conn)
        except Exception as e:  # noqa: BLE001 - reported to open()
            ready.set_exception(StoreError(f"cannot open store {store.path}: {e}"))
            return
        store.space.ensure_ballast()
        ready.set_result(None)
        max_rows = store.cfg.batch_max_rows
        delay = store.cfg.batch_max_delay_ms / 1000
        lazy_delay = max(delay, store.cfg.lazy_max_delay_ms / 1000)
        q = store.queue
        jobs: list[Job] = []  # taken, not yet committed
        rows = 0
        due = 0.0  # when the oldest job taken must be in a commit
        stopping = False
        while not stopping:
            now = time.monotonic()
            if jobs and (rows >= max_rows or now >= due):
                while rows < max_rows:
                    try:
                        nxt = q.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is STOP:
                        stopping = True
                        break
                    jobs.append(nxt)
                    if isinstance(nxt, WriteReadings):
                        rows += len(nxt.readings)
                self.commit_guarded(conn, jobs)
                jobs, rows = [], 0
                if time.monotonic() - self.last_maintenance >= MAINTENANCE_INTERVAL_S:
                    self.maintain(conn)
                continue
            try:
                job = q.get(timeout=due - now if jobs else MAINTENANCE_INTERVAL_S)
            except queue.Empty:
                if not jobs:  # idle: retention and the quota still apply
                    self.maintain(conn)
                continue
            if job is STOP:
                break
            if isinstance(job, WriteReadings):
                rows += len(job.readings)
            job_due = job.since + (lazy_delay if job.lazy else delay)
            due = job_due if not jobs or job_due < due else due
            jobs.append(job)
        if jobs:
            self.commit_guarded(conn, jobs)
        # drain whatever arrived with or after STOP, so nothing handed to the store is dropped
        rest = []
        while True:
            try:
                j = q.get_nowait()
            except queue.Empty:
                break
            if j is not STOP:
                rest.append(j)
        if rest:
            self.commit_guarded(conn, rest)
        self.maintain(conn)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()

    def commit_guarded(self, conn: sqlite3.Connection, jobs: list[Job]) -> None:
        """A bug in a commit must not kill the writer thread (every later write would hang): fail these jobs'
        futures (their sources redeliver), roll back, keep serving."""
        try:
            self.commit(conn, jobs)
        except Exception as e:  # noqa: BLE001
            log.exception("store commit crashed; the sources will redeliver")
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            self.store.registry.load(conn)
            self.store.forward.abort()
            self.store.resolve([(j.fut, 0) for j in jobs if j.fut is not None],
                               StoreError(f"commit crashed: {type(e).__name__}: {e}"[:300],
                                          data=isinstance(e, (UnicodeError, OverflowError, TypeError, ValueError))))

    def commit(self, conn: sqlite3.Connection, jobs: list[Job]) -> None:
        store = self.store
        t0 = time.perf_counter()
        by_kind: dict[type, list[Job]] = {k: [] for k in KINDS}
        for job in jobs:
            by_kind[type(job)].append(job)  # a kind not in KINDS is a bug: KeyError, the commit fails
        tx = Tx(now_ns=time.time_ns(), seq=store.next_seq)
        store.forward.begin(tx.now_ns)
        for kind in KINDS:
            kind.gather(store, conn, tx, by_kind[kind])
        try:
            conn.execute("BEGIN IMMEDIATE")
            for kind in KINDS:
                kind.apply(store, conn, tx, by_kind[kind])
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            store.registry.load(conn)
            store.forward.abort()
            store.resolve([(f, 0) for f in tx.waiting], StoreError(store.space.full_reason(), full=True))
            if store.space.disk_full(conn):
                # acks and alerts have no one to redeliver them: kept for the next maintenance pass (once a second,
                # not at once: a disk that stays full must not spin the writer), bounded like the alerts table
                self.retry = (self.retry + [j for j in jobs if j.fut is None and not isinstance(j, LogLine)]
                              )[-(store.alerts_max + 1000):]
            lines = len(by_kind[LogLine])
            if lines:  # log lines are not kept through a failed commit: dropped, counted
                store.metrics.logs_dropped.labels("store_error").inc(lines)
            store.space.full_log.warning("commit_failed", "store commit failed; the sources will redeliver",
                                         error=str(e))
            store.resolve(tx.results, StoreError(f"commit failed: {e}",
                                                 data=isinstance(e, (sqlite3.InterfaceError, sqlite3.DataError))))
            return
        store.forward.committed()
        for kind in KINDS:
            kind.committed(store, tx, by_kind[kind])
        store.metrics.store_commits.inc()
        store.metrics.store_commit_seconds.observe(time.perf_counter() - t0)
        store.metrics.outbox_readings.set(store.outbox_readings)
        store.metrics.outbox_bytes.set(store.outbox_bytes)
        store.resolve(tx.results, None, notify=tx.notify, rows=tx.rows, acked=tx.acked)
        if tx.waiting:
            store.resolve([(f, 0) for f in tx.waiting], StoreError(store.space.full_reason(), full=True))

    def maintain(self, conn: sqlite3.Connection) -> None:
        store = self.store
        self.last_maintenance = time.monotonic()
        if self.retry:
            retry, self.retry = self.retry, []
            self.commit_guarded(conn, retry)
        try:
            store.registry.flush_seen(conn)
            store.space.retention(conn)
            store.space.enforce_quota(conn)
            for kind in KINDS:
                kind.maintain(store, conn)
            store.registry.expire(conn)
            store.publish_gauges(conn)
        except Exception as e:  # noqa: BLE001 - the writer thread must outlive any maintenance failure
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            if not store.space.disk_full(conn):
                store.space.full_log.warning("maintenance", "store maintenance failed",
                                             error=f"{type(e).__name__}: {e}"[:300])
