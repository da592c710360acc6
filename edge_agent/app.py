"""The supervisor: builds the components from config, starts them, restarts a crashed one with capped
exponential backoff, stops them in reverse order within a bound, and talks to systemd.

Start order: the store (opened first, outside the supervision), then rules, the GLM agent, the control socket, the
uplink and the southbound adapters; stop order is the reverse, so an adapter's last batch is committed and
acknowledged before the uplink stops draining and the store closes. Components take their limits when they are
made (constructor arguments); nothing is poked into them afterwards.
"""
from __future__ import annotations

import asyncio
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
from edge_agent.config import Config, to_dict
from edge_agent.control import ControlServer
from edge_agent.glm.points import PointTable
from edge_agent.logs import RING, ShipHandler
from edge_agent import logs
from edge_agent.metrics import Metrics
from edge_agent.ops.memory import Memory
from edge_agent.certs import GatewayCert
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
        ships = cfg.uplink.enabled and cfg.log.ship
        self.store = Store(cfg.store, cfg.gateway.state_dir, self.metrics, cfg.configured_devices(),
                           alerts_max=cfg.rules.max_pending_alerts, alert_history_max=cfg.rules.history_max,
                           requests_keep_s=cfg.commands.dedup_window_s, requests_max=cfg.commands.dedup_max,
                           log_quota=cfg.log.ship_quota_bytes if ships else 0, forward_rules=cfg.forward.rule,
                           encoding=cfg.uplink.encoding)
        self.components: list[Any] = []
        self.state: dict[str, str] = {}
        self.started = time.time()
        self._stop = asyncio.Event()
        self._tasks: dict[str, asyncio.Task] = {}
        self._metrics_server = None
        self.uplink: Uplink | None = None
        self.certs: GatewayCert | None = None
        self.ingest: MqttIngest | None = None
        self.router: ops.Router | None = None
        self.control: ControlServer | None = None
        self.rules: RuleEngine | None = None
        self.agent: Agent | None = None
        self.updater: Updater | None = None
        self.shipper: ShipHandler | None = None

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
        if cfg.rules.enabled:
            self.rules = RuleEngine(cfg.rules, cfg.gateway.id, self.store.alert, self.metrics, store=self.store,
                                    write=self.write_point, publish_local=self._publish_local,
                                    may_write=lambda: self.router is not None and "write" in self.router.allow)
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
            rules_list=self.rules.list if self.rules else list,
            rules_add=self.rules.add_by_command if self.rules else _rules_disabled,
            rules_remove=self.rules.remove_by_command if self.rules else _no_rule,
            alerts=self.rules.alerts if self.rules else _no_alerts, ask=self.agent.plan, log_level=self._log_level,
            renew_cert=self._renew_cert if cfg.uplink.enabled and cfg.uplink.renew else None,
            pending=ops.PendingWrites(cfg.ask, self.metrics.ask_outcomes.labels("dropped")), points=self.points,
            memory=Memory(cfg.ask.memory_ttl_s, cfg.ask.max_requesters,
                          lambda event: self.metrics.agent_events.labels(event).inc()),
            models=self.updater, forget_device=self.store.forget_device, forward_list=self.store.forward_rules,
            forward_set=lambda rc: self.store.forward_set(rc, cfg.forward.max_command_rules),
            forward_remove=self.store.forward_remove),
            self.metrics,
            journal=self.store, gateway_id=cfg.gateway.id)
        self.control = ControlServer(Path(cfg.gateway.state_dir), self.router.handle)
        self.components.append(self.control)
        if cfg.uplink.enabled:
            on_command = self.router.handle if cfg.commands.enabled else None
            self.certs = GatewayCert(cfg.uplink, cfg.gateway.id, self.metrics)
            self.uplink = Uplink(cfg.uplink, cfg.gateway.id, self.store, self.metrics, self.certs, on_command,
                                 cfg.commands.concurrency, tuple(cfg.commands.reply_prefixes),
                                 cfg.commands.session_expiry_s,
                                 log_batch_bytes=cfg.log.ship_batch_bytes if cfg.log.ship else 0)
            self.components.append(self.uplink)
            if cfg.log.ship:
                lc = cfg.log
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

    def _publish_local(self, topic: str, payload: bytes) -> bool:
        return self.ingest is not None and self.ingest.publish_local(topic, payload)

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
                **(self.certs.status() if self.certs else {"cert_days_left": None, "uplink_error": None,
                                                           "cert_reload": None, "cert_renewal": None}),
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
            loop.add_signal_handler(signal.SIGHUP, lambda: self.certs.reload.set() if self.certs else None)
        except (NotImplementedError, RuntimeError):
            pass
        if not self.components:
            self.build()
        if self.cfg.metrics.enabled:
            self._metrics_server, _ = self.metrics.serve(self.cfg.metrics.host, self.cfg.metrics.port)
        await self.store.open()
        logs.ship(self.shipper)
        if self.rules is not None:
            await self.rules.load()
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
        assert self.certs is not None
        return self.certs.renew()

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


async def _rules_disabled(_arg: object) -> object:
    raise PermissionError("rules are disabled on this gateway (rules.enabled = false)")


async def _no_rule(_rule_id: str) -> bool:
    return False


async def _no_alerts(_device: str | None, _cleared: int) -> dict:
    return {"firing": [], "cleared": []}
