"""MQTT ingest from the local broker (paho-mqtt through `edge_agent.mqttio`).

Persistent session, QoS 1, manual acknowledgement: a message is PUBACKed only after its readings
are committed to the store, so a crash at any point leaves it with the broker, which redelivers it.
Messages are decoded as they arrive (on the loop thread, by the paho callback) and gathered into one
batch until the first of them has waited store.batch_max_delay_ms (or the batch holds batch_max_rows
readings, or reading is paused at the pending bound: then at once); the batch goes to the store as one
write (whose own deadline counts from that first message, so the wait is not paid twice), and its
PUBACKs go out in arrival order once that write is durable. Rejected payloads are counted, logged (rate-limited), kept in the
dead-letter table and acknowledged, so a poison message is not redelivered forever.

Bounds: the broker sends at most `receive_maximum` unacknowledged messages (MQTT 5; with 3.1.1 the
broker's `max_inflight_messages`). Not every broker holds to that, QoS 0 has no window at all, and
the window times the payload bound could be large, so the adapter also stops reading from the
socket when `receive_maximum` messages or `max_pending_bytes` of payload are taken but not yet
committed, and reads again below half of both: TCP flow control then holds the broker back. Nothing
is dropped at the bound; each pause is counted (`edge_agent_ingest_paused_total`).
"""
from __future__ import annotations

import asyncio
import logging
import time

from paho.mqtt.client import MQTTMessage, topic_matches_sub

from edge_agent import tls
from edge_agent.backoff import Backoff
from edge_agent.config import MqttIngestConfig
from edge_agent.logs import RateLimited
from edge_agent.metrics import Metrics
from edge_agent.mqttio import ConnectError, MqttConnection
from edge_agent.records import Reading, RejectedInput, StoreError
from edge_agent.southbound import DeadLetter, Sink
from edge_agent.southbound.decode import Decoder, make_decoder

log = logging.getLogger(__name__)
SOURCE = "mqtt"


class MqttIngest:
    name = "mqtt"

    def __init__(self, cfg: MqttIngestConfig, gateway_id: str, sink: Sink, dead_letter: DeadLetter,
                 metrics: Metrics, batch_delay_s: float = 0.0, batch_rows: int = 5000) -> None:
        self.cfg = cfg
        self.client_id = cfg.client_id or f"{gateway_id}-ingest"
        self.sink, self.dead_letter, self.metrics = sink, dead_letter, metrics
        retimed = lambda q: metrics.readings_retimed.labels(SOURCE, q).inc()  # noqa: E731
        self.routes: list[tuple[str, Decoder]] = [(t.filter, make_decoder(t, t.device, SOURCE, retimed=retimed))
                                                  for t in cfg.topics]
        self._routes_cache: dict[str, Decoder] = {}
        self._ever_connected = False
        self.ssl_context = None
        if cfg.tls:
            f = cfg.tls_files
            self.ssl_context = tls.client_context(f.ca_file, f.cert_file, f.key_file,
                                                  prefix="southbound.mqtt.tls_files.")
        self.max_pending = cfg.receive_maximum
        self._paused = False
        self._stopping = asyncio.Event()
        self._conn: MqttConnection | None = None
        self._batch: list[tuple[int, int, int, bytes]] = []  # (mid, qos, its first reading, payload), in order
        self._batch_bytes = 0
        self._pending_bytes = 0
        self._readings: list[Reading] = []
        self._dead: list[tuple[str, str, str, str, bytes]] = []
        self._pending = 0
        self.batch_delay_s, self.batch_rows = batch_delay_s, batch_rows
        self._flush_handle: asyncio.Handle | None = None  # the pending batch's flush (a timer, or at once)
        self._flush_now = False
        self._batch_t = 0.0  # when the pending batch's first message arrived (monotonic)
        self._last_flush: asyncio.Future | None = None
        self._rl = RateLimited(log)
        self._received = metrics.readings_received.labels(SOURCE)
        self._last = metrics.last_data.labels(SOURCE)
        self._connected = metrics.ingest_connected.labels(SOURCE)

    async def run(self) -> None:
        backoff = Backoff(self.cfg.reconnect_min_s, self.cfg.reconnect_max_s,
                          self.metrics.backoff_waits.labels("mqtt_ingest"))
        while not self._stopping.is_set():
            conn = self._conn = MqttConnection(
                client_id=self.client_id, host=self.cfg.host, port=self.cfg.port, protocol=self.cfg.protocol,
                keepalive=self.cfg.keepalive_s, ssl_context=self.ssl_context, username=self.cfg.username,
                password=self.cfg.password, clean_start=False, receive_maximum=self.cfg.receive_maximum,
                manual_ack=True, on_message=self._on_message, lean_publish=True)
            self._paused = False
            try:
                present = await conn.connect()
                await conn.subscribe([(f, 1) for f, _ in self.routes])
            except (ConnectError, asyncio.TimeoutError) as e:
                conn.close()
                self.metrics.adapter_errors.labels(SOURCE, "connect").inc()
                wait = backoff.next()
                log.warning("local broker connection failed", extra={"host": self.cfg.host, "port": self.cfg.port,
                                                                     "error": str(e), "retry_s": round(wait, 2)})
                await backoff.wait(self._stopping, wait)
                continue
            up_since = time.monotonic()
            if self._ever_connected:
                self.metrics.adapter_reconnects.labels(SOURCE).inc()
            self._ever_connected = True
            self._connected.set(1)
            log.info("connected to local broker", extra={"host": self.cfg.host, "port": self.cfg.port,
                                                         "client_id": self.client_id, "session_present": present})
            stop = asyncio.ensure_future(self._stopping.wait())
            await asyncio.wait([conn.disconnected, stop], return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            self._connected.set(0)
            if self._stopping.is_set():
                return  # stop() takes the connection down after the flush
            log.warning("local broker connection lost", extra={"reason": conn.disconnected.result()})
            if time.monotonic() - up_since > 30:
                backoff.reset()  # it had been healthy a while; a connection dropped at once (a full store) backs off
            await backoff.wait(self._stopping)

    async def stop(self) -> None:
        """Stop taking messages, commit and acknowledge what was taken, then disconnect."""
        self._stopping.set()
        self._flush()
        if self._last_flush is not None:
            try:
                await self._last_flush
            except Exception:  # noqa: BLE001 - logged by the flush; the broker redelivers
                pass
        if self._conn is not None:
            await self._conn.disconnect()

    def publish_local(self, topic: str, payload: bytes) -> bool:
        """Publish on the local broker (QoS 1) if connected; False when there is no connection."""
        conn = self._conn
        if conn is None or conn.disconnected.done():
            return False
        fut = conn.publish(topic, payload, qos=1)
        fut.add_done_callback(lambda f: f.exception())  # retrieved: a lost publish is not worth a traceback
        return True

    # -- the hot path (loop thread, called by paho through mqttio) --------------------------------
    def _on_message(self, msg: MQTTMessage) -> None:
        if self._stopping.is_set():
            return  # not acknowledged: the broker redelivers after the restart
        self._pending += 1
        self._pending_bytes += len(msg.payload)
        if (self._pending >= self.max_pending or self._pending_bytes >= self.cfg.max_pending_bytes) \
                and self._conn is not None and not self._paused:
            self._paused = True
            self._conn.pause_reading()
            self.metrics.ingest_paused.labels(SOURCE).inc()
        payload = msg.payload
        self._batch.append((msg.mid, msg.qos, len(self._readings), payload))
        self._batch_bytes += len(payload)
        topic = msg._topic.decode("utf-8", "replace")
        try:
            if len(payload) > self.cfg.max_payload_bytes:
                raise RejectedInput("too_large", f"{len(payload)} bytes > max_payload_bytes "
                                                 f"{self.cfg.max_payload_bytes}")
            decode = self._route(topic)
            readings = decode(topic, payload, time.time_ns())
            self._readings.extend(readings)
        except RejectedInput as e:
            self._dead.append(self._reject(topic, payload, e))
        except Exception as e:  # a decoder bug: keep the payload, count it, keep running
            log.exception("decoder failed", extra={"topic": topic[:120]})
            self._dead.append(self._reject(topic, payload,
                                           RejectedInput("internal_error", f"{type(e).__name__}: {e}")))
        if self._flush_handle is None:  # the batch's first message: it waits batch_delay_s at most
            self._batch_t = time.monotonic()
            loop = asyncio.get_running_loop()
            self._flush_now = not self.batch_delay_s
            self._flush_handle = (loop.call_later(self.batch_delay_s, self._flush) if self.batch_delay_s else
                                  loop.call_soon(self._flush))
        elif not self._flush_now and (self._paused or len(self._readings) >= self.batch_rows):
            self._flush_handle.cancel()  # full, or at the pending bound: it goes now
            self._flush_now = True
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _route(self, topic: str) -> Decoder:
        decode = self._routes_cache.get(topic)
        if decode is None:
            for flt, d in self.routes:
                if topic_matches_sub(flt, topic):
                    decode = d
                    break
            else:
                raise RejectedInput("topic_mismatch", f"no topic filter matches {topic[:80]!r}")
            if len(self._routes_cache) >= 10_000:  # bounded: topics are per device, devices are many
                self._routes_cache.clear()
            self._routes_cache[topic] = decode
        return decode

    def _reject(self, topic: str, payload: bytes, e: RejectedInput) -> tuple[str, str, str, str, bytes]:
        """Count and log a refused message; returns its dead letter."""
        self.metrics.messages_rejected.labels(SOURCE, e.reason).inc()
        self._rl.warning(e.reason, "payload rejected", reason=e.reason, topic=topic[:120], detail=e.detail[:200])
        return SOURCE, topic[:256], e.reason, e.detail, payload

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()  # when called directly (stop)
            self._flush_handle = None
        if not self._batch:
            return
        batch, readings, dead, size = self._batch, self._readings, self._dead, self._batch_bytes
        if readings:  # counted per batch, not per message
            self._received.inc(len(readings))
            self._last.set(time.time())
        self._batch, self._readings, self._dead, self._batch_bytes = [], [], [], 0
        prev, conn = self._last_flush, self._conn
        self._last_flush = asyncio.ensure_future(self._commit_and_ack(conn, batch, size, readings, dead, prev,
                                                                      self._batch_t))

    async def _commit_and_ack(self, conn: MqttConnection | None, batch: list[tuple[int, int, int, bytes]],
                              size: int, readings: list[Reading], dead: list, prev: asyncio.Future | None,
                              since: float) -> None:
        held = False
        try:
            if readings:
                try:
                    await self.sink(readings, since=since)
                except StoreError as e:
                    if e.full:  # the store is at its quota (backpressure): hold the batch here, commit as room frees
                        await self._hold(conn, batch, readings, prev)
                        held = True
                    elif not e.data:
                        raise
                    else:
                        await self._commit_one_by_one(batch, readings, e)
            for d in dead:
                await self.dead_letter(*d)
            if prev is not None:
                try:
                    await prev  # PUBACKs leave in arrival order
                except Exception:  # noqa: BLE001 - the earlier batch logged its own failure
                    pass
        except Exception as e:
            # not committed: leave the messages unacknowledged and reconnect so the broker redelivers
            self._rl.warning("commit_failed", "commit failed; messages stay with the broker", messages=len(batch),
                             error=str(e)[:300])
            if conn is not None:
                conn.close()
            return
        finally:
            self._pending -= len(batch)
            self._pending_bytes -= size
            if self._paused and self._pending <= self.max_pending // 2 and \
                    self._pending_bytes <= self.cfg.max_pending_bytes // 2:
                self._paused = False
                if self._conn is not None:
                    self._conn.resume_reading()
        if not held:
            self._ack(conn, batch)

    @staticmethod
    def _ack(conn: MqttConnection | None, batch: list[tuple[int, int, int, bytes]]) -> None:
        if conn is not None:
            for mid, qos, _, _ in batch:
                if qos:
                    conn.ack(mid, qos)

    async def _hold(self, conn: MqttConnection | None, batch: list[tuple[int, int, int, bytes]],
                    readings: list[Reading], prev: asyncio.Future | None) -> None:
        """The store is at its quota (store.at_quota = backpressure): keep the connection and the batch; commit it
        in order, in the largest pieces that fit, acknowledging each piece once committed, and wait (up to 5 s
        between tries) while nothing fits. Reading stays paused at the pending bound, so the broker holds the rest.
        Raises only when the agent stops or the connection goes (the broker then redelivers what is left)."""
        if prev is not None:
            try:
                await prev  # PUBACKs leave in arrival order
            except Exception:  # noqa: BLE001 - the earlier batch logged its own failure
                pass
        held, piece = Backoff(0.1, 5.0, self.metrics.backoff_waits.labels("mqtt_store_full")), len(batch)
        while batch:
            piece = max(1, min(piece, len(batch)))
            end = batch[piece][2] if piece < len(batch) else len(readings)
            try:
                if end > batch[0][2]:
                    await self.sink(readings[batch[0][2]:end])
            except StoreError as e:
                if not e.full:
                    raise
                if piece > 1:
                    piece //= 2  # a smaller piece may fit
                    continue
                if self._stopping.is_set() or (conn is not None and conn.disconnected.done()):
                    raise
                self._rl.warning("held", "store at its quota: holding messages until room frees",
                                 messages=len(batch))
                await held.wait()
                piece = len(batch)
                continue
            self._ack(conn, batch[:piece])
            batch = batch[piece:]
            held.reset()

    async def _commit_one_by_one(self, batch: list[tuple[int, int, int, bytes]], readings: list[Reading],
                                 error: StoreError) -> None:
        """The store refused the batch's data: commit message by message, and set aside (dead letter, counted,
        acknowledged) each message the store refuses alone — one message never holds back the others."""
        log.warning("store refused a batch's data; committing its messages one by one", extra={
            "messages": len(batch), "error": str(error)[:200]})
        ends = [b[2] for b in batch[1:]] + [len(readings)]
        for (mid, _qos, start, payload), end in zip(batch, ends):
            if start == end:
                continue
            try:
                await self.sink(readings[start:end])
            except StoreError as e:
                if not e.data:
                    raise
                await self.dead_letter(*self._reject(f"mid/{mid}", payload,
                                                     RejectedInput("store_refused", str(e)[:300])))
