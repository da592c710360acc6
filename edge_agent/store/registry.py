"""The device registry: which devices and series (device, point) the store holds, who owns each device, and what
it admits.

A device belongs to the source that registered it (mqtt, coap, opcua): readings for it from another source are
refused (`source_mismatch`: one protocol cannot pose as a device of another). A new device or series beyond the
registry's bounds is refused (`registry_full`; one of a device the config does not name stops at
store.registry_reserve short of them, so a flood cannot take the room of the devices the config names), a new point
beyond a device's bound (`device_points_full`), a new device or series beyond its source's rate (`new_device_rate`,
`new_point_rate`). Refusals are counted and dead-lettered; known series always go on. Series silent for
store.series_expiry_s leave the registry.

Writer thread only, except `devices`-style reads, which go through the store's reader.
"""
from __future__ import annotations

import collections
import logging
import sqlite3
import time

from edge_agent.config import StoreConfig
from edge_agent.metrics import Metrics
from edge_agent.records import Reading

log = logging.getLogger("edge_agent.store")


class Registry:
    def __init__(self, cfg: StoreConfig, metrics: Metrics, configured_devices: frozenset[str]) -> None:
        self.cfg, self.metrics = cfg, metrics
        self.configured_devices = configured_devices  # the config names them: they register into the reserve
        self.known_devices: dict[str, str] = {}  # device -> the source that registered it (its owner)
        self.device_points: collections.Counter[str] = collections.Counter()  # device -> series it has
        self.series: dict[tuple[str, str], int] = {}  # (device, point) -> the id of its row in `points`
        self._new_devices: dict[str, collections.deque] = {}  # source -> when it registered its latest devices
        self._new_points: dict[str, collections.deque] = {}   # source -> when it registered its latest series
        self._seen_devices: dict[str, str] = {}                     # since the last maintenance pass
        self._seen_points: dict[tuple[str, str], str | None] = {}
        self._last_expiry = 0.0
        self._last_refusal_log = 0.0

    def load(self, conn: sqlite3.Connection) -> None:
        self.known_devices = dict(conn.execute("SELECT device, source FROM devices"))
        self.series = {(d, p): i for i, d, p in conn.execute("SELECT id, device, point FROM points")}
        self.device_points = collections.Counter(d for d, _ in self.series)

    def forget(self, device: str) -> None:
        """(after its rows were deleted) The device and its series leave the registry's memory."""
        self.known_devices.pop(device, None)
        self.device_points.pop(device, None)
        self._seen_devices.pop(device, None)
        for key in [k for k in self.series if k[0] == device]:
            del self.series[key]
            self._seen_points.pop(key, None)

    def admit(self, readings: list[Reading], fresh: tuple[dict, set, collections.Counter],
              refused: dict[tuple[str, str, str, str], int]) -> list[Reading]:
        """The readings the registry takes (`fresh`: what this commit adds); the others are counted in `refused`
        by (reason, source, device, point)."""
        known_d, series = self.known_devices, self.series
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
            elif self.device_points[r.device] + new_per_device[r.device] >= self.cfg.max_points_per_device:
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

    def refusal_rows(self, refused: dict[tuple[str, str, str, str], int], fresh: tuple[dict, set, collections.Counter],
                     now_ns: int) -> list[tuple]:
        """Dead-letter rows that say why readings were refused, one per (reason, source, device, point)."""
        cfg, rows = self.cfg, []
        for (reason, source, device, point), n in refused.items():
            why = {"registry_full": f"{n} reading(s) of a new series refused: the registry holds store.max_devices = "
                                    f"{cfg.max_devices} devices and store.max_points = {cfg.max_points} series",
                   "device_points_full": f"{n} reading(s) of a new point refused: {device!r} has "
                                         f"store.max_points_per_device = {cfg.max_points_per_device} series",
                   "new_device_rate": f"{n} reading(s) of a new device refused: source {source!r} registered "
                                      f"store.new_devices_per_minute = {cfg.new_devices_per_minute} devices in "
                                      "the last minute",
                   "new_point_rate": f"{n} reading(s) of a new series refused: source {source!r} registered "
                                     f"store.new_points_per_minute = {cfg.new_points_per_minute} series in the "
                                     "last minute",
                   "source_mismatch": f"{n} reading(s) refused: device {device!r} belongs to source "
                                      f"{self.known_devices.get(device) or fresh[0].get(device)!r}, not "
                                      f"{source!r}"}[reason]
            rows.append((now_ns, source, f"{device}/{point}"[:256], reason, why, b""))
        return rows

    def count_refusals(self, refused: dict[tuple[str, str, str, str], int]) -> None:
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

    def register(self, conn: sqlite3.Connection, writes: list[tuple[int, list[Reading]]], now_ns: int,
                 new_devices: list[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """Register new devices and points at once; returns (device, point) -> series id. `last_seen`
        and unit changes of known ones are written by the maintenance pass, once a second, not per commit."""
        seen_d, seen_p = self._seen_devices, self._seen_points
        for _, rs in writes:
            seen_p.update({(r.device, r.point): r.unit for r in rs})
            seen_d.update({r.device: r.source for r in rs})
        fresh_d = [(d, s) for d, s in seen_d.items() if d not in self.known_devices]
        if fresh_d:
            conn.executemany("INSERT OR IGNORE INTO devices VALUES (?,?,?,?)",
                             [(d, s, now_ns, now_ns) for d, s in fresh_d])
            new_devices.extend(fresh_d)
            self.known_devices.update(fresh_d)
        for (d, p), u in seen_p.items():
            if (d, p) not in self.series:
                conn.execute("INSERT OR IGNORE INTO points (device, point, unit, first_seen_ns, last_seen_ns) "
                             "VALUES (?,?,?,?,?)", (d, p, u, now_ns, now_ns))
                self.series[(d, p)] = conn.execute("SELECT id FROM points WHERE device=? AND point=?",
                                                   (d, p)).fetchone()[0]
                self.device_points[d] += 1
        return self.series

    def flush_seen(self, conn: sqlite3.Connection) -> None:
        """(maintenance) last_seen and units of the series seen since the last pass."""
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

    def expire(self, conn: sqlite3.Connection) -> None:
        """(maintenance) Series silent for store.series_expiry_s leave the registry (and devices with none left): a
        client that once sent thousands of made-up names does not hold the registry's room for good. Once a minute
        at most (more often only for a shorter expiry)."""
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
            self.load(conn)
            self.metrics.registry_expired.labels("series").inc(n)
            self.metrics.registry_expired.labels("device").inc(m)
            log.info("silent series left the registry", extra={"series": n, "devices": m,
                                                               "series_expiry_s": self.cfg.series_expiry_s})
