"""The decoding loop: prefill, then cached decode, greedy or top-p, with an optional llguidance constraint.

The KV cache follows the Optimum layout: each step feeds the previous step's `present.*` outputs back as
`past_key_values.*`. On CPU they are the arrays ONNX Runtime returned (no copies); on CUDA/TensorRT the
outputs are bound on the device with IO binding, so the cache never crosses to the host, and only the logits
of the last position are copied back.

With a constraint, every sampled token is one the grammar allows (greedy: the model's choice is checked, and the
llguidance mask is computed and applied only when it is refused; top-p: the mask is applied first), and the tokens the
grammar forces (JSON keys, punctuation, the rest of an enum value) are appended without sampling and fed to the
model in one multi-token forward pass (fast-forward), so the output always matches the schema and the
constrained path needs fewer forward passes than the unconstrained one.

Greedy decoding on the CPU also looks ahead (prompt lookup): when the last tokens written occurred before (in the
question, in the reference calls, or earlier in the answer), the tokens that followed them there are fed as a draft
in the same forward pass, and every draft token the model itself would have chosen next is kept; the first one it
would not have is replaced by its own choice. The answer is the greedy answer; a tool call copies names and keys,
so most passes keep several tokens. The cache of refused draft tokens is cut off again.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


class GenerationTimeout(Exception):
    pass


class ConstraintError(Exception):
    pass


@dataclass
class GenResult:
    ids: list[int]
    text: str
    prompt_tokens: int
    stop: str  # eos | grammar | max_tokens
    ttft_s: float  # prompt in -> first token out
    total_s: float
    forward_passes: int
    forced_tokens: int = 0
    mask_s: float = 0.0  # time spent computing grammar masks
    drafted_tokens: int = 0  # tokens that came from lookahead drafts the model confirmed
    compile_s: float = 0.0  # grammar compiling after the prompt's forward pass


class JsonConstraint:
    """One request's llguidance matcher over a grammar compiled from a JSON schema (or a copy of a compiled one)."""

    compile_s = 0.0  # compiling done after the prompt's forward pass (counted apart from masks)

    def __init__(self, lltok, grammar, vocab_size: int) -> None:
        import llguidance

        self.m = grammar.deep_copy() if isinstance(grammar, llguidance.LLMatcher) else \
            llguidance.LLMatcher(lltok, grammar, log_level=0)
        if self.m.is_error():
            raise ConstraintError(self.m.get_error())
        self.vocab = vocab_size
        self.words = (vocab_size + 31) // 32
        self.mask = np.zeros(self.words, dtype=np.int32)

    def allowed(self) -> np.ndarray:
        self.m.unsafe_compute_mask_ptr(self.mask.ctypes.data, self.mask.nbytes)
        if self.m.is_error():
            raise ConstraintError(self.m.get_error())
        return np.unpackbits(self.mask.view(np.uint8), bitorder="little")[: self.vocab].astype(bool)

    def accepts(self, *tokens: int) -> bool:
        """Whether the grammar takes these tokens next (much cheaper than a whole mask)."""
        return self.m.validate_tokens(list(tokens)) == len(tokens)

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many of these tokens the grammar takes next, in order."""
        return self.m.validate_tokens(tokens)

    def consume(self, tokens: list[int]) -> None:
        if not self.m.consume_tokens(tokens):
            raise ConstraintError(self.m.get_error() or "token refused by the grammar")

    def advance(self) -> list[int]:
        """Consume and return the tokens the grammar forces next."""
        if self.m.is_stopped():
            return []
        ff = self.m.compute_ff_tokens()
        if ff:
            self.consume(ff)
        return ff

    def stopped(self) -> bool:
        return self.m.is_stopped()


class ToolCallConstraint(JsonConstraint):
    """A tool call in two grammars: the tool set's, compiled once and copied per question, until the answer has
    named its tool; then that one tool's call narrowed to the question, compiled then (a quarter to a third of the
    cost of compiling every tool's narrowed call, and after the prompt's forward pass instead of beside it)."""

    def __init__(self, lltok, opening, narrow: Callable[[str], str], decode: Callable[[list[int]], str],
                 vocab_size: int) -> None:
        super().__init__(lltok, opening, vocab_size)
        self.lltok, self.narrow, self.decode = lltok, narrow, decode
        self.ids: list[int] = []
        self.tool: str | None = None

    def valid_prefix(self, tokens: list[int]) -> int:
        return super().valid_prefix(tokens) if self.tool is not None else 0  # no drafts under the loose grammar

    def consume(self, tokens: list[int]) -> None:
        super().consume(tokens)
        if self.tool is None:
            self.ids += tokens
            text = self.decode(self.ids)
            if text.startswith('{"tool":"') and text.count('"') >= 4:  # {"tool":"NAME" is written
                self.tool = text.split('"')[3]
                t0 = time.perf_counter()
                narrowed = JsonConstraint(self.lltok, self.narrow(self.tool), self.vocab)
                self.compile_s = time.perf_counter() - t0
                narrowed.consume(self.ids)
                self.m = narrowed.m

    def advance(self) -> list[int]:
        named = self.tool is not None
        ff = super().advance()
        if not named and self.tool is not None:  # the tool was named on the way: its own grammar forces more
            ff += super().advance()
        return ff


class Lookup:
    """Prompt-lookup drafts: the tokens that followed the latest earlier occurrence of the last n tokens
    (n = 3, 2, 1: the longest match wins)."""

    NS = (3, 2, 1)

    def __init__(self, tokens: list[int]) -> None:
        self.seq: list[int] = []
        self.index: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.NS}
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        seq = self.seq
        for t in tokens:
            seq.append(t)
            p = len(seq) - 1  # t continues the n-grams that end just before it
            for n in self.NS:
                if p >= n:
                    self.index[n][tuple(seq[p - n:p])] = p

    def copy(self) -> "Lookup":
        other = Lookup([])
        other.seq = list(self.seq)
        other.index = {n: dict(ix) for n, ix in self.index.items()}
        return other

    def draft(self, k: int) -> list[int]:
        seq = self.seq
        for n in self.NS:
            c = self.index[n].get(tuple(seq[-n:])) if len(seq) >= n else None
            if c is not None:
                return seq[c:c + k]
        return []


class Generator:
    def __init__(self, session, eos_ids: list[int], context: int, n_layers: int, n_kv: int, head_dim: int,
                 provider: str = "cpu", device_id: int = 0) -> None:
        self.s = session
        self.eos = set(eos_ids)
        self.context = context
        self.n_layers, self.n_kv, self.head_dim = n_layers, n_kv, head_dim
        self.past_names = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
        self.present_names = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
        self.on_device = provider in ("cuda", "tensorrt")
        self.device_id = device_id
        self._empty = np.zeros((1, n_kv, 0, head_dim), dtype=np.float32)
        self._ones = np.ones((1, context), dtype=np.int64)  # attention masks and positions are views of these
        self._positions = np.arange(context, dtype=np.int64)[None]
        self._outputs = ["logits", *self.present_names]
        # the binding's own run: the public wrapper re-validates every feed in Python on every call, a sixth of a
        # decode step for this model (the feeds here are always complete and plain arrays)
        self._run = getattr(session, "_sess", session).run
        self._pool = None
        # lookahead decides by measurement: the cost of a pass of 1+k tokens relative to one token on this machine
        # (calibrate()), and how often the k-th draft token has been kept (an average over recent passes); it drafts
        # the k that writes the most tokens per unit of time, none when no draft pays for its pass
        self.pass_cost: list[float] = [1.0]  # [cost of 1+k tokens / cost of 1 token for k = 0..]
        self._kept: list[float] = []  # P(draft token i is kept | the ones before it were), i = 1..
        self._explore = 0

    def calibrate(self, lookahead: int, reps: int = 5, prompt_len: int = 24) -> list[float]:
        """Times passes of 1..1+lookahead tokens after a short prompt (the median of `reps` each); sets
        pass_cost. Blocking: call where the session may run (the inference worker, or before it starts)."""
        if lookahead <= 0 or self.on_device:
            self.pass_cost = [1.0]
            return self.pass_cost
        ids = [0] * min(prompt_len, self.context // 2)
        _, past = self._forward_cpu(ids, None, None, 0)
        times = []
        for n in range(1, lookahead + 2):
            ts = []
            for _ in range(reps):
                t = time.perf_counter()
                self._forward_cpu([0] * n, past, None, len(ids))
                ts.append(time.perf_counter() - t)
            times.append(sorted(ts)[len(ts) // 2])
        self.pass_cost = [t / times[0] for t in times]
        self._kept = [0.8] * lookahead  # optimistic at first: drafts get tried, then measured
        return self.pass_cost

    def draft_length(self, lookahead: int) -> int:
        """How many draft tokens to feed in the next pass: the k that maximises expected tokens per unit of pass
        cost. One pass in 32 drafts regardless (while lookahead is on), so that the averages keep being measured."""
        k_max = min(lookahead, len(self.pass_cost) - 1, len(self._kept))
        if k_max <= 0:
            return lookahead if len(self.pass_cost) == 1 else 0  # not calibrated: as configured
        best_k, best, expect, p = 0, 1.0, 1.0, 1.0
        for k in range(1, k_max + 1):
            p *= self._kept[k - 1]
            expect += p
            rate = expect / self.pass_cost[k]
            if rate > best:
                best_k, best = k, rate
        self._explore += 1
        if best_k == 0 and self._explore % 32 == 0:
            return k_max
        return best_k

    def _learn(self, drafted: int, kept: int, alpha: float = 0.05) -> None:
        for i in range(min(kept + 1, drafted, len(self._kept))):
            self._kept[i] += alpha * ((1.0 if i < kept else 0.0) - self._kept[i])

    # one forward pass over `ids` (appended after `past_len` real tokens); `mask`: one entry per cached position and
    # new token (0: a refused draft token still in the cache, not attended to), None: all attended; returns the
    # logits of every position
    def _forward_cpu(self, ids: list[int], past, mask: list[int] | None, past_len: int):
        n = len(ids)
        feeds = {"input_ids": np.asarray([ids], dtype=np.int64),
                 "attention_mask": self._ones[:, :past_len + n] if mask is None else
                 np.asarray([mask], dtype=np.int64),
                 "position_ids": self._positions[:, past_len:past_len + n]}
        if past is None:
            for name in self.past_names:
                feeds[name] = self._empty
        else:
            feeds.update(zip(self.past_names, past))
        out = self._run(self._outputs, feeds, None)
        return out[0][0], out[1:]

    def _forward_device(self, ids: list[int], past, mask: list[int] | None, past_len: int):
        import onnxruntime as ort

        n = len(ids)
        b = self.s.io_binding()
        b.bind_cpu_input("input_ids", np.asarray([ids], dtype=np.int64))
        b.bind_cpu_input("attention_mask", np.ones((1, past_len + n), dtype=np.int64))
        b.bind_cpu_input("position_ids", np.arange(past_len, past_len + n, dtype=np.int64)[None])
        if past is None:
            for name in self.past_names:
                b.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(self._empty, "cuda", self.device_id))
        else:
            for name, v in zip(self.past_names, past):
                b.bind_ortvalue_input(name, v)
        b.bind_output("logits", "cpu")
        for name in self.present_names:
            b.bind_output(name, "cuda", self.device_id)
        self.s.run_with_iobinding(b)
        outs = b.get_outputs()
        return outs[0].numpy()[0], outs[1:]

    def generate(self, prompt_ids: list[int], *, max_new_tokens: int, timeout_s: float,
                 constraint: JsonConstraint | Callable[[], JsonConstraint] | None = None,
                 top_p: float = 0.0, temperature: float = 1.0,
                 seed: int | None = None, on_token: Callable[[list[int]], None] | None = None,
                 prefix: tuple[int, ...] = (), lookahead: int = 0, reference: Lookup | None = None,
                 decode: Callable[[list[int]], str] | None = None) -> GenResult:
        """`lookahead`: draft tokens fed per pass (greedy on the CPU only; 0: none); `reference`: what drafts may
        also be copied from (example calls), indexed once and copied here."""
        t0 = time.perf_counter()
        deadline = t0 + timeout_s
        if len(prompt_ids) >= self.context:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit the context of {self.context}")
        max_new = min(max_new_tokens, self.context - len(prompt_ids))
        forward = self._forward_device if self.on_device else self._forward_cpu
        rng = np.random.default_rng(seed)
        out: list[int] = []
        forced_n = drafted_n = 0
        if callable(constraint):
            # compile the grammar while the prompt runs (ONNX Runtime releases the GIL): hides the compile time.
            # The answer's forced opening (`{"tool":"`), when known, rides along in the prompt's forward pass.
            pending = self._helper().submit(forward, prompt_ids + list(prefix), None, None, 0)
            constraint = constraint()
            rows, past = pending.result()
            if prefix and constraint.accepts(*prefix):
                constraint.consume(list(prefix))
                out, forced_n = list(prefix), len(prefix)
                if on_token is not None:
                    on_token(list(prefix))
            elif prefix:  # not this grammar's opening after all: run the prompt alone
                rows, past = forward(prompt_ids, None, None, 0)
        else:
            rows, past = forward(prompt_ids, None, None, 0)
        logits = rows[-1]
        lookup = None
        if lookahead > 0 and top_p <= 0.0 and not self.on_device:
            lookup = reference.copy() if reference is not None else Lookup([])
            lookup.extend([*prompt_ids, *out])
        passes, mask_s = 1, 0.0
        past_len = len(prompt_ids) + len(out)
        # refused draft tokens stay in the cache, masked out (no copy of the cache); `attend` has one entry per cached
        # position once there is one (None until then), and the cache is compacted only where it would outgrow
        # the context
        attend: list[int] | None = None
        ttft = time.perf_counter() - t0 if out else 0.0
        stop = "max_tokens"
        todo: list[int] = []  # tokens the grammar forced after accepted draft tokens, not yet fed
        while len(out) < max_new:
            if time.perf_counter() > deadline:
                raise GenerationTimeout(f"no answer within {timeout_s:g} s ({len(out)} tokens written)")
            if todo:
                step, todo = todo, []
            else:
                tok = self._pick(logits, top_p, temperature, rng)
                if constraint is not None:
                    tm = time.perf_counter()
                    # greedy: when the model's own choice is allowed the mask cannot change it, so the whole mask is
                    # computed only when it is not; sampling always masks first
                    if top_p > 0.0 or not constraint.accepts(tok):
                        logits = np.where(constraint.allowed(), logits, -np.inf)
                        tok = self._pick(logits, top_p, temperature, rng)
                    mask_s += time.perf_counter() - tm
                step = [tok]
                if constraint is not None:
                    tm = time.perf_counter()
                    constraint.consume([tok])
                    ff = constraint.advance()
                    step += ff
                    forced_n += len(ff)
                    mask_s += time.perf_counter() - tm
            if not ttft:
                ttft = time.perf_counter() - t0
            stop = self._append(out, step, on_token, stop)
            if stop == "eos" or (constraint is not None and constraint.stopped()):
                stop = "eos" if stop == "eos" else "grammar"
                break
            if len(out) >= max_new or past_len + len(step) >= self.context:
                break
            drafts: list[int] = []
            if lookup is not None:
                lookup.extend(step)
                room = min(self.draft_length(lookahead), max_new - len(out), self.context - past_len - len(step))
                drafts = lookup.draft(room) if room > 0 else []
                if drafts and constraint is not None:
                    drafts = drafts[:constraint.valid_prefix(drafts)]
            if attend is not None and len(attend) + len(step) + len(drafts) > self.context:
                keep = np.flatnonzero(np.asarray(attend))  # compact: the refused positions leave the cache
                past = [np.ascontiguousarray(p[:, :, keep]) for p in past]
                attend = None
            fed = step + drafts
            mask = None if attend is None else attend + [1] * len(fed)
            rows, past = forward(fed, past, mask, past_len)
            passes += 1
            kept = 0
            if drafts:  # keep the draft tokens the model itself would have written next
                preds = np.argmax(rows[len(step) - 1:len(step) - 1 + len(drafts)], axis=1)
                while kept < len(drafts) and preds[kept] == drafts[kept]:
                    kept += 1
                self._learn(len(drafts), kept)
            if attend is not None or kept < len(drafts):  # the refused ones stay in the cache, masked out
                attend = mask if mask is not None else [1] * (past_len + len(fed))
                for i in range(len(attend) - (len(drafts) - kept), len(attend)):
                    attend[i] = 0
            logits = rows[len(step) - 1 + kept]
            past_len += len(step) + kept
            if kept:
                accepted = drafts[:kept]
                drafted_n += kept
                stop = self._append(out, accepted, on_token, stop)
                if stop == "eos":
                    break
                lookup.extend(accepted)
                if constraint is not None:
                    constraint.consume(accepted)
                    if constraint.stopped():
                        stop = "grammar"
                        break
                    todo = constraint.advance()
                    forced_n += len(todo)
        out = out[:max_new]
        total = time.perf_counter() - t0
        compile_s = constraint.compile_s if constraint is not None else 0.0
        return GenResult(out, decode(out) if decode else "", len(prompt_ids), stop, ttft, total, passes, forced_n,
                         mask_s - compile_s, drafted_n, compile_s)

    def _append(self, out: list[int], tokens: list[int], on_token, stop: str) -> str:
        """out += tokens up to the first end token; 'eos' when there was one."""
        for i, t in enumerate(tokens):
            if t in self.eos:
                out += tokens[:i]
                stop = "eos"
                break
        else:
            out += tokens
        if on_token is not None:
            on_token(tokens)
        return stop

    def close(self) -> None:
        """Stop the prompt helper thread (the session itself belongs to the caller)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _helper(self):
        if self._pool is None:
            import concurrent.futures
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="glm-prefill")
        return self._pool

    @staticmethod
    def _pick(logits: np.ndarray, top_p: float, temperature: float, rng) -> int:
        if top_p <= 0.0:
            return int(logits.argmax())
        z = logits.astype(np.float64) / max(temperature, 1e-6)
        z -= z.max()
        p = np.exp(z)
        p /= p.sum()
        order = np.argsort(-p)
        cum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cum, top_p) + 1)]
        q = p[keep] / p[keep].sum()
        return int(rng.choice(keep, p=q))
