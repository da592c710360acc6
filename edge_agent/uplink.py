"""The link to the cloud: MQTT over mutual TLS, draining the outbox in seq order.

Topics (`P` = uplink.topic_prefix, `G` = gateway.id):
- `P/G/status`: retained JSON `{"state": "online"|"offline", "gateway", "version", "ts"}`; the
  broker publishes the offline one (the will) when the link dies without a DISCONNECT.
- `P/G/telemetry`: JSON batches `{"gateway", "first_seq", "last_seq", "count", "readings": [...]}`
  at QoS 1; every reading carries its `seq`. With uplink.encoding = columns, `P/G/telemetry/columns.zstd` (or
  `.gzip`): the same batch, columnar and compressed (store/encoding.py documents the format and decodes it).
  Batches cover consecutive seq ranges, first_seq to last_seq, one after the other: a seq inside a range that no
  record carries was filtered on purpose (a forwarding rule); a range never received is loss.

Delivery: at most `max_inflight` batches await PUBACK at once; a batch leaves the outbox only after
the cloud's PUBACK, and the acknowledgement is applied in seq order. After a disconnect or a
restart, sending resumes after the highest acknowledged seq, so the cloud sees every seq at least
once and a duplicate only as a resend of the same seq. Reconnects back off exponentially with
jitter, capped.
"""
from __future__ import annotations

import asyncio
import collections
import gzip
import json
import logging
import math
import time
from typing import Awaitable, Callable

from edge_agent import __version__
from edge_agent.backoff import Backoff
from edge_agent.certs import GatewayCert
from edge_agent.config import UplinkConfig
from edge_agent.logs import RateLimited
from edge_agent.metrics import Metrics
from edge_agent.mqttio import ConnectError, MqttConnection, PublishError, Will
from edge_agent.store import Store
from edge_agent.store.encoding import batch_columns, batch_json

CommandHandler = Callable[[str, bytes, str, bool], Awaitable[tuple[bytes, "str | None"]]]  # name, body, who, at least once

log = logging.getLogger(__name__)


LOG_TRIES = 3  # a log batch that failed this often is set aside
EMPTY_LINGER_S = 5.0  # a batch of filtered ranges only (no record) waits at least this long for records to ride with


class Uplink:
    name = "uplink"

    def __init__(self, cfg: UplinkConfig, gateway_id: str, store: Store, metrics: Metrics, certs: GatewayCert,
                 on_command: CommandHandler | None = None, max_commands: int = 8,
                 reply_prefixes: tuple[str, ...] = (), session_expiry_s: int = 3600, log_batch_bytes: int = 0) -> None:
        """`certs`: the gateway's certificate (certs.py), which says what to connect with."""
        self.cfg, self.gateway, self.store, self.metrics, self.certs = cfg, gateway_id, store, metrics, certs
        self.log_batch_bytes = log_batch_bytes  # > 0: ship the store's log lines (log.ship_batch_bytes a batch)
        self._refusal_log = RateLimited(log, interval_s=60, burst=3)  # commands refused unrun: a flood logs little
        self._sent_seq = 0  # readings published up to here (logs wait while readings wait to be sent)
        self._log_failures: dict[int, int] = {}  # a log batch's first id -> failed tries
        self.on_command = on_command
        self.max_commands = max_commands
        base = f"{cfg.topic_prefix}/{gateway_id}"
        self.status_topic, self.telemetry_topic = f"{base}/status", f"{base}/telemetry"
        # the encoding is announced by the topic (and the payload's first bytes): a consumer never guesses
        self.topic_suffix = f"/columns.{cfg.compression}" if cfg.encoding == "columns" else ""
        self.cmd_prefix, self.res_prefix = f"{base}/cmd/", f"{base}/res/"
        self.reply_prefixes = (self.res_prefix, *reply_prefixes)
        self.session_expiry_s = session_expiry_s
        self.base = base  # alerts and events go to <base>/<their topic>
        self._serving: set[asyncio.Task] = set()
        self._stopping = asyncio.Event()
        self._conn: MqttConnection | None = None
        self._acked = 0
        self.connected = False
        self.crt_topic, self.csr_topic = f"{base}/certs/crt", f"{base}/certs/csr"  # the renewal's exchange

    def _status(self, state: str) -> bytes:
        return json.dumps({"state": state, "gateway": self.gateway, "version": __version__,
                           "ts": time.time_ns()}).encode()

    async def run(self) -> None:
        backoff = Backoff(self.cfg.reconnect_min_s, self.cfg.reconnect_max_s, self.metrics.backoff_waits.labels("uplink"))
        certs = self.certs
        while not self._stopping.is_set():
            certs.check_expiry()
            ctx = certs.context()  # a candidate's (new files, a renewed pair) while one waits, else the live pair's
            if ctx is None:  # the files cannot serve: said by certs, retried
                await backoff.wait(self._stopping)
                continue
            conn = self._conn = MqttConnection(
                client_id=self.gateway, host=self.cfg.host, port=self.cfg.port, protocol=self.cfg.protocol,
                keepalive=self.cfg.keepalive_s, ssl_context=ctx,
                # the command subscription and the commands sent while the agent is down outlive a restart
                clean_start=self.on_command is None, session_expiry_s=self.session_expiry_s,
                will=Will(self.status_topic, self._status("offline")), max_inflight=self.cfg.max_inflight,
                manual_ack=True, receive_maximum=self.max_commands * 4, server_hostname=self.cfg.server_hostname,
                on_message=lambda msg: self._on_command_message(conn, msg))
            try:
                await conn.connect()
                subs = ([(self.cmd_prefix + "+", 1)] if self.on_command is not None else []) + \
                    ([(self.crt_topic, 1)] if self.cfg.renew else [])
                if subs:
                    await conn.subscribe(subs, timeout=self.cfg.publish_timeout_s)
                await self._acked_publish(conn, self.status_topic, self._status("online"), retain=True)
            except (ConnectError, PublishError, asyncio.TimeoutError) as e:
                conn.close()
                reason = str(e)
                if certs.refused(reason):  # the broker did not take the new certificate: back to the old one, now
                    continue
                self.metrics.uplink_errors.labels(e.kind if isinstance(e, ConnectError) else
                                                  "publish" if isinstance(e, PublishError) else "timed_out").inc()
                wait = backoff.next()
                log.warning("cloud connection failed", extra={"host": self.cfg.host, "port": self.cfg.port,
                                                             "error": reason, "retry_s": round(wait, 2)})
                await backoff.wait(self._stopping, wait)
                continue
            backoff.reset()
            certs.accepted()
            self.connected = True
            self.metrics.uplink_connected.set(1)
            self.metrics.uplink_connects.inc()
            log.info("connected to cloud", extra={"host": self.cfg.host, "port": self.cfg.port,
                                                  "resume_after_seq": max(self._acked, self.store.acked_seq)})
            helpers = [asyncio.ensure_future(self._alert_pump(conn)), asyncio.ensure_future(self._watch_files(conn))]
            if self.cfg.renew:
                helpers.append(asyncio.ensure_future(self._renewal(conn)))
            if self.log_batch_bytes:
                helpers.append(asyncio.ensure_future(self._log_pump(conn)))
            try:
                await self._pump(conn)
            finally:
                for h in helpers:
                    h.cancel()
                await asyncio.gather(*helpers, return_exceptions=True)
                self.connected = False
                self.metrics.uplink_connected.set(0)
            if certs.trying and not self._stopping.is_set():
                continue  # a planned switch to new certificate files: reconnect at once
            if not self._stopping.is_set():
                reason = conn.disconnected.result() if conn.disconnected.done() else "unknown"
                self.metrics.uplink_errors.labels("disconnected").inc()
                log.warning("cloud connection lost", extra={"reason": reason})
                conn.close()
                await backoff.wait(self._stopping)

    async def _acked_publish(self, conn: MqttConnection, topic: str, payload: bytes, retain: bool = False,
                             correlation_data: bytes | None = None) -> None:
        """Publish at QoS 1 and wait for the PUBACK, at most publish_timeout_s; past it the link is dead: counted,
        closed (the run loop reconnects), PublishError."""
        fut = conn.publish(topic, payload, qos=1, retain=retain, correlation_data=correlation_data)
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.cfg.publish_timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())
            self._dead_link(conn, topic)
            raise PublishError(f"no PUBACK within {self.cfg.publish_timeout_s} s") from None

    def _dead_link(self, conn: MqttConnection, what: str) -> None:
        if conn.disconnected.done():
            return
        self.metrics.uplink_errors.labels("puback_timeout").inc()
        log.error("the cloud stopped acknowledging; the link is declared dead and reconnected", extra={
            "waiting_for": what[:120], "publish_timeout_s": self.cfg.publish_timeout_s})
        conn.close()

    async def _pump(self, conn: MqttConnection) -> None:
        store, cfg = self.store, self.cfg
        sent = self._sent_seq = max(self._acked, store.acked_seq)
        inflight: collections.deque[tuple[int, int, asyncio.Future, float]] = collections.deque()
        loop = asyncio.get_running_loop()
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            held: tuple[int, float] | None = None  # (sent, since when) while a batch lingers for more
            while True:
                seen = sent  # nothing to send up to here: what is committed after it wakes the wait below
                linger = None
                while len(inflight) < cfg.max_inflight and not self._stopping.is_set():
                    head = store.head("readings")
                    rows = await store.read_outbox(sent, cfg.batch_max_readings, cfg.batch_max_bytes)
                    if not rows:
                        seen = max(sent, head)  # (rows the quota evicted are never waited for)
                        break
                    first, last = rows[0].first_seq, rows[-1].last_seq
                    count = sum(r.count for r in rows)
                    hold = max(cfg.linger_s, EMPTY_LINGER_S) if not count else cfg.linger_s
                    if hold and not self._stopping.is_set() and count < cfg.batch_max_readings \
                            and last >= store.head("readings"):  # a batch that could take more waits a while
                        if held is None or held[0] != sent:
                            held = (sent, loop.time())
                        left = held[1] + hold - loop.time()
                        if left > 0:
                            seen, linger = last, left
                            break
                    held = None
                    payloads = [r.payload for r in rows]
                    if cfg.encoding == "columns":
                        payload = await asyncio.to_thread(batch_columns, self.gateway, first, last, count, payloads,
                                                          cfg.compression)
                    else:
                        payload = batch_json(self.gateway, first, last, count, payloads)
                    self.metrics.telemetry_bytes.inc(len(payload))
                    inflight.append((last, count, conn.publish(self.telemetry_topic + self.topic_suffix, payload,
                                                               qos=1), loop.time()))
                    self.metrics.batches_sent.inc()
                    sent = self._sent_seq = last
                if self._stopping.is_set() and not inflight:
                    return
                waits: list[asyncio.Future] = [conn.disconnected]
                if inflight:
                    waits.append(inflight[0][2])
                new = None
                if not self._stopping.is_set():
                    waits.append(stop)
                    if len(inflight) < cfg.max_inflight:
                        new = asyncio.ensure_future(store.committed_after("readings", max(seen, sent)))
                        waits.append(new)
                timeout = linger
                if inflight:  # the oldest batch's PUBACK has a deadline
                    timeout = min(timeout if timeout is not None else math.inf,
                                  max(0.0, inflight[0][3] + cfg.publish_timeout_s - loop.time()))
                await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if new is not None:
                    new.cancel()
                if inflight and not inflight[0][2].done() and \
                        loop.time() - inflight[0][3] >= cfg.publish_timeout_s:
                    self._dead_link(conn, f"telemetry up to seq {inflight[0][0]}")
                    return
                acked_to = 0
                while inflight and inflight[0][2].done():
                    last, count, fut, _ = inflight.popleft()
                    if fut.exception() is not None:
                        if not conn.disconnected.done():
                            log.error("cloud refused a telemetry batch; reconnecting to resend",
                                      extra={"last_seq": last, "error": str(fut.exception())})
                            self.metrics.uplink_errors.labels("publish_refused").inc()
                            conn.close()
                        return
                    acked_to = last
                    self.metrics.batches_acked.inc()
                    self.metrics.readings_acked.inc(count)
                if acked_to:
                    self._acked = acked_to
                    store.ack_outbox(acked_to)
                    self.metrics.uplink_ack_seq.set(acked_to)
                if conn.disconnected.done():
                    return
        finally:
            stop.cancel()
            for _, _, fut, _ in inflight:  # retrieved, now or when it ends: the batch is resent on the next connection
                fut.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def _alert_pump(self, conn: MqttConnection) -> None:
        """Alerts leave the store one by one, each after the cloud's PUBACK, oldest first."""
        store = self.store
        sent = 0
        while not conn.disconnected.done():
            head = store.head("alerts")  # before the read: anything committed after it wakes the wait below
            rows = await store.read_alerts(sent)
            if not rows:
                await store.committed_after("alerts", head)
                continue
            for aid, topic, payload in rows:
                try:
                    await self._acked_publish(conn, f"{self.base}/{topic}", payload)
                except PublishError:
                    return  # what was not acknowledged goes again on the next connection
                sent = aid
                store.ack_alerts(aid)
                if topic == "alerts":
                    self.metrics.alerts.labels("sent").inc()

    async def _watch_files(self, conn: MqttConnection) -> None:
        """New valid certificate files end this connection cleanly (no will) so that the next one tries them."""
        if await self.certs.watch(conn.disconnected):
            await conn.disconnect()

    async def _renewal(self, conn: MqttConnection) -> None:
        """While connected: when the certificate is due (or certs.renew asks), the CSR goes to the signer; once its
        answer is checked (certs.py), this connection ends so that the next one tries the new pair (see run())."""
        certs = self.certs
        while not conn.disconnected.done():
            try:
                wait = certs.due_in()
            except (OSError, ValueError) as e:
                certs.renewal_failed("invalid", f"the live certificate cannot be read: {e}")
                return
            if wait > 0 and not certs.renew_now.is_set():
                try:
                    await asyncio.wait_for(certs.renew_now.wait(), min(wait, 3600.0))
                except (asyncio.TimeoutError, TimeoutError):
                    continue
            rid, csr = certs.begin_renewal()
            try:
                await self._acked_publish(conn, self.csr_topic, csr)
            except PublishError:
                certs.abandon(rid)
                return  # the link went; the next connection tries again
            log.info("uplink certificate renewal: CSR sent", extra={"id": rid})
            if await certs.finish_renewal(rid):
                await conn.disconnect()
                return

    async def _log_pump(self, conn: MqttConnection) -> None:
        """Log lines leave the store oldest first, in gzip'd JSON batches ({gateway, first_id, last_id, lines}), one
        at a time, each deleted after the cloud's PUBACK, and only while no reading waits to be sent. A batch that
        fails LOG_TRIES times (on any connections) is set aside: deleted and counted, never blocking the rest."""
        store = self.store
        sent = store.log_acked
        while not conn.disconnected.done():
            if self._sent_seq < store.head("readings"):  # readings first
                await asyncio.sleep(0.05)
                continue
            head = store.head("logs")  # before the read: anything committed after it wakes the wait below
            rows = await store.read_logs(sent, self.log_batch_bytes)
            if not rows:
                await store.committed_after("logs", head)
                continue
            first, last = rows[0][0], rows[-1][0]
            if first > sent + 1:  # ids are consecutive: the ones between never left, the quota took them
                self.metrics.logs_dropped.labels("quota").inc(first - sent - 1)
                sent = first - 1
            body = {"gateway": self.gateway, "first_id": first, "last_id": last,
                    "lines": [line.decode("utf-8", "backslashreplace") for _, line in rows]}
            payload = gzip.compress(json.dumps(body, separators=(",", ":")).encode(), 6)
            try:
                await self._acked_publish(conn, f"{self.base}/logs", payload)
            except PublishError:
                if conn.disconnected.done():
                    return  # the link went, not the batch: sent again on the next connection
                tries = self._log_failures[first] = self._log_failures.get(first, 0) + 1
                if tries < LOG_TRIES:
                    return  # sent again on the next connection
                self.metrics.logs_dropped.labels("set_aside").inc(len(rows))
                log.error("a log batch the cloud kept refusing was set aside", extra={
                    "first_id": first, "last_id": last, "tries": tries})
            self._log_failures.pop(first, None)
            while len(self._log_failures) > 64:
                self._log_failures.pop(next(iter(self._log_failures)))
            sent = last
            store.ack_logs(last)
            self.metrics.logs_sent.inc(len(rows))

    # -- commands: the transport side only; the supervisor's handler knows what they mean -----------
    def _on_command_message(self, conn: MqttConnection, msg) -> None:
        if msg.topic == self.crt_topic:  # the signer's answer to a renewal's CSR
            conn.ack(msg.mid, msg.qos)
            self.certs.answer(msg.payload)
            return
        if self.on_command is None or not msg.topic.startswith(self.cmd_prefix):
            conn.ack(msg.mid, msg.qos)
            return
        if msg.retain:  # a retained message is a state the broker replays at every subscribe, never a command
            conn.ack(msg.mid, msg.qos)
            self.metrics.commands.labels("unknown", "retained").inc()
            self._refusal_log.warning("retained", "a retained command message was refused unrun (retained messages "
                                      "come again at every subscribe; publish commands without the retain flag)",
                                      command=msg.topic[len(self.cmd_prefix):][:64])
            return
        props = getattr(msg, "properties", None)
        reply_to = getattr(props, "ResponseTopic", None) if props is not None else None
        correlation = getattr(props, "CorrelationData", None) if props is not None else None
        t = asyncio.ensure_future(self._serve(conn, msg.mid, msg.qos, msg.topic[len(self.cmd_prefix):],
                                              msg.payload, reply_to, correlation))
        self._serving.add(t)
        t.add_done_callback(self._serving.discard)

    async def _serve(self, conn: MqttConnection, mid: int, qos: int, name: str, body: bytes, reply_to: str | None,
                     correlation: bytes | None) -> None:
        assert self.on_command is not None
        if reply_to is not None and (not reply_to.startswith(self.reply_prefixes) or "+" in reply_to
                                     or "#" in reply_to):
            # a reply must never land on telemetry, another gateway's commands, or anywhere the sender chose
            self.metrics.commands.labels("unknown", "bad_reply_topic").inc()
            self._refusal_log.warning("bad_reply_topic", "command refused unrun: its response topic is outside the "
                                      "allowed prefixes", command=name[:64], response_topic=reply_to[:120],
                                      allowed=",".join(self.reply_prefixes))
            conn.ack(mid, qos)
            return
        reply, rid = await self.on_command(name, body, "mqtt", True)
        topic = reply_to or (self.res_prefix + rid if rid else None)
        if topic is None or "+" in topic or "#" in topic:
            self.metrics.commands.labels("unknown", "unroutable").inc()
            log.warning("command without a response topic or id; no reply possible", extra={"command": name[:64]})
        else:
            try:
                await self._acked_publish(conn, topic, reply, correlation_data=correlation)
            except PublishError as e:
                log.warning("command reply not delivered", extra={"command": name[:64], "error": str(e)})
                return  # not acknowledged: the request comes again on the next connection
        conn.ack(mid, qos)

    async def stop(self) -> None:
        """Stop sending, wait (bounded by the supervisor) for in-flight PUBACKs, say offline, disconnect."""
        self._stopping.set()
        if self._serving:  # commands still running get a moment; unanswered ones are not acknowledged
            await asyncio.wait(list(self._serving), timeout=2.0)
            for t in list(self._serving):
                t.cancel()
        conn = self._conn
        if conn is not None and not conn.disconnected.done():
            # the pump returns once its in-flight batches are acknowledged; then say goodbye
            for _ in range(100):
                if conn.inflight == 0:
                    break
                await asyncio.sleep(0.02)
            try:
                await asyncio.wait_for(conn.publish(self.status_topic, self._status("offline"), qos=1,
                                                    retain=True), 2.0)
            except (PublishError, asyncio.TimeoutError, TimeoutError):
                pass
            await conn.disconnect()
