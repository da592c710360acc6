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
    assert m[2] == ops.reference_markdown(), \
        "regenerate docs/operations.md (its block from edge_agent.ops.reference_markdown())"
    for name in ops.TABLE:
        assert f"`{name}`" in m[2]


# Every command line the docs show, and who runs it: "here" (the test below), a test file that runs it or its
# operation (and must still name it), or "gateway" (it installs on or changes a real gateway or a server: not run on a
# test machine; the files it installs are checked by tests/test_systemd.py).
WHO_RUNS = (
    ("edge-agent ask --dry-run", "here"),
    ("openssl genpkey", "here"),
    ("edge-agent model pack", "here"),
    ("--min-agent 0.1.0 --expires-days 30", "here"),
    ("edge-agent ask \"list all pumps\"", "test_commands.py"),
    ("edge-agent ask \"which alarms are active?\"", "test_commands.py"),
    ("edge-agent op ", "test_commands.py"),
    ("coap-client-notls", "test_coap.py"),
    ("edge-agent model install", "test_ota.py"),
    ("edge-agent model list", "test_ota.py"),
    ("edge-agent model rollback", "test_ota.py"),
    ("edge-agent model cancel", "test_trust3.py"),
    ("edge-agent decode", "test_forward.py"),
    ("pip install -e '.[recipe]'", ".ci/run"),
    ("python3 models/recipe/build.py", "test_recipe.py"),
    ("mosquitto_pub", "test_commands.py"),
    ("-t edge/gw-1/cmd/query", "test_commands.py"),
    ("sudo ", "gateway"),
    ("journalctl", "gateway"),
    ("rsync", "gateway"),
)
_TEST_NAMES = {"test_commands.py": "cmd/", "test_coap.py": "coap-client-notls", "test_trust3.py": "abort()",
               "test_ota.py": "edge_agent\", \"model\"", "test_forward.py": "[\"decode\",", "test_recipe.py": "build.py", ".ci/run": "[test,recipe,bench]"}


def _doc_commands() -> list[tuple[str, str]]:
    out = []
    for page in sorted((ROOT / "docs").glob("*.md")):
        for block in re.findall(r"```(?:sh|bash)\n(.*?)```", page.read_text(), re.S):
            for line in block.splitlines():
                line = line.strip()
                if line and not line.startswith(("#", "{")):
                    out.append((page.name, line))
    return out


def test_every_command_the_docs_show_is_run_by_a_test_or_marked_for_a_gateway():
    for page, line in _doc_commands():
        who = next((w for prefix, w in WHO_RUNS if prefix in line), None)
        assert who is not None, f"{page}: {line!r} is run by no test; run it in one, or say who runs it (WHO_RUNS)"
        if who not in ("here", "gateway"):
            where = ROOT / ".ci" / "run" if who == ".ci/run" else ROOT / "tests" / who
            assert _TEST_NAMES[who] in where.read_text(), f"{who} no longer runs {line!r}"


def test_the_docs_commands_marked_here_run_as_shown(tmp_path):
    """glm.md's dry run prints the call the page shows; ota.md's key and pack make a signed bundle."""
    import shutil

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    glm = (ROOT / "docs" / "glm.md").read_text()
    shown = re.search(r'edge-agent ask --dry-run "([^"]+)"\n(\{.*\})\n', glm)
    r = subprocess.run([sys.executable, "-m", "edge_agent", "ask", "--dry-run", shown[1]], capture_output=True,
                       text=True, timeout=120, env=env)
    assert r.returncode == 0 and r.stdout.strip() == shown[2], (r.stdout, shown[2])
    from edge_agent.glm.engine import shipped_model_dir
    folder = tmp_path / "models" / "glm-edge-iot" / "1.4.0"
    shutil.copytree(shipped_model_dir(), folder)
    if shutil.which("openssl"):
        subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", "publisher.pem"], cwd=tmp_path,
                       check=True, capture_output=True, timeout=60)
    else:  # the same key, made as the docs' openssl would
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        (tmp_path / "publisher.pem").write_bytes(Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    r = subprocess.run([sys.executable, "-m", "edge_agent", "model", "pack", "models/glm-edge-iot/1.4.0", "--key",
                        "publisher.pem", "--version", "1.4.0", "--min-agent", "0.1.0", "--expires-days", "30"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0 and "packed glm-edge-iot 1.4.0" in r.stdout, r.stderr
    assert (folder / "manifest.sig").exists()


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
