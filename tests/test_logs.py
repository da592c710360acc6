"""Log lines: logfmt, journald-friendly under systemd, rate-limited floods."""
from __future__ import annotations

import logging

from edge_agent.logs import LogfmtFormatter, RateLimited


def _record(msg: str, **extra) -> logging.LogRecord:
    r = logging.LogRecord("edge_agent.uplink", logging.WARNING, __file__, 1, msg, None, None)
    r.__dict__.update(extra)
    return r


def test_journal_lines_carry_priority_and_no_timestamp():
    line = LogfmtFormatter(journal=True).format(_record("cloud connection lost", reason="timed out"))
    assert line == '<4>level=warning component=uplink msg="cloud connection lost" reason="timed out"'


def test_text_lines_start_with_a_timestamp():
    line = LogfmtFormatter(journal=False).format(_record("x", n=3))
    assert line[:4].isdigit() and line[4] == "-" and line.endswith("level=warning component=uplink msg=x n=3")


def test_rate_limited_keeps_a_burst_then_summarises():
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)
    log = logging.getLogger("test.ratelimit")
    log.addHandler(Keep())
    log.propagate = False
    rl = RateLimited(log, interval_s=0.2, burst=3)
    for _ in range(50):
        rl.warning("bad_json", "payload rejected", reason="bad_json")
    assert len(records) == 3
    import time
    time.sleep(0.25)
    rl.warning("bad_json", "payload rejected", reason="bad_json")
    assert len(records) == 4 and records[-1].suppressed_before == 47


def test_hostile_values_cannot_forge_lines_fields_or_terminal_escapes():
    fmt = LogfmtFormatter(journal=True)
    topic = 'devices/x\nlevel=error component=audit msg="write done" who=admin\x1b[2J\r\x00\u2028\ud800'
    line = fmt.format(_record("payload rejected", topic=topic, detail="y" * 5000))
    assert "\n" not in line and "\r" not in line and "\x1b" not in line and "\x00" not in line
    assert "\u2028" not in line and "\ud800" not in line
    assert line.count(" level=") == 0 and line.startswith("<4>level=warning component=uplink")
    assert 'topic="devices/x\\nlevel=error component=audit msg=\\"write done\\" who=admin\\x1b[2J\\r\\x00' \
           '\\u2028\\ud800"' in line
    assert len(line) < 2200 and "...[3000 more]" in line  # bounded
