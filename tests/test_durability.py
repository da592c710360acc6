"""Nothing acknowledged is lost: cloud outages, kill -9 of the agent, the disk quota."""
from __future__ import annotations

import os
import random
import threading
import time

import pytest

from edge_agent.devkit.brokers import Mosquitto
from conftest import Publisher, wait_for

CRASH_CYCLES = int(os.environ.get("EDGE_AGENT_CRASH_CYCLES", "20"))


class Load:
    """Publishes numbered messages at QoS 1 from a thread until stopped."""

    def __init__(self, broker: Mosquitto, rate: float = 300.0) -> None:
        self.pub = Publisher(broker, client_id=f"load-{random.randrange(1 << 30)}")
        self.rate, self.n = rate, 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.pub.publish(self.n, device=f"dev-{self.n % 10}")
            self.n += 1
            time.sleep(1 / self.rate)

    def stop(self) -> set[int]:
        self._stop.set()
        self.thread.join()
        wait_for(lambda: len(self.pub.acked()) == self.n, 20, what="the local broker's PUBACKs")
        self.pub.close()
        return self.pub.acked()


def check_cloud_stream(seqs: list[int]) -> None:
    """In order, contiguous from the first seq, duplicates only as resends of an earlier seq."""
    assert seqs, "nothing reached the cloud"
    first_seen: list[int] = []
    seen: set[int] = set()
    for s in seqs:
        if s not in seen:
            seen.add(s)
            first_seen.append(s)
    assert first_seen == list(range(first_seen[0], first_seen[0] + len(first_seen))), "gap or reordering"


def test_cloud_outage_under_load_loses_nothing(local_broker, cloud_broker, make_agent, cloud_subscriber):
    sub = cloud_subscriber()
    agent = make_agent(local_broker, cloud_broker).start().wait_ready()
    load = Load(local_broker)
    wait_for(lambda: len(sub.readings()) > 200, 10, what="traffic before the outage")
    cloud_broker.stop()
    wait_for(lambda: agent.metric("edge_agent_uplink_connected") == 0, 10, what="uplink down")
    time.sleep(2)
    depth = agent.metric("edge_agent_outbox_readings")
    assert depth > 0, "readings must queue in the outbox while the cloud is down"
    cloud_broker.start()
    time.sleep(1)
    acked = load.stop()
    wait_for(lambda: agent.metric("edge_agent_outbox_readings") == 0, 30, what="outbox drained")
    want = 2 * len(acked)
    wait_for(lambda: len(set(sub.seqs())) >= want, 30, what="every reading at the cloud")
    seqs = sub.seqs()
    check_cloud_stream(seqs)
    assert set(seqs) == set(range(1, want + 1))
    got = {r["value"] for r in sub.readings() if r["point"] == "n"}
    assert acked <= got
    assert agent.metric("edge_agent_uplink_connects_total") >= 2
    assert agent.stop() == 0


@pytest.mark.slow
def test_kill_9_loop_loses_no_acknowledged_message(local_broker, cloud_broker, make_agent, cloud_subscriber):
    sub = cloud_subscriber()
    agent = make_agent(local_broker, cloud_broker)
    agent.start().wait_ready()
    load = Load(local_broker, rate=400)
    rng = random.Random(7)
    for _ in range(CRASH_CYCLES):
        time.sleep(rng.uniform(0.2, 1.2))
        agent.kill9()
        time.sleep(rng.uniform(0.0, 0.3))
        agent.start()
    agent.wait_ready()
    acked = load.stop()
    wait_for(lambda: agent.metric("edge_agent_outbox_readings") == 0 and
             agent.metric("edge_agent_readings_committed_total") is not None, 60, what="outbox drained")
    got = {r["value"] for r in sub.readings() if r["point"] == "n"}
    wait_for(lambda: acked <= {r["value"] for r in sub.readings() if r["point"] == "n"}, 30,
             what="every acknowledged message at the cloud")
    got = {r["value"] for r in sub.readings() if r["point"] == "n"}
    assert acked <= got, f"lost {len(acked - got)} acknowledged messages"
    seqs = sorted(set(sub.seqs()))
    assert seqs == list(range(1, seqs[-1] + 1)), "seq gaps after crashes"
    assert agent.stop() == 0


def test_disk_quota_evicts_oldest_counted_and_keeps_running(local_broker, cloud_broker, cloud_subscriber, make_agent):
    sub = cloud_subscriber()  # its persistent session outlives the broker's restart
    cloud_broker.stop()       # the cloud is down for the whole ingest phase
    quota = 1 << 20
    agent = make_agent(local_broker, cloud_broker, store={"quota_bytes": quota, "outbox_chunk_readings": 100})
    agent.start().wait_ready()
    pub = Publisher(local_broker)
    pad = "x" * 200
    for i in range(6000):
        pub.publish(i, payload=f'{{"values": {{"n": {i}, "note": "{pad}"}}}}'.encode())
    wait_for(lambda: agent.metric("edge_agent_readings_committed_total") == 12000, 60, what="all committed")
    wait_for(lambda: agent.metric("edge_agent_outbox_evicted_readings_total") > 0, 10, what="eviction")
    time.sleep(1.5)
    assert agent.proc.poll() is None
    assert agent.metric("edge_agent_store_bytes") <= quota * 1.1
    evicted = agent.metric("edge_agent_outbox_evicted_readings_total")
    depth = agent.metric("edge_agent_outbox_readings")
    assert evicted > 0 and depth > 0
    assert evicted + depth == 12000, "every reading is either still queued or counted as evicted"
    assert "disk quota reached" in agent.log()
    # the cloud comes back: what is left arrives, oldest evicted first, newest kept, no gap inside
    cloud_broker.start()
    wait_for(lambda: len(sub.readings()) >= depth, 30, what="the kept readings at the cloud")
    seqs = sub.seqs()
    check_cloud_stream(seqs)
    assert seqs[-1] == 12000 and seqs[0] == 12000 - depth + 1
    assert agent.stop() == 0
