"""The fault soak: mixed load with poison payloads while the world misbehaves, then an audit of what the cloud got.

    python3 tests/soak.py --minutes 10 --rate 5000        # the full soak (points/s offered)
    (tests/test_soak.py runs a 60-second variant in CI)

Faults, at random moments: the cloud broker restarted, the cloud broker stops acknowledging (SIGSTOP for a few
seconds), the local broker restarted, the agent killed with SIGKILL and started again. At the end every reading a
device was acknowledged for must be at the cloud (deduplicated on seq), the seqs contiguous, and no stall — a
stretch with the cloud reachable and the agent up but nothing arriving — longer than 10 s.
"""
from __future__ import annotations

import json
import random
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import Agent, CloudSubscriber, Publisher, agent_config, wait_for, write_config  # noqa: E402

from edge_agent.devkit.brokers import Mosquitto  # noqa: E402
from edge_agent.devkit.certs import CA  # noqa: E402

POISON = (b'{"values": {"x": "\\ud800"}}', b'{"values": {"t": NaN}}', b"{not json", b'{"values": {"t": 1e999}}',
          b"[" * 5000)


def run_soak(work: Path, seconds: float, rate: int, seed: int = 1, log=print) -> dict:
    rng = random.Random(seed)
    ca = CA(work / "pki")
    pki = {"ca": ca, "server": ca.issue("cloud-broker", server=True), "gateway": ca.issue("gw-test"),
           "viewer": ca.issue("cloud-viewer")}
    local = Mosquitto.local(work / "local").start()
    cloud = Mosquitto.mtls(work / "cloud", ca.cert_path, *pki["server"]).start()
    viewer = CloudSubscriber(cloud, pki)
    cfg = agent_config(work, local.port, cloud.port, pki, model={"enabled": False},
                       uplink={"publish_timeout_s": 2.0, "reconnect_max_s": 1.0}, log={"level": "warning"})
    agent = Agent(write_config(work / "agent.toml", cfg), work / "agent.log", cfg["metrics"]["port"]).start()
    agent.wait_ready(30)
    pub = Publisher(local, client_id="soak-devices")
    per_msg = 5  # n and four more points a message (a Python publisher reaches about 2,000 messages/s here)
    interval = per_msg / rate
    faults: list[tuple[float, float, str]] = []  # (start, end, what): windows in which a stall is expected
    n = poison = 0
    t0 = time.monotonic()
    next_fault = t0 + rng.uniform(3, 8)
    while time.monotonic() - t0 < seconds:
        for _ in range(max(1, int(rate / per_msg / 50))):  # in bursts of 20 ms
            if rng.random() < 0.002:
                pub.publish(-1, device=f"dev-{rng.randrange(50)}", payload=rng.choice(POISON))
                poison += 1
            else:
                pub.publish(n, device=f"dev-{n % 50}", payload=json.dumps({"ts": int(time.time() * 1000), "values": {
                    "n": n, "temperature": 20.5, "pressure": 1.2, "speed": 1450, "level": 0.5}}).encode())
                n += 1
        time.sleep(max(0.0, 0.02 - interval))
        now = time.monotonic()
        if now >= next_fault and now - t0 < seconds - 5:
            what = rng.choice(["cloud_restart", "cloud_stops_acking", "local_restart", "agent_kill9"])
            start = time.monotonic()
            if what == "cloud_restart":
                cloud.stop()
                time.sleep(rng.uniform(0.5, 3))
                cloud.start()
            elif what == "cloud_stops_acking":
                cloud.proc.send_signal(signal.SIGSTOP)
                time.sleep(rng.uniform(2, 5))
                cloud.proc.send_signal(signal.SIGCONT)
            elif what == "local_restart":
                local.stop()
                time.sleep(rng.uniform(0.5, 2))
                local.start()
            else:
                agent.kill9()
                agent.start()
                agent.wait_ready(30)
            faults.append((start, time.monotonic() + 8, what))  # and the seconds to reconnect after it
            log(f"  {now - t0:6.1f} s  {what}")
            next_fault = time.monotonic() + rng.uniform(4, 10)
    sent_s = time.monotonic() - t0
    acked_values, by_seq, readings = audit_cloud(pub, viewer, 120)
    arrivals = sorted(viewer.arrivals)
    stall = 0.0
    for a, b in zip(arrivals, arrivals[1:]):
        if not any(a < e and b > s for s, e, _ in faults) and b - t0 < sent_s:  # a gap that no fault explains
            stall = max(stall, b - a)
    result = {"seconds": round(sent_s, 1), "messages": n, "points_per_s": round(n * per_msg / sent_s),
              "acknowledged": len(acked_values), "poison": poison, "readings_at_cloud": len(by_seq),
              "duplicates_at_cloud": len(readings) - len(by_seq), "faults": [w for _, _, w in faults],
              "longest_stall_s": round(stall, 2), "agent_rc": agent.stop(60)}
    pub.close()
    viewer.close()
    local.stop()
    cloud.stop()
    assert stall <= 10, f"a stall of {stall:.1f} s"
    return result


def audit_cloud(pub: Publisher, viewer: CloudSubscriber, timeout: float) -> tuple[set, dict, list]:
    """Once the load stopped: every message the local broker acknowledged is at the cloud (within `timeout`), each
    seq carries one reading (a duplicate is only a resend of the same seq), the seqs are contiguous. Returns (the
    acknowledged values of point n, seq -> reading, every reading received)."""
    queued = [(m, info) for m, info in pub.sent if info.rc == 0]  # refused at once while the broker was down: not sent
    wait_for(lambda: all(info.is_published() for _, info in queued), 120,
             what="the local broker acknowledging every message sent")
    acked = {m for m, _ in queued if m >= 0}
    wait_for(lambda: acked <= {r["value"] for r in viewer.readings() if r["point"] == "n"}, timeout,
             what="every acknowledged reading at the cloud")
    readings = viewer.readings()
    by_seq: dict[int, tuple] = {}
    for r in readings:
        key = (r["device"], r["point"], r["value"])
        assert by_seq.setdefault(r["seq"], key) == key, f"seq {r['seq']} carried two readings"
    seqs = sorted(by_seq)
    assert seqs == list(range(1, len(seqs) + 1)), "seqs at the cloud are not contiguous"
    return acked, by_seq, readings


def cli(run, doc: str, rate: int) -> int:
    """The command line of a soak (--minutes, --rate, --seed); prints its figures as JSON."""
    import argparse
    import tempfile
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--rate", type=int, default=rate, help="points/s offered")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        print(json.dumps(run(Path(d), a.minutes * 60, a.rate, a.seed), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(cli(run_soak, __doc__, 5000))
