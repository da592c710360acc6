"""The store on its own: seqs, outbox acknowledgement, retention, registry, restart."""
from __future__ import annotations

import asyncio
import json
import time

from edge_agent.config import StoreConfig
from edge_agent.metrics import Metrics
from edge_agent.records import Reading
from edge_agent.store import Store


def R(i: int, device: str = "d1", value=None) -> Reading:
    return Reading(device, "p", float(i) if value is None else value, "u", time.time_ns(), "good", "test")


async def _open(tmp_path, **kw) -> Store:
    s = Store(StoreConfig(**kw), tmp_path, Metrics())
    await s.open()
    return s


def test_seqs_are_contiguous_and_survive_restart(tmp_path):
    async def main():
        s = await _open(tmp_path)
        last = await asyncio.gather(*(s.write([R(i), R(i)]) for i in range(50)))
        assert sorted(last) == list(range(2, 101, 2))
        await s.close()
        s = await _open(tmp_path)
        assert s.next_seq == 101 and s.outbox_readings == 100
        assert await s.write([R(0)]) == 101
        rows = await s.read_outbox(0, 10_000, 10 << 20)
        seqs = [r["seq"] for row in rows for r in json.loads(b"[" + row.payload + b"]")]
        assert seqs == list(range(1, 102))
        await s.close()
    asyncio.run(main())


def test_outbox_rows_leave_only_when_acked(tmp_path):
    async def main():
        s = await _open(tmp_path, outbox_chunk_readings=10)
        await s.write([R(i) for i in range(35)])
        rows = await s.read_outbox(0, 20, 1 << 20)
        assert [(r.first_seq, r.last_seq) for r in rows] == [(1, 10), (11, 20)]
        s.ack_outbox(20)
        await s.write([R(99)])  # the ack rides on the next commit
        rows = await s.read_outbox(0, 1000, 1 << 20)
        assert [(r.first_seq, r.last_seq) for r in rows] == [(21, 30), (31, 35), (36, 36)]
        assert s.outbox_readings == 16 and s.acked_seq == 20
        await s.close()
        s = await _open(tmp_path)
        assert s.acked_seq == 20 and s.outbox_readings == 16
        await s.close()
    asyncio.run(main())


def test_batch_bounds_one_row_always_fits(tmp_path):
    async def main():
        s = await _open(tmp_path, outbox_chunk_readings=100)
        await s.write([R(i, value="x" * 500) for i in range(100)])
        rows = await s.read_outbox(0, 10, 1024)  # a row bigger than both bounds still goes, alone
        assert len(rows) == 1 and rows[0].count == 100
        await s.close()
    asyncio.run(main())


def test_retention_by_rows_and_registry(tmp_path):
    async def main():
        s = await _open(tmp_path, retention_rows=1000)
        for k in range(5):
            await s.write([R(i, device=f"dev-{k}") for i in range(600)])
        await s.close()  # close runs maintenance
        s = await _open(tmp_path, retention_rows=1000)
        n = (await s.query("SELECT count(*) FROM readings"))[0][0]
        assert n == 1000
        assert s.metrics is not None
        devs = await s.query("SELECT device FROM devices ORDER BY device")
        assert [d for (d,) in devs] == [f"dev-{k}" for k in range(5)]
        await s.close()
    asyncio.run(main())


def test_values_keep_their_json_types(tmp_path):
    async def main():
        s = await _open(tmp_path)
        await s.write([R(0, value=True), R(1, value=7), R(2, value="on"), R(3, value=2.5)])
        rows = await s.read_outbox(0, 100, 1 << 20)
        values = [r["value"] for r in json.loads(b"[" + rows[0].payload + b"]")]
        assert values == [True, 7, "on", 2.5]
        await s.close()
    asyncio.run(main())


def test_a_crashing_commit_fails_its_writers_and_the_store_keeps_serving(tmp_path):
    from edge_agent.store import StoreError

    class Weird:  # a value no adapter should hand over: the commit fails, the writer must survive
        pass

    async def main():
        s = await _open(tmp_path)
        # SQLite refuses the first (an sqlite3 error); it takes bytes but JSON cannot (a crash in our code)
        for bad in (Weird(), b"raw bytes"):
            try:
                await s.write([Reading("d", "p", bad, None, time.time_ns(), "good", "test")])  # type: ignore[arg-type]
            except StoreError as e:
                assert "commit" in str(e)
            else:
                raise AssertionError("the write must fail")
        assert await s.write([R(1)]) == 1, "the next write commits, with the first seq"
        await s.close()
    asyncio.run(main())


def test_the_registry_is_bounded_and_known_series_go_on(tmp_path):
    def P(device: str, point: str) -> Reading:
        return Reading(device, point, 1.0, "", time.time_ns(), "good", "mqtt")

    async def main():
        s = await _open(tmp_path, max_devices=3, max_points=5)
        await s.write([P("d1", "a"), P("d1", "b"), P("d2", "a")])
        # a spamming source: new devices beyond 3, new series beyond 5; the known ones still land
        await s.write([P(f"spam{i}", "x") for i in range(10)] + [P("d1", "a")])
        await s.write([P("d1", f"p{i}") for i in range(10)] + [P("d2", "a")])
        devs = [d for (d,) in await s.query("SELECT device FROM devices ORDER BY device")]
        assert devs == ["d1", "d2", "spam0"]
        assert (await s.query("SELECT count(*) FROM points"))[0][0] == 5
        assert s.metrics.value("edge_agent_readings_refused_total", {"reason": "registry_full"}) == 9 + 9
        assert (await s.query("SELECT count(*) FROM readings"))[0][0] == 3 + 2 + 2
        dead = await s.query("SELECT source, topic, reason, detail FROM dead_letters ORDER BY id")
        assert len(dead) == 18 and dead[0][:3] == ("mqtt", "spam1/x", "registry_full")
        assert "store.max_devices = 3" in dead[0][3]
        await s.close()
        s = await _open(tmp_path, max_devices=3, max_points=5)  # the bound holds across restarts
        await s.write([P("new", "x"), P("d1", "a")])
        assert s.metrics.value("edge_agent_readings_refused_total", {"reason": "registry_full"}) == 1
        rows = await s.read_outbox(0, 1000, 1 << 20)
        seqs = [r["seq"] for row in rows for r in json.loads(b"[" + row.payload + b"]")]
        assert seqs == list(range(1, len(seqs) + 1))  # refused readings take no sequence numbers
        await s.close()
    asyncio.run(main())


def _commits(s: Store) -> float:
    return s.metrics.store_commits._value.get()


def test_writes_within_the_delay_share_one_commit_that_goes_when_the_first_has_waited_it(tmp_path):
    """Batching that follows the load: a write waits at most batch_max_delay_ms for others to share its commit,
    counted from when it was handed over (not from when the writer got to it), and never longer."""
    async def main():
        s = await _open(tmp_path, batch_max_delay_ms=300)
        await s.write([R(0)])  # registers the series
        before = _commits(s)
        t0 = time.monotonic()
        first = asyncio.ensure_future(s.write([R(1)]))
        await asyncio.sleep(0.1)
        second = asyncio.ensure_future(s.write([R(2)]))
        assert await first == 2 and await second == 3
        waited = time.monotonic() - t0
        assert _commits(s) == before + 1  # one commit for both
        assert 0.28 <= waited < 2.0, waited  # the first write's bound, not the second's
        # a caller that held its readings already (an adapter gathering a batch) says since when
        t0 = time.monotonic()
        await s.commit([R(3)], since=t0 - 10)
        assert time.monotonic() - t0 < 0.2  # its wait was spent: it goes at once
        await s.close()
    asyncio.run(main())


def test_a_full_batch_goes_at_once_whatever_the_delay(tmp_path):
    async def main():
        s = await _open(tmp_path, batch_max_delay_ms=10_000, batch_max_rows=50)
        t0 = time.monotonic()
        assert await s.write([R(i) for i in range(60)]) == 60
        assert time.monotonic() - t0 < 5.0  # the row bound, not the 10 s delay
        await s.close()
    asyncio.run(main())


def test_an_acknowledgement_rides_along_with_readings_or_goes_alone_after_its_bound(tmp_path):
    async def main():
        s = await _open(tmp_path, batch_max_delay_ms=0, lazy_max_delay_ms=500)
        await s.write([R(i) for i in range(10)])
        before = _commits(s)
        s.ack_outbox(5)
        await asyncio.sleep(0.2)
        assert s.acked_seq == 0 and _commits(s) == before  # waiting for company
        await s.write([R(10)])  # the next readings take it along: one commit
        assert s.acked_seq == 5 and _commits(s) == before + 1
        s.ack_outbox(11)
        t0 = time.monotonic()
        while s.acked_seq != 11:
            await asyncio.sleep(0.02)
            assert time.monotonic() - t0 < 5.0, "the acknowledgement never committed on its own"
        assert time.monotonic() - t0 >= 0.4  # alone, after its bound
        await s.close()
        s = await _open(tmp_path)
        assert s.acked_seq == 11 and s.outbox_readings == 0
        await s.close()
    asyncio.run(main())


def test_the_uplink_reads_what_was_just_committed_from_memory_and_never_an_acknowledged_row(tmp_path):
    async def main():
        s = await _open(tmp_path, outbox_chunk_readings=10)
        await s.write([R(i) for i in range(25)])
        # served from the in-memory tail: no trip to the reader thread
        s._read_outbox = None  # type: ignore[assignment]  # would raise if called
        rows = await s.read_outbox(0, 1000, 1 << 20)
        assert [(r.first_seq, r.last_seq) for r in rows] == [(1, 10), (11, 20), (21, 25)]
        assert await s.read_outbox(25, 1000, 1 << 20) == []  # nothing after the newest commit
        del s._read_outbox
        s.ack_outbox(20)
        await s.write([R(99)])
        rows = await s.read_outbox(0, 1000, 1 << 20)  # from SQLite: the acknowledged rows are gone
        assert [(r.first_seq, r.last_seq) for r in rows] == [(21, 25), (26, 26)]
        rows = await s.read_outbox(20, 1000, 1 << 20)
        assert [(r.first_seq, r.last_seq) for r in rows] == [(21, 25), (26, 26)]
        await s.close()
    asyncio.run(main())


def test_a_forgotten_device_frees_its_room_at_once_and_registers_again_when_it_sends(tmp_path):
    """The job kind ForgetDevice (devices.forget): one declaration in store/jobs.py and this test. The registry is
    full; forgetting a device frees its room for a new one at once; the forgotten device registers again when it
    sends; forgetting an unknown device says so (None)."""
    async def main():
        s = await _open(tmp_path, max_devices=2)
        await s.write([R(1, "flood-1"), R(2, "pump-1")])
        await s.write([R(3, "pump-2")])  # the registry is full: refused
        assert set(s.registry.known_devices) == {"flood-1", "pump-1"}
        assert await s.forget_device("flood-1") == 1
        assert await s.forget_device("flood-1") is None
        await s.write([R(4, "pump-2")])
        assert set(s.registry.known_devices) == {"pump-1", "pump-2"}
        devices = {d["device"] for d in await s.devices()}
        assert devices == {"pump-1", "pump-2"}
        await s.close()
        s = await _open(tmp_path, max_devices=3)  # and after a restart the registry is what was committed
        assert set(s.registry.known_devices) == {"pump-1", "pump-2"}
        await s.write([R(5, "flood-1")])
        assert "flood-1" in s.registry.known_devices
        await s.close()
    asyncio.run(main())
