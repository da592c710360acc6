"""Structured logging: logfmt lines on stderr.

Under systemd (JOURNAL_STREAM set) a line starts with the syslog priority (`<6>`) and carries no
timestamp, since journald stamps it; elsewhere it starts with an ISO timestamp.
`RateLimited` keeps a flood of bad payloads from flooding the log.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import deque

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
_RESERVED = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "taskName"}


MAX_VALUE_CHARS = 2000  # a value longer than this is cut (with a mark); a traceback is cut at 8,000
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(c: str) -> str:
    e = _ESCAPES.get(c)
    if e is not None:
        return e
    o = ord(c)
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}"


def _quote(v: object, limit: int = MAX_VALUE_CHARS) -> str:
    """A logfmt value: quoted when it must be; control characters (and lone surrogates, DEL, C1 controls) escaped so
    that an attacker's payload can neither forge a log line nor a field, nor write terminal escapes; bounded."""
    s = str(v)
    if len(s) > limit:
        s = s[:limit] + f"...[{len(s) - limit} more]"
    if s == "" or not s.isprintable() or any(c in s for c in ' "=\\'):
        s = '"' + "".join(c if c.isprintable() and c not in '"\\' else _escape(c) for c in s) + '"'
    return s


class LogfmtFormatter(logging.Formatter):
    def __init__(self, journal: bool) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        parts = []
        if self.journal:
            prefix = f"<{_PRIORITY.get(record.levelno, 6)}>"
        else:
            prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created)) + \
                f".{int(record.msecs):03d} "
        parts.append(f"level={record.levelname.lower()}")
        parts.append(f"component={record.name.removeprefix('edge_agent.')}")
        parts.append(f"msg={_quote(record.getMessage())}")
        for k, v in record.__dict__.items():
            if k not in _RESERVED and not k.startswith("_"):
                parts.append(f"{k}={_quote(v)}")
        if record.exc_info:
            parts.append(f"exc={_quote(self.formatException(record.exc_info), 8000)}")
        return prefix + " ".join(parts)


class RingHandler(logging.Handler):
    """Keeps the last N formatted lines in memory (bounded), for `logs.tail`-style inspection."""

    def __init__(self, capacity: int = 1000) -> None:
        super().__init__()
        self.lines: deque[tuple[str, str, str]] = deque(maxlen=capacity)

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelname.lower(), record.name.removeprefix("edge_agent."), self.format(record)))


RING = RingHandler(1000)  # the last lines, for the logs.tail command
RING.setFormatter(LogfmtFormatter(journal=False))


def setup(level: str = "info", fmt: str = "auto") -> None:
    journal = fmt == "journal" or (fmt == "auto" and bool(os.environ.get("JOURNAL_STREAM")))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter(journal))
    root.addHandler(handler)
    root.addHandler(RING)
    root.setLevel(level.upper())


class RateLimited:
    """At most `burst` lines per `interval_s` for each key; the rest are counted and summarised."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0, burst: int = 5) -> None:
        self.logger, self.interval_s, self.burst = logger, interval_s, burst
        self._state: dict[str, list] = {}
        self._lock = threading.Lock()

    def warning(self, key: str, msg: str, *args: object, **extra: object) -> None:
        now = time.monotonic()
        with self._lock:
            st = self._state.get(key)
            if st is None or now - st[0] >= self.interval_s:
                suppressed = st[2] if st else 0
                st = self._state[key] = [now, 0, 0]
                if len(self._state) > 1024:  # bounded: forget the oldest windows
                    for k in list(self._state)[:512]:
                        self._state.pop(k, None)
                if suppressed:
                    extra["suppressed_before"] = suppressed
            if st[1] >= self.burst:
                st[2] += 1
                return
            st[1] += 1
        self.logger.warning(msg, *args, extra=extra)
