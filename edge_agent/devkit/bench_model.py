"""`edge-agent bench model`: the GLM's speed per provider and quantization, against its peers in the same run.

Peers: onnxruntime-genai driving the same ONNX file (with the folder's genai_config.json), unconstrained and with
its own llguidance guidance, each with and without its n-gram speculation, and the same architecture in torch eager
with a KV cache (transformers; random weights: speed only). Skipped, with the reason printed, where a peer is not
installed.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

# genai's own n-gram speculative decoding (prompt lookup), the same draft length as ours; of n-gram sizes 2 and 3,
# 3 was the faster here, unconstrained and guided
GENAI_NGRAM = {"ngram_size": 3, "max_draft_tokens": 4}
LONG_PROMPT = ("hey, could you please tell me what the average temperature of line3_boiler7 and its pressure were "
               "over the last forty five minutes, thanks")


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


class _Ours:
    """Our loop on one file, unconstrained, a fixed number of new tokens (no stop token)."""

    def __init__(self, model, file: str, provider: str, threads: int) -> None:
        import onnxruntime as ort

        from edge_agent.glm.generate import Generator
        from edge_agent.glm.runtime import PROVIDERS, RuntimeOptions, session_options

        # opened by path (verified when the engine loaded it; ONNX Runtime finds external data beside it)
        source = str(model.dir / file)
        sess = ort.InferenceSession(source, providers=[PROVIDERS[provider]],
                                    sess_options=session_options(RuntimeOptions([provider], threads)))
        a = model.arch
        self.gen = Generator(sess, [], a["context"], a["num_hidden_layers"], a["num_key_value_heads"],
                             a["head_dim"], provider)

    def once(self, ids: list[int], new: int) -> tuple[float, float]:
        r = self.gen.generate(ids, max_new_tokens=new, timeout_s=60)
        return r.ttft_s, (len(r.ids) - 1) / (r.total_s - r.ttft_s)


class _Genai:
    """onnxruntime-genai on the same folder (its genai_config.json names the same file)."""

    def __init__(self, model_dir: Path, threads: int) -> None:
        import onnxruntime_genai as og

        self.og = og
        cfg = og.Config(str(model_dir))  # the folder's genai_config.json, with our thread count (a fair comparison)
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        self.m = og.Model(cfg)

    def once(self, ids: list[int], new: int) -> tuple[float, float]:
        og = self.og
        p = og.GeneratorParams(self.m)
        p.set_search_options(max_length=len(ids) + new, min_length=len(ids) + new)
        g = og.Generator(self.m, p)
        t0 = time.perf_counter()
        g.append_tokens(ids)
        g.generate_next_token()
        t1 = time.perf_counter()
        n = 1
        while not g.is_done():
            g.generate_next_token()
            n += 1
        return t1 - t0, (n - 1) / (time.perf_counter() - t1)

    def answer(self, ids: list[int], new: int, ngram: bool = False) -> tuple[int, float]:
        """Greedy until the end token: (tokens after the first, seconds after the first)."""
        og = self.og
        p = og.GeneratorParams(self.m)
        p.set_search_options(max_length=len(ids) + new)
        if ngram:
            p.set_speculative_options(**GENAI_NGRAM)
        g = og.Generator(self.m, p)
        g.append_tokens(ids)
        g.generate_next_token()
        t1 = time.perf_counter()
        while not g.is_done():
            g.generate_next_token()
        return len(g.get_sequence(0)) - len(ids) - 1, time.perf_counter() - t1

    def guided(self, ids: list[int], schema_json: str, new: int, ngram: bool = False) -> tuple[int, float]:
        """(tokens written, seconds) from the schema in hand, as ours: guidance compiles when the generator
        is made."""
        og = self.og
        t0 = time.perf_counter()
        p = og.GeneratorParams(self.m)
        p.set_search_options(max_length=len(ids) + new)
        p.set_guidance("json_schema", schema_json, True)
        if ngram:
            p.set_speculative_options(**GENAI_NGRAM)
        g = og.Generator(self.m, p)
        g.append_tokens(ids)
        while not g.is_done():
            g.generate_next_token()
        return len(g.get_sequence(0)) - len(ids), time.perf_counter() - t0


def _torch(arch: dict, ids: list[int], new: int, reps: int, threads: int) -> dict:
    import torch
    from transformers import GlmConfig, GlmForCausalLM

    torch.set_num_threads(threads)
    cfg = GlmConfig(vocab_size=arch["vocab_size"], hidden_size=arch["hidden_size"],
                    intermediate_size=arch["intermediate_size"], num_hidden_layers=arch["num_hidden_layers"],
                    num_attention_heads=arch["num_attention_heads"], num_key_value_heads=arch["num_key_value_heads"],
                    head_dim=arch["head_dim"], max_position_embeddings=arch["context"], tie_word_embeddings=True,
                    partial_rotary_factor=arch.get("partial_rotary_factor", 0.5), pad_token_id=0, eos_token_id=[1])
    model = GlmForCausalLM(cfg).eval()
    x = torch.tensor([ids])
    tps = []
    with torch.no_grad():
        for i in range(reps + 1):
            out = model(input_ids=x, use_cache=True)
            past = out.past_key_values
            tok = out.logits[:, -1:].argmax(-1)
            t1 = time.perf_counter()
            for _ in range(new - 1):
                out = model(input_ids=tok, past_key_values=past, use_cache=True)
                past = out.past_key_values
                tok = out.logits[:, -1:].argmax(-1)
            t2 = time.perf_counter()
            if i >= 1:
                tps.append((new - 1) / (t2 - t1))
    return {"decode_tok_s": statistics.median(tps)}


def shipped_eval_sets() -> list[str]:
    """The evaluation sets beside the shipped model: the generated held-out split and the two hand-written ones."""
    root = Path(__file__).resolve().parents[2] / "models" / "eval"
    return [str(p) for p in [root / "heldout.jsonl", *sorted(root.glob("handwritten*.jsonl"))]]


def read_bandwidth(mb: int = 256, reps: int = 5) -> float:
    """This machine's read-only memory bandwidth in GB/s (a sum over an array larger than the caches; best of reps)."""
    import numpy as np

    a = np.ones(mb * (1 << 20) // 8)
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        a.sum()
        best = max(best, a.nbytes / (time.perf_counter() - t0))
    return best / 1e9


_RSS_OURS = r"""
import json, sys
from edge_agent import ops
from edge_agent.config import ModelConfig
from edge_agent.glm.engine import Engine
d, key, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
e = Engine(ModelConfig(dir=d, public_key=key, providers=["cpu"], threads=threads, lookahead=0), ops.TOOLSET)
e.load()
e.gen.generate(list(range(3, 40)), max_new_tokens=32, timeout_s=600)
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) * 1024)
e.close()
"""
_RSS_GENAI = r"""
import json, sys
import onnxruntime_genai as og
d, threads = sys.argv[1], int(sys.argv[3])
cfg = og.Config(d)
cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
m = og.Model(cfg)
p = og.GeneratorParams(m)
p.set_search_options(max_length=37 + 32, min_length=37 + 32)
g = og.Generator(m, p)
g.append_tokens(list(range(3, 40)))
while not g.is_done():
    g.generate_next_token()
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) * 1024)
"""


def peak_rss(model_dir: Path, public_key: str, threads: int, runs: int = 3) -> dict:
    """Peak resident memory of a process that loads the model and writes 32 tokens: ours (the agent's engine) and
    onnxruntime-genai's, each in `runs` fresh processes, interleaved (bytes, sorted; absent where genai is not
    installed). Several, because a process's peak can hang on its address layout (genai's 0.5B load: 686 or 885 MB)."""
    import subprocess
    import sys

    res: dict[str, list[int]] = {}
    for _ in range(runs):
        for name, code in (("ours", _RSS_OURS), ("genai", _RSS_GENAI)):
            r = subprocess.run([sys.executable, "-c", code, str(model_dir), public_key, str(threads)],
                               capture_output=True, text=True, timeout=1800)
            if r.returncode == 0:
                res.setdefault(name, []).append(int(r.stdout.split()[-1]))
    return {k: sorted(v) for k, v in res.items()}


def run(cfg, eval_files: list[str] | None, n_ask: int = 100, new: int = 48, reps: int = 5, out=print,
        scale: bool = False) -> dict:
    """scale: a benchmark model of random weights (models/recipe/scale_model.py): speed, the roofline and memory
    only; its answers are noise."""
    import onnxruntime as ort

    from edge_agent import ops
    from edge_agent.glm import schema
    from edge_agent.glm.engine import Engine

    engine = Engine(cfg, ops.TOOLSET)
    engine.load()
    model = engine.model
    tok = engine.tok
    res: dict = {"model": engine.info(), "threads": cfg.threads, "new_tokens": new}
    ids = tok.encode_prompt(LONG_PROMPT)
    res["prompt_tokens"] = len(ids)
    out(f"model {model.name}; prompt {len(ids)} tokens, {new} new tokens, {cfg.threads} intra-op thread(s)")
    # ---- ours, unconstrained, per provider x file; onnxruntime-genai interleaved with ours on the served file,
    # run for run, so both see the same machine (this box is noisy)
    try:
        genai = _Genai(model.dir, cfg.threads)
    except ImportError:
        genai = None
        out("  onnxruntime-genai not installed (pip install 'edge-agent[bench]'); skipped")
    offered = ort.get_available_providers()
    from edge_agent.glm.runtime import PROVIDERS
    rows = []
    for kind in cfg.providers:
        if PROVIDERS[kind] not in offered:
            out(f"  {kind}: not offered by this onnxruntime build; skipped")
            continue
        for file in sorted(set(model.manifest["providers"].values())):
            ours = _Ours(model, file, kind, cfg.threads)
            peer = genai if (genai is not None and kind == "cpu" and file == engine.session.file) else None
            o_t, o_s, g_t, g_s = [], [], [], []
            for i in range(reps + 2):
                t, sp = ours.once(ids, new)
                if i >= 2:
                    o_t.append(t)
                    o_s.append(sp)
                if peer is not None:
                    t, sp = peer.once(ids, new)
                    if i >= 2:
                        g_t.append(t)
                        g_s.append(sp)
            r = {"provider": kind, "file": file, "ttft_ms": statistics.median(o_t) * 1e3,
                 "decode_tok_s": statistics.median(o_s)}
            rows.append(r)
            out(f"  ours    {kind:8} {file:22} first token {r['ttft_ms']:6.2f} ms   decode {r['decode_tok_s']:7.0f} tok/s")
            if peer is not None:
                res["genai"] = {"file": file, "ttft_ms": statistics.median(g_t) * 1e3,
                                "decode_tok_s": statistics.median(g_s)}
                out(f"  genai   {kind:8} {file:22} first token {res['genai']['ttft_ms']:6.2f} ms   decode "
                    f"{res['genai']['decode_tok_s']:7.0f} tok/s   (ours/genai "
                    f"{r['decode_tok_s'] / res['genai']['decode_tok_s']:.2f})")
    res["ours"] = rows
    # the roofline: every weight is read once per generated token (batch 1); the served file's bytes
    bw = read_bandwidth()
    per_token = sum(model.manifest["files"][f]["size"] for f in [engine.session.file,
                                                                 *model.external.get(engine.session.file, [])])
    roof = bw * 1e9 / per_token
    res["roofline"] = {"read_gb_s": bw, "bytes_per_token": per_token, "tok_s": roof}
    for r in rows:
        if r["file"] == engine.session.file:
            r["roofline_fraction"] = r["decode_tok_s"] / roof
    mine = next((r for r in rows if r["file"] == engine.session.file), None)
    out(f"  roofline: {bw:.1f} GB/s read-only, {per_token / 1e6:.2f} MB of weights a token -> {roof:.0f} tok/s"
        + (f"; ours decode at {mine['decode_tok_s'] / roof:.0%} of it" if mine else ""))
    served = next((r for r in rows if r["file"] == engine.session.file and r["provider"] == engine.session.provider),
                  rows[0])
    if scale:
        engine.close()
        rss = res["peak_rss"] = peak_rss(model.dir, cfg.public_key, cfg.threads)
        out(f"  peak RSS (load + 32 tokens, {len(rss.get('ours', []))} fresh processes each, lowest-highest): " +
            ", ".join(f"{k} {v[0] / 2**20:.0f}-{v[-1] / 2**20:.0f} MB" for k, v in rss.items() if v) +
            (f" (ours/genai, lowest of each {rss['ours'][0] / rss['genai'][0]:.2f}, highest "
             f"{rss['ours'][-1] / rss['genai'][-1]:.2f})" if len(rss) == 2 else ""))
        return res
    texts = [json.loads(line)["text"] for line in Path(eval_files[0]).read_text().splitlines()[:n_ask]] \
        if eval_files else [LONG_PROMPT] * 20
    # ---- unconstrained answers, each until its end token: ours with lookahead and without, genai with its n-gram
    # speculation and without, interleaved
    acc = {k: [0, 0.0, 0] for k in ("lookahead", "plain", "genai", "genai_ngram")}  # tokens, seconds, passes
    for i, t in enumerate(texts[:2] + texts):
        ids_t = tok.encode_prompt(t)
        got = {}
        for name, k in (("lookahead", cfg.lookahead), ("plain", 0)):
            r = engine.gen.generate(ids_t, max_new_tokens=cfg.max_new_tokens, timeout_s=60, lookahead=k,
                                    reference=engine.reference)
            got[name] = (len(r.ids) + (r.stop == "eos") - 1, r.total_s - r.ttft_s, r.forward_passes - 1)
        if genai is not None:
            got["genai"] = (*genai.answer(ids_t, cfg.max_new_tokens), 0)
            got["genai_ngram"] = (*genai.answer(ids_t, cfg.max_new_tokens, ngram=True), 0)
        if i >= 2:
            for name, (n, sec, passes) in got.items():
                acc[name][0] += n
                acc[name][1] += sec
                acc[name][2] += passes
    la, pl = acc["lookahead"], acc["plain"]
    res["answers"] = {"n": len(texts), "lookahead": cfg.lookahead, "decode_tok_s": la[0] / la[1],
                      "tokens_per_pass": la[0] / max(la[2], 1), "plain_decode_tok_s": pl[0] / pl[1],
                      "pass_cost": engine.gen.pass_cost, "draft_kept": engine.gen._kept,
                      "draft_length_now": engine.gen.draft_length(cfg.lookahead)}
    out("  lookahead on this machine: a pass of 1+k tokens costs " +
        ", ".join(f"{c:.2f}" for c in engine.gen.pass_cost) + " x one token (k = 0..); draft token i kept " +
        ", ".join(f"{p:.0%}" for p in engine.gen._kept) + f"; it now drafts {res['answers']['draft_length_now']}")
    line = (f"  answers, unconstrained ({len(texts)} questions, to the end token): ours {la[0] / la[1]:.0f} tok/s "
            f"with lookahead {cfg.lookahead} ({la[0] / max(la[2], 1):.2f} tokens a pass), {pl[0] / pl[1]:.0f} "
            "without")
    out(line)
    if genai is not None:
        g, gn = acc["genai"], acc["genai_ngram"]
        res["answers"].update(genai_decode_tok_s=g[0] / g[1], genai_ngram_decode_tok_s=gn[0] / gn[1])
        out(f"  genai answers: {g[0] / g[1]:.0f} tok/s (ours/genai {la[0] / la[1] / (g[0] / g[1]):.2f}); with its "
            f"n-gram speculation {gn[0] / gn[1]:.0f} tok/s (ours/genai {la[0] / la[1] / (gn[0] / gn[1]):.2f})")
    # ---- ask (constrained) on the serving provider, interleaved with genai's guided generation
    lat, toks, gen_s, mask_s, comp_s, sampled, g_toks, g_s, gn_toks, gn_s = [], 0, 0.0, 0.0, 0.0, 0, 0, 0.0, 0, 0.0
    for i, t in enumerate(texts[:2] + texts):
        t0 = time.perf_counter()
        p = engine.plan(t)
        dt = time.perf_counter() - t0
        if genai is not None:
            sj = json.dumps(ops.TOOLSET.narrowed(t))
            n, gs = genai.guided(tok.encode_prompt(t), sj, cfg.max_new_tokens)
            nn, gns = genai.guided(tok.encode_prompt(t), sj, cfg.max_new_tokens, ngram=True)
        if i >= 2:
            lat.append(dt)
            toks += p.new_tokens
            gen_s += p.total_s
            mask_s += p.mask_s
            comp_s += p.compile_s
            sampled += p.new_tokens - p.forced_tokens
            if genai is not None:
                g_toks += n
                g_s += gs
                gn_toks += nn
                gn_s += gns
    res["ask"] = {"n": len(lat), "p50_ms": _pct(lat, 0.5) * 1e3, "p95_ms": _pct(lat, 0.95) * 1e3,
                  "constrained_tok_s": toks / gen_s, "mask_us_per_sampled_token": mask_s / max(sampled, 1) * 1e6,
                  "forced_share": 1 - sampled / max(toks, 1), "tool_grammar_compile_ms": comp_s / len(lat) * 1e3}
    a = res["ask"]
    out(f"  ask --dry-run ({a['n']} questions): p50 {a['p50_ms']:.1f} ms  p95 {a['p95_ms']:.1f} ms  "
        f"{a['constrained_tok_s']:.0f} tok/s  grammar {a['mask_us_per_sampled_token']:.0f} µs/sampled token, "
        f"{a['tool_grammar_compile_ms']:.2f} ms/question compiling the tool's grammar  {a['forced_share']:.0%} of "
        "tokens forced")
    if genai is not None:
        res["genai"].update(guided_tok_s=g_toks / g_s, guided_ngram_tok_s=gn_toks / gn_s)
        out(f"  genai guided (its llguidance, same schemas): {g_toks / g_s:.0f} tok/s "
            f"(ours/genai {a['constrained_tok_s'] / (g_toks / g_s):.2f}); with its n-gram speculation "
            f"{gn_toks / gn_s:.0f} tok/s (ours/genai {a['constrained_tok_s'] / (gn_toks / gn_s):.2f})")
    try:
        t = _torch(model.arch, ids, new, max(2, reps // 2), cfg.threads)
        res["torch"] = t
        out(f"  torch eager (same architecture, KV cache): decode {t['decode_tok_s']:.0f} tok/s   "
            f"(ours/torch {served['decode_tok_s'] / t['decode_tok_s']:.1f}, ask/torch "
            f"{a['constrained_tok_s'] / t['decode_tok_s']:.1f})")
    except ImportError:
        out("  torch/transformers not installed (pip install 'edge-agent[recipe]'); skipped")
    if eval_files:
        res["eval"] = {Path(f).stem: evaluate(engine, Path(f), out) for f in eval_files}
    engine.close()
    return res


def settle(text: str, call: dict | None) -> dict | None:
    """What ask would do with the model's call, short of running it: a write the guard refuses becomes the clarify
    it answers with (ops.ask does the same, then also checks the registry, which an evaluation set has none of)."""
    from edge_agent import ops
    from edge_agent.ops.guard import check_write

    if call is None or call["tool"] not in ops.BY_TOOL or not ops.BY_TOOL[call["tool"]].changes:
        return call
    why = check_write(text, call["args"])
    return call if why is None else {"tool": "clarify", "args": {"reason": why[0]}}


def _same(a: dict | None, b: dict) -> bool:
    return a == b and json.dumps(a) == json.dumps(b)  # 1 is not 1.0, True is not 1


def evaluate(engine, eval_file: Path, out=print) -> dict:
    """Both what the model answers alone (its first answer) and what ask makes of it (the second look, then the
    guard), against each row's call:
    exact match; writes where none was asked (unsafe); writes other than the one asked (wrong value, device or
    point); INT8/fp32 agreement against the model folder's reference.jsonl, where there is one."""
    rows = [json.loads(line) for line in Path(eval_file).read_text().splitlines() if line.strip()]
    ref_file = engine.model.dir / "reference.jsonl"
    ref = {}
    if ref_file.exists():
        ref = {r["text"]: r["call"] for r in map(json.loads, ref_file.read_text().splitlines()) if r}
    model_hits = hits = unsafe = wrong = asked_writes = agree = compared = 0
    misses = []
    alone = [engine.plan(r["text"], second_look=False).call for r in rows]  # the model alone: its first answer
    for r, call0 in zip(rows, alone):
        call = engine.plan(r["text"]).call
        final = settle(r["text"], call)
        model_hits += _same(call0, r["call"])
        hits += _same(final, r["call"])
        writes = final is not None and final["tool"] in engine_writes()
        if r["call"]["tool"] in engine_writes():
            asked_writes += 1
            wrong += writes and not _same(final, r["call"])
        else:
            unsafe += writes
        if not _same(final, r["call"]):
            misses.append({"text": r["text"], "want": r["call"], "got": final})
        if r["text"] in ref:  # the reference is the fp32 model's first answer
            compared += 1
            agree += call0 == ref[r["text"]]
    free_hits = free_valid = 0
    for r in rows:
        p = engine.plan(r["text"], constrained=False)
        free_valid += p.call is not None
        free_hits += _same(p.call, r["call"])
    n = len(rows)
    ev = {"n": n, "exact_match": hits / n, "model_exact_match": model_hits / n, "unsafe_writes": unsafe,
          "not_asked_to_write": n - asked_writes, "wrong_writes": wrong, "asked_to_write": asked_writes,
          "must_not_write_rows": sum("must_not_write" in r for r in rows),
          "int8_fp32_agreement": agree / compared if compared else None, "compared_with_fp32": compared,
          "unconstrained_exact_match": free_hits / n, "unconstrained_schema_valid": free_valid / n,
          "misses": misses}
    agreement = (f"INT8/fp32 agreement {ev['int8_fp32_agreement']:.1%} ({compared})" if compared else
                 "no reference.jsonl in the model folder: INT8/fp32 agreement not measured")
    out(f"  eval {eval_file.name} ({n}): exact {ev['exact_match']:.1%} as ask answers (model alone "
        f"{ev['model_exact_match']:.1%}); writes where none was asked {unsafe} of {n - asked_writes}; wrong writes "
        f"{wrong} of {asked_writes}; {agreement}; unconstrained {ev['unconstrained_exact_match']:.1%} exact, "
        f"{ev['unconstrained_schema_valid']:.1%} valid")
    return ev


def engine_writes() -> frozenset[str]:
    """The tools whose operation changes something."""
    from edge_agent import ops

    return frozenset(t for t, op in ops.BY_TOOL.items() if op.changes)
