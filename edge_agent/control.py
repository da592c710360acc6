"""The local control socket: how the CLI on the gateway reaches the running daemon's operations.

`<state_dir>/control.sock`, a Unix socket that only the agent's user can open (mode 0600 inside the 0700 state
directory). One request per connection: the operation's name on one line, its JSON request on the next; the reply is
the router's reply (the same bytes the MQTT command channel would publish) on one line. The same router runs it: the
allow-list, the fields' checks, the concurrency bound, dedup, audit (`who` is `local uid=N`, from the kernel).

Bounds: a request line of at most 64 KiB (the router's own `max_request_bytes` applies after), 16 connections at
once, 10 s to send the request. At the bound a new connection takes the place of the oldest one that has not sent
its request yet (idle connections cannot lock the CLI out); only when all 16 are running requests is it refused with
`busy`.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from pathlib import Path
from typing import Awaitable, Callable

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
MAX_LINE = 64 * 1024
MAX_CLIENTS = 16
READ_TIMEOUT_S = 10.0
Handler = Callable[[str, bytes, str], Awaitable[tuple[bytes, "str | None"]]]


def socket_path(state_dir: str | Path) -> Path:
    return Path(state_dir) / SOCKET_NAME


@contextlib.contextmanager
def short_path(path: Path):
    """A path the kernel accepts for a Unix socket (at most 107 bytes): the path itself, or the same file reached
    through /proc/self/fd of its open directory."""
    if len(os.fsencode(str(path))) < 100:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


class ControlServer:
    name = "control"

    def __init__(self, state_dir: Path, handle: Handler) -> None:
        self.path = socket_path(state_dir)
        self.handle = handle
        self._stop = asyncio.Event()
        self._running = 0  # connections whose request runs
        self._idle: dict[asyncio.StreamWriter, None] = {}  # connections that have not sent their request, oldest first

    async def run(self) -> None:
        self._stop.clear()
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # left by a process that died without stopping
        old = os.umask(0o177)  # the socket is born 0600: no moment where another user could connect
        try:
            with short_path(self.path) as p:
                server = await asyncio.start_unix_server(self._serve, p, limit=MAX_LINE + 2)
        finally:
            os.umask(old)
        log.info("control socket open", extra={"path": str(self.path)})
        try:
            await self._stop.wait()
        finally:
            server.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def stop(self) -> None:
        self._stop.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self._running + len(self._idle) >= MAX_CLIENTS and self._idle:  # the oldest idle one gives way
                oldest = next(iter(self._idle))
                self._idle.pop(oldest)
                oldest.transport.abort()
            if self._running + len(self._idle) >= MAX_CLIENTS:
                writer.write(b'{"ok":false,"error":{"code":"busy","message":"too many control connections"}}\n')
                return
            self._idle[writer] = None
            try:
                name = (await asyncio.wait_for(reader.readline(), READ_TIMEOUT_S)).rstrip(b"\n")
                body = (await asyncio.wait_for(reader.readline(), READ_TIMEOUT_S)).rstrip(b"\n")
            finally:
                evicted = writer not in self._idle  # another connection took its place while it sat idle
                self._idle.pop(writer, None)
            if evicted:
                return
            self._running += 1
            try:
                reply, _rid = await self.handle(name.decode("utf-8", "replace")[:128], body,
                                                f"local uid={_peer_uid(writer)}")
            finally:
                self._running -= 1
            writer.write(reply + b"\n")
            await writer.drain()
        except (asyncio.TimeoutError, TimeoutError, asyncio.LimitOverrunError, ValueError, ConnectionError) as e:
            log.warning("control request dropped", extra={"error": f"{type(e).__name__}: {e}"[:200]})
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


def _peer_uid(writer: asyncio.StreamWriter) -> int | str:
    sock = writer.get_extra_info("socket")
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", creds)[1]
    except (OSError, AttributeError):
        return "?"


class NoDaemon(Exception):
    """No agent answers on the control socket."""


def call(state_dir: str | Path, name: str, request: dict, timeout: float = 30.0) -> dict:
    """The CLI's side (blocking): send one request to the running daemon and return its reply."""
    import json

    path = socket_path(state_dir)
    body = json.dumps(request, separators=(",", ":")).encode()
    try:
        with short_path(path) as p, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(p)
            s.sendall(name.encode() + b"\n" + body + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                data += chunk
                if len(data) > 64 << 20:
                    raise NoDaemon(f"the reply on {path} is larger than 64 MiB")
    except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as e:
        raise NoDaemon(f"no edge agent is running for state directory {Path(state_dir)} ({type(e).__name__} on "
                       f"{path})") from None
    except PermissionError:
        raise NoDaemon(f"{path}: permission denied (run as the agent's user, or root)") from None
    except socket.timeout:
        raise NoDaemon(f"the edge agent did not answer within {timeout:.0f} s on {path}") from None
    if not data:
        raise NoDaemon(f"the edge agent closed {path} without a reply")
    return json.loads(data)
