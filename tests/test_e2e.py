"""End to end through real brokers: device → local Mosquitto → agent → mTLS cloud Mosquitto."""
from __future__ import annotations

import json
import ssl
import time

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from conftest import Publisher, wait_for


def test_readings_reach_cloud_in_order_with_contiguous_seqs(local_broker, cloud_broker, make_agent, cloud_subscriber):
    sub = cloud_subscriber()
    agent = make_agent(local_broker, cloud_broker).start().wait_ready()
    pub = Publisher(local_broker)
    n = 500
    for i in range(n):
        pub.publish(i, device=f"dev-{i % 7}")
    wait_for(lambda: len(sub.readings()) >= 2 * n, 30, what="all readings at the cloud")
    readings = sub.readings()
    seqs = [r["seq"] for r in readings]
    assert seqs == list(range(1, 2 * n + 1)), "seqs must arrive in order, contiguous, from 1"
    ns = [r["value"] for r in readings if r["point"] == "n"]
    assert sorted(ns) == list(range(n))
    for b in sub.batches:  # every batch carries its first and last seq and the gateway
        assert b["gateway"] == "gw-test"
        assert b["first_seq"] == b["readings"][0]["seq"] and b["last_seq"] == b["readings"][-1]["seq"]
        assert b["count"] == len(b["readings"])
    assert wait_for(lambda: sub.status and sub.status[-1]["state"] == "online", 5, what="online status")
    wait_for(lambda: agent.metric("edge_agent_outbox_readings") == 0, 10, what="empty outbox")
    assert agent.metric("edge_agent_readings_committed_total") == 2 * n
    assert agent.metric("edge_agent_uplink_readings_acked_total") == 2 * n
    assert agent.metric("edge_agent_uplink_connected") == 1
    pub.close()
    assert agent.stop() == 0
    wait_for(lambda: sub.status[-1]["state"] == "offline", 5, what="offline status on clean stop")


def test_messages_that_arrive_within_the_delay_share_one_commit_and_one_uplink_batch_acked_after_it(
        local_broker, cloud_broker, make_agent, cloud_subscriber):
    """Ingest gathers messages until the first has waited store.batch_max_delay_ms (nothing is committed, so nothing
    acknowledged, before), then one commit, and the cloud gets the window's readings in one batch."""
    sub = cloud_subscriber()
    agent = make_agent(local_broker, cloud_broker, store={"batch_max_delay_ms": 1500}).start().wait_ready()
    pub = Publisher(local_broker)
    pub.publish(0, device="warm")  # registers the device and the series first
    wait_for(lambda: len(sub.readings()) >= 2, 20, what="the first reading at the cloud")
    commits = agent.metric("edge_agent_store_commits_total")
    batches = len(sub.batches)
    t0 = time.monotonic()
    for i in range(1, 21):
        pub.publish(i, device="warm")
    time.sleep(0.7)
    assert agent.metric("edge_agent_store_commits_total") == commits and len(sub.readings()) == 2  # gathering
    wait_for(lambda: len(sub.readings()) >= 42, 10, what="the window at the cloud")
    assert time.monotonic() - t0 >= 1.4  # the first message's wait, not less
    assert agent.metric("edge_agent_store_commits_total") - commits <= 2  # the window's, and perhaps a pass
    assert len(sub.batches) - batches == 1
    pub.close()
    assert agent.stop() == 0


def test_devices_are_registered(local_broker, cloud_broker, make_agent, tmp_path):
    import sqlite3
    agent = make_agent(local_broker, cloud_broker).start().wait_ready()
    pub = Publisher(local_broker)
    for i in range(3):
        pub.publish(i, device=f"pump-{i}")
    wait_for(lambda: agent.metric("edge_agent_readings_committed_total") == 6, 10, what="commits")
    pub.close()
    assert agent.stop() == 0
    db = sqlite3.connect(tmp_path / "state" / "edge-agent.db")
    devices = db.execute("SELECT device, source FROM devices ORDER BY device").fetchall()
    assert devices == [("pump-0", "mqtt"), ("pump-1", "mqtt"), ("pump-2", "mqtt")]
    points = db.execute("SELECT point FROM points WHERE device='pump-1' ORDER BY point").fetchall()
    assert points == [("n",), ("temperature",)]
    assert "device registered" in agent.log()


def test_restart_resumes_seq(local_broker, cloud_broker, make_agent, cloud_subscriber):
    sub = cloud_subscriber()
    agent = make_agent(local_broker, cloud_broker).start().wait_ready()
    pub = Publisher(local_broker)
    for i in range(50):
        pub.publish(i)
    wait_for(lambda: len(sub.readings()) >= 100, 15, what="first run readings")
    assert agent.stop() == 0
    agent.start().wait_ready()
    for i in range(50, 100):
        pub.publish(i)
    wait_for(lambda: len(sub.readings()) >= 200, 15, what="second run readings")
    assert sub.seqs() == list(range(1, 201))
    pub.close()


def test_cloud_broker_refuses_client_without_certificate(cloud_broker, pki):
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="intruder")
    c.tls_set(ca_certs=str(pki["ca"].cert_path), cert_reqs=ssl.CERT_REQUIRED)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        c.connect("localhost", cloud_broker.port, 10)
        # TLS 1.3 reports the missing certificate on the first read
        for _ in range(50):
            if c.loop(0.1) != 0:
                raise ConnectionError("closed by broker")
    c.disconnect()


def _run_check(config_path):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "edge_agent", "check", "--config", str(config_path)],
                          capture_output=True, text=True, timeout=30)


def test_agent_refuses_key_readable_by_others(local_broker, cloud_broker, make_agent, pki, tmp_path):
    import shutil
    cert, key = pki["gateway"]
    loose = tmp_path / "loose.key"
    shutil.copy(key, loose)
    loose.chmod(0o644)
    agent = make_agent(local_broker, cloud_broker, uplink={"key_file": str(loose)})
    r = _run_check(agent.config_path)
    assert r.returncode == 2
    assert "uplink.key_file" in r.stderr and "readable by group or others (mode 0644)" in r.stderr
    assert "chmod 600" in r.stderr and "Traceback" not in r.stderr


def test_agent_refuses_expired_certificate(local_broker, cloud_broker, make_agent, pki):
    import datetime as dt
    now = dt.datetime.now(dt.timezone.utc)
    cert, key = pki["ca"].issue("gw-expired", not_before=now - dt.timedelta(days=10),
                                not_after=now - dt.timedelta(days=1))
    agent = make_agent(local_broker, cloud_broker, uplink={"cert_file": str(cert), "key_file": str(key)})
    r = _run_check(agent.config_path)
    assert r.returncode == 2
    assert "uplink.cert_file" in r.stderr and "expired" in r.stderr and "Traceback" not in r.stderr


def test_certificate_expiring_soon_warns_and_exports_days(local_broker, cloud_broker, make_agent, pki):
    import datetime as dt
    now = dt.datetime.now(dt.timezone.utc)
    cert, key = pki["ca"].issue("gw-soon", not_after=now + dt.timedelta(days=10))
    agent = make_agent(local_broker, cloud_broker, uplink={"cert_file": str(cert), "key_file": str(key)})
    agent.start().wait_ready()
    days = agent.metric("edge_agent_cert_days_left", 'cert="uplink"')
    assert 9 < days <= 10
    assert agent.metric("edge_agent_cert_expiring", 'cert="uplink"') == 1
    wait_for(lambda: "expires soon" in agent.log(), 5, what="expiry warning")
    assert agent.stop() == 0


def test_uplink_refuses_cloud_broker_with_untrusted_certificate(local_broker, make_agent, tmp_path, pki):
    """A broker whose certificate was signed by another CA is not talked to: verification is always on."""
    from edge_agent.devkit.brokers import Mosquitto
    from edge_agent.devkit.certs import CA
    rogue = CA(tmp_path / "rogue", "rogue CA")
    cert, key = rogue.issue("rogue-broker", server=True)
    with Mosquitto.mtls(tmp_path / "rogue-broker", rogue.cert_path, cert, key) as broker:
        agent = make_agent(local_broker, broker).start().wait_ready()
        wait_for(lambda: (agent.metric("edge_agent_uplink_errors_total", 'reason="tls_verification"') or 0) >= 1,
                 10, what="tls verification failure counted")
        assert agent.metric("edge_agent_uplink_connected") == 0
        assert "tls verification failed" in agent.log()
        assert agent.stop() == 0


def test_bad_input_is_counted_and_nothing_else_is_lost(local_broker, cloud_broker, make_agent, cloud_subscriber,
                                                       tmp_path):
    import sqlite3
    sub = cloud_subscriber()
    agent = make_agent(local_broker, cloud_broker, southbound__mqtt={"max_payload_bytes": 1024}).start().wait_ready()
    pub = Publisher(local_broker)
    bad = {
        "bad_json": b'{"values": {"t": 1',
        "bad_value": json.dumps({"values": {"t": [1, 2]}}).encode(),
        "too_large": json.dumps({"values": {"t": "x" * 2000}}).encode(),
        "not_utf8": b'{"values": {"t": "\xff\xfe"}}',
        "non_finite": b'{"values": {"t": NaN}}',
        "bad_timestamp": b'{"ts": "yesterday", "values": {"t": 1}}',
    }
    n = 0
    for i in range(20):
        pub.publish(n, device="good")
        n += 1
        for reason, payload in bad.items():
            pub.publish(-1, device="bad", payload=payload)
    pub.publish(0, device="bad", payload=b'{"values": {"t": Infinity}}')
    pub.publish(0, device="bad", payload=b'{"values": {"t": -1e400}}')
    wait_for(lambda: len(sub.readings()) >= 2 * n, 20, what="good readings at the cloud")
    for reason in bad:
        want = 20 + (2 if reason == "non_finite" else 0)
        wait_for(lambda: agent.metric("edge_agent_messages_rejected_total", f'reason="{reason}",source="mqtt"')
                 == want, 10, what=f"{reason} counted")
    assert sorted(r["value"] for r in sub.readings() if r["point"] == "n") == list(range(n))
    assert {r["device"] for r in sub.readings()} == {"good"}
    assert agent.proc.poll() is None
    assert agent.stop() == 0
    db = sqlite3.connect(tmp_path / "state" / "edge-agent.db")
    rows = db.execute("SELECT reason, count(*) FROM dead_letters GROUP BY reason").fetchall()
    assert dict(rows) == {r: 20 + (2 if r == "non_finite" else 0) for r in bad}
    # acknowledged: a restart does not see them again
    assert agent.log().count("payload rejected") <= 6 * 5 + 5  # rate-limited, not one line per message


def test_dead_letter_table_is_bounded(local_broker, cloud_broker, make_agent, tmp_path):
    import sqlite3
    agent = make_agent(local_broker, cloud_broker, store={"dead_letter_rows": 10}).start().wait_ready()
    pub = Publisher(local_broker)
    for i in range(40):
        pub.publish(i, payload=b"not json")
    wait_for(lambda: agent.metric("edge_agent_messages_rejected_total", 'reason="bad_json",source="mqtt"') == 40,
             10, what="rejections")
    time.sleep(1.5)  # maintenance runs once a second
    assert agent.stop() == 0
    db = sqlite3.connect(tmp_path / "state" / "edge-agent.db")
    assert db.execute("SELECT count(*) FROM dead_letters").fetchone()[0] == 10


def test_mqtt5_publish_properties_do_not_disturb_the_payload(local_broker, cloud_broker, make_agent, cloud_subscriber):
    """Ingest parses QoS 1 PUBLISH itself and skips the MQTT 5 properties: they must be skipped exactly."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    sub = cloud_subscriber()
    agent = make_agent(local_broker, cloud_broker).start().wait_ready()
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id="v5-device", protocol=paho.MQTTv5)
    c.connect("127.0.0.1", local_broker.port, 30)
    c.loop_start()
    infos = []
    for i in range(20):
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = "application/json"
        props.UserProperty = [("site", "plant-7"), ("pad", "x" * (i * 20))]  # property lengths of 1 and 2 bytes
        props.MessageExpiryInterval = 3600
        body = json.dumps({"values": {"n": i}}).encode()
        infos.append(c.publish(f"devices/v5-{i % 2}/telemetry", body, qos=1, properties=props))
    wait_for(lambda: all(i.is_published() for i in infos), 10, what="PUBACKs")
    wait_for(lambda: len(sub.readings()) >= 20, 15, what="readings at the cloud")
    assert sorted(r["value"] for r in sub.readings()) == list(range(20))
    assert {r["device"] for r in sub.readings()} == {"v5-0", "v5-1"}
    c.loop_stop()
    c.disconnect()
    assert agent.stop() == 0
