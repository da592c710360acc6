"""CoAP ingest (aiocoap): a server that devices POST/PUT readings to, and observations (RFC 7641)
of resources on devices.

Server
- `POST|PUT /telemetry/{device}` with the JSON of `[southbound.coap.payload]` (Content-Format 50 or
  none) or the same document as CBOR (Content-Format 60). The answer is 2.04 Changed only after the
  readings are committed; 4.00 with a diagnostic payload (the rejection reason and detail) on bad
  input; 4.13 when the payload is above `max_payload_bytes`; 4.15 for another Content-Format; 5.03
  with Max-Age 1 when `max_concurrent` requests are already being committed (the device retries).
- `/.well-known/core` lists the resources.
- A device that posts for the first time is registered by the store.

Observations
- Each `[[southbound.coap.observe]]` resource is observed; every notification becomes readings for
  its configured device. When no notification arrives within Max-Age (60 s when absent) plus a
  margin, or the observation ends or fails, the adapter registers again with capped backoff
  (counted in `edge_agent_adapter_reconnects_total{source="coap"}`).

Security: OSCORE (RFC 8613) through aiocoap's credentials: `credentials_file` names an aiocoap
credentials JSON; the server then takes requests protected with those security contexts
(`require_oscore` refuses unprotected ones with 4.01) and observations use them towards devices.
It needs aiocoap's `oscore` extra (`pip install 'edge-agent[oscore]'`). aiocoap's DTLS support is
experimental and not used. Without OSCORE, bind the server to a device network you control.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import aiocoap
import aiocoap.resource as resource
from aiocoap import Code, ContentFormat, Message
from aiocoap.error import Error as CoapError
from aiocoap.util.linkformat import Link, LinkFormat

from edge_agent.backoff import Backoff
from edge_agent.config import CoapConfig, CoapObserveConfig, ConfigError
from edge_agent.logs import RateLimited
from edge_agent.metrics import Metrics
from edge_agent.records import Reading, RejectedInput
from edge_agent.southbound import DeadLetter, Sink
from edge_agent.southbound.decode import make_decoder

log = logging.getLogger(__name__)
SOURCE = "coap"
DEFAULT_MAX_AGE_S = 60


class _Telemetry(resource.Resource, resource.PathCapable):
    """`/telemetry/{device}`: the remaining path segment is the device id."""

    ct = "50 60"
    rt = "edge-agent.telemetry"

    def __init__(self, adapter: "CoapAdapter") -> None:
        super().__init__()
        self.a = adapter

    def get_resources_as_linkheader(self) -> LinkFormat:  # listed in /.well-known/core as </telemetry>
        return LinkFormat([Link("", rt=self.rt, ct=self.ct, title="POST readings to /telemetry/{device}")])

    async def render_post(self, request: Message) -> Message:
        return await self.a.handle_post(request)

    async def render_put(self, request: Message) -> Message:
        return await self.a.handle_post(request)


class CoapAdapter:
    name = "coap"

    def __init__(self, cfg: CoapConfig, sink: Sink, dead_letter: DeadLetter, metrics: Metrics) -> None:
        self.cfg, self.sink, self.dead_letter, self.metrics = cfg, sink, dead_letter, metrics
        self._retimed = lambda q: metrics.readings_retimed.labels(SOURCE, q).inc()  # noqa: E731
        self.decode_json = make_decoder(cfg.payload, "{device}", SOURCE, retimed=self._retimed)
        self.decode_cbor = make_decoder(cfg.payload, "{device}", SOURCE, cbor=True, retimed=self._retimed)
        self._slots = asyncio.Semaphore(cfg.max_concurrent)
        self._stopping = asyncio.Event()
        self._ctx: aiocoap.Context | None = None
        self._rl = RateLimited(log)
        self._received = metrics.readings_received.labels(SOURCE)
        self._last = metrics.last_data.labels(SOURCE)
        self.server_port: int | None = None
        self._oscore_address: type = type(None)
        self._creds = self._credentials()  # at construction: a bad file stops the start with a one-line error

    # -- lifecycle -----------------------------------------------------------------------------
    async def run(self) -> None:
        self._stopping.clear()
        credentials = self._creds
        if self.cfg.port:
            site: Any = resource.Site()
            site.add_resource([".well-known", "core"], resource.WKCResource(site.get_resources_as_linkheader))
            site.add_resource(["telemetry"], _Telemetry(self))
            if credentials is not None:
                from aiocoap.oscore_sitewrapper import OscoreSiteWrapper
                site = OscoreSiteWrapper(site, credentials)
            self._ctx = await aiocoap.Context.create_server_context(site, bind=(self.cfg.host, self.cfg.port),
                                                                     transports=["udp6"])
            self.server_port = self.cfg.port
            log.info("coap server listening", extra={"addr": f"{self.cfg.host}:{self.cfg.port}"})
        else:
            self._ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
        if credentials is not None:
            self._ctx.client_credentials.update(credentials)  # the same contexts (they hold a lock on their files)
        self.metrics.ingest_connected.labels(SOURCE).set(1)
        observers = [asyncio.create_task(self._observe(o)) for o in self.cfg.observe]
        try:
            await self._stopping.wait()
        finally:
            for t in observers:
                t.cancel()
            await asyncio.gather(*observers, return_exceptions=True)
            self.metrics.ingest_connected.labels(SOURCE).set(0)
            ctx, self._ctx = self._ctx, None
            if ctx is not None:
                await ctx.shutdown()

    def _credentials(self) -> Any:
        """aiocoap's CredentialsMap from `credentials_file`; a config error names the key."""
        if not self.cfg.credentials_file:
            return None
        from aiocoap.credentials import CredentialsMap
        try:
            # aiocoap's OSCORE transport needs the `oscore` extra: import it only when configured
            from aiocoap.transports.oscore import OSCOREAddress
            self._oscore_address = OSCOREAddress
            with open(self.cfg.credentials_file) as f:
                raw = json.load(f)
            creds = CredentialsMap()
            creds.load_from_dict(raw)
        except (OSError, ValueError) as e:
            raise ConfigError(f"southbound.coap.credentials_file {self.cfg.credentials_file}: {e}") from None
        except ImportError as e:
            raise ConfigError(f"southbound.coap.credentials_file: OSCORE needs aiocoap's extra "
                              f"(pip install 'edge-agent[oscore]'): {e}") from None
        except Exception as e:  # noqa: BLE001 - aiocoap's loaders raise their own types (e.g. a held lock)
            raise ConfigError(f"southbound.coap.credentials_file {self.cfg.credentials_file}: "
                              f"{type(e).__name__}: {e}") from None
        return creds

    async def stop(self) -> None:
        """Stop observing and serving; requests being committed finish first (their slots drain)."""
        for _ in range(self.cfg.max_concurrent):
            await self._slots.acquire()
        self._stopping.set()
        for _ in range(self.cfg.max_concurrent):
            self._slots.release()

    # -- server --------------------------------------------------------------------------------
    async def handle_post(self, request: Message) -> Message:
        if self.cfg.require_oscore and not isinstance(request.remote, self._oscore_address):
            self.metrics.messages_rejected.labels(SOURCE, "unprotected").inc()
            return Message(code=Code.UNAUTHORIZED, payload=b"OSCORE required")
        path = request.opt.uri_path
        payload = request.payload
        device = "/".join(path)
        if len(payload) > self.cfg.max_payload_bytes:
            self._reject(device, payload, RejectedInput("too_large", f"{len(payload)} bytes > max_payload_bytes "
                                                                     f"{self.cfg.max_payload_bytes}"))
            m = Message(code=Code.REQUEST_ENTITY_TOO_LARGE, payload=b"too_large")
            m.opt.size1 = self.cfg.max_payload_bytes
            return m
        fmt = request.opt.content_format
        if fmt is None or fmt == ContentFormat.JSON:
            decode = self.decode_json
        elif fmt == ContentFormat.CBOR:
            decode = self.decode_cbor
        else:
            self._reject(device, payload, RejectedInput("bad_content_format", f"Content-Format {fmt}"))
            return Message(code=Code.UNSUPPORTED_CONTENT_FORMAT, payload=b"use Content-Format 50 (JSON) or 60 (CBOR)")
        try:
            if len(path) != 1:
                raise RejectedInput("bad_device", "expected /telemetry/{device}")
            readings = decode(path[0], payload, time.time_ns())
        except RejectedInput as e:
            self._reject(device, payload, e)
            await self.dead_letter(SOURCE, f"telemetry/{device}"[:256], e.reason, e.detail, payload)
            return Message(code=Code.BAD_REQUEST, payload=f"{e.reason}: {e.detail}"[:200].encode())
        if self._slots.locked():
            self.metrics.messages_rejected.labels(SOURCE, "busy").inc()
            m = Message(code=Code.SERVICE_UNAVAILABLE, payload=b"busy")
            m.opt.max_age = 1
            return m
        async with self._slots:
            if self._stopping.is_set():
                return Message(code=Code.SERVICE_UNAVAILABLE, payload=b"stopping")
            await self.sink(readings)  # a store failure raises: aiocoap answers 5.00, the device retries
        self._received.inc(len(readings))
        self._last.set(time.time())
        return Message(code=Code.CHANGED)

    def _reject(self, where: str, payload: bytes, e: RejectedInput) -> None:
        self.metrics.messages_rejected.labels(SOURCE, e.reason).inc()
        self._rl.warning(e.reason, "coap payload rejected", reason=e.reason, device=where[:120],
                         detail=e.detail[:200])

    # -- observations --------------------------------------------------------------------------
    async def _observe(self, o: CoapObserveConfig) -> None:
        decode = make_decoder(o, "{device}", SOURCE, retimed=self._retimed)
        backoff = Backoff(self.cfg.reconnect_min_s, self.cfg.reconnect_max_s,
                          self.metrics.backoff_waits.labels("coap_observe"))
        first = True
        while True:
            if not first:
                self.metrics.adapter_reconnects.labels(SOURCE).inc()
                await backoff.wait()
            first = False
            assert self._ctx is not None
            pr = self._ctx.request(Message(code=Code.GET, uri=o.uri, observe=0))
            try:
                response = await asyncio.wait_for(pr.response, self.cfg.request_timeout_s)
                if not response.code.is_successful():
                    raise CoapError(f"{o.uri} answered {response.code}")
                await self._notification(o, decode, response)
                backoff.reset()
                if response.opt.observe is None:
                    log.warning("resource does not support observe; polling at its Max-Age", extra={"uri": o.uri})
                    await asyncio.sleep(response.opt.max_age or DEFAULT_MAX_AGE_S)
                    continue
                log.info("observing", extra={"uri": o.uri, "device": o.device})
                notes = pr.observation.__aiter__()
                max_age = response.opt.max_age or DEFAULT_MAX_AGE_S
                while True:
                    try:
                        n = await asyncio.wait_for(notes.__anext__(), max_age + o.max_age_margin_s)
                    except (asyncio.TimeoutError, TimeoutError):
                        log.warning("notifications stopped; registering again",
                                    extra={"uri": o.uri, "silent_s": max_age + o.max_age_margin_s})
                        break
                    except StopAsyncIteration:
                        log.warning("observation ended; registering again", extra={"uri": o.uri})
                        break
                    if n.code.is_successful():
                        await self._notification(o, decode, n)
                    max_age = n.opt.max_age or DEFAULT_MAX_AGE_S
            except asyncio.CancelledError:
                raise
            except (CoapError, asyncio.TimeoutError, TimeoutError, OSError) as e:
                self.metrics.adapter_errors.labels(SOURCE, "observe").inc()
                log.warning("observation failed", extra={"uri": o.uri, "error": str(e) or type(e).__name__,
                                                         "retry_s_at_most": round(backoff.step, 2)})
            finally:
                if not pr.observation.cancelled:
                    pr.observation.cancel()

    async def _notification(self, o: CoapObserveConfig, decode, msg: Message) -> None:
        try:
            readings: list[Reading] = decode(o.device, msg.payload, time.time_ns())
        except RejectedInput as e:
            self._reject(o.device, msg.payload, e)
            await self.dead_letter(SOURCE, o.uri[:256], e.reason, e.detail, msg.payload)
            return
        await self.sink(readings)
        self._received.inc(len(readings))
        self._last.set(time.time())


async def probe(cfg: CoapConfig, timeout_s: float = 5.0) -> list[str]:
    """`edge-agent check --connect`: one GET (no observation) of each observed resource, with the adapter's
    credentials; one verdict line each."""
    if not cfg.observe:
        return []
    a = CoapAdapter(cfg, sink=None, dead_letter=None, metrics=Metrics())  # type: ignore[arg-type]  # its credentials
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    if a._creds is not None:
        ctx.client_credentials.update(a._creds)
    out = []
    try:
        for o in cfg.observe:
            where = f"coap {o.uri} ({o.device})"
            try:
                r = await asyncio.wait_for(ctx.request(Message(code=Code.GET, uri=o.uri)).response, timeout_s)
            except (asyncio.TimeoutError, TimeoutError):
                out.append(f"# FAILED {where}: no answer within {timeout_s:g} s")
                continue
            except Exception as e:  # noqa: BLE001 - aiocoap's network errors: said, not raised
                out.append(f"# FAILED {where}: {type(e).__name__}: {e}")
                continue
            ok = r.code.is_successful()
            out.append(f"# {'ok' if ok else 'FAILED'} {where}: {r.code} ({len(r.payload)} bytes)")
    finally:
        await ctx.shutdown()
    return out
