"""Rules and alerts: the gateway watches its own data, with the cloud up or down.

Kinds (one `[[rules.rule]]` each, on one device/point):
- `above` / `below`: fires when the value passes `threshold`; clears once it is back past
  `threshold - hysteresis` (above) or `threshold + hysteresis` (below).
- `rate`: fires when |Δvalue / Δt| between consecutive readings exceeds `threshold` per second;
  clears when it is back under.
- `zscore`: fires when a value lies more than `threshold` standard deviations from the mean of the
  previous `window` values; clears when one lies within.
- `nodata`: fires when no reading came for `seconds`; clears with the next reading.

An alert (`state` firing or cleared, with the rule, device, point, value, window statistics, time and
a short text) is handed to the store, which keeps it until the cloud acknowledges it on
`<prefix>/<gateway>/alerts` — so alerts raised during an outage arrive after it. After an alert
fires, the rule fires again no sooner than `cooldown_s`; a firing inside the cooldown is counted
(`edge_agent_alerts_total{state="suppressed"}`) and its clearing is not sent either.

Actions: `local_topic` also publishes the alert (firing and cleared) on the local broker;
`action_device`/`action_point`/`action_value` write a point when the rule fires (not when it
clears), through the same allow-listed, typed, ranged path as the `write` command, audited.

Evaluation runs on the ingest path after the commit: a dict lookup per reading, and work only for
the readings a rule watches.

The engine owns its rules whole: evaluation, the rules added by command (`add_by_command`, `remove_by_command`:
checked like the config, no more than the sender's operations allow, at most `rules.max_command_rules`, stored so
they survive restarts), the alert listing (`alerts`), and the actions, which write and publish through callables the
supervisor hands in (as operations do).
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import math
import time
from typing import Any, Awaitable, Callable, Protocol

from edge_agent.config import ConfigError, RuleConfig, RulesConfig, action_value, rule_from_dict
from edge_agent.logs import RateLimited, new_trace
from edge_agent.metrics import Metrics
from edge_agent.records import Reading, WriteRefused

log = logging.getLogger(__name__)
Emit = Callable[[bytes, str, str, str], None]  # (payload, rule id, device, state)


class _Rule:
    def __init__(self, cfg: RuleConfig, engine: "RuleEngine") -> None:
        self.cfg, self.e = cfg, engine
        self.firing = False
        self.announced = False
        self.last_alert = -math.inf
        self.window: collections.deque[float] = collections.deque(maxlen=cfg.window)
        self.prev: tuple[float, int] | None = None   # (value, ts_ns) for rate
        self.last_seen = engine.clock()

    def feed(self, r: Reading) -> None:
        v = r.value
        self.last_seen = self.e.clock()
        if self.cfg.kind == "nodata":
            if self.firing:
                self._set(False, v, {"silent_s": None}, r.ts_ns)
            return
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return
        c = self.cfg
        if c.kind == "above":
            fire = v > c.threshold if not self.firing else v > c.threshold - c.hysteresis
            self._set(fire, v, {}, r.ts_ns)
        elif c.kind == "below":
            fire = v < c.threshold if not self.firing else v < c.threshold + c.hysteresis
            self._set(fire, v, {}, r.ts_ns)
        elif c.kind == "rate":
            if self.prev is not None and r.ts_ns > self.prev[1]:
                rate = (v - self.prev[0]) / ((r.ts_ns - self.prev[1]) / 1e9)
                self._set(abs(rate) > c.threshold, v, {"rate_per_s": round(rate, 6)}, r.ts_ns)
            self.prev = (v, r.ts_ns)
        elif c.kind == "zscore":
            w = self.window
            if len(w) >= 5:
                mean = sum(w) / len(w)
                sd = math.sqrt(sum((x - mean) ** 2 for x in w) / len(w))
                z = (v - mean) / sd if sd > 0 else (0.0 if v == mean else math.inf)
                self._set(abs(z) > c.threshold, v, {"mean": round(mean, 6), "stddev": round(sd, 6),
                                                    "z": round(z, 3) if math.isfinite(z) else None,
                                                    "samples": len(w)}, r.ts_ns)
            w.append(float(v))

    def tick(self, now: float) -> None:
        if self.cfg.kind == "nodata" and not self.firing and now - self.last_seen >= self.cfg.seconds:
            self._set(True, None, {"silent_s": round(now - self.last_seen, 1)}, time.time_ns())

    def _set(self, fire: bool, value: object, stats: dict, ts_ns: int) -> None:
        if fire == self.firing:
            return
        self.firing = fire
        now = self.e.clock()
        if fire:
            if now - self.last_alert < self.cfg.cooldown_s:
                self.announced = False
                self.e.metrics.alerts.labels("suppressed").inc()
                return
            self.last_alert = now
            self.announced = True
        elif not self.announced:
            return
        self.e.alert(self, "firing" if fire else "cleared", value, stats, ts_ns)


class RuleStore(Protocol):
    """Where rules added by command are kept and the alert log is read (the store)."""
    async def save_rule(self, rule_id: str, doc: str | None) -> None: ...

    async def load_rules(self) -> list[str]: ...

    async def alert_history(self, rules: list[str], device: str | None,
                            cleared: int) -> tuple[list[bytes], list[bytes]]: ...


audit = logging.getLogger("edge_agent.audit")


class RuleEngine:
    name = "rules"

    def __init__(self, cfg: RulesConfig, gateway: str, emit: Emit, metrics: Metrics,
                 clock: Callable[[], float] = time.monotonic, store: RuleStore | None = None,
                 write: Callable[[str, str, Any], Awaitable[None]] | None = None,
                 publish_local: Callable[[str, bytes], bool] | None = None,
                 may_write: Callable[[], bool] = lambda: False) -> None:
        """`write` (device, point, value): an allow-listed write, raising WriteRefused; `publish_local` (topic,
        payload) -> whether it went; `may_write`: whether the write operation is allowed on this gateway (a rule
        added by command may do no more than its sender)."""
        self.cfg, self.gateway, self.emit, self.metrics, self.clock = cfg, gateway, emit, metrics, clock
        self.store, self.write, self.publish_local, self.may_write = store, write, publish_local, may_write
        self._lock = asyncio.Lock()  # rules added or removed by command: the cap's check and the change as one step
        self._actions: set[asyncio.Task] = set()
        self.rules: list[_Rule] = []
        self._by_series: dict[tuple[str, str], list[_Rule]] = {}
        self.from_config = {r.id for r in cfg.rule}
        self._rl = RateLimited(log)
        self._stop = asyncio.Event()
        self._changed = asyncio.Event()  # a rule was added: the clock may be needed now
        for r in cfg.rule:
            self.add(r)

    def add(self, rc: RuleConfig) -> None:
        """Add or replace (same id) a rule."""
        self.remove(rc.id)
        rule = _Rule(rc, self)
        self.rules.append(rule)
        self._by_series.setdefault((rc.device, rc.point), []).append(rule)
        self._changed.set()

    def remove(self, rule_id: str) -> bool:
        for rule in self.rules:
            if rule.cfg.id == rule_id:
                self.rules.remove(rule)
                series = self._by_series[(rule.cfg.device, rule.cfg.point)]
                series.remove(rule)
                if not series:
                    del self._by_series[(rule.cfg.device, rule.cfg.point)]
                return True
        return False

    def list(self) -> list[dict]:
        return [{**dataclasses.asdict(r.cfg), "origin": "config" if r.cfg.id in self.from_config else "command",
                 "firing": r.firing} for r in self.rules]

    def observe(self, readings: list[Reading]) -> None:
        """Feed committed readings to the rules that watch them. Never raises: a rule that fails on a value is
        counted (`edge_agent_rule_errors_total{rule}`) and logged (rate-limited), and the others go on — ingest has
        committed these readings already and must acknowledge them."""
        by = self._by_series
        if not by:
            return
        for r in readings:
            rules = by.get((r.device, r.point))
            if rules:
                for rule in rules:
                    try:
                        rule.feed(r)
                    except Exception as e:  # noqa: BLE001 - see the docstring
                        self.metrics.rule_errors.labels(rule.cfg.id).inc()
                        self._rl.warning(rule.cfg.id, "rule failed on a reading; skipped", rule=rule.cfg.id,
                                         device=r.device, point=r.point, error=f"{type(e).__name__}: {e}"[:200])

    def tick(self) -> None:
        now = self.clock()
        for r in self.rules:
            r.tick(now)

    def alert(self, rule: _Rule, state: str, value: object, stats: dict, ts_ns: int) -> None:
        c = rule.cfg
        text = _text(c, state, value, stats)
        doc = {"gateway": self.gateway, "rule": c.id, "kind": c.kind, "state": state, "device": c.device,
               "point": c.point, "value": value, "threshold": c.threshold, "stats": stats, "ts": ts_ns, "text": text}
        self.metrics.alerts.labels(state).inc()
        log.info("alert", extra={"rule": c.id, "state": state, "device": c.device, "point": c.point,
                                    "value": value, "text": text})
        payload = json.dumps(doc, separators=(",", ":"), default=str).encode()
        self.emit(payload, c.id, c.device, state)
        self._act(c, state, payload)

    # -- actions -------------------------------------------------------------------------------
    def _act(self, rc: RuleConfig, state: str, payload: bytes) -> None:
        """A rule's actions: local publish (firing and cleared), and a write on firing."""
        if rc.local_topic:
            if self.publish_local is None or not self.publish_local(rc.local_topic, payload):
                self.metrics.alerts.labels("local_unavailable").inc()
                log.warning("alert not published locally: no local broker connection", extra={"rule": rc.id})
        if state == "firing" and rc.action_device and self.write is not None:
            t = asyncio.ensure_future(self._write(rc))
            self._actions.add(t)
            t.add_done_callback(self._actions.discard)

    async def _write(self, rc: RuleConfig) -> None:
        assert self.write is not None
        new_trace("rule")  # this task's lines (the write, its audit) carry the firing's own trace id
        value = action_value(rc)
        what = {"rule": rc.id, "device": rc.action_device, "point": rc.action_point, "value": value}
        try:
            await self.write(rc.action_device, rc.action_point, value)
        except WriteRefused as e:
            audit.warning("rule action write refused", extra={**what, "reason": str(e)})
            self.metrics.alerts.labels("action_refused").inc()
            return
        audit.info("rule action write done", extra=what)
        self.metrics.alerts.labels("action_done").inc()

    # -- rules added by command, kept in the store ------------------------------------------------
    async def load(self) -> None:
        """The rules added by command before a restart (a stored rule that no longer checks is skipped, logged)."""
        assert self.store is not None
        for doc in await self.store.load_rules():
            try:
                rc = rule_from_dict(json.loads(doc))
            except (ConfigError, ValueError) as e:
                log.error("stored rule unusable; skipped", extra={"error": str(e)})
                continue
            if rc.id not in self.from_config:
                self.add(rc)

    async def add_by_command(self, doc: dict) -> dict:
        """rules.add: raises ValueError (not a rule) or PermissionError (not allowed here)."""
        assert self.store is not None
        try:
            rc = rule_from_dict(doc)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        if rc.id in self.from_config:
            raise PermissionError(f"rule {rc.id!r} comes from the config file; change it there")
        async with self._lock:  # check and add as one step: concurrent adds cannot pass the cap together
            self._may_add(rc)
            await self.store.save_rule(rc.id, json.dumps(dataclasses.asdict(rc)))
            self.add(rc)
        return dataclasses.asdict(rc)

    def _may_add(self, rc: RuleConfig) -> None:
        """What a rule added by command may do: no more than the operations allowed to the sender would."""
        if rc.action_device and not self.may_write():
            raise PermissionError("a rule with a write action needs the write operation allowed on this gateway "
                                  "(commands.allow)")
        if rc.local_topic and not rc.local_topic.startswith(self.cfg.command_topic_prefix):
            raise PermissionError(f"local_topic must start with {self.cfg.command_topic_prefix!r} "
                                  "(rules.command_topic_prefix)")
        added = [r for r in self.rules if r.cfg.id not in self.from_config and r.cfg.id != rc.id]
        if len(added) >= self.cfg.max_command_rules:
            raise PermissionError(f"{len(added)} rules were added by command, the most rules.max_command_rules "
                                  "allows; remove one first")

    async def remove_by_command(self, rule_id: str) -> bool:
        """rules.remove: raises PermissionError for a rule of the config file."""
        assert self.store is not None
        if rule_id in self.from_config:
            raise PermissionError(f"rule {rule_id!r} comes from the config file; remove it there")
        async with self._lock:
            await self.store.save_rule(rule_id, None)
            return self.remove(rule_id)

    async def alerts(self, device: str | None, cleared: int) -> dict:
        """The alerts firing now (each rule's state, with its latest firing alert from the store's log) and the last
        `cleared` cleared ones."""
        assert self.store is not None
        firing_rules = [r for r in self.list() if r["firing"] and (device is None or r["device"] == device)]
        firing, done = await self.store.alert_history([r["id"] for r in firing_rules], device, cleared)
        docs = {d["rule"]: d for d in map(json.loads, firing)}
        now = [docs.get(r["id"]) or {"rule": r["id"], "kind": r["kind"], "state": "firing", "device": r["device"],
                                     "point": r["point"], "text": f"{r['device']}/{r['point']}: rule {r['id']} fires "
                                     "(its alert was held back by the cooldown)"} for r in firing_rules]
        return {"firing": now, "cleared": [json.loads(p) for p in done]}

    async def run(self) -> None:
        """The clock for `nodata` rules (once a second, only while there is one: an idle gateway is not woken for
        nothing); everything else happens on the ingest path."""
        self._stop.clear()
        while not self._stop.is_set():
            self.tick()
            self._changed.clear()
            clocked = any(r.cfg.kind == "nodata" for r in self.rules)
            waits = [asyncio.ensure_future(self._stop.wait())]
            if not clocked:
                waits.append(asyncio.ensure_future(self._changed.wait()))
            await asyncio.wait(waits, timeout=1.0 if clocked else None, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()

    async def stop(self) -> None:
        self._stop.set()


def _text(c: RuleConfig, state: str, value: object, stats: dict) -> str:
    what = f"{c.device}/{c.point}"
    if state == "cleared":
        return f"{what} is back to normal ({c.kind} rule {c.id}), value {value}"
    if c.kind == "above":
        return f"{what} is {value}, above {c.threshold:g}"
    if c.kind == "below":
        return f"{what} is {value}, below {c.threshold:g}"
    if c.kind == "rate":
        return f"{what} changes at {stats.get('rate_per_s')}/s, faster than {c.threshold:g}/s"
    if c.kind == "zscore":
        return f"{what} is {value}, {stats.get('z')} standard deviations from its recent mean {stats.get('mean')}"
    return f"{what} sent nothing for {stats.get('silent_s')} s"
