"""The task orchestrator: a plan document, its strict validation, the dry-run of the whole plan, one confirmation,
the execution in order, and the rule proposals; the replies are written here, by code, never by the model.

A plan (docs/agent-conventions.md) is `{"plan": [step, ...]}`, 2 to `MAX_STEPS` steps; a step is a call of a tool
the GLM may call (`query_stats`, `list_devices`, `write_point`, `status`, `list_alerts`) and optionally
`"when": {"step": K, "op": OP, "value": N}` — K the 1-based index of an earlier `query_stats` step that has no
condition itself. A `write_point` step may fan out: `"device": {"each": K}` over the devices an earlier
`list_devices` step found (at most `MAX_FANOUT`). References point only backwards, so a plan is acyclic by
construction. Anything else is refused with a reason (`PlanRefused`), counted, and nothing runs.

The dry-run runs before anything changes: each step's device and point against the registry, every write through
the write guard (the words that asked for that step) and the allow-list and signature checks, the reads run
(reads change nothing), the conditions evaluated — giving the concrete write set, each write with the value it
replaces and its evidence. A step that fails stops the dry-run: nothing runs, the reply names the step.

At confirmation the conditions are read and checked again (a condition no longer true: that write is not run, the
reply says so), the writes run in order as the `write` operation (the router's checks, the adapters' allow-list),
the first failure stops the rest (reported as partial), and the values replaced are recorded for "set it back".
Every plan is audited (logger `edge_agent.audit`): its id, the sha256 of its canonical JSON, who, and whether it was
confirmed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

import difflib

from edge_agent.glm.schema import InvalidCall, Toolset
from edge_agent.ops.base import CommandError, Request
from edge_agent.ops.guard import Refusal, check_write

audit = logging.getLogger("edge_agent.audit")

MAX_STEPS = 4
MAX_FANOUT = 8
PLAN_TOOLS = ("query_stats", "list_devices", "write_point", "status", "list_alerts")
OPS = {">": lambda a, b: a > b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b, "<=": lambda a, b: a <= b,
       "==": lambda a, b: a == b, "!=": lambda a, b: a != b}
RULE_KINDS = ("above", "below", "nodata")
_CLEAN = re.compile(r"[^\x00-\x1f\x7f\"\\<>|`]{1,48}")  # a name: printable, bounded, no markup or quotes


class PlanRefused(Exception):
    """A plan that is not run: `reason` a clarify reason, `why` in words, `step` the 1-based step (0: the plan)."""

    def __init__(self, reason: str, why: str, step: int = 0) -> None:
        super().__init__(why)
        self.reason, self.why, self.step = reason, why, step

    def words(self) -> str:
        return f"step {self.step}: {self.why}" if self.step else self.why


def canonical(doc: Any) -> str:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def plan_hash(doc: Any) -> str:
    return hashlib.sha256(canonical(doc).encode()).hexdigest()


def _name_ok(v: Any) -> bool:
    return isinstance(v, str) and _CLEAN.fullmatch(v) is not None


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


_TOOLSETS: dict[tuple, Toolset] = {}


def toolset(by_tool: dict) -> Toolset:
    """The tools of a router's table (one Toolset per table, built once)."""
    key = tuple(sorted(by_tool))
    if key not in _TOOLSETS:
        _TOOLSETS[key] = Toolset(op.tool for op in by_tool.values())
    return _TOOLSETS[key]


def validate(doc: Any, tools: Toolset) -> list[dict]:
    """The plan's steps, checked; raises PlanRefused (nothing about the plan is trusted: it may come from the model,
    from a client, from anywhere)."""
    TOOLSET = tools
    if not isinstance(doc, dict) or set(doc) != {"plan"} or not isinstance(doc["plan"], list):
        raise PlanRefused("nothing", 'a plan is {"plan": [step, ...]}')
    steps = doc["plan"]
    if len(steps) > MAX_STEPS:
        raise PlanRefused("too_complex", f"{len(steps)} steps; a plan has at most {MAX_STEPS}")
    if len(steps) < 2:
        raise PlanRefused("nothing", "a plan has at least 2 steps (one step is a call)")
    for i, s in enumerate(steps, 1):
        if not isinstance(s, dict) or not {"tool", "args"} <= set(s) or not set(s) <= {"tool", "args", "when"}:
            raise PlanRefused("nothing", 'a step is {"tool": T, "args": {...}} and optionally "when"', i)
        tool, args = s["tool"], s["args"]
        if tool not in PLAN_TOOLS:
            raise PlanRefused("nothing", f"{str(tool)[:48]!r} is not a tool a plan may use "
                                         f"({', '.join(PLAN_TOOLS)})", i)
        if not isinstance(args, dict):
            raise PlanRefused("nothing", "args must be an object", i)
        check = dict(args)
        each = args.get("device") if isinstance(args.get("device"), dict) else None
        if each is not None:
            k = each.get("each")
            if tool != "write_point" or set(each) != {"each"} or not _index(k, i):
                raise PlanRefused("nothing", 'a fan-out is "device": {"each": K} in a write_point step, K an earlier '
                                             "step", i)
            if steps[k - 1].get("tool") != "list_devices":
                raise PlanRefused("nothing", f"a fan-out goes over the devices of a list_devices step; step {k} is "
                                             f"{str(steps[k - 1].get('tool'))[:48]}", i)
            check["device"] = "each"
        try:
            TOOLSET.validate({"tool": tool, "args": check})
        except InvalidCall as e:
            raise PlanRefused("nothing", str(e), i) from None
        for key in ("device", "point", "filter"):
            v = check.get(key)
            if v is not None and not _name_ok(v):
                raise PlanRefused("nothing", f"{key} is not a name", i)
        if isinstance(check.get("value"), str) and not _name_ok(check["value"]):
            raise PlanRefused("nothing", "the value is not a plain word", i)
        if "when" in s:
            w = s["when"]
            if not isinstance(w, dict) or set(w) != {"step", "op", "value"}:
                raise PlanRefused("nothing", 'a condition is {"step": K, "op": OP, "value": N}', i)
            k = w["step"]
            if not _index(k, i):
                raise PlanRefused("nothing", "a condition refers to an earlier step (references point only "
                                             "backwards)", i)
            if steps[k - 1].get("tool") != "query_stats":
                raise PlanRefused("nothing", f"a condition is on a query_stats step; step {k} is not one", i)
            if "when" in steps[k - 1]:
                raise PlanRefused("too_complex", "a condition on a conditional step", i)
            if w["op"] not in OPS:
                raise PlanRefused("nothing", f"a condition's op is one of {' '.join(OPS)}", i)
            v = w["value"]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or abs(v) > 1e9:
                raise PlanRefused("nothing", "a condition compares with a finite number", i)
    return steps


def _index(k: Any, i: int) -> bool:
    """k is a 1-based step index before step i."""
    return isinstance(k, int) and not isinstance(k, bool) and 1 <= k < i


@dataclass
class Write:
    step: int
    device: str
    point: str
    value: Any
    old: Any = None
    when: dict | None = None       # the condition, with the device and point it reads
    evidence: str = ""

    def line(self) -> str:
        old = "?" if self.old is None else _show(self.old)
        return f"{self.device}.{self.point} {old} → {_show(self.value)}" + (f" ({self.evidence})" if self.evidence
                                                                           else "")

    def doc(self) -> dict:
        return {"step": self.step, "device": self.device, "point": self.point, "value": self.value, "old": self.old,
                "when": self.when, "evidence": self.evidence}


@dataclass
class DryRun:
    plan: dict
    reads: list[tuple[str, dict, Any, str]] = field(default_factory=list)   # (tool, args, result, answer)
    writes: list[Write] = field(default_factory=list)                  # the concrete write set
    skipped: list[str] = field(default_factory=list)                   # conditions that do not hold: the evidence
    write_steps: int = 0


def _show(v: Any) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, float):
        return f"{round(v, 3):g}"
    return str(v)


def _op(req: Request, tool: str):
    return req.router.by_tool[tool]


async def _read(req: Request, args: dict, who: str) -> dict:
    op = _op(req, "query_stats")
    req.router.check_allowed(op)
    return await req.router.run(op, req.router.check_fields(op, dict(args)), who, req.signer)


async def _current(req: Request, device: str, point: str, who: str) -> Any:
    """The point's last value (the value a write replaces), or None where there is none."""
    try:
        r = await _read(req, {"device": device, "point": point, "agg": "last", "window_s": 86400}, who)
    except CommandError:
        return None
    return r.get("value") if isinstance(r, dict) else None


def _holds(cond: dict, value: Any) -> bool:
    if isinstance(value, bool):
        value = float(value)
    return isinstance(value, (int, float)) and OPS[cond["op"]](value, cond["value"])


def _evidence(args: dict, cond: dict, value: Any) -> str:
    return f"{args['device']} {args['point']} {'no reading' if value is None else _show(value)} {cond['op']} " \
           f"{_show(cond['value'])}"


async def dry_run(req: Request, doc: dict, texts: list[str | None], registry: dict[str, list[str]],
                  points) -> DryRun:
    """The whole plan, before anything changes; raises PlanRefused naming the first step that fails.
    texts[i]: the operator's words that asked for step i+1 (the guard reads them; None: a step code derived from
    recorded facts, such as an undo)."""
    steps = validate(doc, toolset(req.router.by_tool))
    out = DryRun(doc)
    results: dict[int, Any] = {}
    who = f"{req.who} via ask (dry-run)"
    for i, s in enumerate(steps, 1):
        tool, args = s["tool"], s["args"]
        op = _op(req, tool)
        try:
            req.router.check_allowed(op)
        except CommandError as e:
            raise PlanRefused("nothing", e.message, i) from None
        cond = s.get("when")
        if tool != "write_point":
            why = _known(registry, {"tool": tool, "args": args})
            if why is not None:
                raise PlanRefused(why.code, why.why, i)
            try:
                results[i] = await req.router.run(op, req.router.check_fields(op, dict(args)), who, req.signer)
            except CommandError as e:
                raise PlanRefused("nothing", f"{tool} failed: {e.message}", i) from None
            out.reads.append((tool, args, results[i], _answer(op, args, results[i])))
            continue
        out.write_steps += 1
        try:
            req.router.check_signed(op, req.signer)
        except CommandError as e:
            raise PlanRefused("nothing", e.message, i) from None
        if isinstance(args["device"], dict):
            found = [d["device"] for d in results[args["device"]["each"]]]
            if len(found) > MAX_FANOUT:
                raise PlanRefused("too_complex", f"{len(found)} devices; a write fans out over at most {MAX_FANOUT}", i)
            devices = found
        else:
            devices = [args["device"]]
        for device in devices:
            call = {"device": device, "point": args["point"], "value": args["value"]}
            text = texts[i - 1] if i - 1 < len(texts) else None
            why: Refusal | None = None
            if text is not None:
                why = check_write(text.replace("{each}", device), call, points)
            why = why or _known(registry, {"tool": "write_point", "args": call})
            if why is not None:
                raise PlanRefused(why.code, why.why, i)
            w = Write(i, device, args["point"], args["value"], old=await _current(req, device, args["point"], who))
            if cond is not None:
                src = steps[cond["step"] - 1]["args"]
                value = results[cond["step"]].get("value") if isinstance(results[cond["step"]], dict) else None
                w.when = {**cond, "device": src["device"], "point": src["point"], "args": dict(src)}
                w.evidence = _evidence(src, cond, value)
                if value is None:
                    raise PlanRefused("nothing", f"the condition cannot be checked: no {src['point']} reading from "
                                                 f"{src['device']}", i)
                if not _holds(cond, value):
                    out.skipped.append(f"step {i}: {w.evidence} does not hold")
                    continue
            out.writes.append(w)
    return out


def report(dr: DryRun) -> str:
    """The reply, by code: a comparison of two reads of one point, else each read's answer; then the writes."""
    parts: list[str] = []
    q = [(t, a, r) for t, a, r, _ in dr.reads if t == "query_stats" and isinstance(r, dict)]
    if len(q) == 2 and q[0][1]["point"] == q[1][1]["point"] and q[0][1]["device"] != q[1][1]["device"]:
        (_, a, ra), (_, b, rb) = q
        va, vb = ra.get("value"), rb.get("value")
        if isinstance(va, (int, float)) and isinstance(vb, (int, float)):
            rel = "the same as" if va == vb else ("higher than" if va > vb else "lower than")
            diff = "" if va == vb else f" by {_show(abs(float(va) - float(vb)))}"
            parts.append(f"{a['point']} ({a['agg']}): {a['device']} {_show(va)} is {rel} {b['device']} {_show(vb)}"
                         f"{diff}")
            q = []
    for t, a, r, words in dr.reads:
        if q or t != "query_stats":
            parts.append(words)
    return "; ".join(p for p in parts if p)


def _answer(op, args: dict, result: Any) -> str:
    if op.answer is None:
        return f"{op.name}: {canonical(result)[:300]}"
    return op.answer(args, result)


def nothing_to_do(dr: DryRun) -> str:
    head = report(dr)
    why = "; ".join(dr.skipped) if dr.skipped else "no device to write"
    return (f"{head}; " if head else "") + f"nothing to do ({why})"


def proposal(dr: DryRun) -> str:
    head = report(dr)
    return (f"{head}; " if head else "") + "to write " + "; ".join(w.line() for w in dr.writes)


async def execute(req: Request, pending: dict, who: str) -> dict:
    """The confirmed plan: conditions read again, writes in order through the write operation, the first failure
    stops the rest. Returns {ran: [...], not_run: [...], failed: {...}|None, partial, answer}."""
    op = _op(req, "write_point")
    req.router.check_allowed(op)
    req.router.check_signed(op, req.signer)
    ran: list[dict] = []
    not_run: list[str] = []
    failed = None
    for w in pending["writes"]:
        cond = w.get("when")
        if cond is not None:
            try:
                r = await _read(req, cond["args"], who)
                value = r.get("value") if isinstance(r, dict) else None
            except CommandError:
                value = None
            if not _holds(cond, value):
                req.router.metrics.agent_events.labels("recheck_failed").inc()
                not_run.append(f"{w['device']}.{w['point']}: {_evidence(cond['args'], cond, value)} no longer holds")
                continue
        old = await _current(req, w["device"], w["point"], who)
        fields = {"device": w["device"], "point": w["point"], "value": w["value"]}
        try:
            await req.router.run(op, req.router.check_fields(op, dict(fields)), who, req.signer)
        except CommandError as e:
            failed = {**fields, "code": e.code, "message": e.message}
            break
        ran.append({**fields, "old": old if old is not None else w.get("old")})
    done = "; ".join(f"{r['device']}.{r['point']} {'?' if r['old'] is None else _show(r['old'])} → "
                     f"{_show(r['value'])}" for r in ran)
    words = [f"wrote {done}" if ran else "wrote nothing"]
    if not_run:
        words.append("not run: " + "; ".join(not_run))
    if failed is not None:
        rest = len(pending["writes"]) - len(ran) - len(not_run) - 1
        words.append(f"stopped: {failed['device']}.{failed['point']} failed ({failed['message']})"
                     + (f"; {rest} later write{'s' if rest != 1 else ''} not run" if rest > 0 else ""))
    return {"ran": ran, "not_run": not_run, "failed": failed, "partial": failed is not None,
            "answer": "; ".join(words)}


def new_id() -> str:
    return "plan-" + secrets.token_hex(6)


def audit_plan(event: str, plan_id: str, doc: dict, who: str, **extra: Any) -> None:
    audit.info(event, extra={"plan": plan_id, "sha256": plan_hash(doc), "who": who, **extra})


# ---- rule proposals ----

def rule_id(args: dict) -> str:
    raw = f"ask-{args['device']}-{args['point']}-{args['kind']}"
    return re.sub(r"[^A-Za-z0-9_.-]", "_", raw)[:64]


def check_rule(args: Any, registry: dict[str, list[str]]) -> dict:
    """The rules.add document of an add_rule proposal (code names the rule); raises PlanRefused."""
    from edge_agent.config import ConfigError, rule_from_dict

    if not isinstance(args, dict):
        raise PlanRefused("nothing", "a rule proposal's args are an object")
    allowed = {"kind", "device", "point", "threshold", "seconds", "action_device", "action_point", "action_value"}
    if not set(args) <= allowed or args.get("kind") not in RULE_KINDS:
        raise PlanRefused("too_complex", f"a rule watches one point: kind {', '.join(RULE_KINDS)}")
    for k in ("device", "point", "action_device", "action_point"):
        if k in args and not _name_ok(args[k]):
            raise PlanRefused("nothing", f"{k} is not a name")
    if "action_value" in args and (not isinstance(args["action_value"], str) or len(args["action_value"]) > 48):
        raise PlanRefused("nothing", "action_value is JSON text")
    why = _known(registry, {"tool": "query_stats", "args": {"device": args.get("device"), "point": args.get("point")}})
    if why is None and args.get("action_device"):
        why = _known(registry, {"tool": "write_point", "args": {"device": args["action_device"],
                                                                "point": args.get("action_point")}})
    if why is not None:
        raise PlanRefused(why.code, why.why)
    doc = {"id": rule_id(args), **args}
    try:
        rule_from_dict(doc)
    except (ConfigError, ValueError) as e:
        raise PlanRefused("nothing", f"not a rule: {e}") from None
    return doc


def rule_words(doc: dict) -> str:
    what = f"{doc['device']} {doc['point']}"
    if doc["kind"] == "nodata":
        cond = f"when {what} sends nothing for {_show(doc.get('seconds', 60.0))} s"
    else:
        cond = f"whenever {what} is {doc['kind']} {_show(doc.get('threshold', 0.0))}"
    act = (f", write {doc['action_value']} to {doc['action_device']}.{doc['action_point']}"
           if doc.get("action_device") else ", alert")
    return f"rule {doc['id']}: {cond}{act}"
