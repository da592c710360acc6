"""What the writer thread is asked to do: each kind of job declared once — its fields, its SQL, what it resolves to,
and whether it rides along lazily. The writer knows none of them: it takes jobs, groups them by kind and runs one
transaction in which every kind applies its own SQL (in the order of KINDS), then lets each kind update the store's
state and answer its futures. All kinds share that transaction: one fsync for everything a batch holds.

A new kind is one class here, listed in KINDS, and its test.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import sqlite3
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from edge_agent.records import Reading
from edge_agent.store.encoding import encode_json, encode_rows

if TYPE_CHECKING:
    from edge_agent.store import Store

log = logging.getLogger("edge_agent.store")


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


@dataclass
class Tx:
    """One group commit: what its jobs gathered, what its transaction changed, and whom to answer."""
    now_ns: int
    seq: int                                                   # the next seq, as writes take theirs
    results: list[tuple[asyncio.Future, Any]] = field(default_factory=list)
    waiting: list[asyncio.Future] = field(default_factory=list)  # writes held back: the store is full
    dead: list[tuple] = field(default_factory=list)           # dead-letter rows (payloads and registry refusals)
    rows: list[OutboxRow] = field(default_factory=list)       # outbox rows committed (for the uplink's tail)
    acked: int = 0                                            # outbox acknowledged up to this seq
    notify: set[str] = field(default_factory=set)             # data, alert, log: the events to set
    state: dict[str, Any] = field(default_factory=dict)       # each kind's figures, from apply to committed


class Job:
    """A job handed to the writer. `fut` (or None: nobody waits) and `since` (when it was handed over) are set by
    Store.put; a kind's fields are its own."""
    lazy: ClassVar[bool] = False  # rides along with the next commit of readings, or goes after lazy_max_delay_ms
    fut: asyncio.Future | None = None
    since: float = 0.0

    @classmethod
    def gather(cls, store: Store, conn: sqlite3.Connection, tx: Tx, jobs: list) -> None:
        """Before the transaction (may read): decide what the jobs will do."""

    @classmethod
    def apply(cls, store: Store, conn: sqlite3.Connection, tx: Tx, jobs: list) -> None:
        """Inside the transaction: the kind's SQL (called for every commit, with or without jobs of the kind)."""

    @classmethod
    def committed(cls, store: Store, tx: Tx, jobs: list) -> None:
        """After COMMIT: the store's state follows what was committed."""

    @classmethod
    def maintain(cls, store: Store, conn: sqlite3.Connection) -> None:
        """Once a second, outside any commit: keep the kind's table within its bound."""


@dataclass
class WriteReadings(Job):
    """Readings to commit: admitted by the registry, given seqs, stored in the window and, encoded, in the outbox.
    Resolves to (the last seq, the readings taken)."""
    readings: list[Reading]

    @classmethod
    def gather(cls, store, conn, tx, jobs):
        if not jobs:
            return
        space = store.space
        room = space.room_for_writes(conn, sum(len(j.readings) for j in jobs))
        fresh: tuple[dict, set, collections.Counter] = ({}, set(), collections.Counter())
        refused: dict[tuple[str, str, str, str], int] = {}
        writes: list[tuple[int, list[Reading]]] = []
        for job in jobs:
            payload = job.readings
            if payload and (space.full or (room is not None and space.disk_bytes(payload) > room)):
                tx.waiting.append(job.fut)  # this write would not fit: it waits with its source, which may send less
                store.metrics.readings_refused.labels("store_full").inc(len(payload))
                continue
            if room is not None and payload:
                room -= space.disk_bytes(payload)
            if payload:
                payload = store.registry.admit(payload, fresh, refused)
            if payload:
                writes.append((tx.seq, payload))
                tx.seq += len(payload)
            tx.results.append((job.fut, (tx.seq - 1, payload)))
        if store.cfg.dead_letter_rows:
            tx.dead.extend(store.registry.refusal_rows(refused, fresh, tx.now_ns))
        tx.state["writes"], tx.state["refused"] = writes, refused

    @classmethod
    def apply(cls, store, conn, tx, jobs):
        """(every commit) The readings into the window; what the forwarding rules let through (and the aggregates of
        the intervals that ended) into the outbox, in rows that cover every seq of the commit: a seq missing inside
        a row's range was filtered on purpose."""
        writes = tx.state.get("writes") or []
        fwd = store.forward
        aggs: list = []
        if not fwd.idle:
            fwd.due(tx.now_ns, aggs)  # intervals the clock closed, before this commit's readings
        if not writes and not aggs:
            return
        new_devices: list[tuple[str, str]] = []
        if writes:
            series = store.registry.register(conn, writes, tx.now_ns, new_devices)
            conn.executemany("INSERT INTO readings VALUES (?,?,?,?,?)",
                             [(first + i, series[(r.device, r.point)], r.ts_ns, r.value, r.quality)
                              for first, rs in writes for i, r in enumerate(rs)])
        chunk = store.cfg.outbox_chunk_readings
        encode = encode_rows if store.encoding == "columns" else encode_json
        out_rows: list[tuple] = []
        seqs: list[int] = []
        recs: list = []
        start = store.next_seq
        decide = None if fwd.idle else fwd.decide
        for first, rs in writes:  # rows of at most `chunk` records, covering consecutive seq ranges
            seq = first
            for r in rs:
                if decide is None or decide(r, aggs):
                    seqs.append(seq)
                    recs.append(r)
                    if len(recs) == chunk:
                        out_rows.append((start, seq, chunk, encode(seqs, recs)))
                        start, seqs, recs = seq + 1, [], []
                seq += 1
        for a in aggs:  # aggregates: seqs of their own, after the readings'
            seqs.append(tx.seq)
            recs.append(a)
            tx.seq += 1
            if len(recs) == chunk:
                out_rows.append((start, tx.seq - 1, chunk, encode(seqs, recs)))
                start, seqs, recs = tx.seq, [], []
        if start < tx.seq:
            out_rows.append((start, tx.seq - 1, len(recs), encode(seqs, recs) if recs else b""))
        conn.executemany("INSERT INTO outbox VALUES (?,?,?,?)", out_rows)
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('next_seq', ?)", (tx.seq,))
        tx.state["out_rows"], tx.state["new_devices"] = out_rows, new_devices
        tx.state["n_readings"] = sum(len(rs) for _, rs in writes)

    @classmethod
    def committed(cls, store, tx, jobs):
        store.next_seq = tx.seq
        out_rows = tx.state.get("out_rows")
        if out_rows:
            store.outbox_readings += sum(o[2] for o in out_rows)
            store.outbox_bytes += sum(len(o[3]) for o in out_rows)
            store.metrics.readings_committed.inc(tx.state["n_readings"])
            tx.rows = [OutboxRow(*o) for o in out_rows]
            tx.notify.add("data")
            for d, src in tx.state["new_devices"]:
                log.info("device registered", extra={"device": d, "source": src})
        if tx.state.get("refused"):
            store.registry.count_refusals(tx.state["refused"])


@dataclass
class DeadLetter(Job):
    """A rejected payload kept for inspection (bounded by store.dead_letter_rows). Resolves to 0."""
    row: tuple  # (ts_ns, source, topic, reason, detail, payload)

    @classmethod
    def gather(cls, store, conn, tx, jobs):
        for job in jobs:
            tx.dead.append(job.row)
            tx.results.append((job.fut, 0))

    @classmethod
    def apply(cls, store, conn, tx, jobs):
        if tx.dead:
            conn.executemany("INSERT INTO dead_letters (ts_ns, source, topic, reason, detail, payload) "
                             "VALUES (?,?,?,?,?,?)", tx.dead)

    @classmethod
    def maintain(cls, store, conn):
        n = conn.execute("DELETE FROM dead_letters WHERE id <= (SELECT max(id) FROM dead_letters) - ?",
                         (store.cfg.dead_letter_rows,)).rowcount
        if n > 0:
            store.metrics.dead_letters_dropped.inc(n)


@dataclass
class AlertAck(Job):
    """The cloud acknowledged alerts and events up to an id."""
    upto_id: int

    @classmethod
    def apply(cls, store, conn, tx, jobs):
        if jobs:
            conn.execute("DELETE FROM alerts WHERE id <= ?", (max(j.upto_id for j in jobs),))


@dataclass
class TakeRequest(Job):
    """A changing request's id, committed before it runs. Resolves to None (new: run it), or its earlier reply
    (b"" when it never got one)."""
    name: str
    rid: str

    @classmethod
    def apply(cls, store, conn, tx, jobs):
        since = tx.now_ns - int(store.requests_keep_s * 1e9)
        for job in jobs:
            row = conn.execute("SELECT reply FROM requests WHERE name = ? AND rid = ? AND ts_ns >= ?",
                               (job.name, job.rid, since)).fetchone()
            if row is None:
                conn.execute("INSERT OR REPLACE INTO requests VALUES (?, ?, ?, NULL)", (job.name, job.rid, tx.now_ns))
            tx.results.append((job.fut, None if row is None else (row[0] or b"")))

    @classmethod
    def maintain(cls, store, conn):
        """Within store.requests_keep_s and store.requests_max: the oldest ids go first, as the router's cache's."""
        conn.execute("DELETE FROM requests WHERE ts_ns < ?", (time.time_ns() - int(store.requests_keep_s * 1e9),))
        n = conn.execute("SELECT count(*) FROM requests").fetchone()[0]
        if n > store.requests_max:
            conn.execute("DELETE FROM requests WHERE ts_ns <= (SELECT ts_ns FROM requests ORDER BY ts_ns "
                         "LIMIT 1 OFFSET ?)", (n - store.requests_max - 1,))


@dataclass
class RequestReply(Job):
    """The reply of a taken request id."""
    name: str
    rid: str
    reply: bytes

    @classmethod
    def apply(cls, store, conn, tx, jobs):
        if jobs:
            conn.executemany("UPDATE requests SET reply = ? WHERE name = ? AND rid = ?",
                             [(j.reply, j.name, j.rid) for j in jobs])


@dataclass
class SaveRule(Job):
    """A rule added (doc) or removed (None) by command. Resolves to 0."""
    rule_id: str
    doc: str | None

    @classmethod
    def apply(cls, store, conn, tx, jobs):
        for job in jobs:
            if job.doc is None:
                conn.execute("DELETE FROM rules WHERE id = ?", (job.rule_id,))
            else:
                conn.execute("INSERT OR REPLACE INTO rules VALUES (?, ?)", (job.rule_id, job.doc))
            tx.results.append((job.fut, 0))


@dataclass
class LogAck(Job):
    """The cloud acknowledged log lines up to an id: they go."""
    upto_id: int

    @classmethod
    def apply(cls, store, conn, tx, jobs):
        acked = max((j.upto_id for j in jobs), default=0)
        tx.state["log_bytes"] = store.log_bytes
        tx.state["logs_acked"] = acked
        if acked:
            tx.state["log_bytes"] -= conn.execute("SELECT coalesce(sum(length(line)), 0) FROM logs WHERE id <= ?",
                                                  (acked,)).fetchone()[0]
            conn.execute("DELETE FROM logs WHERE id <= ?", (acked,))
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('log_acked', max(?, coalesce((SELECT value FROM meta "
                         "WHERE key = 'log_acked'), 0)))", (acked,))

    @classmethod
    def committed(cls, store, tx, jobs):
        store.log_acked = max(store.log_acked, tx.state["logs_acked"])


@dataclass
class LogLine(Job):
    """A log line for the cloud (never blocks; its room is store.log_room(), the oldest lines go first)."""
    lazy: ClassVar[bool] = True
    line: bytes

    @classmethod
    def apply(cls, store, conn, tx, jobs):
        next_id, kept = store.next_log_id, tx.state["log_bytes"]
        if jobs:
            conn.executemany("INSERT INTO logs (id, line) VALUES (?, ?)",
                             [(next_id + i, j.line) for i, j in enumerate(jobs)])
            next_id += len(jobs)
            kept += sum(len(j.line) for j in jobs)
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('next_log_id', ?)", (next_id,))
        room = store.log_room()
        if kept > room:  # the oldest go (the uplink counts them: the ids it never sent)
            kept -= store.drop_logs(conn, kept - room)[0]
        tx.state["next_log_id"], tx.state["log_bytes"] = next_id, kept

    @classmethod
    def committed(cls, store, tx, jobs):
        store.next_log_id, store.log_bytes = tx.state["next_log_id"], tx.state["log_bytes"]
        if jobs:
            tx.notify.add("log")


@dataclass
class SetMeta(Job):
    """A small JSON value kept across restarts (None deletes it). Resolves to 0."""
    key: str
    value: str | None

    @classmethod
    def apply(cls, store, conn, tx, jobs):
        for job in jobs:
            if job.value is None:
                conn.execute("DELETE FROM meta WHERE key = ?", (f"x.{job.key}",))
            else:
                conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"x.{job.key}", job.value))
            tx.results.append((job.fut, 0))


@dataclass
class KeepAlert(Job):
    """An alert (for the cloud and the alert log) or an event (for the cloud only, Alert.topic other than
    "alerts"); ids never reused; beyond store.alerts_max waiting, the oldest go (counted)."""
    alert: Alert

    @classmethod
    def apply(cls, store, conn, tx, jobs):
        next_id = store.next_alert_id
        if jobs:
            alerts = [j.alert for j in jobs]
            ids = range(next_id, next_id + len(alerts))
            next_id += len(alerts)
            conn.executemany("INSERT INTO alerts (id, payload, topic) VALUES (?, ?, ?)",
                             [(i, a.payload, a.topic) for i, a in zip(ids, alerts)])
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('next_alert_id', ?)", (next_id,))
            dropped = conn.execute("DELETE FROM alerts WHERE id <= ?", (next_id - 1 - store.alerts_max,)).rowcount
            if dropped > 0:
                store.metrics.alerts.labels("dropped").inc(dropped)
            conn.executemany("INSERT INTO alert_log (id, rule, device, state, payload) VALUES (?,?,?,?,?)",
                             [(i, a.rule, a.device, a.state, a.payload) for i, a in zip(ids, alerts)
                              if a.topic == "alerts"])
            conn.execute("DELETE FROM alert_log WHERE id <= ?", (next_id - 1 - store.alert_history_max,))
        tx.state["next_alert_id"] = next_id

    @classmethod
    def committed(cls, store, tx, jobs):
        store.next_alert_id = tx.state["next_alert_id"]
        if jobs:
            tx.notify.add("alert")


@dataclass
class OutboxAck(Job):
    """The cloud acknowledged every reading up to a seq: those outbox rows go. Lazy: the uplink remembers what the
    cloud acknowledged across reconnections, so a late acknowledgement re-sends nothing unless the agent dies
    before it commits (at least once, as always)."""
    lazy: ClassVar[bool] = True
    upto_seq: int

    @classmethod
    def apply(cls, store, conn, tx, jobs):
        ack = max((j.upto_seq for j in jobs), default=0)
        tx.state["acked"] = (0, 0)
        if ack > store.acked_seq:
            tx.state["acked"] = conn.execute("SELECT coalesce(sum(count),0), coalesce(sum(length(payload)),0) "
                                             "FROM outbox WHERE first_seq <= ?", (ack,)).fetchone()
            conn.execute("DELETE FROM outbox WHERE first_seq <= ?", (ack,))
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('acked_seq', ?)", (ack,))
            tx.acked = ack

    @classmethod
    def committed(cls, store, tx, jobs):
        if tx.acked:
            store.acked_seq = tx.acked
            store.outbox_readings -= tx.state["acked"][0]
            store.outbox_bytes -= tx.state["acked"][1]


@dataclass
class ForgetDevice(Job):
    """An operator forgets a device (devices.forget): its registry rows go and its room is free at once; its readings
    stay in the window until retention, and a reading that comes again registers it anew. Resolves to the number of
    series it had, or None when the registry did not know it."""
    device: str

    @classmethod
    def apply(cls, store, conn, tx, jobs):
        for job in jobs:
            known = conn.execute("DELETE FROM devices WHERE device = ?", (job.device,)).rowcount
            n = conn.execute("DELETE FROM points WHERE device = ?", (job.device,)).rowcount
            conn.execute("DELETE FROM forward_state WHERE device = ?", (job.device,))  # it starts afresh if it returns
            tx.results.append((job.fut, n if known else None))
            tx.state.setdefault("forgotten", []).append(job.device)

    @classmethod
    def committed(cls, store, tx, jobs):
        for device in tx.state.get("forgotten", ()):
            store.registry.forget(device)
            store.forward.forget_device(device)


@dataclass
class SetForwardRules(Job):
    """The forwarding rules sent by command (forward.set/remove) change: the whole list, in order. They decide from
    this commit on; they are kept in `meta` (and the open intervals whose rule changed leave in this commit).
    Resolves to 0."""
    rules: tuple

    @classmethod
    def apply(cls, store, conn, tx, jobs):
        for job in jobs:
            store.forward.set_rules(job.rules)
            tx.results.append((job.fut, 0))


@dataclass
class ForwardState(Job):
    """(every commit) The forwarding state the commit changed (last value sent, open intervals), in the same
    transaction as the readings that changed it. A job of this kind carries nothing: handed over by the maintenance
    pass when an interval of a silent series is due, it makes a commit that sends it."""

    @classmethod
    def apply(cls, store, conn, tx, jobs):
        store.forward.save(conn)
        for job in jobs:
            tx.results.append((job.fut, 0))

    @classmethod
    def maintain(cls, store, conn):
        fwd = store.forward
        if fwd.has_due(time.time_ns()):  # a silent series' interval: a commit sends it
            store.put(ForwardState())
        now = time.monotonic()
        if fwd.states and (len(fwd.states) > len(store.registry.series) or now - fwd.checked >= 60):
            fwd.checked = now  # series that left the registry (expired, forgotten): their states go
            conn.execute("BEGIN IMMEDIATE")
            fwd.forget(conn, store.registry.series)
            conn.execute("COMMIT")


# The order in which the kinds apply their SQL inside a commit (LogAck before LogLine: acknowledged lines go before
# the new ones are counted against their room).
# SetForwardRules before WriteReadings (the readings of the commit meet the new rules), ForwardState after it (it
# keeps what WriteReadings decided).
KINDS: tuple[type[Job], ...] = (SetForwardRules, WriteReadings, ForwardState, DeadLetter, AlertAck, TakeRequest,
                                RequestReply, SaveRule, LogAck, LogLine, SetMeta, KeepAlert, OutboxAck, ForgetDevice)
