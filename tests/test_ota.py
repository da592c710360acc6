"""Model updates over the air against a real model server: nginx from the distribution on a loopback port, HTTPS
with client certificates required, serving bundles packed with `edge-agent model pack`.

In-process tests drive the real Updater (a real Store, a real Agent, the real downloader) for the refusals and the
resume; the agent-as-a-process tests drive model.update over MQTT, kill -9 and the crash-loop rollback."""
from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent import ops
from edge_agent.config import ModelConfig, OtaConfig, StoreConfig
from edge_agent.devkit.brokers import Nginx
from edge_agent.devkit.certs import CA
from edge_agent.glm.engine import shipped_model_dir
from edge_agent.metrics import Metrics

pytestmark = pytest.mark.skipif(shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists(),
                                reason="nginx is not installed (.ci/run installs it)")

NAME = "glm-edge-iot"


def _pub(key: Ed25519PrivateKey) -> str:
    return base64.b64encode(key.public_key().public_bytes(serialization.Encoding.Raw,
                                                          serialization.PublicFormat.Raw)).decode()


@pytest.fixture(scope="module")
def signer(tmp_path_factory):
    key = Ed25519PrivateKey.generate()
    path = tmp_path_factory.mktemp("keys") / "publisher.pem"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return key, path


@pytest.fixture
def server(tmp_path, pki):
    cert, key = pki["ca"].issue("model-server", server=True)
    root = tmp_path / "www"
    root.mkdir()
    s = Nginx(tmp_path / "nginx", root, pki["ca"].cert_path, cert, key).start()
    yield s
    s.stop()


def pack(root: Path, version: str, key_path: Path, *extra: str, edit=None) -> str:
    """A bundle of the shipped model at `version` under the server's root, packed by the CLI; returns its path."""
    folder = root / NAME / version
    shutil.copytree(shipped_model_dir(), folder)
    if edit is not None:
        edit(folder)
    r = subprocess.run([sys.executable, "-m", "edge_agent", "model", "pack", str(folder), "--key", str(key_path),
                        "--version", version, *extra], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return f"/{NAME}/{version}"


class Rig:
    """The real Updater with a real Store and Agent, in one event loop."""

    def __init__(self, tmp: Path, pki, signer_pub: str, ctx=None, target=("gw-test", "x86_64"), **ota) -> None:
        from edge_agent import tls
        from edge_agent.agent import Agent
        from edge_agent.ota import Target, Updater
        from edge_agent.store import Store

        self.metrics = Metrics()
        self.store = Store(StoreConfig(), tmp / "state", self.metrics)
        mcfg = ModelConfig(providers=["cpu"])
        self.ocfg = OtaConfig(**{"trusted_keys": [signer_pub], "timeout_s": 5, **ota})
        self.agent = Agent(mcfg, ops.TOOLSET, tmp / "state", self.metrics, keys=[mcfg.public_key, signer_pub])
        cert, key = pki["gateway"]
        self.ctx = ctx or (lambda: tls.client_context(str(pki["ca"].cert_path), str(cert), str(key)))
        self.updater = Updater(self.ocfg, tmp / "state", self.store, self.metrics, self.agent, self.ctx,
                               target=Target(*target))
        self.agent.boot, self.agent.booted = self.updater.boot, self.updater.booted

    async def __aenter__(self) -> "Rig":
        await self.store.open()
        await self.updater.boot()
        return self

    async def __aexit__(self, *exc) -> None:
        self.updater.cancel()
        if self.agent.engine is not None:
            self.agent.engine.close()
        await self.store.close()

    async def events(self) -> list[dict]:
        await asyncio.sleep(0.05)
        return [json.loads(p) for _, topic, p in await self.store.read_alerts(0, 1000) if topic == "ota"]

    def count(self, outcome: str, reason: str = "") -> float:
        return self.metrics.value("edge_agent_model_updates_total", {"outcome": outcome, "reason": reason})


def _refused(tmp_path, pki, signer, url, reason, expect, ctx=None, **ota):
    from edge_agent.ota import UpdateError

    async def main():
        async with Rig(tmp_path, pki, _pub(signer[0]), ctx, **ota) as rig:
            with pytest.raises(UpdateError) as e:
                await rig.updater.update(url=url, wait=True)
            assert e.value.reason == reason and expect in e.value.message, e.value.message
            ev = await rig.events()
            assert [x["event"] for x in ev][0] == "requested" and ev[-1]["reason"] == reason, ev
            assert rig.count(ev[-1]["event"], reason) == 1
            assert rig.updater.state.active is None and not (tmp_path / "state" / "models" / NAME).exists()
            return ev
    return asyncio.run(main())


def test_an_update_lands_verified_staged_and_active(tmp_path, pki, signer, server):
    path = pack(server.root, "9.0.0", signer[1])

    async def main():
        async with Rig(tmp_path, pki, _pub(signer[0])) as rig:
            r = await rig.updater.update(url=server.url + path, wait=True)
            assert r == {"version": "9.0.0", "active": True}
            assert rig.agent.model_name_version() == f"{NAME}@9.0.0"
            listed = rig.updater.list()
            assert listed["active"] == "9.0.0" and listed["installed"] == ["9.0.0"] and listed["highest"] == "9.0.0"
            assert listed["trial"]["version"] == "9.0.0" and listed["last"] == {"outcome": "active",
                                                                                "version": "9.0.0"}
            ev = [e["event"] for e in await rig.events()]
            assert ev == ["requested", "verified", "staged", "health_passed", "active"], ev
            assert rig.count("active") == 1
            assert (tmp_path / "state" / "models" / NAME / "9.0.0" / "manifest.sig").exists()
            assert not (tmp_path / "state" / "models" / ".incoming").exists()
            # the same version again, and a lower one: the anti-rollback floor
            from edge_agent.ota import UpdateError
            with pytest.raises(UpdateError, match="not above 9.0.0"):
                await rig.updater.update(url=server.url + path, wait=True)
    asyncio.run(main())
    reqs = server.requests()
    assert all(r["client"] == "SUCCESS" for r in reqs)  # every request carried the gateway's certificate
    assert {r["path"].rsplit("/", 1)[1] for r in reqs} >= {"manifest.json", "manifest.sig", "model.int8.onnx"}


@pytest.mark.parametrize("case", ["unsigned", "unknown_key", "tampered", "truncated", "larger", "traversal",
                                  "expired", "agent_too_old", "not_a_model"])
def test_refusals_each_with_its_reason_and_a_counter(tmp_path, pki, signer, server, case):
    other = Ed25519PrivateKey.generate()
    other_path = tmp_path / "other.pem"
    other_path.write_bytes(other.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    root = server.root
    if case == "unsigned":
        path = pack(root, "9.1.0", signer[1])
        (root / path.lstrip("/") / "manifest.sig").unlink()
        reason, expect = "signature", "not signed"
    elif case == "unknown_key":
        path = pack(root, "9.1.0", other_path)
        reason, expect = "signature", "does not verify with any trusted key"
    elif case == "tampered":
        path = pack(root, "9.1.0", signer[1])
        f = root / path.lstrip("/") / "tokenizer.json"
        data = bytearray(f.read_bytes())
        data[100] ^= 1
        f.write_bytes(bytes(data))
        reason, expect = "digest", "tokenizer.json: sha256 does not match"
    elif case == "truncated":
        path = pack(root, "9.1.0", signer[1])
        f = root / path.lstrip("/") / "model.int8.onnx"
        f.write_bytes(f.read_bytes()[:-1000])
        reason, expect = "size", "the manifest says"
    elif case == "larger":
        path = pack(root, "9.1.0", signer[1])
        f = root / path.lstrip("/") / "model.int8.onnx"
        f.write_bytes(f.read_bytes() + b"\0" * 1000)
        reason, expect = "size", "the manifest says"
    elif case == "traversal":
        path = pack(root, "9.1.0", signer[1])
        folder = root / path.lstrip("/")
        m = json.loads((folder / "manifest.json").read_text())
        m["files"]["../../etc/cron.d/x"] = m["files"]["tokenizer_config.json"]
        body = (json.dumps(m, indent=2, sort_keys=True) + "\n").encode()
        (folder / "manifest.json").write_bytes(body)
        (folder / "manifest.sig").write_text(base64.b64encode(signer[0].sign(body)).decode() + "\n")
        reason, expect = "path", "not a plain name"
    elif case == "expired":
        path = pack(root, "9.1.0", signer[1], "--expires-days", "-1")
        reason, expect = "expired", "expired"
    elif case == "agent_too_old":
        path = pack(root, "9.1.0", signer[1], "--min-agent", "99.0.0")
        reason, expect = "agent_too_old", "needs agent 99.0.0"
    else:  # a signed bundle of another model
        path = pack(root, "9.1.0", signer[1], edit=lambda d: _rename(d, "someone-elses-model"))
        reason, expect = "manifest", "someone-elses-model"
    if case == "not_a_model":
        from edge_agent.ota import UpdateError

        async def main():  # needs a serving model to know its name
            async with Rig(tmp_path, pki, _pub(signer[0])) as rig:
                rig.agent.engine = rig.agent._load(None)
                with pytest.raises(UpdateError) as e:
                    await rig.updater.update(url=server.url + path, wait=True)
                assert e.value.reason == reason and expect in e.value.message
        asyncio.run(main())
        return
    _refused(tmp_path, pki, signer, server.url + path, reason, expect)


def _rename(folder: Path, name: str) -> None:
    m = json.loads((folder / "manifest.json").read_text())
    m["name"] = name
    (folder / "manifest.json").write_text(json.dumps(m))


def test_refused_for_the_disk_the_tls_and_the_floor(tmp_path, pki, signer, server):
    from edge_agent import tls

    path = pack(server.root, "9.2.0", signer[1])
    url = server.url + path
    _refused(tmp_path / "disk", pki, signer, url, "disk", "must stay free", disk_reserve_bytes=1 << 50)
    stranger = CA(tmp_path / "stranger-ca")
    cert, key = pki["gateway"]
    _refused(tmp_path / "server-ca", pki, signer, url, "tls", "certificate verify failed",
             ctx=lambda: tls.client_context(str(stranger.cert_path), str(cert), str(key)))
    _refused(tmp_path / "no-client-cert", pki, signer, url, "tls", "refused our client certificate",
             ctx=lambda: tls.client_context(str(pki["ca"].cert_path)))
    s_cert, s_key = stranger.issue("gw-test")
    _refused(tmp_path / "foreign-client-cert", pki, signer, url, "tls", "refused our client certificate",
             ctx=lambda: tls.client_context(str(pki["ca"].cert_path), str(s_cert), str(s_key)))
    _refused(tmp_path / "plain", pki, signer, url.replace("https://", "http://"), "tls", "only https://")


def test_a_download_cut_by_the_server_resumes_with_range(tmp_path, pki, signer):
    """The server dies in the middle of the model file; the download resumes from where it stopped (Range), and
    no byte before that point is fetched again."""
    root = tmp_path / "www"
    root.mkdir()
    cert, key = pki["ca"].issue("model-server", server=True)
    slow = Nginx(tmp_path / "nginx", root, pki["ca"].cert_path, cert, key, rate="400k").start()
    path = pack(root, "9.3.0", signer[1])
    size = (root / path.lstrip("/") / "model.int8.onnx").stat().st_size
    assert size > 1_000_000

    async def main():
        async with Rig(tmp_path, pki, _pub(signer[0])) as rig:
            task = asyncio.ensure_future(rig.updater.update(url=slow.url + path, wait=True))
            partial = tmp_path / "state" / "models" / ".incoming" / f"{NAME}-9.3.0" / "model.int8.onnx.partial"
            deadline = time.monotonic() + 30
            while not (partial.exists() and partial.stat().st_size > size // 4):
                assert time.monotonic() < deadline and not task.done(), "the download did not start"
                await asyncio.sleep(0.05)
            await asyncio.to_thread(slow.kill)
            await asyncio.sleep(0.3)
            await asyncio.to_thread(slow.start)
            r = await asyncio.wait_for(task, 60)
            assert r["active"] is True
    asyncio.run(main())
    slow.stop()
    model_reqs = [r for r in slow.requests() if r["path"].endswith("/model.int8.onnx")]
    resumed = [r for r in model_reqs if r["range"]]
    assert len(resumed) == 1 and resumed[0]["status"] == 206, model_reqs
    start = int(resumed[0]["range"].removeprefix("bytes=").rstrip("-"))
    assert start > size // 4 and resumed[0]["bytes"] == size - start  # nothing before `start` came twice


def test_a_model_whose_smoke_set_fails_is_never_activated(tmp_path, pki, signer, server):
    def wrong_smoke(folder: Path) -> None:
        m = json.loads((folder / "manifest.json").read_text())
        m["smoke"] = [{"text": "list all devices", "call": {"tool": "status", "args": {}}}]
        (folder / "manifest.json").write_text(json.dumps(m))
    path = pack(server.root, "9.4.0", signer[1], edit=wrong_smoke)

    async def main():
        from edge_agent.ota import UpdateError

        async with Rig(tmp_path, pki, _pub(signer[0])) as rig:
            rig.agent.engine = rig.agent._load(None)
            with pytest.raises(UpdateError) as e:
                await rig.updater.update(url=server.url + path, wait=True)
            assert e.value.reason == "health" and "smoke answers differ" in e.value.message
            assert rig.agent.model_name_version() == f"{NAME}@{shipped_model_dir().name}"  # still serving
            st = rig.updater.state
            assert st.active is None and "9.4.0" in st.bad and st.highest is None
            ev = [e["event"] for e in await rig.events()]
            assert ev[-2:] == ["health_failed", "failed"], ev
            assert rig.count("failed", "health") == 1
            with pytest.raises(UpdateError, match="marked bad"):  # and it is not tried again
                await rig.updater.update(url=server.url + path, wait=True)
    asyncio.run(main())


# ---- the agent as a process, over MQTT ------------------------------------------------------------------------
class Events:
    """The cloud's view of <prefix>/<gateway>/ota (the viewer's certificate)."""

    def __init__(self, broker, pki) -> None:
        import threading

        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        cert, key = pki["viewer"]
        self.got: list[dict] = []
        self.lock = threading.Lock()
        c = self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id="ota-viewer", clean_session=False,
                                 protocol=paho.MQTTv311)
        c.tls_set(ca_certs=str(pki["ca"].cert_path), certfile=str(cert), keyfile=str(key))
        c.on_message = lambda _c, _u, m: self._add(json.loads(m.payload))
        c.on_connect = lambda cl, *_a: cl.subscribe("edge/gw-test/ota", 1)
        c.connect("localhost", broker.port, 30)
        c.loop_start()
        time.sleep(0.3)

    def _add(self, doc: dict) -> None:
        with self.lock:
            self.got.append(doc)

    def names(self) -> list[str]:
        with self.lock:
            return [e["event"] for e in self.got]

    def wait(self, name: str, timeout: float = 60) -> dict:
        from conftest import wait_for
        wait_for(lambda: name in self.names(), timeout, what=f"ota event {name} (got {self.names()})")
        with self.lock:
            return next(e for e in self.got if e["event"] == name)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def _ota_agent(make_agent, local, cloud, signer, **ota):
    return make_agent(local, cloud, commands={"allow": ["read-only", "model.update", "model.rollback"]},
                      model={"providers": ["cpu"], "queue": 32},
                      ota={"trusted_keys": [_pub(signer[0])], **ota})


def test_a_swap_under_ask_load_fails_no_question_and_each_reply_names_its_model(tmp_path, pki, signer, server,
                                                                                  local_broker, cloud_broker,
                                                                                  make_agent):
    """20 questions a second through MQTT for 12 s; the update lands in the middle: every question is answered,
    each reply names the model version that answered it, and the version changes once, old to new."""
    import threading
    import uuid

    from conftest import wait_for
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    from test_commands import CommandClient

    path = pack(server.root, "9.5.0", signer[1])
    agent = _ota_agent(make_agent, local_broker, cloud_broker, signer).start()
    agent.wait_ready()
    events = Events(cloud_broker, pki)
    cli = CommandClient(cloud_broker, pki, "5")
    try:
        wait_for(lambda: cli.call("status")["result"]["model"]["loaded"], 30, what="model loaded")
        old = cli.call("status")["result"]["model"]["version"]
        replies: dict[bytes, dict] = {}
        lock = threading.Lock()
        load = CommandClient(cloud_broker, pki, "5")
        load.c.on_message = lambda _c, _u, m: (lock.acquire(), replies.__setitem__(
            m.properties.CorrelationData, json.loads(m.payload)), lock.release())
        sent: list[bytes] = []
        t0 = time.monotonic()
        accepted = None
        while time.monotonic() - t0 < 12:
            corr = uuid.uuid4().bytes
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic, props.CorrelationData = load.reply_topic, corr
            load.c.publish("edge/gw-test/cmd/ask", json.dumps({"text": "what is the temperature of pump-3"}),
                           qos=1, properties=props)
            sent.append(corr)
            if accepted is None and time.monotonic() - t0 > 3:
                accepted = cli.call("model.update", {"url": server.url + path})
            time.sleep(0.05)
        assert accepted["ok"] and accepted["result"]["accepted"] is True, accepted
        events.wait("active", 60)
        wait_for(lambda: len(replies) == len(sent), 30, what=f"all {len(sent)} replies ({len(replies)})")
        load.close()
        versions = [replies[c]["result"]["model"] if replies[c]["ok"] else replies[c]["error"] for c in sent]
        assert all(replies[c]["ok"] for c in sent), [v for v in versions if not isinstance(v, str)][:3]
        assert len(sent) >= 200
        first_new = versions.index(f"{NAME}@9.5.0")
        assert set(versions[:first_new]) == {f"{NAME}@{old}"} and set(versions[first_new:]) == {f"{NAME}@9.5.0"}
        status = cli.call("status")["result"]
        assert status["model"]["version"] == "9.5.0" and status["models"]["active"] == "9.5.0"
        assert events.names()[:2] == ["requested", "verified"] and "health_passed" in events.names()
    finally:
        cli.close()
        events.close()
    assert agent.stop() == 0


def test_a_model_that_makes_the_agent_restart_is_rolled_back(tmp_path, pki, signer, server, local_broker,
                                                             cloud_broker, make_agent):
    """After a swap, before the model is marked good, the agent dies at start (kill -9) again and again: past
    ota.crash_restarts it boots the previous model, marks the new one bad and says why."""
    from conftest import wait_for
    from test_commands import CommandClient

    path = pack(server.root, "9.6.0", signer[1])
    agent = _ota_agent(make_agent, local_broker, cloud_broker, signer, crash_restarts=2, good_after_s=600).start()
    agent.wait_ready()
    events = Events(cloud_broker, pki)
    cli = CommandClient(cloud_broker, pki, "5")
    try:
        wait_for(lambda: cli.call("status")["result"]["model"]["loaded"], 30, what="model loaded")
        assert cli.call("model.update", {"url": server.url + path, "wait": True}, timeout=60)["ok"]
        for boot in (1, 2):  # killed right after each start, before the model is marked good
            agent.kill9()
            agent.start()
            agent.wait_ready()
            wait_for(lambda: cli.call("status")["result"]["model"]["loaded"], 30, what="model loaded")
            assert cli.call("status")["result"]["model"]["version"] == "9.6.0"
            assert cli.call("model.list")["result"]["trial"]["boots"] == boot
        agent.kill9()
        agent.start()
        agent.wait_ready()
        wait_for(lambda: cli.call("status")["result"]["model"]["loaded"], 30, what="model loaded")
        status = cli.call("status")["result"]
        assert status["model"]["version"] == shipped_model_dir().name, status["model"]
        listed = cli.call("model.list")["result"]
        assert listed["active"] == "default" and "restarted 2 times" in listed["bad"]["9.6.0"], listed
        ev = events.wait("rolled_back")
        assert ev["version"] == "9.6.0" and ev["to"] == "default"
        # and it is not installed again
        r = cli.call("model.update", {"url": server.url + path, "wait": True}, timeout=60)
        assert not r["ok"] and "marked bad" in r["error"]["message"], r
    finally:
        cli.close()
        events.close()
    assert agent.stop() == 0


@pytest.mark.parametrize("at", ["downloading", "verified", "staged", "health_passed"])
def test_kill9_at_each_step_leaves_a_verified_model_serving(tmp_path, pki, signer, local_broker, cloud_broker,
                                                            make_agent, at):
    """kill -9 during the download, after the manifest is verified, once staged (health check running), once
    healthy (the swap): after the restart a verified model serves and the update either completed or is reported
    failed; no half-written version is ever loaded."""
    from conftest import wait_for
    from test_commands import CommandClient

    root = tmp_path / "www"
    root.mkdir()
    cert, key = pki["ca"].issue("model-server", server=True)
    srv = Nginx(tmp_path / "nginx", root, pki["ca"].cert_path, cert, key,
                rate="300k" if at == "downloading" else "0").start()
    path = pack(root, "9.7.0", signer[1])
    agent = _ota_agent(make_agent, local_broker, cloud_broker, signer).start()
    agent.wait_ready()
    events = Events(cloud_broker, pki)
    cli = CommandClient(cloud_broker, pki, "5")
    try:
        wait_for(lambda: cli.call("status")["result"]["model"]["loaded"], 30, what="model loaded")
        assert cli.call("model.update", {"url": srv.url + path})["ok"]
        if at == "downloading":
            part = tmp_path / "state" / "models" / ".incoming" / f"{NAME}-9.7.0" / "model.int8.onnx.partial"
            wait_for(lambda: part.exists() and part.stat().st_size > 100_000, 30, what="a partial download")
        else:
            wait_for(lambda: at in events.names(), 60, interval=0.005, what=at)
        agent.kill9()
        agent.start()
        agent.wait_ready()
        wait_for(lambda: cli.call("status")["result"]["model"]["loaded"], 30, what="model loaded")
        serving = cli.call("status")["result"]["model"]["version"]
        listed = cli.call("model.list")["result"]
        assert serving in (shipped_model_dir().name, "9.7.0")
        assert listed["active"] == ("9.7.0" if serving == "9.7.0" else "default"), (serving, listed)
        if serving != "9.7.0":
            ev = events.wait("failed")
            assert ev["reason"] == "interrupted" and ev["version"] == "9.7.0"
        assert not (tmp_path / "state" / "models" / ".incoming").exists()
        installed = tmp_path / "state" / "models" / NAME
        for d in (installed.iterdir() if installed.exists() else []):  # whatever is installed verifies whole
            from edge_agent.glm.models import load_verified
            load_verified(d, [_pub(signer[0])])
        if serving != "9.7.0":  # the update can be made again, and lands
            r = cli.call("model.update", {"url": srv.url + path, "wait": True}, timeout=90)
            assert r["ok"] and r["result"]["active"] is True, r
    finally:
        cli.close()
        events.close()
        srv.stop()
    assert agent.stop() == 0


def test_the_trusted_keys_rotate_only_when_the_current_set_signs_the_new_one(tmp_path, pki, signer, server):
    """model.keys: a new set signed by a key of the current set, with a higher serial, replaces it; a set signed
    by a stranger, or an old set replayed, is refused; a bundle signed by the removed key is then refused."""
    from edge_agent.ota import UpdateError, key_set_message

    new = Ed25519PrivateKey.generate()
    new_path = tmp_path / "new.pem"
    new_path.write_bytes(new.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    stranger = Ed25519PrivateKey.generate()

    def sig(key, keys, serial):
        return base64.b64encode(key.sign(key_set_message(keys, serial))).decode()

    async def main():
        async with Rig(tmp_path, pki, _pub(signer[0])) as rig:
            with pytest.raises(UpdateError, match="not signed by a key of the current set"):
                await rig.updater.rotate_keys([_pub(new)], 1, sig(stranger, [_pub(new)], 1))
            r = await rig.updater.rotate_keys([_pub(new)], 1, sig(signer[0], [_pub(new)], 1))
            assert _pub(new) in r["keys"] and _pub(signer[0]) not in r["keys"]
            with pytest.raises(UpdateError, match="serial 1 is not above 1"):  # a replay
                await rig.updater.rotate_keys([_pub(signer[0])], 1, sig(new, [_pub(signer[0])], 1))
            old = pack(server.root, "9.8.0", signer[1])
            with pytest.raises(UpdateError, match="does not verify with any trusted key"):
                await rig.updater.update(url=server.url + old, wait=True)
            fresh = pack(server.root, "9.9.0", new_path)
            assert (await rig.updater.update(url=server.url + fresh, wait=True))["active"] is True
            assert "keys_rotated" in [e["event"] for e in await rig.events()]
        async with Rig(tmp_path, pki, _pub(signer[0])) as rig:  # the rotation outlives a restart
            assert _pub(signer[0]) not in rig.updater.keys and rig.updater.state.keys_serial == 1
    asyncio.run(main())
    r = subprocess.run([sys.executable, "-m", "edge_agent", "model", "keys", _pub(new), "--key", str(new_path),
                        "--serial", "2"], capture_output=True, text=True, timeout=60)
    req = json.loads(r.stdout)
    assert req["serial"] == 2 and req["keys"] == _pub(new)
    new.public_key().verify(base64.b64decode(req["sig"]), key_set_message([_pub(new)], 2))


def test_model_install_from_the_cli_and_old_versions_pruned(tmp_path, pki, signer, local_broker, cloud_broker,
                                                            make_agent):
    """`edge-agent model install DIR` through the running agent (each step printed, the outcome as JSON); with
    ota.keep_versions = 2, the oldest installed version goes once a third is good."""
    from conftest import wait_for

    agent = _ota_agent(make_agent, local_broker, cloud_broker, signer, keep_versions=2, good_after_s=1).start()
    agent.wait_ready()
    cfg = agent.config_path
    try:
        def install(version: str) -> subprocess.CompletedProcess:
            folder = Path(pack(tmp_path / "bundles", version, signer[1]).lstrip("/"))
            return subprocess.run([sys.executable, "-m", "edge_agent", "model", "install",
                                   str(tmp_path / "bundles" / folder), "--config", str(cfg)],
                                  capture_output=True, text=True, timeout=120)
        (tmp_path / "bundles").mkdir()
        wait_for(lambda: "model loaded" in agent.log(), 30, what="model loaded")
        for v in ("10.0.0", "10.1.0", "10.2.0"):
            r = install(v)
            assert r.returncode == 0, r.stdout + r.stderr
            assert json.loads(r.stdout.strip().splitlines()[-1]) == {"outcome": "active", "version": v}
            assert "model update: staged" in r.stderr
            time.sleep(1.5)  # marked good
        models = tmp_path / "state" / "models" / NAME
        wait_for(lambda: sorted(p.name for p in models.iterdir()) == ["10.1.0", "10.2.0"], 10,
                 what="the oldest version deleted")
        r = subprocess.run([sys.executable, "-m", "edge_agent", "model", "list", "--config", str(cfg)],
                           capture_output=True, text=True, timeout=60)
        listed = json.loads(r.stdout)["result"]
        assert listed["active"] == "10.2.0" and listed["good"][-2:] == ["10.1.0", "10.2.0"], listed
    finally:
        assert agent.stop() == 0


def test_rollback_serves_the_previous_good_version_and_marks_the_current_bad(tmp_path, pki, signer, server):
    a, b = pack(server.root, "11.0.0", signer[1]), pack(server.root, "11.1.0", signer[1])

    async def main():
        from edge_agent.ota import UpdateError

        async with Rig(tmp_path, pki, _pub(signer[0]), good_after_s=0.2) as rig:
            await rig.updater.update(url=server.url + a, wait=True)
            await asyncio.sleep(0.5)  # 11.0.0 marked good
            await rig.updater.update(url=server.url + b, wait=True)
            assert rig.agent.model_name_version() == f"{NAME}@11.1.0"
            r = await rig.updater.rollback()
            assert r == {"active": "11.0.0", "previous": "11.1.0"}
            assert rig.agent.model_name_version() == f"{NAME}@11.0.0"
            st = rig.updater.state
            assert st.active == "11.0.0" and st.bad["11.1.0"] == "rolled back by an operator"
            assert st.highest == "11.1.0"  # the floor stays: 11.1.0 cannot come back, nor anything below it
            with pytest.raises(UpdateError, match="marked bad"):
                await rig.updater.update(url=server.url + b, wait=True)
            assert [e["event"] for e in await rig.events()][-3:-1] == ["rolled_back", "requested"]
    asyncio.run(main())
