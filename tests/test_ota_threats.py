"""The model updater against the update threat models the field uses: TUF's attacks (arbitrary installation, endless
data, extraneous dependencies, fast-forward, indefinite freeze, mix-and-match, rollback, wrong software) and
Uptane's additions (slow retrieval, drop-request, partial bundle, replay to another device, wrong hardware). One test
per attack, against a real model server (nginx, mutual TLS): the gateway serves 9.0.0, the attack is tried, and
each test asserts the same three things — the serving model is unchanged, nothing half-written is left or loaded,
and an event and a counter say why."""
from __future__ import annotations

import asyncio
import base64
import json
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from test_ota import NAME, Rig, _pub, _rename, pack, server, signer  # noqa: F401  (fixtures)

from edge_agent.devkit.brokers import Nginx, free_port


def _resign(folder: Path, key: Ed25519PrivateKey, edit) -> None:
    m = json.loads((folder / "manifest.json").read_text())
    edit(m)
    body = (json.dumps(m, indent=2, sort_keys=True) + "\n").encode()
    (folder / "manifest.json").write_bytes(body)
    (folder / "manifest.sig").write_text(base64.b64encode(key.sign(body)).decode() + "\n")


def _attack(tmp_path, pki, signer, server, url: str, reason: str, expect: str, rig_kw=None, then=None):  # noqa: F811
    """9.0.0 serves; the update from `url` must fail or be refused with `reason`; the three promises hold."""
    from edge_agent.ota import UpdateError

    good = server.url + pack(server.root, "9.0.0", signer[1])

    async def main():
        async with Rig(tmp_path, pki, _pub(signer[0]), **(rig_kw or {})) as rig:
            await rig.updater.update(url=good, wait=True)
            before = len(await rig.events())
            with pytest.raises(UpdateError) as e:
                await asyncio.wait_for(rig.updater.update(url=url, wait=True), 60)
            assert e.value.reason == reason and expect in e.value.message, e.value.message
            # the serving model unchanged
            assert rig.agent.model_name_version() == f"{NAME}@9.0.0" and rig.updater.state.active == "9.0.0"
            assert rig.updater.state.highest == "9.0.0" and not rig.updater.busy()
            # nothing half-written left, and no other version installed
            models = tmp_path / "state" / "models"
            assert not (models / ".incoming").exists()
            assert sorted(p.name for p in (models / NAME).iterdir()) == ["9.0.0"]
            # an event and a counter that say why
            ev = (await rig.events())[before:]
            assert ev[0]["event"] == "requested" and ev[-1]["event"] in ("refused", "failed"), ev
            assert ev[-1]["reason"] == reason, ev
            assert rig.count(ev[-1]["event"], reason) == 1
            if then is not None:
                await then(rig)
    asyncio.run(main())


def _stranger(tmp_path) -> Path:
    key = Ed25519PrivateKey.generate()
    p = tmp_path / "stranger.pem"
    p.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))
    return p


# ---- TUF -------------------------------------------------------------------------------------------------------
def test_arbitrary_installation(tmp_path, pki, signer, server):
    """A bundle signed by a key the gateway does not trust."""
    path = pack(server.root, "9.1.0", _stranger(tmp_path))
    _attack(tmp_path, pki, signer, server, server.url + path, "signature", "does not verify with any trusted key")


def test_endless_data(tmp_path, pki, signer, server):
    """The server sends more bytes than the signed manifest states."""
    path = pack(server.root, "9.1.0", signer[1])
    f = server.root / path.lstrip("/") / "model.int8.onnx"
    f.write_bytes(f.read_bytes() + b"\0" * (4 << 20))
    _attack(tmp_path, pki, signer, server, server.url + path, "size", "the manifest says")


def test_extraneous_dependencies(tmp_path, pki, signer, server):
    """A signed manifest that names a file outside the bundle's folder."""
    path = pack(server.root, "9.1.0", signer[1])
    _resign(server.root / path.lstrip("/"), signer[0],
            lambda m: m["files"].__setitem__("../../etc/cron.d/x", m["files"]["tokenizer_config.json"]))
    _attack(tmp_path, pki, signer, server, server.url + path, "path", "not a plain name")


def test_fast_forward(tmp_path, pki, signer, server):
    """A version far ahead (999.0.0), signed by a stranger, must not raise the floor; nor may one that is signed
    but fails its health check: the next honest version still installs."""
    path = pack(server.root, "999.0.0", _stranger(tmp_path))
    honest = server.url + pack(server.root, "9.1.0", signer[1])

    def wrong_smoke(folder: Path) -> None:
        m = json.loads((folder / "manifest.json").read_text())
        m["smoke"] = [{"text": "list all devices", "call": {"tool": "status", "args": {}}}]
        (folder / "manifest.json").write_text(json.dumps(m))
    broken = server.url + pack(server.root, "998.0.0", signer[1], edit=wrong_smoke)

    async def then(rig):
        from edge_agent.ota import UpdateError
        with pytest.raises(UpdateError) as e:
            await rig.updater.update(url=broken, wait=True)
        assert e.value.reason == "health" and rig.updater.state.highest == "9.0.0"
        assert (await rig.updater.update(url=honest, wait=True))["version"] == "9.1.0"
    _attack(tmp_path, pki, signer, server, server.url + path, "signature", "does not verify", then=then)


def test_indefinite_freeze(tmp_path, pki, signer, server):
    """The server keeps serving an old manifest past its expiry, so the gateway would never learn of newer ones."""
    path = pack(server.root, "9.1.0", signer[1], "--expires-days", "-0.01")
    _attack(tmp_path, pki, signer, server, server.url + path, "expired", "expired")


def test_mix_and_match(tmp_path, pki, signer, server):
    """9.2.0's signed manifest served with a file of another build."""
    path = pack(server.root, "9.2.0", signer[1])
    other = pack(server.root, "9.3.0", signer[1], edit=lambda d: (d / "reference.jsonl").write_text(
        (d / "reference.jsonl").read_text().replace("a", "b", 1)))
    shutil.copyfile(server.root / other.lstrip("/") / "reference.jsonl",
                    server.root / path.lstrip("/") / "reference.jsonl")
    _attack(tmp_path, pki, signer, server, server.url + path, "digest", "reference.jsonl: sha256 does not match")


def test_rollback(tmp_path, pki, signer, server):
    """A correctly signed older version."""
    path = pack(server.root, "8.9.0", signer[1])
    _attack(tmp_path, pki, signer, server, server.url + path, "downgrade", "not above 9.0.0")


def test_wrong_software(tmp_path, pki, signer, server):
    """A correctly signed bundle of another model."""
    path = pack(server.root, "9.1.0", signer[1], edit=lambda d: _rename(d, "someone-elses-model"))
    _attack(tmp_path, pki, signer, server, server.url + path, "manifest", "someone-elses-model")


# ---- Uptane's additions ------------------------------------------------------------------------------------------
def test_slow_retrieval(tmp_path, pki, signer, server):
    """A mirror that drips the model file: below ota.min_rate_bps the update fails within the window."""
    root = tmp_path / "slow-www"
    root.mkdir()
    cert, key = pki["ca"].issue("model-server", server=True)
    slow = Nginx(tmp_path / "slow-nginx", root, pki["ca"].cert_path, cert, key, rate="2k").start()
    try:
        path = pack(root, "9.1.0", signer[1])
        _attack(tmp_path, pki, signer, server, slow.url + path, "slow", "ota.min_rate_bps",
                rig_kw={"min_rate_bps": 32768, "rate_window_s": 2})
    finally:
        slow.stop()


def test_drop_request(tmp_path, pki, signer, server):
    """Every request to the mirror is dropped (nothing answers): the update fails after its bounded tries, it does
    not hang, and the gateway says so."""
    dead = f"https://localhost:{free_port()}/{NAME}/9.1.0"
    _attack(tmp_path, pki, signer, server, dead, "download", "after 2 tries", rig_kw={"attempts": 2})


def test_partial_bundle(tmp_path, pki, signer, server):
    """The mirror serves the manifest but not every file it lists."""
    path = pack(server.root, "9.1.0", signer[1])
    (server.root / path.lstrip("/") / "reference.jsonl").unlink()
    _attack(tmp_path, pki, signer, server, server.url + path, "not_found", "reference.jsonl")


def test_replay_to_another_device(tmp_path, pki, signer, server):
    """A bundle signed for one gateway (model pack --for-gateway) sent to another."""
    path = pack(server.root, "9.1.0", signer[1], "--for-gateway", "gw-other")
    _attack(tmp_path, pki, signer, server, server.url + path, "wrong_target", "meant for gateways gw-other",
            rig_kw={"target": ("gw-test", "x86_64")})


def test_wrong_hardware(tmp_path, pki, signer, server):
    """A bundle built for one hardware kind (model pack --hardware) sent to a gateway of another."""
    path = pack(server.root, "9.1.0", signer[1], "--hardware", "jetson-orin-nano")
    _attack(tmp_path, pki, signer, server, server.url + path, "wrong_target", "meant for hardware jetson-orin-nano",
            rig_kw={"target": ("gw-test", "x86_64")})
