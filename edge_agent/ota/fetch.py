"""Fetching a bundle: HTTPS (mutual TLS) GETs with urllib3, bounded documents and files streamed to `.partial` files
that resume with Range, read as the bytes arrive (a server that drips is seen dripping), retried through the one
Backoff, and aborted at once from another thread (the updater's deadline, rate watchdog, cancel, or stop).
Blocking: the updater runs it in a thread.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import ssl
import time
from pathlib import Path
from typing import Callable

from edge_agent.backoff import Backoff
from edge_agent.ota.trust import UpdateError

log = logging.getLogger("edge_agent.ota")

CHUNK = 1 << 16


class Fetcher:
    """HTTPS (mutual TLS) GETs with urllib3: small bounded documents, and files streamed to `.partial` files that
    resume with Range. Blocking: run it in a thread."""

    def __init__(self, ctx: ssl.SSLContext | None, timeout_s: float, attempts: int, allow_http: bool,
                 progress: Callable[[int], None] | None = None, sleep=time.sleep, waits=None) -> None:
        import urllib3

        self.urllib3 = urllib3
        self.pool = urllib3.PoolManager(ssl_context=ctx, timeout=urllib3.Timeout(connect=timeout_s, read=timeout_s),
                                        retries=False, maxsize=1)
        self.attempts, self.allow_http, self.progress, self.sleep = attempts, allow_http, progress, sleep
        self.cancelled = False
        self.why: UpdateError | None = None  # why it was aborted (deadline, slow, cancelled, the agent stopping)
        self.received = 0  # bytes read from the server, every request: the watchdog's measure of the rate
        self.backoff = Backoff(0.5, 30.0, waits)  # between tries (each resumes where the last stopped)
        self._response = None  # the response being read (abort shuts its socket, from another thread)

    def abort(self, why: UpdateError) -> None:
        """Stop the transfer now, from any thread: a read blocked on the socket returns at once."""
        self.why, self.cancelled = self.why or why, True
        r = self._response
        if r is not None:
            try:
                r.shutdown()
            except Exception:  # noqa: BLE001 - the response may be closing on its own
                pass

    def _check_aborted(self) -> None:
        if self.cancelled:
            raise self.why or UpdateError("interrupted", "the update was cancelled (the agent is stopping)")

    def _read(self, r, limit: int):
        """The response's bytes as they come (read1: a server that drips bytes is seen dripping), at most `limit`."""
        self._response = r
        try:
            left = limit
            while left > 0:
                self._check_aborted()
                block = r.read1(min(CHUNK, left))
                if not block:
                    break
                self.received += len(block)
                left -= len(block)
                yield block
            self._check_aborted()
        finally:
            self._response = None

    def _check_url(self, url: str) -> None:
        if not (url.startswith("https://") or (self.allow_http and url.startswith("http://"))):
            raise UpdateError("tls", f"{url[:120]}: only https:// URLs (ota.allow_plain_http is off)")

    def _request(self, url: str, headers: dict[str, str] | None = None):
        u3 = self.urllib3
        self._check_url(url)
        try:
            r = self.pool.request("GET", url, headers=headers or {}, preload_content=False, redirect=False)
        except u3.exceptions.SSLError as e:
            raise UpdateError("tls", f"TLS with the model server failed: {str(e)[:200]}") from None
        if r.status in (400, 495, 496) and b"SSL" in (r.read(2048) or b""):
            r.release_conn()
            raise UpdateError("tls", f"the model server refused our client certificate (HTTP {r.status})")
        if r.status == 404:
            r.release_conn()
            raise UpdateError("not_found", f"{url[:160]}: not found (HTTP 404)")
        if r.status not in (200, 206):
            r.release_conn()
            raise UpdateError("download", f"{url[:160]}: HTTP {r.status}")
        return r

    def _retrying(self, what: str, fn):
        u3 = self.urllib3
        for attempt in range(1, self.attempts + 1):
            self._check_aborted()
            try:
                return fn()
            except (u3.exceptions.HTTPError, OSError) as e:
                self._check_aborted()  # a read cut by abort() is the abort's failure, not the network's
                if attempt == self.attempts:
                    raise UpdateError("download", f"{what}: {type(e).__name__}: {str(e)[:160]} (after {attempt} "
                                                  "tries)") from None
                log.warning("model download interrupted; resuming", extra={"what": what, "try": attempt,
                                                                           "error": str(e)[:200]})
                self.sleep(self.backoff.next())

    def get(self, url: str, limit: int) -> bytes:
        def once() -> bytes:
            r = self._request(url)
            try:
                data = b"".join(self._read(r, limit + 1))
            finally:
                r.release_conn()
            if len(data) > limit:
                raise UpdateError("size", f"{url[:160]}: larger than {limit} bytes")
            self.backoff.reset()
            return data
        return self._retrying(url, once)

    def file(self, url: str, dest: Path, size: int, sha256: str) -> None:
        """dest, fetched whole and checked, through dest.partial; a partial file left by an earlier try (this
        process or one killed) is resumed from its end."""
        partial = dest.with_name(dest.name + ".partial")

        def once() -> None:
            have = partial.stat().st_size if partial.exists() else 0
            if have > size:
                partial.unlink()
                have = 0
            if have == size:
                return
            r = self._request(url, {"Range": f"bytes={have}-"} if have else None)
            try:
                total = r.headers.get("Content-Range", "").rpartition("/")[2] if r.status == 206 else \
                    r.headers.get("Content-Length")
                if total and total.isdigit() and int(total) != size:
                    raise UpdateError("size", f"{dest.name}: the server's file is {total} bytes; the manifest says "
                                              f"{size}")
                if have and r.status == 206:
                    start = int(re.match(r"bytes (\d+)-", r.headers.get("Content-Range", "bytes 0-"))[1])
                    if start != have:
                        raise UpdateError("download", f"{dest.name}: the server resumed at {start}, not {have}")
                    mode = "ab"
                else:  # the whole file (a server that ignores Range, or a fresh start)
                    have, mode = 0, "wb"
                with partial.open(mode) as f:
                    for block in self._read(r, size - have + 1):
                        if have + len(block) > size:
                            raise UpdateError("size", f"{dest.name}: the server sends more than the {size} bytes "
                                                      "the manifest states")
                        f.write(block)
                        have += len(block)
                        if self.progress is not None:
                            self.progress(len(block))
                    f.flush()
                    os.fsync(f.fileno())
            finally:
                r.release_conn()
            if have < size:
                raise OSError(f"{dest.name}: the connection closed at {have} of {size} bytes")
        self._retrying(dest.name, once)
        h = hashlib.sha256()
        with partial.open("rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        if h.hexdigest() != sha256:
            partial.unlink()
            raise UpdateError("digest", f"{dest.name}: sha256 does not match the manifest")
        os.replace(partial, dest)


def copy_checked(src: Path, dest: Path, size: int, sha256: str) -> None:
    """A local file into the staging folder, hashed as it is copied (its one hash on the way in); a file that is not
    regular, or not the size and sha256 the manifest states, is refused."""
    if src.is_symlink() or not src.is_file():
        raise UpdateError("path", f"{src.name}: not a regular file in {src.parent}")
    h, n = hashlib.sha256(), 0
    with src.open("rb") as fin, dest.open("wb") as fout:
        while block := fin.read(1 << 22):
            n += len(block)
            if n > size:
                break
            h.update(block)
            fout.write(block)
        fout.flush()
        os.fsync(fout.fileno())
    if n != size:
        dest.unlink(missing_ok=True)
        raise UpdateError("size", f"{src.name}: {n}{'+' if n > size else ''} bytes; the manifest says {size}")
    if h.hexdigest() != sha256:
        dest.unlink(missing_ok=True)
        raise UpdateError("digest", f"{src.name}: sha256 does not match the manifest")
