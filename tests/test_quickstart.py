"""The README's Quick start, verbatim, in a fresh clone: its first command as written (as root it runs apt-get
without sudo; as a user through sudo), then the demo for 20 s under Ctrl-C. Asserts what a new user would see."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def quick_start_command() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    return re.search(r"```sh\n(.+?)\n```", section, re.S)[1].strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
@pytest.mark.skipif(os.geteuid() != 0 and shutil.which("sudo") is None, reason="as a user the command needs sudo")
def test_quick_start_verbatim_in_a_fresh_clone(tmp_path):
    cmd = quick_start_command()
    assert cmd.endswith(".venv/bin/edge-agent demo") and "pip install ." in cmd
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    setup = cmd.removesuffix(" && .venv/bin/edge-agent demo")
    r = subprocess.run(["bash", "-c", setup], cwd=clone, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive", "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:])
    demo = subprocess.run(["timeout", "--preserve-status", "-s", "INT", "20", ".venv/bin/edge-agent", "demo"], cwd=clone,
                          capture_output=True, text=True, timeout=120)
    out = demo.stdout
    assert demo.returncode == 0, (out[-2000:], demo.stderr[-2000:])
    assert "local broker   mqtt://127.0.0.1:" in out and "metrics        http://127.0.0.1:" in out
    rows = [line for line in out.splitlines() if re.match(r"^\s+\d+\s+\d+\s+\d+\s+\d+\s+\d+\s+(up|down)", line)]
    assert len(rows) >= 10 and all(r.split()[5] == "up" for r in rows[3:-2])  # (the last: while it stops)
    assert int(rows[-2].split()[3]) > 1000  # the cloud acknowledged readings
    assert "operator asked" in out and "stopped:" in out and "next: edge-agent check" in out
    assert "cloud got alert: pump-1/temperature" in out and "try            mosquitto_sub" in out
    assert "Traceback" not in out + demo.stderr and "Future exception" not in demo.stderr
    assert "level=error" not in out + demo.stderr
