"""The supervisor: restarts with capped exponential backoff, reverse-order stop, a loop-fed watchdog."""
from __future__ import annotations

import asyncio
import socket
import time

from edge_agent.app import App
from edge_agent.config import from_dict
from edge_agent.systemd import Notifier


def _cfg(tmp_path, **supervisor):
    return from_dict({"gateway": {"state_dir": str(tmp_path / "state")}, "uplink": {"enabled": False},
                      "southbound": {"mqtt": {"enabled": False}}, "metrics": {"enabled": False},
                      "supervisor": {"restart_min_s": 0.05, "restart_max_s": 0.2, **supervisor}})


class Flaky:
    """A component whose run() crashes `crashes` times, then runs until stopped."""

    def __init__(self, name: str, crashes: int, log: list) -> None:
        self.name, self.crashes, self.log = name, crashes, log
        self.starts: list[float] = []
        self._stop = asyncio.Event()

    async def run(self) -> None:
        self.starts.append(time.monotonic())
        if len(self.starts) <= self.crashes:
            raise RuntimeError(f"{self.name} crash {len(self.starts)}")
        await self._stop.wait()

    async def stop(self) -> None:
        self.log.append(self.name)
        self._stop.set()


def test_crashed_component_restarts_with_capped_backoff_and_is_counted(tmp_path):
    async def main():
        stopped: list[str] = []
        app = App(_cfg(tmp_path))
        flaky = Flaky("flaky", crashes=5, log=stopped)
        app.components = [flaky]
        task = asyncio.create_task(app.run())
        while len(flaky.starts) < 6:
            await asyncio.sleep(0.01)
        assert app.metrics.value("edge_agent_component_restarts_total", {"component": "flaky"}) == 5
        gaps = [b - a for a, b in zip(flaky.starts, flaky.starts[1:])]
        # steps 0.05, 0.1, 0.2 (cap), 0.2, 0.2; each wait drawn from [half, all] of its step (the shared Backoff)
        assert 0.024 <= gaps[0] < 0.09 and 0.049 <= gaps[1] < 0.16, gaps
        assert all(0.099 <= g < 0.3 for g in gaps[2:]), gaps
        assert app.metrics.value("edge_agent_backoff_waits_total", {"loop": "restart_flaky"}) == 5
        assert app.state["flaky"] == "running"
        app.request_stop()
        await task
    asyncio.run(main())


def test_components_stop_in_reverse_order(tmp_path):
    async def main():
        stopped: list[str] = []
        app = App(_cfg(tmp_path))
        app.components = [Flaky("first", 0, stopped), Flaky("second", 0, stopped), Flaky("third", 0, stopped)]
        task = asyncio.create_task(app.run())
        await asyncio.sleep(0.1)
        app.request_stop()
        await task
        assert stopped == ["third", "second", "first"]
    asyncio.run(main())


def test_stop_is_bounded_when_a_component_hangs(tmp_path):
    class Stuck(Flaky):
        async def stop(self) -> None:
            await asyncio.sleep(3600)

    async def main():
        app = App(_cfg(tmp_path, stop_timeout_s=0.5))
        app.components = [Stuck("stuck", 0, [])]
        task = asyncio.create_task(app.run())
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        app.request_stop()
        await task
        assert time.monotonic() - t0 < 2.0
    asyncio.run(main())


def test_watchdog_is_fed_by_the_event_loop_and_stops_when_it_stalls(tmp_path):
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)

    def pings() -> list[float]:
        out = []
        while True:
            try:
                if sock.recv(4096) == b"WATCHDOG=1":
                    out.append(time.monotonic())
            except BlockingIOError:
                return out

    async def main():
        app = App(_cfg(tmp_path), Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"}))
        app.components = [Flaky("idle", 0, [])]
        task = asyncio.create_task(app.run())
        await asyncio.sleep(0.5)
        healthy = pings()
        assert len(healthy) >= 6, "a ping every 50 ms while the loop runs"
        time.sleep(0.6)  # the event loop stalls: no pings may be sent meanwhile
        stalled = pings()
        assert len(stalled) == 0, "pings must come from the loop, not from a thread"
        await asyncio.sleep(0.2)
        assert len(pings()) >= 2, "pings resume when the loop does"
        app.request_stop()
        await task
    asyncio.run(main())
    sock.close()
