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
        if not _listening(self.proc, self.port, timeout, "mosquitto", self.log):
            self.stop()
            raise RuntimeError(f"mosquitto did not listen on 127.0.0.1:{self.port} within {timeout}s")
        return self

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


def _listening(proc: subprocess.Popen, port: int, timeout: float, what: str, log: Path) -> bool:
    """Wait (blocking) until `port` on 127.0.0.1 accepts connections: True; False after `timeout`; a process that
    exits meanwhile raises with the tail of its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited ({proc.returncode}); see {log}: "
                               f"{log.read_text()[-500:] if log.exists() else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class Nginx:
    """nginx from the distribution as a model server: HTTPS on a loopback port, client certificates required
    (signed by `client_ca`), serving `root`; `rate` bounds bytes a second per connection (resume tests). The access
    log records each request's Range header, status and body bytes sent."""

    def __init__(self, directory: Path, root: Path, ca: Path, cert: Path, key: Path, port: int | None = None,
                 rate: str = "0") -> None:
        self.dir, self.root = Path(directory), Path(root)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.access_log = self.dir / "access.log"
        self.binary = shutil.which("nginx") or "/usr/sbin/nginx"
        temp = "\n".join(f"  {k}_temp_path {self.dir}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                       "scgi"))
        user = "user root;\n" if os.geteuid() == 0 else ""
        self.conf = self.dir / "nginx.conf"
        self.conf.write_text(f"""{user}daemon off;
worker_processes 1;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log warn;
events {{ worker_connections 64; }}
http {{
  log_format ota '"$request" $status $body_bytes_sent range="$http_range" client=$ssl_client_verify';
  access_log {self.access_log} ota;
{temp}
  default_type application/octet-stream;
  server {{
    listen 127.0.0.1:{self.port} ssl;
    server_name localhost;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_client_certificate {ca};
    ssl_verify_client on;
    ssl_protocols TLSv1.2 TLSv1.3;
    limit_rate {rate};
    root {self.root};
  }}
}}
""")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    def start(self, timeout: float = 10.0) -> "Nginx":
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf), "-p", str(self.dir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not _listening(self.proc, self.port, timeout, "nginx", self.dir / "error.log"):
            self.stop()
            raise RuntimeError(f"nginx did not listen on 127.0.0.1:{self.port} within {timeout}s")
        return self

    def kill(self) -> None:
        """SIGKILL the master and its worker (a server that dies mid-transfer)."""
        if self.proc is not None and self.proc.poll() is None:
            import signal
            kids = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout.split()
            self.proc.send_signal(signal.SIGKILL)
            for pid in kids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def requests(self) -> list[dict]:
        """The access log: one dict per request (path, status, bytes, range)."""
        import re
        out = []
        if self.access_log.exists():
            for line in self.access_log.read_text().splitlines():
                m = re.match(r'"GET (\S+) [^"]*" (\d+) (\d+) range="([^"]*)" client=(\S+)', line)
                if m:
                    out.append({"path": m[1], "status": int(m[2]), "bytes": int(m[3]), "range": m[4],
                                "client": m[5]})
        return out
