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
import json
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any

from edge_agent.config import AskConfig
from edge_agent.glm.points import SHIPPED
from edge_agent.ops.base import CommandError, Field, Gateway, Operation, Request
from edge_agent.ops import plans
from edge_agent.ops.guard import check_write
from edge_agent.ops.plans import _known
from edge_agent.ops.memory import Frame

audit = logging.getLogger("edge_agent.audit")


@dataclass
class _Pending:
    call: dict
    who: str
    signer: str | None
    expires: float
    used: bool = False
    memory: tuple | None = None  # the conversation (ops.memory key) the proposal was made in


class PendingWrites:
    """Writes proposed through ask, awaiting their confirmation: bounded (ask.max_pending; beyond, the oldest goes),
    each token one-time, expiring, and bound to who asked (the channel and the operator key)."""

    def __init__(self, cfg: AskConfig, dropped=None, clock=time.monotonic) -> None:
        self.cfg, self.clock, self._dropped = cfg, clock, dropped
        self._tokens: collections.OrderedDict[str, _Pending] = collections.OrderedDict()

    def offer(self, call: dict, who: str, signer: str | None, memory: tuple | None = None) -> tuple[str, float]:
        now = self.clock()
        for t in [t for t, p in self._tokens.items() if p.expires < now - self.cfg.confirm_ttl_s]:
            del self._tokens[t]  # expired and past the grace in which "expired" is still said
        while len(self._tokens) >= self.cfg.max_pending:
            self._tokens.popitem(last=False)
            if self._dropped is not None:
                self._dropped.inc()
        token = secrets.token_urlsafe(12)
        self._tokens[token] = _Pending(call, who, signer, now + self.cfg.confirm_ttl_s, memory=memory)
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

    def memory_of(self, token: str) -> tuple | None:
        p = self._tokens.get(token)
        return p.memory if p is not None else None

    def live(self, token: str | None, who: str, signer: str | None) -> bool:
        """Whether the token still awaits its answer from this requester (issued to it, unused, not expired)."""
        p = self._tokens.get(token) if token else None
        return p is not None and not p.used and self.clock() <= p.expires and (p.who, p.signer) == (who, signer)


# what the model's own `clarify` answers say (its reason -> words)
CLARIFY_ANSWERS = {
    "nothing": "that asks for nothing this gateway can do (it reads points, lists devices and alerts, reports its "
               "status and writes points on a plain order)",
    "which_device": "which device? name it by its id (edge-agent op devices lists them)",
    "which_value": "which value? say the value to write",
    "use_a_rule": "that depends on a condition; the gateway writes only now and unconditionally — a rule "
                  "(rules.add) acts on conditions and raises alerts",
    "too_complex": "that is beyond what one request may plan (at most 4 steps, a condition on a reading now, a fan-out "
                   "over at most 8 devices, a rule on one point and one threshold; no loops or schedules)",
}


async def _registry(gw: Gateway) -> dict[str, list[str]]:
    """device -> its points, as the gateway's registry knows them."""
    return {d["device"]: [p["point"] for p in d["points"]] for d in await gw.devices()}


async def _ask(gw: Gateway, req: Request) -> dict:
    from edge_agent.agent import AskError
    from edge_agent.ops.compose import Composer

    text = req.fields["text"]
    if gw.ask is None:
        raise CommandError("unavailable", "this gateway runs without the model")
    devices = await _registry(gw)
    key = (req.who, req.signer, req.fields.get("conversation"))
    frame = gw.memory.get(key) if gw.memory is not None else Frame()
    if frame.pending is not None and (gw.pending is None or not gw.pending.live(frame.pending, req.who, req.signer)):
        frame.pending = None  # answered, dropped at the bound, or expired: a yes/no now has nothing to answer
    try:
        r = await Composer(gw.ask, devices, gw.points or SHIPPED).resolve(text, frame)
    except AskError as e:
        raise CommandError(e.code, e.message) from None
    if r.followup:
        req.router.metrics.agent_events.labels("followup").inc()
    kind = r.kind
    if kind == "clarify":
        reply = _clarify(req, r.doc, r.doc["args"]["reason"], r.words or CLARIFY_ANSWERS[r.doc["args"]["reason"]],
                         r.meta)
    elif kind == "answer":
        reply = await _answer(gw, req, frame, r.doc["confirm"])
    elif kind == "plan":
        reply = await _plan(gw, req, r, devices, key, frame)
    elif kind == "rule":
        reply = await _rule(gw, req, r, devices, key, frame)
    elif kind == "call":
        reply = await _one(gw, req, r, devices, key, frame)
    else:  # pragma: no cover - Resolved.kind is a closed set
        raise AssertionError(kind)
    if gw.memory is not None:
        gw.memory.put(key, frame)
    return reply


def _clarify(req: Request, call: dict, reason: str, words: str, meta: dict) -> dict:
    req.router.metrics.ask_outcomes.labels("clarify").inc()
    return {"call": call, **meta, "outcome": "clarify", "reason": reason, "answer": words,
            "resolved": {"tool": "clarify", "args": {"reason": reason}}}


def _remember(frame: Frame, r: Any) -> None:
    frame.last, frame.texts = r.doc, list(r.texts)


async def _one(gw: Gateway, req: Request, r: Any, devices: dict, key: tuple, frame: Frame) -> dict:
    """One call: the checks of today (the allow-list, the write guard on the words that asked it, the registry,
    the signature, ask.writes)."""
    call, text, plan = r.doc, r.texts[0] if r.texts else req.fields["text"], r.meta
    op = req.router.by_tool[call["tool"]]
    try:
        req.router.check_allowed(op)
    except CommandError:
        audit.warning("ask refused", extra={"who": req.who, "text": text[:200], "call": json.dumps(call)})
        raise CommandError("forbidden", f"the question maps to {call['tool']}, which runs command {op.name!r}, and "
                                        f"{op.name!r} is not allowed on this gateway (commands.allow)",
                           call=call) from None
    # a write code derived from recorded facts (an undo: text None) is not checked against words; all else is
    why = (check_write(text, call["args"], gw.points or SHIPPED) if op.changes and text is not None else None) \
        or _known(devices, call)
    if why is not None:
        if op.changes:
            audit.warning("ask write not made: clarify", extra={"who": req.who, "text": str(text)[:200],
                                                                "call": json.dumps(call), "reason": why.why})
        return _clarify(req, call, why.code, why.why, plan)
    try:
        req.router.check_signed(op, req.signer)
    except CommandError as e:
        audit.warning("ask refused", extra={"who": req.who, "text": str(text)[:200], "call": json.dumps(call)})
        e.call = call
        raise
    _remember(frame, r)
    if op.changes:
        mode = gw.pending.cfg.writes if gw.pending is not None else "direct"
        if mode == "never":
            raise CommandError("forbidden", "ask.writes = never: the model may not write on this gateway; send the "
                                            "write operation itself", call=call)
        if mode == "confirm":
            assert gw.pending is not None
            _replace_pending(gw, req, frame)
            token, ttl = gw.pending.offer(call, req.who, req.signer, memory=key)
            frame.pending = token
            audit.info("ask write proposed", extra={"who": req.who, "text": str(text)[:200],
                                                    "call": json.dumps(call)})
            req.router.metrics.ask_outcomes.labels("confirm").inc()
            a = call["args"]
            return {"call": call, "outcome": "confirm", "confirm": {"token": token, "expires_in_s": ttl,
                                                                    "write": dict(a)},
                    "answer": f"to write {a['value']!r} to {a['device']} {a['point']}, confirm with token {token} "
                              f"within {ttl:g} s", **plan, "resolved": call}
        old = await _current(req, call["args"]["device"], call["args"]["point"], f"{req.who} via ask")
        done = await _run(req, op, call, f"{req.who} via ask")
        frame.writes = [{**call["args"], "old": old}]
    else:
        done = await _run(req, op, call, f"{req.who} via ask")
    req.router.metrics.ask_outcomes.labels("done").inc()
    return {"call": call, **done, **plan, "resolved": call}


async def _plan(gw: Gateway, req: Request, r: Any, devices: dict, key: tuple, frame: Frame) -> dict:
    """A plan: validated, dry-run whole, then one confirmation of the concrete writes (or the report at once)."""
    doc, plan_id = r.doc, plans.new_id()
    try:
        dr = await plans.dry_run(req, doc, r.texts, devices, gw.points or SHIPPED)
    except plans.PlanRefused as e:
        req.router.metrics.agent_events.labels("plan_refused").inc()
        plans.audit_plan("ask plan refused", plan_id, doc, req.who, reason=e.words()[:200])
        return _clarify(req, doc, e.reason, e.words(), r.meta)
    _remember(frame, r)
    base = {"call": doc, **r.meta, "resolved": doc, "plan_id": plan_id, "sha256": plans.plan_hash(doc)}
    if not dr.writes:
        req.router.metrics.agent_events.labels("plan_nothing_to_do" if dr.write_steps else "plan_done").inc()
        req.router.metrics.ask_outcomes.labels("done").inc()
        answer = plans.nothing_to_do(dr) if dr.write_steps else plans.report(dr)
        return {**base, "outcome": "done", "result": {"reads": [{"tool": t, "args": a, "result": res}
                                                                for t, a, res, _ in dr.reads], "writes": []},
                "answer": answer}
    mode = gw.pending.cfg.writes if gw.pending is not None else "direct"
    if mode == "never":
        raise CommandError("forbidden", "ask.writes = never: the model may not write on this gateway", call=doc)
    pending = {"plan": doc, "id": plan_id, "writes": [w.doc() for w in dr.writes]}
    if mode == "confirm":
        assert gw.pending is not None
        _replace_pending(gw, req, frame)
        token, ttl = gw.pending.offer(pending, req.who, req.signer, memory=key)
        frame.pending = token
        plans.audit_plan("ask plan proposed", plan_id, doc, req.who, writes=len(dr.writes))
        req.router.metrics.agent_events.labels("plan_proposed").inc()
        req.router.metrics.ask_outcomes.labels("confirm").inc()
        return {**base, "outcome": "confirm",
                "confirm": {"token": token, "expires_in_s": ttl, "writes": [w.doc() for w in dr.writes]},
                "answer": f"{plans.proposal(dr)}; confirm with token {token} within {ttl:g} s"}
    result = await plans.execute(req, pending, f"{req.who} via ask")
    return {**base, **_ran(req, gw, key, frame, pending, result, confirmed=False)}


def _ran(req: Request, gw: Gateway, key: tuple | None, frame: Frame | None, pending: dict, result: dict,
         confirmed: bool) -> dict:
    """After a plan's writes ran: the audit, the counts, the writes recorded in the requester's frame."""
    plans.audit_plan("ask plan run", pending["id"], pending["plan"], req.who, confirmed=confirmed,
                     ran=len(result["ran"]), partial=result["partial"])
    req.router.metrics.agent_events.labels("plan_partial" if result["partial"] else "plan_done").inc()
    req.router.metrics.ask_outcomes.labels("confirmed" if confirmed else "done").inc()
    _record(gw, key, frame, [{"device": w["device"], "point": w["point"], "value": w["value"], "old": w["old"]}
                             for w in result["ran"]])
    return {"outcome": "partial" if result["partial"] else "done", "result": result, "answer": result["answer"]}


def _record(gw: Gateway, key: tuple | None, frame: Frame | None, writes: list[dict]) -> None:
    """The writes that ran, with the values they replaced, in the requester's frame (for "set it back")."""
    if gw.memory is None or key is None:
        return
    if frame is None:
        frame = gw.memory.get(key)
        frame.pending = None
        if writes:
            frame.writes = writes
        gw.memory.put(key, frame)
    else:
        frame.pending = None
        if writes:
            frame.writes = writes


async def _rule(gw: Gateway, req: Request, r: Any, devices: dict, key: tuple, frame: Frame) -> dict:
    """A standing condition: the rules.add document it asks for, confirmed like a write, run as rules.add."""
    args = r.doc["args"]
    op = _op_named(req, "rules.add")
    try:
        doc = plans.check_rule(args, devices)
        if args.get("action_device") and len(r.texts) > 1 and r.texts[1] is not None:
            why = check_write(r.texts[1], {"device": args["action_device"], "point": args["action_point"],
                                           "value": json.loads(args["action_value"])}, gw.points or SHIPPED)
            if why is not None:
                raise plans.PlanRefused(why.code, f"the rule's action: {why.why}")
        req.router.check_allowed(op)
        req.router.check_signed(op, req.signer)
    except plans.PlanRefused as e:
        req.router.metrics.agent_events.labels("plan_refused").inc()
        return _clarify(req, r.doc, e.reason, e.words(), r.meta)
    except CommandError as e:
        e.call = r.doc
        raise
    base = {"call": r.doc, **r.meta, "resolved": r.doc, "rule": doc}
    mode = gw.pending.cfg.writes if gw.pending is not None else "direct"
    if mode == "never" and doc.get("action_device"):
        raise CommandError("forbidden", "ask.writes = never: the model may not propose a rule that writes",
                           call=r.doc)
    if mode != "direct":
        assert gw.pending is not None
        _replace_pending(gw, req, frame)
        token, ttl = gw.pending.offer({"tool": "add_rule", "rule": doc}, req.who, req.signer, memory=key)
        frame.pending = token
        audit.info("ask rule proposed", extra={"who": req.who, "rule": doc["id"], "sha256": plans.plan_hash(doc)})
        req.router.metrics.agent_events.labels("rule_proposed").inc()
        req.router.metrics.ask_outcomes.labels("confirm").inc()
        return {**base, "outcome": "confirm", "confirm": {"token": token, "expires_in_s": ttl, "rule": doc},
                "answer": f"to add {plans.rule_words(doc)}, confirm with token {token} within {ttl:g} s"}
    done = await _run(req, op, {"tool": "add_rule", "args": {"rule": doc}}, f"{req.who} via ask")
    req.router.metrics.ask_outcomes.labels("done").inc()
    return {**base, **done, "answer": f"added {plans.rule_words(doc)}"}


def _replace_pending(gw: Gateway, req: Request, frame: Frame) -> None:
    """A new proposal replaces this requester's pending one in its conversation: "yes" answers only the latest."""
    if frame.pending is not None and gw.pending.live(frame.pending, req.who, req.signer):
        gw.pending.take(frame.pending, req.who, req.signer)
        audit.info("ask proposal replaced", extra={"who": req.who})
    frame.pending = None


def _op_named(req: Request, name: str) -> Operation:
    return req.router.table[name]


async def _answer(gw: Gateway, req: Request, frame: Frame, yes: bool) -> dict:
    """"yes"/"no": the answer to this requester's pending confirmation (none pending: clarify nothing)."""
    resolved = {"confirm": yes}
    token = frame.pending
    if token is None or gw.pending is None:
        return _clarify(req, resolved, "nothing", "nothing is waiting for your confirmation", {})
    req.router.metrics.agent_events.labels("answered").inc()
    if not yes:
        gw.pending.take(token, req.who, req.signer)  # used: it can no longer be confirmed
        frame.pending = None
        audit.info("ask proposal declined", extra={"who": req.who})
        req.router.metrics.ask_outcomes.labels("declined").inc()
        return {"call": resolved, "resolved": resolved, "outcome": "declined", "answer": "cancelled; nothing was run"}
    out = await _confirmed(gw, req, token, frame)
    return {**out, "resolved": resolved}


async def _current(req: Request, device: str, point: str, who: str) -> Any:
    return await plans._current(req, device, point, who)


async def _run(req: Request, op: Operation, call: dict, who: str) -> dict:
    fields = dict(call["args"])
    try:
        result = await req.router.run(op, req.router.check_fields(op, fields), who, req.signer)
    except CommandError as e:
        e.call = call
        raise
    return {"outcome": "done", "result": result, "answer": op.answer(fields, result) if op.answer else ""}


async def _confirmed(gw: Gateway, req: Request, token: str, frame: Frame | None = None) -> dict:
    """Run what a confirmation token stands for: one write, a plan's writes (conditions checked again), a rule."""
    key = gw.pending.memory_of(token)
    call = gw.pending.take(token, req.who, req.signer)
    who = f"{req.who} via ask, confirmed"
    if "plan" in call:
        result = await plans.execute(req, call, who)
        return {"call": call["plan"], **_ran(req, gw, key, frame, call, result, confirmed=True)}
    if call["tool"] == "add_rule":
        op = _op_named(req, "rules.add")
        req.router.check_allowed(op)
        req.router.check_signed(op, req.signer)
        done = await _run(req, op, {"tool": "add_rule", "args": {"rule": call["rule"]}}, who)
        req.router.metrics.ask_outcomes.labels("confirmed").inc()
        _record(gw, key, frame, [])
        return {"call": {"tool": "add_rule", "args": call["rule"]}, **done,
                "answer": f"added {plans.rule_words(call['rule'])}"}
    op = req.router.by_tool[call["tool"]]
    req.router.check_allowed(op)
    req.router.check_signed(op, req.signer)
    old = await _current(req, call["args"]["device"], call["args"]["point"], who) if op.changes else None
    done = await _run(req, op, call, who)
    req.router.metrics.ask_outcomes.labels("confirmed").inc()
    if op.changes:
        _record(gw, key, frame, [{**call["args"], "old": old}])
    return {"call": call, **done}


async def _confirm(gw: Gateway, req: Request) -> dict:
    if gw.pending is None:
        raise CommandError("unavailable", "this gateway takes no confirmations")
    return await _confirmed(gw, req, req.fields["token"])


OPERATIONS = (
    Operation("ask", "a question in words -> the GLM's tool call, a plan of checked steps, a rule proposal, or a "
              "follow-up of the same conversation -> the operations it needs -> a one-line answer",
              {"text": Field((str,)), "conversation": Field((str,), False)}, changes=False, run=_ask,
              examples=("which alarms are active?",)),
    Operation("confirm", "run what ask proposed (a write, a plan's writes, a rule), with its one-time token "
              "(ask.writes = confirm)", {"token": Field((str,))}, changes=True, run=_confirm),
)
