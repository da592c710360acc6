"""Trust under attack and faults (issue: nothing acknowledged is lost, nothing unauthorised runs). Each test performs
an attack a review found and asserts the promise."""
from __future__ import annotations

import asyncio
import json
import math
import time

import pytest

from conftest import Publisher, wait_for
from test_commands import CommandClient

from edge_agent.config import MqttIngestConfig, StoreConfig
from edge_agent.metrics import Metrics
from edge_agent.records import Reading, StoreError
from edge_agent.store import Store


def test_a_poison_payload_is_refused_at_decode_and_holds_back_nothing(local_broker, cloud_broker, make_agent):
    """A lone surrogate in a string value decodes as JSON but no UTF-8 can store it: refused with a reason,
    dead-lettered, acknowledged; the good messages around it are committed exactly once."""
    agent = make_agent(local_broker, cloud_broker, model={"enabled": False}).start()
    agent.wait_ready()
    pub = Publisher(local_broker)
    for i in range(20):
        pub.publish(i, device="pump-1")
        if i % 5 == 0:
            pub.publish(100 + i, device="pump-1", payload=b'{"values": {"x": "\\ud800", "y": 1}}')
    wait_for(lambda: len(pub.acked()) == 24, 10, what="every message acknowledged by the broker")
    wait_for(lambda: agent.metric("edge_agent_readings_committed_total") == 40, 10, what="good readings")
    time.sleep(1.0)  # nothing comes again: no redelivery loop
    assert agent.metric("edge_agent_readings_committed_total") == 40
    assert agent.metric("edge_agent_messages_rejected_total", 'reason="bad_value",source="mqtt"') == 4
    assert (agent.metric("edge_agent_component_restarts_total", 'component="mqtt"') or 0) == 0
    pub.close()
    assert agent.stop() == 0


def test_a_batch_the_store_refuses_is_split_and_only_the_culprit_is_set_aside(local_broker):
    """Defence behind the decoder: when the store refuses a batch's data, ingest commits message by message,
    dead-letters the one the store refuses alone, acknowledges all, and commits the rest exactly once."""
    from edge_agent.southbound.mqtt import MqttIngest

    committed: list[Reading] = []
    dead: list[tuple] = []

    async def sink(readings: list[Reading], since: float | None = None) -> int:
        if any(r.device == "poison" for r in readings):
            raise StoreError("commit crashed: UnicodeEncodeError", data=True)
        committed.extend(readings)
        return len(committed)

    async def dead_letter(*args) -> None:
        dead.append(args)

    async def main():
        cfg = MqttIngestConfig(port=local_broker.port, reconnect_min_s=0.1, reconnect_max_s=0.5)
        ingest = MqttIngest(cfg, "gw-split", sink, dead_letter, Metrics())
        task = asyncio.create_task(ingest.run())
        await asyncio.sleep(0.5)
        pub = Publisher(local_broker, client_id="splitter")
        for i in range(30):
            pub.publish(i, device="poison" if i == 13 else f"dev-{i}")
        for _ in range(100):
            if len(pub.acked()) == 30 and len(committed) == 58:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        await ingest.stop()
        await task
        pub.close()
        return ingest

    asyncio.run(main())
    assert len(committed) == 58 and len({(r.device, r.point) for r in committed}) == 58  # each good one once
    assert [d[2] for d in dead] == ["store_refused"] and b'"n": 13' in dead[0][4]


def test_the_store_says_which_failures_are_the_data(tmp_path):
    async def main():
        s = Store(StoreConfig(), tmp_path, Metrics())
        await s.open()
        for bad in ("\ud800", 1 << 70):
            try:
                await s.write([Reading("d", "p", bad, None, time.time_ns(), "good", "test")])
            except StoreError as e:
                assert e.data, e
            else:
                raise AssertionError(f"{bad!r} must be refused")
        assert await s.write([Reading("d", "p", 1.0, None, time.time_ns(), "good", "test")]) == 1
        await s.close()
    asyncio.run(main())


def test_a_rule_that_fails_never_fails_a_committed_batch(local_broker, cloud_broker, make_agent):
    """A z-score rule on 1e200 overflows; the batch was committed and is acknowledged once; the failure is
    counted; the other rules go on."""
    agent = make_agent(local_broker, cloud_broker, model={"enabled": False}, rules={"rule": [
        {"id": "z", "kind": "zscore", "device": "m-1", "point": "v", "threshold": 3, "window": 5, "cooldown_s": 0},
        {"id": "hot", "kind": "above", "device": "m-1", "point": "v", "threshold": 10, "cooldown_s": 0}]}).start()
    agent.wait_ready()
    pub = Publisher(local_broker)
    for i in range(12):
        pub.publish(i, device="m-1", payload=json.dumps({"values": {"v": 1e200 if i % 2 else 1.0}}).encode())
    wait_for(lambda: len(pub.acked()) == 12, 10, what="acknowledged")
    wait_for(lambda: agent.metric("edge_agent_readings_committed_total") == 12, 10, what="committed")
    time.sleep(1.0)
    assert agent.metric("edge_agent_readings_committed_total") == 12  # no redelivery, no duplicates
    assert agent.metric("edge_agent_rule_errors_total", 'rule="z"') >= 1
    assert agent.metric("edge_agent_alerts_total", 'state="firing"') >= 1  # the other rule went on
    pub.close()
    assert agent.stop() == 0


def test_alert_ids_never_repeat_across_acks_and_restarts(tmp_path):
    async def main():
        ids = []
        for round_ in range(3):
            s = Store(StoreConfig(), tmp_path, Metrics())
            await s.open()
            for k in range(4):
                s.alert(json.dumps({"n": round_ * 4 + k}).encode(), "r", "d", "firing")
            await s.write([Reading("d", "p", 1.0, None, time.time_ns(), "good", "test")])  # commits the alerts
            rows = await s.read_alerts(0)
            ids += [i for i, _, _ in rows]
            s.ack_alerts(rows[-1][0])  # the cloud took them all: the table is empty again
            await s.write([Reading("d", "p", 2.0, None, time.time_ns(), "good", "test")])
            assert await s.read_alerts(0) == []
            await s.close()
        assert ids == list(range(1, 13))
    asyncio.run(main())


def test_alerts_fired_and_cleared_across_an_outage_and_a_restart_all_arrive_in_order(
        local_broker, cloud_broker, make_agent, pki):
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion
    cert, key = pki["viewer"]
    got: list[dict] = []
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="alert-order", clean_session=False)
    c.tls_set(ca_certs=str(pki["ca"].cert_path), certfile=str(cert), keyfile=str(key))
    c.on_message = lambda _c, _u, m: got.append(json.loads(m.payload))
    c.reconnect_delay_set(0.1, 0.5)
    c.connect("localhost", cloud_broker.port, 30)
    c.subscribe("edge/+/alerts", 1)
    c.loop_start()
    time.sleep(0.3)
    rules = {"rule": [{"id": "hot", "kind": "above", "device": "b-1", "point": "t", "threshold": 80,
                       "cooldown_s": 0}]}
    agent = make_agent(local_broker, cloud_broker, model={"enabled": False}, rules=rules).start()
    agent.wait_ready()
    pub = Publisher(local_broker)
    values = []

    def cycles(n: int, start: int) -> None:
        for k in range(start, start + n):
            for v in (90 + k, 50):
                values.append(v)
                pub.publish(0, device="b-1", payload=json.dumps({"values": {"t": v}}).encode())
                time.sleep(0.01)

    cycles(10, 0)
    wait_for(lambda: len(got) == 20, 20, what="the first alerts at the cloud")
    cloud_broker.stop()
    cycles(10, 10)
    wait_for(lambda: agent.metric("edge_agent_alerts_total", 'state="cleared"') == 20, 10, what="raised offline")
    assert agent.stop() == 0
    agent.start()
    agent.wait_ready()
    cycles(5, 20)
    wait_for(lambda: agent.metric("edge_agent_alerts_total", 'state="cleared"') == 5, 10, what="after restart")
    cloud_broker.start()
    wait_for(lambda: len(got) >= 50, 30, what="every alert at the cloud")
    time.sleep(0.5)
    # all, in order, at least once: what was in flight when the broker stopped may come again (QoS 1: the agent's
    # alert whose PUBACK was lost, or the broker redelivering to the subscriber whose PUBACK it never read), each
    # recognised by its rule, state and reading timestamp
    seen: set = set()
    unique = [a for a in got if (k := (a["rule"], a["state"], a["ts"])) not in seen and not seen.add(k)]
    assert [a["value"] for a in unique] == values, str(([a["value"] for a in got], values))
    pub.close()
    c.loop_stop()
    c.disconnect()
    assert agent.stop() == 0


def test_a_device_belongs_to_the_source_that_registered_it(tmp_path):
    """One protocol cannot pose as another's device: an MQTT reading for an OPC UA device is refused, counted,
    dead-lettered, and never reaches the rules."""
    def R(device: str, source: str, v: float = 1.0) -> Reading:
        return Reading(device, "setpoint", v, None, time.time_ns(), "good", source)

    async def main():
        s = Store(StoreConfig(), tmp_path, Metrics())
        await s.open()
        await s.write([R("plc-1", "opcua")])
        seq, admitted = await s.commit([R("plc-1", "mqtt", 0.0), R("pump-1", "mqtt"), R("plc-1", "opcua", 2.0)])
        assert [(r.device, r.source) for r in admitted] == [("pump-1", "mqtt"), ("plc-1", "opcua")] and seq == 3
        # a new device claimed by two sources in one batch: the first one's
        seq, admitted = await s.commit([R("new-1", "coap"), R("new-1", "mqtt")])
        assert [r.source for r in admitted] == ["coap"]
        assert s.metrics.value("edge_agent_readings_refused_total", {"reason": "source_mismatch"}) == 2
        dead = await s.query("SELECT source, topic, reason, detail FROM dead_letters ORDER BY id")
        assert dead[0][:3] == ("mqtt", "plc-1/setpoint", "source_mismatch") and "'opcua'" in dead[0][3]
        await s.close()
        s = Store(StoreConfig(), tmp_path, Metrics())  # ownership is kept across restarts
        await s.open()
        _, admitted = await s.commit([R("plc-1", "mqtt")])
        assert admitted == []
        await s.close()
    asyncio.run(main())


def test_rules_added_by_command_can_do_no_more_than_the_sender(local_broker, cloud_broker, make_agent, pki):
    agent = make_agent(local_broker, cloud_broker, model={"enabled": False},
                       commands={"allow": ["read-only", "rules.add", "rules.remove"]},
                       rules={"max_command_rules": 3}).start()
    agent.wait_ready()
    wait_for(lambda: agent.metric("edge_agent_uplink_connected") == 1, 10, what="uplink")
    cli = CommandClient(cloud_broker, pki, "5")
    base = {"kind": "above", "device": "b-1", "point": "t", "threshold": 80}
    try:
        err = cli.call("rules.add", {"rule": {**base, "id": "w", "action_device": "plc-1",
                                              "action_point": "setpoint", "action_value": "0"}})["error"]
        assert err["code"] == "refused" and "write operation allowed" in err["message"]
        err = cli.call("rules.add", {"rule": {**base, "id": "t", "local_topic": "actuators/valve-3/open"}})["error"]
        assert err["code"] == "refused" and "'alarms/'" in err["message"]
        assert cli.call("rules.add", {"rule": {**base, "id": "ok", "local_topic": "alarms/b-1"}})["ok"]
        for bad in (b'{"rule": {"id": "n", "kind": "above", "device": "b", "point": "t", "threshold": NaN}}',
                    b'{"rule": {"id": "n", "kind": "above", "device": "b", "point": "t", "threshold": 1e999}}'):
            reply = cli.call("rules.add", bad)
            assert reply["error"]["code"] == "bad_request", reply
        for i in range(2):
            assert cli.call("rules.add", {"rule": {**base, "id": f"r{i}"}})["ok"]
        err = cli.call("rules.add", {"rule": {**base, "id": "one-too-many"}})["error"]
        assert err["code"] == "refused" and "max_command_rules" in err["message"]
        assert cli.call("rules.add", {"rule": {**base, "id": "r0", "threshold": 70}})["ok"]  # replacing is fine
        assert all(math.isfinite(r["threshold"]) for r in cli.call("rules.list")["result"])
    finally:
        cli.close()
    assert agent.stop() == 0


def test_a_cloud_that_stops_acknowledging_is_declared_dead_and_nothing_is_lost(
        local_broker, cloud_broker, make_agent, cloud_subscriber):
    """The broker keeps the TCP connection but stops answering (SIGSTOP): within publish_timeout_s the link is
    declared dead, counted and reconnected; status says it is down; once the broker answers again, every reading
    arrives."""
    import signal
    agent = make_agent(local_broker, cloud_broker, model={"enabled": False},
                       uplink={"publish_timeout_s": 1.0, "keepalive_s": 60}).start()
    agent.wait_ready()
    wait_for(lambda: agent.metric("edge_agent_uplink_connected") == 1, 10, what="uplink")
    viewer = cloud_subscriber()
    pub = Publisher(local_broker)
    for i in range(10):
        pub.publish(i)
    wait_for(lambda: len(viewer.seqs()) >= 20, 10, what="first readings at the cloud")
    cloud_broker.proc.send_signal(signal.SIGSTOP)
    try:
        for i in range(10, 60):
            pub.publish(i)
        t0 = time.monotonic()
        wait_for(lambda: agent.metric("edge_agent_uplink_errors_total", 'reason="puback_timeout"'), 10,
                 what="the dead link noticed")
        assert time.monotonic() - t0 < 5
        wait_for(lambda: agent.metric("edge_agent_uplink_connected") == 0, 5, what="status says down")
    finally:
        cloud_broker.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: set(range(1, 121)) <= set(viewer.seqs()), 30, what="every reading after the broker answers")
    wait_for(lambda: agent.metric("edge_agent_uplink_connected") == 1, 10, what="reconnected")
    pub.close()
    viewer.close()
    assert agent.stop() == 0


def test_uplink_server_hostname_is_the_name_verified(local_broker, cloud_broker, make_agent):
    """Connecting by address, the name to verify is uplink.server_hostname: a name the broker's certificate does
    not carry is refused (tls_verification), the right one connects."""
    bad = make_agent(local_broker, cloud_broker, model={"enabled": False},
                     uplink={"host": "127.0.0.1", "server_hostname": "cloud.example.invalid"}).start()
    bad.wait_ready()
    wait_for(lambda: (bad.metric("edge_agent_uplink_errors_total", 'reason="tls_verification"') or 0) >= 1, 10,
             what="refused")
    assert bad.metric("edge_agent_uplink_connected") == 0
    assert bad.stop() == 0
    good = make_agent(local_broker, cloud_broker, model={"enabled": False},
                      uplink={"host": "127.0.0.1", "server_hostname": "localhost"}).start()
    good.wait_ready()
    wait_for(lambda: good.metric("edge_agent_uplink_connected") == 1, 10, what="connected")
    assert good.stop() == 0


def test_an_expired_certificate_disables_only_the_uplink_until_it_is_replaced(
        local_broker, cloud_broker, make_agent, pki, tmp_path, cloud_subscriber):
    import datetime as dt
    import os
    import shutil
    now = dt.datetime.now(dt.timezone.utc)
    old_cert, old_key = pki["ca"].issue("gw-old", not_before=now - dt.timedelta(days=10),
                                        not_after=now - dt.timedelta(days=1))
    cert, key = tmp_path / "gw.pem", tmp_path / "gw.key"
    shutil.copy(old_cert, cert)
    shutil.copy(old_key, key)
    os.chmod(key, 0o600)
    agent = make_agent(local_broker, cloud_broker, model={"enabled": False},
                       uplink={"cert_file": str(cert), "key_file": str(key)}).start()
    agent.wait_ready()
    viewer = cloud_subscriber()
    pub = Publisher(local_broker)
    for i in range(10):
        pub.publish(i)
    wait_for(lambda: agent.metric("edge_agent_readings_committed_total") == 20, 10, what="ingest goes on")
    assert agent.proc.poll() is None
    assert agent.metric("edge_agent_uplink_errors_total", 'reason="tls_config"') >= 1
    assert "uplink disabled until its certificate files are fixed" in agent.log() and "expired" in agent.log()
    good_cert, good_key = pki["gateway"]
    shutil.copy(good_key, key)
    shutil.copy(good_cert, cert)
    wait_for(lambda: set(range(1, 21)) <= set(viewer.seqs()), 30, what="the backlog at the cloud once replaced")
    assert 'msg="uplink certificate files loaded"' in agent.log()
    pub.close()
    viewer.close()
    assert agent.stop() == 0


def test_the_cloud_acl_confines_each_gateway_and_replies_stay_under_the_prefix(
        local_broker, cloud_broker, make_agent, pki):
    """The shipped ACL (systemd/mosquitto-cloud.acl) runs on the tests' cloud broker: another gateway's certificate
    can neither command this one nor read its telemetry; a request whose MQTT 5 response topic lies outside the
    allowed prefixes is refused unrun and counted."""
    import queue
    import uuid

    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    agent = make_agent(local_broker, cloud_broker, model={"enabled": False}).start()
    agent.wait_ready()
    wait_for(lambda: agent.metric("edge_agent_uplink_connected") == 1, 10, what="uplink")
    cert, key = pki["ca"].issue("gw-other")
    got: "queue.Queue[str]" = queue.Queue()
    other = paho.Client(CallbackAPIVersion.VERSION2, client_id="gw-other", protocol=paho.MQTTv5)
    other.tls_set(ca_certs=str(pki["ca"].cert_path), certfile=str(cert), keyfile=str(key))
    other.on_message = lambda _c, _u, m: got.put(m.topic)
    other.connect("localhost", cloud_broker.port, 30)
    other.loop_start()
    try:
        other.subscribe([("edge/gw-test/#", 1), ("edge/gw-other/res/#", 1)])
        time.sleep(0.3)
        pub = Publisher(local_broker)
        for i in range(5):
            pub.publish(i)
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "edge/gw-other/res/x"
        other.publish("edge/gw-test/cmd/ping", b'{"id": "p1"}', qos=1, properties=props)
        wait_for(lambda: agent.metric("edge_agent_uplink_readings_acked_total") == 10, 10, what="telemetry")
        time.sleep(0.5)
        assert got.empty(), "another gateway read this gateway's topics or got a reply"
        assert (agent.metric("edge_agent_commands_total", 'command="ping",outcome="ok"') or 0) == 0
        pub.close()
    finally:
        other.loop_stop()
        other.disconnect()
    # the operator (the cloud side's identity) is allowed to command; its reply topic is still confined
    cli = CommandClient(cloud_broker, pki, "5")
    try:
        assert cli.call("ping")["ok"]
        for bad in ("edge/gw-test/telemetry", "edge/gw-other/cmd/write", "cloud/anything"):
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = bad
            props.CorrelationData = uuid.uuid4().bytes
            cli.c.publish("edge/gw-test/cmd/ping", b"{}", qos=1, properties=props)
        wait_for(lambda: agent.metric("edge_agent_commands_total", 'command="unknown",outcome="bad_reply_topic"')
                 == 3, 10, what="refused")
        assert agent.metric("edge_agent_commands_total", 'command="ping",outcome="ok"') == 1
    finally:
        cli.close()
    assert agent.stop() == 0


def test_changing_operations_need_an_operators_signature_when_keys_are_configured(
        local_broker, cloud_broker, make_agent, pki, tmp_path):
    import base64
    import os
    import subprocess
    import sys
    from pathlib import Path

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from edge_agent.ops.signing import sign

    alice, mallory = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    pub = base64.b64encode(alice.public_key().public_bytes(serialization.Encoding.Raw,
                                                           serialization.PublicFormat.Raw)).decode()
    agent = make_agent(local_broker, cloud_broker, commands={
        "allow": ["read-only", "write", "rules.add", "rules.remove"], "operator_keys": [f"alice={pub}"]}).start()
    agent.wait_ready()
    wait_for(lambda: agent.metric("edge_agent_uplink_connected") == 1, 10, what="uplink")
    rule = {"rule": {"id": "hot", "kind": "above", "device": "b-1", "point": "t", "threshold": 80}}
    cli = CommandClient(cloud_broker, pki, "5")
    try:
        assert cli.call("ping")["ok"]  # read-only: no signature needed
        err = cli.call("rules.add", rule)["error"]
        assert err["code"] == "forbidden" and "requires an operator's signature" in err["message"]
        ok = cli.call("rules.add", json.dumps(sign(alice, "alice", "rules.add", "r-1", rule, gateway="gw-test")).encode(),
                      rid="r-1")
        assert ok["ok"], ok
        for body, why in (
                (sign(mallory, "mallory", "rules.add", "r-2", rule, gateway="gw-test"), "unknown key 'mallory'"),
                (sign(mallory, "alice", "rules.add", "r-3", rule, gateway="gw-test"), "does not verify"),
                (sign(alice, "alice", "rules.add", "r-4", rule, gateway="gw-test", ts=int((time.time() - 600) * 1000)),
                 "replayed"),
                ({**sign(alice, "alice", "rules.add", "r-5", rule, gateway="gw-test"),
                  "rule": {**rule["rule"], "threshold": 1}},
                 "does not verify"),  # a changed argument
                ({**sign(alice, "alice", "rules.add", "r-6", rule, gateway="gw-test"), "id": "r-7"},
                 "does not verify"),  # another id
                (sign(alice, "alice", "rules.remove", "r-8", rule, gateway="gw-test"),
                 "does not verify")):  # made for another op
            reply = cli.call("rules.add", json.dumps(body).encode(), rid=body["id"])
            assert reply["error"]["code"] in ("forbidden", "bad_request") and why in reply["error"]["message"], reply
        # the CLI makes the request an operator publishes
        key = tmp_path / "alice.pem"
        key.write_bytes(alice.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        out = subprocess.run([sys.executable, "-m", "edge_agent", "sign", "rules.remove", "rule_id=hot",
                              "--key", str(key), "--key-id", "alice", "--id", "r-9", "--gateway", "gw-test"],
                             capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode == 0, out.stderr
        assert cli.call("rules.remove", out.stdout.encode(), rid="r-9")["result"] == {"removed": "hot"}
        # ask: a question whose call would write needs a signed ask too
        pub = Publisher(local_broker)
        pub.publish(0, device="pump-1", payload=b'{"values": {"speed": 30}}')
        wait_for(lambda: agent.metric("edge_agent_readings_committed_total") == 1, 10, what="pump-1 registered")
        pub.close()
        wait_for(lambda: cli.call("status")["result"]["model"]["loaded"], 20, what="model")
        err = cli.call("ask", {"text": "set pump-1 speed to 40"})["error"]
        assert err["code"] == "forbidden" and "signature" in err["message"] and err["call"]["tool"] == "write_point"
    finally:
        cli.close()
    log = agent.log()
    assert 'msg="rule added" who=key:alice' in log and 'msg="rule removed" who=key:alice' in log
    assert "trust the cloud broker's ACL alone" not in log
    assert agent.stop() == 0


def test_writes_never_replay_after_kill_9_and_commands_sent_while_down_run_unless_expired(
        local_broker, cloud_broker, make_agent, pki):
    """Request ids of changing operations are committed before they run: after kill -9 a resent earlier write is
    answered from the store, not run again (the PLC keeps the newer value). The command session persists: a QoS 1
    command sent while the agent is down runs when it is back; one carrying a ts older than commands.max_age_s is
    answered 'expired' and not run."""
    import asyncio

    from edge_agent.devkit.brokers import free_port
    from test_opcua import FAST, NODES, Plc, _read

    plc = Plc(free_port()).start()
    try:
        agent = make_agent(local_broker, cloud_broker, model={"enabled": False},
                           commands={"allow": ["read-only", "write"], "max_age_s": 5},
                           southbound__opcua={"enabled": True, "servers": [
                               {"device": "plc-1", "endpoint": plc.endpoint, **FAST, "nodes": NODES}]}).start()
        agent.wait_ready()
        wait_for(lambda: agent.metric("edge_agent_ingest_connected", 'source="opcua"') == 1, 20, what="opcua")
        wait_for(lambda: agent.metric("edge_agent_uplink_connected") == 1, 10, what="uplink")
        cli = CommandClient(cloud_broker, pki, "3.1.1")
        try:
            w = {"device": "plc-1", "point": "setpoint"}
            first = cli.call("write", {**w, "value": 10}, rid="w-10")
            assert first["ok"]
            assert cli.call("write", {**w, "value": 20}, rid="w-20")["ok"]
            agent.kill9()
            agent.start()
            agent.wait_ready()
            wait_for(lambda: agent.metric("edge_agent_ingest_connected", 'source="opcua"') == 1, 20, what="opcua")
            wait_for(lambda: agent.metric("edge_agent_uplink_connected") == 1, 10, what="uplink")
            again = cli.call("write", {**w, "value": 10}, rid="w-10")  # the cloud resends an old write
            assert again == first
            assert asyncio.run(_read(plc.endpoint, "2:PLC/2:Setpoint")) == 20
            assert (agent.metric("edge_agent_commands_total", 'command="write",outcome="ok"') or 0) == 0
            # while the agent is down: one command in time, one that will be too old when it arrives
            assert agent.stop() == 0
            cli.c.publish("edge/gw-test/cmd/write", json.dumps({**w, "value": 30, "id": "w-30"}).encode(), qos=1)
            old = int((time.time() - 60) * 1000)
            cli.c.publish("edge/gw-test/cmd/write", json.dumps({**w, "value": 40, "id": "w-40", "ts": old}).encode(),
                          qos=1)
            time.sleep(0.5)
            agent.start()
            agent.wait_ready()
            replies = {}
            deadline = time.monotonic() + 20
            while len(replies) < 2 and time.monotonic() < deadline:
                try:
                    topic, _, reply = cli.replies.get(timeout=0.2)
                except Exception:  # noqa: BLE001 - queue.Empty
                    continue
                replies[topic.rsplit("/", 1)[1]] = reply
            assert replies["w-30"]["ok"], replies
            assert replies["w-40"]["error"]["code"] == "expired", replies
            assert asyncio.run(_read(plc.endpoint, "2:PLC/2:Setpoint")) == 30
        finally:
            cli.close()
        assert agent.stop() == 0
    finally:
        plc.kill()


def test_one_client_cannot_fill_the_registry_for_good(tmp_path):
    """Caps per device (points) and per source (new devices a minute); silent series expire; refusals counted per
    reason; the devices that behave go on."""
    def R(device: str, point: str, source: str = "mqtt") -> Reading:
        return Reading(device, point, 1.0, None, time.time_ns(), "good", source)

    async def main():
        cfg = StoreConfig(max_points_per_device=5, new_devices_per_minute=10, series_expiry_s=1)
        s = Store(cfg, tmp_path, Metrics())
        await s.open()
        _, ok = await s.commit([R("good-1", "t")])
        # one message with hundreds of points for one device: only the first 5 series register
        _, admitted = await s.commit([R("spammer-1", f"p{i}") for i in range(300)] + [R("good-1", "t")])
        assert len(admitted) == 6 and admitted[-1].device == "good-1"
        # a flood of new devices from one source: 10 a minute (good-1 and spammer-1 took 2 of this minute's)
        _, admitted = await s.commit([R(f"fake-{i}", "x") for i in range(100)])
        assert len(admitted) == 8
        _, admitted = await s.commit([R("coap-1", "x", "coap"), R("good-1", "t")])  # other sources, known ones: fine
        assert len(admitted) == 2
        v = s.metrics.value
        assert v("edge_agent_readings_refused_total", {"reason": "device_points_full"}) == 295
        assert v("edge_agent_readings_refused_total", {"reason": "new_device_rate"}) == 92
        # silence: the spammer's series expire (the maintenance pass runs each second while idle)
        for _ in range(60):
            await asyncio.sleep(0.1)
            if v("edge_agent_registry_expired_total", {"kind": "series"}) >= 15:
                break
        assert v("edge_agent_registry_expired_total", {"kind": "series"}) >= 15
        devices = [d for (d,) in await s.query("SELECT device FROM devices")]
        assert "spammer-1" not in devices
        await s.close()

    asyncio.run(main())


def _can_mount_tmpfs() -> bool:
    import os
    import subprocess
    import tempfile
    if os.geteuid() != 0:
        return False
    d = tempfile.mkdtemp()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", d], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", d], capture_output=True)
    os.rmdir(d)
    return ok


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs root and tmpfs mounts to make a small filesystem")
def test_a_small_disk_is_never_filled_and_ingest_never_stalls(local_broker, cloud_broker, make_agent, tmp_path,
                                                              cloud_subscriber):
    """The state directory on an 8 MiB filesystem, quota 1 GiB (more than the disk), the cloud away, 80,000
    readings (about 20 MB with the outbox's copy): the effective quota is what the disk has room for, so the disk never fills ("database or disk is
    full" never happens); at the quota the oldest outbox rows are evicted (store.at_quota = evict, the default),
    counted; ingest acknowledges every message, nothing crashes; when the cloud returns, the rest arrives."""
    import subprocess
    state = tmp_path / "small"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(state)], check=True)
    try:
        viewer = cloud_subscriber()  # a persistent session: it gets what was published while it was away
        cloud_broker.stop()
        agent = make_agent(local_broker, cloud_broker, model={"enabled": False}, gateway={"state_dir": str(state)},
                           store={"disk_reserve_bytes": 512 << 10}).start()
        agent.wait_ready()
        pub = Publisher(local_broker)
        n = 40_000
        for i in range(n):
            pub.publish(i)
        wait_for(lambda: agent.metric("edge_agent_readings_committed_total") == 2 * n, 120, what="all committed")
        assert len(pub.acked()) == n and agent.proc.poll() is None
        evicted = agent.metric("edge_agent_outbox_evicted_readings_total")
        assert evicted > 0 and (state / "edge-agent.reserve").exists()
        assert (agent.metric("edge_agent_component_restarts_total", 'component="mqtt"') or 0) == 0
        cloud_broker.start()
        wait_for(lambda: agent.metric("edge_agent_outbox_readings") == 0, 60, what="the outbox drained")
        wait_for(lambda: len(viewer.readings()) >= 2 * n - evicted, 60, what="the rest at the cloud")
        log = agent.log()
        assert "database or disk is full" not in log and "disk quota reached: evicted" in log
        pub.close()
        viewer.close()
        assert agent.stop() == 0
    finally:
        subprocess.run(["umount", "-l", str(state)], capture_output=True)


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs root and tmpfs mounts to make a small filesystem")
def test_with_backpressure_a_full_store_holds_readings_with_their_source_and_loses_none(
        local_broker, cloud_broker, make_agent, tmp_path, cloud_subscriber):
    """store.at_quota = backpressure, the state on an 8 MiB filesystem, the cloud away: at the quota ingest holds
    its messages unacknowledged (the broker keeps the rest), nothing is evicted, nothing crashes; when the cloud
    returns, room frees and every message arrives."""
    import subprocess
    state = tmp_path / "small"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(state)], check=True)
    try:
        viewer = cloud_subscriber()
        cloud_broker.stop()
        agent = make_agent(local_broker, cloud_broker, model={"enabled": False}, gateway={"state_dir": str(state)},
                           store={"at_quota": "backpressure", "disk_reserve_bytes": 512 << 10}).start()
        agent.wait_ready()
        pub = Publisher(local_broker)
        n = 40_000
        for i in range(n):
            pub.publish(i)
        wait_for(lambda: agent.metric("edge_agent_store_full") == 1, 60, what="the store at its quota")
        assert agent.metric("edge_agent_readings_committed_total") < 2 * n
        cloud_broker.start()
        wait_for(lambda: set(range(n)) <= {r["value"] for r in viewer.readings() if r["point"] == "n"}, 180,
                 what="every message at the cloud")
        assert len(pub.acked()) == n and agent.proc.poll() is None
        assert (agent.metric("edge_agent_outbox_evicted_readings_total") or 0) == 0
        assert (agent.metric("edge_agent_component_restarts_total", 'component="mqtt"') or 0) == 0
        assert "database or disk is full" not in agent.log()
        pub.close()
        viewer.close()
        assert agent.stop() == 0
    finally:
        subprocess.run(["umount", "-l", str(state)], capture_output=True)


def test_at_the_quota_backpressure_holds_readings_back_until_acknowledgements_free_room(tmp_path):
    """store.at_quota = backpressure: at the quota a write is refused (full, not data: its source keeps it), the
    reserve file stays; once the cloud's acknowledgements free room, writes are taken again."""
    async def main():
        s = Store(StoreConfig(at_quota="backpressure", quota_bytes=2 << 20), tmp_path, Metrics())
        await s.open()
        pad = "x" * 1000
        refused = None
        for _ in range(20):
            try:
                await s.write([Reading("d", f"p{i % 2}", pad if i % 2 else float(i), None, time.time_ns(), "good",
                                       "mqtt") for i in range(200)])
            except StoreError as e:
                refused = e
                break
        assert refused is not None and refused.full and not refused.data, refused
        s.ack_outbox(s.next_seq - 1)
        for _ in range(30):
            await asyncio.sleep(0.1)
            try:
                await s.write([Reading("d", "p0", 1.0, None, time.time_ns(), "good", "mqtt")])
                break
            except StoreError:
                continue
        else:
            raise AssertionError("the store never took readings again")
        assert s.metrics.value("edge_agent_readings_refused_total", {"reason": "store_full"}) >= 200
        await s.close()
    asyncio.run(main())
