"""The trust soak (issue 25): a steady load while everything an attacker and a bad day can do happens on a schedule,
then an audit. Not a test (it runs for minutes): run it by hand and put its figures in the docs.

    python3 tests/bench/soak_trust.py --minutes 10 --rate 2000

Every minute the cloud link is cut (the cloud broker stops) and restored 5 s later; every two minutes the agent is
killed with SIGKILL and started again; every 40 s a log storm (debug shipped for a minute, a burst of poison
payloads that each log a warning); all along, a command flood from an allowed client (rules.add, each request id sent
twice, the second as a resend); at the start, a model update from a server that drips the bundle.

At the end: every reading acknowledged to the local broker is at the cloud (every seq present, contiguous;
duplicates only as resends of the same seq), no command ran twice (each request id's rule is added once in the audit,
across restarts), and the update either landed or was refused with a reason.
"""
from __future__ import annotations

import base64
import json
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

import paho.mqtt.client as paho  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from conftest import Agent, CloudSubscriber, Publisher, agent_config, write_config  # noqa: E402
from soak import audit_cloud, cli  # noqa: E402

from edge_agent.devkit.brokers import Mosquitto, Nginx  # noqa: E402
from edge_agent.devkit.certs import CA  # noqa: E402
from edge_agent.glm.engine import shipped_model_dir  # noqa: E402

POISON = (b'{"values": {"t": NaN}}', b"{not json", b'{"values": {"t": 1e999}}', b"[" * 3000)


class Operator:
    """An allowed client sending commands (the viewer's certificate), and the OTA events it sees."""

    def __init__(self, cloud: Mosquitto, pki: dict) -> None:
        cert, key = pki["viewer"]
        self.ota: list[dict] = []
        c = self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id="soak-operator", protocol=paho.MQTTv311)
        c.tls_set(ca_certs=str(pki["ca"].cert_path), certfile=str(cert), keyfile=str(key))
        c.reconnect_delay_set(0.1, 1.0)
        c.on_connect = lambda cl, *_: cl.subscribe("edge/gw-test/ota", 1)
        c.on_message = lambda _c, _u, m: self.ota.append(json.loads(m.payload))
        c.connect("localhost", cloud.port, 30)
        c.loop_start()

    def send(self, name: str, body: dict) -> None:
        self.c.publish(f"edge/gw-test/cmd/{name}", json.dumps(body), qos=1)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def run(work: Path, seconds: float, rate: int, seed: int = 1, log=print) -> dict:
    rng = random.Random(seed)
    ca = CA(work / "pki")
    pki = {"ca": ca, "server": ca.issue("cloud-broker", server=True), "gateway": ca.issue("gw-test"),
           "viewer": ca.issue("cloud-viewer")}
    local = Mosquitto.local(work / "local").start()
    cloud = Mosquitto.mtls(work / "cloud", ca.cert_path, *pki["server"]).start()
    # the drip-feeding model server, with a signed bundle
    www = work / "www"
    bundle = www / "glm-edge-iot" / "9.9.0"
    bundle.parent.mkdir(parents=True)
    shutil.copytree(shipped_model_dir(), bundle)
    signer = Ed25519PrivateKey.generate()
    (work / "signer.pem").write_bytes(signer.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    subprocess.run([sys.executable, "-m", "edge_agent", "model", "pack", str(bundle), "--key",
                    str(work / "signer.pem"), "--version", "9.9.0"], check=True, capture_output=True)
    drip = Nginx(work / "nginx", www, ca.cert_path, *ca.issue("model-server", server=True), rate="2k").start()
    pub_b64 = base64.b64encode(signer.public_key().public_bytes(serialization.Encoding.Raw,
                                                                serialization.PublicFormat.Raw)).decode()
    viewer = CloudSubscriber(cloud, pki)
    cfg = agent_config(work, local.port, cloud.port, pki,
                       uplink={"publish_timeout_s": 2.0, "reconnect_max_s": 1.0}, log={"level": "info"},
                       commands={"allow": ["read-only", "rules.add", "logs.level", "model.update"],
                                 "concurrency": 16},
                       rules={"max_command_rules": 10_000}, ota={"trusted_keys": [pub_b64], "rate_window_s": 20})
    agent = Agent(write_config(work / "agent.toml", cfg), work / "agent.log", cfg["metrics"]["port"]).start()
    agent.wait_ready(60)
    pub = Publisher(local, client_id="soak-devices")
    op = Operator(cloud, pki)
    per_msg = 4
    n = poison = cmds = 0
    t0 = time.monotonic()
    events: list[str] = []

    def note(what: str) -> None:
        events.append(f"{time.monotonic() - t0:6.1f} s  {what}")
        log(events[-1])
    next_cut, next_kill, next_storm, next_cmd = t0 + 60, t0 + 120, t0 + 20, t0 + 1
    op.send("model.update", {"id": "ota-1", "url": f"{drip.url}/glm-edge-iot/9.9.0"})
    pending: list[tuple[float, str]] = []  # resends: (when, id)
    while time.monotonic() - t0 < seconds:
        for _ in range(max(1, int(rate / per_msg / 50))):
            pub.publish(n, device=f"dev-{n % 40}", payload=json.dumps({"ts": int(time.time() * 1000), "values": {
                "n": n, "temperature": 20.5, "pressure": 1.2, "level": 0.5}}).encode())
            n += 1
        time.sleep(0.02)
        now = time.monotonic()
        if now >= next_cmd:  # the command flood: 10 a second, each id again 2-20 s later
            for _ in range(10):
                rid = f"c-{cmds}"
                body = {"id": rid, "rule": {"id": f"flood-{cmds}", "kind": "above", "device": "flood-dev",
                                            "point": "x", "threshold": cmds}}
                op.send("rules.add", body)
                pending.append((now + rng.uniform(2, 20), json.dumps(body)))
                cmds += 1
            next_cmd = now + 1
        for when, body in [p for p in pending if p[0] <= now]:
            op.c.publish("edge/gw-test/cmd/rules.add", body, qos=1)
            pending.remove((when, body))
        if now >= next_storm:
            op.send("logs.level", {"id": f"lvl-{int(now)}", "level": "debug", "for_s": 60})
            for _ in range(300):
                pub.publish(-1, device=f"dev-{rng.randrange(40)}", payload=rng.choice(POISON))
                poison += 1
            note("log storm")
            next_storm = now + 40
        if now >= next_cut:
            cloud.stop()
            time.sleep(5)
            cloud.start()
            note("cloud link cut for 5 s")
            next_cut = time.monotonic() + 55
        if now >= next_kill:
            agent.kill9()
            agent.start()
            agent.wait_ready(60)
            note("agent kill -9")
            next_kill = time.monotonic() + 120
    sent_s = time.monotonic() - t0
    for _, body in pending:
        op.c.publish("edge/gw-test/cmd/rules.add", body, qos=1)
    acked, by_seq, readings = audit_cloud(pub, viewer, 300)
    time.sleep(5)  # the last commands
    text = (work / "agent.log").read_text(errors="replace")
    added = re.findall(r'msg="rule added" .*?rule=(flood-\d+)', text)
    twice = sorted({r for r in added if added.count(r) > 1})
    ota = [e for e in op.ota if e.get("event") in ("active", "failed", "refused")]
    rc = agent.stop(60)
    result = {"seconds": round(sent_s, 1), "messages": n, "points_per_s": round(n * per_msg / sent_s),
              "acknowledged": len(acked), "readings_at_cloud": len(by_seq),
              "duplicates_at_cloud": len(readings) - len(by_seq), "poison": poison, "commands": cmds,
              "rules_added": len(set(added)), "commands_run_twice": len(twice),
              "ota_outcome": ota[-1] if ota else None, "faults": events, "agent_rc": rc}
    pub.close()
    op.close()
    viewer.close()
    drip.stop()
    local.stop()
    cloud.stop()
    assert not twice, f"commands that ran twice: {twice[:10]}"
    assert ota and (ota[-1]["event"] == "active" or ota[-1].get("reason")), "the update neither landed nor said why"
    return result


if __name__ == "__main__":
    raise SystemExit(cli(run, __doc__, 2000))
