"""Forwarding rules end to end: devices over MQTT -> the agent (a real process) -> the mutual-TLS cloud broker. The
cloud's reconstruction from what it received is checked against every reading the gateway stored."""
from __future__ import annotations

import collections
import json
import sqlite3
import time

import pytest

from conftest import Publisher, wait_for
from test_commands import CommandClient
from test_trust3 import _alice

S = 1_000_000_000
T0_MS = (time.time_ns() // (3600 * S) - 48) * 3600 * 1000  # two days ago: the clock closes their intervals
LATER_MS = (time.time_ns() // (3600 * S) + 2) * 3600 * 1000  # in two hours: intervals stay open until a reading
RULES = [
    {"id": "temps", "point": "temperature", "deadband": 0.5, "max_silence_s": 30},
    {"id": "flow", "point": "flow", "min_interval_s": 10, "mode": "avg"},
    {"id": "debug", "point": "debug", "drop": True},
    {"id": "running", "point": "running"},
    {"id": "pressure", "point": "pressure", "deadband_pct": 1.0},
]


def _signal(d: int, i: int) -> dict:
    return {"temperature": round(20 + d + 0.01 * i + (0.3 if i % 7 == 0 else 0.0) + (3.0 if i >= 120 else 0), 2),
            "flow": 100 + (i * 7 + d) % 13, "running": (i // 50) % 2 == 0, "debug": i, "mode": "auto",
            "pressure": round(2.0 + 0.001 * i + (0.01 if i % 5 == 0 else 0), 4)}


def _stored(state_dir) -> list[tuple]:
    """(seq, device, point, ts_ns, value) of every reading the gateway stored."""
    db = sqlite3.connect(f"file:{state_dir}/edge-agent.db?mode=ro", uri=True)
    rows = db.execute("SELECT r.seq, p.device, p.point, r.ts_ns, r.value FROM readings r JOIN points p "
                      "ON p.id = r.series ORDER BY r.seq").fetchall()
    db.close()
    return rows


def _tiled(batches: list[dict]) -> int:
    """Batches cover 1..N, each range right after the one before (resends of a range are the same range)."""
    ranges = sorted({(b["first_seq"], b["last_seq"]) for b in batches})
    assert ranges[0][0] == 1
    for (_, a), (b, _) in zip(ranges, ranges[1:]):
        assert b == a + 1, f"a range the cloud never got: {a + 1}..{b - 1}"
    for b in batches:
        assert all(b["first_seq"] <= r["seq"] <= b["last_seq"] for r in b["readings"])
    return ranges[-1][1]


@pytest.mark.parametrize("encoding", ["json", "columns-zstd", "columns-gzip"])
def test_every_rule_kind_over_mqtt_and_the_cloud_reconstructs_the_store(local_broker, cloud_broker, make_agent,
                                                                        cloud_subscriber, tmp_path, encoding):
    enc, _, codec = encoding.partition("-")
    cloud = cloud_subscriber()
    agent = make_agent(local_broker, cloud_broker, model={"enabled": False}, forward={"rule": RULES},
                       uplink={"encoding": enc, "compression": codec or "zstd", "linger_s": 0.5}).start()
    agent.wait_ready()
    pub = Publisher(local_broker)
    n, devices = 200, 3
    for i in range(n):
        for d in range(devices):
            pub.publish(i * devices + d, f"dev-{d}",
                        payload=json.dumps({"ts": T0_MS + i * 1000, "values": _signal(d, i)}).encode())
    wait_for(lambda: len(pub.acked()) == n * devices, 30, what="the broker's acknowledgements")
    wait_for(lambda: agent.metric("edge_agent_readings_committed_total") == n * devices * 6, 30, what="commits")
    # the last flow intervals leave ~6 s after their last reading (the series fell silent): their seqs are the last
    wait_for(lambda: len({r["seq"] for r in cloud.readings() if r["point"] == "flow"}) == devices * n // 10, 30,
             what="every flow interval at the cloud")
    assert agent.stop() == 0
    pub.close()
    stored = _stored(tmp_path / "state")
    assert len(stored) == n * devices * 6  # every reading stays on the gateway
    with cloud.lock:
        batches = list(cloud.batches)
        topics, nbytes = set(cloud.topics), cloud.payload_bytes
    assert topics == ({"edge/gw-test/telemetry"} if enc == "json" else {f"edge/gw-test/telemetry/columns.{codec}"})
    assert _tiled(batches) >= stored[-1][0]
    sent = {r["seq"]: r for b in batches for r in b["readings"]}  # a resend carries the same seq: deduplicated
    by_series = collections.defaultdict(list)
    for r in sorted(sent.values(), key=lambda r: r["seq"]):
        by_series[(r["device"], r["point"])].append(r)
    assert not any(p == "debug" for _, p in by_series)  # drop
    for d in range(devices):
        dev = f"dev-{d}"
        mine = [s for s in stored if s[1] == dev]
        # temperature: every stored reading within 0.5 of the step-hold reconstruction; a heartbeat at least every 30 s
        temps = by_series[(dev, "temperature")]
        assert 3 <= len(temps) < n // 3
        for _, _, _, ts, v in (s for s in mine if s[2] == "temperature"):
            held = [t["value"] for t in temps if t["ts"] <= ts][-1]
            assert abs(v - held) <= 0.5 + 1e-9, (dev, ts, v, held)
        gaps = [(b["ts"] - a["ts"]) / S for a, b in zip(temps, temps[1:])]
        assert max(gaps) <= 30 + 1
        # flow: one aggregate per 10 s interval, each once, with the count and the mean of what was stored in it
        flows = by_series[(dev, "flow")]
        assert len(flows) == n // 10 and len({f["ts"] for f in flows}) == len(flows)
        for f in flows:
            inside = [s[4] for s in mine if s[2] == "flow" and f["ts"] <= s[3] < f["end"]]
            assert f["count"] == len(inside) == 10 and f["agg"] == "avg"
            assert f["value"] == pytest.approx(sum(inside) / len(inside))
        # pressure: within 1 % of the last value sent
        press = by_series[(dev, "pressure")]
        assert 3 <= len(press) < n // 4
        for _, _, _, ts, v in (s for s in mine if s[2] == "pressure"):
            held = [t["value"] for t in press if t["ts"] <= ts][-1]
            assert abs(v - held) <= 0.01 * abs(held) + 1e-12, (dev, ts, v, held)
        # running: on change only; mode (no rule): every reading
        assert [r["value"] for r in by_series[(dev, "running")]] == [True, False, True, False]
        assert len(by_series[(dev, "mode")]) == n
    forwarded = len(sent)
    print(f"\n{encoding}: {forwarded} of {len(stored)} readings forwarded, {nbytes / forwarded:.1f} bytes a forwarded "
          "reading")
    assert forwarded < len(stored) / 2


def test_a_rule_set_at_run_time_signed_and_a_bad_one_refused_with_its_key(local_broker, cloud_broker, make_agent,
                                                                          cloud_subscriber, pki):
    from edge_agent.ops.signing import sign
    key, entry = _alice()
    cloud = cloud_subscriber()
    agent = make_agent(local_broker, cloud_broker, model={"enabled": False},
                       commands={"allow": ["read-only", "forward.set", "forward.remove"],
                                 "operator_keys": [entry]}).start()
    agent.wait_ready()
    wait_for(lambda: agent.metric("edge_agent_uplink_connected") == 1, 10, what="uplink")
    cli = CommandClient(cloud_broker, pki, "5")
    rule = {"id": "quiet", "device": "dev-*", "point": "temperature", "deadband": 1.0}
    try:
        unsigned = cli.call("forward.set", {"rule": rule})
        assert not unsigned["ok"] and unsigned["error"]["code"] == "forbidden"
        bad = cli.call("forward.set", sign(key, "alice", "forward.set", "f-0", {"rule": {**rule, "deadband": -2}},
                                           gateway="gw-test"), rid="f-0")
        assert not bad["ok"] and bad["error"]["code"] == "bad_request", bad
        assert bad["error"]["message"].startswith("rule.deadband")
        ok = cli.call("forward.set", sign(key, "alice", "forward.set", "f-1", {"rule": rule}, gateway="gw-test"), rid="f-1")
        assert ok["ok"] and ok["result"]["set"]["deadband"] == 1.0
        listed = cli.call("forward.list")["result"]["rules"]
        assert [(r["id"], r["origin"]) for r in listed] == [("quiet", "command")]
        pub = Publisher(local_broker)
        values = [20.0, 20.4, 20.9, 21.2, 19.9, 20.3]
        for i, v in enumerate(values):
            pub.publish(i, "dev-1", payload=json.dumps({"ts": T0_MS + i * 1000, "values": {"temperature": v}}).encode())
        wait_for(lambda: [r["value"] for r in cloud.readings()] == [20.0, 21.2, 19.9], 15, what="filtered at the cloud")
        gone = cli.call("forward.remove", sign(key, "alice", "forward.remove", "f-2", {"rule_id": "quiet"},
                                               gateway="gw-test"), rid="f-2")
        assert gone["ok"]
        pub.publish(9, "dev-1", payload=json.dumps({"ts": T0_MS + 9000, "values": {"temperature": 19.95}}).encode())
        wait_for(lambda: [r["value"] for r in cloud.readings()][-1:] == [19.95], 15, what="the rule gone")
        pub.close()
    finally:
        cli.close()
    assert agent.stop() == 0


def test_kill_9_mid_interval_over_mqtt_no_aggregate_lost_or_doubled(local_broker, cloud_broker, make_agent,
                                                                     cloud_subscriber, tmp_path):
    cloud = cloud_subscriber()
    rules = [{"id": "flow", "point": "flow", "min_interval_s": 60, "mode": "max"},
             {"id": "temps", "point": "temperature", "deadband": 5}]
    agent = make_agent(local_broker, cloud_broker, model={"enabled": False}, forward={"rule": rules}).start()
    agent.wait_ready()
    pub = Publisher(local_broker)

    def burst(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            pub.publish(i, "dev-1", payload=json.dumps({"ts": LATER_MS + i * 1000, "values": {
                "flow": i, "temperature": 50.0 + i * 0.01}}).encode())

    burst(0, 30)  # half an interval
    wait_for(lambda: agent.metric("edge_agent_readings_committed_total") == 60, 20, what="half an interval")
    agent.kill9()
    agent.start().wait_ready()
    burst(30, 121)  # the rest of it, a second one, and the first reading of the third
    wait_for(lambda: len([r for r in cloud.readings() if r["point"] == "flow"]) >= 2, 20, what="two aggregates")
    time.sleep(1.0)
    assert agent.stop() == 0
    pub.close()
    flows = {r["seq"]: r for r in cloud.readings() if r["point"] == "flow"}
    got = sorted((r["ts"], r["value"], r["count"]) for r in flows.values())
    assert got == [(LATER_MS * 1_000_000, 59, 60), ((LATER_MS + 60_000) * 1_000_000, 119, 60)]
    temps = {r["seq"] for r in cloud.readings() if r["point"] == "temperature"}
    assert len(temps) == 1  # 50.00 .. 51.20 never left the band of the first one: no flood after the restart
