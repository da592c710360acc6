"""The agent's speed (`edge-agent bench model --agent`): one intra-op thread, the shipped model, the requests of the
plan set P (and the dialogues of F for the memory).

- plan + static dry-run: `ask` through the router as the daemon runs it (the composer, the model for each clause,
  the plan's validation, the registry, the write guard, the dry-run) with every read answered from memory: what the
  agent itself costs;
- end to end with the reads from the store: the same requests against a real store (SQLite, its reader thread)
  that holds an hour of readings, one a minute, of every device and point the set's worlds name;
- memory: the bytes of each requester's frame (canonical JSON, the size its bound of 4 KB is checked against) after
  every turn of every dialogue of F.
A proposed write in P is never confirmed (nothing is written); F's confirmations write into its simulated world.
"""
from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path

from edge_agent import ops
from edge_agent.config import AskConfig, CommandsConfig, StoreConfig
from edge_agent.metrics import Metrics
from edge_agent.ops.memory import MAX_FRAME_BYTES, Memory
from edge_agent.records import Reading
from edge_agent.store import Store

EVAL = Path(__file__).resolve().parents[2] / "models" / "eval"


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return round(1e3 * xs[min(len(xs) - 1, int(q * len(xs)))], 1) if xs else 0.0


class _Memory:
    """Reads answered from an item's world, writes (a dialogue's confirmed ones) kept in it: no I/O."""

    def __init__(self, world: dict) -> None:
        self.world = {d: dict(ps) for d, ps in world.items()}

    async def write(self, device, point, value) -> None:
        self.world.setdefault(device, {})[point] = value

    async def devices(self) -> list[dict]:
        return [{"device": d, "points": [{"point": p} for p in ps]} for d, ps in self.world.items()]

    async def query(self, device, point, agg, window_s, max_rows):
        if point not in self.world.get(device, {}):
            raise LookupError(f"no point {point!r} on device {device!r}")
        return {"device": device, "point": point, "agg": agg, "window_s": window_s,
                "value": self.world[device][point]}


class _Store:
    """The reads from a real store."""

    def __init__(self, store: Store) -> None:
        self.devices, self.query = store.devices, store.query_stats


def router(engine, world, memory: Memory | None = None, clock=None) -> ops.Router:
    """`ask` as the daemon runs it (ask.writes = confirm) over a world that answers `devices` and `query` (and, where
    it has them, `write` and `rules_add`; else they are refused), with the shipped engine; `clock` drives the
    confirmations' and the memory's expiry (a simulated dialogue's)."""
    m = Metrics()

    async def ask(text: str, known: dict) -> dict:
        plan = await engine.ask(text, known=known)
        return {"call": plan.call, "model": "shipped", "provider": "cpu", "timings": {}}

    async def refuse(*_a):
        raise PermissionError("this world writes nothing")

    async def no_alerts(device, n):
        return {"firing": [], "cleared": []}
    cfg = AskConfig(writes="confirm")
    pending = ops.PendingWrites(cfg, m.ask_outcomes.labels("dropped"))
    if memory is None:
        memory = Memory(cfg.memory_ttl_s, cfg.max_requesters, lambda e: m.agent_events.labels(e).inc())
    if clock is not None:
        pending.clock = memory.clock = clock
    gw = ops.Gateway(status=dict, devices=world.devices, query_stats=world.query,
                     write_point=getattr(world, "write", refuse), config=dict, log_lines=list, rules_list=list,
                     rules_add=getattr(world, "rules_add", refuse), rules_remove=refuse, alerts=no_alerts, ask=ask,
                     pending=pending, memory=memory)
    return ops.Router(CommandsConfig(allow=["read-only", "write", "confirm", "rules.add"]), ops.TABLE, gw, m,
                      gateway_id="bench")


async def _ask(router: ops.Router, text: str, who: str) -> float:
    t0 = time.perf_counter()
    reply = json.loads((await router.handle("ask", json.dumps({"text": text}).encode(), who))[0])
    took = time.perf_counter() - t0
    if not reply.get("ok") and reply["error"]["code"] == "internal":
        raise RuntimeError(f"ask failed inside: {reply}")
    return took


async def _run(engine, plans: list[dict], dialogues: list[dict], reps: int) -> dict:
    static: list[float] = []
    for _ in range(reps):
        for item in plans:
            static.append(await _ask(router(engine, _Memory(item["world"])), item["text"], "bench"))
    merged: dict[str, dict] = {}
    for item in plans:
        for d, ps in item["world"].items():
            for p, v in ps.items():
                merged.setdefault(d, {}).setdefault(p, v)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(StoreConfig(), tmp, Metrics())
        await store.open()
        try:
            now = time.time_ns()
            rows = [Reading(d, p, v if isinstance(v, (bool, str)) else float(v), None,
                            now - k * 60_000_000_000, "good", "bench")
                    for d, ps in merged.items() for p, v in ps.items() if v is not None for k in range(60, 0, -1)]
            for i in range(0, len(rows), 2000):
                await store.write(rows[i:i + 2000])
            store_router = router(engine, _Store(store))
            e2e: list[float] = []
            for _ in range(reps):
                for item in plans:
                    e2e.append(await _ask(store_router, item["text"], "bench"))
        finally:
            await store.close()
    memory = Memory(AskConfig().memory_ttl_s, AskConfig().max_requesters)
    frames: list[int] = []
    for dlg in dialogues:
        w = _Memory(dlg["world"])
        r = router(engine, w, memory)
        for t in dlg["turns"]:
            who = f"{dlg['id']}:{t.get('who', 'op')}"
            await _ask(r, t["text"], who)
            frames.extend(memory.sizes())
    return {"requests": len(plans), "reps": reps, "static_ms_p50": _pct(static, 0.5),
            "static_ms_p95": _pct(static, 0.95), "store_ms_p50": _pct(e2e, 0.5), "store_ms_p95": _pct(e2e, 0.95),
            "series_in_store": sum(len(ps) for ps in merged.values()), "readings_in_store": len(rows),
            "frame_bytes_max": max(frames, default=0), "frame_bytes_p50": sorted(frames)[len(frames) // 2]
            if frames else 0, "frame_bound": MAX_FRAME_BYTES, "turns": sum(len(d["turns"]) for d in dialogues)}


def run_agent(engine, reps: int = 3, out=print, plans_file: Path | None = None,
              dialogues_file: Path | None = None) -> dict:
    load = lambda p: [json.loads(x) for x in Path(p).read_text().splitlines() if x.strip()]  # noqa: E731
    plans = load(plans_file or EVAL / "plans_p.jsonl")
    dialogues = load(dialogues_file or EVAL / "followups_f.jsonl")
    import logging
    quiet = logging.getLogger("edge_agent")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the audit's lines for every clarify: counted elsewhere, noise here
    try:
        res = asyncio.run(_run(engine, plans, dialogues, reps))
    finally:
        quiet.setLevel(level)
    out(f"agent, {res['requests']} requests x {reps} (one thread): plan + static dry-run p50 "
        f"{res['static_ms_p50']} ms, p95 {res['static_ms_p95']} ms (goal <= 50); end to end with the reads from the "
        f"store ({res['series_in_store']} series, {res['readings_in_store']} readings) p50 {res['store_ms_p50']} ms, "
        f"p95 {res['store_ms_p95']} ms (goal <= 200); a requester's memory over {res['turns']} turns: p50 "
        f"{res['frame_bytes_p50']} B, max {res['frame_bytes_max']} B (bound {res['frame_bound']})")
    return res
