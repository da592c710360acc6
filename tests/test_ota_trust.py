"""The OTA trust object alone: no files, no network, no event loop. Each test is an attack it decides, on manifests
signed here in memory."""
from __future__ import annotations

import base64
import json
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.ota import OtaState, Target, Trust, UpdateError, key_set_message

NOW = 1_800_000_000.0


def _pub(key: Ed25519PrivateKey) -> str:
    return base64.b64encode(key.public_key().public_bytes(serialization.Encoding.Raw,
                                                          serialization.PublicFormat.Raw)).decode()


ROOT, PUBLISHER, STRANGER = (Ed25519PrivateKey.generate() for _ in range(3))


def bundle(version: str = "2.0.0", key: Ed25519PrivateKey = PUBLISHER, **extra) -> tuple[bytes, bytes]:
    m = {"name": "glm-edge-iot", "version": version, "tokenizer": "tokenizer.json",
         "files": {"tokenizer.json": {"sha256": "0" * 64, "size": 10}, "model.onnx": {"sha256": "1" * 64, "size": 99}},
         "providers": {"CPUExecutionProvider": "model.onnx"},
         "architecture": {"vocab_size": 1, "num_hidden_layers": 1, "num_key_value_heads": 1, "head_dim": 1,
                          "context": 1},
         **extra}
    body = json.dumps(m).encode()
    return body, base64.b64encode(key.sign(body))


def trust(**state) -> Trust:
    st = OtaState(**{"name": "glm-edge-iot", "active": "1.5.0", "highest": "1.5.0", **state})
    return Trust(st, _pub(ROOT), [_pub(PUBLISHER)], Target("gw-1", "aarch64"), max_bundle_bytes=1 << 20)


def refused(t: Trust, body_sig: tuple[bytes, bytes], reason: str, why: str) -> None:
    with pytest.raises(UpdateError) as e:
        t.manifest(*body_sig, NOW, "glm-edge-iot")
    assert e.value.reason == reason and why in e.value.message, e.value.message


def test_a_manifest_signed_by_a_trusted_key_passes_and_raises_the_floor_once_it_serves():
    t = trust()
    body, sig = bundle("2.0.0")
    m = t.manifest(body, sig, NOW, "glm-edge-iot")
    assert m["version"] == "2.0.0" and t.state.highest == "1.5.0"  # verified is not yet serving
    t.activated(m, body)
    assert t.state.highest == "2.0.0"
    refused(t, bundle("2.0.0"), "downgrade", "not above 2.0.0")


def test_untrusted_key():
    refused(trust(), bundle(key=STRANGER), "signature", "does not verify with any trusted key")
    body, _ = bundle()
    refused(trust(), (body, base64.b64encode(PUBLISHER.sign(body + b" "))), "signature", "does not verify")


def test_rollback_below_the_floor():
    refused(trust(), bundle("1.4.0"), "downgrade", "not above 1.5.0")
    refused(trust(), bundle("1.4.0", rollback=True, rollback_from="1.5.0"), "expired", "must expire within 7 days")
    ok = bundle("1.4.0", rollback=True, rollback_from="1.5.0", expires=NOW + 3600)
    t = trust()
    t.activated(t.manifest(*ok, NOW, "glm-edge-iot"), ok[0])
    refused(t, ok, "downgrade", "used already")


def test_expired_manifest():
    refused(trust(), bundle(expires=NOW - 1), "expired", "expired at")
    refused(trust(), bundle(expires="never"), "expired", "expired at")


def test_a_key_set_with_a_lower_or_equal_serial():
    t = trust(keys_serial=4)
    new = [_pub(STRANGER)]
    for serial in (3, 4):
        sig = base64.b64encode(PUBLISHER.sign(key_set_message(new, serial))).decode()
        with pytest.raises(UpdateError, match="not above 4"):
            t.rotate(new, serial, sig)
    with pytest.raises(UpdateError, match="not signed by a key of the current set"):  # a stranger signs itself in
        t.rotate(new, 5, base64.b64encode(STRANGER.sign(key_set_message(new, 5))).decode())
    t.rotate(new, 5, base64.b64encode(PUBLISHER.sign(key_set_message(new, 5))).decode())
    assert t.keys == [_pub(ROOT), _pub(STRANGER)] and t.state.keys_serial == 5
    refused(t, bundle(key=PUBLISHER), "signature", "does not verify")  # the old publisher is out now


def test_a_manifest_naming_files_outside_the_bundle():
    body, sig = bundle()
    m = json.loads(body)
    m["files"]["../../etc/cron.d/x"] = {"sha256": "0" * 64, "size": 1}
    body = json.dumps(m).encode()
    refused(trust(), (body, base64.b64encode(PUBLISHER.sign(body))), "path", "not a plain name")
    m["files"] = {"tokenizer.json": {"sha256": "0" * 64, "size": -(1 << 40)}, "model.onnx": m["files"]["model.onnx"]}
    body = json.dumps(m).encode()
    refused(trust(), (body, base64.b64encode(PUBLISHER.sign(body))), "manifest", "size of 0 bytes or more")


def test_a_model_marked_bad():
    t = trust()
    t.mark_bad("2.0.0", "its smoke set failed")
    refused(t, bundle("2.0.0"), "health", "marked bad: its smoke set failed")


def test_a_bundle_for_another_gateway_or_hardware():
    refused(trust(), bundle(gateways=["gw-2"]), "wrong_target", "meant for gateways gw-2")
    refused(trust(), bundle(hardware=["jetson-orin-nano"]), "wrong_target", "this gateway is 'aarch64'")
    assert trust().manifest(*bundle(gateways=["gw-1", "gw-2"], hardware=["aarch64"]), NOW, "glm-edge-iot")


def test_a_bundle_above_the_size_bound_and_another_model():
    body, sig = bundle()
    m = json.loads(body)
    m["files"]["model.onnx"]["size"] = 2 << 20
    body = json.dumps(m).encode()
    refused(trust(), (body, base64.b64encode(PUBLISHER.sign(body))), "size", "ota.max_bundle_bytes")
    with pytest.raises(UpdateError, match="this gateway runs 'other'"):
        trust().manifest(*bundle(), NOW, "other")


def test_the_trust_object_does_no_io(monkeypatch):
    """Every check above ran with open() and sockets forbidden."""
    import builtins
    import socket

    def no(*a, **k):
        raise AssertionError("the trust object did I/O")
    monkeypatch.setattr(builtins, "open", no)
    monkeypatch.setattr(socket, "socket", no)
    t = trust()
    body, sig = bundle("3.0.0")
    t.activated(t.manifest(body, sig, time.time(), "glm-edge-iot"), body)
    assert t.state.highest == "3.0.0"
