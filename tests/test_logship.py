"""Logs to the cloud over the uplink: kept in the store through an outage (within their own quota, the oldest
dropped and counted exactly), then sent in order in gzip'd batches after PUBACK; every line of a request carries
its trace id, which its reply names."""
from __future__ import annotations

import gzip
import json
import re
import threading
import time

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from conftest import wait_for
from edge_agent.control import call


class LogViewer:
    def __init__(self, broker, pki) -> None:
        cert, key = pki["viewer"]
        self.batches: list[dict] = []
        self.lock = threading.Lock()
        c = self.c = paho.Client(CallbackAPIVersion.VERSION2, client_id="log-viewer", clean_session=False,
                                 protocol=paho.MQTTv311)
        c.tls_set(ca_certs=str(pki["ca"].cert_path), certfile=str(cert), keyfile=str(key))
        c.on_message = lambda _c, _u, m: self._add(json.loads(gzip.decompress(m.payload)))
        c.on_connect = lambda cl, *_a: cl.subscribe("edge/gw-test/logs", 1)
        c.reconnect_delay_set(0.1, 0.5)
        c.connect("localhost", broker.port, 30)
        c.loop_start()
        time.sleep(0.3)

    def _add(self, doc: dict) -> None:
        with self.lock:
            self.batches.append(doc)

    def lines(self) -> list[tuple[int, str]]:
        """(id, line) of every line received, in arrival order (a batch resent after a reconnect: once)."""
        with self.lock:
            out, seen = [], set()
            for b in self.batches:
                for i, line in zip(range(b["first_id"], b["last_id"] + 1), b["lines"]):
                    if i not in seen:
                        seen.add(i)
                        out.append((i, line))
            return out

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def test_logs_wait_out_an_outage_within_their_quota_and_arrive_in_order(tmp_path, pki, local_broker, cloud_broker,
                                                                          make_agent):
    viewer = LogViewer(cloud_broker, pki)
    agent = make_agent(local_broker, cloud_broker, commands={"allow": ["read-only", "logs.level"]},
                       log={"ship_quota_bytes": 65536}).start()
    agent.wait_ready()
    state = tmp_path / "state"
    try:
        wait_for(lambda: any('msg="connected to cloud"' in line for _, line in viewer.lines()), 20,
                 what="the agent's own lines at the cloud")
        cloud_broker.stop()
        wait_for(lambda: agent.metric("edge_agent_uplink_connected") == 0, 20, what="the outage")
        traces = []
        for k in range(600):  # each logs.level logs one info line, with its trace id
            r = call(state, "logs.level", {"level": "info", "for_s": 60 + k})
            assert r["ok"], r
            traces.append(r["trace"])
        # log lines ride along lazily (store.lazy_max_delay_ms, 1 s by default): let them reach the store while the
        # cloud is still away, or the race with the reconnect decides whether the outage outgrew the quota
        time.sleep(1.5)
        cloud_broker.start()
        wait_for(lambda: agent.metric("edge_agent_uplink_connected") == 1, 30, what="the cloud back")
        dropped = lambda: agent.metric("edge_agent_logs_dropped_total", 'reason="quota"')  # noqa: E731
        wait_for(lambda: any(traces[-1] in line for _, line in viewer.lines()), 60, what="the last line")
        got = viewer.lines()
        ids = [i for i, _ in got]
        assert ids == sorted(ids), "out of order"
        # every id either arrived or was dropped at the quota, counted exactly: the quota dropped the oldest
        missing = sorted(set(range(1, ids[-1] + 1)) - set(ids))
        assert missing and len(missing) == dropped(), (len(missing), dropped())
        assert missing == list(range(missing[0], missing[-1] + 1))  # one run: the oldest of the outage
        shipped = [t for t in traces if any(t in line for _, line in got)]
        assert shipped == traces[len(traces) - len(shipped):]  # the newest survive, in order
        assert len(shipped) > 100
        line = next(line for _, line in got if traces[-1] in line)
        assert 'msg="shipped log level changed for a while"' in line and "for_s=659" in line
        assert all("\n" not in line and len(line) <= 4100 for _, line in got)
    finally:
        viewer.close()
    assert agent.stop() == 0


def test_a_shipped_level_change_reverts_and_never_floods_the_console(tmp_path, pki, local_broker, cloud_broker,
                                                                       make_agent):
    viewer = LogViewer(cloud_broker, pki)
    agent = make_agent(local_broker, cloud_broker, commands={"allow": ["read-only", "logs.level"]}).start()
    agent.wait_ready()
    try:
        state = tmp_path / "state"
        r = call(state, "logs.level", {"level": "debug", "for_s": 2})
        assert r["ok"] and r["result"] == {"level": "debug", "for_s": 2, "then": "info"}
        call(state, "ping", {})
        debug = re.compile(r"^\S+ level=debug ", re.M)
        wait_for(lambda: any(debug.match(line) for _, line in viewer.lines()), 20, what="debug lines shipped")
        assert not debug.search(agent.log())  # the console keeps log.level
        time.sleep(2.5)
        call(state, "ping", {})
        n = len(viewer.lines())
        time.sleep(1.5)
        late = [line for _, line in viewer.lines()[n:] if debug.match(line)]
        assert late == [], late[:3]
        r = call(state, "logs.level", {"level": "loud"})
        assert r["error"]["code"] == "bad_request"
    finally:
        viewer.close()
    assert agent.stop() == 0
