"""Configuration errors are one line naming the key; `edge-agent check`; the example config."""
from __future__ import annotations

import subprocess
import time
import sys
from edge_agent.config import tomllib
from pathlib import Path

import pytest

from edge_agent import config

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_agent", *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("raw, key, expected", [
    ({"store": {"batchsize": 10}}, "store.batchsize", "unknown key"),
    ({"store": {"batch_max_rows": "many"}}, "store.batch_max_rows", "expected an integer, got string 'many'"),
    ({"store": {"batch_max_rows": 0}}, "store.batch_max_rows", "must be >= 1"),
    ({"uplink": {"port": 70000}}, "uplink.port", "must be <= 65535"),
    ({"uplink": {"enabled": "yes"}}, "uplink.enabled", "expected true or false"),
    ({"uplink": {"protocol": "4"}}, "uplink.protocol", "expected one of 5, 3.1.1"),
    ({"uplink": {"ca_file": ""}}, "uplink.ca_file", "verification cannot be turned off"),
    ({"gateway": {"id": "a/b"}}, "gateway.id", "topic segment"),
    ({"southbound": {"mqtt": {"topics": [{"filter": "a/#/b"}]}}}, "southbound.mqtt.topics[0].filter",
     "valid MQTT topic filter"),
    ({"southbound": {"mqtt": {"topics": [{"filter": "a/+", "device": "a/x"}]}}},
     "southbound.mqtt.topics[0].device", "{device}"),
    ({"southbound": {"mqtt": {"topics": "devices/#"}}}, "southbound.mqtt.topics", "expected an array"),
    ({"metrics": []}, "metrics", "expected a table"),
    ({"southbound": {"mqtt": {"reconnect_min_s": 5.0, "reconnect_max_s": 1.0}}}, "southbound.mqtt",
     "above the maximum"),
])
def test_config_errors_name_the_key(raw, key, expected):
    with pytest.raises(config.ConfigError) as e:
        config.from_dict(raw)
    msg = str(e.value)
    assert msg.startswith(key + ":") or msg.startswith(key), msg
    assert expected in msg
    assert "\n" not in msg


def test_defaults_are_complete():
    cfg = config.from_dict({})
    assert cfg.store.synchronous == "full"
    assert cfg.metrics.host == "127.0.0.1"
    assert cfg.southbound.mqtt.topics[0].device == "devices/{device}/telemetry"


def test_example_config_documents_every_key_and_is_current():
    text = (ROOT / "systemd" / "edge-agent.toml").read_text()
    assert text == config.example_toml(), "regenerate systemd/edge-agent.toml (see its header)"
    cfg = config.from_dict(tomllib.loads(text))
    assert config.to_dict(cfg) == config.to_dict(config.Config())


def test_check_exits_non_zero_with_one_line_naming_the_key(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('[store]\nbatch_max_rows = "lots"\n')
    r = cli("check", "--config", str(p))
    assert r.returncode == 2
    assert r.stderr.strip() == "edge-agent: store.batch_max_rows: expected an integer, got string 'lots'"
    p.write_text("[store\n")
    r = cli("check", "--config", str(p))
    assert r.returncode == 2 and "not valid TOML" in r.stderr and "Traceback" not in r.stderr
    r = cli("check", "--config", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "config file not found" in r.stderr
    r = cli("run", "--config", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "config file not found" in r.stderr


def test_check_prints_effective_config_with_secrets_redacted(tmp_path, pki):
    cert, key = pki["gateway"]
    p = tmp_path / "ok.toml"
    p.write_text(f"""
[gateway]
id = "gw-9"
[southbound.mqtt]
password = "hunter2"
[uplink]
ca_file = "{pki['ca'].cert_path}"
cert_file = "{cert}"
key_file = "{key}"
""")
    r = cli("check", "--config", str(p))
    assert r.returncode == 0, r.stderr
    assert 'id = "gw-9"' in r.stdout and "hunter2" not in r.stdout and 'password = "***"' in r.stdout
    effective = tomllib.loads(r.stdout)
    assert effective["store"]["batch_max_rows"] == 5000
    from edge_agent.glm.engine import shipped_model_dir
    assert r.stdout.startswith(f"# model glm-edge-iot@{shipped_model_dir().name}: signature and files verified")
    assert "# warning: no operator keys (commands.operator_keys)" in r.stdout
    # a model that does not verify: said, but not fatal (the daemon runs on; ask answers 'unavailable')
    p.write_text(p.read_text() + '[model]\npublic_key = "TAaaUPuveWW3pJDNlgRdirQ0KPNYNbfsqjWzYlg606Y="\n')
    r = cli("check", "--config", str(p))
    assert r.returncode == 0 and "# model NOT usable" in r.stdout and "signature does not verify" in r.stdout


def test_version():
    r = cli("version")
    assert r.returncode == 0 and r.stdout.startswith("edge-agent ")


def test_check_warns_when_the_quota_is_more_than_the_free_space(tmp_path, pki):
    cert, key = pki["gateway"]
    p = tmp_path / "big.toml"
    p.write_text(f"""
[gateway]
state_dir = "{tmp_path / 'state'}"
[store]
quota_bytes = {1 << 60}
[uplink]
ca_file = "{pki['ca'].cert_path}"
cert_file = "{cert}"
key_file = "{key}"
""")
    r = cli("check", "--config", str(p))
    assert r.returncode == 0, r.stderr
    assert f"# warning: store.quota_bytes ({1 << 60} B) is more than the free space" in r.stdout


def test_help_shows_defaults():
    r = cli("demo", "--help")
    assert r.returncode == 0 and "(default: 5)" in r.stdout and "(default: 10.0)" in r.stdout
    r = cli("run", "--help")
    assert "(default: /etc/edge-agent/config.toml)" in r.stdout


def test_check_connect_gives_one_verdict_per_endpoint(tmp_path, pki, local_broker, cloud_broker):
    import datetime as dt

    from conftest import agent_config, write_config
    from edge_agent.devkit.certs import CA

    def check(**sections):
        cfg = agent_config(tmp_path, local_broker.port, cloud_broker.port, pki, **sections)
        return cli("check", "--connect", "--config", str(write_config(tmp_path / "c.toml", cfg)))

    r = check()
    assert r.returncode == 0, r.stdout + r.stderr
    cloud = next(line for line in r.stdout.splitlines() if line.startswith("# ok cloud"))
    assert cloud.startswith("# ok cloud broker localhost:") and "TLSv1." in cloud and "commonName=cloud-broker" in cloud
    assert "client certificate accepted, round trip" in cloud
    assert any(line.startswith("# ok local broker") for line in r.stdout.splitlines())
    other = CA(tmp_path / "other-ca")
    r = check(uplink={"ca_file": str(other.cert_path)})  # a CA that did not sign the broker
    assert r.returncode == 1 and "# FAILED cloud broker" in r.stdout and "not trusted" in r.stdout
    cert, key = other.issue("gw-test")  # a client certificate the broker's CA did not sign
    r = check(uplink={"cert_file": str(cert), "key_file": str(key)})
    assert r.returncode == 1 and "# FAILED cloud broker" in r.stdout and "refused the client certificate" in r.stdout
    now = dt.datetime.now(dt.timezone.utc)
    cert, key = pki["ca"].issue("gw-expired-check", not_before=now - dt.timedelta(days=9),
                                not_after=now - dt.timedelta(days=1))
    r = check(uplink={"cert_file": str(cert), "key_file": str(key)})
    assert r.returncode == 2 and "expired" in r.stderr and r.stderr.count("\n") == 1


def test_check_runs_the_models_smoke_set_and_reports_a_disagreement(tmp_path):
    """The smoke set (questions with the fp32 model's calls, in the signed manifest) runs on this machine: equal
    answers pass; an answer that differs is named and check fails."""
    import base64
    import json
    import shutil

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from edge_agent.glm.engine import shipped_model_dir
    from edge_agent.glm.models import sign_folder

    folder = tmp_path / "model"
    shutil.copytree(shipped_model_dir(), folder)
    key = Ed25519PrivateKey.generate()
    pub = base64.b64encode(key.public_key().public_bytes(serialization.Encoding.Raw,
                                                         serialization.PublicFormat.Raw)).decode()
    manifest = json.loads((folder / "manifest.json").read_text())
    smoke = [{"text": "list all devices", "call": {"tool": "list_devices", "args": {"filter": None}}},
             {"text": "gateway status", "call": {"tool": "status", "args": {}}}]
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[uplink]\nenabled = false\n[model]\ndir = "{folder}"\npublic_key = "{pub}"\n'
                   f'providers = ["cpu"]\n[gateway]\nstate_dir = "{tmp_path}/state"\n')
    sign_folder(folder, {**manifest, "smoke": smoke}, key)
    r = cli("check", "--config", str(cfg))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "smoke set 2/2 answers equal the build's fp32 reference on this machine" in r.stdout
    assert "the model runs on cpu (model.int8.onnx)" in r.stdout
    smoke[1]["call"] = {"tool": "list_alerts", "args": {"device": None}}  # what this machine will not answer
    sign_folder(folder, {**manifest, "smoke": smoke}, key)
    r = cli("check", "--config", str(cfg))
    assert r.returncode == 1 and "DISAGREES on this machine: 1 of 2 smoke answers differ" in r.stdout, r.stdout
    assert "'gateway status': got {\"tool\": \"status\", \"args\": {}}" in r.stdout


def test_check_reports_every_problem_of_a_file_at_once(tmp_path):
    p = tmp_path / "three.toml"
    p.write_text('[store]\nbatch_max_rows = "lots"\nquota_bytes = -1\n[uplink]\nport = 99999\ncolour = "red"\n'
                 '[[rules.rule]]\nid = "r"\nkind = "sideways"\ndevice = "d"\npoint = "p"\n')
    r = cli("check", "--config", str(p))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("edge-agent: ") and len(lines) == 5, r.stderr
    text = r.stderr
    for needle in ("store.batch_max_rows: expected an integer", "store.quota_bytes: must be >=",
                   "uplink.colour: unknown key", "uplink.port: must be <= 65535", "rules.rule[0].kind: expected one of"):
        assert needle in text, (needle, text)


def test_check_connect_reaches_the_opcua_servers_and_coap_resources(tmp_path, pki, local_broker, cloud_broker):
    import subprocess
    import sys

    from conftest import agent_config, wait_for, write_config
    from edge_agent.devkit.brokers import free_port, free_udp_port
    from test_opcua import FAST, NODES, Plc

    plc = Plc(free_port()).start()
    sensor_port = free_udp_port()
    sensor = subprocess.Popen([sys.executable, "-m", "edge_agent.devkit.simulators", "coap", "--port",
                               str(sensor_port)])
    try:
        time.sleep(1.0)
        nodes = [*NODES, {"point": "ghost", "browse_path": "2:PLC/2:NoSuchNode"}]
        cfg = agent_config(tmp_path, local_broker.port, cloud_broker.port, pki,
                           southbound__opcua={"enabled": True, "servers": [
                               {"device": "plc-1", "endpoint": plc.endpoint, **FAST, "nodes": NODES},
                               {"device": "plc-2", "endpoint": plc.endpoint, **FAST, "nodes": nodes}]},
                           southbound__coap={"enabled": True, "observe": [
                               {"uri": f"coap://127.0.0.1:{sensor_port}/sensors/temp", "device": "s-1"},
                               {"uri": f"coap://127.0.0.1:{sensor_port}/sensors/nothing", "device": "s-2"}]})
        r = cli("check", "--connect", "--config", str(write_config(tmp_path / "c.toml", cfg)))
        out = r.stdout
        assert r.returncode == 1, out + r.stderr
        assert f"# ok opcua {plc.endpoint} (plc-1): session up (None), {len(NODES)} nodes found" in out, out
        assert f"# FAILED opcua {plc.endpoint} (plc-2): session up, but not found: ghost" in out
        assert f"# ok coap coap://127.0.0.1:{sensor_port}/sensors/temp (s-1): 2.05 Content" in out
        assert f"# FAILED coap coap://127.0.0.1:{sensor_port}/sensors/nothing (s-2): 4.04 Not Found" in out
    finally:
        plc.kill()
        sensor.kill()
        sensor.wait(10)
