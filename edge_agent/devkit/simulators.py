"""Simulated field devices on loopback for `edge-agent demo`, the tests and the benchmarks.

    python -m edge_agent.devkit.simulators coap --port 5699 [--max-age 2] [--interval 0.2]
        a CoAP sensor: observable /sensors/temp (JSON {"values": {"temperature": ..}}) and a
        plain-number /sensors/humidity, notifications every interval.
    python -m edge_agent.devkit.simulators opcua --port 4840 [--extra 1000] [--interval 0.1]
            [--cert C --key K --trust CLIENT_CERT]
        an asyncua PLC at opc.tcp://127.0.0.1:PORT/plc/: Objects/2:PLC with Temperature, Pressure
        (Double), Running (Boolean), Setpoint (Double, writable), Mode (Int16, writable) and
        `extra` variables Tag0000..; values change every interval. With --cert/--key it offers
        Basic256Sha256 and Aes256_Sha256_RsaPss SignAndEncrypt only and trusts only --trust.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import time

import aiocoap
import aiocoap.resource as resource
from aiocoap import ContentFormat, Message


class _Sensor(resource.ObservableResource):
    def __init__(self, name: str, max_age: int, interval: float, as_json: bool) -> None:
        super().__init__()
        self.name, self.max_age, self.interval, self.as_json = name, max_age, interval, as_json
        self.n = 0
        self._task: asyncio.Task | None = None

    def update_observation_count(self, count: int) -> None:
        if count and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._tick())
        elif count == 0 and self._task is not None:
            self._task.cancel()
            self._task = None

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.n += 1
            self.updated_state()

    def value(self) -> float:
        return round(21 + 3 * math.sin(time.time() / 10), 3)

    async def render_get(self, request: Message) -> Message:
        if self.as_json:
            body = json.dumps({"ts": int(time.time() * 1000), "values": {self.name: self.value(), "n": self.n}})
            m = Message(payload=body.encode(), content_format=ContentFormat.JSON)
        else:
            m = Message(payload=str(self.value()).encode(), content_format=ContentFormat.TEXT)
        m.opt.max_age = self.max_age
        return m


async def coap_sensor(host: str, port: int, max_age: int = 60, interval: float = 1.0,
                      stop: asyncio.Event | None = None) -> None:
    site = resource.Site()
    site.add_resource([".well-known", "core"], resource.WKCResource(site.get_resources_as_linkheader))
    site.add_resource(["sensors", "temp"], _Sensor("temperature", max_age, interval, True))
    site.add_resource(["sensors", "humidity"], _Sensor("humidity", max_age, interval, False))
    ctx = await aiocoap.Context.create_server_context(site, bind=(host, port), transports=["udp6"])
    try:
        await (stop or asyncio.Event()).wait()
    finally:
        await ctx.shutdown()


PLC_NS = "urn:edge-agent:plc"


async def opcua_plc(host: str, port: int, extra: int = 0, interval: float = 0.1, cert: str = "", key: str = "",
                    trust: list[str] | None = None, stop: asyncio.Event | None = None) -> None:
    from pathlib import Path

    from asyncua import Server, ua
    from asyncua.crypto.truststore import TrustStore
    from asyncua.crypto.validator import CertificateValidator, CertificateValidatorOptions
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://{host}:{port}/plc/")
    server.set_server_name("edge-agent simulated PLC")
    if cert:
        await server.load_certificate(cert)
        await server.load_private_key(key)
        server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
                                    ua.SecurityPolicyType.Aes256Sha256RsaPss_SignAndEncrypt])
        import shutil
        import tempfile
        trust_dir = Path(tempfile.mkdtemp(prefix="plc-trust-"))  # TrustStore reads directories
        for t in trust or []:
            shutil.copy(t, trust_dir / Path(t).name)
        store = TrustStore([trust_dir], [])
        await store.load()
        server.set_certificate_validator(CertificateValidator(
            CertificateValidatorOptions.TRUSTED_VALIDATION | CertificateValidatorOptions.PEER_CLIENT, store))
    else:
        server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    idx = await server.register_namespace(PLC_NS)
    plc = await server.nodes.objects.add_object(idx, "PLC")
    temp = await plc.add_variable(idx, "Temperature", 20.0)
    pressure = await plc.add_variable(idx, "Pressure", 1.0)
    running = await plc.add_variable(idx, "Running", True)
    setpoint = await plc.add_variable(idx, "Setpoint", 50.0)
    mode = await plc.add_variable(idx, "Mode", ua.Variant(1, ua.VariantType.Int16))
    for v in (setpoint, mode):
        await v.set_writable()
    tags = [await plc.add_variable(idx, f"Tag{i:04d}", 0.0) for i in range(extra)]
    async with server:
        n = 0
        while not (stop and stop.is_set()):
            n += 1
            t = time.time()
            await temp.write_value(round(20 + 5 * math.sin(t / 10), 3))
            await pressure.write_value(round(1 + 0.05 * math.cos(t / 7), 4))
            if n % 50 == 0:
                await running.write_value(not await running.read_value())
            for i, tag in enumerate(tags):
                await tag.write_value(float(n + i))
            await asyncio.sleep(interval)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m edge_agent.devkit.simulators")
    sub = p.add_subparsers(dest="kind", required=True)
    c = sub.add_parser("coap")
    c.add_argument("--host", default="127.0.0.1")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--max-age", type=int, default=60)
    c.add_argument("--interval", type=float, default=1.0)
    o = sub.add_parser("opcua")
    o.add_argument("--host", default="127.0.0.1")
    o.add_argument("--port", type=int, required=True)
    o.add_argument("--extra", type=int, default=0)
    o.add_argument("--interval", type=float, default=0.1)
    o.add_argument("--cert", default="")
    o.add_argument("--key", default="")
    o.add_argument("--trust", action="append", default=[])
    a = p.parse_args()

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if a.kind == "coap":
            await coap_sensor(a.host, a.port, a.max_age, a.interval, stop)
        else:
            await opcua_plc(a.host, a.port, a.extra, a.interval, a.cert, a.key, a.trust, stop)

    asyncio.run(run())


if __name__ == "__main__":
    main()
