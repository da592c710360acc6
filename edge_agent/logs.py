"""Structured logging: logfmt lines on stderr.

Under systemd (JOURNAL_STREAM set) a line starts with the syslog priority (`<6>`) and carries no
timestamp, since journald stamps it; elsewhere it starts with an ISO timestamp.
`RateLimited` keeps a flood of bad payloads from flooding the log.
"""
from __future__ import annotations

import contextvars
import logging
import os
import sys
import threading
import time
import uuid
from collections import deque

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
_RESERVED = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "taskName"}


# the trace id of the command, ask, write, rule firing or model update a line belongs to: set where one starts
# (the router, the rule engine), inherited by the tasks it starts, written by the formatter, returned in replies
TRACE: contextvars.ContextVar[str | None] = contextvars.ContextVar("trace", default=None)


def new_trace(prefix: str = "") -> str:
    t = (prefix + "-" if prefix else "") + uuid.uuid4().hex[:12]
    TRACE.set(t)
    return t


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
            if k not in _RESERVED and not k.startswith("_") and k != "trace":
                parts.append(f"{k}={_quote(v)}")
        trace = getattr(record, "trace", None) or TRACE.get()
        if trace:
            parts.append(f"trace={_quote(trace, 80)}")
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


_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class ShipHandler(logging.Handler):
    """Log records for the cloud: those at or above the agent's level (edge_agent.*) or the libraries' level (the
    rest), formatted as logfmt with a timestamp (control characters escaped, each line bounded), handed to `sink`
    (the store's log table: it never blocks). `override(level, for_s)` lowers or raises the agent's level for a
    bounded time, then it reverts."""

    def __init__(self, sink, agent_level: str, library_level: str, max_chars: int) -> None:
        super().__init__(logging.DEBUG)
        self.sink, self.max_chars = sink, max_chars
        self.agent_level, self.library_level = _LEVELS[agent_level], _LEVELS[library_level]
        self._override: tuple[int, float] | None = None
        self.base = logging.NOTSET  # the agent's logger level while no override runs (set by ship())
        self.setFormatter(LogfmtFormatter(journal=False))

    def override(self, level: str, for_s: float) -> float:
        self._override = (_LEVELS[level], time.monotonic() + for_s)
        logging.getLogger("edge_agent").setLevel(min(_LEVELS[level], self.base))  # the console keeps its level
        return for_s

    def level_now(self) -> tuple[str, float]:
        ov = self._override
        if ov is not None and time.monotonic() < ov[1]:
            return logging.getLevelName(ov[0]).lower(), round(ov[1] - time.monotonic(), 1)
        return logging.getLevelName(self.agent_level).lower(), 0.0

    def emit(self, record: logging.LogRecord) -> None:
        ours = record.name.startswith("edge_agent")
        level = self.agent_level if ours else self.library_level
        ov = self._override
        if ours and ov is not None:
            if time.monotonic() < ov[1]:
                level = ov[0]
            else:
                self._override = None
                logging.getLogger("edge_agent").setLevel(self.base)
        if record.levelno < level:
            return
        try:
            line = self.format(record)
        except Exception:  # noqa: BLE001 - a record that cannot be formatted is not shipped
            return
        if len(line) > self.max_chars:
            line = line[:self.max_chars] + f"...[{len(line) - self.max_chars} more]"
        self.sink(line.encode("utf-8", "backslashreplace"))


def ship(handler: ShipHandler | None) -> None:
    """Add (or, with None, remove) the shipping handler on the root logger. The loggers let through what the
    console or the shipping needs (the agent's at the lower of the console's and ship_level, the libraries' at the
    lower of the console's and ship_library_level); the console's own handler keeps log.level."""
    root = logging.getLogger()
    console = min((h.level for h in root.handlers if not isinstance(h, ShipHandler) and h.level), default=root.level)
    for h in [h for h in root.handlers if isinstance(h, ShipHandler)]:
        root.removeHandler(h)
    ours = logging.getLogger("edge_agent")
    if handler is None:
        ours.setLevel(logging.NOTSET)
        root.setLevel(console or logging.WARNING)
        return
    root.addHandler(handler)
    root.setLevel(min(console or logging.WARNING, handler.library_level))
    handler.base = min(console or logging.WARNING, handler.agent_level)
    ours.setLevel(handler.base)


RING = RingHandler(1000)  # the last lines, for the logs.tail command
RING.setFormatter(LogfmtFormatter(journal=False))


def setup(level: str = "info", fmt: str = "auto") -> None:
    journal = fmt == "journal" or (fmt == "auto" and bool(os.environ.get("JOURNAL_STREAM")))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter(journal))
    handler.setLevel(level.upper())  # a shipped-level override (logs.level) never floods the console
    RING.setLevel(level.upper())
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
