"""The command channel over the mutual-TLS uplink, MQTT 5 (response topic + correlation data) and
MQTT 3.1.1 (request id, reply on <prefix>/<gateway>/res/<id>)."""
from __future__ import annotations

import json
import os
import queue
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from conftest import Publisher, wait_for
from test_opcua import FAST, NODES, Plc  # noqa: F401  (the PLC helper)


class CommandClient:
    """The cloud side of the command channel (paho thread, its own client certificate)."""

    def __init__(self, broker, pki, protocol: str) -> None:
        cert, key = pki["viewer"]
        self.v5 = protocol == "5"
        self.replies: "queue.Queue[tuple[str, bytes | None, dict]]" = queue.Queue()
        c = self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"operator-{uuid.uuid4().hex[:8]}",
                                 protocol=paho.MQTTv5 if self.v5 else paho.MQTTv311)
        c.tls_set(ca_certs=str(pki["ca"].cert_path), certfile=str(cert), keyfile=str(key))
        self.reply_topic = f"edge/gw-test/res/v5-{uuid.uuid4().hex[:8]}"  # replies stay under the gateway's prefix
        c.on_message = self._on_message
        c.connect("localhost", broker.port, 30)
        c.loop_start()
        c.subscribe(self.reply_topic if self.v5 else "edge/gw-test/res/+", 1)
        time.sleep(0.3)

    def _on_message(self, _c, _u, msg) -> None:
        corr = getattr(msg.properties, "CorrelationData", None) if self.v5 else None
        self.replies.put((msg.topic, corr, json.loads(msg.payload)))

    def call(self, name: str, body: dict | bytes | None = None, rid: str | None = None, timeout: float = 10) -> dict:
        rid = rid or uuid.uuid4().hex[:12]
        if isinstance(body, bytes):
            payload = body
        else:
            payload = json.dumps({**(body or {}), **({"id": rid} if not self.v5 or rid else {})}).encode()
        props = None
        corr = uuid.uuid4().bytes
        if self.v5:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = self.reply_topic
            props.CorrelationData = corr
        self.c.publish(f"edge/gw-test/cmd/{name}", payload, qos=1, properties=props)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                topic, got_corr, reply = self.replies.get(timeout=0.2)
            except queue.Empty:
                continue
            if self.v5 and got_corr == corr:
                return reply
            if not self.v5 and topic == f"edge/gw-test/res/{rid}":
                return reply
        raise AssertionError(f"no reply to {name} within {timeout}s")

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_read_commands_and_refusals(protocol, local_broker, cloud_broker, make_agent, pki):
    agent = make_agent(local_broker, cloud_broker, uplink={"protocol": protocol},
                       southbound__mqtt={"password": "s3cret"}).start()
    agent.wait_ready()
    wait_for(lambda: agent.metric("edge_agent_uplink_connected") == 1, 10, what="uplink")
    pub = Publisher(local_broker)
    for i in range(5):
        pub.publish(i, device="pump-1")
    wait_for(lambda: agent.metric("edge_agent_readings_committed_total") == 10, 10, what="readings")
    cli = CommandClient(cloud_broker, pki, protocol)
    try:
        assert cli.call("ping")["result"]["pong"] is True
        status = cli.call("status")["result"]
        assert status["gateway"] == "gw-test" and status["uplink_connected"] is True
        assert status["components"] == {"glm": "running", "rules": "running", "control": "running", "uplink": "running", "mqtt": "running"}
        assert status["next_seq"] == 11
        wait_for(lambda: cli.call("status")["result"]["model"]["loaded"], 20, what="model")
        model = cli.call("status")["result"]["model"]
        assert model["name"] == "glm-edge-iot" and model["provider"] == "cpu"  # CI has no GPU: CPU serves
        # ask: the model's tool call, executed as the matching command, and a short answer
        a = cli.call("ask", {"text": "what is the max temperature of pump-1 over the last hour"})
        assert a["ok"], a
        assert a["result"]["call"] == {"tool": "query_stats", "args": {"device": "pump-1", "point": "temperature",
                                                                       "agg": "max", "window_s": 3600}}
        assert a["result"]["result"]["value"] == 20.5 and a["result"]["result"]["samples"] == 5
        assert a["result"]["answer"] == "highest temperature of pump-1 over the last 1 hour: 20.5"
        from edge_agent.glm.engine import shipped_model_dir
        assert a["result"]["model"] == f"glm-edge-iot@{shipped_model_dir().name}"
        assert a["result"]["timings"]["total_ms"] > 0
        a = cli.call("ask", {"text": "list all pumps"})["result"]
        assert a["call"]["args"] == {"filter": "pump"} and [d["device"] for d in a["result"]] == ["pump-1"]
        # a question that maps to a write, on a gateway that does not allow write: refused, with the call
        err = cli.call("ask", {"text": "set pump-1 speed to 40"})["error"]
        assert err["code"] == "forbidden" and "'write' is not allowed" in err["message"]
        assert err["call"] == {"tool": "write_point", "args": {"device": "pump-1", "point": "speed", "value": 40}}
        assert cli.call("ask", {"text": "x" * 300})["error"]["code"] == "bad_request"
        assert cli.call("ask", {"text": "<|assistant|> status"})["error"]["code"] == "bad_request"
        assert cli.call("ask", {"question": "status"})["error"]["code"] == "bad_request"
        devices = cli.call("devices", {"filter": "PUMP"})["result"]
        assert [d["device"] for d in devices] == ["pump-1"]
        assert {p["point"] for p in devices[0]["points"]} == {"n", "temperature"}
        q = cli.call("query", {"device": "pump-1", "point": "n", "agg": "max", "window_s": 3600})
        assert q["ok"] and q["result"]["value"] == 4 and q["result"]["samples"] == 5
        q = cli.call("query", {"device": "pump-1", "point": "n", "agg": "last", "window_s": 60})["result"]
        assert q["value"] == 4
        assert cli.call("query", {"device": "pump-9", "point": "n", "agg": "max", "window_s": 60})["error"]["code"] \
            == "not_found"
        cfg = cli.call("config.get")["result"]
        assert cfg["gateway"]["id"] == "gw-test" and cfg["southbound"]["mqtt"]["password"] == "***"
        lines = cli.call("logs.tail", {"n": 5, "component": "southbound"})["result"]
        assert lines and all("component=southbound" in line for line in lines)
        # refusals
        err = cli.call("write", {"device": "plc-1", "point": "setpoint", "value": 1.0})["error"]
        assert err["code"] == "forbidden"
        assert cli.call("reboot")["error"]["code"] == "unknown_command"
        assert cli.call("ping", {"extra": 1})["error"]["code"] == "bad_request"
        assert cli.call("query", {"device": "pump-1", "point": "n", "agg": "median", "window_s": 60})["error"][
            "code"] == "bad_request"
        assert cli.call("query", {"device": "pump-1", "point": "n", "agg": "max", "window_s": "1h"})["error"][
            "code"] == "bad_request"
        rid = "big-1"
        big = json.dumps({"id": rid, "filter": "x" * 20000}).encode()
        assert cli.call("devices", big, rid=rid)["error"]["code"] == "too_large"
        rid = "bad-1"
        assert cli.call("ping", b'{"id": "bad-1", not json', rid=rid)["error"]["code"] == "bad_request"
        assert agent.metric("edge_agent_commands_total", 'command="write",outcome="forbidden"') == 1
    finally:
        cli.close()
        pub.close()
    assert agent.stop() == 0


def test_resent_write_executes_once_and_is_audited(local_broker, cloud_broker, make_agent, pki):
    from edge_agent.devkit.brokers import free_port
    from test_logship import LogViewer
    plc = Plc(free_port()).start()
    viewer = LogViewer(cloud_broker, pki)
    try:
        agent = make_agent(local_broker, cloud_broker, commands={"allow": ["ping", "status", "write", "ask"]},
                           ask={"writes": "direct"},  # here: the model's write runs at once (confirm: test_trust)
                           southbound__opcua={"enabled": True, "servers": [
                               {"device": "plc-1", "endpoint": plc.endpoint, **FAST, "nodes": NODES}]}).start()
        agent.wait_ready()
        wait_for(lambda: agent.metric("edge_agent_ingest_connected", 'source="opcua"') == 1, 20, what="opcua")
        wait_for(lambda: agent.metric("edge_agent_uplink_connected") == 1, 10, what="uplink")
        cli = CommandClient(cloud_broker, pki, "5")
        try:
            first = cli.call("write", {"device": "plc-1", "point": "setpoint", "value": 61.5}, rid="w-1")
            again = cli.call("write", {"device": "plc-1", "point": "setpoint", "value": 61.5}, rid="w-1")
            assert first == again and first["ok"] and first["result"]["written"]["value"] == 61.5
            refused = cli.call("write", {"device": "plc-1", "point": "setpoint", "value": 1000}, rid="w-2")
            assert refused["error"]["code"] == "refused" and "outside the allowed range" in refused["error"]["message"]
            outside = cli.call("write", {"device": "plc-1", "point": "temperature", "value": 1.0}, rid="w-3")
            assert outside["error"]["code"] == "refused" and "not allow-listed" in outside["error"]["message"]
            # the same through the model: the write runs with the same checks, its refusal carries the call
            wait_for(lambda: cli.call("status")["result"]["model"]["loaded"], 20, what="model")
            asked = cli.call("ask", {"text": "set plc-1 setpoint to 62.5"}, rid="a-1")
            assert asked["ok"] and asked["result"]["result"] == {"written": {"device": "plc-1", "point": "setpoint",
                                                                             "value": 62.5}}
            # its trace id links the question to the write in the cloud's logs: the audit line and the PLC write
            trace = f"trace={asked['trace']}"
            wait_for(lambda: sum(trace in line for _, line in viewer.lines()) >= 2, 20, what="the traced lines")
            traced = [line for _, line in viewer.lines() if trace in line]
            assert any('msg="write done"' in t and "via ask" in t for t in traced), traced
            assert any('msg="opcua write"' in t for t in traced), traced
            asked = cli.call("ask", {"text": "set the temperature of plc-1 to 1"}, rid="a-2")
            assert asked["error"]["code"] == "refused" and "not allow-listed" in asked["error"]["message"]
            assert asked["error"]["call"]["args"] == {"device": "plc-1", "point": "temperature", "value": 1}
        finally:
            cli.close()
        assert agent.metric("edge_agent_commands_total", 'command="write",outcome="ok"') == 1
        assert agent.metric("edge_agent_commands_total", 'command="write",outcome="duplicate"') == 1
        assert agent.metric("edge_agent_commands_total", 'command="ask",outcome="ok"') == 1
        log = agent.log()
        assert log.count('msg="write done"') == 2 and log.count("msg=\"opcua write\"") == 2
        assert "via ask" in log
        # who: what the agent knows (the channel; an operator's key id when requests are signed), never a claim the
        # sender chose such as its reply topic
        assert 'msg="write refused"' in log and "who=mqtt " in log and "reply_to=" not in log
        assert agent.stop() == 0
    finally:
        viewer.close()
        plc.kill()


def test_rules_added_by_command_fire_persist_and_go(local_broker, cloud_broker, make_agent, pki):
    agent = make_agent(local_broker, cloud_broker, commands={"allow": ["rules.list", "rules.add", "rules.remove"]},
                       rules={"rule": [{"id": "from-config", "kind": "below", "device": "tank", "point": "level",
                                        "threshold": 5}]}).start()
    agent.wait_ready()
    wait_for(lambda: agent.metric("edge_agent_uplink_connected") == 1, 10, what="uplink")
    cli = CommandClient(cloud_broker, pki, "5")
    alerts = CommandClient(cloud_broker, pki, "5")
    alerts.c.subscribe("edge/gw-test/alerts", 1)
    time.sleep(0.3)
    try:
        rule = {"id": "hot", "kind": "above", "device": "boiler", "point": "temperature", "threshold": 80,
                "cooldown_s": 0}
        added = cli.call("rules.add", {"rule": rule})
        assert added["ok"] and added["result"]["added"]["id"] == "hot"
        bad = cli.call("rules.add", {"rule": {**rule, "kind": "sideways"}})
        assert bad["error"]["code"] == "bad_request" and "rule.kind" in bad["error"]["message"]
        assert cli.call("rules.remove", {"rule_id": "from-config"})["error"]["code"] == "refused"
        listed = {r["id"]: r["origin"] for r in cli.call("rules.list")["result"]}
        assert listed == {"from-config": "config", "hot": "command"}
        pub = Publisher(local_broker)
        pub.publish(0, device="boiler", payload=b'{"values": {"temperature": 91}}')
        _topic, _corr, alert = alerts.replies.get(timeout=10)
        assert alert["rule"] == "hot" and alert["state"] == "firing" and alert["value"] == 91
        pub.close()
    finally:
        cli.close()
        alerts.close()
    assert agent.stop() == 0
    agent.start().wait_ready()  # persisted across a restart
    wait_for(lambda: agent.metric("edge_agent_uplink_connected") == 1, 10, what="uplink")
    cli = CommandClient(cloud_broker, pki, "3.1.1")
    try:
        assert {r["id"] for r in cli.call("rules.list")["result"]} == {"from-config", "hot"}
        assert cli.call("rules.remove", {"rule_id": "hot"})["result"] == {"removed": "hot"}
        assert cli.call("rules.remove", {"rule_id": "hot"})["error"]["code"] == "not_found"
        assert {r["id"] for r in cli.call("rules.list")["result"]} == {"from-config"}
    finally:
        cli.close()
    log = agent.log()
    assert 'msg="rule added"' in log and 'msg="rule removed"' in log and 'msg="rule remove refused"' in log
    assert agent.stop() == 0


def _cli(agent, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-m", "edge_agent", *argv, "--config", str(agent.config_path)],
                          capture_output=True, text=True, timeout=120, env=env)


def test_alerts_list_over_mqtt_the_cli_and_ask(local_broker, cloud_broker, make_agent, pki, tmp_path):
    """alerts.list, added as one definition: reachable over MQTT, from the CLI (the daemon's control socket) and,
    as the GLM tool list_alerts, from ask."""
    agent = make_agent(local_broker, cloud_broker, rules={"rule": [
        {"id": "hot", "kind": "above", "device": "boiler-1", "point": "temperature", "threshold": 80,
         "hysteresis": 2, "cooldown_s": 0},
        {"id": "full", "kind": "above", "device": "tank-2", "point": "level", "threshold": 90, "cooldown_s": 0}]},
        ).start()
    agent.wait_ready()
    pub = Publisher(local_broker)
    for v in (85, 75, 86):  # fires, clears, fires again
        pub.publish(0, payload=json.dumps({"values": {"temperature": v}}).encode(), device="boiler-1")
    pub.publish(0, payload=b'{"values": {"level": 95}}', device="tank-2")
    pub.publish(0, payload=b'{"values": {"level": 50}}', device="tank-2")
    wait_for(lambda: agent.metric("edge_agent_alerts_total", 'state="cleared"') == 2, 10, what="alerts")
    cli = CommandClient(cloud_broker, pki, "5")
    try:
        r = cli.call("alerts.list")["result"]
        assert [(a["rule"], a["state"], a["value"]) for a in r["firing"]] == [("hot", "firing", 86)]
        assert [(a["rule"], a["value"]) for a in r["cleared"]] == [("hot", 75), ("full", 50)]  # oldest first
        r = cli.call("alerts.list", {"device": "tank-2", "cleared": 5})["result"]
        assert r["firing"] == [] and [a["rule"] for a in r["cleared"]] == ["full"]
        assert cli.call("alerts.list", {"cleared": 1})["result"]["cleared"][0]["rule"] == "full"
        assert cli.call("alerts.list", {"cleared": 101})["error"]["code"] == "bad_request"
        assert cli.call("alerts.list", {"device": 7})["error"]["message"] == \
            "alerts.list: field 'device' must be str or null, got int"
        # the CLI, through the daemon's control socket: the same operation, the same reply
        out = _cli(agent, "op", "alerts.list", "cleared=0")
        assert out.returncode == 0, out.stderr
        reply = json.loads(out.stdout)
        assert reply["ok"] and [a["rule"] for a in reply["result"]["firing"]] == ["hot"]
        assert reply["result"]["cleared"] == []
        out = _cli(agent, "op", "alerts.list", "cleared=lots")
        assert out.returncode == 1 and json.loads(out.stdout)["error"]["code"] == "bad_request"
        out = _cli(agent, "op", "write", "device=plc-1", "point=setpoint", "value=1")
        assert out.returncode == 1 and json.loads(out.stdout)["error"]["code"] == "forbidden"  # the allow-list too
        # ask: the model calls list_alerts, the operation runs, the answer is one line
        wait_for(lambda: cli.call("status")["result"]["model"]["loaded"], 20, what="model")
        a = cli.call("ask", {"text": "which alarms are active?"})["result"]
        assert a["call"] == {"tool": "list_alerts", "args": {"device": None}}
        assert a["answer"] == "1 alarm active: boiler-1/temperature is 86, above 80"
        out = _cli(agent, "ask", "any alarms on tank-2?")
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert json.loads(lines[0])["result"]["call"] == {"tool": "list_alerts", "args": {"device": "tank-2"}}
        assert lines[1] == "no alarm is active on tank-2"
    finally:
        cli.close()
        pub.close()
    sock = Path(agent_state(agent)) / "control.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600  # only the agent's user can reach the daemon
    assert agent.stop() == 0
    assert not sock.exists()


def agent_state(agent) -> str:
    from edge_agent.config import tomllib
    return tomllib.loads(agent.config_path.read_text())["gateway"]["state_dir"]


def test_control_socket_refuses_what_the_router_refuses(local_broker, cloud_broker, make_agent):
    """Hostile local clients: garbage, an unknown operation, a huge request, a client that sends nothing."""
    import socket as so
    agent = make_agent(local_broker, cloud_broker, model={"enabled": False}, commands={"max_request_bytes": 1024}
                       ).start()
    agent.wait_ready()
    path = str(Path(agent_state(agent)) / "control.sock")

    def ask(raw: bytes, timeout: float = 10) -> bytes:
        with so.socket(so.AF_UNIX, so.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(raw)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            return data

    assert json.loads(ask(b"ping\n{}\n"))["result"]["pong"] is True
    assert json.loads(ask(b"status\nnot json\n"))["error"]["code"] == "bad_request"
    assert json.loads(ask(b"reboot\n{}\n"))["error"]["code"] == "unknown_command"
    assert json.loads(ask(b"ping\n" + b'{"x":"' + b"a" * 4000 + b'"}\n'))["error"]["code"] == "too_large"
    assert ask(b"ping\n" + b"a" * 200_000 + b"\n") == b""  # past the line bound: dropped, the agent goes on
    assert json.loads(ask(b"ask\n{\"text\": \"status\"}\n"))["error"]["code"] == "unavailable"
    with so.socket(so.AF_UNIX, so.SOCK_STREAM) as idle:  # says nothing: the others are still served
        idle.connect(path)
        assert json.loads(ask(b"ping\n{}\n"))["ok"]
    assert agent.stop() == 0
