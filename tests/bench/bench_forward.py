"""Forwarding benchmark (not a test): bytes on the wire a reading and readings forwarded, on a plant-like signal set.

    python tests/bench/bench_forward.py [--devices 40] [--seconds 1800] [--deadband-pct 0.5] [--silence 60]

A generator (its own process) publishes a plant's half hour at 1 Hz as fast as it can, device timestamps one second
apart: per device a temperature drifting slowly with noise at the sensor's resolution (2 decimals; one device in ten
stuck), a pressure (4 decimals), a flow that steps between levels (1 decimal), a tank level filling (1 decimal; one
in seven stuck), a running flag, and on one device in eight a mode string. The agent (its own process, between a
local Mosquitto and a mutual-TLS cloud one) forwards it; a cloud subscriber keeps every payload it receives.

Runs, each on a fresh agent: lossless (no forwarding rule) in json, columns+zstd and columns+gzip; then
`deadband_pct` with a heartbeat of `silence` s on every series (booleans and strings on change). Printed: payload
bytes of every message the cloud received / readings received, readings forwarded against readings stored, and the
checks: every stored reading within its deadband of the step-hold reconstruction from what the cloud received (or
equal, for booleans and strings), every heartbeat on time (no gap between two forwarded readings of a series above
silence + 1 s), the seq ranges the cloud received contiguous.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import json
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "bench"))

from bench_ingest import Rig, wait_metric  # noqa: E402
from edge_agent.store.encoding import decode  # noqa: E402

PLANT = r"""
import asyncio, json, math, random, sys, time
from edge_agent.mqttio import MqttConnection
port, devices, seconds, t0_ms = (int(x) for x in sys.argv[1:5])

def values(d, t, rnd):
    v = {"temperature": 40 + d * 0.5 if d % 10 == 3 else
         round(40 + d * 0.5 + 3 * math.sin(2 * math.pi * t / (1200 + 37 * d)) + rnd.gauss(0, 0.02), 2),
         "pressure": round(2.0 + 0.05 * math.sin(2 * math.pi * t / (900 + 11 * d)) + rnd.gauss(0, 0.0003), 4),
         "flow": round(50 + 10 * ((t + 97 * d) // 300 % 3) + rnd.gauss(0, 0.05), 1),
         "level": 12.3 if d % 7 == 0 else round(60 + 20 * t / 1800 + rnd.gauss(0, 0.05), 1),
         "running": (t + 211 * d) // 600 % 2 == 0}
    if d % 8 == 0:
        v["mode"] = "auto" if (t + 50 * d) // 900 % 2 == 0 else "manual"
    return v

async def main():
    c = MqttConnection(client_id="plant", host="127.0.0.1", port=port, max_inflight=1000)
    await c.connect()
    rnd = [random.Random(d) for d in range(devices)]
    pending, n = [], 0
    for t in range(seconds):
        for d in range(devices):
            body = json.dumps({"ts": t0_ms + t * 1000, "values": values(d, t, rnd[d])}).encode()
            pending.append(c.publish(f"devices/plc-{d:02d}/telemetry", body, qos=1))
            n += len(body)
            if len(pending) >= 2000:
                await asyncio.gather(*pending[:1000]); del pending[:1000]
    await asyncio.gather(*pending)
    print(json.dumps({"bytes": n}), flush=True)
    await c.disconnect()
asyncio.run(main())
"""

CAPTURE = r"""
import struct, sys, threading
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
port, ca, cert, key, out = sys.argv[1:6]
f = open(out, "wb")
lock = threading.Lock()
def on_message(c, u, m):
    if "/telemetry" in m.topic:
        with lock:
            f.write(struct.pack("<I", len(m.payload)) + m.payload); f.flush()
c = paho.Client(CallbackAPIVersion.VERSION2, client_id="capture")
c.tls_set(ca_certs=ca, certfile=cert, keyfile=key)
ready = threading.Event()
c.on_connect = lambda c, u, f_, r, p: c.subscribe([("edge/+/telemetry", 1), ("edge/+/telemetry/+", 1)])
c.on_subscribe = lambda *a: ready.set()
c.on_message = on_message
c.connect("localhost", int(port), 30)
c.loop_start()
ready.wait(30)
print("ready", flush=True)
sys.stdin.read()  # until the bench closes it
c.disconnect(); c.loop_stop(); f.close()
"""


def run(work: Path, devices: int, seconds: int, t0_ms: int, uplink: dict, rules: list[dict]) -> dict:
    rig = Rig(work, devices, extra={"uplink": {"linger_s": 2.0, **uplink}, "forward": {"rule": rules},
                                    "store": {"retention_rows": 10_000_000}})
    try:
        rig.start()  # the persistent session
        rig.stop_agent()
        gen = subprocess.run([sys.executable, "-c", PLANT, str(rig.local.port), str(devices), str(seconds),
                              str(t0_ms)], cwd=ROOT, check=True, capture_output=True, text=True)
        published = json.loads(gen.stdout)["bytes"]
        cap_path = work / "capture.bin"
        cap = subprocess.Popen([sys.executable, "-c", CAPTURE, str(rig.cloud.port), str(rig.ca.cert_path),
                                str(rig.viewer[0]), str(rig.viewer[1]), str(cap_path)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, cwd=ROOT)
        cap.stdout.readline()
        rig.start()
        expected = sum(5 + (d % 8 == 0) for d in range(devices)) * seconds
        wait_metric(rig.mport, "edge_agent_readings_committed_total", expected, 600)
        # everything committed reaches the cloud: a trailing range of filtered readings only within 5 s (+ linger)
        head = 0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            msgs = _read(cap_path)
            head = max((m["last_seq"] for m in msgs), default=0)
            if head >= expected:
                break
            time.sleep(0.5)
        time.sleep(1.0)
        cap.stdin.close()
        cap.wait(30)
        rig.stop_agent()
        db = sqlite3.connect(f"file:{work}/state/edge-agent.db?mode=ro", uri=True)
        stored = db.execute("SELECT r.seq, p.device, p.point, r.ts_ns, r.value FROM readings r JOIN points p "
                            "ON p.id = r.series ORDER BY r.seq").fetchall()
        db.close()
        return {"messages": _read(cap_path), "bytes": sum(len(p) for p in _raw(cap_path)), "stored": stored,
                "published_bytes": published}
    finally:
        rig.close()


def _raw(path: Path) -> list[bytes]:
    data = path.read_bytes() if path.exists() else b""
    out, off = [], 0
    while off + 4 <= len(data):
        (n,) = struct.unpack_from("<I", data, off)
        if off + 4 + n > len(data):
            break
        out.append(data[off + 4:off + 4 + n])
        off += 4 + n
    return out


def _read(path: Path) -> list[dict]:
    return [decode(p) for p in _raw(path)]


def check(res: dict, pct: float, silence: float) -> dict:
    """The cloud's view against the store: seq ranges contiguous; every stored reading within its deadband of the
    step-hold reconstruction; heartbeats on time."""
    msgs, stored = res["messages"], res["stored"]
    ranges = sorted({(m["first_seq"], m["last_seq"]) for m in msgs})
    gaps = [(a[1], b[0]) for a, b in zip(ranges, ranges[1:]) if b[0] != a[1] + 1]
    sent = {r["seq"]: r for m in msgs for r in m["readings"]}
    series: dict[tuple, list] = collections.defaultdict(list)
    for r in sorted(sent.values(), key=lambda r: r["ts"]):
        series[(r["device"], r["point"])].append(r)
    keys = {k: [r["ts"] for r in v] for k, v in series.items()}
    outside, worst, late = 0, 0.0, 0
    for _, device, point, ts, v in stored:
        k = (device, point)
        i = bisect.bisect_right(keys.get(k, []), ts) - 1
        if i < 0:
            outside += 1
            continue
        held = series[k][i]["value"]
        if isinstance(held, bool) or isinstance(held, str):
            ok = (bool(v) == held) if isinstance(held, bool) else v == held
            outside += not ok
            continue
        band = pct / 100 * abs(held)
        dev = abs(v - held)
        worst = max(worst, dev / band if band else (0.0 if dev == 0 else float("inf")))
        outside += dev > band + 1e-12
    for rs in series.values():
        late += sum((b["ts"] - a["ts"]) / 1e9 > silence + 1 for a, b in zip(rs, rs[1:]))
    return {"gaps": gaps, "sent": len(sent), "outside": outside, "worst": worst, "late_heartbeats": late,
            "series": len(series)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, default=40)
    ap.add_argument("--seconds", type=int, default=1800, help="the plant's time, at 1 Hz")
    ap.add_argument("--deadband-pct", type=float, default=0.5)
    ap.add_argument("--silence", type=float, default=60.0, help="max_silence_s: the heartbeat")
    a = ap.parse_args()
    t0_ms = (int(time.time()) // 3600 - 24) * 3600 * 1000  # yesterday: a backlog replayed
    lossless = [("json", {"encoding": "json"}), ("columns+zstd", {"encoding": "columns", "compression": "zstd"}),
                ("columns+gzip", {"encoding": "columns", "compression": "gzip"})]
    print(f"plant: {a.devices} devices, {a.seconds} s at 1 Hz")
    for name, up in lossless:
        with tempfile.TemporaryDirectory() as d:
            res = run(Path(d), a.devices, a.seconds, t0_ms, up, [])
        c = check(res, 0.0, float("inf"))
        n = len(res["stored"])
        print(f"lossless {name:13s}: {c['sent']} of {n} readings at the cloud, {res['bytes'] / c['sent']:6.2f} payload "
              f"bytes a reading; every stored value equal to the cloud's: {c['outside'] == 0}; seq gaps: "
              f"{len(c['gaps'])}", flush=True)
    rules = [{"id": "plant", "deadband_pct": a.deadband_pct, "max_silence_s": a.silence}]
    for name, up in lossless[1:2] + lossless[:1]:
        with tempfile.TemporaryDirectory() as d:
            res = run(Path(d), a.devices, a.seconds, t0_ms, up, rules)
        c = check(res, a.deadband_pct, a.silence)
        n = len(res["stored"])
        print(f"deadband {a.deadband_pct} % + heartbeat {a.silence:.0f} s, {name}: {c['sent']} of {n} readings "
              f"forwarded ({n / c['sent']:.1f}x fewer), {res['bytes'] / n:.2f} payload bytes a reading stored "
              f"({res['bytes'] / c['sent']:.2f} a reading forwarded); stored readings outside their deadband of the "
              f"step-hold reconstruction: {c['outside']} (worst {c['worst']:.2f} of the band); heartbeats late: "
              f"{c['late_heartbeats']}; seq gaps: {len(c['gaps'])}", flush=True)


if __name__ == "__main__":
    main()
