"""What of the readings goes north: the forwarding rules, decided per reading as it is committed.

Every reading is stored in the window as before (`ask`, `query`, the rules see it all); a forwarding rule only
decides which of them enter the outbox. The first rule whose device and point patterns match a series decides (the
rules sent by `forward.set` first, then the config's `[[forward.rule]]`); a series no rule matches is forwarded whole.

- `drop`: never forwarded.
- report by exception (`deadband`, `deadband_pct`, `max_silence_s`): a reading goes north when its series has sent
  nothing yet, when it moved more than the deadband from the last value sent (absolute, or percent of that value;
  0 = any change), when its quality differs from the last sent one, when its timestamp is before the last sent one
  (a clock put back), or — the heartbeat — when `max_silence_s` passed since the last one sent. Booleans and strings
  go on change.
- `min_interval_s` with `mode`: the numeric readings of good quality of an interval (aligned to the clock, by the
  readings' timestamps) become one aggregate (last, avg, min or max) with their count and the interval; it leaves
  when a reading of a later interval arrives, or, for a series that falls silent, min(interval, 5 s) after the
  interval's end as the gateway's clock saw it when the last reading arrived (a device clock that is off, or a
  backlog replayed hours later, neither splits an interval nor holds it). Late readings (of an interval already sent) count in the next one, so an
  interval is sent once. An aggregate is a record of its own with a seq of its own (after the commit's readings);
  other readings of the series (strings, booleans, bad quality) go on change.

The state each series needs (the last value sent, the open interval) lives in memory and in the `forward_state`
table, written in the same transaction as the readings that changed it: a restart or a power cut neither floods the
uplink nor skips a change, and an interval's aggregate is sent exactly once. A transaction works on copies
(`Tx`); a commit that fails leaves the state as it was. Bounded by the registry: a series that leaves it
(expiry, `devices.forget`) loses its state; the match cache holds at most store.max_points names.

Writer thread only.
"""
from __future__ import annotations

import fnmatch
import heapq
import json
import logging
import sqlite3
from dataclasses import dataclass
from typing import NamedTuple

from edge_agent.config import ForwardRuleConfig
from edge_agent.metrics import Metrics
from edge_agent.records import Reading

log = logging.getLogger("edge_agent.store")

GRACE_NS = 5_000_000_000  # a silent series' open interval leaves this long (at most one interval) after its end


class Aggregate(NamedTuple):
    """One interval's aggregate, forwarded instead of its readings (the first seven fields are a Reading's)."""
    device: str
    point: str
    value: float | int
    unit: str | None
    ts_ns: int       # the interval's start
    quality: str
    source: str
    count: int       # readings it stands for
    end_ns: int      # the interval's end (exclusive)
    mode: str        # last, avg, min, max


@dataclass(frozen=True)
class Rule:
    id: str
    device: str
    point: str
    deadband: float
    pct: float            # deadband in percent of the last value sent
    silence_ns: int       # heartbeat (0: none)
    interval_ns: int      # min_interval_s (0: not an interval rule)
    mode: str
    drop: bool
    origin: str           # config | command

    @classmethod
    def of(cls, rc: ForwardRuleConfig, origin: str) -> "Rule":
        return cls(rc.id, rc.device, rc.point, rc.deadband, rc.deadband_pct, int(rc.max_silence_s * 1e9),
                   int(rc.min_interval_s * 1e9), rc.mode, rc.drop, origin)

    def matches(self, device: str, point: str) -> bool:
        return fnmatch.fnmatchcase(device, self.device) and fnmatch.fnmatchcase(point, self.point)


# a series' state: the last value sent, its ts and quality; the open interval (start 0: none), its size and mode,
# its count, sum, min, max and last value; where the last closed interval ended; the unit and source of its last
# reading, how far the gateway's clock was ahead of its timestamp when it arrived, and when the interval is queued to
# be looked at again (the heap holds the earliest)
SENT, SENT_TS, SENT_Q, START, SIZE, MODE, N, SUM, MIN, MAX, LAST, CLOSED, UNIT, SOURCE, OFFSET, QUEUED = range(16)


def _numeric(v: object) -> bool:
    t = type(v)
    return t is float or t is int


class Tx:
    """One commit's view: the series states it changed (copies), intervals it opened or closed, rules it set."""

    def __init__(self, fwd: "Forwarder", now_ns: int) -> None:
        self.fwd, self.now_ns = fwd, now_ns
        self.dirty: dict[tuple[str, str], list] = {}
        self.pushed: list[tuple[int, tuple[str, str]]] = []
        self.popped: list[tuple[int, tuple[str, str]]] = []
        self.rules_before: tuple[Rule, ...] | None = None  # set by a rules change in this commit
        self.counts = [0, 0, 0, 0]                         # sent, filtered, dropped, aggregated (readings)

    def state(self, key: tuple[str, str]) -> list:
        st = self.dirty.get(key)
        if st is None:
            old = self.fwd.states.get(key)
            st = self.dirty[key] = (list(old) if old is not None else
                                    [None, 0, None, 0, 0, "", 0, 0.0, 0.0, 0.0, None, 0, None, "", 0, 0])
        return st


class Forwarder:
    def __init__(self, config_rules: list[ForwardRuleConfig], metrics: Metrics, max_series: int) -> None:
        self.config_rules = tuple(Rule.of(r, "config") for r in config_rules)
        self.command_rules: tuple[Rule, ...] = ()
        self.rules = self.config_rules
        self.metrics = metrics
        self.max_series = max_series
        self.states: dict[tuple[str, str], list] = {}
        self._match: dict[tuple[str, str], Rule | None] = {}
        self._heap: list[tuple[int, tuple[str, str]]] = []   # (when an open interval is due, its series)
        self._reconcile = True  # open intervals are checked against the rules at the next commit
        self.tx: Tx | None = None
        self.checked = 0.0  # (monotonic) when the states were last checked against the registry

    @property
    def idle(self) -> bool:
        """No rule and no open interval: every reading is forwarded, nothing to decide."""
        return not self.rules and not self._heap and not self._reconcile

    # -- loading, transactions, persistence ----------------------------------------------------------------
    def load(self, conn: sqlite3.Connection) -> None:
        row = conn.execute("SELECT value FROM meta WHERE key = 'forward_rules'").fetchone()
        if row is not None:
            self.command_rules = tuple(Rule(**d) for d in json.loads(row[0]))
        self.rules = self.command_rules + self.config_rules
        self.states = {(d, p): json.loads(s) for d, p, s in
                       conn.execute("SELECT device, point, state FROM forward_state")}
        self._heap = [(_due(st), key) for key, st in self.states.items() if st[START]]
        heapq.heapify(self._heap)
        self._match.clear()
        self._reconcile = bool(self._heap)

    def begin(self, now_ns: int) -> Tx:
        self.tx = Tx(self, now_ns)
        return self.tx

    def save(self, conn: sqlite3.Connection) -> None:
        """(inside the transaction) The states this commit changed, the command rules if they changed."""
        tx = self.tx
        if tx is None:
            return
        if tx.dirty:
            conn.executemany("INSERT OR REPLACE INTO forward_state VALUES (?, ?, ?)",
                             [(d, p, json.dumps(st, separators=(",", ":"))) for (d, p), st in tx.dirty.items()])
        if tx.rules_before is not None:
            doc = json.dumps([r.__dict__ for r in self.command_rules], separators=(",", ":"))
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('forward_rules', ?)", (doc,))

    def committed(self) -> None:
        tx, self.tx = self.tx, None
        if tx is None:
            return
        self.states.update(tx.dirty)
        for item in tx.pushed:
            heapq.heappush(self._heap, item)
        s, f, d, a = tx.counts
        m = self.metrics.forward_readings
        for label, n in (("sent", s), ("filtered", f), ("dropped", d), ("aggregated", a)):
            if n:
                m.labels(label).inc(n)

    def abort(self) -> None:
        """The commit failed: the state is as it was before it."""
        tx, self.tx = self.tx, None
        if tx is None:
            return
        for item in tx.popped:
            heapq.heappush(self._heap, item)
        if tx.rules_before is not None:
            self.command_rules = tuple(r for r in tx.rules_before if r.origin == "command")
            self.rules = tx.rules_before
            self._match.clear()

    def forget(self, conn: sqlite3.Connection, known: dict) -> None:
        """(maintenance) States of series the registry no longer holds go (bounded like the registry)."""
        gone = [k for k in self.states if k not in known]
        if gone:
            conn.executemany("DELETE FROM forward_state WHERE device = ? AND point = ?", gone)
            for k in gone:
                del self.states[k]

    def forget_device(self, device: str) -> None:
        """(after its rows were deleted: devices.forget) The device's series states go."""
        for k in [k for k in self.states if k[0] == device]:
            del self.states[k]

    # -- rules ------------------------------------------------------------------------------------------
    def rule(self, device: str, point: str) -> Rule | None:
        key = (device, point)
        try:
            return self._match[key]
        except KeyError:
            pass
        if len(self._match) >= self.max_series * 2:
            self._match.clear()
        found = self._match[key] = next((r for r in self.rules if r.matches(device, point)), None)
        return found

    def set_rules(self, command_rules: tuple[Rule, ...]) -> None:
        """(inside the transaction) The command rules change: the next decisions use them, and open intervals whose
        rule changed leave at once."""
        tx = self.tx
        assert tx is not None
        if tx.rules_before is None:
            tx.rules_before = self.rules
        self.command_rules = command_rules
        self.rules = command_rules + self.config_rules
        self._match.clear()
        self._reconcile = True

    # -- the decision -----------------------------------------------------------------------------------
    def decide(self, r: Reading, out: list) -> bool:
        """Whether `r` goes north; the aggregates of the intervals it closes are appended to `out`."""
        tx = self.tx
        assert tx is not None
        rule = self.rule(r.device, r.point)
        if rule is None:
            tx.counts[0] += 1
            return True
        if rule.drop:
            tx.counts[2] += 1
            return False
        key = (r.device, r.point)
        st = tx.state(key)
        v, ts = r.value, r.ts_ns
        st[UNIT], st[SOURCE], st[OFFSET] = r.unit, r.source, tx.now_ns - ts
        numeric = _numeric(v)
        if rule.interval_ns and numeric and r.quality == "good":
            size = rule.interval_ns
            start = ts - ts % size
            if start < st[CLOSED]:
                start = st[CLOSED]  # late: counts in the next interval (the one it belonged to was sent)
            if st[START] and start != st[START]:
                if start < st[START]:
                    start = st[START]
                else:
                    out.append(self._close(st, key))
            if not st[START]:
                st[START], st[SIZE], st[MODE], st[N], st[SUM], st[MIN], st[MAX] = start, size, rule.mode, 0, 0.0, v, v
                st[QUEUED] = 0
            due = _due(st)
            if not st[QUEUED] or due < st[QUEUED]:  # the heap holds the earliest time to look at it again
                st[QUEUED] = due
                tx.pushed.append((due, key))
            st[N] += 1
            st[SUM] += v
            if v < st[MIN]:
                st[MIN] = v
            if v > st[MAX]:
                st[MAX] = v
            st[LAST] = v
            tx.counts[3] += 1
            return False
        sent = st[SENT]
        send = st[SENT_Q] is None or r.quality != st[SENT_Q] or ts < st[SENT_TS] \
            or (rule.silence_ns and ts - st[SENT_TS] >= rule.silence_ns)
        if not send:
            if numeric and _numeric(sent):
                band = rule.deadband or (rule.pct * abs(sent) / 100.0)
                send = abs(v - sent) > band
            else:
                send = v != sent or type(v) is not type(sent)
        if send:
            st[SENT], st[SENT_TS], st[SENT_Q] = v, ts, r.quality
            tx.counts[0] += 1
            return True
        tx.counts[1] += 1
        return False

    @staticmethod
    def _close(st: list, key: tuple[str, str]) -> Aggregate:
        start, size, mode, n = st[START], st[SIZE], st[MODE], st[N]
        value = st[SUM] / n if mode == "avg" else st[MIN] if mode == "min" else st[MAX] if mode == "max" else st[LAST]
        st[START], st[CLOSED] = 0, start + size
        return Aggregate(key[0], key[1], value, st[UNIT], start, "good", st[SOURCE], n, start + size, mode)

    def has_due(self, now_ns: int) -> bool:
        """(maintenance) Whether an open interval may be due (its series fell silent) or the rules changed."""
        return self._reconcile or bool(self._heap) and self._heap[0][0] <= now_ns

    def due(self, now_ns: int, out: list) -> None:
        """(every commit) Open intervals whose series fell silent past their end leave now; after a rules change or a
        restart, those whose rule is no longer the one they were opened under leave too."""
        tx = self.tx
        assert tx is not None
        if self._reconcile:
            self._reconcile = False
            for key in [k for k, st in self.states.items() if st[START]] + [k for k, st in tx.dirty.items()
                                                                             if st[START]]:
                st = tx.state(key)
                rule = self.rule(*key)
                if st[START] and (rule is None or rule.interval_ns != st[SIZE] or rule.mode != st[MODE]):
                    out.append(self._close(st, key))
        heap = self._heap
        while heap and heap[0][0] <= now_ns:
            item = heapq.heappop(heap)
            tx.popped.append(item)
            key = item[1]
            st = tx.dirty.get(key) or self.states.get(key)
            if st is None or not st[START]:
                continue  # closed already (a later reading), or forgotten
            if _due(st) > now_ns:  # readings came since: due later
                st = tx.state(key)
                st[QUEUED] = _due(st)
                tx.pushed.append((st[QUEUED], key))
                continue
            out.append(self._close(tx.state(key), key))


def _due(st: list) -> int:
    """When an open interval leaves by the clock: its end, on the gateway's clock as its last reading arrived (so a
    device's clock off, or a backlog replayed, changes nothing), plus min(interval, GRACE_NS)."""
    return st[START] + st[SIZE] + st[OFFSET] + min(st[SIZE], GRACE_NS)
