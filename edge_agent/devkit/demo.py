"""`edge-agent demo`: the whole spine on loopback with real peers.

Two Mosquitto processes (a local broker, and a "cloud" broker that requires client certificates
from a throwaway CA made here), simulated devices publishing JSON at QoS 1, a CoAP sensor the agent
observes, an asyncua PLC the agent subscribes to, a cloud-side viewer subscribed with its own
certificate, and the agent between them. One line a second shows what
flows; Ctrl-C stops everything cleanly.
"""
from __future__ import annotations

import asyncio
import json
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

from edge_agent import config
from edge_agent.app import App
from edge_agent.devkit.brokers import INSTALL_HINT, Mosquitto, find_mosquitto, free_port, free_udp_port
from edge_agent.devkit.certs import CA
from edge_agent.mqttio import MqttConnection
from edge_agent.devkit.simulators import coap_sensor, opcua_plc


def demo_config(state: Path, local_port: int, cloud_port: int, ca: Path, cert: Path, key: Path,
                coap_port: int, sensor_port: int, plc_port: int) -> config.Config:
    return config.from_dict({
        "gateway": {"id": "demo-gw", "state_dir": str(state)},
        "log": {"format": "text"},
        "southbound": {
            "mqtt": {"port": local_port, "topics": [
                {"filter": "devices/+/telemetry", "device": "devices/{device}/telemetry", "ts_unit": "ms"}]},
            "coap": {"enabled": True, "port": coap_port, "observe": [
                {"uri": f"coap://127.0.0.1:{sensor_port}/sensors/temp", "device": "coap-sensor-1"},
                {"uri": f"coap://127.0.0.1:{sensor_port}/sensors/humidity", "device": "coap-sensor-1",
                 "decoder": "number", "point": "humidity", "unit": "%"}]},
            "opcua": {"enabled": True, "servers": [
                {"device": "plc-1", "endpoint": f"opc.tcp://127.0.0.1:{plc_port}/plc/", "nodes": [
                    {"point": "temperature", "browse_path": "2:PLC/2:Temperature", "unit": "degC"},
                    {"point": "pressure", "browse_path": "2:PLC/2:Pressure", "unit": "bar"},
                    {"point": "running", "browse_path": "2:PLC/2:Running"},
                    {"point": "setpoint", "browse_path": "2:PLC/2:Setpoint", "writable": True,
                     "min": 0, "max": 100}]}]}},
        "rules": {"rule": [{"id": "pump-1-hot", "kind": "above", "device": "pump-1", "point": "temperature",
                            "threshold": 24.0, "hysteresis": 0.5, "cooldown_s": 10.0}]},
        "uplink": {"host": "localhost", "port": cloud_port, "ca_file": str(ca), "cert_file": str(cert),
                   "key_file": str(key), "batch_max_readings": 500},
        "metrics": {"port": 0},
    })


async def _devices(port: int, n: int, rate: float, stop: asyncio.Event) -> None:
    conn = MqttConnection(client_id="demo-devices", host="127.0.0.1", port=port)
    await conn.connect()
    t0 = time.time()
    try:
        while not stop.is_set():
            t = time.time() - t0
            for i in range(n):
                payload = {"ts": int(time.time() * 1000), "values": {
                    "temperature": round(20 + 5 * math.sin(t / 10 + i) + random.gauss(0, 0.1), 3),
                    "pressure": round(1.0 + 0.05 * math.cos(t / 7 + i), 4),
                    "running": (int(t) // 15 + i) % 2 == 0}}
                fut = conn.publish(f"devices/pump-{i + 1}/telemetry", json.dumps(payload).encode(), qos=1)
                fut.add_done_callback(_quiet)  # a publish cut by Ctrl-C is not an error of the demo
            await asyncio.sleep(1 / rate)
    finally:
        await conn.disconnect()


def _quiet(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()


async def _port_open(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _r, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.1)


HEADER = (f"{'time':>6} {'received':>9} {'committed':>10} {'cloud-acked':>12} {'outbox':>7} {'uplink':>7} "
          f"{'cloud got':>10} {'last seq':>9}   mqtt/coap/opcua")


class CloudViewer:
    """Subscribes to the cloud broker as the cloud would, with its own client certificate."""

    def __init__(self) -> None:
        self.readings = 0
        self.batches = 0
        self.last_seq = 0
        self.status = "?"
        self.alerts = 0
        self.asked: dict[str, str] = {}

    QUESTIONS = ("what is the average temperature of pump-1 over the last 2 minutes", "list all pumps",
                 "which alarms are active?", "how many temperature readings did pump-2 send in the last 5 minutes",
                 "how are you", "set pump-1 speed to 40", "is pump-1 temperature 30?")

    def on_message(self, msg) -> None:
        doc = json.loads(msg.payload)
        if "/res/" in msg.topic:  # the operator's ask, answered by the gateway's GLM
            q = self.asked.pop(msg.topic.rsplit("/", 1)[1], "?")
            if doc["ok"]:
                r = doc["result"]
                print(f"       operator asked {q!r}: {r['answer']}  <- {json.dumps(r['call'])} "
                      f"in {r['timings']['total_ms']:.0f} ms", flush=True)
            else:
                print(f"       operator asked {q!r}: {doc['error']['code']}: {doc['error']['message']}", flush=True)
            return
        if msg.topic.endswith("/status"):
            self.status = doc["state"]
            return
        if msg.topic.endswith("/alerts"):
            self.alerts += 1
            print(f"       cloud got alert: {doc['text']} ({doc['state']})", flush=True)
            return
        self.batches += 1
        self.readings += doc["count"]
        self.last_seq = max(self.last_seq, doc["last_seq"])

    async def run(self, port: int, ca: CA, stop: asyncio.Event) -> None:
        from edge_agent import tls
        cert, key = ca.issue("cloud-viewer")
        ctx = tls.client_context(str(ca.cert_path), str(cert), str(key))
        conn = MqttConnection(client_id="cloud-viewer", host="localhost", port=port, ssl_context=ctx,
                              on_message=self.on_message)
        await conn.connect()
        await conn.subscribe([("edge/+/telemetry", 1), ("edge/+/status", 1), ("edge/+/alerts", 1),
                              ("edge/+/res/+", 1)])
        n = 0
        while not stop.is_set():  # an operator asks the gateway a question every few seconds
            try:
                await asyncio.wait_for(stop.wait(), 4.0)
            except (asyncio.TimeoutError, TimeoutError):
                q = self.QUESTIONS[n % len(self.QUESTIONS)]
                rid = f"ask-{n}"
                self.asked[rid] = q
                n += 1
                conn.publish("edge/demo-gw/cmd/ask", json.dumps({"id": rid, "text": q}).encode()).add_done_callback(
                    _quiet)
        await conn.disconnect()


def run_demo(duration: float = 0, devices: int = 5, rate: float = 10.0) -> int:
    if find_mosquitto() is None:
        print(f"edge-agent demo: {INSTALL_HINT}", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="edge-agent-demo-"))
    try:
        return asyncio.run(_demo(work, duration, devices, rate))
    except KeyboardInterrupt:
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def _demo(work: Path, duration: float, devices: int, rate: float) -> int:
    ca = CA(work / "pki", "edge-agent demo CA")
    server_cert, server_key = ca.issue("cloud-broker", server=True)
    gw_cert, gw_key = ca.issue("demo-gw")
    # Mosquitto.start() waits for the port with a blocking loop: keep it off the event loop
    local = await asyncio.to_thread(Mosquitto.local(work / "local").start)
    cloud = await asyncio.to_thread(Mosquitto.mtls(work / "cloud", ca.cert_path, server_cert, server_key).start)
    stop = asyncio.Event()
    coap_port, sensor_port, plc_port = free_udp_port(), free_udp_port(), free_port()
    sims = [asyncio.create_task(coap_sensor("127.0.0.1", sensor_port, max_age=10, interval=1.0, stop=stop)),
            asyncio.create_task(opcua_plc("127.0.0.1", plc_port, interval=0.5, stop=stop))]
    print(f"local broker   mqtt://127.0.0.1:{local.port}  (devices publish devices/<id>/telemetry, QoS 1)")
    print(f"cloud broker   mqtts://localhost:{cloud.port} (mutual TLS; CA and certificates in {work / 'pki'})")
    print(f"coap sensor    coap://127.0.0.1:{sensor_port}/sensors/temp (observed); agent's CoAP server on "
          f"udp {coap_port}: POST /telemetry/<device>")
    print(f"opcua plc      opc.tcp://127.0.0.1:{plc_port}/plc/ (asyncua, 4 monitored items)")
    cfg = demo_config(work / "state", local.port, cloud.port, ca.cert_path, gw_cert, gw_key, coap_port, sensor_port,
                      plc_port)
    await _port_open(plc_port)  # the PLC's server is up before the agent looks for it
    app = App(cfg)
    app.build()
    viewer = CloudViewer()
    tasks = [asyncio.create_task(viewer.run(cloud.port, ca, stop))]
    agent = asyncio.create_task(app.run())
    await asyncio.sleep(0.5)
    tasks.append(asyncio.create_task(_devices(local.port, devices, rate, stop)))
    metrics = f"http://127.0.0.1:{app._metrics_server.server_port}/metrics" if app._metrics_server else "off"
    print(f"agent          gateway {cfg.gateway.id}, store {work / 'state'}")
    print(f"metrics        {metrics}")
    pki = work / "pki"
    tls_args = f"-h localhost -p {cloud.port} --cafile {pki}/ca.pem --cert {pki}/cloud-viewer.pem --key {pki}/cloud-viewer.key"
    print("operator       asks a question every 4 s over MQTT (edge/demo-gw/cmd/ask); Ctrl-C to stop")
    print(f"try            mosquitto_sub {tls_args} -t 'edge/#' -v -C 5")
    print(f"               mosquitto_pub {tls_args} -t edge/demo-gw/cmd/ask -m "
          "'{\"id\":\"q1\",\"text\":\"list all pumps\"}'   (the answer on edge/demo-gw/res/q1)\n")
    t0 = time.monotonic()
    m = app.metrics
    rows = 0
    try:
        while not agent.done() and (duration <= 0 or time.monotonic() - t0 < duration):
            await asyncio.sleep(1.0)
            if rows % 20 == 0:
                print(HEADER, flush=True)
            rows += 1
            print(f"{time.monotonic() - t0:6.0f} "
                  f"{int(app.received()):9d} "
                  f"{int(m.value('edge_agent_readings_committed_total')):10d} "
                  f"{int(m.value('edge_agent_uplink_readings_acked_total')):12d} "
                  f"{app.store.outbox_readings:7d} {('up' if app.uplink and app.uplink.connected else 'down'):>7} "
                  f"{viewer.readings:10d} {viewer.last_seq:9d}   "
                  + "/".join(str(int(m.value("edge_agent_readings_received_total", {"source": s})))
                             for s in ("mqtt", "coap", "opcua")), flush=True)
    except asyncio.CancelledError:
        pass
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        app.request_stop()
        await asyncio.gather(agent, return_exceptions=True)
        await asyncio.gather(*sims, return_exceptions=True)
        local.stop()
        cloud.stop()
    print(f"\nstopped: {int(m.value('edge_agent_readings_committed_total'))} readings committed, "
          f"{int(m.value('edge_agent_glm_requests_total', {'outcome': 'ok'}))} questions answered by the GLM, "
          f"{int(m.value('edge_agent_uplink_readings_acked_total'))} acknowledged by the cloud, "
          f"{app.store.outbox_readings} left in the outbox, {viewer.alerts} alerts at the cloud")
    print("next: edge-agent check --config /etc/edge-agent/config.toml --connect (your own brokers), then the "
          "README's 'Installing the systemd service'")
    return 0
