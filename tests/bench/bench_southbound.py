"""Southbound benchmarks (not tests): OPC UA subscription throughput and CoAP posts/s.

    python tests/bench/bench_southbound.py [--items 1000] [--seconds 10] [--concurrency 32]

OPC UA: an asyncua PLC (its own process) changes `--items` variables every 100 ms; the agent (its
own process, OPC UA only, store commits on, uplink off) monitors all of them at 100 ms sampling.
Prints readings/s committed against the rate the PLC actually produced, agent CPU and RSS.

CoAP: a client process keeps `--concurrency` confirmable POSTs of a 3-point JSON payload in flight
for `--seconds`, first against the agent (decode + commit with synchronous=FULL before 2.04), then
against a bare aiocoap server in its own process that answers 2.04 at once: posts/s and the ratio.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1].parent
sys.path.insert(0, str(ROOT))

from bench_ingest import metric, proc_stats  # noqa: E402  (tests/bench is on sys.path when run as a script)
from edge_agent.devkit.brokers import free_port, free_udp_port  # noqa: E402
from edge_agent.config import to_toml  # noqa: E402

CLIENT = r"""
import asyncio, json, sys, time
import aiocoap
from aiocoap import Code, Message
port, seconds, conc = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
async def main():
    ctx = await aiocoap.Context.create_client_context()
    body = json.dumps({"values": {"temperature": 21.5, "humidity": 40.2, "battery": 3.31}}).encode()
    done = [0, 0]
    end = time.perf_counter() + seconds
    async def worker(i):
        while time.perf_counter() < end:
            m = Message(code=Code.POST, uri=f"coap://127.0.0.1:{port}/telemetry/sensor-{i}", payload=body)
            m.opt.content_format = 50
            r = await ctx.request(m).response
            done[0 if r.code == Code.CHANGED else 1] += 1
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(conc)))
    print(json.dumps({"ok": done[0], "other": done[1], "seconds": time.perf_counter() - t0}))
    await ctx.shutdown()
asyncio.run(main())
"""

BARE = r"""
import asyncio, sys
import aiocoap, aiocoap.resource as resource
from aiocoap import Code, Message
class T(resource.Resource, resource.PathCapable):
    async def render_post(self, request):
        return Message(code=Code.CHANGED)
async def main():
    site = resource.Site()
    site.add_resource(["telemetry"], T())
    await aiocoap.Context.create_server_context(site, bind=("127.0.0.1", int(sys.argv[1])), transports=["udp6"])
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def start_agent(work: Path, southbound: dict) -> tuple[subprocess.Popen, int]:
    mport = free_port()
    work.mkdir(parents=True, exist_ok=True)
    cfg = {"gateway": {"id": "bench-gw", "state_dir": str(work / "state")}, "log": {"level": "warning"},
           "southbound": {"mqtt": {"enabled": False}, **southbound}, "uplink": {"enabled": False},
           "model": {"enabled": False}, "metrics": {"port": mport}}
    (work / "agent.toml").write_text(to_toml(cfg))
    p = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(work / "agent.toml")], cwd=ROOT)
    return p, mport


def bench_opcua(work: Path, items: int, seconds: float) -> None:
    port = free_port()
    plc = subprocess.Popen([sys.executable, "-m", "edge_agent.devkit.simulators", "opcua", "--port", str(port),
                            "--extra", str(items), "--interval", "0.1"], cwd=ROOT)
    try:
        _bench_opcua(work, items, seconds, port, plc)
    finally:
        plc.kill()


def _bench_opcua(work: Path, items: int, seconds: float, port: int, plc: subprocess.Popen) -> None:
    time.sleep(3)
    nodes = [{"point": f"tag{i:04d}", "browse_path": f"2:PLC/2:Tag{i:04d}", "sampling_ms": 100, "queue_size": 10}
             for i in range(items)]
    agent, mport = start_agent(work, {"opcua": {"enabled": True, "servers": [
        {"device": "plc-bench", "endpoint": f"opc.tcp://127.0.0.1:{port}/plc/", "publishing_ms": 100,
         "nodes": nodes}]}})
    try:
        name = 'edge_agent_readings_received_total{source="opcua"}'
        deadline = time.time() + 120
        while metric(mport, name) < items and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(2)  # past the initial values
        cpu0, _ = proc_stats(agent.pid)
        plc_cpu0, _ = proc_stats(plc.pid)
        n0, t0 = metric(mport, name), time.perf_counter()
        peak = 0
        while time.perf_counter() - t0 < seconds:
            time.sleep(0.5)
            peak = max(peak, proc_stats(agent.pid)[1])
        n1, t1 = metric(mport, name), time.perf_counter()
        cpu1, rss = proc_stats(agent.pid)
        plc_cpu1, _ = proc_stats(plc.pid)
        committed = metric(mport, "edge_agent_readings_committed_total")
        rate = (n1 - n0) / (t1 - t0)
        print(f"opcua: {items} monitored items at 100 ms sampling (nominal {items * 10:.0f} changes/s): "
              f"{rate:.0f} readings/s taken in and committed ({committed:.0f} committed in all)")
        print(f"       agent CPU {(cpu1 - cpu0) / (t1 - t0):.2f} cores, peak RSS {max(peak, rss) / 2**20:.0f} MB; "
              f"the PLC process used {(plc_cpu1 - plc_cpu0) / (t1 - t0):.2f} cores producing the changes")
    finally:
        agent.terminate()
        agent.wait(30)


def run_client(port: int, seconds: float, conc: int) -> dict:
    import json
    out = subprocess.run([sys.executable, "-c", CLIENT, str(port), str(seconds), str(conc)], capture_output=True,
                         text=True, timeout=seconds + 60, cwd=ROOT)
    return json.loads(out.stdout)


def bench_coap(work: Path, seconds: float, conc: int) -> None:
    port = free_udp_port()
    agent, mport = start_agent(work, {"coap": {"enabled": True, "port": port}})
    try:
        deadline = time.time() + 30
        while metric(mport, 'edge_agent_ingest_connected{source="coap"}') < 1 and time.time() < deadline:
            time.sleep(0.1)
        cpu0, _ = proc_stats(agent.pid)
        a = run_client(port, seconds, conc)
        cpu1, rss = proc_stats(agent.pid)
    finally:
        agent.terminate()
        agent.wait(30)
    bport = free_udp_port()
    bare = subprocess.Popen([sys.executable, "-c", BARE, str(bport)], stdout=subprocess.PIPE, cwd=ROOT)
    bare.stdout.readline()
    try:
        b = run_client(bport, seconds, conc)
    finally:
        bare.kill()
    ar, br = a["ok"] / a["seconds"], b["ok"] / b["seconds"]
    print(f"coap: {conc} concurrent clients, {seconds:.0f} s, 3-point JSON POSTs")
    print(f"      agent (decode, commit, then 2.04): {ar:7.0f} posts/s ({a['other']} not 2.04), "
          f"CPU {(cpu1 - cpu0) / a['seconds']:.2f} cores, RSS {rss / 2**20:.0f} MB")
    print(f"      bare aiocoap server (2.04 at once): {br:7.0f} posts/s   ratio {ar / br:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--only", choices=("opcua", "coap"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        if a.only in (None, "opcua"):
            bench_opcua(Path(d) / "opcua", a.items, a.seconds)
        if a.only in (None, "coap"):
            bench_coap(Path(d) / "coap", a.seconds, a.concurrency)


if __name__ == "__main__":
    main()
