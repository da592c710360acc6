"""Forwarding rules in the store: what enters the outbox, the seq ranges rows cover, the state across restarts and
kill -9, rules changed at run time, and the encodings' round trip (hostile payloads included)."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings, strategies as st

from edge_agent.config import ConfigError, ForwardRuleConfig, StoreConfig, forward_rule_from_dict, from_dict
from edge_agent.metrics import Metrics
from edge_agent.records import Reading
from edge_agent.store import Store
from edge_agent.store.encoding import (DecodeError, batch_columns, batch_json, decode, encode_json, encode_rows)
from edge_agent.store.forward import Aggregate

S = 1_000_000_000
T0 = (time.time_ns() // (3600 * S) - 48) * 3600 * S  # two days ago, on the hour: intervals close by the clock
LATER = (time.time_ns() // (3600 * S) + 2) * 3600 * S  # in two hours: intervals the clock does not close in a test


def R(value, t_s: float, device: str = "d1", point: str = "p", quality: str = "good", base: int = T0) -> Reading:
    return Reading(device, point, value, "u", base + int(t_s * S), quality, "test")


def rules(*docs: dict) -> list[ForwardRuleConfig]:
    return [forward_rule_from_dict({"id": f"r{i}", **d}) for i, d in enumerate(docs)]


async def _open(tmp_path, fwd=(), encoding="json", **kw) -> Store:
    s = Store(StoreConfig(**kw), tmp_path, Metrics(), forward_rules=list(fwd), encoding=encoding)
    await s.open()
    return s


async def _outbox(s: Store) -> tuple[list, list[dict]]:
    rows = await s.read_outbox(0, 1_000_000, 1 << 30)
    payloads = [r.payload for r in rows]
    first = rows[0].first_seq if rows else 0
    last = rows[-1].last_seq if rows else 0
    doc = decode(batch_json("gw", first, last, sum(r.count for r in rows), payloads))
    return rows, doc["readings"]


def _tiles(rows, upto: int) -> None:
    """Rows cover 1..upto, each range right after the one before."""
    assert rows[0].first_seq == 1 and rows[-1].last_seq == upto
    for a, b in zip(rows, rows[1:]):
        assert b.first_seq == a.last_seq + 1


def test_deadband_absolute_and_percent_and_the_seq_ranges(tmp_path):
    async def main():
        s = await _open(tmp_path, rules({"point": "abs", "deadband": 0.5}, {"point": "pct", "deadband_pct": 1.0}))
        values = [10.0, 10.1, 10.3, 10.6, 10.4, 9.9, 9.9]
        await s.write([R(v, i, point="abs") for i, v in enumerate(values)])
        await s.write([R(v, i, point="pct") for i, v in enumerate([100.0, 100.9, 101.2, 100.3, 100.1])])
        await s.write([R(5.0, 0, point="other"), R(5.0, 1, point="other")])  # no rule: all of it
        rows, recs = await _outbox(s)
        got = [(r["point"], r["value"], r["seq"]) for r in recs]
        assert got == [("abs", 10.0, 1), ("abs", 10.6, 4), ("abs", 9.9, 6), ("pct", 100.0, 8), ("pct", 101.2, 10),
                       ("pct", 100.1, 12), ("other", 5.0, 13), ("other", 5.0, 14)]
        _tiles(rows, 14)
        # every reading is in the gateway's own store all the same
        assert (await s.query("SELECT count(*) FROM readings"))[0][0] == 14
        await s.close()
    asyncio.run(main())


def test_heartbeat_on_time_changes_of_booleans_strings_and_quality(tmp_path):
    async def main():
        s = await _open(tmp_path, rules({"device": "hb", "deadband": 1.0, "max_silence_s": 10},
                                        {"device": "st"}))
        await s.write([R(7.0, t, device="hb") for t in range(0, 40, 3)])   # steady, every 3 s
        await s.write([R(v, i, device="st") for i, v in enumerate([True, True, False, False, "a", "a", "b", 1, 1])])
        await s.write([R(1, 20, device="st", quality="bad"), R(1, 21, device="st", quality="bad")])
        _, recs = await _outbox(s)
        hb = [(r["ts"] - T0) // S for r in recs if r["device"] == "hb"]
        assert hb == [0, 12, 24, 36]  # the first at or past 10 s of silence
        assert all(b - a <= 10 + 3 for a, b in zip(hb, hb[1:]))
        st_ = [(r["value"], r["quality"]) for r in recs if r["device"] == "st"]
        assert st_ == [(True, "good"), (False, "good"), ("a", "good"), ("b", "good"), (1, "good"), (1, "bad")]
        await s.close()
    asyncio.run(main())


def test_drop_keeps_everything_home(tmp_path):
    async def main():
        m = Metrics()
        s = Store(StoreConfig(), tmp_path, m, forward_rules=rules({"device": "noisy*", "drop": True}))
        await s.open()
        await s.write([R(float(i), i, device=f"noisy-{i % 3}") for i in range(30)] + [R(1.0, 0, device="kept")])
        rows, recs = await _outbox(s)
        assert [r["device"] for r in recs] == ["kept"] and recs[0]["seq"] == 31
        _tiles(rows, 31)
        assert m.forward_readings.labels("dropped")._value.get() == 30
        assert (await s.query("SELECT count(*) FROM readings"))[0][0] == 31
        await s.close()
    asyncio.run(main())


def test_interval_aggregates_once_each_with_count_and_interval(tmp_path):
    async def main():
        s = await _open(tmp_path, rules({"point": "avg", "min_interval_s": 10, "mode": "avg"},
                                        {"point": "max", "min_interval_s": 10, "mode": "max"}))
        await s.write([R(float(i), i, point="avg") for i in range(29)] +
                      [R(float(i % 7), i, point="max") for i in range(29)])
        rows, recs = await _outbox(s)
        aggs = [(r["point"], r["value"], r["count"], (r["ts"] - T0) // S, (r["end"] - T0) // S, r["agg"])
                for r in recs[:4]]
        assert aggs == [("avg", 4.5, 10, 0, 10, "avg"), ("avg", 14.5, 10, 10, 20, "avg"),
                        ("max", 6.0, 10, 0, 10, "max"), ("max", 6.0, 10, 10, 20, "max")]
        assert [r["seq"] for r in recs[:4]] == [59, 60, 61, 62]  # seqs of their own, after the readings'
        _tiles(rows, rows[-1].last_seq)
        # the third intervals [20, 30) are open; the series fall silent: ~6 s after the last reading arrived (its
        # interval's end 1 s after it, as the gateway's clock saw it, and 5 s of grace) the maintenance pass sends them
        t_last = time.monotonic()
        deadline = t_last + 15
        while len((await _outbox(s))[1]) < 6 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        _, recs = await _outbox(s)
        assert [(r["point"], r["value"], r["count"]) for r in recs[4:]] == [("avg", 24.0, 9), ("max", 6.0, 9)]
        assert 5 <= time.monotonic() - t_last < 9
        # a late reading of a sent interval counts in the next one: no interval is sent twice
        await s.write([R(100.0, 5, point="avg"), R(1.0, 31, point="avg"), R(2.0, 45, point="avg")])
        _, recs = await _outbox(s)
        late = [(r["value"], r["count"], (r["ts"] - T0) // S) for r in recs[6:]]
        assert late == [(50.5, 2, 30)]
        starts = [(r["point"], r["ts"]) for r in recs]
        assert len(starts) == len(set(starts))
        await s.close()
    asyncio.run(main())


def test_restart_keeps_the_state_no_flood_no_skip_no_double(tmp_path):
    async def main():
        fwd = rules({"point": "db", "deadband": 1.0}, {"point": "iv", "min_interval_s": 60, "mode": "avg"})
        s = await _open(tmp_path, fwd)
        await s.write([R(50.0, 0, point="db"), R(50.2, 1, point="db")])
        await s.write([R(float(i), i, point="iv", base=LATER) for i in range(30)])  # half an interval
        await s.close()
        s = await _open(tmp_path, fwd)
        await s.write([R(50.4, 2, point="db"), R(51.5, 3, point="db")])  # within the band of 50.0, then out of it
        await s.write([R(float(i), i, point="iv", base=LATER) for i in range(30, 61)])  # the rest, the next's first
        _, recs = await _outbox(s)
        assert [r["value"] for r in recs if r["point"] == "db"] == [50.0, 51.5]
        iv = [(r["value"], r["count"]) for r in recs if r["point"] == "iv"]
        assert iv == [(29.5, 60)]
        await s.close()
    asyncio.run(main())


KILLED = r"""
import asyncio, os, signal, sys
sys.path.insert(0, sys.argv[2])
from tests.test_forward import _open, rules, R, LATER
async def main():
    s = await _open(__import__("pathlib").Path(sys.argv[1]), rules({"point": "iv", "min_interval_s": 60, "mode": "avg"}))
    for i in range(40):
        await s.write([R(float(i), i, point="iv", base=LATER)])  # each committed (synchronous=FULL) first
    os.kill(os.getpid(), signal.SIGKILL)
asyncio.run(main())
"""


def test_kill_9_mid_interval_loses_and_doubles_nothing(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "-c", KILLED, str(tmp_path), root], capture_output=True, timeout=60)
    assert p.returncode == -signal.SIGKILL, p.stderr.decode()[-2000:]

    async def main():
        s = await _open(tmp_path, rules({"point": "iv", "min_interval_s": 60, "mode": "avg"}))
        assert s.next_seq == 41
        await s.write([R(float(i), i, point="iv", base=LATER) for i in range(40, 61)])
        _, recs = await _outbox(s)
        assert [(r["value"], r["count"], r["seq"]) for r in recs] == [(29.5, 60, 62)]
        await s.close()
    asyncio.run(main())


def test_rules_changed_at_run_time(tmp_path):
    async def main():
        s = await _open(tmp_path, rules({"id": "cfg", "device": "c*", "drop": True}))
        await s.write([R(float(i), i, point="iv", base=LATER) for i in range(5)])  # no rule: all five
        rc = forward_rule_from_dict({"id": "iv", "point": "iv", "min_interval_s": 60, "mode": "max"})
        await s.forward_set(rc, max_rules=2)
        await s.write([R(float(i), i, point="iv", base=LATER) for i in range(5, 20)])
        assert len((await _outbox(s))[1]) == 5
        # replaced by a deadband rule: the open interval is sent at once, then the new rule decides
        await s.forward_set(forward_rule_from_dict({"id": "iv", "point": "iv", "deadband": 5}), max_rules=2)
        await s.write([R(v, t, point="iv", base=LATER) for v, t in ((30.0, 21), (33.0, 22), (40.0, 23))])
        _, recs = await _outbox(s)
        assert [(r["value"], r.get("count")) for r in recs[5:]] == [(19.0, 15), (30.0, None), (40.0, None)]
        with pytest.raises(PermissionError, match="config file"):
            await s.forward_set(forward_rule_from_dict({"id": "cfg", "device": "x"}), max_rules=2)
        await s.forward_set(forward_rule_from_dict({"id": "two", "device": "x"}), max_rules=2)
        with pytest.raises(PermissionError, match="max_command_rules"):
            await s.forward_set(forward_rule_from_dict({"id": "three", "device": "y"}), max_rules=2)
        assert [r["id"] for r in s.forward_rules()] == ["iv", "two", "cfg"]
        await s.close()
        s = await _open(tmp_path, rules({"id": "cfg", "device": "c*", "drop": True}))
        assert [r["id"] for r in s.forward_rules()] == ["iv", "two", "cfg"]  # kept across restarts
        assert await s.forward_remove("iv") and not await s.forward_remove("iv")
        with pytest.raises(PermissionError):
            await s.forward_remove("cfg")
        await s.close()
    asyncio.run(main())


def test_state_follows_the_registry(tmp_path):
    async def main():
        s = await _open(tmp_path, rules({"deadband": 1}))
        await s.write([R(1.0, 0, device="gone"), R(1.0, 0, device="stays")])
        assert len(s.forward.states) == 2
        await s.forget_device("gone")
        deadline = time.monotonic() + 5
        while len(s.forward.states) > 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert set(s.forward.states) == {("stays", "p")}
        assert (await s.query("SELECT device FROM forward_state")) == [("stays",)]
        # a ruled device among many unruled series: forgotten, its state goes with it (the same transaction)
        s2 = await _open(tmp_path / "b", rules({"device": "ruled", "deadband": 1}))
        await s2.write([R(1.0, 0, device="ruled"), *(R(1.0, 0, device=f"free-{i}") for i in range(5))])
        assert set(s2.forward.states) == {("ruled", "p")}
        await s2.forget_device("ruled")
        assert s2.forward.states == {} and (await s2.query("SELECT count(*) FROM forward_state")) == [(0,)]
        await s2.write([R(1.0, 1, device="ruled")])  # it returns: forwarded afresh, not within the old band
        assert [r["device"] for r in (await _outbox(s2))[1]].count("ruled") == 2
        await s2.close()
        await s.close()
    asyncio.run(main())


@pytest.mark.parametrize("doc, key", [
    ({"id": "a", "deadband": -1}, "rule.deadband"),
    ({"id": "a", "deadband": 1, "deadband_pct": 1}, "rule.deadband_pct"),
    ({"id": "a", "min_interval_s": 5, "deadband": 1}, "rule.min_interval_s"),
    ({"id": "a", "mode": "avg"}, "rule.mode"),
    ({"id": "a", "mode": "median", "min_interval_s": 5}, "rule.mode"),
    ({"id": "a", "drop": True, "max_silence_s": 5}, "rule.drop"),
    ({"id": "a/b"}, "rule.id"),
    ({"id": "a", "deadbnd": 1}, "rule.deadbnd"),
    ({"id": "a", "deadband": float("nan")}, "rule.deadband"),
    ({"id": "a", "device": ""}, "rule.device"),
])
def test_a_bad_rule_is_refused_with_its_key(doc, key):
    with pytest.raises(ConfigError) as e:
        forward_rule_from_dict(doc)
    assert str(e.value).startswith(key)


def test_a_bad_rule_in_the_config_names_the_key():
    with pytest.raises(ConfigError, match=r"forward\.rule\[1\]\.deadband_pct"):
        from_dict({"forward": {"rule": [{"id": "a"}, {"id": "b", "deadband": 1, "deadband_pct": 2}]}})
    with pytest.raises(ConfigError, match=r"forward\.rule\[1\]\.id: 'a' is used twice"):
        from_dict({"forward": {"rule": [{"id": "a"}, {"id": "a"}]}})


# -- the encodings --------------------------------------------------------------------------------------------
finite = st.floats(allow_nan=False, allow_infinity=False)
values = st.one_of(finite, st.integers(-2 ** 70, 2 ** 70), st.booleans(), st.text(max_size=8),
                   st.decimals(-1e6, 1e6, places=3, allow_nan=False, allow_infinity=False).map(float),
                   st.just(float("nan")))
record = st.tuples(st.sampled_from(["d1", "d2", "dé"]), st.sampled_from(["p", "q"]), values,
                   st.sampled_from(["u", None]), st.integers(0, 2 ** 62), st.sampled_from(["good", "bad", "x"]),
                   st.booleans())


@settings(max_examples=150, deadline=None)
@given(st.lists(record, max_size=60), st.integers(1, 2 ** 40), st.sampled_from(["zstd", "gzip"]))
def test_columns_decode_to_what_json_says(recs, first, codec):
    out = []
    for d, p, v, u, ts, q, agg in recs:
        out.append(Aggregate(d, p, v, u, ts, q, "s", 3, ts + 5, "avg") if agg and type(v) is float
                   else Reading(d, p, v, u, ts, q, "s"))
    seqs = [first + 2 * i for i in range(len(out))]
    last = seqs[-1] if seqs else first
    half = len(out) // 2
    j = decode(batch_json("gw", first, last, len(out), [encode_json(seqs[:half], out[:half]),
                                                         encode_json(seqs[half:], out[half:])]))
    c = decode(batch_columns("gw", first, last, len(out), [encode_rows(seqs[:half], out[:half]), b"",
                                                            encode_json(seqs[half:], out[half:])], codec))
    assert json.dumps(c, sort_keys=True) == json.dumps(j, sort_keys=True)


def test_hostile_payloads_are_decode_errors():
    good = batch_columns("gw", 1, 3, 3, [encode_rows([1, 2, 3], [R(1.5, 0), R(2.5, 1), R(True, 2)])], "zstd")
    assert decode(good)["count"] == 3
    import zstandard
    bomb = b"EAC1z" + zstandard.ZstdCompressor().compress(b"\0" * (300 << 20))  # 300 MiB of zeros, ~10 kB
    cases = [b"", b"EAC1", b"EAC1q" + good[5:], good[:-3], b"EAC1z" + b"\x28\xb5\x2f\xfd" + os.urandom(64),
             b"EAC1g" + os.urandom(50), b"{not json", b"[1,2]", bomb]
    for raw in [*cases, *(good[:5] + os.urandom(len(good) - 5) for _ in range(20))]:
        with pytest.raises(DecodeError):
            decode(raw)
    import gzip
    from edge_agent.store.encoding import compress
    body = json.dumps({"x": 1}).encode()
    for h in ({"gateway": "g", "first_seq": 1, "last_seq": 1, "count": 5, "series": [], "qualities": ["good"],
               "strings": [], "decimals": 0, "agg": [], "cols": [["series", "<u1", 0]]},
              {"count": 1}):
        hb = json.dumps(h).encode()
        raw = b"EAC1g" + gzip.compress(len(hb).to_bytes(4, "little") + hb)
        with pytest.raises(DecodeError):
            decode(raw)
    assert compress(body, "gzip")[:2] == b"\x1f\x8b"


def test_edge_agent_decode_prints_a_captured_payload(tmp_path, capsys):
    from edge_agent import cli
    recs = [R(21.37, 0), R(True, 1, point="run"), R("auto", 2, point="mode")]
    p = tmp_path / "capture.bin"
    p.write_bytes(batch_columns("gw-7", 1, 3, 3, [encode_rows([1, 2, 3], recs)], "gzip"))
    assert cli.main(["decode", str(p), "--readings"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(r["seq"], r["point"], r["value"]) for r in lines] == [(1, "p", 21.37), (2, "run", True), (3, "mode", "auto")]
    p.write_bytes(b"EAC1z" + b"\x00" * 20)
    assert cli.main(["decode", str(p)]) != 0
    assert "cannot decode" in capsys.readouterr().err


def test_a_failed_commit_leaves_the_forwarding_state_as_it_was():
    from edge_agent.store.forward import Forwarder, Rule
    f = Forwarder(rules({"point": "iv", "min_interval_s": 10, "mode": "avg"}, {"point": "db", "deadband": 1}),
                  Metrics(), 1000)
    out: list = []
    f.begin(time.time_ns())
    assert f.decide(R(1.0, 0, point="db"), out) and not f.decide(R(1.0, 0, point="iv"), out)
    f.committed()
    before = {k: list(v) for k, v in f.states.items()}
    heap = list(f._heap)
    f.begin(time.time_ns())
    assert f.decide(R(5.0, 1, point="db"), out)             # would move the last value sent
    assert not f.decide(R(2.0, 15, point="iv"), out) and out  # would close the interval
    f.set_rules((Rule.of(forward_rule_from_dict({"id": "x", "drop": True}), "command"),))
    f.due(time.time_ns(), out)
    f.abort()                                                # the transaction rolled back
    assert f.states == before and sorted(f._heap) == sorted(heap)
    assert [r.id for r in f.rules] == ["r0", "r1"] and f.command_rules == ()
    f.begin(time.time_ns())
    assert not f.decide(R(1.5, 2, point="db"), [])           # still within the band of 1.0
    f.committed()
