"""Command round-trip benchmark (not a test): p50/p99 of `ping`, `query` and `ask` through the mTLS cloud broker.

    python tests/bench/bench_commands.py [--n 300] [--protocol 5|3.1.1]

The agent runs with a local and a cloud Mosquitto (mutual TLS); 10,000 readings are committed
first so that `query` has a window to scan. A cloud-side client (paho, its own certificate) sends
one request at a time and times request -> reply. The peer in the same run is a bare MQTT echo over
the same broker: a client that republishes every request to the reply topic, i.e. the transport's
own round trip without the agent.
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from bench_ingest import metric, run_gen, wait_metric  # noqa: E402
from edge_agent.devkit.brokers import Mosquitto, cloud_acl, free_port  # noqa: E402
from edge_agent.devkit.certs import CA  # noqa: E402
from edge_agent.config import to_toml  # noqa: E402


class Client:
    def __init__(self, port: int, ca: CA, cert, protocol: str, cid: str) -> None:
        self.v5 = protocol == "5"
        self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=cid,
                             protocol=paho.MQTTv5 if self.v5 else paho.MQTTv311)
        self.c.tls_set(ca_certs=str(ca.cert_path), certfile=str(cert[0]), keyfile=str(cert[1]))
        self.got = threading.Event()
        self.c.on_message = lambda *_a: self.got.set()
        self.c.on_socket_open = lambda _c, _u, sock: sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.c.connect("localhost", port, 30)
        self.c.loop_start()

    def rtt(self, topic: str, body: dict) -> float:
        self.got.clear()
        t0 = time.perf_counter()
        self.c.publish(topic, json.dumps(body).encode(), qos=1)
        if not self.got.wait(10):
            raise RuntimeError(f"no reply on {topic}")
        return (time.perf_counter() - t0) * 1000


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--protocol", choices=("5", "3.1.1"), default="3.1.1",
                    help="the operator's client; replies to res/<id> work for both")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        ca = CA(work / "pki")
        server, gw, op = ca.issue("cloud", server=True), ca.issue("bench-gw"), ca.issue("cloud-viewer")
        local = Mosquitto.local(work / "local").start()
        acl = work / "bench.acl"  # the shipped ACL, and a bench-only echo topic for the transport baseline
        acl.write_text(cloud_acl().read_text() + "\npattern readwrite echo/#\n")
        cloud = Mosquitto.mtls(work / "cloud", ca.cert_path, *server, acl=acl).start()
        mport = free_port()
        cfg = {"gateway": {"id": "bench-gw", "state_dir": str(work / "state")}, "log": {"level": "warning"},
               "southbound": {"mqtt": {"port": local.port}},
               "uplink": {"host": "localhost", "port": cloud.port, "ca_file": str(ca.cert_path),
                          "cert_file": str(gw[0]), "key_file": str(gw[1])},
               "metrics": {"port": mport}}
        (work / "agent.toml").write_text(to_toml(cfg))
        agent = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(work / "agent.toml")],
                                 cwd=ROOT)
        try:
            wait_metric(mport, 'edge_agent_ingest_connected{source="mqtt"}', 1, 30)
            wait_metric(mport, "edge_agent_uplink_connected", 1, 30)
            run_gen(local.port, 2000, 100)
            wait_metric(mport, "edge_agent_readings_committed_total", 10_000, 60)
            cli = Client(cloud.port, ca, op, a.protocol, "operator")
            cli.c.subscribe([("edge/bench-gw/res/+", 1), ("echo/res", 1)])
            time.sleep(0.5)
            results = {}
            ask = {"text": "what is the average temperature of dev-007 over the last hour"}
            for _ in range(5):  # the model loads beside the rest at start; the first answers warm it up
                cli.rtt("edge/bench-gw/cmd/ask", {**ask, "id": uuid.uuid4().hex[:16]})
            wait_metric(mport, 'edge_agent_glm_requests_total{outcome="ok"}', 1, 30)
            for name, body in (("ping", {}), ("query", {"device": "dev-007", "point": "temperature", "agg": "avg",
                                                        "window_s": 3600}),
                               ("ask", ask)):
                xs = [cli.rtt(f"edge/bench-gw/cmd/{name}", {**body, "id": uuid.uuid4().hex[:16]})
                      for _ in range(a.n)]
                results[name] = (pct(xs, 0.5), pct(xs, 0.99))
            # the transport alone: an echo client on the same broker answers on the reply topic
            echo = Client(cloud.port, ca, op, a.protocol, "echo")
            echo.c.on_message = lambda c, _u, m: c.publish("echo/res", m.payload, qos=1)
            echo.c.subscribe("echo/cmd", 1)
            time.sleep(0.5)
            xs = [cli.rtt("echo/cmd", {"id": "echo"}) for _ in range(a.n)]
            results["bare echo"] = (pct(xs, 0.5), pct(xs, 0.99))
            committed = metric(mport, "edge_agent_readings_committed_total")
        finally:
            agent.terminate()
            agent.wait(30)
            local.stop()
            cloud.stop()
    print(f"command round trip through the mTLS cloud broker, {a.n} sequential requests each, "
          f"MQTT {a.protocol} operator, {committed:.0f} readings in the store")
    for name, (p50, p99) in results.items():
        print(f"  {name:10s} p50 {p50:6.2f} ms   p99 {p99:6.2f} ms")


if __name__ == "__main__":
    main()
