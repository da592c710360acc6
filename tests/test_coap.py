"""CoAP: libcoap's coap-client posts to the agent; the agent observes a real aiocoap server."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import cbor2
import pytest

from edge_agent.devkit.brokers import free_udp_port
from conftest import wait_for

COAP_CLIENT = shutil.which("coap-client-notls") or shutil.which("coap-client")
needs_client = pytest.mark.skipif(COAP_CLIENT is None, reason="libcoap's coap-client is not installed "
                                                               "(apt-get install libcoap3-bin)")


def coap(method: str, uri: str, payload: bytes | None = None, fmt: str | None = None) -> str:
    args = [COAP_CLIENT, "-m", method, "-B", "5"]
    if fmt:
        args += ["-t", fmt]
    if payload is not None:
        args += ["-f", "-"]
    r = subprocess.run(args + [uri], input=payload, capture_output=True, timeout=20)
    return (r.stdout + r.stderr).decode(errors="replace").strip()


@needs_client
def test_coap_client_posts_reach_the_cloud(local_broker, cloud_broker, make_agent, cloud_subscriber):
    sub = cloud_subscriber()
    port = free_udp_port()
    agent = make_agent(local_broker, cloud_broker, southbound__coap={"enabled": True, "port": port}).start()
    agent.wait_ready()
    wait_for(lambda: agent.metric("edge_agent_ingest_connected", 'source="coap"') == 1, 10, what="coap server")
    base = f"coap://127.0.0.1:{port}/telemetry"
    for i in range(10):
        out = coap("post", f"{base}/sensor-{i % 2}", json.dumps({"values": {"n": i, "temp": 20.5}}).encode(), "50")
        assert "4." not in out and "5." not in out, out  # 2.04 carries no payload: coap-client prints nothing
    out = coap("put", f"{base}/sensor-cbor", cbor2.dumps({"values": {"n": 100}}), "60")
    assert out == "", out
    wait_for(lambda: len(sub.readings()) >= 21, 15, what="coap readings at the cloud")
    by_device = {}
    for r in sub.readings():
        by_device.setdefault(r["device"], []).append(r)
        assert r["source"] == "coap"
    assert set(by_device) == {"sensor-0", "sensor-1", "sensor-cbor"}
    assert sorted(r["value"] for r in sub.readings() if r["point"] == "n") == list(range(10)) + [100]
    # the well-known core lists the telemetry resource
    assert "</telemetry>" in coap("get", f"coap://127.0.0.1:{port}/.well-known/core")
    assert agent.stop() == 0


@needs_client
def test_coap_bad_input_gets_4xx_and_is_counted(local_broker, cloud_broker, make_agent):
    port = free_udp_port()
    agent = make_agent(local_broker, cloud_broker,
                       southbound__coap={"enabled": True, "port": port, "max_payload_bytes": 256}).start()
    agent.wait_ready()
    wait_for(lambda: agent.metric("edge_agent_ingest_connected", 'source="coap"') == 1, 10, what="coap server")
    base = f"coap://127.0.0.1:{port}/telemetry"
    assert coap("post", f"{base}/d1", b'{"values": {"t": NaN}}', "50").startswith("4.00 non_finite")
    assert coap("post", f"{base}/d1", b"{not json", "50").startswith("4.00 bad_json")
    assert coap("post", f"{base}/d1", b"\xff\xff", "60").startswith("4.00 bad_cbor")
    assert coap("post", f"{base}/d1", b"x" * 200, "0").startswith("4.15")
    assert coap("post", f"{base}/a/b", b'{"values": {"t": 1}}', "50").startswith("4.00 bad_device")
    out = coap("post", f"{base}/d1", json.dumps({"values": {"t": "y" * 400}}).encode(), "50")
    assert out.startswith("4.13"), out
    for reason in ("non_finite", "bad_json", "bad_cbor", "bad_content_format", "bad_device", "too_large"):
        assert agent.metric("edge_agent_messages_rejected_total", f'reason="{reason}",source="coap"') == 1, reason
    assert coap("post", f"{base}/d1", b'{"values": {"t": 1}}', "50") == ""  # still serving
    assert agent.metric("edge_agent_readings_committed_total") == 1
    assert agent.stop() == 0


def start_sensor(port: int) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-m", "edge_agent.devkit.simulators", "coap", "--port", str(port),
                          "--max-age", "2", "--interval", "0.2"])
    time.sleep(0.8)
    return p


def test_observed_server_restart_heals(local_broker, cloud_broker, make_agent):
    port = free_udp_port()
    sensor = start_sensor(port)
    try:
        agent = make_agent(local_broker, cloud_broker, southbound__coap={
            "enabled": True, "port": 0, "request_timeout_s": 2.0, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0,
            "observe": [{"uri": f"coap://127.0.0.1:{port}/sensors/temp", "device": "coap-sensor-1",
                         "max_age_margin_s": 0.5},
                        {"uri": f"coap://127.0.0.1:{port}/sensors/humidity", "device": "coap-sensor-1",
                         "decoder": "number", "point": "humidity", "unit": "%"}]}).start()
        agent.wait_ready()
        received = lambda: agent.metric("edge_agent_readings_received_total", 'source="coap"') or 0  # noqa: E731
        wait_for(lambda: received() >= 10, 15, what="notifications")
        for cycle in range(2):
            sensor.terminate()
            sensor.wait(10)
            time.sleep(1.0)
            before = received()
            sensor = start_sensor(port)
            wait_for(lambda: received() >= before + 10, 15, what=f"notifications after restart {cycle + 1}")
        assert agent.metric("edge_agent_adapter_reconnects_total", 'source="coap"') >= 2
        assert agent.stop() == 0
    finally:
        sensor.terminate()
        sensor.wait(10)


class _Endpoint:
    """The CoAP adapter in-process on a loop thread, with an aiocoap client beside it."""

    def __init__(self) -> None:
        import asyncio
        import threading

        from edge_agent.config import CoapConfig
        from edge_agent.metrics import Metrics
        from edge_agent.southbound.coap import CoapAdapter
        self.metrics = Metrics()
        self.committed: list = []
        self.port = free_udp_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def sink(readings):
            self.committed.extend(readings)
            return 0

        async def dead(*_a):
            return None

        async def setup():
            import aiocoap
            self.adapter = CoapAdapter(CoapConfig(enabled=True, port=self.port, max_payload_bytes=1024), sink, dead,
                                       self.metrics)
            self.task = asyncio.ensure_future(self.adapter.run())
            await asyncio.sleep(0.3)
            self.client = await aiocoap.Context.create_client_context()
        self.call(setup())

    def call(self, coro, timeout: float = 20):
        import asyncio
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def post(self, payload: bytes, fmt: int | None, path: str = "dev") -> str:
        from aiocoap import Code, Message

        async def go():
            m = Message(code=Code.POST, uri=f"coap://127.0.0.1:{self.port}/telemetry/{path}", payload=payload)
            if fmt is not None:
                m.opt.content_format = fmt
            return str((await self.client.request(m).response).code)
        return self.call(go())

    def rejected(self) -> float:
        return sum(s.value for mf in self.metrics.registry.collect() if mf.name == "edge_agent_messages_rejected"
                   for s in mf.samples if s.name.endswith("_total"))

    def close(self) -> None:
        async def down():
            await self.adapter.stop()
            await self.task
            await self.client.shutdown()
        self.call(down())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def endpoint():
    e = _Endpoint()
    yield e
    e.close()


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.one_of(st.binary(max_size=1500),
                         st.dictionaries(st.sampled_from(["ts", "values", "value"]),
                                         st.recursive(st.none() | st.booleans() | st.floats() | st.integers()
                                                      | st.text(max_size=20),
                                                      lambda c: st.dictionaries(st.text(max_size=8), c, max_size=3),
                                                      max_leaves=8), max_size=3)
                         .map(lambda d: json.dumps(d).encode())),
       fmt=st.sampled_from([None, 50, 60, 0]),
       path=st.sampled_from(["dev", "dev-2", "a b"]))
def test_fuzz_coap_endpoint_never_crashes_and_counts_every_rejection(endpoint, payload, fmt, path):
    before_rejected, before_ok = endpoint.rejected(), len(endpoint.committed)
    code = endpoint.post(payload, fmt, path)
    assert code in ("2.04 Changed", "4.00 Bad Request", "4.13 Request Entity Too Large",
                    "4.15 Unsupported Content Format"), code
    if code.startswith("2."):
        assert len(endpoint.committed) > before_ok
    else:
        assert endpoint.rejected() == before_rejected + 1


def _oscore_pair(tmp_path, port: int) -> tuple[str, dict]:
    """An OSCORE security context for the agent (server) and one for a device (client)."""
    secret = {"secret_hex": "0102030405060708090a0b0c0d0e0f10", "salt_hex": "9e7ca92223786340"}
    for name, sender, recipient in (("server", "01", "00"), ("client", "00", "01")):
        d = tmp_path / f"oscore-{name}"
        d.mkdir()
        (d / "settings.json").write_text(json.dumps({"sender-id_hex": sender, "recipient-id_hex": recipient,
                                                     "algorithm": "AES-CCM-16-64-128"}))
        (d / "secret.json").write_text(json.dumps(secret))
    server_creds = tmp_path / "server-credentials.json"
    server_creds.write_text(json.dumps({":device-1": {"oscore": {"basedir": str(tmp_path / "oscore-server") + "/"}}}))
    client_creds = {f"coap://127.0.0.1:{port}/*": {"oscore": {"basedir": str(tmp_path / "oscore-client") + "/"}}}
    return str(server_creds), client_creds


def test_oscore_protected_posts_accepted_unprotected_refused(tmp_path):
    import asyncio

    import aiocoap
    from aiocoap import Code, Message

    from edge_agent.config import CoapConfig
    from edge_agent.metrics import Metrics
    from edge_agent.southbound.coap import CoapAdapter

    port = free_udp_port()
    server_creds, client_creds = _oscore_pair(tmp_path, port)

    async def main():
        got = []

        async def sink(readings):
            got.extend(readings)
            return 0

        async def dead(*_a):
            return None
        metrics = Metrics()
        a = CoapAdapter(CoapConfig(enabled=True, port=port, credentials_file=server_creds, require_oscore=True),
                        sink, dead, metrics)
        task = asyncio.create_task(a.run())
        await asyncio.sleep(0.3)
        body = json.dumps({"values": {"t": 1.5}}).encode()
        protected = await aiocoap.Context.create_client_context()
        protected.client_credentials.load_from_dict(client_creds)
        m = Message(code=Code.POST, uri=f"coap://127.0.0.1:{port}/telemetry/dev-1", payload=body, content_format=50)
        assert (await protected.request(m).response).code == Code.CHANGED
        plain = await aiocoap.Context.create_client_context()
        m = Message(code=Code.POST, uri=f"coap://127.0.0.1:{port}/telemetry/dev-1", payload=body, content_format=50)
        assert (await plain.request(m).response).code == Code.UNAUTHORIZED
        assert metrics.value("edge_agent_messages_rejected_total", {"source": "coap", "reason": "unprotected"}) == 1
        assert [(r.device, r.point, r.value) for r in got] == [("dev-1", "t", 1.5)]
        await protected.shutdown()
        await plain.shutdown()
        await a.stop()
        await task
    asyncio.run(main())


def test_bad_credentials_file_is_a_config_error(tmp_path):
    from edge_agent.config import CoapConfig, ConfigError
    from edge_agent.metrics import Metrics
    from edge_agent.southbound.coap import CoapAdapter
    bad = tmp_path / "creds.json"
    bad.write_text("{not json")

    async def nop(*_a):
        return 0
    with pytest.raises(ConfigError, match="southbound.coap.credentials_file"):
        CoapAdapter(CoapConfig(enabled=True, credentials_file=str(bad)), nop, nop, Metrics())


def test_coap_adapter_works_without_the_oscore_extra():
    """aiocoap's OSCORE modules need lakers & co (the `oscore` extra); without credentials configured
    the adapter must not import them (a plain install has them missing)."""
    code = ("import sys; sys.modules['lakers'] = None\n"  # any import of lakers now fails
            "import asyncio\n"
            "from edge_agent.config import CoapConfig\n"
            "from edge_agent.metrics import Metrics\n"
            "from edge_agent.southbound.coap import CoapAdapter\n"
            "async def nop(*a): return 0\n"
            "async def main():\n"
            "    a = CoapAdapter(CoapConfig(enabled=True, port=0), nop, nop, Metrics())\n"
            "    t = asyncio.create_task(a.run()); await asyncio.sleep(0.2); await a.stop(); await t\n"
            "asyncio.run(main()); print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
