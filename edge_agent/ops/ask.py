"""ask: a question -> the GLM's tool call -> the operation that tool belongs to, through the router's checks
(the allow-list, the operation's own checks, the adapters' write allow-list, audit) -> a one-line answer.

The GLM only proposes: its call runs exactly as the same operation sent directly would.
"""
from __future__ import annotations

import json
import logging

from edge_agent.ops.base import CommandError, Field, Gateway, Operation, Request

audit = logging.getLogger("edge_agent.audit")


async def _ask(gw: Gateway, req: Request) -> dict:
    from edge_agent.agent import AskError

    text = req.fields["text"]
    if gw.ask is None:
        raise CommandError("unavailable", "this gateway runs without the model")
    try:
        plan = await gw.ask(text)
    except AskError as e:
        raise CommandError(e.code, e.message) from None
    call = plan["call"]
    op = req.router.by_tool[call["tool"]]
    fields = dict(call["args"])
    try:
        req.router.check_allowed(op)
    except CommandError:
        audit.warning("ask refused", extra={"who": req.who, "text": text[:200], "call": json.dumps(call)})
        raise CommandError("forbidden", f"the question maps to {call['tool']}, which runs command {op.name!r}, and "
                                        f"{op.name!r} is not allowed on this gateway (commands.allow)",
                           call=call) from None
    try:
        req.router.check_signed(op, req.signer)
    except CommandError as e:
        audit.warning("ask refused", extra={"who": req.who, "text": text[:200], "call": json.dumps(call)})
        e.call = call
        raise
    try:
        result = await req.router.run(op, req.router.check_fields(op, fields), f"{req.who} via ask", req.signer)
    except CommandError as e:
        e.call = call
        raise
    answer = op.answer(fields, result) if op.answer is not None else ""
    return {"call": call, "result": result, "answer": answer, **plan}


OPERATIONS = (
    Operation("ask", "a question in words -> the GLM's tool call -> that operation -> a one-line answer",
              {"text": Field((str,))}, changes=False, run=_ask, examples=("which alarms are active?",)),
)
