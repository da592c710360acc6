"""write: an allow-listed, typed, ranged point write through the adapter that owns the device."""
from __future__ import annotations

import logging
from typing import Any

from edge_agent.glm.schema import Arg, ToolSpec
from edge_agent.ops.base import CommandError, Field, Gateway, Operation, Request
from edge_agent.records import WriteRefused

audit = logging.getLogger("edge_agent.audit")


async def _write(gw: Gateway, req: Request) -> dict:
    f = req.fields
    what = {"device": f["device"], "point": f["point"], "value": f["value"]}
    try:
        await gw.write_point(f["device"], f["point"], f["value"])
    except WriteRefused as e:
        audit.warning("write refused", extra={"who": req.who, **what, "reason": str(e)})
        raise CommandError("refused", str(e)) from None
    audit.info("write done", extra={"who": req.who, **what})
    return {"written": what}


def _answer(a: dict, result: Any) -> str:
    return f"wrote {a['value']!r} to {a['device']} {a['point']}"


OPERATIONS = (
    Operation("write", "write a point (the adapter's write allow-list, type and range apply)",
              {"device": Field((str,)), "point": Field((str,)), "value": Field((int, float, bool, str))},
              changes=True, run=_write, answer=_answer,
              tool=ToolSpec("write_point", (("device", Arg.DEVICE), ("point", Arg.POINT), ("value", Arg.VALUE)),
                            {"device": "pump-1", "point": "enabled", "value": True}),
              examples=("set plc-1 setpoint to 42",)),
)
