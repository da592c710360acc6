"""Mosquitto processes on loopback for `edge-agent demo`, the tests and the benchmarks.

`Mosquitto.local()` is a plain broker; `Mosquitto.mtls()` requires client certificates signed by the
given CA. Both listen on 127.0.0.1 only, on a free port, and keep sessions across restarts
(persistence in their own directory).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

INSTALL_HINT = "mosquitto is not installed: sudo apt-get install -y mosquitto mosquitto-clients"


def find_mosquitto() -> str | None:
    """$EDGE_AGENT_MOSQUITTO, else mosquitto on PATH, else Debian's /usr/sbin/mosquitto."""
    override = os.environ.get("EDGE_AGENT_MOSQUITTO")
    if override:
        return override if os.access(override, os.X_OK) else None
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cloud_acl() -> Path:
    """The shipped cloud-side ACL: in a checkout (systemd/) or an installed wheel (<prefix>/share/edge-agent/)."""
    import sys
    for p in (Path(__file__).resolve().parents[2] / "systemd" / "mosquitto-cloud.acl",
              Path(sys.prefix) / "share" / "edge-agent" / "mosquitto-cloud.acl"):
        if p.is_file():
            return p
    raise FileNotFoundError("mosquitto-cloud.acl not found (systemd/ in a checkout, share/edge-agent/ installed)")


class Mosquitto:
    def __init__(self, directory: Path, port: int, lines: list[str]) -> None:
        self.binary = find_mosquitto()
        if self.binary is None:
            raise FileNotFoundError(INSTALL_HINT)
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.conf = self.dir / "mosquitto.conf"
        self.log = self.dir / "mosquitto.log"
        common = [f"listener {port} 127.0.0.1", "persistence true", f"persistence_location {self.dir}/",
                  "autosave_interval 1", "max_queued_messages 1000000", "max_queued_bytes 0",
                  "max_inflight_messages 1000", "max_packet_size 16777216", "set_tcp_nodelay true", "user root",
                  f"log_dest file {self.log}", "log_type error", "log_type warning", "log_type notice"]
        self.conf.write_text("\n".join(common + lines) + "\n")
        self.proc: subprocess.Popen | None = None

    @classmethod
    def local(cls, directory: Path, port: int | None = None) -> "Mosquitto":
        return cls(directory, port or free_port(), ["allow_anonymous true"])

    @classmethod
    def mtls(cls, directory: Path, ca: Path, cert: Path, key: Path, port: int | None = None,
             acl: Path | None = None) -> "Mosquitto":
        """A cloud broker: client certificates required, identity from the certificate, and the shipped ACL
        (systemd/mosquitto-cloud.acl; each gateway confined to its own topics) unless another is given."""
        return cls(directory, port or free_port(), [
            f"cafile {ca}", f"certfile {cert}", f"keyfile {key}", "require_certificate true",
            "use_identity_as_username true", "tls_version tlsv1.2", "allow_anonymous false",
            f"acl_file {acl or cloud_acl()}"])

    def start(self, timeout: float = 10.0) -> "Mosquitto":
        """Start and wait for the port. Blocking by design (tests, benchmarks); from a coroutine call it
        through asyncio.to_thread, as the demo does."""
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited ({self.proc.returncode}); see {self.log}: "
                                   f"{self.log.read_text()[-500:] if self.log.exists() else ''}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on 127.0.0.1:{self.port} within {timeout}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> "Mosquitto":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
