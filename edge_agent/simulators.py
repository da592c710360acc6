"""Simulated field devices on loopback for `edge-agent demo`, the tests and the benchmarks.

    python -m edge_agent.simulators coap --port 5699 [--max-age 2] [--interval 0.2]
        a CoAP sensor: observable /sensors/temp (JSON {"values": {"temperature": ..}}) and a
        plain-number /sensors/humidity, notifications every interval.
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


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m edge_agent.simulators")
    sub = p.add_subparsers(dest="kind", required=True)
    c = sub.add_parser("coap")
    c.add_argument("--host", default="127.0.0.1")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--max-age", type=int, default=60)
    c.add_argument("--interval", type=float, default=1.0)
    a = p.parse_args()

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if a.kind == "coap":
            await coap_sensor(a.host, a.port, a.max_age, a.interval, stop)

    asyncio.run(run())


if __name__ == "__main__":
    main()
