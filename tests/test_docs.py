"""The manual stays true: the README is a newcomer's page, every link in it and in docs/ leads somewhere, the
operations reference is the operations table's, and the commands the README shows run."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = re.compile(r"(<!-- generated: edge_agent\.ops\.reference_markdown\(\)[^>]*-->\n)(.*?)(<!-- end generated -->)",
                  re.S)


def test_the_readme_is_short_and_every_link_leads_somewhere():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    pages = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name}: link to {target} leads nowhere"
    linked = set(re.findall(r"\]\(docs/([^)#]+)\)", readme))
    assert linked >= {p.name for p in (ROOT / "docs").glob("*.md")}, "a docs page the README does not point to"


def test_the_operations_reference_is_generated_from_the_table():
    from edge_agent import ops
    text = (ROOT / "docs" / "operations.md").read_text()
    m = MARK.search(text)
    assert m, "docs/operations.md lost its generated block"
    assert m[2] == ops.reference_markdown(), "regenerate docs/operations.md (its block from edge_agent.ops.reference_markdown())"
    for name in ops.TABLE:
        assert f"`{name}`" in m[2]


def test_the_commands_the_readme_shows_run(tmp_path):
    """The ones that need no daemon and no network: ops, ask --dry-run, sign; check on the example config."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "edge_agent", *args], capture_output=True, text=True,
                              timeout=120, env=env, cwd=tmp_path)
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Commands", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    shown = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert "edge-agent ops" in shown
    r = run("ops")
    assert r.returncode == 0 and "model.cancel" in r.stdout
    line = next(s for s in shown if s.startswith("edge-agent ask --dry-run"))
    r = run("ask", "--dry-run", re.search(r'"(.+)"', line)[1])
    assert r.returncode == 0 and '"tool":"query_stats"' in r.stdout and '"agg":"max"' in r.stdout, r.stdout
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    (tmp_path / "alice.pem").write_bytes(Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    line = next(s for s in shown if s.startswith("edge-agent sign"))
    r = run(*line.split()[1:])
    assert r.returncode == 0 and '"gw-7"' not in r.stdout and '"sig"' in r.stdout, r.stderr
    # the example config names the files of a real install: here check says which one is missing, in one line
    r = run("check", "--config", str(ROOT / "systemd" / "edge-agent.toml"))
    assert r.returncode == 2 and r.stderr.startswith("edge-agent: uplink.ca_file /etc/edge-agent/ca.pem: file not "
                                                     "found") and "Traceback" not in r.stderr, r.stderr
