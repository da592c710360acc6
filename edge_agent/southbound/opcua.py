"""OPC UA ingest (asyncua): one self-healing session per configured server.

Each session: connect (security policy None for development, Basic256Sha256 or Aes256_Sha256_RsaPss
with Sign or SignAndEncrypt; the client certificate and key from files; the server certificate
pinned from a file, never fetched over an unsecured channel; optional user name and password),
resolve every node (NodeId, or a browse path from Objects, resolved again on every connect), create
subscriptions of at most `max_items_per_subscription` monitored items with the configured sampling
interval, queue size and absolute deadband. A data change becomes a `Reading` with the source
timestamp (server timestamp, then receive time, when absent) and the status code as its quality
(`good`, `uncertain:<name>`, `bad:<name>`).

Self-healing: asyncua's watchdog probes the server state every `watchdog_s`; a failed probe, a
transport loss or a subscription status change ends the session. The adapter then throws the whole
client away (nothing carries over, so nothing accumulates), waits with capped exponential backoff
and jitter, and builds the session again: connect, re-resolve, re-subscribe. Every re-established
session is counted in `edge_agent_adapter_reconnects_total{source="opcua"}`.

Writes: `write_point(device, point, value)` for nodes with `writable = true` only, checked against
the node's data type (read at connect) and the configured `min`/`max`; anything else raises
`WriteRefused` with the reason.

Bound: OPC UA does not redeliver, so readings wait in memory until the store has them; beyond
`max_buffered` the newest are dropped and counted (`edge_agent_messages_rejected_total{reason="overflow"}`).
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from asyncua import Client, Node, ua
from asyncua.crypto import security_policies

from edge_agent import tls
from edge_agent.backoff import Backoff
from edge_agent.config import OpcuaConfig, OpcuaNodeConfig, OpcuaServerConfig
from edge_agent.logs import RateLimited
from edge_agent.metrics import Metrics
from edge_agent.records import Reading, WriteRefused
from edge_agent.southbound import DeadLetter, Sink

log = logging.getLogger(__name__)
# asyncua logs every dropped connection with a traceback; the adapter reports each session failure itself
logging.getLogger("asyncua").setLevel(logging.CRITICAL)
SOURCE = "opcua"

_POLICIES = {"Basic256Sha256": security_policies.SecurityPolicyBasic256Sha256,
             "Aes256_Sha256_RsaPss": security_policies.SecurityPolicyAes256Sha256RsaPss}
_INT_RANGES = {ua.VariantType.SByte: (-2**7, 2**7 - 1), ua.VariantType.Byte: (0, 2**8 - 1),
               ua.VariantType.Int16: (-2**15, 2**15 - 1), ua.VariantType.UInt16: (0, 2**16 - 1),
               ua.VariantType.Int32: (-2**31, 2**31 - 1), ua.VariantType.UInt32: (0, 2**32 - 1),
               ua.VariantType.Int64: (-2**63, 2**63 - 1), ua.VariantType.UInt64: (0, 2**64 - 1)}
_FLOATS = (ua.VariantType.Float, ua.VariantType.Double)


class SessionLost(Exception):
    pass


@dataclass
class _Bound:
    """A resolved node of a live session."""
    cfg: OpcuaNodeConfig
    node: Node
    vtype: ua.VariantType | None


class _Handler:
    """asyncua subscription handler (called on the event loop)."""

    def __init__(self, session: "_Session") -> None:
        self.s = session

    def datachange_notification(self, node: Node, val: Any, data: Any) -> None:
        self.s.on_change(node, data.monitored_item.Value)

    def status_change_notification(self, status: Any) -> None:
        self.s.lost(f"subscription status {status}")


class _Session:
    """One server: the reconnect loop and what a live session knows (its nodes, for writes)."""

    def __init__(self, adapter: "OpcuaAdapter", cfg: OpcuaServerConfig) -> None:
        self.a, self.cfg = adapter, cfg
        self.client: Client | None = None
        self.by_node: dict[str, _Bound] = {}
        self.by_point: dict[str, _Bound] = {}
        self._lost: asyncio.Future | None = None
        self.connected = False
        self.up = asyncio.Event()  # set while a session is up: a write that arrives early waits for it (bounded)

    def lost(self, reason: str) -> None:
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(reason)

    async def run(self) -> None:
        cfg, m = self.cfg, self.a.metrics
        backoff = Backoff(cfg.reconnect_min_s, cfg.reconnect_max_s, m.backoff_waits.labels("opcua"))
        ever = False
        while True:
            self._lost = asyncio.get_running_loop().create_future()
            client = self.client = Client(cfg.endpoint, timeout=cfg.request_timeout_s,
                                          watchdog_intervall=cfg.watchdog_s)
            client.application_uri = cfg.application_uri
            client.session_timeout = 60_000  # a session we abandoned is closed by the server within a minute

            async def on_lost(exc: Exception) -> None:
                self.lost(f"connection lost: {exc!r}")
            client.connection_lost_callback = on_lost
            try:
                await self._setup(client)
            except asyncio.CancelledError:
                await self._teardown(client)
                raise
            except Exception as e:  # noqa: BLE001 - every failure of a remote session is retried
                m.adapter_errors.labels(SOURCE, _reason(e)).inc()
                wait = backoff.next()
                log.warning("opcua session failed", extra={"endpoint": cfg.endpoint, "error": _describe(e),
                                                           "retry_s": round(wait, 2)})
                await self._teardown(client)
                await backoff.wait(delay=wait)
                continue
            if ever:
                m.adapter_reconnects.labels(SOURCE).inc()
            ever = True
            backoff.reset()
            self.connected = True
            self.up.set()
            self.a.update_connected()
            log.info("opcua session up", extra={"endpoint": cfg.endpoint, "device": cfg.device,
                                                "items": len(self.by_node), "policy": cfg.security_policy})
            try:
                reason = await self._lost
            finally:
                self.connected = False
                self.up.clear()
                self.a.update_connected()
                await self._teardown(client)
            m.adapter_errors.labels(SOURCE, "session_lost").inc()
            log.warning("opcua session lost; reconnecting", extra={"endpoint": cfg.endpoint, "reason": reason})
            await backoff.wait()

    async def _setup(self, client: Client) -> None:
        cfg = self.cfg
        await _connect(client, cfg)
        self.by_node, self.by_point = {}, {}
        for n in cfg.nodes:
            node = await _node(client, n)
            vtype = None
            if n.writable:
                vtype = await node.read_data_type_as_variant_type()
            b = _Bound(n, node, vtype)
            self.by_node[node.nodeid.to_string()] = b
            self.by_point[n.point] = b
        handler = _Handler(self)
        bound = list(self.by_point.values())
        step = cfg.max_items_per_subscription
        for i in range(0, len(bound), step):
            sub = await client.create_subscription(cfg.publishing_ms, handler)
            groups: dict[tuple, list[Node]] = {}
            for b in bound[i:i + step]:
                groups.setdefault((b.cfg.queue_size, b.cfg.sampling_ms, b.cfg.deadband), []).append(b.node)
            for (qsize, sampling, deadband), nodes in groups.items():
                mfilter = None
                if deadband > 0:
                    mfilter = ua.DataChangeFilter()
                    mfilter.Trigger = ua.DataChangeTrigger(1)   # status or value
                    mfilter.DeadbandType = 1                   # absolute
                    mfilter.DeadbandValue = deadband
                results = await sub._subscribe(nodes, ua.AttributeIds.Value, mfilter, qsize,
                                               ua.MonitoringMode.Reporting, sampling)
                for node, r in zip(nodes, results):
                    if isinstance(r, ua.StatusCode):
                        raise SessionLost(f"monitored item for {node.nodeid.to_string()} refused: {r.name}")

    async def _teardown(self, client: Client) -> None:
        self.by_node, self.by_point = {}, {}
        try:
            await asyncio.wait_for(client.disconnect(), 2.0)
        except Exception:  # noqa: BLE001 - the server may be gone; the socket is closed either way
            try:
                client.uaclient.protocol and client.uaclient.protocol.transport.abort()  # type: ignore[union-attr]
            except Exception:  # noqa: BLE001
                pass

    def on_change(self, node: Node, dv: ua.DataValue) -> None:
        b = self.by_node.get(node.nodeid.to_string())
        if b is None:
            return
        v = dv.Value.Value if dv.Value is not None else None
        if isinstance(v, float) and not math.isfinite(v):
            self.a.reject("non_finite")
            return
        if isinstance(v, dt.datetime):
            v = v.isoformat()
        elif not isinstance(v, (bool, int, float, str)):
            self.a.reject("bad_value")
            return
        if isinstance(v, str) and len(v) > 1024:
            self.a.reject("bad_value")
            return
        ts = dv.SourceTimestamp or dv.ServerTimestamp
        ts_ns = int(ts.replace(tzinfo=dt.timezone.utc).timestamp() * 1e9) if ts else time.time_ns()
        sc = dv.StatusCode
        quality = "good" if sc is None or sc.is_good() else \
            f"{'uncertain' if sc.is_uncertain() else 'bad'}:{sc.name}"
        self.a.take(Reading(self.cfg.device, b.cfg.point, v, b.cfg.unit or None, ts_ns, quality, SOURCE))

    async def write(self, point: str, value: object) -> None:
        n = next((n for n in self.cfg.nodes if n.point == point), None)
        if n is None:
            raise WriteRefused(f"{self.cfg.device} has no point {point!r}")
        if not n.writable:
            raise WriteRefused(f"{self.cfg.device}/{point} is not writable (not allow-listed)")
        if not self.connected:  # at start-up, or a reconnect under way: wait for the session, bounded
            try:
                await asyncio.wait_for(self.up.wait(), self.cfg.request_timeout_s)
            except (asyncio.TimeoutError, TimeoutError):
                pass
        b = self.by_point.get(point)
        if b is None or b.vtype is None or not self.connected:
            raise WriteRefused(f"{self.cfg.device} is not connected (waited {self.cfg.request_timeout_s:g} s)")
        vt = b.vtype
        if vt == ua.VariantType.Boolean:
            if not isinstance(value, bool):
                raise WriteRefused(f"{self.cfg.device}/{point} takes true or false, got {value!r}")
        elif vt in _INT_RANGES:
            if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float)
                                                                          and value.is_integer())):
                raise WriteRefused(f"{self.cfg.device}/{point} takes an integer ({vt.name}), got {value!r}")
            value = int(value)
            lo, hi = _INT_RANGES[vt]
            if not lo <= value <= hi:
                raise WriteRefused(f"{self.cfg.device}/{point}: {value} is outside {vt.name}")
        elif vt in _FLOATS:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise WriteRefused(f"{self.cfg.device}/{point} takes a finite number, got {value!r}")
            value = float(value)
        elif vt == ua.VariantType.String:
            if not isinstance(value, str) or len(value) > 1024:
                raise WriteRefused(f"{self.cfg.device}/{point} takes a string of at most 1024 characters")
        else:
            raise WriteRefused(f"{self.cfg.device}/{point}: writes of {vt.name} are not supported")
        if not isinstance(value, (bool, str)) and not n.min <= value <= n.max:
            raise WriteRefused(f"{self.cfg.device}/{point}: {value} is outside the allowed range "
                               f"[{n.min:g}, {n.max:g}]")
        try:
            await b.node.write_value(ua.DataValue(ua.Variant(value, vt)))
        except ua.UaStatusCodeError as e:
            raise WriteRefused(f"{self.cfg.device}/{point}: the server refused the write ({e})") from None
        except (asyncio.TimeoutError, TimeoutError, OSError) as e:
            raise WriteRefused(f"{self.cfg.device}/{point}: the write did not complete ({_describe(e)})") from None
        log.info("opcua write", extra={"device": self.cfg.device, "point": point, "value": value})


class OpcuaAdapter:
    name = "opcua"

    def __init__(self, cfg: OpcuaConfig, sink: Sink, dead_letter: DeadLetter, metrics: Metrics) -> None:
        self.cfg, self.sink, self.metrics = cfg, sink, metrics
        self.sessions = {s.device: _Session(self, s) for s in cfg.servers}
        self._buf: list[Reading] = []
        self._buffered = 0
        self._flush_scheduled = False
        self._flushes: set[asyncio.Task] = set()
        self._stopping = asyncio.Event()
        self._received = metrics.readings_received.labels(SOURCE)
        self._last = metrics.last_data.labels(SOURCE)
        self._rl = RateLimited(log)

    async def run(self) -> None:
        self._stopping.clear()
        tasks = [asyncio.create_task(s.run(), name=f"opcua:{d}") for d, s in self.sessions.items()]
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            done, _ = await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stop:
                    t.result()  # a session loop only ends by raising: let the supervisor restart us
        finally:
            stop.cancel()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._flush()
            if self._flushes:
                await asyncio.gather(*self._flushes, return_exceptions=True)

    async def stop(self) -> None:
        self._stopping.set()

    def owns(self, device: str) -> bool:
        return device in self.sessions

    async def write_point(self, device: str, point: str, value: object) -> None:
        s = self.sessions.get(device)
        if s is None:
            raise WriteRefused(f"no OPC UA server for device {device!r}")
        await s.write(point, value)

    def update_connected(self) -> None:
        self.metrics.ingest_connected.labels(SOURCE).set(sum(s.connected for s in self.sessions.values()))

    def reject(self, reason: str) -> None:
        self.metrics.messages_rejected.labels(SOURCE, reason).inc()
        self._rl.warning(reason, "opcua value rejected", reason=reason)

    def take(self, r: Reading) -> None:
        if self._buffered >= self.cfg.max_buffered:
            self.reject("overflow")
            return
        self._buf.append(r)
        self._buffered += 1
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._buf:
            return
        batch, self._buf = self._buf, []
        t = asyncio.ensure_future(self._commit(batch))
        self._flushes.add(t)
        t.add_done_callback(self._flushes.discard)

    async def _commit(self, batch: list[Reading]) -> None:
        try:
            await self.sink(batch)
            self._received.inc(len(batch))
            self._last.set(time.time())
        except Exception as e:  # noqa: BLE001 - OPC UA cannot redeliver: count what is lost
            self.metrics.messages_rejected.labels(SOURCE, "store_failed").inc(len(batch))
            log.error("opcua readings could not be committed", extra={"readings": len(batch), "error": str(e)})
        finally:
            self._buffered -= len(batch)


async def _connect(client: Client, cfg: OpcuaServerConfig) -> None:
    """A session with the server's configured security and user."""
    if cfg.security_policy != "None":
        tls.check_key_file(cfg.client_key_file, "client_key_file")
        mode = getattr(ua.MessageSecurityMode, cfg.security_mode)
        await client.set_security(_POLICIES[cfg.security_policy], certificate=cfg.client_cert_file,
                                  private_key=cfg.client_key_file, server_certificate=cfg.server_cert_file,
                                  mode=mode)
    if cfg.username:
        client.set_user(cfg.username)
        client.set_password(cfg.password)
    await asyncio.wait_for(client.connect(), cfg.request_timeout_s * 3)


async def _node(client: Client, n) -> Node:
    return client.get_node(n.node_id) if n.node_id else await client.nodes.objects.get_child(n.browse_path.split("/"))


async def probe(cfg: OpcuaConfig) -> list[str]:
    """`edge-agent check --connect`: a session with each server (its security, its user) and each configured node
    found; one verdict line each."""
    out = []
    for s in cfg.servers:
        where = f"opcua {s.endpoint} ({s.device})"
        client = Client(s.endpoint, timeout=s.request_timeout_s)
        client.application_uri = s.application_uri
        try:
            await _connect(client, s)
            missing = []
            for n in s.nodes:
                try:
                    await _node(client, n)
                except Exception as e:  # noqa: BLE001 - a node the server does not have: named
                    missing.append(f"{n.point} ({n.node_id or n.browse_path}: {_describe(e)[:80]})")
            out.append(f"# FAILED {where}: session up, but not found: {'; '.join(missing)}" if missing else
                       f"# ok {where}: session up ({s.security_policy}), {len(s.nodes)} nodes found")
        except Exception as e:  # noqa: BLE001 - every failure is a verdict, not a crash
            out.append(f"# FAILED {where}: {_reason(e)}: {_describe(e)[:200]}")
        finally:
            try:
                await asyncio.wait_for(client.disconnect(), 2.0)
            except Exception:  # noqa: BLE001 - never connected, or already gone
                pass
    return out


def _describe(e: BaseException) -> str:
    return str(e) or type(e).__name__


def _reason(e: BaseException) -> str:
    if isinstance(e, (asyncio.TimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, ua.UaStatusCodeError):
        return "status"
    if isinstance(e, OSError):
        return "network"
    return "other"
