"""Trust, round three (issue 25): each test performs an attack an outside review found on the previous main and
asserts the promise it broke."""
from __future__ import annotations

import asyncio
import time

from test_ota import signer  # noqa: F401  (the publisher's key, a fixture)

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


def _model_copy(tmp_path, name="m"):
    import shutil

    from edge_agent.glm.engine import shipped_model_dir
    d = tmp_path / name
    shutil.copytree(shipped_model_dir(), d)
    return d


def test_a_negative_file_size_in_a_signed_manifest_is_refused(tmp_path):
    """Attack: a signed manifest lists one file at -10 GB beside a real one, so the bundle's total passes
    ota.max_bundle_bytes while the real file is as large as the attacker likes. Each size is checked: refused."""
    import pytest
    from test_glm import _resign

    from edge_agent.glm.models import ModelError, load_verified
    d = _model_copy(tmp_path)
    (d / "pad.bin").write_bytes(b"")
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    pub = _resign(d, Ed25519PrivateKey.generate(), lambda m: m["files"].__setitem__(
        "pad.bin", {"sha256": "0" * 64, "size": -10 << 30}))
    with pytest.raises(ModelError, match="size of 0 bytes or more"):
        load_verified(d, pub)


def test_a_symlinked_model_folder_is_refused(tmp_path):
    """Attack: the model folder is a link that can be turned to another folder between the check and the load."""
    import os

    import pytest

    from edge_agent.config import ModelConfig
    from edge_agent.glm.models import ModelError, load_verified
    d = _model_copy(tmp_path)
    link = tmp_path / "current"
    os.symlink(d, link)
    load_verified(d, ModelConfig().public_key).close()
    with pytest.raises(ModelError, match="symbolic link") as e:
        load_verified(link, ModelConfig().public_key)
    assert e.value.reason == "path"


def test_a_model_file_rewritten_in_place_after_verification_does_not_load(tmp_path):
    """Attack: the graph is rewritten in place (same inode) after the gate hashed it and before ONNX Runtime reads
    it: what would load is not what was verified. The load is refused (`digest`), nothing serves from it."""
    import pytest

    from edge_agent.config import ModelConfig
    from edge_agent.glm import runtime
    from edge_agent.glm.models import ModelError, load_verified
    d = _model_copy(tmp_path)
    m = load_verified(d, ModelConfig().public_key, ["CPUExecutionProvider"])
    graph = d / m.file_for("CPUExecutionProvider")
    with open(graph, "r+b") as f:  # the same inode, same bytes even: any write in between is refused
        head = f.read(16)
        f.seek(0)
        f.write(head)
    with pytest.raises(ModelError, match="changed after it was verified") as e:
        runtime.open_session(m, runtime.RuntimeOptions(["cpu"], 1))
    assert e.value.reason == "digest"
    m.close()
    m = load_verified(d, ModelConfig().public_key, ["CPUExecutionProvider"])  # verified again as it is now: loads
    assert runtime.open_session(m, runtime.RuntimeOptions(["cpu"], 1)).provider == "cpu"
    m.close()


def test_a_deeply_nested_request_is_bad_request_not_internal():
    """Attack: a request nested 5,000 deep (within max_request_bytes) answered `internal` with a traceback. Now `bad_request`, and a document
    nested past 32 levels (which an operation would walk) is refused the same way."""
    import json

    from test_ask_safety import FakeGateway, _router
    router = _router(FakeGateway(), "confirm")

    async def main():
        for body in (b'{"id":"x-1","text":' + b"[" * 5000 + b"]" * 5000 + b"}",
                     json.dumps({"id": "x-2", "text": json.loads("[" * 40 + "]" * 40)}).encode()):
            reply, rid = await router.handle("ask", body, "mqtt")
            doc = json.loads(reply)
            assert doc["error"]["code"] == "bad_request" and "nested deeper than 32" in doc["error"]["message"], doc
            assert rid in ("x-1", "x-2")
        assert router.metrics.value("edge_agent_commands_total", {"command": "ask", "outcome": "internal"}) in (None, 0)
    asyncio.run(main())


def test_idle_control_connections_cannot_lock_the_cli_out(tmp_path):
    """Attack: 16 connections to the control socket that never send a request held every slot for 10 s; the CLI was
    refused `busy`. Now the oldest idle connection gives way, and the CLI's request is answered at once."""
    import socket

    from edge_agent.control import MAX_CLIENTS, ControlServer, call, socket_path

    async def handle(name, body, who):
        return b'{"ok":true,"result":"pong"}', None

    async def main():
        server = ControlServer(tmp_path, handle)
        task = asyncio.ensure_future(server.run())
        for _ in range(100):
            if socket_path(tmp_path).exists():
                break
            await asyncio.sleep(0.02)
        idle = []
        for _ in range(MAX_CLIENTS + 4):
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(socket_path(tmp_path)))
            idle.append(s)
        await asyncio.sleep(0.2)
        t = time.monotonic()
        reply = await asyncio.get_running_loop().run_in_executor(None, lambda: call(tmp_path, "ping", {}, 5.0))
        assert reply == {"ok": True, "result": "pong"} and time.monotonic() - t < 2
        for s in idle:
            s.close()
        await server.stop()
        await task
    asyncio.run(main())


def test_concurrent_rule_adds_never_pass_the_command_rule_cap(local_broker, cloud_broker, make_agent, pki):
    """Attack: rules.add sent 12 times at once with rules.max_command_rules = 3: the check and the add were split by
    an await, and more than 3 got in. Exactly 3 are kept; the rest are refused."""
    import json

    from test_commands import CommandClient

    from conftest import wait_for
    agent = make_agent(local_broker, cloud_broker, model={"enabled": False}, rules={"max_command_rules": 3},
                       commands={"allow": ["read-only", "rules.add"], "concurrency": 16}).start()
    agent.wait_ready()
    wait_for(lambda: agent.metric("edge_agent_uplink_connected") == 1, 10, what="uplink")
    cli = CommandClient(cloud_broker, pki, "5")
    try:
        for i in range(12):
            cli.c.publish("edge/gw-test/cmd/rules.add", json.dumps({"id": f"r-{i}", "rule": {
                "id": f"hot-{i}", "kind": "above", "device": "b-1", "point": "t", "threshold": 80}}).encode(), qos=1)
        wait_for(lambda: (agent.metric("edge_agent_commands_total", 'command="rules.add",outcome="ok"') or 0)
                 + (agent.metric("edge_agent_commands_total", 'command="rules.add",outcome="refused"') or 0) == 12,
                 20, what="all 12 answered")
        assert agent.metric("edge_agent_commands_total", 'command="rules.add",outcome="ok"') == 3
        assert len(cli.call("rules.list")["result"]) == 3
    finally:
        cli.close()
    assert agent.stop() == 0


def _slow_server(tmp_path, pki, rate: str):
    from edge_agent.devkit.brokers import Nginx
    root = tmp_path / "www"
    root.mkdir()
    cert, key = pki["ca"].issue("model-server", server=True)
    return Nginx(tmp_path / "nginx", root, pki["ca"].cert_path, cert, key, rate=rate).start()


def _ota_attack(tmp_path, pki, signer, rate: str, act, **ota):
    """An update from a server that sends `rate` bytes a second; `act(rig, task)` does the rest. Returns the events
    and the UpdateError it ended with."""
    import pytest
    from test_ota import Rig, _pub, pack

    from edge_agent.ota import UpdateError
    server = _slow_server(tmp_path, pki, rate)
    path = pack(server.root, "9.7.0", signer[1])
    out = {}

    async def main():
        async with Rig(tmp_path, pki, _pub(signer[0]), **ota) as rig:
            t0 = time.monotonic()
            task = asyncio.ensure_future(rig.updater.update(url=server.url + path, wait=True))
            await act(rig, task)
            with pytest.raises(UpdateError) as e:
                await asyncio.wait_for(task, 30)
            out["elapsed"] = time.monotonic() - t0
            out["error"] = e.value
            out["events"] = await rig.events()
            out["busy"] = rig.updater.busy()
            out["active"] = rig.updater.state.active
            out["count"] = rig.count("failed", e.value.reason)
            assert not (tmp_path / "state" / "models" / ".incoming").exists()
    try:
        asyncio.run(main())
    finally:
        server.stop()
    return out


async def _nothing(rig, task):
    return None


def test_a_drip_feeding_model_server_fails_the_update_as_slow(tmp_path, pki, signer):
    """Attack (Uptane's slow retrieval): the model server drips bytes just inside the per-read timeout, which held
    an update forever and answered every later update `busy`. Below ota.min_rate_bps over a window it fails (reason
    slow) within a few seconds; the serving model is unchanged; the event says why."""
    out = _ota_attack(tmp_path, pki, signer, "2k", _nothing, min_rate_bps=32768, rate_window_s=2, deadline_s=600)
    assert out["error"].reason == "slow" and "ota.min_rate_bps" in out["error"].message
    assert out["elapsed"] < 15 and not out["busy"] and out["active"] is None and out["count"] == 1
    assert out["events"][-1]["event"] == "failed" and out["events"][-1]["reason"] == "slow"


def test_an_update_that_outlasts_its_deadline_fails(tmp_path, pki, signer):
    """Attack (endless data at an honest rate): the whole download must end within ota.deadline_s."""
    out = _ota_attack(tmp_path, pki, signer, "64k", _nothing, min_rate_bps=0, deadline_s=2)
    assert out["error"].reason == "deadline" and out["elapsed"] < 10 and out["active"] is None
    assert out["events"][-1]["reason"] == "deadline" and out["count"] == 1


def test_cancel_stops_a_stuck_download_at_once_and_the_next_update_is_not_busy(tmp_path, pki, signer):
    """Attack: an update stuck on a slow server answered later updates `busy`, even after cancel. model.cancel
    stops it at once (reason cancelled), and the updater takes the next update."""
    async def cancel(rig, task):
        await asyncio.sleep(1.5)
        assert rig.updater.busy()
        t = time.monotonic()
        assert rig.updater.abort() is True
        await asyncio.wait({task}, timeout=5)
        assert task.done() and time.monotonic() - t < 3
    out = _ota_attack(tmp_path, pki, signer, "1k", cancel, min_rate_bps=0, deadline_s=600)
    assert out["error"].reason == "cancelled" and not out["busy"] and out["active"] is None
    assert out["events"][-1]["event"] == "failed" and out["events"][-1]["reason"] == "cancelled"


def test_a_rollback_permission_is_bound_short_lived_and_never_replayed():
    """Attack: a signed `rollback: true` bundle with no expiry passed the anti-rollback floor forever: the same old
    bundle was accepted again after two newer versions. A rollback permission now names the version it rolls back
    from (the floor), expires within 7 days, and is used once. The check alone, no files, no network."""
    import pytest

    from edge_agent.ota import OtaState, UpdateError, check_update
    now = 1_800_000_000.0
    st = OtaState(name="m", active="1.5.0", highest="1.5.0")
    base = {"name": "m", "version": "1.4.0", "rollback": True}
    for manifest, reason, why in (
            ({**base, "rollback": False}, "downgrade", "not above 1.5.0"),
            ({**base, "expires": now + 3600}, "downgrade", "rollback permission is from None"),
            ({**base, "rollback_from": "1.5.0"}, "expired", "must expire within 7 days"),
            ({**base, "rollback_from": "1.5.0", "expires": now + 30 * 86400}, "expired", "must expire within"),
            ({**base, "rollback_from": "1.5.0", "expires": now - 1}, "expired", "expired at")):
        with pytest.raises(UpdateError) as e:
            check_update(manifest, st, now, "m", "d1")
        assert e.value.reason == reason and why in e.value.message, (manifest, e.value.message)
    good = {**base, "rollback_from": "1.5.0", "expires": now + 86400}
    check_update(good, st, now, "m", "d1")  # bound, short-lived, fresh: allowed
    with pytest.raises(UpdateError, match="used already"):
        check_update(good, OtaState(name="m", active="1.4.0", highest="1.5.0", rollbacks=["d1"]), now, "m", "d1")
    with pytest.raises(UpdateError, match="floor is 1.7.0"):  # two newer versions later, the old permission is void
        check_update(good, OtaState(name="m", active="1.7.0", highest="1.7.0"), now, "m", "d1")


def test_a_used_rollback_bundle_is_refused_when_replayed(tmp_path, pki, signer):
    """End to end against the model server: 9.1.0, then 9.2.0, then a rollback permission to 9.0.5 from 9.2.0
    (packed by the CLI) serves; the same bundle sent again is refused and 9.0.5 keeps serving."""
    import pytest
    from test_ota import Rig, _pub, pack

    from edge_agent.ota import UpdateError
    server = _slow_server(tmp_path, pki, "0")
    urls = [server.url + pack(server.root, v, signer[1]) for v in ("9.1.0", "9.2.0")]
    back = server.url + pack(server.root, "9.0.5", signer[1], "--rollback", "--rollback-from", "9.2.0")

    async def main():
        async with Rig(tmp_path, pki, _pub(signer[0])) as rig:
            for url in urls:
                await rig.updater.update(url=url, wait=True)
            assert (await rig.updater.update(url=back, wait=True))["version"] == "9.0.5"
            with pytest.raises(UpdateError, match="used already") as e:
                await rig.updater.update(url=back, wait=True)
            assert e.value.reason == "downgrade" and rig.updater.state.active == "9.0.5"
            assert rig.agent.model_name_version().endswith("@9.0.5")
    try:
        asyncio.run(main())
    finally:
        server.stop()


def test_a_renewal_never_shortens_the_gateways_life_nor_accepts_a_ca(tmp_path):
    """Attack: the signer (or whoever answers on certs/crt) returns a certificate for the new key that expires
    within hours, while the live one has months: renewal committed it, and when the signer went silent the gateway
    was cut off. A CA:TRUE certificate was accepted too. Both are refused; the live pair stays."""
    import datetime as dt

    import pytest
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    from edge_agent import certs
    from edge_agent.devkit.certs import CA
    ca = CA(tmp_path / "ca")
    now = dt.datetime.now(dt.timezone.utc)
    cert, key = ca.issue("gw-1", not_after=now + dt.timedelta(days=200))
    files = certs.Files(str(cert), str(key))
    key_pem, csr_pem = certs.make_key_and_csr("gw-1")
    files.write_key(key_pem)
    csr = x509.load_pem_x509_csr(csr_pem)

    def signed(days: float, is_ca: bool = False) -> bytes:
        c = (x509.CertificateBuilder().subject_name(csr.subject).issuer_name(ca.cert.subject)
             .public_key(csr.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=days))
             .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
             .sign(ca.key, hashes.SHA256()))
        return c.public_bytes(serialization.Encoding.PEM)

    with pytest.raises(certs.RenewalError, match="before the live one"):
        files.accept(signed(0.2), "gw-1", str(ca.cert_path))
    with pytest.raises(certs.RenewalError, match="not a leaf"):
        files.accept(signed(400, is_ca=True), "gw-1", str(ca.cert_path))
    assert not files.cert_new.exists() and cert.read_bytes() == files.cert.read_bytes()
    # a fleet moving to shorter certificates says so: a 90-day one is taken where the minimum is 60 days
    with pytest.raises(certs.RenewalError, match="before the live one"):
        files.accept(signed(90), "gw-1", str(ca.cert_path))
    files.accept(signed(90), "gw-1", str(ca.cert_path), min_lifetime_s=60 * 86400)
    files.accept(signed(400), "gw-1", str(ca.cert_path))  # a longer one, always


def test_a_registry_flood_degrades_only_new_devices_of_its_own_source(tmp_path):
    """Attack: many made-up devices with many points each filled the registry's total in under two seconds; new
    legitimate devices were refused until the flood expired. Now a source registers at most
    store.new_points_per_minute series a minute (`new_point_rate`), and new unconfigured devices stop at
    store.registry_reserve short of the bounds: a device the config names still registers, and known series go on."""
    async def main():
        cfg = StoreConfig(max_points=1000, max_points_per_device=100, new_devices_per_minute=10_000,
                          new_points_per_minute=300, registry_reserve=0.2)
        s = Store(cfg, tmp_path, Metrics(), configured_devices=frozenset({"plc-1"}))
        await s.open()
        await s.write([Reading("known-1", "t", 1.0, None, time.time_ns(), "good", "mqtt")])
        now = time.time_ns()
        for d in range(50):  # the flood: 50 devices x 100 points, in a second
            await s.write([Reading(f"fake-{d}", f"p{p}", 1.0, None, now, "good", "mqtt") for p in range(100)])
        assert len(s.registry.series) <= 1 + 300
        refused = s.metrics.value("edge_agent_readings_refused_total", {"reason": "new_point_rate"}) or 0
        assert refused >= 5000 - 300
        # the budget is per source: a configured PLC over OPC UA registers all its points
        await s.write([Reading("plc-1", f"n{p}", 1.0, None, now, "good", "opcua") for p in range(60)])
        assert sum(1 for d, _ in s.registry.series if d == "plc-1") == 60
        # with the rate lifted, a flood stops at the reserve: 80 % of max_points
        s.registry.cfg = StoreConfig(**{**cfg.__dict__, "new_points_per_minute": 1_000_000})
        for d in range(50, 70):
            await s.write([Reading(f"fake-{d}", f"p{p}", 1.0, None, now, "good", "coap") for p in range(100)])
        assert 790 <= len(s.registry.series) <= 800
        await s.write([Reading("plc-1", f"m{p}", 1.0, None, now, "good", "opcua") for p in range(30)])
        assert sum(1 for d, _ in s.registry.series if d == "plc-1") == 90  # the configured PLC: into the reserve
        before = s.metrics.value("edge_agent_readings_committed_total") or 0
        await s.write([Reading("known-1", "t", 2.0, None, now, "good", "mqtt")])  # a known series goes on
        assert (s.metrics.value("edge_agent_readings_committed_total") or 0) == before + 1
        await s.close()
    asyncio.run(main())


def test_a_gateway_whose_clock_is_wrong_keeps_the_devices_correct_timestamp():
    """Attack (a bad day): the gateway lost its time at a power cut and reads 2020; a device with a good clock sends
    its timestamp. It was replaced by the wrong receive time (ts_ahead). A gateway clock before this release's date
    is known wrong: the device's timestamp is kept (quality good, counted gateway_clock_behind). With the gateway's
    clock right, a device clock far ahead is still retimed."""
    from edge_agent.config import PayloadConfig
    from edge_agent.southbound.decode import CLOCK_FLOOR_NS, make_decoder

    seen: list[str] = []
    dec = make_decoder(PayloadConfig(ts_path="ts", ts_unit="ms"), "devices/{device}", "mqtt", retimed=seen.append)
    device_ts_ms = CLOCK_FLOOR_NS // 1_000_000 + 30 * 86400 * 1000  # the device: a month after the floor
    wrong_clock = 1_577_836_800 * 1_000_000_000  # the gateway: 2020-01-01
    (r,) = dec("devices/pump-1", b'{"ts": %d, "values": {"t": 1}}' % device_ts_ms, wrong_clock)
    assert r.ts_ns == device_ts_ms * 1_000_000 and r.quality == "good" and seen == ["gateway_clock_behind"]
    right_clock = device_ts_ms * 1_000_000 - 5 * 86400 * 1_000_000_000  # the gateway right, the device 5 days ahead
    (r,) = dec("devices/pump-1", b'{"ts": %d, "values": {"t": 1}}' % device_ts_ms, right_clock)
    assert r.ts_ns == right_clock and r.quality == "ts_ahead"


def test_a_tensorrt_engine_cache_file_nobody_checked_is_never_loaded(tmp_path):
    """Attack: the TensorRT engine cache (code the GPU runs) was loaded as found. Each cache folder is sealed with its
    files' sha256 after a session; before the next, a file changed or added since, or a link, is removed (TensorRT
    builds it again); a cache folder others may write is refused. (No GPU here: the seal itself, as the runtime
    calls it.)"""
    import os

    import pytest

    from edge_agent.glm.runtime import check_cache, seal_cache
    d = tmp_path / "trt-engines" / "abc"
    d.mkdir(parents=True, mode=0o700)
    (d / "model.engine").write_bytes(b"engine built here")
    (d / "model.profile").write_bytes(b"profile")
    assert check_cache(d) == ["model.engine", "model.profile"]  # never sealed: nothing in it is trusted
    (d / "model.engine").write_bytes(b"engine built here")
    (d / "model.profile").write_bytes(b"profile")
    seal_cache(d)
    assert check_cache(d) == []  # as sealed: kept
    (d / "model.engine").write_bytes(b"engine with a payload")
    (d / "extra.engine").write_bytes(b"planted")
    os.symlink("/etc/passwd", d / "link.engine")
    assert sorted(check_cache(d)) == ["extra.engine", "link.engine", "model.engine"]
    assert sorted(p.name for p in d.iterdir()) == [".sealed.json", "model.profile"]
    os.chmod(d, 0o770)
    with pytest.raises(PermissionError, match="mode 0700"):
        check_cache(d)


def test_a_flood_of_refused_reply_topics_logs_a_few_lines_not_one_each(local_broker, cloud_broker, make_agent, pki):
    """Attack: every command with a reply topic outside the allowed prefixes logged a warning, without a rate limit
    (each one a log line shipped to the cloud and kept in the store: it fed the log storm of finding 2). 200 of them
    are all refused and counted, and logged at most a few times."""
    import uuid

    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    from test_commands import CommandClient

    from conftest import wait_for
    agent = make_agent(local_broker, cloud_broker, model={"enabled": False}).start()
    agent.wait_ready()
    wait_for(lambda: agent.metric("edge_agent_uplink_connected") == 1, 10, what="uplink")
    cli = CommandClient(cloud_broker, pki, "5")
    try:
        for _ in range(200):
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = "cloud/anything"
            props.CorrelationData = uuid.uuid4().bytes
            cli.c.publish("edge/gw-test/cmd/ping", b"{}", qos=1, properties=props)
        wait_for(lambda: agent.metric("edge_agent_commands_total", 'command="unknown",outcome="bad_reply_topic"')
                 == 200, 20, what="all refused")
    finally:
        cli.close()
    assert agent.log().count("response topic is outside the allowed prefixes") <= 4
    assert agent.stop() == 0
