"""The fault soak's short variant (tests/soak.py has the full one): 60 s of load with poison payloads, cloud and
local broker restarts, a cloud that stops acknowledging and kill -9 of the agent; every reading a device was
acknowledged for reaches the cloud, seqs contiguous, no stall over 10 s."""
from __future__ import annotations

from soak import run_soak


def test_short_fault_soak_loses_nothing(tmp_path):
    r = run_soak(tmp_path, seconds=60, rate=1000, seed=7)
    assert r["readings_at_cloud"] >= 5 * r["acknowledged"] and r["acknowledged"] >= 0.8 * r["messages"], r
    assert r["poison"] > 0 and len(r["faults"]) >= 4, r
    assert r["agent_rc"] == 0
