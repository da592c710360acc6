"""The supervisor: builds the components from config, starts them, restarts a crashed one with capped
exponential backoff, stops them in reverse order within a bound, and talks to systemd.

Start order: store, uplink, southbound adapters; stop order is the reverse, so an adapter's last
batch is committed and acknowledged before the uplink stops draining and the store closes.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import platform
import signal
import time
from pathlib import Path
from typing import Any, Protocol

from edge_agent import __version__
from edge_agent import ops, tls
from edge_agent.agent import Agent
from edge_agent.backoff import Backoff
from edge_agent.config import Config, ConfigError, action_value, rule_from_dict, to_dict
from edge_agent.control import ControlServer
from edge_agent.glm.points import PointTable
from edge_agent.logs import RING, ShipHandler, new_trace
from edge_agent import logs
from edge_agent.metrics import Metrics
from edge_agent.ota import Target, Updater
from edge_agent.records import WriteRefused
from edge_agent.rules import RuleEngine
from edge_agent.southbound.mqtt import MqttIngest
from edge_agent.store import Store
from edge_agent.systemd import Notifier
from edge_agent.uplink import Uplink

log = logging.getLogger(__name__)
audit = logging.getLogger("edge_agent.audit")
LAG_INTERVAL_S = 2.0  # the loop-lag gauge's sampling: a stall longer than this is always seen
STATUS_INTERVAL_S = 10.0


class Component(Protocol):
    name: str

    async def run(self) -> None: ...   # runs until stop(); raising means it crashed

    async def stop(self) -> None: ...  # drain and make run() return


class App:
    def __init__(self, cfg: Config, notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self.notifier = notifier or Notifier()
        self.store = Store(cfg.store, cfg.gateway.state_dir, self.metrics, cfg.configured_devices())
        self.components: list[Any] = []
        self.state: dict[str, str] = {}
        self.started = time.time()
        self._stop = asyncio.Event()
        self._tasks: dict[str, asyncio.Task] = {}
        self._metrics_server = None
        self.uplink: Uplink | None = None
        self.ingest: MqttIngest | None = None
        self.router: ops.Router | None = None
        self.control: ControlServer | None = None
        self.rules: RuleEngine | None = None
        self.agent: Agent | None = None
        self.updater: Updater | None = None
        self.shipper: ShipHandler | None = None
        self._actions: set[asyncio.Task] = set()
        self._rules_lock = asyncio.Lock()  # rules.add and rules.remove: the cap check and the change as one step

    async def sink(self, readings: list, since: float | None = None) -> int:
        """Where adapters hand readings: committed first, then seen by the rules (which never raise: a committed
        batch is always acknowledged)."""
        seq, admitted = await self.store.commit(readings, since)
        if self.rules is not None:
            self.rules.observe(admitted)
        return seq

    def build(self) -> None:
        """Make the components; raises TlsConfigError/ConfigError for what the user must fix."""
        cfg = self.cfg
        self.store.alerts_max = cfg.rules.max_pending_alerts
        self.store.alert_history_max = cfg.rules.history_max
        if cfg.rules.enabled:
            self.rules = RuleEngine(cfg.rules, cfg.gateway.id, self.store.alert, self.metrics, act=self._rule_action)
            self.components.append(self.rules)
        self.points = PointTable({p.name: p.words for p in cfg.ask.points})
        self.agent = Agent(cfg.model, ops.TOOLSET, Path(cfg.gateway.state_dir), self.metrics, points=self.points,
                           keys=[cfg.model.public_key, *cfg.ota.trusted_keys], smoke_max_ms=cfg.ota.smoke_max_ms)
        self.updater = Updater(cfg.ota, Path(cfg.gateway.state_dir), self.store, self.metrics, self.agent,
                               self._ota_tls, target=Target(cfg.gateway.id, cfg.gateway.hardware or platform.machine()))
        self.agent.boot, self.agent.booted = self.updater.boot, self.updater.booted  # which folder; what serves
        self.components.append(self.agent)
        self.router = ops.Router(cfg.commands, ops.TABLE, ops.Gateway(
            status=self.status, devices=self.store.devices, query_stats=self.store.query_stats,
            write_point=self.write_point, config=lambda: to_dict(self.cfg), log_lines=lambda: list(RING.lines),
            rules_list=lambda: self.rules.list() if self.rules else [], rules_add=self.rules_add,
            rules_remove=self.rules_remove, alerts=self.alerts, ask=self.agent.plan, log_level=self._log_level,
            renew_cert=self._renew_cert if cfg.uplink.enabled and cfg.uplink.renew else None,
            pending=ops.PendingWrites(cfg.ask, self.metrics.ask_outcomes.labels("dropped")), points=self.points,
            models=self.updater, forget_device=self.store.forget_device),
            self.metrics,
            journal=self.store, gateway_id=cfg.gateway.id)
        self.store.requests_keep_s, self.store.requests_max = cfg.commands.dedup_window_s, cfg.commands.dedup_max
        self.control = ControlServer(Path(cfg.gateway.state_dir), self.router.handle)
        self.components.append(self.control)
        if cfg.uplink.enabled:
            on_command = self.router.handle if cfg.commands.enabled else None
            self.uplink = Uplink(cfg.uplink, cfg.gateway.id, self.store, self.metrics, on_command,
                                 cfg.commands.concurrency, tuple(cfg.commands.reply_prefixes),
                                 cfg.commands.session_expiry_s)
            self.components.append(self.uplink)
            if cfg.log.ship:
                lc = cfg.log
                self.store.log_quota = lc.ship_quota_bytes
                self.uplink.log_batch_bytes = lc.ship_batch_bytes
                self.shipper = ShipHandler(self.store.log_line, lc.ship_level, lc.ship_library_level,
                                           lc.ship_max_line_chars)
        if cfg.southbound.coap.enabled:
            from edge_agent.southbound.coap import CoapAdapter
            self.components.append(CoapAdapter(cfg.southbound.coap, self.sink, self.store.dead_letter,
                                               self.metrics))
        if cfg.southbound.opcua.enabled:
            from edge_agent.southbound.opcua import OpcuaAdapter
            self.components.append(OpcuaAdapter(cfg.southbound.opcua, self.sink, self.store.dead_letter,
                                                self.metrics))
        if cfg.southbound.mqtt.enabled:
            self.ingest = MqttIngest(cfg.southbound.mqtt, cfg.gateway.id, self.sink, self.store.dead_letter,
                                     self.metrics, batch_delay_s=cfg.store.batch_max_delay_ms / 1000,
                                     batch_rows=cfg.store.batch_max_rows)
            self.components.append(self.ingest)

    def _rule_action(self, rc, state: str, payload: bytes) -> None:
        """A rule's actions (called by the engine on the loop): local publish, and a write on firing."""
        if rc.local_topic:
            if self.ingest is None or not self.ingest.publish_local(rc.local_topic, payload):
                self.metrics.alerts.labels("local_unavailable").inc()
                log.warning("alert not published locally: no local broker connection", extra={"rule": rc.id})
        if state == "firing" and rc.action_device:
            t = asyncio.ensure_future(self._rule_write(rc))
            self._actions.add(t)
            t.add_done_callback(self._actions.discard)

    async def _rule_write(self, rc) -> None:
        new_trace("rule")  # this task's lines (the write, its audit) carry the firing's own trace id
        value = action_value(rc)
        what = {"rule": rc.id, "device": rc.action_device, "point": rc.action_point, "value": value}
        try:
            await self.write_point(rc.action_device, rc.action_point, value)
        except WriteRefused as e:
            audit.warning("rule action write refused", extra={**what, "reason": str(e)})
            self.metrics.alerts.labels("action_refused").inc()
            return
        audit.info("rule action write done", extra=what)
        self.metrics.alerts.labels("action_done").inc()

    async def rules_add(self, doc: dict) -> dict:
        if self.rules is None:
            raise PermissionError("rules are disabled on this gateway (rules.enabled = false)")
        try:
            rc = rule_from_dict(doc)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        if rc.id in self.rules.from_config:
            raise PermissionError(f"rule {rc.id!r} comes from the config file; change it there")
        async with self._rules_lock:  # check and add as one step: concurrent adds cannot pass the cap together
            self.check_command_rule(rc)
            await self.store.save_rule(rc.id, json.dumps(dataclasses.asdict(rc)))
            self.rules.add(rc)
        return dataclasses.asdict(rc)

    def check_command_rule(self, rc) -> None:
        """What a rule added by command may do: no more than the operations allowed to the sender would."""
        cfg = self.cfg.rules
        if rc.action_device and (self.router is None or "write" not in self.router.allow):
            raise PermissionError("a rule with a write action needs the write operation allowed on this gateway "
                                  "(commands.allow)")
        if rc.local_topic and not rc.local_topic.startswith(cfg.command_topic_prefix):
            raise PermissionError(f"local_topic must start with {cfg.command_topic_prefix!r} "
                                  "(rules.command_topic_prefix)")
        added = [r for r in self.rules.rules if r.cfg.id not in self.rules.from_config and r.cfg.id != rc.id] \
            if self.rules else []
        if len(added) >= cfg.max_command_rules:
            raise PermissionError(f"{len(added)} rules were added by command, the most rules.max_command_rules "
                                  "allows; remove one first")

    async def rules_remove(self, rule_id: str) -> bool:
        if self.rules is None:
            return False
        if rule_id in self.rules.from_config:
            raise PermissionError(f"rule {rule_id!r} comes from the config file; remove it there")
        async with self._rules_lock:
            await self.store.save_rule(rule_id, None)
            return self.rules.remove(rule_id)

    async def _load_rules(self) -> None:
        if self.rules is None:
            return
        for doc in await self.store.load_rules():
            try:
                rc = rule_from_dict(json.loads(doc))
            except (ConfigError, ValueError) as e:
                log.error("stored rule unusable; skipped", extra={"error": str(e)})
                continue
            if rc.id not in self.rules.from_config:
                self.rules.add(rc)

    async def alerts(self, device: str | None, cleared: int) -> dict:
        """The alerts firing now (the rule engine's state, each with its latest firing alert from the store's log)
        and the last `cleared` cleared ones."""
        firing_rules = [r for r in (self.rules.list() if self.rules else [])
                        if r["firing"] and (device is None or r["device"] == device)]
        firing, done = await self.store.alert_history([r["id"] for r in firing_rules], device, cleared)
        docs = {d["rule"]: d for d in map(json.loads, firing)}
        now = [docs.get(r["id"]) or {"rule": r["id"], "kind": r["kind"], "state": "firing", "device": r["device"],
                                     "point": r["point"], "text": f"{r['device']}/{r['point']}: rule {r['id']} fires "
                                     "(its alert was held back by the cooldown)"} for r in firing_rules]
        return {"firing": now, "cleared": [json.loads(p) for p in done]}

    async def write_point(self, device: str, point: str, value: object) -> None:
        """Route an allow-listed point write to the adapter that owns the device."""
        for comp in self.components:
            owns = getattr(comp, "owns", None)
            if owns is not None and owns(device):
                await comp.write_point(device, point, value)
                return
        raise WriteRefused(f"no adapter can write to device {device!r}")

    def status(self) -> dict:
        return {"version": __version__, "gateway": self.cfg.gateway.id, "uptime_s": round(time.time() - self.started, 1),
                "components": dict(self.state), "outbox_readings": self.store.outbox_readings,
                "outbox_bytes": self.store.outbox_bytes, "acked_seq": self.store.acked_seq,
                "next_seq": self.store.next_seq, "uplink_connected": bool(self.uplink and self.uplink.connected),
                "cert_days_left": round(self.uplink.cert.days_left(), 1) if self.uplink and self.uplink.cert else None,
                "uplink_error": self.uplink.tls_error if self.uplink else None,
                "cert_reload": self.uplink.last_reload if self.uplink else None,
                "cert_renewal": self.uplink.last_renewal if self.uplink else None,
                "model": self.agent.info() if self.agent else None,
                "models": self.updater.list() if self.updater else None}

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self.request_stop)
            except (NotImplementedError, RuntimeError):  # not the main thread (tests, demo)
                pass
        try:  # SIGHUP: look at the uplink's certificate files now (systemctl reload edge-agent)
            loop.add_signal_handler(signal.SIGHUP, lambda: self.uplink.reload.set() if self.uplink else None)
        except (NotImplementedError, RuntimeError):
            pass
        if not self.components:
            self.build()
        if self.cfg.metrics.enabled:
            self._metrics_server, _ = self.metrics.serve(self.cfg.metrics.host, self.cfg.metrics.port)
        await self.store.open()
        logs.ship(self.shipper)
        await self._load_rules()
        for comp in self.components:
            self.state[comp.name] = "starting"
            self._tasks[comp.name] = asyncio.create_task(self._supervise(comp), name=comp.name)
        helpers = [asyncio.create_task(self._loop_lag()), asyncio.create_task(self._status_lines())]
        if self.notifier.watchdog_s:
            helpers.append(asyncio.create_task(self._watchdog(self.notifier.watchdog_s / 2)))
        if self.router is not None and not self.router.keys and self.uplink is not None and self.cfg.commands.enabled:
            log.warning("no operator keys (commands.operator_keys): operations that change the gateway trust the "
                        "cloud broker's ACL alone")
        self.notifier.ready(self.status_line())
        log.info("edge agent started", extra={"version": __version__, "gateway": self.cfg.gateway.id,
                                              "components": ",".join(c.name for c in self.components)})
        try:
            await self._stop.wait()
        finally:
            self.notifier.stopping()
            log.info("stopping")
            await self._shutdown()
            for h in helpers:
                h.cancel()
            if self._metrics_server is not None:
                self._metrics_server.shutdown()
            self.notifier.close()

    def _renew_cert(self) -> dict:
        assert self.uplink is not None
        self.uplink.renew_now.set()
        return {"started": True, "last": self.uplink.last_renewal}

    def _log_level(self, level: str, for_s: float) -> dict:
        if self.shipper is None:
            raise PermissionError("log shipping is off")
        self.shipper.override(level, for_s)
        log.info("shipped log level changed for a while", extra={"ship_level": level, "for_s": for_s})
        return {"level": level, "for_s": for_s, "then": self.cfg.log.ship_level}

    def _ota_tls(self):
        """The model server's TLS: ota's own files where set, else the uplink's (the gateway's one identity)."""
        o, u = self.cfg.ota, self.cfg.uplink
        return tls.client_context(o.ca_file or u.ca_file, o.cert_file or u.cert_file, o.key_file or u.key_file,
                                  prefix="ota.")

    async def _shutdown(self) -> None:
        if self.updater is not None:
            self.updater.cancel()
        deadline = time.monotonic() + self.cfg.supervisor.stop_timeout_s
        for comp in reversed(self.components):
            task = self._tasks.get(comp.name)
            left = max(0.1, deadline - time.monotonic())
            try:
                await asyncio.wait_for(comp.stop(), left)
                if task is not None:
                    await asyncio.wait_for(task, max(0.1, deadline - time.monotonic()))
            except (asyncio.TimeoutError, TimeoutError):
                log.warning("component did not stop in time; cancelled", extra={"comp": comp.name})
            except Exception as e:  # noqa: BLE001 - a failing stop must not block the others
                log.error("component stop failed", extra={"comp": comp.name, "error": str(e)})
            if task is not None and not task.done():
                task.cancel()
            self.state[comp.name] = "stopped"
        logs.ship(None)
        await self.store.close()
        log.info("stopped")

    async def _supervise(self, comp: Any) -> None:
        max_s = self.cfg.supervisor.restart_max_s
        backoff = Backoff(min(self.cfg.supervisor.restart_min_s, max_s), max_s,
                          self.metrics.backoff_waits.labels(f"restart_{comp.name}"))
        while not self._stop.is_set():
            started = time.monotonic()
            self.state[comp.name] = "running"
            try:
                await comp.run()
                if self._stop.is_set():
                    return
                raise RuntimeError("run() returned while the agent was running")
            except asyncio.CancelledError:
                raise
            except Exception:
                if self._stop.is_set():
                    return
                if time.monotonic() - started > 10 * max_s:
                    backoff.reset()  # it had been healthy for a long while
                self.state[comp.name] = "restarting"
                self.metrics.restarts.labels(comp.name).inc()
                wait = backoff.next()
                log.exception("component crashed; restarting", extra={"comp": comp.name, "retry_s": round(wait, 2)})
                await backoff.wait(self._stop, wait)

    async def _watchdog(self, interval: float) -> None:
        # Fed from the event loop: a stalled loop stops the pings and systemd restarts the process.
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def _loop_lag(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(LAG_INTERVAL_S)
            self.metrics.loop_lag.set(max(0.0, loop.time() - t - LAG_INTERVAL_S))

    async def _status_lines(self) -> None:
        while True:
            await asyncio.sleep(STATUS_INTERVAL_S)
            self.notifier.status(self.status_line())

    def received(self) -> float:
        return sum(s.value for mf in self.metrics.registry.collect() if mf.name == "edge_agent_readings_received"
                   for s in mf.samples if s.name.endswith("_total"))

    def status_line(self) -> str:
        m = self.metrics
        up = "up" if (self.uplink and self.uplink.connected) else "down"
        return (f"received={int(self.received())} "
                f"committed={int(m.value('edge_agent_readings_committed_total'))} "
                f"acked={int(m.value('edge_agent_uplink_readings_acked_total'))} "
                f"outbox={self.store.outbox_readings} uplink={up}")
