"""Real peers for the tests: Mosquitto processes on free loopback ports, certificates made here with
`cryptography`, the agent as a real process (`python -m edge_agent run`)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.devkit.brokers import Mosquitto, free_port
from edge_agent.devkit.certs import CA
from edge_agent.config import to_toml
from edge_agent.store.encoding import decode


def wait_for(pred, timeout: float = 20.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    ca = CA(tmp_path_factory.mktemp("pki"))
    server = ca.issue("cloud-broker", server=True)
    gateway = ca.issue("gw-test")
    viewer = ca.issue("cloud-viewer")
    return {"ca": ca, "server": server, "gateway": gateway, "viewer": viewer}


@pytest.fixture
def local_broker(tmp_path):
    b = Mosquitto.local(tmp_path / "local-broker").start()
    yield b
    b.stop()


@pytest.fixture
def cloud_broker(tmp_path, pki):
    cert, key = pki["server"]
    b = Mosquitto.mtls(tmp_path / "cloud-broker", pki["ca"].cert_path, cert, key).start()
    yield b
    b.stop()


def agent_config(tmp_path: Path, local_port: int, cloud_port: int, pki: dict, **sections) -> dict:
    cert, key = pki["gateway"]
    cfg = {
        "gateway": {"id": "gw-test", "state_dir": str(tmp_path / "state")},
        "log": {"level": "info", "format": "text"},
        "southbound": {"mqtt": {"port": local_port, "reconnect_min_s": 0.1, "reconnect_max_s": 1.0,
                                "topics": [{"filter": "devices/+/telemetry", "device": "devices/{device}/telemetry",
                                            "ts_unit": "ms"}]}},
        "uplink": {"host": "localhost", "port": cloud_port, "ca_file": str(pki["ca"].cert_path),
                   "cert_file": str(cert), "key_file": str(key), "reconnect_min_s": 0.1, "reconnect_max_s": 1.0},
        "metrics": {"port": free_port()},
        "supervisor": {"stop_timeout_s": 10.0},
    }
    for section, values in sections.items():
        target = cfg
        parts = section.split("__")
        for p in parts[:-1]:
            target = target.setdefault(p, {})
        target.setdefault(parts[-1], {}).update(values)
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(to_toml(cfg))
    return path


class Agent:
    """The agent as a real process."""

    def __init__(self, config_path: Path, log_path: Path, metrics_port: int, env: dict | None = None) -> None:
        self.config_path, self.log_path, self.metrics_port = config_path, log_path, metrics_port
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Agent":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(self.config_path)],
                                     stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        return self

    def wait_ready(self, timeout: float = 20.0) -> "Agent":
        # ready = subscribed to the local broker (its persistent session exists from then on)
        wait_for(lambda: self.proc.poll() is not None
                 or self.metric("edge_agent_ingest_connected", 'source="mqtt"') == 1, timeout, what="agent ingest")
        assert self.proc.poll() is None, f"agent exited: {self.log()}"
        return self

    def metrics_text(self) -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as r:
                return r.read().decode()
        except OSError:
            return None

    def metric(self, name: str, labels: str = "") -> float | None:
        text = self.metrics_text()
        if text is None:
            return None
        pat = re.compile(rf"^{re.escape(name)}{re.escape('{' + labels + '}') if labels else ''} (\S+)$", re.M)
        m = pat.search(text)
        return float(m.group(1)) if m else (0.0 if text else None)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._log.close()

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"agent did not stop within {timeout}s: {self.log()[-2000:]}")
        self._log.close()
        return rc

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def make_agent(tmp_path, pki):
    agents: list[Agent] = []

    def make(local: Mosquitto, cloud: Mosquitto, env: dict | None = None, **sections) -> Agent:
        cfg = agent_config(tmp_path, local.port, cloud.port, pki, **sections)
        path = write_config(tmp_path / f"agent{len(agents)}.toml", cfg)
        a = Agent(path, tmp_path / "agent.log", cfg["metrics"]["port"], env)
        agents.append(a)
        return a

    yield make
    for a in agents:
        if a.proc is not None and a.proc.poll() is None:
            a.proc.kill()
            a.proc.wait()
        if getattr(a, "_log", None) is not None:
            a._log.close()


class CloudSubscriber:
    """The cloud side: a persistent-session subscriber with its own client certificate (paho thread)."""

    def __init__(self, broker: Mosquitto, pki: dict, client_id: str = "cloud-viewer") -> None:
        cert, key = pki["viewer"]
        self.batches: list[dict] = []
        self.arrivals: list[float] = []  # monotonic time of each telemetry batch
        self.payload_bytes = 0  # of the telemetry messages received
        self.topics: set[str] = set()
        self.status: list[dict] = []
        self.lock = threading.Lock()
        self.connected = threading.Event()
        c = self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False,
                                      protocol=paho.MQTTv311)
        c.tls_set(ca_certs=str(pki["ca"].cert_path), certfile=str(cert), keyfile=str(key))
        c.reconnect_delay_set(0.1, 0.5)
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        c.connect("localhost", broker.port, 30)
        c.loop_start()
        wait_for(self.connected.is_set, 10, what="cloud subscriber connection")

    def _on_connect(self, client, _u, _f, reason, _p):
        if not reason.is_failure:
            client.subscribe([("edge/+/telemetry", 1), ("edge/+/telemetry/+", 1), ("edge/+/status", 1)])
            time.sleep(0.05)
            self.connected.set()

    def _on_message(self, _c, _u, msg):
        doc = json.loads(msg.payload) if msg.topic.endswith("/status") else decode(msg.payload)
        with self.lock:
            if not msg.topic.endswith("/status"):
                self.payload_bytes += len(msg.payload)
                self.topics.add(msg.topic)
            (self.status if msg.topic.endswith("/status") else self.batches).append(doc)
            if not msg.topic.endswith("/status"):
                self.arrivals.append(time.monotonic())

    def readings(self) -> list[dict]:
        with self.lock:
            return [r for b in self.batches for r in b["readings"]]

    def seqs(self) -> list[int]:
        return [r["seq"] for r in self.readings()]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def cloud_subscriber(cloud_broker, pki):
    subs: list[CloudSubscriber] = []

    def make() -> CloudSubscriber:
        s = CloudSubscriber(cloud_broker, pki)
        subs.append(s)
        return s

    yield make
    for s in subs:
        s.close()


class Publisher:
    """A device at QoS 1 (paho thread); `acked()` is the set of message numbers the broker PUBACKed.

    No callback and no lock of ours: paho calls on_publish holding its own mutex, and a lock taken
    both there and around publish() deadlocks."""

    def __init__(self, broker: Mosquitto, client_id: str = "test-device") -> None:
        self.sent: list[tuple[int, paho.MQTTMessageInfo]] = []
        c = self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311)
        c.max_inflight_messages_set(100)
        c.connect("127.0.0.1", broker.port, 30)
        c.loop_start()

    def publish(self, n: int, device: str = "dev-1", topic: str | None = None, payload: bytes | None = None):
        body = payload if payload is not None else json.dumps(
            {"ts": int(time.time() * 1000), "values": {"n": n, "temperature": 20.5}}).encode()
        info = self.client.publish(topic or f"devices/{device}/telemetry", body, qos=1)
        self.sent.append((n, info))
        return info

    def acked(self) -> set[int]:
        return {n for n, info in self.sent if info.is_published()}

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
