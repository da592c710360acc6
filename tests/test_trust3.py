"""Trust, round three (issue 25): each test performs an attack an outside review found on the previous main and
asserts the promise it broke."""
from __future__ import annotations

import asyncio
import time

from edge_agent.config import StoreConfig
from edge_agent.metrics import Metrics
from edge_agent.records import Reading
from edge_agent.store import Store


def test_a_log_storm_never_evicts_a_queued_reading(tmp_path):
    """Attack: a small store quota, the cloud away, a burst of warnings. Log lines used to live beside the quota
    (log.ship_quota_bytes, 16 MiB) and the quota evicted readings, never log rows: the storm pushed every queued
    reading out. Now the logs' room is a quarter of the quota at most and is given up first: no reading goes."""
    async def main():
        s = Store(StoreConfig(quota_bytes=2 << 20, outbox_chunk_readings=100), tmp_path, Metrics())
        await s.open()
        line = b'{"level":"warning","msg":"' + b"w" * 400 + b'"}'
        written = 0
        for burst in range(12):
            for _ in range(1500):  # 600 KB of log lines a burst, far above what the quota leaves them
                s.log_line(line)
            await s.write([Reading("pump-1", "t", float(burst * 50 + i), None, time.time_ns(), "good", "mqtt")
                           for i in range(50)])
            written += 50
        await asyncio.sleep(1.2)  # a maintenance pass
        await s.write([Reading("pump-1", "t", 0.0, None, time.time_ns(), "good", "mqtt")])
        written += 1
        assert (s.metrics.value("edge_agent_outbox_evicted_readings_total") or 0) == 0
        assert s.outbox_readings == written
        rows = await s.read_outbox(0, 100_000, 1 << 30)
        assert sum(r.count for r in rows) == written
        assert s.log_bytes <= s.log_room() <= (2 << 20) // 4
        await s.close()
    asyncio.run(main())


def _alice():
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    key = Ed25519PrivateKey.generate()
    pub = base64.b64encode(key.public_key().public_bytes(serialization.Encoding.Raw,
                                                         serialization.PublicFormat.Raw)).decode()
    return key, f"alice={pub}"


def test_a_signed_write_captured_for_one_gateway_does_not_run_on_another():
    """Attack: a client allowed to publish commands to the fleet captures a write the operator signed for gw-a and
    replays it, unchanged, to gw-b. The signature binds the gateway: gw-b refuses it unrun (forbidden), gw-a runs
    it once."""
    import json

    from test_ask_safety import FakeGateway

    from edge_agent import ops
    from edge_agent.config import CommandsConfig
    from edge_agent.ops.signing import sign

    key, entry = _alice()

    def router(gw_id: str, fake: FakeGateway) -> ops.Router:
        m = Metrics()
        return ops.Router(CommandsConfig(allow=["read-only", "write"], operator_keys=[entry]), ops.TABLE,
                          fake.gateway("direct", m), m, gateway_id=gw_id)

    async def main():
        a, b = FakeGateway(), FakeGateway()
        ra, rb = router("gw-a", a), router("gw-b", b)
        body = json.dumps(sign(key, "alice", "write", "w-1", {"device": "plc-1", "point": "setpoint", "value": 42},
                               gateway="gw-a")).encode()
        reply_b = json.loads((await rb.handle("write", body, "mqtt"))[0])
        assert reply_b["ok"] is False and reply_b["error"]["code"] == "forbidden", reply_b
        assert "gw-b" in reply_b["error"]["message"] and b.writes == []
        reply_a = json.loads((await ra.handle("write", body, "mqtt"))[0])
        assert reply_a["ok"] is True, reply_a
        assert a.writes == [("plc-1", "setpoint", 42)]
    asyncio.run(main())


def test_a_retained_command_never_runs_and_an_id_less_change_runs_once(local_broker, cloud_broker, make_agent, pki):
    """Attack: a client allowed to command the gateway publishes a changing request with the retain flag and no
    id. The broker replays it at every subscribe: it ran again at each reconnect. It runs once, when it is first
    delivered live; the replays (retain flag set) are refused unrun (counted `retained`), through reconnects; and an
    id-less changing request the broker delivers twice runs once (its bytes are its dedup key)."""
    import json
    import uuid

    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    from conftest import wait_for

    agent = make_agent(local_broker, cloud_broker, model={"enabled": False},
                       commands={"allow": ["read-only", "logs.level"]}).start()
    agent.wait_ready()
    wait_for(lambda: agent.metric("edge_agent_uplink_connected") == 1, 10, what="uplink")
    cert, key = pki["viewer"]
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"op-{uuid.uuid4().hex[:8]}", protocol=paho.MQTTv311)
    c.tls_set(ca_certs=str(pki["ca"].cert_path), certfile=str(cert), keyfile=str(key))
    c.connect("localhost", cloud_broker.port, 30)
    c.loop_start()
    try:
        body = json.dumps({"level": "debug", "for_s": 60}).encode()
        c.publish("edge/gw-test/cmd/logs.level", body, qos=1, retain=True).wait_for_publish(5)
        ok = 'command="logs.level",outcome="ok"'
        retained = 'command="unknown",outcome="retained"'
        wait_for(lambda: agent.metric("edge_agent_commands_total", ok) == 1, 10, what="the live delivery run")
        for n in (1, 2):  # the broker replays it at each new subscribe: refused each time, never run again
            cloud_broker.stop()
            cloud_broker.start()
            wait_for(lambda: (agent.metric("edge_agent_commands_total", retained) or 0) >= n, 30,
                     what=f"the replay refused after reconnect {n}")
        assert agent.metric("edge_agent_commands_total", ok) == 1
        c.reconnect()
        time.sleep(0.5)
        c.publish("edge/gw-test/cmd/logs.level", b"", qos=1, retain=True).wait_for_publish(5)  # clear it
        body = json.dumps({"level": "debug", "for_s": 61}).encode()
        for _ in range(2):  # the same id-less change delivered twice (as a redelivery would): it runs once
            c.publish("edge/gw-test/cmd/logs.level", body, qos=1).wait_for_publish(5)
        dup = 'command="logs.level",outcome="duplicate"'
        wait_for(lambda: (agent.metric("edge_agent_commands_total", dup) or 0) == 1, 10, what="the second deduplicated")
        wait_for(lambda: agent.metric("edge_agent_commands_total", ok) == 2, 10, what="the first run")
        time.sleep(0.5)
        assert agent.metric("edge_agent_commands_total", ok) == 2
    finally:
        c.loop_stop()
        c.disconnect()
    assert agent.stop() == 0
