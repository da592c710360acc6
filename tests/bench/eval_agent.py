"""The agent against the hand-written sets P (plans) and F (follow-up dialogues), scored by a simulator of devices and
points: each request goes through `ask` as the daemon runs it (the shipped model, the composer and the orchestrator,
the registry the item's world gives, the write guard, ask.writes = confirm, the conversation memory on a simulated
clock), and its resolved output, the reads it made and the world's state after it are compared with the expected.

    python3 tests/bench/eval_agent.py                       # both sets, one line of figures each
    python3 tests/bench/eval_agent.py --p my_p.jsonl --f my_f.jsonl   # other files in the same formats

P: a proposal is confirmed (as the operator would) and the state after it compared; exact = the resolved output,
the expected reads and the state all as expected. A call or plan that names a device or point the world lacks is
refused by the registry check (nothing runs, the reply is clarify naming the step): it matches a set that expects that
clarify, or one that expects the plan as resolved (what `ask --dry-run`, which has no registry, prints). F: each turn in order, `who` the requester, `after_s` moving the
clock; a proposal changes nothing, the confirming "yes" carries the writes. Writes run without a confirmation
naming them are counted (they must be 0).
"""
from __future__ import annotations

import asyncio
import collections
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from edge_agent import ops  # noqa: E402
from edge_agent.config import ModelConfig  # noqa: E402
from edge_agent.glm.engine import Engine  # noqa: E402
from edge_agent.devkit.bench_agent import router  # noqa: E402


LATENCY: list[float] = []  # seconds per ask, every request of a run


def _p(q: float) -> float:
    xs = sorted(LATENCY)
    return round(1e3 * xs[min(len(xs) - 1, int(q * len(xs)))], 1) if xs else 0.0


class World:
    """The devices of one item, their points and values; reads answer the current value (history is flat). Every
    read and write is recorded."""

    def __init__(self, world: dict) -> None:
        self.values = {d: dict(ps) for d, ps in world.items()}
        self.reads: list[tuple] = []
        self.writes: list[tuple] = []
        self.rules: list[dict] = []

    async def devices(self) -> list[dict]:
        return [{"device": d, "points": [{"point": p} for p in ps]} for d, ps in self.values.items()]

    async def query(self, device, point, agg, window_s, max_rows):
        if point not in self.values.get(device, {}):
            raise LookupError(f"no point {point!r} on device {device!r}")
        self.reads.append((device, point, agg, window_s))
        return {"device": device, "point": point, "agg": agg, "window_s": window_s, "value": self.values[device][point]}

    async def write(self, device, point, value) -> None:
        self.writes.append((device, point, value))
        self.values.setdefault(device, {})[point] = value

    async def rules_add(self, doc: dict) -> dict:
        self.rules.append(doc)
        return doc


class Clock:
    """The simulated clock of a dialogue (after_s moves it): confirmations and memories expire on it."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _router(world: World, engine: Engine, clock: Clock | None = None) -> ops.Router:
    return router(engine, world, clock=clock)


async def turn(router: ops.Router, text: str, who: str = "eval") -> tuple[dict, dict]:
    """What the agent resolved the request to, as `ask --dry-run` prints it (a call, a plan, a rule proposal, a
    yes/no, or clarify with its reason), and its whole reply."""
    t0 = time.perf_counter()
    reply = json.loads((await router.handle("ask", json.dumps({"text": text}).encode(), who))[0])
    LATENCY.append(time.perf_counter() - t0)
    if not reply["ok"]:
        return {"error": reply["error"]["code"]}, reply
    r = reply["result"]
    if r["outcome"] == "clarify":
        return {"tool": "clarify", "args": {"reason": r["reason"]}}, reply
    return r.get("resolved", r["call"]), reply


async def resolve(router: ops.Router, text: str) -> dict:
    return (await turn(router, text))[0]


def _refused_as_expected(reply: dict, expect: dict, world: dict) -> bool:
    """The agent resolved exactly the expected call or plan, which names a device or point the world does not have,
    and the registry check refused it (nothing ran): `ask --dry-run` prints that resolved plan, `ask` answers clarify
    naming the step. A set may expect either; both describe the same behaviour."""
    r = reply.get("result") or {}
    if r.get("outcome") != "clarify" or r.get("call") != expect:
        return False
    for s in expect.get("plan", [expect]):
        a = s.get("args", {})
        d, p = a.get("device"), a.get("point")
        if isinstance(d, str) and (d not in world or isinstance(p, str) and p not in world[d]):
            return True
    return False


def _writes(out: dict) -> bool:
    steps = out.get("plan", [out]) if isinstance(out, dict) else []
    return any(s.get("tool") == "write_point" for s in steps) or bool(out.get("args", {}).get("action_device"))


def _apply(state: dict, writes: dict | None) -> dict:
    out = {d: dict(ps) for d, ps in state.items()}
    for d, ps in (writes or {}).items():
        out.setdefault(d, {}).update(ps)
    return out


def _expected_reads(expect: dict) -> set:
    steps = expect.get("plan", [expect]) if isinstance(expect, dict) else []
    return {(s["args"]["device"], s["args"]["point"], s["args"]["agg"], s["args"]["window_s"])
            for s in steps if s.get("tool") == "query_stats" and isinstance(s.get("args", {}).get("device"), str)}


async def score_p(engine: Engine, items: list[dict]) -> dict:
    """Each request on its own world: the resolved output against the expected; a proposal is then confirmed (as
    the operator would) and the world's state compared with the expected one. Exact: both."""
    exact = same_plan = same_state = reads_ok = clarify_need = clarify_got = unasked = unconfirmed = wrong = 0
    proposed: list[str] = []
    miss_by_tag: collections.Counter[str] = collections.Counter()
    misses: list[str] = []
    for it in items:
        world = World(it["world"])
        router = _router(world, engine)
        got, reply = await turn(router, it["text"])
        unconfirmed += bool(world.writes)  # anything written before a confirmation naming it
        r = reply.get("result") or {}
        if r.get("outcome") == "confirm":
            await router.handle("confirm", json.dumps({"token": r["confirm"]["token"]}).encode(), "eval")
        want_state = _apply(it["world"], it.get("writes"))
        refused = got != it["expect"] and _refused_as_expected(reply, it["expect"], it["world"])
        plan_ok = got == it["expect"] or refused
        state_ok = world.values == want_state
        read_ok = refused or _expected_reads(it["expect"]) <= set(world.reads)  # refused: the dry-run stopped
        same_plan += plan_ok
        same_state += state_ok
        reads_ok += read_ok
        ok = plan_ok and state_ok and read_ok
        exact += ok
        if it["expect"].get("tool") == "clarify":
            clarify_need += 1
            clarify_got += got.get("tool") == "clarify"
        if it.get("must_not_write") and _writes(got) and not _writes(it["expect"]):
            # a write proposed that the expected output does not propose (a set may mark a rule proposal with an
            # action must_not_write, since a rule changes no point now: that rule, proposed as expected, is asked)
            unasked += 1
            proposed.append(f"{it['id']}: {it['text']!r} -> {json.dumps(got)}")
        if not it.get("must_not_write") and not state_ok and world.writes:
            wrong += 1
        if not ok:
            miss_by_tag.update(it.get("tags", []))
            misses.append(f"{it['id']}: {it['text']!r} -> {json.dumps(got)}")
    n = len(items)
    lat = {"ask_ms_p50": _p(0.5), "ask_ms_p95": _p(0.95)}
    LATENCY.clear()
    return {"set": "P", "requests": n, "exact": f"{100 * exact / n:.1f} %", **lat,
            "resolved_as_expected": f"{100 * same_plan / n:.1f} %", "state_as_expected": f"{100 * same_state / n:.1f} %",
            "expected_reads_made": f"{100 * reads_ok / n:.1f} %",
            "clarify_when_needed": f"{clarify_got} of {clarify_need}",
            "writes_proposed_where_none_was_asked": f"{unasked} of {sum(1 for i in items if i.get('must_not_write'))}",
            "writes_run_without_confirmation": unconfirmed, "wrong_writes_once_confirmed": wrong,
            "proposed": proposed, "misses_by_tag": dict(miss_by_tag.most_common()), "misses": misses}


async def score_f(engine: Engine, dialogues: list[dict]) -> dict:
    """Each dialogue on its own world, memory and clock: every turn's resolved output and the world's state after
    it against the expected ones (a proposal changes nothing; the confirming yes carries the writes)."""
    turns = turns_ok = whole = unasked = unconfirmed = 0
    miss_by_tag: collections.Counter[str] = collections.Counter()
    misses: list[str] = []
    for d in dialogues:
        world, clock = World(d["world"]), Clock()
        router = _router(world, engine, clock)
        state = d["world"]
        all_ok = True
        for t in d["turns"]:
            clock.t += float(t.get("after_s", 0))
            before = len(world.writes)
            got, reply = await turn(router, t["text"], who=t.get("who", "eval"))
            state = _apply(state, t.get("writes"))
            refused = got != t["expect"] and _refused_as_expected(reply, t["expect"], d["world"])
            ok = (got == t["expect"] or refused) and world.values == state \
                and (refused or _expected_reads(t["expect"]) <= set(world.reads))
            turns += 1
            turns_ok += ok
            all_ok &= ok
            if len(world.writes) > before and not t.get("writes"):
                unasked += 1
            if len(world.writes) > before and "confirm" not in got:
                unconfirmed += 1  # written by a turn that was not a confirmation
            if not ok:
                misses.append(f"{d['id']}: {t['text']!r} -> {json.dumps(got)}")
        whole += all_ok
        if not all_ok:
            miss_by_tag.update(d.get("tags", []))
    lat = {"ask_ms_p50": _p(0.5), "ask_ms_p95": _p(0.95)}
    LATENCY.clear()
    return {"set": "F", "dialogues": len(dialogues), "turns": turns, **lat,
            "turns_exact": f"{100 * turns_ok / turns:.1f} %", "dialogues_exact": f"{100 * whole / len(dialogues):.1f} %",
            "writes_where_none_was_asked": unasked, "writes_run_without_confirmation": unconfirmed,
            "misses_by_tag": dict(miss_by_tag.most_common()), "misses": misses}


def main() -> int:
    import logging
    logging.getLogger("edge_agent").setLevel(logging.ERROR)  # the audit's clarify lines: counted here instead
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--p", default=str(ROOT / "models" / "eval" / "plans_p.jsonl"))
    ap.add_argument("--f", default=str(ROOT / "models" / "eval" / "followups_f.jsonl"))
    args = ap.parse_args()
    load = lambda path: [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]  # noqa: E731
    engine = Engine(ModelConfig(providers=["cpu"]), ops.TOOLSET)
    engine.load()
    try:
        for result in (asyncio.run(score_p(engine, load(args.p))), asyncio.run(score_f(engine, load(args.f)))):
            print(json.dumps(result))
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
