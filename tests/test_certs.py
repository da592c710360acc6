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
