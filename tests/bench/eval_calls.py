"""The single-call sets (A, B, C and the generated held-out) through `ask` as the daemon runs it now — the composer,
the model for each clause, the dry-run — rather than through the model and the guard alone (`edge-agent bench model
--eval` measures those): does the orchestrator keep their figures?

    python3 tests/bench/eval_calls.py [SET.jsonl ...]      # default: the four shipped sets

The registry is one gateway's: every device and point any expected call of the set names (so a row's own device is
never the only one known). A row whose expected answer the conventions of issue 23 changed — a condition or a
standing condition the old sets answer `clarify` `use_a_rule`, which is now a plan or a rule proposal, or an order for
later the old sets answer `clarify` `nothing`, now `too_complex` — is counted apart and shown, not scored as a miss.
"""
from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "bench"))

from eval_agent import World, _router, turn  # noqa: E402
from edge_agent import ops  # noqa: E402
from edge_agent.config import ModelConfig  # noqa: E402
from edge_agent.glm.engine import Engine  # noqa: E402

SETS = ["handwritten.jsonl", "handwritten_b.jsonl", "handwritten_c.jsonl", "heldout.jsonl"]
WRITES = ("write_point", "add_rule")


def _writes(out: dict) -> bool:
    steps = out.get("plan", [out])
    return any(s.get("tool") in WRITES for s in steps)


async def score(engine: Engine, rows: list[dict]) -> dict:
    world: dict[str, dict] = {}
    for r in rows:
        a = r["call"].get("args", {})
        if isinstance(a.get("device"), str) and isinstance(a.get("point"), str):
            world.setdefault(a["device"], {})[a["point"]] = a.get("value", 1.0) if r["call"]["tool"] == "write_point" \
                else 1.0
        elif isinstance(a.get("device"), str):
            world.setdefault(a["device"], {}).setdefault("enabled", True)
    hits = unasked = wrong = asked = changed = 0
    misses, convention = [], []
    for r in rows:
        router = _router(World(world), engine)
        got, _ = await turn(router, r["text"])
        want = r["call"]
        old_rule = want["tool"] == "clarify" and want["args"].get("reason") == "use_a_rule"
        # an order for later ("switch off fan-14 at 6pm", "tonight"): the old sets' `nothing`, the new conventions'
        # `too_complex` (a schedule is beyond a plan); both run nothing
        old_rule |= want == {"tool": "clarify", "args": {"reason": "nothing"}} \
            and got == {"tool": "clarify", "args": {"reason": "too_complex"}}
        if old_rule and got != want:
            changed += 1
            convention.append(f"{r['text']!r} -> {json.dumps(got)}")
            unasked += 0  # a proposal is confirmed like a write, never run unasked; shown above
            continue
        ok = got == want and json.dumps(got) == json.dumps(want)
        hits += ok
        if want["tool"] == "write_point":
            asked += 1
            wrong += _writes(got) and not ok
        else:
            unasked += _writes(got)
        if not ok:
            misses.append(f"{r['text']!r}: want {json.dumps(want)} got {json.dumps(got)}")
    n = len(rows) - changed
    return {"rows": len(rows), "scored": n, "exact": f"{100 * hits / max(n, 1):.1f} %",
            "writes_where_none_was_asked": f"{unasked} of {n - asked}", "wrong_writes": f"{wrong} of {asked}",
            "answered_by_the_new_conventions": changed, "convention_changed": convention, "misses": misses}


def main() -> int:
    import logging
    logging.getLogger("edge_agent").setLevel(logging.ERROR)
    files = sys.argv[1:] or [str(ROOT / "models" / "eval" / s) for s in SETS]
    engine = Engine(ModelConfig(providers=["cpu"]), ops.TOOLSET)
    engine.load()
    try:
        for f in files:
            rows = [json.loads(x) for x in Path(f).read_text().splitlines() if x.strip()]
            res = asyncio.run(score(engine, rows))
            print(json.dumps({"set": Path(f).name, **{k: v for k, v in res.items()
                                                        if k not in ("misses", "convention_changed")}}))
            for line in res["misses"][:40]:
                print("  miss:", line)
            for line in res["convention_changed"][:10]:
                print("  now:", line)
    finally:
        engine.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
