"""Ingest benchmark (not a test): points/s from the local broker to cloud PUBACK, against a ceiling.

    python tests/bench/bench_ingest.py [--messages 100000] [--devices 100] [--rate 4000]
        [--receive-maximum N] [--synchronous full|normal] [--rules 100]
        (BENCH_PROTOCOL=3.1.1: ingest over 3.1.1)

A load generator (its own process) publishes 5-point JSON messages from simulated devices at QoS 1.
On a 2-core machine a Python generator cannot outrun the consumers, so throughput is measured by
draining a backlog: the load is published while the consumer is away (its persistent session keeps
it at the broker), then the consumer starts and the clock runs until the last message is through.
1. Ceiling: `mosquitto_sub -q 1 -c` drains the backlog.
2. Agent: the agent (its own process) drains the same backlog, commits it (synchronous=FULL) and
   forwards it over mutual TLS to a second Mosquitto, until the cloud acknowledged every reading.
   CPU (cores) and peak RSS of the agent process are taken in this phase.
3. Latency: the generator paces `--rate` messages/s through the running agent; a cloud-side
   subscriber timestamps each batch: publish->cloud p50/p99 from the oldest reading's device
   timestamp in the batch.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from edge_agent.devkit.brokers import Mosquitto, free_port  # noqa: E402
from edge_agent.devkit.certs import CA  # noqa: E402
from edge_agent.config import to_toml  # noqa: E402

GENERATOR = r"""
import asyncio, json, sys, time
from edge_agent.mqttio import MqttConnection
port, n, devices, rate = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
async def main():
    c = MqttConnection(client_id="bench-gen", host="127.0.0.1", port=port, max_inflight=1000)
    await c.connect()
    topics = [f"devices/dev-{d:03d}/telemetry" for d in range(devices)]
    window, pending = 2000, []
    t0 = time.perf_counter()
    for i in range(n):
        body = ('{"ts":%d,"values":{"temperature":%.2f,"pressure":%.3f,"flow":%d,"running":true,"vib":%.4f}}'
                % (time.time_ns() // 1_000_000, 20 + i % 10, 1.0 + i % 7 / 100, i % 500, (i % 13) / 1000)).encode()
        pending.append(c.publish(topics[i % devices], body, qos=1))
        if rate and i % 50 == 0:
            await asyncio.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
        if len(pending) >= window:
            await asyncio.gather(*pending[:window // 2]); del pending[:window // 2]
    await asyncio.gather(*pending)
    print(json.dumps({"published": n, "seconds": time.perf_counter() - t0}), flush=True)
    await c.disconnect()
asyncio.run(main())
"""

CLOUD_SUB = r"""
import json, re, ssl, sys, time
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
port, ca, cert, key, out = sys.argv[1:6]
ts_re = re.compile(rb'"ts":(\d+)')
lat, total = [], [0]
def on_message(c, u, m):
    now = time.time_ns()
    head = m.payload[:400]
    n = int(re.search(rb'"count":(\d+)', head).group(1))
    total[0] += n
    t = ts_re.search(head)
    if t: lat.append((now - int(t.group(1))) / 1e6)
    if total[0] >= int(sys.argv[6]):
        json.dump({"latencies_ms": lat, "readings": total[0]}, open(out, "w")); c.disconnect()
c = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-cloud")
c.tls_set(ca_certs=ca, certfile=cert, keyfile=key)
c.on_connect = lambda c, u, f, r, p: c.subscribe("edge/+/telemetry", 1)
c.on_message = on_message
c.connect("localhost", int(port), 30)
print("ready", flush=True)
c.loop_forever()
"""


def proc_stats(pid: int) -> tuple[float, int]:
    """(cpu seconds, rss bytes) of a process from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    cpu = (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    return cpu, rss


def metric(port: int, name: str) -> float:
    """A sample from the agent's /metrics (0 when absent or unreachable)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            m = re.search(rf"^{re.escape(name)} (\S+)$", r.read().decode(), re.M)
    except OSError:
        return 0.0
    return float(m.group(1)) if m else 0.0



def run_gen(port: int, n: int, devices: int, rate: float = 0) -> None:
    subprocess.run([sys.executable, "-c", GENERATOR, str(port), str(n), str(devices), str(rate)], check=True,
                   cwd=ROOT, stdout=subprocess.DEVNULL)


def ceiling(work: Path, n: int, devices: int) -> float:
    with Mosquitto.local(work / "ceiling") as broker:
        args = ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1", "-c", "-i", "ceil",
                "-t", "devices/+/telemetry"]
        subprocess.run(args + ["-W", "1"], stdout=subprocess.DEVNULL)  # creates the persistent session
        run_gen(broker.port, n, devices)
        t0 = time.perf_counter()
        subprocess.run(args + ["-C", str(n)], stdout=subprocess.DEVNULL, timeout=600, check=True)
        return n / (time.perf_counter() - t0)


def wait_metric(port: int, name: str, value: float, timeout: float, interval: float = 0.02) -> None:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        try:
            if metric(port, name) >= value:
                return
        except OSError:
            pass
        time.sleep(interval)
    raise RuntimeError(f"{name} did not reach {value} in {timeout} s")


def agent_run(work: Path, n: int, devices: int, rate: float, receive_maximum: int, synchronous: str,
              rules: int = 0, ship: bool = True, delay_ms: float | None = None) -> dict:
    ca = CA(work / "pki")
    server = ca.issue("cloud", server=True)
    gw = ca.issue("bench-gw")
    viewer = ca.issue("cloud-viewer")
    local = Mosquitto.local(work / "local").start()
    cloud = Mosquitto.mtls(work / "cloud", ca.cert_path, *server).start()
    mport = free_port()
    cfg = {"gateway": {"id": "bench-gw", "state_dir": str(work / "state")}, "log": {"level": "warning", "ship": ship},
           "southbound": {"mqtt": {"port": local.port, "protocol": os.environ.get("BENCH_PROTOCOL", "5"),
                                   **({"receive_maximum": receive_maximum} if receive_maximum else {})}},
           
           "uplink": {"host": "localhost", "port": cloud.port, "ca_file": str(ca.cert_path), "cert_file": str(gw[0]),
                      "key_file": str(gw[1])},
           "store": {"synchronous": synchronous,
                     **({"batch_max_delay_ms": delay_ms} if delay_ms is not None else {})}, "metrics": {"port": mport},
           # the GLM is off unless BENCH_MODEL=1: loading ONNX Runtime and the model adds ~70 MB of RSS
           "model": {"enabled": os.environ.get("BENCH_MODEL") == "1"},
           # rules on the benchmark's own series (thresholds the generated values never reach: no alerts)
           "rules": {"rule": [{"id": f"r{i}", "kind": ("above", "below", "rate", "zscore")[i % 4],
                               "device": f"dev-{i % devices:03d}", "point": ("temperature", "pressure", "flow")[i % 3],
                               "threshold": (1e9, -1e9, 1e9, 1e9)[i % 4]} for i in range(rules)]}}
    (work / "agent.toml").write_text(to_toml(cfg))
    cmd = [sys.executable, "-m", "edge_agent", "run", "--config", str(work / "agent.toml")]
    agent = None
    try:
        # First start: creates the persistent session, and tells how long the agent takes from exec to
        # subscribed (Python imports, TLS, store open), which the timed run does not count.
        s0 = time.perf_counter()
        agent = subprocess.Popen(cmd, cwd=ROOT)
        wait_metric(mport, 'edge_agent_ingest_connected{source="mqtt"}', 1, 30, 0.005)
        startup = time.perf_counter() - s0
        agent.terminate()
        agent.wait(30)
        run_gen(local.port, n, devices)  # the backlog, queued at the broker for the agent's session
        s0 = time.perf_counter()
        agent = subprocess.Popen(cmd, cwd=ROOT)
        cpu0 = 0.0  # the process's whole CPU time is counted, start-up included (a slight overcount)
        t0 = s0 + startup
        peak = 0
        while metric(mport, "edge_agent_uplink_readings_acked_total") < 5 * n:
            peak = max(peak, proc_stats(agent.pid)[1])
            time.sleep(0.05)
            if time.perf_counter() - t0 > 600:
                raise RuntimeError("benchmark did not finish in 600 s")
        elapsed = time.perf_counter() - t0
        cpu1, rss = proc_stats(agent.pid)
        paused = metric(mport, 'edge_agent_ingest_paused_total{source="mqtt"}')
        commits = metric(mport, "edge_agent_store_commits_total")
        commit_s = metric(mport, "edge_agent_store_commit_seconds_sum")
        # latency at a paced rate through the running agent
        out = work / "cloud.json"
        m = max(1000, int(rate * 10))
        sub = subprocess.Popen([sys.executable, "-c", CLOUD_SUB, str(cloud.port), str(ca.cert_path), str(viewer[0]),
                                str(viewer[1]), str(out), str(5 * m)], stdout=subprocess.PIPE)
        sub.stdout.readline()
        time.sleep(0.5)
        cpu_a, _ = proc_stats(agent.pid)
        commits_a = metric(mport, "edge_agent_store_commits_total")
        g0 = time.perf_counter()
        run_gen(local.port, m, devices, rate)
        sub.wait(120)
        cpu_b, _ = proc_stats(agent.pid)
        paced_s = time.perf_counter() - g0
        commits_paced = metric(mport, "edge_agent_store_commits_total") - commits_a
        lat = sorted(json.loads(out.read_text())["latencies_ms"])
        return {"points_per_s": 5 * n / elapsed, "cpu_cores": (cpu1 - cpu0) / elapsed,
                "rss_mb": max(peak, rss) / 2**20, "p50_ms": lat[len(lat) // 2], "p99_ms": lat[int(len(lat) * 0.99)],
                "batches": len(lat), "rate": rate, "paused": paused, "commits": commits,
                "paced_cpu_cores": (cpu_b - cpu_a) / paced_s, "paced_commits": commits_paced, "paced_messages": m,
                "commit_ms": 1000 * commit_s / max(commits, 1)}
    finally:
        if agent is not None:
            agent.terminate()
            agent.wait(30)
        local.stop()
        cloud.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--rate", type=float, default=4000, help="messages/s for the latency phase")
    ap.add_argument("--receive-maximum", type=int, default=0, help="0 = the config default")
    ap.add_argument("--synchronous", choices=("full", "normal"), default="full")
    ap.add_argument("--rules", type=int, default=0, help="rules active on the ingested series")
    ap.add_argument("--delay-ms", type=float, default=None, help="store.batch_max_delay_ms (default: the config's)")
    ap.add_argument("--ship", choices=("on", "off", "both"), default="on",
                    help="log shipping (log.ship); both: run twice and compare")
    a = ap.parse_args()
    if a.ship == "both":
        rows = {}
        for ship in (False, True, False, True):  # interleaved: the machine drifts
            with tempfile.TemporaryDirectory() as d:
                r = agent_run(Path(d), a.messages, a.devices, a.rate, a.receive_maximum, a.synchronous, a.rules, ship)
            rows.setdefault(ship, []).append(r["points_per_s"])
            print(f"log shipping {'on ' if ship else 'off'}: {r['points_per_s']:9.0f} points/s, "
                  f"CPU {r['cpu_cores']:.2f} cores", flush=True)
        on, off = sum(rows[True]) / 2, sum(rows[False]) / 2
        print(f"log shipping on/off throughput: {on / off:.3f} (mean of two runs each)")
        return
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        ceil = ceiling(work, a.messages, a.devices) * 5
        r = agent_run(work, a.messages, a.devices, a.rate, a.receive_maximum, a.synchronous, a.rules,
                      a.ship == "on", a.delay_ms)
    print(f"backlog: {a.messages} messages x 5 points from {a.devices} devices, QoS 1; "
          f"agent receive_maximum {a.receive_maximum or 'default'}; {a.rules} rules")
    print(f"ceiling  (mosquitto_sub -q 1 drains it)      : {ceil:9.0f} points/s")
    print(f"agent    (commit, mTLS uplink, cloud PUBACK) : {r['points_per_s']:9.0f} points/s"
          f"   ratio {r['points_per_s'] / ceil:.2f}")
    print(f"agent CPU {r['cpu_cores']:.2f} cores, peak RSS {r['rss_mb']:.0f} MB; {r['commits']:.0f} commits "
          f"(mean {r['commit_ms']:.1f} ms, synchronous={a.synchronous}), ingest paused {r['paused']:.0f} times")
    print(f"latency at {r['rate'] * 5:.0f} points/s: publish->cloud p50 {r['p50_ms']:.0f} ms, "
          f"p99 {r['p99_ms']:.0f} ms ({r['batches']} batches); agent CPU there {r['paced_cpu_cores']:.2f} cores, "
          f"{r['paced_commits']:.0f} commits for {r['paced_messages']} messages")


if __name__ == "__main__":
    main()
