"""The durable store: SQLite in WAL mode, one writer thread, batched commits.

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
- `alerts`: alerts the cloud has not acknowledged (ids from `meta.next_alert_id`, never reused, so the uplink's
  cursor can never skip one); `alert_log`: the last `rules.history_max` alerts, for `alerts.list`.
- `meta`: the next seq; `seq_marks`: (time, seq) marks that make age-based retention a primary-key
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
import enum
import json
import logging
import math
import os
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_agent.config import StoreConfig
from edge_agent.logs import RateLimited
from edge_agent.metrics import Metrics
from edge_agent.records import Reading, StoreError

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
CREATE TABLE IF NOT EXISTS requests (
    name TEXT NOT NULL, rid TEXT NOT NULL, ts_ns INTEGER NOT NULL, reply BLOB, PRIMARY KEY (name, rid)) WITHOUT ROWID;
"""

_STOP = object()
MAINTENANCE_INTERVAL_S = 1.0
_MAX_READING_BYTES = 4 * (1024 + 400)  # a reading's most disk use: table row + outbox JSON, each in the WAL first


def _disk_bytes(readings: list[Reading]) -> int:
    """What committing these readings may take on disk: each is stored twice (the window and the outbox's JSON), and
    written to the WAL before the database file. Computed only near the quota."""
    return 4 * sum((len(r.value) if type(r.value) is str else 16) + len(r.device) + len(r.point) + 120
                   for r in readings)


class Job(enum.Enum):
    """What the writer thread is asked to do: a closed set; an unknown kind is a bug and raises."""
    WRITE = "write"            # readings to commit (a future: the last seq)
    DEAD_LETTER = "dead"       # a rejected payload to keep (a future)
    OUTBOX_ACK = "ack"         # the cloud acknowledged readings up to a seq
    ALERT = "alert"            # an alert for the cloud and the alert log
    ALERT_ACK = "alert_ack"    # the cloud acknowledged alerts up to an id
    RULE = "rule"              # a rule added or removed by command (a future)
    REQUEST = "request"        # take a request id: (name, rid) -> None (new) or its earlier reply (a future)
    REQUEST_REPLY = "reply"    # the reply of a taken request id
    EVENT = "event"            # an event for the cloud (topic, payload): model updates; not in the alert log
    META = "meta"              # (key, JSON value or None to delete) kept across restarts (a future)
    LOG = "log"                # a log line for the cloud (never blocks; bounded by log_quota)
    LOG_ACK = "log_ack"        # the cloud acknowledged log lines up to an id


# Jobs nobody waits on and that lose nothing by waiting: they ride along with the next commit of readings, or go on
# their own after store.lazy_max_delay_ms. The uplink remembers what the cloud acknowledged across reconnections, so
# a lazy acknowledgement re-sends nothing unless the agent dies before it commits (at least once, as always).
# Acknowledgements of alerts and log batches are not lazy: those pumps start from the store on each connection.
LAZY = frozenset({Job.OUTBOX_ACK, Job.LOG})


@dataclass(frozen=True)
class Alert:
    payload: bytes
    rule: str
    device: str
    state: str
    topic: str = "alerts"  # the subtopic it goes to (<prefix>/<gateway>/<topic>); only alerts enter the alert log


@dataclass
class OutboxRow:
    first_seq: int
    last_seq: int
    count: int
    payload: bytes


TAIL_MAX_BYTES = 4 << 20  # the newest outbox rows kept in memory for the uplink (beyond, it reads them from SQLite)
LOG_QUEUE_MAX = 20_000  # jobs waiting for the writer beyond which log lines are dropped and counted (never blocks)
_JSON_NAMES: dict[str, str] = {}
_SERIES_JSON: dict[tuple, tuple[str, str, str]] = {}  # (device, point, unit, source) -> the JSON around a value


def _json_name(s: str | None) -> str:
    v = _JSON_NAMES.get(s)  # type: ignore[arg-type]
    if v is None:
        if len(_JSON_NAMES) > 100_000:  # bounded: names are few, but never trust that
            _JSON_NAMES.clear()
        v = _JSON_NAMES[s] = json.dumps(s, ensure_ascii=False)  # type: ignore[index]
    return v


def _json_value(v: Any) -> tuple[str, bool]:
    """(JSON text, ok); non-finite floats (adapters reject them; this is the last guard) become null."""
    t = type(v)
    if t is float:
        return (repr(v), True) if math.isfinite(v) else ("null", False)
    if t is bool:
        return ("true" if v else "false"), True
    if t is int:
        return str(v), True
    return json.dumps(v, ensure_ascii=False), True


def encode_readings(first_seq: int, readings: list[Reading]) -> bytes:
    """JSON objects of consecutive readings from `first_seq`, comma-joined without the enclosing
    brackets, so that consecutive chunks concatenate into one array. Same output as json.dumps of
    {"seq", "device", "point", "value", "unit", "ts", "quality", "source"}, three times faster."""
    parts = []
    seq = first_seq
    pieces = _SERIES_JSON
    for r in readings:
        key = (r.device, r.point, r.unit, r.source)
        p = pieces.get(key)
        if p is None:
            if len(pieces) > 100_000:  # bounded, like _JSON_NAMES
                pieces.clear()
            p = pieces[key] = (f',"device":{_json_name(r.device)},"point":{_json_name(r.point)},"value":',
                               f',"unit":{_json_name(r.unit)},"ts":', f',"source":{_json_name(r.source)}}}')
        v = r.value
        t = type(v)
        if t is float and math.isfinite(v):
            value, ok = repr(v), True
        else:
            value, ok = _json_value(v)
        parts.append(f'{{"seq":{seq}{p[0]}{value}{p[1]}{r.ts_ns},"quality":'
                     f'{_json_name(r.quality if ok else "bad")}{p[2]}')
        seq += 1
    return ",".join(parts).encode()


class Store:
    def __init__(self, cfg: StoreConfig, state_dir: str | Path, metrics: Metrics,
                 configured_devices: frozenset[str] = frozenset()) -> None:
        self.cfg = cfg
        self.configured_devices = configured_devices  # the config names them: they register into the reserve
        self.path = Path(state_dir) / "edge-agent.db"
        self._wal = str(self.path) + "-wal"
        self.metrics = metrics
        self._q: queue.SimpleQueue = queue.SimpleQueue()  # unbounded: writers are bounded by _slots
        self._slots: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer: threading.Thread | None = None
        self._reader_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._rconn: sqlite3.Connection | None = None
        self.new_data: asyncio.Event | None = None
        self.new_alert: asyncio.Event | None = None
        self.alerts_max = 10_000
        self.alert_history_max = 1000
        self.requests_keep_s = 600.0
        self.requests_max = 1000
        self.next_alert_id = 1
        self.next_log_id = 1
        self.log_bytes = 0                # bytes of log lines kept for the cloud
        self.log_quota = 16 << 20         # beyond, the oldest lines go (counted): log.ship_quota_bytes
        self.log_acked = 0                # the cloud acknowledged log lines up to here (kept in meta)
        self.new_log: asyncio.Event | None = None
        self.next_seq = 1
        self.outbox_readings = 0
        self.outbox_bytes = 0
        self.acked_seq = 0
        self._known_devices: dict[str, str] = {}  # device -> the source that registered it (its owner)
        self._device_points: collections.Counter[str] = collections.Counter()  # device -> series it has
        self._new_devices: dict[str, collections.deque] = {}  # source -> when it registered its latest devices
        self._new_points: dict[str, collections.deque] = {}   # source -> when it registered its latest series
        self._last_expiry = 0.0
        self._used = 0
        self._reusable = 0
        self._limit = cfg.quota_bytes
        self.ballast = self.path.with_name("edge-agent.reserve")  # room set aside for acks and deletes on a full disk
        self.full = False  # at the quota with store.at_quota = backpressure: new readings wait with their source
        self._full_log = RateLimited(log, interval_s=60, burst=1)
        self._retry: list[tuple] = []  # acks and alerts of a commit the full disk failed: tried again each second
        # the newest committed outbox rows, consecutive (loop thread only): the uplink reads these without a trip
        # to the reader thread and SQLite; bounded by TAIL_MAX_BYTES, oldest dropped first
        self._tail: collections.deque[OutboxRow] = collections.deque()
        self._tail_bytes = 0
        self._series: dict[tuple[str, str], int] = {}
        self._seen_devices: dict[str, str] = {}                     # since the last maintenance pass
        self._seen_points: dict[tuple[str, str], str | None] = {}
        self._last_maintenance = 0.0
        self._last_refusal_log = 0.0

    # -- lifecycle -----------------------------------------------------------------------------
    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._slots = asyncio.Semaphore(self.cfg.queue_max_batches)
        self.new_data = asyncio.Event()
        self.new_alert = asyncio.Event()
        self.new_log = asyncio.Event()
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        ready: concurrent.futures.Future = concurrent.futures.Future()
        self._writer = threading.Thread(target=self._writer_main, args=(ready,), name="store-writer", daemon=True)
        self._writer.start()
        await asyncio.wrap_future(ready)
        self._reader_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="store-reader")
        await self._read(self._open_reader)
        log.info("store open", extra={"path": str(self.path), "next_seq": self.next_seq,
                                      "outbox_readings": self.outbox_readings})

    def _connect(self) -> sqlite3.Connection:
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

    def _open_reader(self) -> None:
        self._rconn = self._connect()
        self._rconn.execute("PRAGMA query_only=ON")

    async def close(self) -> None:
        """Commit everything queued, then stop the writer and close the connections."""
        if self._writer is not None:
            self._q.put(_STOP)
            await asyncio.to_thread(self._writer.join)
            self._writer = None
        if self._reader_pool is not None:
            if self._rconn is not None:
                await self._read(self._rconn.close)
            self._reader_pool.shutdown(wait=True)
            self._reader_pool = None
        log.info("store closed", extra={"next_seq": self.next_seq})

    # -- API for the event loop ------------------------------------------------------------------
    async def write(self, readings: list[Reading]) -> int:
        """Commit readings; returns the seq of the last one once it is durable."""
        return (await self.commit(readings))[0]

    async def commit(self, readings: list[Reading], since: float | None = None) -> tuple[int, list[Reading]]:
        """Commit readings; once durable, returns the last seq and the readings the registry took (refused ones are
        counted and dead-lettered: see _admit). `since`: the monotonic time the oldest of them arrived, where the
        caller held them to gather a batch (batch_max_delay_ms counts from then; default: now)."""
        assert self._slots is not None and self._loop is not None
        async with self._slots:
            fut = self._loop.create_future()
            self._put(Job.WRITE, readings, fut, since)
            return await fut

    async def dead_letter(self, source: str, topic: str, reason: str, detail: str, payload: bytes) -> None:
        """Keep a rejected payload (truncated) in the bounded dead-letter table."""
        if self.cfg.dead_letter_rows == 0:
            return
        assert self._slots is not None and self._loop is not None
        async with self._slots:
            fut = self._loop.create_future()
            self._put(Job.DEAD_LETTER, (time.time_ns(), source, topic, reason, detail[:500],
                               bytes(payload[:self.cfg.dead_letter_payload_bytes])), fut)
            await fut

    def _put(self, kind: Job, payload: Any, fut: asyncio.Future | None, since: float | None = None) -> None:
        """Hand a job to the writer (from any thread), with the time it was handed over (or `since`): its commit's
        deadline counts from then."""
        self._q.put((kind, payload, fut, time.monotonic() if since is None else since))

    def ack_outbox(self, upto_seq: int) -> None:
        """The cloud acknowledged every reading up to `upto_seq`: drop those outbox rows (in the next commit)."""
        self._put(Job.OUTBOX_ACK, upto_seq, None)

    def alert(self, payload: bytes, rule: str, device: str, state: str) -> None:
        """Keep an alert for the cloud and in the alert log (in the next commit; never blocks the caller)."""
        self._put(Job.ALERT, Alert(payload, rule, device, state), None)

    def log_line(self, line: bytes) -> None:
        """Keep a log line for the cloud (from any thread; never blocks: beyond LOG_QUEUE_MAX lines waiting for the
        writer, the line is dropped and counted)."""
        if self._q.qsize() >= LOG_QUEUE_MAX:  # the writer is that far behind: a log line is what gives way
            self.metrics.logs_dropped.labels("queue").inc()
            return
        self._put(Job.LOG, line, None)

    def ack_logs(self, upto_id: int) -> None:
        self._put(Job.LOG_ACK, upto_id, None)

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

    def event(self, topic: str, payload: bytes) -> None:
        """Keep an event for the cloud's <prefix>/<gateway>/<topic>, behind and with the alerts (same bound, same
        order, sent after the cloud's PUBACK; in the next commit; never blocks the caller)."""
        self._put(Job.EVENT, Alert(payload, "", "", "", topic), None)

    async def set_meta(self, key: str, value: Any) -> None:
        """Keep a small JSON value across restarts (None deletes it); returns once committed."""
        assert self._loop is not None
        fut = self._loop.create_future()
        self._put(Job.META, (key, None if value is None else json.dumps(value)), fut)
        await fut

    async def get_meta(self, key: str) -> Any:
        rows = await self.query("SELECT value FROM meta WHERE key = ?", (f"x.{key}",))
        return json.loads(rows[0][0]) if rows else None

    async def save_rule(self, rule_id: str, doc: str | None) -> None:
        """Store (doc) or delete (None) a rule added by command; returns once committed."""
        assert self._loop is not None
        fut = self._loop.create_future()
        self._put(Job.RULE, (rule_id, doc), fut)
        await fut

    async def take_request(self, name: str, rid: str) -> bytes | None:
        """Commit a changing request's id before it runs. None: new, run it. Else it was taken before (within
        requests_keep_s): its reply, or b"" when it never got one (the agent stopped while it ran)."""
        assert self._loop is not None
        fut = self._loop.create_future()
        self._put(Job.REQUEST, (name, rid), fut)
        return await fut

    def request_reply(self, name: str, rid: str, reply: bytes) -> None:
        self._put(Job.REQUEST_REPLY, (name, rid, reply), None)

    async def load_rules(self) -> list[str]:
        return [d for (d,) in await self.query("SELECT doc FROM rules ORDER BY id")]

    def ack_alerts(self, upto_id: int) -> None:
        self._put(Job.ALERT_ACK, upto_id, None)

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
            if out and (n + row.count > max_readings or size + len(row.payload) > max_bytes):
                break
            out.append(row)
            n += row.count
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
            if out and (n + count > max_readings or size + len(payload) > max_bytes):
                break
            out.append(OutboxRow(first, last, count, payload))
            n += count
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

    # -- writer thread ---------------------------------------------------------------------------
    def _writer_main(self, ready: concurrent.futures.Future) -> None:
        try:
            conn = self._connect()
            conn.executescript(SCHEMA)
            if "topic" not in {r[1] for r in conn.execute("PRAGMA table_info(alerts)")}:  # a store from before events
                conn.execute("ALTER TABLE alerts ADD COLUMN topic TEXT NOT NULL DEFAULT 'alerts'")
            self._load_state(conn)
        except Exception as e:  # noqa: BLE001 - reported to open()
            ready.set_exception(StoreError(f"cannot open store {self.path}: {e}"))
            return
        self._ensure_ballast()
        ready.set_result(None)
        max_rows = self.cfg.batch_max_rows
        delay = self.cfg.batch_max_delay_ms / 1000
        lazy_delay = max(delay, self.cfg.lazy_max_delay_ms / 1000)
        get = self._q.get
        jobs: list[tuple] = []  # taken, not yet committed
        rows = 0
        due = 0.0  # when the oldest job taken must be in a commit
        stopping = False
        while not stopping:
            # Batching that follows the load: a commit goes when it holds batch_max_rows readings or when a job
            # taken has waited its bound since it was handed over (batch_max_delay_ms; lazy_max_delay_ms for the
            # lazy kinds), never later; everything already queued then goes with it, up to the row bound.
            now = time.monotonic()
            if jobs and (rows >= max_rows or now >= due):
                while rows < max_rows:
                    try:
                        nxt = self._q.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is _STOP:
                        stopping = True
                        break
                    jobs.append(nxt)
                    if nxt[0] is Job.WRITE:
                        rows += len(nxt[1])
                self._commit_guarded(conn, jobs)
                jobs, rows = [], 0
                if time.monotonic() - self._last_maintenance >= MAINTENANCE_INTERVAL_S:
                    self._maintain(conn)
                continue
            try:
                job = get(timeout=due - now if jobs else MAINTENANCE_INTERVAL_S)
            except queue.Empty:
                if not jobs:  # idle: retention and the quota still apply
                    self._maintain(conn)
                continue
            if job is _STOP:
                break
            kind = job[0]
            if kind is Job.WRITE:
                rows += len(job[1])
            job_due = job[3] + (lazy_delay if kind in LAZY else delay)
            due = job_due if not jobs or job_due < due else due
            jobs.append(job)
        if jobs:
            self._commit_guarded(conn, jobs)
        # drain whatever arrived with or after STOP, so nothing handed to the store is dropped
        rest = []
        while True:
            try:
                j = self._q.get_nowait()
            except queue.Empty:
                break
            if j is not _STOP:
                rest.append(j)
        if rest:
            self._commit_guarded(conn, rest)
        self._maintain(conn)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()

    def _load_state(self, conn: sqlite3.Connection) -> None:
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
        self._load_registry(conn)
        self._publish_gauges(conn)

    def _commit_guarded(self, conn: sqlite3.Connection, jobs: list[tuple]) -> None:
        """A bug in a commit must not kill the writer thread (every later write would hang): fail
        these jobs' futures (their sources redeliver), roll back, keep serving."""
        try:
            self._commit(conn, jobs)
        except Exception as e:  # noqa: BLE001
            log.exception("store commit crashed; the sources will redeliver")
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            self._load_registry(conn)
            self._resolve([(job[2], 0) for job in jobs if job[2] is not None],
                          StoreError(f"commit crashed: {type(e).__name__}: {e}"[:300],
                                     data=isinstance(e, (UnicodeError, OverflowError, TypeError, ValueError))))

    def _load_registry(self, conn: sqlite3.Connection) -> None:
        self._known_devices = dict(conn.execute("SELECT device, source FROM devices"))
        self._series = {(d, p): i for i, d, p in conn.execute("SELECT id, device, point FROM points")}
        self._device_points = collections.Counter(d for d, _ in self._series)

    def _commit(self, conn: sqlite3.Connection, jobs: list[tuple]) -> None:
        t0 = time.perf_counter()
        writes: list[tuple[int, list[Reading]]] = []   # (first seq, readings)
        dead: list[tuple] = []
        alerts: list[Alert] = []
        metas: list[tuple[str, str | None]] = []
        lines: list[bytes] = []
        logs_acked = 0
        alerts_acked = 0
        rule_changes: list[tuple[str, str | None]] = []
        taken: list[tuple[tuple[str, str], asyncio.Future]] = []
        replies: list[tuple[bytes, str, str]] = []
        ack = 0
        results: list[tuple[asyncio.Future, int]] = []
        seq = self.next_seq
        now_ns = time.time_ns()
        fresh: tuple[dict, set, collections.Counter] = ({}, set(), collections.Counter())  # devices (-> source),
        # series and series per device this commit registers
        refused: dict[tuple[str, str, str, str], int] = {}  # (reason, source, device, point) -> readings
        waiting: list[asyncio.Future] = []  # writes refused while the store is full (backpressure)
        room = None  # bytes the writes of this commit may still take, where that is close to the quota
        if any(job[0] is Job.WRITE for job in jobs):
            self._check_room(conn)
            n = sum(len(p) for k, p, _, _ in jobs if k is Job.WRITE)
            if self.cfg.at_quota == "backpressure" and self._used + n * _MAX_READING_BYTES > self._limit:
                room = self._limit - self._used
        for kind, payload, fut, _ in jobs:
            if kind is Job.WRITE and payload and room is not None and not self.full:
                need = _disk_bytes(payload)
                if need > room:  # this write would not fit: it waits with its source, which may send less
                    waiting.append(fut)
                    self.metrics.readings_refused.labels("store_full").inc(len(payload))
                    continue
                room -= need
            if kind is Job.WRITE and self.full and payload:
                waiting.append(fut)
                self.metrics.readings_refused.labels("store_full").inc(len(payload))
                continue
            if kind is Job.WRITE:
                if payload:
                    payload = self._admit(payload, fresh, refused)
                if payload:
                    writes.append((seq, payload))
                    seq += len(payload)
                results.append((fut, (seq - 1, payload)))
            elif kind is Job.DEAD_LETTER:
                dead.append(payload)
                results.append((fut, 0))
            elif kind in (Job.ALERT, Job.EVENT):
                alerts.append(payload)
            elif kind is Job.META:
                metas.append(payload)
                results.append((fut, 0))
            elif kind is Job.LOG:
                lines.append(payload)
            elif kind is Job.LOG_ACK:
                logs_acked = max(logs_acked, payload)
            elif kind is Job.ALERT_ACK:
                alerts_acked = max(alerts_acked, payload)
            elif kind is Job.RULE:
                rule_changes.append(payload)
                results.append((fut, 0))
            elif kind is Job.OUTBOX_ACK:
                ack = max(ack, payload)
            elif kind is Job.REQUEST:
                taken.append((payload, fut))
            elif kind is Job.REQUEST_REPLY:
                replies.append((payload[2], payload[0], payload[1]))
            else:
                raise AssertionError(f"unknown store job {kind!r}")
        n_rows = seq - self.next_seq
        for (reason, source, device, point), n in (refused.items() if self.cfg.dead_letter_rows else ()):
            why = {"registry_full": f"{n} reading(s) of a new series refused: the registry holds store.max_devices = "
                                    f"{self.cfg.max_devices} devices and store.max_points = {self.cfg.max_points} "
                                    "series",
                   "device_points_full": f"{n} reading(s) of a new point refused: {device!r} has "
                                         f"store.max_points_per_device = {self.cfg.max_points_per_device} series",
                   "new_device_rate": f"{n} reading(s) of a new device refused: source {source!r} registered "
                                      f"store.new_devices_per_minute = {self.cfg.new_devices_per_minute} devices in "
                                      "the last minute",
                   "new_point_rate": f"{n} reading(s) of a new series refused: source {source!r} registered "
                                     f"store.new_points_per_minute = {self.cfg.new_points_per_minute} series in the "
                                     "last minute",
                   "source_mismatch": f"{n} reading(s) refused: device {device!r} belongs to source "
                                      f"{self._known_devices.get(device) or fresh[0].get(device)!r}, not "
                                      f"{source!r}"}[reason]
            dead.append((now_ns, source, f"{device}/{point}"[:256], reason, why, b""))
        chunk = self.cfg.outbox_chunk_readings
        out_rows: list[tuple] = []
        new_devices: list[tuple[str, str]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            if writes:
                series = self._register(conn, writes, now_ns, new_devices)
                conn.executemany("INSERT INTO readings VALUES (?,?,?,?,?)",
                                 [(first + i, series[(r.device, r.point)], r.ts_ns, r.value, r.quality)
                                  for first, rs in writes for i, r in enumerate(rs)])
                pending: list[Reading] = []
                start = writes[0][0]
                for first, rs in writes:  # chunks of consecutive seqs, at most `chunk` readings each
                    for r in rs:
                        pending.append(r)
                        if len(pending) == chunk:
                            out_rows.append((start, start + chunk - 1, chunk, encode_readings(start, pending)))
                            start += chunk
                            pending = []
                if pending:
                    out_rows.append((start, start + len(pending) - 1, len(pending), encode_readings(start, pending)))
                conn.executemany("INSERT INTO outbox VALUES (?,?,?,?)", out_rows)
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('next_seq', ?)", (seq,))
            if dead:
                conn.executemany("INSERT INTO dead_letters (ts_ns, source, topic, reason, detail, payload) "
                                 "VALUES (?,?,?,?,?,?)", dead)
            if alerts_acked:
                conn.execute("DELETE FROM alerts WHERE id <= ?", (alerts_acked,))
            for (name, rid), fut in taken:
                row = conn.execute("SELECT reply FROM requests WHERE name = ? AND rid = ? AND ts_ns >= ?",
                                   (name, rid, now_ns - int(self.requests_keep_s * 1e9))).fetchone()
                if row is None:
                    conn.execute("INSERT OR REPLACE INTO requests VALUES (?, ?, ?, NULL)", (name, rid, now_ns))
                results.append((fut, None if row is None else (row[0] or b"")))
            if replies:
                conn.executemany("UPDATE requests SET reply = ? WHERE name = ? AND rid = ?", replies)
            for rule_id, doc in rule_changes:
                if doc is None:
                    conn.execute("DELETE FROM rules WHERE id = ?", (rule_id,))
                else:
                    conn.execute("INSERT OR REPLACE INTO rules VALUES (?, ?)", (rule_id, doc))
            next_log_id, log_bytes, _dropped = self._commit_logs(conn, lines, logs_acked)
            for key, value in metas:
                if value is None:
                    conn.execute("DELETE FROM meta WHERE key = ?", (f"x.{key}",))
                else:
                    conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"x.{key}", value))
            next_alert_id = self.next_alert_id
            if alerts:
                ids = range(next_alert_id, next_alert_id + len(alerts))
                next_alert_id += len(alerts)
                conn.executemany("INSERT INTO alerts (id, payload, topic) VALUES (?, ?, ?)",
                                 [(i, a.payload, a.topic) for i, a in zip(ids, alerts)])
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('next_alert_id', ?)", (next_alert_id,))
                dropped = conn.execute("DELETE FROM alerts WHERE id <= ?", (next_alert_id - 1 - self.alerts_max,)).rowcount
                if dropped > 0:
                    self.metrics.alerts.labels("dropped").inc(dropped)
                conn.executemany("INSERT INTO alert_log (id, rule, device, state, payload) VALUES (?,?,?,?,?)",
                                 [(i, a.rule, a.device, a.state, a.payload) for i, a in zip(ids, alerts)
                                  if a.topic == "alerts"])
                conn.execute("DELETE FROM alert_log WHERE id <= ?", (next_alert_id - 1 - self.alert_history_max,))
            acked = (0, 0)
            if ack > self.acked_seq:
                acked = conn.execute("SELECT coalesce(sum(count),0), coalesce(sum(length(payload)),0) FROM outbox "
                                     "WHERE first_seq <= ?", (ack,)).fetchone()
                conn.execute("DELETE FROM outbox WHERE first_seq <= ?", (ack,))
                conn.execute("INSERT OR REPLACE INTO meta VALUES ('acked_seq', ?)", (ack,))
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            self._load_registry(conn)
            self._resolve([(f, 0) for f in waiting], StoreError(self._full_reason(), full=True))
            if self._disk_full(conn):
                # acks and alerts have no one to redeliver them: kept for the next maintenance pass (once a second,
                # not at once: a disk that stays full must not spin the writer), bounded like the alerts table
                self._retry = (self._retry + [j for j in jobs if j[2] is None and j[0] is not Job.LOG]
                               )[-(self.alerts_max + 1000):]
            if lines:  # log lines are not kept through a failed commit: dropped, counted
                self.metrics.logs_dropped.labels("store_error").inc(len(lines))
            self._full_log.warning("commit_failed", "store commit failed; the sources will redeliver",
                                   error=str(e))
            self._resolve(results, StoreError(f"commit failed: {e}",
                                              data=isinstance(e, (sqlite3.InterfaceError, sqlite3.DataError))))
            return
        self.next_seq = seq
        self.next_alert_id = next_alert_id
        self.next_log_id, self.log_bytes = next_log_id, log_bytes
        self.log_acked = max(self.log_acked, logs_acked)
        if ack > self.acked_seq:
            self.acked_seq = ack
            self.outbox_readings -= acked[0]
            self.outbox_bytes -= acked[1]
        if n_rows:
            self.outbox_readings += n_rows
            self.outbox_bytes += sum(len(o[3]) for o in out_rows)
            self.metrics.readings_committed.inc(n_rows)
            for d, src in new_devices:
                log.info("device registered", extra={"device": d, "source": src})
        if refused:
            by_reason: dict[str, int] = {}
            for (reason, *_), n in refused.items():
                by_reason[reason] = by_reason.get(reason, 0) + n
            for reason, n in by_reason.items():
                self.metrics.readings_refused.labels(reason).inc(n)
            if time.monotonic() - self._last_refusal_log > 60:  # a spamming device must not flood the log either
                self._last_refusal_log = time.monotonic()
                log.warning("readings refused by the registry", extra={
                    "max_devices": self.cfg.max_devices, "max_points": self.cfg.max_points,
                    **{f"refused_{k}": v for k, v in by_reason.items()},
                    "example": "/".join(next(iter(refused))[1:])})
        self.metrics.store_commits.inc()
        self.metrics.store_commit_seconds.observe(time.perf_counter() - t0)
        self.metrics.outbox_readings.set(self.outbox_readings)
        self.metrics.outbox_bytes.set(self.outbox_bytes)
        self._resolve(results, None, notify=bool(n_rows), alert=bool(alerts), logs=bool(lines),
                      rows=[OutboxRow(*o) for o in out_rows], acked=ack)
        if waiting:
            self._resolve([(f, 0) for f in waiting], StoreError(self._full_reason(), full=True))

    def _admit(self, readings: list[Reading], fresh: tuple[dict, set, collections.Counter],
               refused: dict[tuple[str, str, str, str], int]) -> list[Reading]:
        """The readings the registry takes (`fresh`: what this commit adds); the others are counted in `refused`
        by (reason, source, device, point). A device belongs to the source that registered it: readings for it from
        another source are refused (`source_mismatch`: one protocol cannot pose as a device of another). A new
        device or series beyond the registry's bounds is refused (`registry_full`; one of a device the config does not
        name stops at store.registry_reserve short of them), a new point beyond a device's bound (`device_points_full`),
        a new device or series beyond its source's rate (`new_device_rate`, `new_point_rate`)."""
        known_d, series = self._known_devices, self._series
        new_d, new_s, new_per_device = fresh
        pairs = {(r.device, r.source) for r in readings}
        own = len(pairs) == len({d for d, _ in pairs}) and all(known_d.get(d, new_d.get(d, s)) == s for d, s in pairs)
        if own and not ({(r.device, r.point) for r in readings} - series.keys() - new_s):
            return readings  # the usual case: every series is known, from its own source
        out: list[Reading] = []
        for r in readings:
            owner = known_d.get(r.device) or new_d.get(r.device)
            if owner is not None and owner != r.source:
                k = ("source_mismatch", r.source, r.device, r.point)
                refused[k] = refused.get(k, 0) + 1
                continue
            key = (r.device, r.point)
            if key in series or key in new_s:
                out.append(r)
                continue
            device_is_new = owner is None
            # a new series of a device the config does not name stops short of the reserve (its known series go on)
            share = 1.0 if r.device in self.configured_devices else 1.0 - self.cfg.registry_reserve
            if (device_is_new and len(known_d) + len(new_d) >= self.cfg.max_devices * share) or \
                    len(series) + len(new_s) >= self.cfg.max_points * share:
                reason = "registry_full"
            elif self._device_points[r.device] + new_per_device[r.device] >= self.cfg.max_points_per_device:
                reason = "device_points_full"
            elif device_is_new and not self._may(self._new_devices, r.source, self.cfg.new_devices_per_minute):
                reason = "new_device_rate"
            elif not self._may(self._new_points, r.source, self.cfg.new_points_per_minute):
                reason = "new_point_rate"
            else:
                reason = ""
            if reason:
                k = (reason, r.source, r.device, r.point)
                refused[k] = refused.get(k, 0) + 1
                continue
            new_s.add(key)
            new_per_device[r.device] += 1
            if device_is_new:
                new_d[r.device] = r.source
            out.append(r)
        return out

    @staticmethod
    def _may(budgets: dict[str, collections.deque], source: str, per_minute: int) -> bool:
        """A source's registration budget (new devices, new series): `per_minute` in any 60 s."""
        q = budgets.setdefault(source, collections.deque())
        now = time.monotonic()
        while q and q[0] <= now - 60:
            q.popleft()
        if len(q) >= per_minute:
            return False
        q.append(now)
        return True

    def _register(self, conn: sqlite3.Connection, writes: list[tuple[int, list[Reading]]], now_ns: int,
                  new_devices: list[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """Register new devices and points at once; returns (device, point) -> series id. `last_seen`
        and unit changes of known ones are written by the maintenance pass, once a second, not per commit."""
        seen_d, seen_p = self._seen_devices, self._seen_points
        for _, rs in writes:
            seen_p.update({(r.device, r.point): r.unit for r in rs})
            seen_d.update({r.device: r.source for r in rs})
        fresh_d = [(d, s) for d, s in seen_d.items() if d not in self._known_devices]
        if fresh_d:
            conn.executemany("INSERT OR IGNORE INTO devices VALUES (?,?,?,?)",
                             [(d, s, now_ns, now_ns) for d, s in fresh_d])
            new_devices.extend(fresh_d)
            self._known_devices.update(fresh_d)
        for (d, p), u in seen_p.items():
            if (d, p) not in self._series:
                conn.execute("INSERT OR IGNORE INTO points (device, point, unit, first_seen_ns, last_seen_ns) "
                             "VALUES (?,?,?,?,?)", (d, p, u, now_ns, now_ns))
                self._series[(d, p)] = conn.execute("SELECT id FROM points WHERE device=? AND point=?",
                                                    (d, p)).fetchone()[0]
                self._device_points[d] += 1
        return self._series

    def _flush_seen(self, conn: sqlite3.Connection) -> None:
        if not (self._seen_devices or self._seen_points):
            return
        now_ns = time.time_ns()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("UPDATE devices SET last_seen_ns=? WHERE device=?",
                         [(now_ns, d) for d in self._seen_devices])
        conn.executemany("UPDATE points SET last_seen_ns=?, unit=? WHERE device=? AND point=?",
                         [(now_ns, u, d, p) for (d, p), u in self._seen_points.items()])
        conn.execute("COMMIT")
        self._seen_devices.clear()
        self._seen_points.clear()

    def _commit_logs(self, conn: sqlite3.Connection, lines: list[bytes], acked: int) -> tuple[int, int, int]:
        """Insert the log lines, drop what the cloud acknowledged, keep the table within log_quota (oldest first):
        (the next id, the bytes kept, the lines dropped at the quota)."""
        next_id, kept, dropped = self.next_log_id, self.log_bytes, 0
        if lines:
            conn.executemany("INSERT INTO logs (id, line) VALUES (?, ?)",
                             [(next_id + i, line) for i, line in enumerate(lines)])
            next_id += len(lines)
            kept += sum(len(line) for line in lines)
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('next_log_id', ?)", (next_id,))
        if acked:
            kept -= conn.execute("SELECT coalesce(sum(length(line)), 0) FROM logs WHERE id <= ?", (acked,)).fetchone()[0]
            conn.execute("DELETE FROM logs WHERE id <= ?", (acked,))
        if acked:
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('log_acked', max(?, coalesce((SELECT value FROM meta "
                         "WHERE key = 'log_acked'), 0)))", (acked,))
        room = self.log_room()
        if kept > room:  # the oldest go (the uplink counts them: the ids it never sent)
            gone, n = self._drop_logs(conn, kept - room)
            kept -= gone
            dropped += n
        return next_id, kept, dropped

    def log_room(self) -> int:
        """The bytes log lines may hold: log.ship_quota_bytes, and never more than a quarter of the store's effective
        quota — their room comes out of the quota, so a log storm cannot take the readings' room."""
        return min(self.log_quota, self._limit // 4)

    @staticmethod
    def _drop_logs(conn: sqlite3.Connection, excess: int) -> tuple[int, int]:
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

    def _resolve(self, results: list, error: BaseException | None, notify: bool = False, alert: bool = False,
                 logs: bool = False, rows: list[OutboxRow] | None = None, acked: int = 0) -> None:
        def done() -> None:
            if acked:
                self._drop_tail(acked)
            if rows:
                self._to_tail(rows)
            for fut, value in results:
                if not fut.done():
                    if error is None:
                        fut.set_result(value)
                    else:
                        fut.set_exception(error)
            if notify and self.new_data is not None:
                self.new_data.set()
            if alert and self.new_alert is not None:
                self.new_alert.set()
            if logs and self.new_log is not None:
                self.new_log.set()
        if results or notify or alert or logs or rows or acked:
            assert self._loop is not None
            try:
                self._loop.call_soon_threadsafe(done)
            except RuntimeError:  # loop closed during shutdown
                pass

    # -- maintenance (writer thread) -------------------------------------------------------------
    def _maintain(self, conn: sqlite3.Connection) -> None:
        self._last_maintenance = time.monotonic()
        if self._retry:
            retry, self._retry = self._retry, []
            self._commit_guarded(conn, retry)
        try:
            self._flush_seen(conn)
            self._retention(conn)
            self._enforce_quota(conn)
            self._trim_dead_letters(conn)
            self._trim_requests(conn)
            self._expire_series(conn)
            self._publish_gauges(conn)
        except Exception as e:  # noqa: BLE001 - the writer thread must outlive any maintenance failure
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            if not self._disk_full(conn):
                self._full_log.warning("maintenance", "store maintenance failed", error=f"{type(e).__name__}: {e}"[:300])

    def _retention(self, conn: sqlite3.Connection) -> None:
        now = time.time_ns()
        last = conn.execute("SELECT max(ts_ns) FROM seq_marks").fetchone()[0]
        if last is None or now - last >= 60 * 1_000_000_000:
            conn.execute("INSERT OR REPLACE INTO seq_marks VALUES (?, ?)", (now, self.next_seq))
        cutoff_ns = now - self.cfg.retention_s * 1_000_000_000
        row = conn.execute("SELECT max(seq) FROM seq_marks WHERE ts_ns <= ?", (cutoff_ns,)).fetchone()
        by_age = row[0] or 0
        by_rows = self.next_seq - self.cfg.retention_rows
        for reason, below in (("age", by_age), ("rows", by_rows)):
            if below > 0:
                n = conn.execute("DELETE FROM readings WHERE seq < ?", (below,)).rowcount
                if n > 0:
                    self.metrics.window_evicted.labels(reason).inc(n)
        conn.execute("DELETE FROM seq_marks WHERE ts_ns < ?", (cutoff_ns - 86400 * 1_000_000_000,))

    def used_bytes(self, conn: sqlite3.Connection) -> int:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        self._reusable = free * page_size  # inside the file, free for SQLite to reuse (the disk does not see it)
        wal = self._wal
        try:
            wal_size = os.path.getsize(wal)
        except OSError:
            wal_size = 0
        return (pages - free) * page_size + wal_size

    def _disk(self) -> tuple[int, int]:
        """(free bytes, filesystem size) of the state directory's filesystem."""
        st = os.statvfs(self.path.parent)
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize

    def _reserve(self) -> int:
        return min(self.cfg.disk_reserve_bytes, self._disk()[1] // 8)

    def _disk_nearly_full(self) -> bool:
        return self._disk()[0] < max(self._reserve() // 2, 64 << 10)

    def _ensure_ballast(self) -> None:
        """The reserve file: room on the disk that only the store gives back, when the disk fills, so that
        acknowledgements and deletes can still commit. Made (again) only while there is plenty of room."""
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
        room = self._used + self._reusable + free - (0 if held else self._reserve())
        return min(self.cfg.quota_bytes, room // 2)

    def _check_room(self, conn: sqlite3.Connection) -> None:
        """Before a commit that writes readings: at the effective quota, hold new readings back (backpressure) or
        make room now (evict) — not a second later, when the disk may have filled."""
        self._used = self.used_bytes(conn)
        self._limit = self.quota()
        if self._used < self._limit:
            return
        if self.cfg.at_quota == "backpressure":
            self._set_full(True)
        else:
            self._enforce_quota(conn)

    def _set_full(self, full: bool) -> None:
        if full == self.full:
            return
        self.full = full
        self.metrics.store_full.set(1 if full else 0)
        if full:
            self._full_log.warning("store_full", "store at its quota: new readings wait with their source",
                                   used_bytes=self._used, quota_bytes=self._limit, outbox_readings=self.outbox_readings)
        else:
            log.info("store below its quota again: taking readings", extra={"used_bytes": self._used})

    def _disk_full(self, conn: sqlite3.Connection) -> bool:
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
            self._set_full(True)
        return True

    def _full_reason(self) -> str:
        return (f"the store is at its quota ({self._limit} bytes: store.quota_bytes or the free disk less "
                "store.disk_reserve_bytes) and store.at_quota = backpressure: the readings wait with their source "
                "until the cloud's acknowledgements free room")

    def _enforce_quota(self, conn: sqlite3.Connection) -> None:
        """Over the effective quota: first drop window rows the cloud already has; then, with store.at_quota =
        evict, the oldest outbox rows (and their window rows) until 10 % under the quota, counted and logged; with
        backpressure, new readings are refused (their sources keep them) until 10 % under. The reserve file is made
        again once there is room."""
        self._used = self.used_bytes(conn)
        quota = self._limit = self.quota()
        self._ensure_ballast()
        if self._used <= quota and not self.full:
            return
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        target = int(quota * 0.9)
        n = conn.execute("DELETE FROM readings WHERE seq <= ?", (self.acked_seq,)).rowcount
        if n > 0:
            self.metrics.window_evicted.labels("quota").inc(n)
        if self.log_bytes and self.used_bytes(conn) > target:
            # log lines give up their room before any reading does
            conn.execute("BEGIN IMMEDIATE")
            gone, lines = self._drop_logs(conn, self.log_bytes)
            conn.execute("COMMIT")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self.log_bytes -= gone
            self.metrics.logs_dropped.labels("quota").inc(lines)
        if self.cfg.at_quota == "backpressure":
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._used = self.used_bytes(conn)
            self._set_full(self._used > target)
            return
        evicted = 0
        step = max(1, self.outbox_readings // self.cfg.outbox_chunk_readings // 10)
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
            try:
                if self._loop is not None:
                    self._loop.call_soon_threadsafe(self._drop_tail, rows[-1][0])
            except RuntimeError:  # the loop closed during shutdown: the tail goes with it
                pass
            evicted += cnt
            self.outbox_readings -= cnt
            self.outbox_bytes -= sum(r[3] for r in rows)
        self._used = self.used_bytes(conn)
        if evicted:
            self.metrics.outbox_evicted.inc(evicted)
            log.warning("disk quota reached: evicted the oldest outbox readings; they will not reach the cloud",
                        extra={"evicted": evicted, "quota_bytes": quota, "used_bytes": self._used})

    def _expire_series(self, conn: sqlite3.Connection) -> None:
        """Series silent for store.series_expiry_s leave the registry (and devices with none left): a client that
        once sent thousands of made-up names does not hold the registry's room for good. Once a minute at most
        (more often only for a shorter expiry)."""
        if not self.cfg.series_expiry_s or time.monotonic() - self._last_expiry < min(60, self.cfg.series_expiry_s):
            return
        self._last_expiry = time.monotonic()
        cutoff = time.time_ns() - self.cfg.series_expiry_s * 1_000_000_000
        conn.execute("BEGIN IMMEDIATE")
        try:
            n = conn.execute("DELETE FROM points WHERE last_seen_ns < ?", (cutoff,)).rowcount
            m = conn.execute("DELETE FROM devices WHERE last_seen_ns < ? AND device NOT IN "
                             "(SELECT device FROM points)", (cutoff,)).rowcount
            conn.execute("COMMIT")
        except sqlite3.Error:
            conn.execute("ROLLBACK")
            raise
        if n or m:
            self._load_registry(conn)
            self.metrics.registry_expired.labels("series").inc(n)
            self.metrics.registry_expired.labels("device").inc(m)
            log.info("silent series left the registry", extra={"series": n, "devices": m,
                                                               "series_expiry_s": self.cfg.series_expiry_s})

    def _trim_requests(self, conn: sqlite3.Connection) -> None:
        conn.execute("DELETE FROM requests WHERE ts_ns < ?", (time.time_ns() - int(self.requests_keep_s * 1e9),))
        n = conn.execute("SELECT count(*) FROM requests").fetchone()[0]
        if n > self.requests_max:  # bounded: the oldest ids go first, as the in-memory cache's do
            conn.execute("DELETE FROM requests WHERE ts_ns <= (SELECT ts_ns FROM requests ORDER BY ts_ns "
                         "LIMIT 1 OFFSET ?)", (n - self.requests_max - 1,))

    def _trim_dead_letters(self, conn: sqlite3.Connection) -> None:
        n = conn.execute("DELETE FROM dead_letters WHERE id <= (SELECT max(id) FROM dead_letters) - ?",
                         (self.cfg.dead_letter_rows,)).rowcount
        if n > 0:
            self.metrics.dead_letters_dropped.inc(n)

    def _publish_gauges(self, conn: sqlite3.Connection) -> None:
        self.metrics.store_bytes.set(self.used_bytes(conn))
        self.metrics.outbox_readings.set(self.outbox_readings)
        self.metrics.outbox_bytes.set(self.outbox_bytes)
