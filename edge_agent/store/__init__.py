"""The durable store: SQLite in WAL mode, one writer thread, batched commits — behind this one facade.

Rooms: `writer.py` the writer thread and its batching; `jobs.py` every kind of job, declared once (fields, SQL,
result, lazy or not); `registry.py` the device registry and what it admits; `forward.py` what of the readings
goes to the outbox (the forwarding rules); `space.py` the quota, the reserve file,
backpressure or eviction, retention; `encoding.py` the wire encoding of readings for the cloud.

Tables
- `readings`: the local window (seq, series, ts_ns, value, quality), `series` being the id of the
  (device, point) row in `points`; no secondary index (an index costs more than the row itself at
  ingest rates); retention by age and by row count.
- `outbox`: what the cloud has not acknowledged, as pre-encoded JSON chunks of consecutive seqs
  (first_seq, last_seq, count, payload). A row leaves only when the uplink reports the cloud's PUBACK
  for it, or when the disk quota evicts it (counted, logged).
- `devices`, `points`: the registry, filled as readings arrive.
- `dead_letters`: rejected payloads, bounded.
- `requests`: the ids of changing requests, committed before they run, with their reply once they have one:
  a request resent after a crash is answered from here, never run twice (`requests_keep_s`, `requests_max`).
- `alerts`: alerts and events the cloud has not acknowledged (ids from `meta.next_alert_id`, never reused, so the
  uplink's cursor can never skip one); `alert_log`: the last `rules.history_max` alerts, for `alerts.list`.
- `rules`: the rules added by command; `logs`: log lines for the cloud, within their room (a quarter of the quota at
  most, given up first at the quota).
- `forward_state`: per series, what the forwarding rules need (the last value sent, the open interval; forward.py),
  written in the same transaction as the readings that changed it; bounded by the registry.
- `meta`: the next seq and the like; `seq_marks`: (time, seq) marks that make age-based retention a primary-key
  range delete.

Durability: `synchronous=FULL` by default, so a commit is on disk (the WAL is fsynced) before the
writer reports it, and a reading is acknowledged to its source only after that. A power cut then
loses nothing acknowledged; it costs the unacknowledged messages in flight, which the source
redelivers. With `synchronous=NORMAL` commits are cheaper but the last few (those since the last
WAL checkpoint sync) can be rolled back by a power cut although they were acknowledged.

All SQLite work happens on the writer thread (writes) and one reader thread (queries); the event
loop only awaits futures.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from edge_agent.config import ForwardRuleConfig, StoreConfig
from edge_agent.metrics import Metrics
from edge_agent.records import Reading, StoreError
from edge_agent.store import jobs
from edge_agent.store.jobs import Alert, OutboxRow
from edge_agent.store.forward import Forwarder, Rule
from edge_agent.store.registry import Registry
from edge_agent.store.space import Space
from edge_agent.store.writer import STOP, Writer

__all__ = ["Store", "StoreError", "OutboxRow", "Alert"]

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS devices (
    device TEXT PRIMARY KEY, source TEXT NOT NULL, first_seen_ns INTEGER NOT NULL, last_seen_ns INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS points (
    id INTEGER PRIMARY KEY, device TEXT NOT NULL, point TEXT NOT NULL, unit TEXT, first_seen_ns INTEGER NOT NULL,
    last_seen_ns INTEGER NOT NULL, UNIQUE (device, point));
CREATE TABLE IF NOT EXISTS readings (
    seq INTEGER PRIMARY KEY, series INTEGER NOT NULL, ts_ns INTEGER NOT NULL, value, quality TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    first_seq INTEGER PRIMARY KEY, last_seq INTEGER NOT NULL, count INTEGER NOT NULL, payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY, ts_ns INTEGER NOT NULL, source TEXT NOT NULL, topic TEXT NOT NULL,
    reason TEXT NOT NULL, detail TEXT NOT NULL, payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS seq_marks (ts_ns INTEGER PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS alerts (id INTEGER PRIMARY KEY, payload BLOB NOT NULL, topic TEXT NOT NULL DEFAULT 'alerts');
CREATE TABLE IF NOT EXISTS alert_log (
    id INTEGER PRIMARY KEY, rule TEXT NOT NULL, device TEXT NOT NULL, state TEXT NOT NULL, payload BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS rules (id TEXT PRIMARY KEY, doc TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS logs (id INTEGER PRIMARY KEY, line BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS forward_state (
    device TEXT NOT NULL, point TEXT NOT NULL, state TEXT NOT NULL, PRIMARY KEY (device, point)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS requests (
    name TEXT NOT NULL, rid TEXT NOT NULL, ts_ns INTEGER NOT NULL, reply BLOB, PRIMARY KEY (name, rid)) WITHOUT ROWID;
"""

TAIL_MAX_BYTES = 4 << 20  # the newest outbox rows kept in memory for the uplink (beyond, it reads them from SQLite)
LOG_QUEUE_MAX = 20_000  # jobs waiting for the writer beyond which log lines are dropped and counted (never blocks)


class Store:
    def __init__(self, cfg: StoreConfig, state_dir: str | Path, metrics: Metrics,
                 configured_devices: frozenset[str] = frozenset(), *, alerts_max: int = 10_000,
                 alert_history_max: int = 1000, requests_keep_s: float = 600.0, requests_max: int = 1000,
                 log_quota: int = 16 << 20, forward_rules: list | None = None, encoding: str = "json") -> None:
        """The limits that come from other sections: rules.max_pending_alerts and history_max, commands.dedup_window_s
        and dedup_max (how long a changing request's id is kept), log.ship_quota_bytes (0: no log lines kept),
        forward.rule (the config's forwarding rules), uplink.encoding (the outbox rows' form: json or columns)."""
        self.cfg = cfg
        self.path = Path(state_dir) / "edge-agent.db"
        self.wal = str(self.path) + "-wal"
        self.metrics = metrics
        self.queue: queue.SimpleQueue = queue.SimpleQueue()  # unbounded: writers are bounded by _slots
        self._slots: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer: threading.Thread | None = None
        self._reader_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._rconn: sqlite3.Connection | None = None
        self.new_data: asyncio.Event | None = None
        self.new_alert: asyncio.Event | None = None
        self.new_log: asyncio.Event | None = None
        self.alerts_max, self.alert_history_max = alerts_max, alert_history_max
        self.requests_keep_s, self.requests_max = requests_keep_s, requests_max
        self.next_alert_id = 1
        self.next_log_id = 1
        self.log_bytes = 0                # bytes of log lines kept for the cloud
        self.log_quota = log_quota        # log.ship_quota_bytes (within log_room())
        self.log_acked = 0                # the cloud acknowledged log lines up to here (kept in meta)
        self.next_seq = 1
        self.outbox_readings = 0
        self.outbox_bytes = 0
        self.acked_seq = 0
        self.registry = Registry(cfg, metrics, configured_devices)
        self.forward = Forwarder(forward_rules or [], metrics, cfg.max_points)
        self.encoding = encoding
        self._forward_lock = asyncio.Lock()  # forward.set/remove: one change of the list at a time
        self.space = Space(self)
        self.writer = Writer(self)
        # the newest committed outbox rows, consecutive (loop thread only): the uplink reads these without a trip
        # to the reader thread and SQLite; bounded by TAIL_MAX_BYTES, oldest dropped first
        self._tail: collections.deque[OutboxRow] = collections.deque()
        self._tail_bytes = 0

    @property
    def full(self) -> bool:
        """At the quota with store.at_quota = backpressure: new readings wait with their source."""
        return self.space.full

    # -- lifecycle -----------------------------------------------------------------------------
    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._slots = asyncio.Semaphore(self.cfg.queue_max_batches)
        self.new_data = asyncio.Event()
        self.new_alert = asyncio.Event()
        self.new_log = asyncio.Event()
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        ready: concurrent.futures.Future = concurrent.futures.Future()
        self._writer = threading.Thread(target=self.writer.run, args=(ready,), name="store-writer", daemon=True)
        self._writer.start()
        await asyncio.wrap_future(ready)
        self._reader_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="store-reader")
        await self._read(self._open_reader)
        log.info("store open", extra={"path": str(self.path), "next_seq": self.next_seq,
                                      "outbox_readings": self.outbox_readings})

    def connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        # a small filesystem: checkpoint the WAL sooner than every 1,000 pages (4 MiB), so it never holds much of it
        st = os.statvfs(self.path.parent)
        pages = st.f_blocks * st.f_frsize // 4096 // 64
        if pages < 1000:
            conn.execute(f"PRAGMA wal_autocheckpoint={max(16, pages)}")
        conn.execute(f"PRAGMA synchronous={self.cfg.synchronous.upper()}")
        # the WAL counts against the quota: keep it to a quarter of it (at most 64 MiB) after checkpoints
        conn.execute(f"PRAGMA journal_size_limit={min(64 << 20, self.cfg.quota_bytes // 4)}")
        conn.execute("PRAGMA foreign_keys=OFF")
        return conn

    def create(self, conn: sqlite3.Connection) -> None:
        """(writer thread) The tables, and the state kept in them."""
        conn.executescript(SCHEMA)
        if "topic" not in {r[1] for r in conn.execute("PRAGMA table_info(alerts)")}:  # a store from before events
            conn.execute("ALTER TABLE alerts ADD COLUMN topic TEXT NOT NULL DEFAULT 'alerts'")
        row = conn.execute("SELECT value FROM meta WHERE key='next_seq'").fetchone()
        self.next_seq = int(row[0]) if row else 1
        row = conn.execute("SELECT value FROM meta WHERE key='acked_seq'").fetchone()
        self.acked_seq = int(row[0]) if row else 0
        row = conn.execute("SELECT max(coalesce((SELECT value FROM meta WHERE key='next_alert_id'), 1), "
                           "coalesce((SELECT max(id) + 1 FROM alerts), 1))").fetchone()
        self.next_alert_id = int(row[0])
        row = conn.execute("SELECT max(coalesce((SELECT value FROM meta WHERE key='next_log_id'), 1), "
                           "coalesce((SELECT max(id) + 1 FROM logs), 1)), "
                           "(SELECT coalesce(sum(length(line)), 0) FROM logs)").fetchone()
        self.next_log_id, self.log_bytes = int(row[0]), int(row[1])
        row = conn.execute("SELECT value FROM meta WHERE key='log_acked'").fetchone()
        self.log_acked = int(row[0]) if row else 0
        n, b = conn.execute("SELECT coalesce(sum(count),0), coalesce(sum(length(payload)),0) FROM outbox").fetchone()
        self.outbox_readings, self.outbox_bytes = n, b
        self.registry.load(conn)
        self.forward.load(conn)
        self.publish_gauges(conn)

    def _open_reader(self) -> None:
        self._rconn = self.connect()
        self._rconn.execute("PRAGMA query_only=ON")

    async def close(self) -> None:
        """Commit everything queued, then stop the writer and close the connections."""
        if self._writer is not None:
            self.queue.put(STOP)
            await asyncio.to_thread(self._writer.join)
            self._writer = None
        if self._reader_pool is not None:
            if self._rconn is not None:
                await self._read(self._rconn.close)
            self._reader_pool.shutdown(wait=True)
            self._reader_pool = None
        log.info("store closed", extra={"next_seq": self.next_seq})

    # -- handing jobs to the writer ------------------------------------------------------------------
    def put(self, job: jobs.Job, since: float | None = None) -> None:
        """Hand a job to the writer (from any thread), with the time it was handed over (or `since`): its commit's
        deadline counts from then."""
        job.since = time.monotonic() if since is None else since
        self.queue.put(job)

    async def _wait(self, job: jobs.Job, since: float | None = None, slot: bool = False) -> Any:
        """Hand a job over and await what it resolves to (`slot`: within store.queue_max_batches)."""
        assert self._loop is not None and self._slots is not None
        if slot:
            async with self._slots:
                job.fut = self._loop.create_future()
                self.put(job, since)
                return await job.fut
        job.fut = self._loop.create_future()
        self.put(job, since)
        return await job.fut

    async def write(self, readings: list[Reading]) -> int:
        """Commit readings; returns the seq of the last one once it is durable."""
        return (await self.commit(readings))[0]

    async def commit(self, readings: list[Reading], since: float | None = None) -> tuple[int, list[Reading]]:
        """Commit readings; once durable, returns the last seq and the readings the registry took (refused ones are
        counted and dead-lettered: see registry.py). `since`: the monotonic time the oldest of them arrived, where
        the caller held them to gather a batch (batch_max_delay_ms counts from then; default: now)."""
        return await self._wait(jobs.WriteReadings(readings), since, slot=True)

    async def dead_letter(self, source: str, topic: str, reason: str, detail: str, payload: bytes) -> None:
        """Keep a rejected payload (truncated) in the bounded dead-letter table."""
        if self.cfg.dead_letter_rows == 0:
            return
        await self._wait(jobs.DeadLetter((time.time_ns(), source, topic, reason, detail[:500],
                                          bytes(payload[:self.cfg.dead_letter_payload_bytes]))), slot=True)

    def ack_outbox(self, upto_seq: int) -> None:
        """The cloud acknowledged every reading up to `upto_seq`: drop those outbox rows (in the next commit)."""
        self.put(jobs.OutboxAck(upto_seq))

    def alert(self, payload: bytes, rule: str, device: str, state: str) -> None:
        """Keep an alert for the cloud and in the alert log (in the next commit; never blocks the caller)."""
        self.put(jobs.KeepAlert(Alert(payload, rule, device, state)))

    def event(self, topic: str, payload: bytes) -> None:
        """Keep an event for the cloud's <prefix>/<gateway>/<topic>, behind and with the alerts (same bound, same
        order, sent after the cloud's PUBACK; in the next commit; never blocks the caller)."""
        self.put(jobs.KeepAlert(Alert(payload, "", "", "", topic)))

    def ack_alerts(self, upto_id: int) -> None:
        self.put(jobs.AlertAck(upto_id))

    def log_line(self, line: bytes) -> None:
        """Keep a log line for the cloud (from any thread; never blocks: beyond LOG_QUEUE_MAX jobs waiting for the
        writer, the line is dropped and counted)."""
        if self.queue.qsize() >= LOG_QUEUE_MAX:  # the writer is that far behind: a log line is what gives way
            self.metrics.logs_dropped.labels("queue").inc()
            return
        self.put(jobs.LogLine(line))

    def ack_logs(self, upto_id: int) -> None:
        self.put(jobs.LogAck(upto_id))

    async def set_meta(self, key: str, value: Any) -> None:
        """Keep a small JSON value across restarts (None deletes it); returns once committed."""
        await self._wait(jobs.SetMeta(key, None if value is None else json.dumps(value)))

    async def get_meta(self, key: str) -> Any:
        rows = await self.query("SELECT value FROM meta WHERE key = ?", (f"x.{key}",))
        return json.loads(rows[0][0]) if rows else None

    async def save_rule(self, rule_id: str, doc: str | None) -> None:
        """Store (doc) or delete (None) a rule added by command; returns once committed."""
        await self._wait(jobs.SaveRule(rule_id, doc))

    async def load_rules(self) -> list[str]:
        return [d for (d,) in await self.query("SELECT doc FROM rules ORDER BY id")]

    async def take_request(self, name: str, rid: str) -> bytes | None:
        """Commit a changing request's id before it runs. None: new, run it. Else it was taken before (within
        requests_keep_s): its reply, or b"" when it never got one (the agent stopped while it ran)."""
        return await self._wait(jobs.TakeRequest(name, rid))

    def request_reply(self, name: str, rid: str, reply: bytes) -> None:
        self.put(jobs.RequestReply(name, rid, reply))

    async def forget_device(self, device: str) -> int | None:
        """Remove a device and its series from the registry (devices.forget): the number of series it had, or None
        when it was not known."""
        return await self._wait(jobs.ForgetDevice(device))

    # -- forwarding rules ---------------------------------------------------------------------------
    def forward_rules(self) -> list[dict]:
        """The forwarding rules in the order they match: the command ones (forward.set), then the config's."""
        return [{**{k: v for k, v in r.__dict__.items() if k not in ("silence_ns", "interval_ns", "pct")},
                 "deadband_pct": r.pct, "max_silence_s": r.silence_ns / 1e9, "min_interval_s": r.interval_ns / 1e9}
                for r in self.forward.rules]

    async def forward_set(self, rc: ForwardRuleConfig, max_rules: int) -> dict:
        """Add or replace (same id, same place) a forwarding rule sent by command; it decides from the next commit on.
        PermissionError: the id is a config rule's, or forward.max_command_rules are held."""
        async with self._forward_lock:
            if any(r.id == rc.id for r in self.forward.config_rules):
                raise PermissionError(f"rule {rc.id!r} is in the config file: change it there")
            rules = list(self.forward.command_rules)
            rule = Rule.of(rc, "command")
            at = next((i for i, r in enumerate(rules) if r.id == rc.id), None)
            if at is None:
                if len(rules) >= max_rules:
                    raise PermissionError(f"forward.max_command_rules ({max_rules}) rules are held; remove one first")
                rules.append(rule)
            else:
                rules[at] = rule
            await self._wait(jobs.SetForwardRules(tuple(rules)))
        return next(r for r in self.forward_rules() if r["id"] == rc.id)

    async def forward_remove(self, rule_id: str) -> bool:
        """Remove a forwarding rule sent by command (False: none by that id). PermissionError: a config rule."""
        async with self._forward_lock:
            if any(r.id == rule_id for r in self.forward.config_rules):
                raise PermissionError(f"rule {rule_id!r} is in the config file: change it there")
            rules = [r for r in self.forward.command_rules if r.id != rule_id]
            if len(rules) == len(self.forward.command_rules):
                return False
            await self._wait(jobs.SetForwardRules(tuple(rules)))
        return True

    # -- what the uplink awaits ---------------------------------------------------------------------
    def head(self, kind: str) -> int:
        """The newest committed id of `kind`: readings (seq), alerts (alerts and events), logs."""
        return {"readings": self.next_seq, "alerts": self.next_alert_id, "logs": self.next_log_id}[kind] - 1

    async def committed_after(self, kind: str, after: int) -> None:
        """Returns once something of `kind` newer than `after` is committed (at once if it already is)."""
        event = {"readings": self.new_data, "alerts": self.new_alert, "logs": self.new_log}[kind]
        assert event is not None
        while self.head(kind) <= after:
            event.clear()
            if self.head(kind) > after:
                return
            await event.wait()

    # -- the writer's side: answers, log room -----------------------------------------------------
    def resolve(self, results: list, error: BaseException | None, notify: set[str] = frozenset(),
                rows: list[OutboxRow] | None = None, acked: int = 0) -> None:
        """(writer thread) Answer futures and wake the pumps, on the loop."""
        def done() -> None:
            if acked:
                self._drop_tail(acked)
            if rows:
                self._to_tail(rows)
            for fut, value in results:
                if fut is not None and not fut.done():
                    if error is None:
                        fut.set_result(value)
                    else:
                        fut.set_exception(error)
            for name, event in (("data", self.new_data), ("alert", self.new_alert), ("log", self.new_log)):
                if name in notify and event is not None:
                    event.set()
        if results or notify or rows or acked:
            assert self._loop is not None
            try:
                self._loop.call_soon_threadsafe(done)
            except RuntimeError:  # loop closed during shutdown
                pass

    def evicted(self, upto_first_seq: int) -> None:
        """(writer thread) The quota evicted outbox rows: the uplink never serves them from memory after that."""
        try:
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._drop_tail, upto_first_seq)
        except RuntimeError:  # the loop closed during shutdown: the tail goes with it
            pass

    def log_room(self) -> int:
        """The bytes log lines may hold: log.ship_quota_bytes, and never more than a quarter of the store's effective
        quota — their room comes out of the quota, so a log storm cannot take the readings' room."""
        return min(self.log_quota, self.space.limit // 4)

    @staticmethod
    def drop_logs(conn: sqlite3.Connection, excess: int) -> tuple[int, int]:
        """Delete the oldest log lines until `excess` bytes are gone (or none is left): (bytes, lines) dropped."""
        gone = n = upto = 0
        for i, size in conn.execute("SELECT id, length(line) FROM logs ORDER BY id"):
            gone += size
            n += 1
            upto = i
            if gone >= excess:
                break
        if n:
            conn.execute("DELETE FROM logs WHERE id <= ?", (upto,))
        return gone, n

    def publish_gauges(self, conn: sqlite3.Connection) -> None:
        self.metrics.store_bytes.set(self.space.used_bytes(conn))
        self.metrics.outbox_readings.set(self.outbox_readings)
        self.metrics.outbox_bytes.set(self.outbox_bytes)

    # -- reads (the reader thread) ------------------------------------------------------------------
    async def read_logs(self, after_id: int, max_bytes: int) -> list[tuple[int, bytes]]:
        """Log lines after `after_id`, oldest first: at least one, then up to `max_bytes`."""
        def read() -> list[tuple[int, bytes]]:
            out, size = [], 0
            for i, line in self._rconn.execute(  # type: ignore[union-attr]
                    "SELECT id, line FROM logs WHERE id > ? ORDER BY id LIMIT 10000", (after_id,)):
                if out and size + len(line) > max_bytes:
                    break
                out.append((i, line))
                size += len(line)
            return out
        return await self._read(read)

    async def read_alerts(self, after_id: int = 0, limit: int = 100) -> list[tuple[int, str, bytes]]:
        """(id, topic, payload) of the alerts and events waiting for the cloud, oldest first."""
        return await self._read(lambda: self._rconn.execute(  # type: ignore[union-attr]
            "SELECT id, topic, payload FROM alerts WHERE id > ? ORDER BY id LIMIT ?", (after_id, limit)).fetchall())

    async def alert_history(self, rules: list[str], device: str | None, cleared: int) -> tuple[list[bytes], list[bytes]]:
        """From the alert log: the latest firing alert of each of `rules`, and the last `cleared` cleared alerts
        (oldest first), of `device` alone where one is named."""
        def read() -> tuple[list[bytes], list[bytes]]:
            c = self._rconn
            assert c is not None
            dev = "" if device is None else " AND device = ?"
            args: tuple = () if device is None else (device,)
            firing = []
            for rule in rules[:1000]:
                row = c.execute(f"SELECT payload FROM alert_log WHERE rule = ? AND state = 'firing'{dev} "
                                "ORDER BY id DESC LIMIT 1", (rule, *args)).fetchone()
                if row is not None:
                    firing.append(row[0])
            done = [p for (p,) in c.execute(f"SELECT payload FROM alert_log WHERE state = 'cleared'{dev} "
                                            "ORDER BY id DESC LIMIT ?", (*args, cleared))]
            return firing, done[::-1]
        return await self._read(read)

    async def read_outbox(self, after_seq: int, max_readings: int, max_bytes: int) -> list[OutboxRow]:
        """Consecutive outbox rows after `after_seq`: at least one row, then up to the bounds. From the in-memory
        tail when it holds the next row (the usual case while the uplink keeps up), else from SQLite."""
        tail = self._tail
        while tail and tail[0].last_seq <= after_seq:
            self._tail_bytes -= len(tail.popleft().payload)
        if not tail and after_seq + 1 >= self.next_seq:
            return []  # nothing committed after it (a commit under way tells by new_data once it is in the tail)
        if not tail or tail[0].first_seq != after_seq + 1:
            return await self._read(self._read_outbox, after_seq, max_readings, max_bytes)
        out: list[OutboxRow] = []
        n = size = 0
        for row in tail:
            if out and (n + max(row.count, 1) > max_readings or size + len(row.payload) > max_bytes):
                break
            out.append(row)
            n += max(row.count, 1)  # a row of filtered readings only counts as one
            size += len(row.payload)
        return out

    def _to_tail(self, rows: list[OutboxRow]) -> None:
        """(loop thread) Rows just committed; a row that does not follow the tail's last starts it afresh."""
        tail = self._tail
        if tail and rows and rows[0].first_seq != tail[-1].last_seq + 1:
            tail.clear()
            self._tail_bytes = 0
        for row in rows:
            tail.append(row)
            self._tail_bytes += len(row.payload)
        while self._tail_bytes > TAIL_MAX_BYTES:
            self._tail_bytes -= len(tail.popleft().payload)

    def _drop_tail(self, upto_seq: int) -> None:
        """(loop thread) Outbox rows up to `upto_seq` were acknowledged or evicted: never served from memory after
        that."""
        while self._tail and self._tail[0].first_seq <= upto_seq:
            self._tail_bytes -= len(self._tail.popleft().payload)

    def _read_outbox(self, after_seq: int, max_readings: int, max_bytes: int) -> list[OutboxRow]:
        assert self._rconn is not None
        out: list[OutboxRow] = []
        n = size = 0
        cur = self._rconn.execute("SELECT first_seq, last_seq, count, payload FROM outbox WHERE first_seq > ? "
                                  "ORDER BY first_seq LIMIT 1000", (after_seq,))
        for first, last, count, payload in cur:
            if out and (n + max(count, 1) > max_readings or size + len(payload) > max_bytes):
                break
            out.append(OutboxRow(first, last, count, payload))
            n += max(count, 1)
            size += len(payload)
        cur.close()
        return out

    async def devices(self) -> list[dict]:
        """The registry: every device with its source, first/last seen and points."""
        def read() -> list[dict]:
            assert self._rconn is not None
            points: dict[str, list[dict]] = {}
            for d, p, u in self._rconn.execute("SELECT device, point, unit FROM points ORDER BY device, point"):
                points.setdefault(d, []).append({"point": p, "unit": u})
            return [{"device": d, "source": s, "first_seen_ns": f, "last_seen_ns": la, "points": points.get(d, [])}
                    for d, s, f, la in self._rconn.execute(
                        "SELECT device, source, first_seen_ns, last_seen_ns FROM devices ORDER BY device")]
        return await self._read(read)

    async def query_stats(self, device: str, point: str, agg: str, window_s: int, max_rows: int) -> dict:
        """last|min|max|avg|count of a point over the last `window_s` seconds of the readings window.
        Raises LookupError (unknown point) or OverflowError (the window holds more than `max_rows`)."""
        def read() -> dict:
            c = self._rconn
            assert c is not None
            row = c.execute("SELECT id, unit FROM points WHERE device=? AND point=?", (device, point)).fetchone()
            if row is None:
                raise LookupError(f"no point {point!r} on device {device!r}")
            series, unit = row
            now = time.time_ns()
            since = now - window_s * 1_000_000_000
            lo = c.execute("SELECT max(seq) FROM seq_marks WHERE ts_ns <= ?", (since,)).fetchone()[0] or 0
            hi = c.execute("SELECT max(seq) FROM readings").fetchone()[0] or 0
            if hi - lo > max_rows:
                raise OverflowError(f"the window holds about {hi - lo} readings, more than query_max_rows "
                                    f"{max_rows}; ask for a shorter window")
            where = "series=? AND seq>=? AND ts_ns>=?"
            args = (series, lo, since)
            if agg == "last":
                r = c.execute(f"SELECT value, ts_ns FROM readings WHERE {where} ORDER BY seq DESC LIMIT 1",
                              args).fetchone()
                value, ts = (r if r else (None, None))
                return {"device": device, "point": point, "agg": agg, "window_s": window_s, "value": value,
                        "ts": ts, "unit": unit}
            fn = {"min": "min(value)", "max": "max(value)", "avg": "avg(value)", "count": "count(*)"}[agg]
            numeric = "" if agg == "count" else " AND typeof(value) IN ('integer', 'real')"
            value, n = c.execute(f"SELECT {fn}, count(*) FROM readings WHERE {where}{numeric}", args).fetchone()
            return {"device": device, "point": point, "agg": agg, "window_s": window_s, "value": value,
                    "samples": n, "unit": unit}
        return await self._read(read)

    async def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Read-only query on the reader connection (for the CLI, commands and tests)."""
        return await self._read(lambda: self._rconn.execute(sql, params).fetchall())  # type: ignore[union-attr]

    async def _read(self, fn: Any, *args: Any) -> Any:
        assert self._reader_pool is not None
        return await asyncio.get_running_loop().run_in_executor(self._reader_pool, fn, *args)
