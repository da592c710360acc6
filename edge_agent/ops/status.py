"""The gateway itself: ping, status, config.get, logs.tail."""
from __future__ import annotations

import time
from typing import Any

from edge_agent.glm.schema import ToolSpec
from edge_agent.ops.base import CommandError, Field, Gateway, Operation, Request

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


async def _ping(gw: Gateway, req: Request) -> dict:
    return {"pong": True, "ts": time.time_ns()}


async def _status(gw: Gateway, req: Request) -> dict:
    return gw.status()


def _status_answer(fields: dict, result: Any) -> str:
    up = result.get("uptime_s", 0)
    took = f"{up:.0f} s" if up < 120 else f"{up / 60:.0f} min" if up < 7200 else f"{up / 3600:.1f} h"
    return (f"gateway {result.get('gateway')} up {took}; uplink "
            f"{'connected' if result.get('uplink_connected') else 'down'}; "
            f"{result.get('outbox_readings', 0)} readings waiting for the cloud")


async def _config(gw: Gateway, req: Request) -> dict:
    return gw.config()


async def _logs_tail(gw: Gateway, req: Request) -> list[str]:
    f = req.fields
    n = f.get("n", 50)
    if not 1 <= n <= 1000:
        raise CommandError("bad_request", "logs.tail: n must be 1 .. 1000")
    level = f.get("level", "debug")
    if level not in _LEVELS:
        raise CommandError("bad_request", f"logs.tail: level must be one of {', '.join(_LEVELS)}")
    comp = f.get("component")
    lines = [line for lv, c, line in gw.log_lines()
             if _LEVELS.get(lv, 50) >= _LEVELS[level] and (comp is None or c.startswith(comp))]
    return lines[-n:]


async def _logs_level(gw: Gateway, req: Request) -> dict:
    if gw.log_level is None:
        raise CommandError("unavailable", "log shipping is off on this gateway (log.ship = false)")
    level, for_s = req.fields["level"], req.fields.get("for_s", 600)
    if level not in _LEVELS:
        raise CommandError("bad_request", f"logs.level: level must be one of {', '.join(_LEVELS)}")
    if not 1 <= for_s <= 86400:
        raise CommandError("bad_request", "logs.level: for_s must be 1 .. 86400")
    return gw.log_level(level, for_s)


async def _certs_renew(gw: Gateway, req: Request) -> dict:
    if gw.renew_cert is None:
        raise CommandError("unavailable", "certificate renewal is off on this gateway (uplink.renew = false)")
    return gw.renew_cert()


OPERATIONS = (
    Operation("ping", "is the agent answering", {}, changes=False, run=_ping),
    Operation("status", "version, uptime, components, outbox, uplink, model", {}, changes=False, run=_status,
              answer=_status_answer, tool=ToolSpec("status", (), {}), examples=("how is the gateway",)),
    Operation("config.get", "the effective configuration, secrets redacted", {}, changes=False, run=_config),
    Operation("logs.tail", "the agent's last log lines (n, level, component prefix)",
              {"n": Field((int,), False), "level": Field((str,), False), "component": Field((str,), False)},
              changes=False, run=_logs_tail),
    Operation("logs.level", "ship the agent's log records from this level for for_s seconds (default 600), then "
              "back to log.ship_level", {"level": Field((str,)), "for_s": Field((int,), False)}, changes=True,
              run=_logs_level),
    Operation("certs.renew", "renew the uplink certificate now: a new key on the gateway, a CSR to the cloud's "
              "signer, the new pair committed once the broker accepts it", {}, changes=True, run=_certs_renew),
)
