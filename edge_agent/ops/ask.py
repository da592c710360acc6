"""ask and confirm: a question -> the GLM's tool call -> the operation that tool belongs to, through the router's
checks (the allow-list, signatures, the operation's own checks, the adapters' write allow-list, audit) -> a one-line
answer.

The GLM only proposes. Before anything runs:
- the call's device (and point) must be ones the gateway's registry knows, else `clarify` with the closest names;
- a write must be what the question plainly asks (`guard.check_write`), else `clarify` with the reason;
- a write then follows `ask.writes`: `confirm` (default) answers with the exact write and a one-time token that
  expires; the `confirm` operation with that token runs it as the `write` operation would; `direct` runs it at once;
  `never` refuses it.

Outcomes in the reply: `done` (ran; `result` and `answer`), `clarify` (nothing ran; `reason`: nothing,
which_device, which_value or use_a_rule, and `answer` in words: from the model's own `clarify` call, the guard or
the registry), `confirm`
(nothing ran yet; `confirm.token`, `confirm.write`, `confirm.expires_in_s`, `answer`).
"""
from __future__ import annotations

import collections
import difflib
import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

from edge_agent.config import AskConfig
from edge_agent.glm.points import SHIPPED
from edge_agent.glm.schema import CLARIFY
from edge_agent.ops.base import CommandError, Field, Gateway, Operation, Request
from edge_agent.ops.guard import Refusal, check_write

audit = logging.getLogger("edge_agent.audit")


@dataclass
class _Pending:
    call: dict
    who: str
    signer: str | None
    expires: float
    used: bool = False


class PendingWrites:
    """Writes proposed through ask, awaiting their confirmation: bounded (ask.max_pending; beyond, the oldest goes),
    each token one-time, expiring, and bound to who asked (the channel and the operator key)."""

    def __init__(self, cfg: AskConfig, dropped=None, clock=time.monotonic) -> None:
        self.cfg, self.clock, self._dropped = cfg, clock, dropped
        self._tokens: collections.OrderedDict[str, _Pending] = collections.OrderedDict()

    def offer(self, call: dict, who: str, signer: str | None) -> tuple[str, float]:
        now = self.clock()
        for t in [t for t, p in self._tokens.items() if p.expires < now - self.cfg.confirm_ttl_s]:
            del self._tokens[t]  # expired and past the grace in which "expired" is still said
        while len(self._tokens) >= self.cfg.max_pending:
            self._tokens.popitem(last=False)
            if self._dropped is not None:
                self._dropped.inc()
        token = secrets.token_urlsafe(12)
        self._tokens[token] = _Pending(call, who, signer, now + self.cfg.confirm_ttl_s)
        return token, self.cfg.confirm_ttl_s

    def take(self, token: str, who: str, signer: str | None) -> dict:
        p = self._tokens.get(token)
        if p is None:
            raise CommandError("not_found", "no such confirmation token (never issued, or dropped at the bound)")
        if p.used:
            raise CommandError("refused", "this confirmation token was used already; ask again")
        if self.clock() > p.expires:
            raise CommandError("refused", f"this confirmation token expired (ask.confirm_ttl_s = "
                                          f"{self.cfg.confirm_ttl_s:g}); ask again")
        if (p.who, p.signer) != (who, signer):
            raise CommandError("forbidden", "this confirmation token was issued to another requester")
        p.used = True
        return p.call


# what the model's own `clarify` answers say (its reason -> words)
CLARIFY_ANSWERS = {
    "nothing": "that asks for nothing this gateway can do (it reads points, lists devices and alerts, reports its "
               "status and writes points on a plain order)",
    "which_device": "which device? name it by its id (edge-agent op devices lists them)",
    "which_value": "which value? say the value to write",
    "use_a_rule": "that depends on a condition; the gateway writes only now and unconditionally — a rule "
                  "(rules.add) acts on conditions and raises alerts",
}


async def _registry(gw: Gateway) -> dict[str, list[str]]:
    """device -> its points, as the gateway's registry knows them."""
    return {d["device"]: [p["point"] for p in d["points"]] for d in await gw.devices()}


def _known(devices: dict[str, list[str]], call: dict) -> Refusal | None:
    """None when the call's device (and point) are in the registry; else a clarification with the closest names."""
    args = call["args"]
    device = args.get("device")
    if not isinstance(device, str):
        return None
    if device not in devices:
        close = difflib.get_close_matches(device, list(devices), n=3, cutoff=0.6)
        return Refusal("which_device", f"no device {device!r}" + (f"; did you mean {', '.join(close)}?" if close
                                                                  else " is known to this gateway"))
    point = args.get("point")
    points = devices[device]
    if isinstance(point, str) and points and point not in points:
        close = difflib.get_close_matches(point, points, n=3, cutoff=0.5)
        return Refusal("nothing", f"{device} has no point {point!r}; " + (f"did you mean {', '.join(close)}?" if close
                                                                           else f"it has {', '.join(points[:10])}"))
    return None


async def _ask(gw: Gateway, req: Request) -> dict:
    from edge_agent.agent import AskError

    text = req.fields["text"]
    if gw.ask is None:
        raise CommandError("unavailable", "this gateway runs without the model")
    devices = await _registry(gw)
    try:
        plan = await gw.ask(text, devices)
    except AskError as e:
        raise CommandError(e.code, e.message) from None
    call = plan["call"]
    if call["tool"] == CLARIFY.name:  # the model itself says there is nothing to run
        req.router.metrics.ask_outcomes.labels("clarify").inc()
        reason = call["args"]["reason"]
        return {"call": call, "outcome": "clarify", "reason": reason, "answer": CLARIFY_ANSWERS[reason], **plan}
    op = req.router.by_tool[call["tool"]]
    try:
        req.router.check_allowed(op)
    except CommandError:
        audit.warning("ask refused", extra={"who": req.who, "text": text[:200], "call": json.dumps(call)})
        raise CommandError("forbidden", f"the question maps to {call['tool']}, which runs command {op.name!r}, and "
                                        f"{op.name!r} is not allowed on this gateway (commands.allow)",
                           call=call) from None
    why = (check_write(text, call["args"], gw.points or SHIPPED) if op.changes else None) or _known(devices, call)
    if why is not None:
        reason, words = why.code, why.why
        if op.changes:
            audit.warning("ask write not made: clarify", extra={"who": req.who, "text": text[:200],
                                                                "call": json.dumps(call), "reason": words})
        req.router.metrics.ask_outcomes.labels("clarify").inc()
        return {"call": call, "outcome": "clarify", "reason": reason, "answer": words, **plan}
    try:
        req.router.check_signed(op, req.signer)
    except CommandError as e:
        audit.warning("ask refused", extra={"who": req.who, "text": text[:200], "call": json.dumps(call)})
        e.call = call
        raise
    if op.changes:
        mode = gw.pending.cfg.writes if gw.pending is not None else "direct"
        if mode == "never":
            raise CommandError("forbidden", "ask.writes = never: the model may not write on this gateway; send the "
                                            "write operation itself", call=call)
        if mode == "confirm":
            assert gw.pending is not None
            token, ttl = gw.pending.offer(call, req.who, req.signer)
            audit.info("ask write proposed", extra={"who": req.who, "text": text[:200], "call": json.dumps(call)})
            req.router.metrics.ask_outcomes.labels("confirm").inc()
            a = call["args"]
            return {"call": call, "outcome": "confirm", "confirm": {"token": token, "expires_in_s": ttl,
                                                                    "write": dict(a)},
                    "answer": f"to write {a['value']!r} to {a['device']} {a['point']}, confirm with token {token} "
                              f"within {ttl:g} s", **plan}
    done = await _run(req, op, call, f"{req.who} via ask")
    req.router.metrics.ask_outcomes.labels("done").inc()
    return {"call": call, **done, **plan}


async def _run(req: Request, op: Operation, call: dict, who: str) -> dict:
    fields = dict(call["args"])
    try:
        result = await req.router.run(op, req.router.check_fields(op, fields), who, req.signer)
    except CommandError as e:
        e.call = call
        raise
    return {"outcome": "done", "result": result, "answer": op.answer(fields, result) if op.answer else ""}


async def _confirm(gw: Gateway, req: Request) -> dict:
    if gw.pending is None:
        raise CommandError("unavailable", "this gateway takes no confirmations")
    call = gw.pending.take(req.fields["token"], req.who, req.signer)
    op = req.router.by_tool[call["tool"]]
    req.router.check_allowed(op)
    req.router.check_signed(op, req.signer)
    done = await _run(req, op, call, f"{req.who} via ask, confirmed")
    req.router.metrics.ask_outcomes.labels("confirmed").inc()
    return {"call": call, **done}


OPERATIONS = (
    Operation("ask", "a question in words -> the GLM's tool call -> that operation -> a one-line answer",
              {"text": Field((str,))}, changes=False, run=_ask, examples=("which alarms are active?",)),
    Operation("confirm", "run a write that ask proposed, with its one-time token (ask.writes = confirm)",
              {"token": Field((str,))}, changes=True, run=_confirm),
)
