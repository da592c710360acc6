"""The unit passes systemd-analyze; the agent speaks sd_notify (READY, WATCHDOG, STATUS, STOPPING)."""
from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import wait_for

ROOT = Path(__file__).resolve().parents[1]
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed on this machine")


@needs_analyze
def test_unit_passes_verify(tmp_path):
    # verify checks that ExecStart exists: point it at this environment's edge-agent
    exe = shutil.which("edge-agent")
    assert exe, "edge-agent is not installed (pip install .)"
    unit = tmp_path / "edge-agent.service"
    unit.write_text((ROOT / "systemd" / "edge-agent.service").read_text().replace("/usr/local/bin/edge-agent", exe))
    r = subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "edge-agent.service" not in r.stderr, r.stderr


@needs_analyze
def test_unit_security_exposure_at_most_1_5():
    r = subprocess.run([ANALYZE, "security", "--offline=true", str(ROOT / "systemd" / "edge-agent.service")],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for edge-agent.service: ([0-9.]+)", r.stdout)
    assert m, r.stdout[-2000:] + r.stderr
    assert float(m.group(1)) <= 1.5


def test_unit_essentials():
    text = (ROOT / "systemd" / "edge-agent.service").read_text()
    for line in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "User=edge-agent", "StateDirectory=edge-agent",
                 "ConfigurationDirectory=edge-agent", "NoNewPrivileges=yes", "ProtectSystem=strict"):
        assert line in text


def test_sd_notify_ready_watchdog_status_stopping(local_broker, cloud_broker, make_agent, tmp_path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    agent = make_agent(local_broker, cloud_broker, env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000"})
    agent.start()
    got: list[tuple[float, str]] = []

    def drain() -> None:
        try:
            while True:
                got.append((time.monotonic(), sock.recv(4096).decode()))
        except (socket.timeout, BlockingIOError):
            pass

    wait_for(lambda: (drain(), any("READY=1" in m for _, m in got))[1], 20, what="READY=1")
    ready = next(m for _, m in got if "READY=1" in m)
    assert "STATUS=" in ready
    # WATCHDOG_USEC=400ms: a ping every 200 ms from the event loop, so about 10 in two seconds
    t0 = time.monotonic()
    while time.monotonic() - t0 < 2.0:
        drain()
    pings = [t for t, m in got if m == "WATCHDOG=1" and t >= t0]
    assert 7 <= len(pings) <= 13, f"expected a WATCHDOG=1 every 200 ms, got {len(pings)} in 2 s"
    assert agent.stop() == 0
    drain()
    assert any(m == "STOPPING=1" for _, m in got)
    sock.close()
