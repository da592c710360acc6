"""The one seam between paho-mqtt and asyncio (the aiomqtt pattern).

paho runs without a thread of its own: its socket is registered with the event loop
(`add_reader`/`add_writer`), so every paho callback runs on the loop thread and the rest of the
code sees futures, never a callback thread. Only the blocking `connect()` (DNS, TCP, TLS handshake)
runs in an executor thread.

Four private paho hooks are overridden for throughput, pinned by the `paho-mqtt>=2.1,<3` range and
covered by the tests: `_sock_recv` reads the socket in 64 KiB chunks and serves paho's 1-byte
header reads from memory (paho otherwise makes three syscalls per packet), and `_sock_send`
coalesces the packets written in one loop turn (a burst of PUBACKs) into one send, and
`_handle_on_message` skips paho's per-topic callback matching, which we do not use, and
`_handle_publish` (ingest only) parses a QoS 1 PUBLISH without building its MQTT 5 properties.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from dataclasses import dataclass
from typing import Callable

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger(__name__)

MessageCallback = Callable[[paho.MQTTMessage], None]


class ConnectError(Exception):
    """A connection or subscription that did not come up: the message says why; `kind` is one of KINDS (a metric
    label)."""
    KINDS = ("tls_verification", "tls", "refused", "timed_out", "connack", "cannot_connect", "closed", "subscribe")

    def __init__(self, kind: str, reason: str) -> None:
        assert kind in self.KINDS, kind
        super().__init__(reason)
        self.kind, self.reason = kind, reason


class PublishError(Exception):
    pass


@dataclass
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class _Client(paho.Client):
    """paho Client with buffered socket reads and coalesced writes (see the module doc)."""

    _rbuf: bytes = b""
    tls_name: str = ""  # the name to verify in the broker's certificate, when not the host connected to

    def _ssl_wrap_socket(self, tcp_sock: socket.socket) -> ssl.SSLSocket:
        """paho's, with the name to verify ours to choose (uplink.server_hostname); our contexts always check it."""
        ctx = self._ssl_context
        assert ctx is not None and ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
        sock = ctx.wrap_socket(tcp_sock, server_hostname=self.tls_name or self._host, do_handshake_on_connect=False)
        sock.settimeout(self._connect_timeout)
        sock.do_handshake()
        return sock
    _rpos: int = 0

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._rpos >= len(self._rbuf):
            data = super()._sock_recv(65536)
            if not data:
                return data
            self._rbuf, self._rpos = data, 0
        end = self._rpos + bufsize
        out = self._rbuf[self._rpos:end]
        self._rpos = end if end < len(self._rbuf) else len(self._rbuf)
        return out

    lean_publish = False  # set for ingest: QoS 1 PUBLISH parsed without its MQTT 5 properties

    def _handle_publish(self) -> MQTTErrorCode:
        # paho builds a Properties object for every MQTT 5 PUBLISH (half of the ingest CPU); ingest
        # reads no property, so a manually acknowledged QoS 1 PUBLISH is parsed here and its
        # properties skipped. Anything else goes through paho.
        header = self._in_packet["command"]
        if not self.lean_publish or (header & 0x06) >> 1 != 1 or not self._manual_ack:
            return super()._handle_publish()
        pkt = self._in_packet["packet"]
        try:
            slen = (pkt[0] << 8) | pkt[1]
            pos = 2 + slen
            topic = bytes(pkt[2:pos])
            mid = (pkt[pos] << 8) | pkt[pos + 1]
            pos += 2
            if self._protocol == paho.MQTTv5:
                plen, shift = 0, 0
                while True:
                    b = pkt[pos]
                    pos += 1
                    plen |= (b & 0x7F) << shift
                    if not b & 0x80:
                        break
                    shift += 7
                    if shift > 21:
                        return MQTTErrorCode.MQTT_ERR_PROTOCOL
                pos += plen
            if pos > len(pkt) or slen == 0:
                return MQTTErrorCode.MQTT_ERR_PROTOCOL
        except IndexError:
            return MQTTErrorCode.MQTT_ERR_PROTOCOL
        message = paho.MQTTMessage(mid=mid, topic=topic)
        message.qos = 1
        message.dup = bool(header & 0x08)
        message.retain = bool(header & 0x01)
        message.payload = bytes(pkt[pos:])
        self._handle_on_message(message)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def _handle_on_message(self, message: paho.MQTTMessage) -> None:
        # paho matches every message against per-topic callbacks first; we register none
        on_message = self.on_message
        if on_message is not None:
            on_message(self, self._userdata, message)

    def buffered(self) -> bool:
        return self._rpos < len(self._rbuf)

    _wbuf: bytearray | None = None

    def _sock_send(self, buf: bytes | bytearray) -> int:
        if self._wbuf is None:
            self._wbuf = bytearray()
        self._wbuf += buf
        return len(buf)

    def flush(self) -> bool:
        """Send what `_sock_send` collected; True when everything left. Raises OSError."""
        if not self._wbuf:
            return True
        sock = self._sock
        if sock is None:
            self._wbuf.clear()
            return True
        try:
            n = sock.send(self._wbuf)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return False
        del self._wbuf[:n]
        return not self._wbuf


class MqttConnection:
    """One MQTT connection on the event loop. Make a new one for every connection attempt.

    `disconnected` resolves (with a reason) when the connection ends for any reason.
    """

    def __init__(self, *, client_id: str, host: str, port: int, protocol: str = "5", keepalive: int = 30,
                 ssl_context: ssl.SSLContext | None = None, username: str = "", password: str = "",
                 clean_start: bool = True, session_expiry_s: int = 0xFFFFFFFF, will: Will | None = None,
                 receive_maximum: int = 0,
                 manual_ack: bool = False, max_inflight: int = 20,
                 on_message: MessageCallback | None = None, lean_publish: bool = False,
                 server_hostname: str = "") -> None:
        self._loop = asyncio.get_running_loop()
        self.host, self.port, self.keepalive = host, port, keepalive
        self.v5 = protocol == "5"
        self.clean_start = clean_start
        self.session_expiry_s = session_expiry_s
        self.receive_maximum = receive_maximum
        c = self._c = _Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                              protocol=paho.MQTTv5 if self.v5 else paho.MQTTv311,
                              clean_session=None if self.v5 else clean_start)
        c.connect_timeout = 10.0
        c.max_inflight_messages_set(max_inflight)
        c.max_queued_messages_set(0)  # the callers bound what they queue
        if manual_ack:
            c.manual_ack_set(True)
        c.lean_publish = lean_publish
        if ssl_context is not None:
            c.tls_set_context(ssl_context)
            c.tls_name = server_hostname
        if username:
            c.username_pw_set(username, password or None)
        if will is not None:
            c.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.on_message = self._guard(on_message) if on_message else None
        self._connack: asyncio.Future = self._loop.create_future()
        self.disconnected: asyncio.Future = self._loop.create_future()
        self._pubs: dict[int, asyncio.Future] = {}
        self._subs: dict[int, asyncio.Future] = {}
        self._sock: socket.socket | None = None
        self._writer = False
        self._paused = False
        self._misc: asyncio.Task | None = None

    @staticmethod
    def _guard(on_message: MessageCallback) -> Callable:
        def deliver(_c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
            try:
                on_message(msg)
            except Exception:  # a bug in a handler must not take the connection down
                log.exception("message handler failed")
        return deliver

    # -- connection ----------------------------------------------------------------------------
    async def connect(self, timeout: float = 15.0) -> bool:
        """Connect and wait for CONNACK; returns the broker's session-present flag."""
        props = None
        if self.v5:
            props = Properties(PacketTypes.CONNECT)
            if not self.clean_start:
                props.SessionExpiryInterval = self.session_expiry_s
            if self.receive_maximum:
                props.ReceiveMaximum = self.receive_maximum
        try:
            await asyncio.wait_for(self._loop.run_in_executor(None, self._blocking_connect, props), timeout)
        except ssl.SSLCertVerificationError as e:
            raise ConnectError("tls_verification", f"tls verification failed: {e.verify_message}") from None
        except ssl.SSLError as e:
            raise ConnectError("tls", f"tls error: {e.reason or e}") from None
        except (asyncio.TimeoutError, TimeoutError):
            raise ConnectError("timed_out", "connect timed out") from None
        except OSError as e:
            raise ConnectError("cannot_connect", f"cannot connect: {e.strerror or e}") from None
        self._attach()
        try:
            return await asyncio.wait_for(asyncio.shield(self._connack), timeout)
        except (asyncio.TimeoutError, TimeoutError):
            self.close()
            raise ConnectError("connack", "no CONNACK in time") from None

    def _blocking_connect(self, props: Properties | None) -> None:
        if self.v5:
            self._c.connect(self.host, self.port, self.keepalive, clean_start=self.clean_start, properties=props)
        else:
            self._c.connect(self.host, self.port, self.keepalive)

    def _attach(self) -> None:
        sock = self._c.socket()
        if sock is None:
            raise ConnectError("closed", "socket closed during connect")
        self._sock = sock
        try:  # paho leaves Nagle on: small packets (PUBACKs, replies) would wait for delayed ACKs
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        self._c.on_socket_close = lambda *_: self._detach()
        self._c.on_socket_register_write = lambda *_: self._want_write()
        self._c.on_socket_unregister_write = lambda *_: None
        self._loop.add_reader(sock, self._on_readable)
        self._want_write()
        self._misc = self._loop.create_task(self._misc_loop())

    def _detach(self) -> None:
        if self._sock is not None:
            try:
                self._loop.remove_reader(self._sock)
                self._loop.remove_writer(self._sock)
            except (ValueError, OSError):
                pass
            self._sock = None
            self._writer = False
        if self._misc is not None and not self._loop.is_closed():
            self._misc.cancel()

    def _want_write(self) -> None:
        if self._sock is not None and not self._writer:
            self._writer = True
            self._loop.add_writer(self._sock, self._on_writable)

    def pause_reading(self) -> None:
        """Stop reading from the socket (TCP flow control then holds the broker back)."""
        if not self._paused:
            self._paused = True
            if self._sock is not None:
                self._loop.remove_reader(self._sock)

    def resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            if self._sock is not None:
                self._loop.add_reader(self._sock, self._on_readable)
                self._loop.call_soon(self._on_readable)  # what is already buffered

    def _on_readable(self) -> None:
        c = self._c
        if self._paused or self._sock is None:
            return
        rc = c.loop_read()
        while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and self._sock is not None and not self._paused and (
                c.buffered() or (isinstance(self._sock, ssl.SSLSocket) and self._sock.pending())):
            rc = c.loop_read()
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._lost(f"read: {paho.error_string(rc)}")
        elif self._sock is not None and (c.want_write() or c._wbuf):
            self._on_writable()

    def _on_writable(self) -> None:
        c = self._c
        rc = c.loop_write()
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._lost(f"write: {paho.error_string(rc)}")
            return
        try:
            done = c.flush()
        except OSError as e:
            self._lost(f"write: {e}")
            return
        if done and not c.want_write() and self._writer and self._sock is not None:
            self._writer = False
            self._loop.remove_writer(self._sock)

    def _lost(self, reason: str) -> None:
        self._resolve_disconnect(reason)
        self.close()

    async def _misc_loop(self) -> None:
        # paho's keepalive bookkeeping: a quarter of the keepalive is often enough to ping in time and to notice a
        # silent broker (at most 5 s late), without waking an idle gateway every second per connection
        interval = min(5.0, max(0.5, self.keepalive / 4))
        while self._sock is not None:
            await asyncio.sleep(interval)
            if self._c.loop_misc() != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._lost("keepalive timeout")
                return
            if self._c.want_write():
                self._want_write()

    def _on_connect(self, _c, _u, flags, reason, _props) -> None:
        if self._connack.done():
            return
        if reason.is_failure:
            self._connack.set_exception(ConnectError("refused", f"refused by broker: {reason}"))
        else:
            self._connack.set_result(bool(flags.session_present))

    def _on_disconnect(self, _c, _u, _flags, reason, _props) -> None:
        self._resolve_disconnect(f"disconnected: {reason}")

    def _resolve_disconnect(self, reason: str) -> None:
        if not self._connack.done():
            self._connack.set_exception(ConnectError("closed", reason))
            self._connack.exception()  # retrieved: connect() reports it if it is still waiting
        if not self.disconnected.done():
            self.disconnected.set_result(reason)
        err = PublishError(f"connection lost before PUBACK ({reason})")
        for fut in list(self._pubs.values()) + list(self._subs.values()):
            if not fut.done():
                fut.set_exception(err)
        self._pubs.clear()
        self._subs.clear()

    # -- traffic -------------------------------------------------------------------------------
    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                correlation_data: bytes | None = None) -> asyncio.Future:
        """Queue a publish; the future resolves on PUBACK (QoS 1) or once written (QoS 0)."""
        fut = self._loop.create_future()
        if self.disconnected.done():
            fut.set_exception(PublishError(f"not connected ({self.disconnected.result()})"))
            return fut
        props = None
        if correlation_data is not None and self.v5:
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = correlation_data
        info = self._c.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS and info.rc != MQTTErrorCode.MQTT_ERR_NO_CONN:
            fut.set_exception(PublishError(paho.error_string(info.rc)))
            return fut
        if info.is_published():  # QoS 0 already written
            fut.set_result(None)
        else:
            self._pubs[info.mid] = fut
        return fut

    def _on_publish(self, _c, _u, mid, reason, _props) -> None:
        fut = self._pubs.pop(mid, None)
        if fut is None or fut.done():
            return
        if reason.is_failure:
            fut.set_exception(PublishError(f"broker refused publish: {reason}"))
        else:
            fut.set_result(None)

    async def subscribe(self, filters: list[tuple[str, int]], timeout: float = 10.0) -> None:
        rc, mid = self._c.subscribe(filters)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise ConnectError("subscribe", f"subscribe failed: {paho.error_string(rc)}")
        fut = self._subs[mid] = self._loop.create_future()
        try:
            codes = await asyncio.wait_for(fut, timeout)
        except PublishError as e:  # the connection went before the SUBACK: a connection failure, not a publish one
            raise ConnectError("closed", f"subscribe: {e}") from None
        bad = [f for (f, _q), code in zip(filters, codes) if code.is_failure]
        if bad:
            raise ConnectError("subscribe", f"subscription refused for {', '.join(bad)}")

    def _on_subscribe(self, _c, _u, mid, reason_codes, _props) -> None:
        fut = self._subs.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(reason_codes)

    def ack(self, mid: int, qos: int) -> None:
        if not self.disconnected.done():
            self._c.ack(mid, qos)

    async def disconnect(self, timeout: float = 2.0) -> None:
        """Send DISCONNECT (the will is not published) and wait for the socket to close."""
        if not self.disconnected.done() and self._sock is not None:
            self._c.disconnect()
            self._on_writable()
            try:
                await asyncio.wait_for(asyncio.shield(self.disconnected), timeout)
            except (asyncio.TimeoutError, TimeoutError):
                pass
        self.close()

    def close(self) -> None:
        """Drop the connection at once (no DISCONNECT: the broker publishes the will)."""
        self._resolve_disconnect("closed")
        self._c._sock_close()  # closes the socket and calls on_socket_close -> _detach
        self._detach()

    @property
    def inflight(self) -> int:
        return len(self._pubs)

    def tls_info(self) -> tuple[str, dict] | None:
        """(TLS version, the broker's certificate as ssl decodes it) of a connected TLS connection."""
        sock = self._c.socket()
        if not isinstance(sock, ssl.SSLSocket):
            return None
        return sock.version() or "", sock.getpeercert() or {}
