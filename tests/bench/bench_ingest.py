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
# publisher k of p publishes for the devices d with d % p == k (several processes reach rates one cannot)
k, p = (int(sys.argv[5]), int(sys.argv[6])) if len(sys.argv) > 6 else (0, 1)
async def main():
    c = MqttConnection(client_id=f"bench-gen-{k}", host="127.0.0.1", port=port, max_inflight=1000)
    await c.connect()
    topics = [f"devices/dev-{d:03d}/telemetry" for d in range(devices) if d % p == k]
    window, pending = 2000, []
    t0 = time.perf_counter()
    for i in range(n):
        body = ('{"ts":%d,"values":{"temperature":%.2f,"pressure":%.3f,"flow":%d,"running":true,"vib":%.4f}}'
                % (time.time_ns() // 1_000_000, 20 + i % 10, 1.0 + i % 7 / 100, i % 500, (i % 13) / 1000)).encode()
        pending.append(c.publish(topics[i % len(topics)], body, qos=1))
        if rate:  # on time, message by message (at most 2 ms early)
            ahead = t0 + (i + 1) / rate - time.perf_counter()
            if ahead > 0.002:
                await asyncio.sleep(ahead)
        if len(pending) >= window:
            await asyncio.gather(*pending[:window // 2]); del pending[:window // 2]
    await asyncio.gather(*pending)
    print(json.dumps({"published": n, "seconds": time.perf_counter() - t0}), flush=True)
    await c.disconnect()
asyncio.run(main())
"""

CLOUD_SUB = r"""
import json, re, ssl, sys, threading, time
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from edge_agent.store.encoding import decode
port, ca, cert, key, out = sys.argv[1:6]
expected, timeout = int(sys.argv[6]), float(sys.argv[7]) if len(sys.argv) > 7 else 600.0
ts_re = re.compile(rb'"ts":(\d+)')
lat, total, last, done, nbytes, records = [], [0], [0], threading.Event(), [0], [0]
def on_message(c, u, m):
    now = time.time_ns()
    nbytes[0] += len(m.payload)
    if m.payload[:4] == b"EAC1":  # the columns encoding: decoded (the cloud's cost, not the agent's)
        doc = decode(m.payload)
        total[0] += doc["last_seq"] - doc["first_seq"] + 1
        records[0] += doc["count"]
        ts = min((r["ts"] for r in doc["readings"]), default=None)
    else:
        head = m.payload[:400]
        n = int(re.search(rb'"count":(\d+)', head).group(1))
        f, l = (int(x) for x in re.search(rb'"first_seq":(\d+),"last_seq":(\d+)', head).groups())
        total[0] += l - f + 1
        records[0] += n
        t = ts_re.search(head)
        ts = int(t.group(1)) if t else None
    last[0] = now
    if ts is not None: lat.append((now - ts) / 1e6)
    if total[0] >= expected:
        done.set()
c = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-cloud")
c.tls_set(ca_certs=ca, certfile=cert, keyfile=key)
subscribed = threading.Event()
c.on_connect = lambda c, u, f, r, p: c.subscribe([("edge/+/telemetry", 1), ("edge/+/telemetry/+", 1)])
c.on_subscribe = lambda *a: subscribed.set()
c.on_message = on_message
c.connect("localhost", int(port), 30)
c.loop_start()
subscribed.wait(30)
print("ready", flush=True)
done.wait(timeout)
c.disconnect(); c.loop_stop()
json.dump({"latencies_ms": lat, "readings": total[0], "records": records[0], "bytes": nbytes[0],
           "last_ns": last[0]}, open(out, "w"))
"""


def proc_stats(pid: int) -> tuple[float, int]:
    """(cpu seconds, rss bytes) of a process from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    cpu = (int(parts[11]) + int(parts[12])) / os.sysconf("SC_CLK_TCK")
    with open(f"/proc/{pid}/status") as f:
        rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    return cpu, rss


def written(pid: int) -> int:
    """Bytes the process caused to be written to storage (/proc/<pid>/io write_bytes)."""
    with open(f"/proc/{pid}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("write_bytes:"))


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


class Rig:
    """Two Mosquittos (local plain, cloud mutual TLS) and the agent between them (its own process)."""

    def __init__(self, work: Path, devices: int, receive_maximum: int = 0, synchronous: str = "full",
                 rules: int = 0, ship: bool = True, delay_ms: float | None = None, extra: dict | None = None) -> None:
        """`extra`: config sections merged in (uplink encoding, forwarding rules)."""
        self.work = work
        self.ca = CA(work / "pki")
        server = self.ca.issue("cloud", server=True)
        gw = self.ca.issue("bench-gw")
        self.viewer = self.ca.issue("cloud-viewer")
        self.local = Mosquitto.local(work / "local").start()
        self.cloud = Mosquitto.mtls(work / "cloud", self.ca.cert_path, *server).start()
        self.mport = free_port()
        cfg = {"gateway": {"id": "bench-gw", "state_dir": str(work / "state")},
               "log": {"level": "warning", "ship": ship},
               "southbound": {"mqtt": {"port": self.local.port, "protocol": os.environ.get("BENCH_PROTOCOL", "5"),
                                       **({"receive_maximum": receive_maximum} if receive_maximum else {})}},
               "uplink": {"host": "localhost", "port": self.cloud.port, "ca_file": str(self.ca.cert_path),
                          "cert_file": str(gw[0]), "key_file": str(gw[1])},
               "store": {"synchronous": synchronous,
                         **({"batch_max_delay_ms": delay_ms} if delay_ms is not None else {})},
               "metrics": {"port": self.mport},
               # the GLM is off unless BENCH_MODEL=1: loading ONNX Runtime and the model adds ~70 MB of RSS
               "model": {"enabled": os.environ.get("BENCH_MODEL") == "1"},
               # rules on the benchmark's own series (thresholds the generated values never reach: no alerts)
               "rules": {"rule": [{"id": f"r{i}", "kind": ("above", "below", "rate", "zscore")[i % 4],
                                   "device": f"dev-{i % devices:03d}",
                                   "point": ("temperature", "pressure", "flow")[i % 3],
                                   "threshold": (1e9, -1e9, 1e9, 1e9)[i % 4]} for i in range(rules)]}}
        for section, values in (extra or {}).items():
            cfg.setdefault(section, {}).update(values)
        (work / "agent.toml").write_text(to_toml(cfg))
        self.cmd = [sys.executable, "-m", "edge_agent", "run", "--config", str(work / "agent.toml")]
        self.agent: subprocess.Popen | None = None

    def start(self) -> float:
        """Starts the agent; returns the seconds from exec to subscribed (imports, TLS, store open)."""
        s0 = time.perf_counter()
        self.agent = subprocess.Popen(self.cmd, cwd=ROOT)
        wait_metric(self.mport, 'edge_agent_ingest_connected{source="mqtt"}', 1, 30, 0.005)
        return time.perf_counter() - s0

    def stop_agent(self) -> None:
        if self.agent is not None:
            self.agent.terminate()
            self.agent.wait(30)
            self.agent = None

    def cloud_sub(self, expected: int, timeout: float) -> tuple[subprocess.Popen, Path]:
        out = self.work / f"cloud-{time.monotonic_ns()}.json"
        sub = subprocess.Popen([sys.executable, "-c", CLOUD_SUB, str(self.cloud.port), str(self.ca.cert_path),
                                str(self.viewer[0]), str(self.viewer[1]), str(out), str(expected), str(timeout)],
                               stdout=subprocess.PIPE, cwd=ROOT)
        sub.stdout.readline()
        return sub, out

    def close(self) -> None:
        self.stop_agent()
        self.local.stop()
        self.cloud.stop()


def agent_run(work: Path, n: int, devices: int, rate: float, receive_maximum: int, synchronous: str,
              rules: int = 0, ship: bool = True, delay_ms: float | None = None) -> dict:
    rig = Rig(work, devices, receive_maximum, synchronous, rules, ship, delay_ms)
    try:
        # First start: creates the persistent session, and tells how long the agent takes from exec to
        # subscribed (Python imports, TLS, store open), which the timed run does not count.
        startup = rig.start()
        rig.stop_agent()
        run_gen(rig.local.port, n, devices)  # the backlog, queued at the broker for the agent's session
        s0 = time.perf_counter()
        rig.start()
        agent, mport = rig.agent, rig.mport
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
        m = max(1000, int(rate * 10))
        sub, out = rig.cloud_sub(5 * m, 120)
        time.sleep(0.5)
        cpu_a, _ = proc_stats(agent.pid)
        commits_a = metric(mport, "edge_agent_store_commits_total")
        g0 = time.perf_counter()
        run_gen(rig.local.port, m, devices, rate)
        sub.wait(130)
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
        rig.close()


PUBLISHER_RATE = 2500  # messages/s one Python publisher process offers on a slow core; more processes beyond


def paced(work: Path, rates: list[float], seconds: float, devices: int, synchronous: str,
          delay_ms: float | None, out=print, extra: dict | None = None) -> list[dict]:
    """Offers each rate for `seconds` through one running agent; per rate: the agent's CPU (utime+stime from the
    first publish until the cloud has every reading, or the drain deadline), publish->cloud p50/p99 (per uplink
    batch, from its oldest reading's device timestamp), readings lost (published, never at the cloud within
    `seconds` + 20 s) and whether the rate was sustained: offered within 5 % of the rate, nothing lost, and the
    cloud had the last reading within 2 s of the last publish."""
    rig = Rig(work, devices, synchronous=synchronous, delay_ms=delay_ms, extra=extra)
    rows = []
    try:
        rig.start()
        run_gen(rig.local.port, devices, devices)  # every device registered (and its log line shipped) beforehand
        time.sleep(3.0)  # start-up and registration done: idle
        pid, mport = rig.agent.pid, rig.mport
        i0, t_i = proc_stats(pid)[0], time.perf_counter()
        time.sleep(5.0)
        idle = (proc_stats(pid)[0] - i0) / (time.perf_counter() - t_i)
        out(f"idle: agent CPU {idle:.3f} cores over 5 s")
        for rate in rates:
            n = max(20, int(rate * seconds))
            pubs = max(1, -(-int(rate) // PUBLISHER_RATE))
            sub, res = rig.cloud_sub(5 * n, seconds + 20)
            commits0 = metric(mport, "edge_agent_store_commits_total")
            batches0 = metric(mport, "edge_agent_uplink_batches_sent_total")
            cpu0, t0, w0 = proc_stats(pid)[0], time.perf_counter(), written(pid)
            gens = [subprocess.Popen([sys.executable, "-c", GENERATOR, str(rig.local.port),
                                      str(n // pubs + (k < n % pubs)), str(devices), str(rate / pubs), str(k),
                                      str(pubs)], cwd=ROOT, stdout=subprocess.PIPE) for k in range(pubs)]
            took = max(json.loads(g.communicate()[0])["seconds"] for g in gens)
            t_pub = time.perf_counter()
            sub.wait(seconds + 40)
            cpu1, t1 = proc_stats(pid)[0], time.perf_counter()
            time.sleep(1.5)  # the last acknowledgement's commit (store.lazy_max_delay_ms), for the bytes written
            w1 = written(pid)
            r = json.loads(res.read_text())
            lat = sorted(r["latencies_ms"]) or [float("nan")]
            lost = 5 * n - r["readings"]
            # when the cloud had the last reading, relative to the last publish
            drain = (r["last_ns"] / 1e9 - (time.time() - (time.perf_counter() - t_pub))) if r["last_ns"] \
                else float("inf")
            offered = n / took
            row = {"rate": rate, "offered": offered, "publishers": pubs, "messages": n,
                   "cpu_cores": (cpu1 - cpu0) / (t1 - t0), "p50_ms": lat[len(lat) // 2],
                   "p99_ms": lat[int(len(lat) * 0.99)], "lost": lost, "drain_s": drain,
                   "commits": metric(mport, "edge_agent_store_commits_total") - commits0,
                   "batches": metric(mport, "edge_agent_uplink_batches_sent_total") - batches0,
                   "bytes_per_reading": (w1 - w0) / (5 * n),
                   "wire_bytes_per_reading": r["bytes"] / max(r["records"], 1)}
            row["sustained"] = offered >= 0.95 * rate and lost <= 0 and drain <= 2.0
            rows.append(row)
            out(f"{rate:7.0f} msg/s ({5 * rate:7.0f} points/s) offered {offered:7.0f} by {pubs}: CPU "
                f"{row['cpu_cores']:.3f} cores, p50 {row['p50_ms']:5.0f} ms, p99 {row['p99_ms']:5.0f} ms, lost "
                f"{lost}, last reading at the cloud {drain:+.2f} s after the last publish, {row['commits']:.0f} "
                f"commits and {row['batches']:.0f} uplink batches for {n} messages, "
                f"{row['bytes_per_reading']:.0f} bytes written per reading, "
                f"{row['wire_bytes_per_reading']:.1f} payload bytes a reading at the cloud"
                f"{'' if row['sustained'] else '  NOT SUSTAINED'}", flush=True)
            time.sleep(1.0)
        best = max((r["rate"] for r in rows if r["sustained"]), default=0)
        out(f"highest rate sustained with zero loss: {best:.0f} msg/s ({5 * best:.0f} points/s)")
        return rows
    finally:
        rig.close()


def compare_encodings(a: argparse.Namespace) -> None:
    """json against columns (zstd, gzip) at one paced rate, interleaved (the machine drifts): the agent's CPU from
    the first publish until the cloud has every reading, and the payload bytes a reading at the cloud."""
    kinds = {"json": {"encoding": "json"}, "columns+zstd": {"encoding": "columns", "compression": "zstd"},
             "columns+gzip": {"encoding": "columns", "compression": "gzip"}}
    linger = {} if a.linger_s is None else {"linger_s": a.linger_s}
    got: dict[str, list[dict]] = {k: [] for k in kinds}
    for _ in range(2):
        for name, up in kinds.items():
            with tempfile.TemporaryDirectory() as d:
                row = paced(Path(d), [a.compare_encodings], a.seconds, a.devices, a.synchronous, a.delay_ms,
                            out=lambda *_a, **_k: None, extra={"uplink": {**up, **linger}})[0]
            got[name].append(row)
            print(f"{name:13s} {5 * a.compare_encodings:7.0f} points/s: CPU {row['cpu_cores']:.3f} cores, "
                  f"{row['wire_bytes_per_reading']:6.1f} payload bytes a reading at the cloud, lost {row['lost']}, "
                  f"p99 {row['p99_ms']:.0f} ms", flush=True)
    base = sum(r["cpu_cores"] for r in got["json"]) / 2
    for name, rows in got.items():
        cpu = sum(r["cpu_cores"] for r in rows) / 2
        wire = sum(r["wire_bytes_per_reading"] for r in rows) / 2
        print(f"{name:13s}: CPU {cpu:.3f} cores ({cpu / base:.2f} of json), {wire:.1f} bytes a reading, lost "
              f"{sum(r['lost'] for r in rows)}")


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
    ap.add_argument("--paced", default="", help="paced mode: messages/s to offer in turn, e.g. 10,100,1000,5000")
    ap.add_argument("--seconds", type=float, default=10.0, help="paced mode: seconds per rate")
    ap.add_argument("--encoding", choices=("json", "columns"), default="json", help="uplink.encoding")
    ap.add_argument("--compression", choices=("zstd", "gzip"), default="zstd", help="uplink.compression (columns)")
    ap.add_argument("--linger-s", type=float, default=None, help="uplink.linger_s (default: the config's)")
    ap.add_argument("--compare-encodings", type=float, default=0, metavar="RATE",
                    help="messages/s: the agent's CPU and the bytes a reading at the cloud, json against columns "
                    "(zstd, gzip), each paced at RATE for --seconds, interleaved twice")
    a = ap.parse_args()
    if a.compare_encodings:
        compare_encodings(a)
        return
    if a.encoding != "json" or a.linger_s is not None:
        extra = {"uplink": {"encoding": a.encoding, "compression": a.compression,
                            **({"linger_s": a.linger_s} if a.linger_s is not None else {})}}
    else:
        extra = None
    if a.paced:
        with tempfile.TemporaryDirectory() as d:
            paced(Path(d), [float(x) for x in a.paced.split(",")], a.seconds, a.devices, a.synchronous, a.delay_ms,
                  extra=extra)
        return
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
