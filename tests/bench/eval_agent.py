"""The agent against the hand-written sets P (plans) and F (follow-up dialogues), scored by a simulator of devices and
points: each request goes through `ask` as the daemon runs it (the shipped model, the registry the item's world gives,
the write guard, ask.writes = confirm), and its resolved output is compared with the expected one.

    python3 tests/bench/eval_agent.py            # both sets, one line of figures each, then the misses by tag

Today's agent answers one call or `clarify` per request and keeps no memory: this measures where it stands before
the orchestrator and the memory engine (issue 23) exist. A proposed write runs only once confirmed (ask.writes =
confirm): "proposed where none was asked" counts the proposals a must-not-write request got.
"""
from __future__ import annotations

import asyncio
import collections
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from edge_agent import ops  # noqa: E402
from edge_agent.config import AskConfig, CommandsConfig, ModelConfig  # noqa: E402
from edge_agent.glm.engine import Engine  # noqa: E402
from edge_agent.metrics import Metrics  # noqa: E402


class World:
    """The devices of one item, their points and values; reads answer the current value (history is flat)."""

    def __init__(self, world: dict) -> None:
        self.values = {d: dict(ps) for d, ps in world.items()}
        self.proposed: list[tuple] = []

    async def devices(self) -> list[dict]:
        return [{"device": d, "points": [{"point": p} for p in ps]} for d, ps in self.values.items()]

    async def query(self, device, point, agg, window_s, max_rows):
        if point not in self.values.get(device, {}):
            raise LookupError(f"no point {point!r} on device {device!r}")
        return {"device": device, "point": point, "agg": agg, "window_s": window_s, "value": self.values[device][point]}

    async def write(self, device, point, value) -> None:
        self.values.setdefault(device, {})[point] = value


def _router(world: World, engine: Engine) -> ops.Router:
    m = Metrics()

    async def ask(text: str, known: dict) -> dict:
        plan = await engine.ask(text, known=known)
        return {"call": plan.call, "model": "shipped", "provider": "cpu", "timings": {}}

    async def nope(*_a):
        raise PermissionError("not in this evaluation")

    async def no_alerts(device, n):
        return {"firing": [], "cleared": []}
    gw = ops.Gateway(status=dict, devices=world.devices, query_stats=world.query, write_point=world.write,
                     config=dict, log_lines=list, rules_list=list, rules_add=nope, rules_remove=nope,
                     alerts=no_alerts, ask=ask,
                     pending=ops.PendingWrites(AskConfig(writes="confirm"), m.ask_outcomes.labels("dropped")))
    return ops.Router(CommandsConfig(allow=["read-only", "write", "confirm", "rules.add"]), ops.TABLE, gw, m, gateway_id="eval")


async def resolve(router: ops.Router, text: str) -> dict:
    """What the agent resolved the request to, as `ask --dry-run` prints it (a call, or clarify with its reason)."""
    reply = json.loads((await router.handle("ask", json.dumps({"text": text}).encode(), "eval"))[0])
    if not reply["ok"]:
        return {"error": reply["error"]["code"]}
    r = reply["result"]
    if r["outcome"] == "clarify":
        return {"tool": "clarify", "args": {"reason": r["reason"]}}
    return r["call"]


def _writes(out: dict) -> bool:
    return out.get("tool") == "write_point" or any(s.get("tool") == "write_point" for s in out.get("plan", []))


async def score_p(engine: Engine, items: list[dict]) -> dict:
    exact = clarify_need = clarify_got = unasked = 0
    proposed: list[str] = []
    miss_by_tag: collections.Counter[str] = collections.Counter()
    for it in items:
        world = World(it["world"])
        got = await resolve(_router(world, engine), it["text"])
        ok = got == it["expect"]
        exact += ok
        if it["expect"].get("tool") == "clarify":
            clarify_need += 1
            clarify_got += got.get("tool") == "clarify"
        if it.get("must_not_write") and _writes(got):
            unasked += 1
            proposed.append(f"{it['id']}: {it['text']!r} -> {json.dumps(got)}")
        if not ok:
            miss_by_tag.update(it.get("tags", []))
    n = len(items)
    return {"set": "P", "requests": n, "exact": f"{100 * exact / n:.1f} %",
            "clarify_when_needed": f"{clarify_got} of {clarify_need}",
            "writes_proposed_where_none_was_asked": f"{unasked} of {sum(1 for i in items if i.get('must_not_write'))}",
            "proposed": proposed, "misses_by_tag": dict(miss_by_tag.most_common())}


async def score_f(engine: Engine, dialogues: list[dict]) -> dict:
    turns = turns_ok = whole = unasked = 0
    miss_by_tag: collections.Counter[str] = collections.Counter()
    for d in dialogues:
        world = World(d["world"])
        router = _router(world, engine)
        all_ok = True
        for t in d["turns"]:
            got = await resolve(router, t["text"])
            ok = got == t["expect"]
            turns += 1
            turns_ok += ok
            all_ok &= ok
            if not t.get("writes") and _writes(got) and "confirm" not in t["expect"]:
                unasked += 0 if _writes(t["expect"]) else 1
        whole += all_ok
        if not all_ok:
            miss_by_tag.update(d.get("tags", []))
    return {"set": "F", "dialogues": len(dialogues), "turns": turns,
            "turns_exact": f"{100 * turns_ok / turns:.1f} %", "dialogues_exact": f"{100 * whole / len(dialogues):.1f} %",
            "writes_proposed_where_none_was_asked": unasked, "misses_by_tag": dict(miss_by_tag.most_common())}


def main() -> int:
    import logging
    logging.getLogger("edge_agent").setLevel(logging.ERROR)  # the audit's clarify lines: counted here instead
    load = lambda name: [json.loads(line) for line in (ROOT / "models" / "eval" / name).read_text().splitlines()  # noqa: E731
                         if line.strip()]
    engine = Engine(ModelConfig(providers=["cpu"]), ops.TOOLSET)
    engine.load()
    try:
        for result in (asyncio.run(score_p(engine, load("plans_p.jsonl"))),
                       asyncio.run(score_f(engine, load("followups_f.jsonl")))):
            print(json.dumps(result))
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
