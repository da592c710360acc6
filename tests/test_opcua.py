"""OPC UA: asyncua servers as PLCs (real processes), security with pinned certificates, healing, writes."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest

from edge_agent.devkit.brokers import free_port
from edge_agent.devkit.certs import opcua_app_cert
from edge_agent.config import OpcuaConfig, OpcuaNodeConfig, OpcuaServerConfig
from edge_agent.metrics import Metrics
from edge_agent.records import WriteRefused
from edge_agent.southbound.opcua import OpcuaAdapter
from conftest import wait_for


class Plc:
    def __init__(self, port: int, *args: str) -> None:
        self.port, self.args = port, args
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://127.0.0.1:{self.port}/plc/"

    def start(self) -> "Plc":
        self.proc = subprocess.Popen([sys.executable, "-m", "edge_agent.devkit.simulators", "opcua", "--port",
                                      str(self.port), *self.args])
        import socket
        wait_for(lambda: _listening(socket, self.port), 20, what="the PLC's port")
        return self

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


def _listening(socket, port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@pytest.fixture
def plc():
    p = Plc(free_port()).start()
    yield p
    p.kill()


NODES = [{"point": "temperature", "browse_path": "2:PLC/2:Temperature", "unit": "degC", "sampling_ms": 50},
         {"point": "running", "browse_path": "2:PLC/2:Running"},
         {"point": "setpoint", "browse_path": "2:PLC/2:Setpoint", "writable": True, "min": 0, "max": 100},
         {"point": "mode", "browse_path": "2:PLC/2:Mode", "writable": True, "min": 0, "max": 5}]
FAST = {"watchdog_s": 0.5, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0, "request_timeout_s": 2.0}


def test_plc_data_reaches_the_cloud(plc, local_broker, cloud_broker, make_agent, cloud_subscriber):
    sub = cloud_subscriber()
    agent = make_agent(local_broker, cloud_broker, southbound__opcua={"enabled": True, "servers": [
        {"device": "plc-1", "endpoint": plc.endpoint, **FAST, "nodes": NODES}]}).start()
    agent.wait_ready()
    wait_for(lambda: len([r for r in sub.readings() if r["point"] == "temperature"]) >= 5, 20,
             what="PLC readings at the cloud")
    r = next(r for r in sub.readings() if r["point"] == "temperature")
    assert r["device"] == "plc-1" and r["source"] == "opcua" and r["unit"] == "degC" and r["quality"] == "good"
    assert abs(r["ts"] / 1e9 - time.time()) < 60  # the server's source timestamp
    assert agent.metric("edge_agent_ingest_connected", 'source="opcua"') == 1
    assert agent.stop() == 0


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


RESTART_CYCLES = int(os.environ.get("EDGE_AGENT_OPCUA_RESTARTS", "5"))


def test_server_killed_and_restarted_five_times_heals(plc, local_broker, cloud_broker, make_agent):
    agent = make_agent(local_broker, cloud_broker, southbound__opcua={"enabled": True, "servers": [
        {"device": "plc-1", "endpoint": plc.endpoint, **FAST, "nodes": NODES}]}).start()
    agent.wait_ready()
    received = lambda: agent.metric("edge_agent_readings_received_total", 'source="opcua"') or 0  # noqa: E731
    wait_for(lambda: received() >= 10, 20, what="first data")
    rss = []
    for cycle in range(RESTART_CYCLES):
        plc.kill()
        time.sleep(0.5)
        plc.start()
        t0 = time.monotonic()
        before = received()
        wait_for(lambda: received() >= before + 5, 10, what=f"data after restart {cycle + 1}")
        healed = time.monotonic() - t0
        assert healed < 5.0, f"cycle {cycle + 1}: data flowed again only after {healed:.1f} s"
        rss.append(_rss_kb(agent.proc.pid))
    assert agent.metric("edge_agent_adapter_reconnects_total", 'source="opcua"') >= RESTART_CYCLES
    # no growth from cycle to cycle beyond noise (the first cycles warm caches up)
    assert rss[-1] - rss[1] < 4096, f"RSS grew across reconnects: {rss} kB"
    assert agent.stop() == 0


def _adapter(server: dict) -> tuple[OpcuaAdapter, list]:
    got: list = []

    async def sink(readings):
        got.extend(readings)
        return 0

    async def dead(*_a):
        return None
    nodes = [OpcuaNodeConfig(**n) for n in server.pop("nodes")]
    cfg = OpcuaConfig(enabled=True, servers=[OpcuaServerConfig(**server, nodes=nodes)])
    return OpcuaAdapter(cfg, sink, dead, Metrics()), got


async def _read(endpoint: str, path: str):
    from asyncua import Client
    async with Client(endpoint) as c:
        return await (await c.nodes.objects.get_child(path.split("/"))).read_value()


def test_writes_allow_listed_typed_and_ranged(plc):
    async def main():
        a, got = _adapter({"device": "plc-1", "endpoint": plc.endpoint, **FAST, "nodes": list(NODES)})
        task = asyncio.create_task(a.run())
        for _ in range(100):
            if a.sessions["plc-1"].connected:
                break
            await asyncio.sleep(0.05)
        await a.write_point("plc-1", "setpoint", 42.5)
        assert await _read(plc.endpoint, "2:PLC/2:Setpoint") == 42.5
        await a.write_point("plc-1", "mode", 3)
        assert await _read(plc.endpoint, "2:PLC/2:Mode") == 3
        refusals = {
            ("plc-1", "setpoint", 420): "outside the allowed range [0, 100]",
            ("plc-1", "setpoint", True): "takes a finite number",
            ("plc-1", "mode", 2.5): "takes an integer (Int16)",
            ("plc-1", "temperature", 1.0): "not writable (not allow-listed)",
            ("plc-1", "pressure", 1.0): "has no point 'pressure'",
            ("plc-9", "setpoint", 1.0): "no OPC UA server for device 'plc-9'",
        }
        for args, reason in refusals.items():
            with pytest.raises(WriteRefused, match=reason.replace("(", r"\(").replace(")", r"\)")
                               .replace("[", r"\[").replace("]", r"\]")):
                await a.write_point(*args)
        assert await _read(plc.endpoint, "2:PLC/2:Setpoint") == 42.5  # refused writes changed nothing
        await a.stop()
        await task
    asyncio.run(main())


def test_signandencrypt_with_pinned_certificates_and_an_untrusted_client_refused(tmp_path):
    pki = tmp_path / "opcua-pki"
    server_cert, server_key = opcua_app_cert(pki, "plc", "urn:edge-agent:plc")
    client_cert, client_key = opcua_app_cert(pki, "gateway", "urn:edge-agent:client")
    rogue_cert, rogue_key = opcua_app_cert(pki, "rogue", "urn:edge-agent:client")
    p = Plc(free_port(), "--cert", str(server_cert), "--key", str(server_key), "--trust", str(client_cert)).start()
    try:
        async def session(cert, key, policy):
            a, got = _adapter({"device": "plc-1", "endpoint": p.endpoint, **FAST, "security_policy": policy,
                               "security_mode": "SignAndEncrypt", "client_cert_file": str(cert),
                               "client_key_file": str(key), "server_cert_file": str(server_cert),
                               "nodes": [dict(NODES[0])]})
            task = asyncio.create_task(a.run())
            await asyncio.sleep(4)
            await a.stop()
            await task
            errors = sum(s.value for mf in a.metrics.registry.collect() if mf.name == "edge_agent_adapter_errors"
                         for s in mf.samples if s.name.endswith("_total"))
            return got, errors

        for policy in ("Basic256Sha256", "Aes256_Sha256_RsaPss"):
            got, errors = asyncio.run(session(client_cert, client_key, policy))
            assert len(got) >= 5, f"{policy}: no data over the secure channel"
            assert errors == 0
        got, errors = asyncio.run(session(rogue_cert, rogue_key, "Basic256Sha256"))
        assert got == [], "a client the server does not trust must get no data"
        assert errors >= 1
    finally:
        p.kill()
