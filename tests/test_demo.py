"""`edge-agent demo` runs the whole spine on loopback and exits cleanly."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time


def test_demo_shows_readings_flowing_to_the_cloud():
    r = subprocess.run([sys.executable, "-m", "edge_agent", "demo", "--duration", "4", "--devices", "3"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rows = [line.split() for line in r.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert len(rows) >= 3
    last = rows[-1]
    received, committed, acked, cloud_got = int(last[1]), int(last[2]), int(last[3]), int(last[6])
    assert received > 0 and committed > 0 and acked > 0 and cloud_got > 0
    assert "acknowledged by the cloud" in r.stdout


def test_demo_exits_cleanly_on_ctrl_c():
    p = subprocess.Popen([sys.executable, "-m", "edge_agent", "demo"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    time.sleep(4)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert "stopped:" in out
    assert "Traceback" not in err


def test_demo_says_how_to_install_mosquitto_when_missing(tmp_path):
    env = {**os.environ, "EDGE_AGENT_MOSQUITTO": str(tmp_path / "no-such-mosquitto")}
    r = subprocess.run([sys.executable, "-m", "edge_agent", "demo", "--duration", "1"], capture_output=True, text=True,
                       timeout=30, env=env)
    assert r.returncode == 1
    assert "sudo apt-get install -y mosquitto mosquitto-clients" in r.stderr and "Traceback" not in r.stderr
