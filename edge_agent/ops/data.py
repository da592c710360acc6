"""What the gateway knows of its devices: devices, devices.forget, query, alerts.list."""
from __future__ import annotations

import logging
from typing import Any

from edge_agent.glm.schema import AGGS, MAX_WINDOW_S, Arg, ToolSpec
from edge_agent.ops.base import CommandError, Field, Gateway, Operation, Request

audit = logging.getLogger("edge_agent.audit")

MAX_CLEARED = 100


async def _devices(gw: Gateway, req: Request) -> list[dict]:
    devices = await gw.devices()
    flt = req.fields.get("filter")
    if flt:
        devices = [d for d in devices if flt.lower() in d["device"].lower()]
    return devices


def _devices_answer(fields: dict, result: Any) -> str:
    names = [d["device"] for d in result]
    head = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    what = f" matching {fields.get('filter')!r}" if fields.get("filter") else ""
    return f"{len(names)} device{'s' if len(names) != 1 else ''}{what}" + (f": {head}" if names else "")


async def _query(gw: Gateway, req: Request) -> dict:
    f = req.fields
    if f["agg"] not in AGGS:
        raise CommandError("bad_request", f"query: agg must be one of {', '.join(AGGS)}")
    if not 1 <= f["window_s"] <= MAX_WINDOW_S:
        raise CommandError("bad_request", f"query: window_s must be 1 .. {MAX_WINDOW_S}")
    try:
        return await gw.query_stats(f["device"], f["point"], f["agg"], f["window_s"], req.cfg.query_max_rows)
    except LookupError as e:
        raise CommandError("not_found", e.args[0] if e.args else str(e)) from None
    except OverflowError as e:
        raise CommandError("refused", str(e)) from None


def window_text(s: int) -> str:
    for unit, n in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if s % n == 0:
            k = s // n
            return f"{k} {unit}{'s' if k != 1 else ''}"
    return f"{s} s"


def _query_answer(a: dict, result: Any) -> str:
    value = result.get("value") if isinstance(result, dict) else None
    if value is None:
        return f"no {a['point']} readings from {a['device']} in the last {window_text(a['window_s'])}"
    if isinstance(value, float):
        value = round(value, 3)
    if a["agg"] == "last":
        return f"{a['device']} {a['point']} is {value}"
    if a["agg"] == "count":
        return f"{value} {a['point']} readings from {a['device']} in the last {window_text(a['window_s'])}"
    words = {"min": "lowest", "max": "highest", "avg": "average"}
    return f"{words[a['agg']]} {a['point']} of {a['device']} over the last {window_text(a['window_s'])}: {value}"


async def _alerts(gw: Gateway, req: Request) -> dict:
    n = req.fields.get("cleared", 10)
    if not 0 <= n <= MAX_CLEARED:
        raise CommandError("bad_request", f"alerts.list: cleared must be 0 .. {MAX_CLEARED}")
    return await gw.alerts(req.fields.get("device"), n)


def _alerts_answer(fields: dict, result: Any) -> str:
    firing = result["firing"]
    where = f" on {fields['device']}" if fields.get("device") else ""
    if not firing:
        return f"no alarm is active{where}"
    head = "; ".join(a["text"] for a in firing[:5]) + (f" and {len(firing) - 5} more" if len(firing) > 5 else "")
    return f"{len(firing)} alarm{'s' if len(firing) != 1 else ''} active{where}: {head}"


async def _forget(gw: Gateway, req: Request) -> dict:
    device = req.fields["device"]
    if gw.forget_device is None:
        raise CommandError("unavailable", "this gateway cannot forget devices")
    n = await gw.forget_device(device)
    if n is None:
        raise CommandError("not_found", f"no device {device[:128]!r} in the registry")
    audit.info("device forgotten", extra={"who": req.who, "device": device, "series": n})
    return {"forgotten": device, "series": n}


OPERATIONS = (
    Operation("devices", "the device registry (filter: a substring of the id)", {"filter": Field((str, type(None)), False)},
              changes=False, run=_devices, answer=_devices_answer,
              tool=ToolSpec("list_devices", (("filter", Arg.FILTER),), {"filter": None}), examples=("list all pumps",)),
    Operation("query", "last|min|max|avg|count of a point over a window",
              {"device": Field((str,)), "point": Field((str,)), "agg": Field((str,)), "window_s": Field((int,))},
              changes=False, run=_query, answer=_query_answer,
              tool=ToolSpec("query_stats", (("device", Arg.DEVICE), ("point", Arg.POINT), ("agg", Arg.AGG),
                                            ("window_s", Arg.WINDOW)),
                            {"device": "pump-1", "point": "temperature", "agg": "avg", "window_s": 3600}),
              examples=("max temperature of pump-1 over the last hour",)),
    Operation("devices.forget", "remove a device and its series from the registry (its room is free at once; its "
              "readings stay in the window; it registers again when it sends)", {"device": Field((str,))},
              changes=True, run=_forget),
    Operation("alerts.list", "the alerts firing now and the last `cleared` (default 10) cleared ones; device: only "
              "that device's", {"device": Field((str, type(None)), False), "cleared": Field((int,), False)},
              changes=False, run=_alerts, answer=_alerts_answer,
              tool=ToolSpec("list_alerts", (("device", Arg.DEVICE_OR_NULL),), {"device": None}),
              examples=("which alarms are active?",)),
)
