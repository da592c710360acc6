"""Uplink certificates replaced while telemetry flows: the connection switches to the new files with no restart and
no reading lost; a bad replacement is refused and the old connection keeps working; a certificate the broker does
not take falls back to the old one. Real Mosquitto requiring client certificates; certificates made here."""
from __future__ import annotations

import datetime as dt
import os
import shutil
import time
from pathlib import Path

from conftest import CloudSubscriber, Publisher, wait_for
from edge_agent.devkit.brokers import Mosquitto
from edge_agent.devkit.certs import CA


def _replace(cert_src: Path, key_src: Path, cert_dst: Path, key_dst: Path) -> None:
    """As an operator (or a renewal script) would: each file written beside, then renamed into place."""
    for src, dst in ((key_src, key_dst), (cert_src, cert_dst)):
        tmp = dst.with_name(dst.name + ".new")
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o600)
        os.replace(tmp, dst)


def test_new_certificate_files_switch_the_connection_without_a_restart_or_a_lost_reading(
        tmp_path, pki, local_broker, make_agent):
    ca1 = pki["ca"]
    ca2 = CA(tmp_path / "ca2", "second CA")
    bundle = tmp_path / "client-cas.pem"
    bundle.write_bytes(ca1.cert_path.read_bytes() + ca2.cert_path.read_bytes())
    server_cert, server_key = pki["server"]
    cloud = Mosquitto.mtls(tmp_path / "cloud", bundle, server_cert, server_key).start()
    live_cert, live_key = tmp_path / "gw.pem", tmp_path / "gw.key"
    c1, k1 = pki["gateway"]
    _replace(c1, k1, live_cert, live_key)
    agent = make_agent(local_broker, cloud, uplink={"cert_file": str(live_cert), "key_file": str(live_key),
                                                    "cert_watch_s": 0.3}).start()
    agent.wait_ready()
    sub = CloudSubscriber(cloud, pki)
    pub = Publisher(local_broker)
    n = 0
    seen: set = set()
    try:
        def send(k: int) -> None:
            nonlocal n
            for _ in range(k):
                pub.publish(n)
                n += 1
                time.sleep(0.01)

        send(100)
        wait_for(lambda: agent.metric("edge_agent_uplink_connected") == 1, 20, what="uplink")
        # a bad replacement: a key that is not the certificate's -> refused, the connection stays
        other_cert, other_key = ca1.issue("someone-else")
        _replace(c1, other_key, live_cert, live_key)
        wait_for(lambda: agent.metric("edge_agent_cert_reloads_total", 'outcome="invalid"') >= 1, 10,
                 what="the mismatched pair refused")
        # expired: refused too
        exp_cert, exp_key = ca2.issue("gw-test", not_before=dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc),
                                      not_after=dt.datetime(2021, 1, 1, tzinfo=dt.timezone.utc))
        _replace(exp_cert, exp_key, live_cert, live_key)
        wait_for(lambda: agent.metric("edge_agent_cert_reloads_total", 'outcome="invalid"') >= 2, 10,
                 what="the expired certificate refused")
        send(50)
        assert agent.metric("edge_agent_uplink_connected") == 1
        # valid and signed by a CA the broker trusts, but one it is about to stop trusting: the new pair from CA2
        c2, k2 = ca2.issue("gw-test")
        _replace(c2, k2, live_cert, live_key)
        wait_for(lambda: agent.metric("edge_agent_cert_reloads_total", 'outcome="switched"') == 1, 20,
                 what="the switch to the new certificate")
        send(50)
        # the broker's view: from now on it trusts only CA2; the agent (same process) reconnects, so it presents
        # the new certificate
        sub.close()
        cloud.stop()
        cloud = Mosquitto.mtls(tmp_path / "cloud", ca2.cert_path, server_cert, server_key, port=cloud.port).start()
        # the cloud's viewer needs a CA2 certificate too; its persistent session kept what came meanwhile
        seen.update(r["value"] for r in sub.readings() if r["point"] == "n")
        sub = CloudSubscriber(cloud, {"ca": ca1, "viewer": ca2.issue("cloud-viewer")})
        send(100)
        wait_for(lambda: agent.metric("edge_agent_uplink_connected") == 1, 30, what="reconnected under CA2 only")
        # a certificate the broker does not take (its CA is unknown to the broker): back to the old pair
        ca3 = CA(tmp_path / "ca3", "third CA")
        c3, k3 = ca3.issue("gw-test")
        _replace(c3, k3, live_cert, live_key)
        wait_for(lambda: agent.metric("edge_agent_cert_reloads_total", 'outcome="refused"') == 1, 30,
                 what="the broker's refusal")
        send(100)
        wait_for(lambda: agent.metric("edge_agent_uplink_connected") == 1, 30, what="back on the old pair")
        def got() -> list:
            return sorted(seen | {r["value"] for r in sub.readings() if r["point"] == "n"})
        wait_for(lambda: len(got()) >= n, 60, what=f"all {n} readings at the cloud")
        assert got() == list(range(n))  # no reading lost across three switches and a broker restart
        assert agent.proc.poll() is None and "edge agent started" in agent.log()
        assert agent.log().count('msg="edge agent started"') == 1  # never restarted
        assert "the cloud broker refused the new uplink certificate; back to the old one" in agent.log()
    finally:
        pub.close()
        sub.close()
        agent.stop()
        cloud.stop()


class Signer:
    """The cloud side's certificate signer (test code): reads CSRs on edge/+/certs/csr, answers each with a
    certificate signed by `ca` for the CSR's key and subject on that gateway's certs/crt. `hold` keeps the answers
    back (a signer that is slow, or a gateway killed mid-renewal)."""

    def __init__(self, broker, pki, ca: CA, days: float = 30) -> None:
        import json
        import threading

        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.ca, self.days, self.hold = ca, days, False
        self.csrs: list[dict] = []
        self.lock = threading.Lock()
        cert, key = pki["ca"].issue("cert-signer")
        c = self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id="cert-signer", protocol=paho.MQTTv311)
        c.tls_set(ca_certs=str(pki["ca"].cert_path), certfile=str(cert), keyfile=str(key))
        c.on_message = lambda _c, _u, m: self._on_csr(m.topic, json.loads(m.payload))
        c.on_connect = lambda cl, *_a: cl.subscribe("edge/+/certs/csr", 1)
        c.reconnect_delay_set(0.1, 0.5)
        c.connect("localhost", broker.port, 30)
        c.loop_start()
        time.sleep(0.3)

    def _on_csr(self, topic: str, doc: dict) -> None:
        with self.lock:
            self.csrs.append(doc)
        if not self.hold:
            self.answer(topic.split("/")[1], doc)

    def answer(self, gateway: str, doc: dict) -> None:
        import json

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        csr = x509.load_pem_x509_csr(doc["csr"].encode())
        now = dt.datetime.now(dt.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(csr.subject).issuer_name(self.ca.cert.subject)
                .public_key(csr.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=1)).not_valid_after(now + dt.timedelta(days=self.days))
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .sign(self.ca.key, hashes.SHA256()))
        pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        self.c.publish(f"edge/{gateway}/certs/crt", json.dumps({"id": doc["id"], "cert": pem}), qos=1)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def _serial(path: Path) -> int:
    from cryptography import x509
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def test_renewal_on_the_device_end_to_end_with_a_refusal_and_a_kill9(tmp_path, pki, local_broker, cloud_broker,
                                                                      make_agent):
    """A certificate two thirds through its life is renewed: the key is made on the gateway (only a CSR leaves),
    the signed certificate is checked, the broker takes it, then it is committed. A signer whose certificates the
    broker does not trust: the gateway falls back to the old pair. kill -9 while the signer's answer is awaited:
    the gateway comes back with a working pair, and renews later."""
    from cryptography.hazmat.primitives import serialization

    ca = pki["ca"]
    live_cert, live_key = tmp_path / "gw.pem", tmp_path / "gw.key"
    now = dt.datetime.now(dt.timezone.utc)
    c0, k0 = ca.issue("gw-test", not_before=now - dt.timedelta(hours=8), not_after=now + dt.timedelta(hours=2))
    _replace(c0, k0, live_cert, live_key)
    first = _serial(live_cert)
    stranger = CA(tmp_path / "stranger", "a CA the broker does not trust")
    signer = Signer(cloud_broker, pki, stranger)  # first, one the broker will refuse
    pub = Publisher(local_broker)
    agent = make_agent(local_broker, cloud_broker, commands={"allow": ["read-only", "certs.renew"]},
                       uplink={"cert_file": str(live_cert), "key_file": str(live_key), "renew": True,
                               "renew_retry_s": 1, "renew_timeout_s": 5}).start()
    try:
        agent.wait_ready()
        wait_for(lambda: agent.metric("edge_agent_cert_renewals_total", 'outcome="refused"') >= 1, 30,
                 what="the broker refusing the renewed certificate")
        wait_for(lambda: agent.metric("edge_agent_uplink_connected") == 1, 30, what="back on the old pair")
        assert _serial(live_cert) == first and not Path(str(live_key) + ".new").exists()
        # kill -9 while the signer holds its answer
        signer.ca, signer.hold = ca, True
        n_csr = len(signer.csrs)
        wait_for(lambda: len(signer.csrs) > n_csr, 30, what="a CSR awaiting its answer")
        agent.kill9()
        assert Path(str(live_key) + ".new").exists()  # the renewal was in the middle
        signer.hold = False
        agent.start()
        agent.wait_ready()
        wait_for(lambda: agent.metric("edge_agent_cert_renewals_total", 'outcome="ok"') == 1, 60,
                 what="the renewal after the restart")
        wait_for(lambda: agent.metric("edge_agent_uplink_connected") == 1, 30, what="connected with the new pair")
        assert _serial(live_cert) != first
        from edge_agent.certs import _matches
        assert _matches(live_cert, live_key) and not Path(str(live_key) + ".new").exists()
        assert oct(live_key.stat().st_mode & 0o777) == "0o600"
        for p in (live_key,):  # the new key was made here: the CSRs carried only public keys
            key = serialization.load_pem_private_key(p.read_bytes(), None)
            pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo).decode()
            assert all("PRIVATE" not in d["csr"] for d in signer.csrs)
            assert pem
        assert "dropped an uncommitted renewal" in agent.log() or "finished a renewal" in agent.log()
        pub.publish(1)
        assert agent.stop() == 0
    finally:
        pub.close()
        signer.close()


def test_onboarding_makes_the_first_key_here_and_a_csr_with_the_expected_subject(tmp_path):
    import subprocess
    import sys

    from cryptography import x509
    r = subprocess.run([sys.executable, "-m", "edge_agent", "certs", "request", "--gateway", "gw-7", "--out",
                        str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    csr = x509.load_pem_x509_csr((tmp_path / "gw-7.csr").read_bytes())
    assert csr.subject.rfc4514_string() == "CN=gw-7" and csr.is_signature_valid
    assert oct((tmp_path / "gw-7.key").stat().st_mode & 0o777) == "0o600"
    again = subprocess.run([sys.executable, "-m", "edge_agent", "certs", "request", "--gateway", "gw-7", "--out",
                            str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "exists" in again.stderr
    bad = subprocess.run([sys.executable, "-m", "edge_agent", "certs", "request", "--gateway", "gw/7", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
