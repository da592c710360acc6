"""The GLM's public face: load a verified model, answer questions with a checked tool call.

One inference worker thread owns the ONNX Runtime session; questions wait in a bounded queue (beyond it: `Busy`,
at once). The event loop only submits and awaits: tokenization, grammar, inference and decoding all run on the
worker. A question's time limit counts from its submission, so time spent waiting in the queue counts too.
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from edge_agent.glm import schema
from edge_agent.glm.generate import ConstraintError, GenerationTimeout, Generator, Lookup, ToolCallConstraint
from edge_agent.glm.models import ModelError, VerifiedModel, load_verified
from edge_agent.glm.points import SHIPPED, PointTable
from edge_agent.glm.runtime import RuntimeOptions, Session, open_session
from edge_agent.glm.tokenizer import GlmTokenizer, PromptError

log = logging.getLogger(__name__)


Known = Mapping[str, Sequence[str]]  # the registry: device -> its points


def _contradicted(text: str, answer: str, known: Known | None, points: PointTable = SHIPPED) -> bool:
    """The model answered clarify for a reason the question itself contradicts: "which value?" though it states a
    number, or an on/off word where no point that takes a number is named ("bump up the flow on valve-17" states
    no value for the flow: its "up" and "on" are no on/off state), or "which device?" though it names a device id
    (one the registry knows, where there is a registry). Never for "nothing" or "use_a_rule": those only ever hold
    a write back."""
    if not answer.startswith('{"tool":"clarify"'):
        return False
    if '"which_value"' in answer:
        if schema.numbers(text):
            return True
        words = set(text.lower().split())
        return bool(words & (set(schema.ON_WORDS) | set(schema.OFF_WORDS))) and \
            all(p in ("enabled", "mode") for p in points.named(text))
    if '"which_device"' in answer:
        # a device id has a letter and a digit ("pump-3", "tk101"); a bare number ("set the speed to 40") is a value
        named = [w for w in schema.candidates(text) if any(c.isdigit() for c in w) and any(c.isalpha() for c in w)]
        return any(w in known for w in named) if known else bool(named)
    return False


class Busy(Exception):
    pass


class Unavailable(Exception):
    pass


@dataclass
class Plan:
    """What the model made of one question."""
    text: str
    call: dict | None  # None when the output is not a valid call (unconstrained only)
    raw: str
    error: str | None
    prompt_tokens: int
    new_tokens: int
    forced_tokens: int
    forward_passes: int
    queue_s: float
    ttft_s: float
    total_s: float
    mask_s: float
    compile_s: float = 0.0
    drafted_tokens: int = 0
    second_look: bool = False  # the model's clarify was contradicted by the question; this is its second answer

    def timings(self) -> dict[str, Any]:
        return {"queue_ms": round(self.queue_s * 1e3, 2), "first_token_ms": round(self.ttft_s * 1e3, 2),
                "total_ms": round(self.total_s * 1e3, 2), "new_tokens": self.new_tokens,
                "forced_tokens": self.forced_tokens, "drafted_tokens": self.drafted_tokens,
                "forward_passes": self.forward_passes, "second_look": self.second_look}


def shipped_model_dir() -> Path:
    """The default model: models/ beside the package (a checkout) or under <prefix>/share (an installed wheel)."""
    import sys

    here = Path(__file__).resolve().parents[2] / "models" / "glm-edge-iot"
    for root in (here, Path(sys.prefix) / "share" / "edge-agent" / "models" / "glm-edge-iot"):
        if root.is_dir():
            versions = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: _semver(p.name))
            if versions:
                return versions[-1]
    raise ModelError("no shipped model found (models/glm-edge-iot/<version>); set model.dir", "missing")


def _semver(v: str) -> tuple:
    try:
        return tuple(int(x) for x in v.split("-")[0].split("."))
    except ValueError:
        return (-1,)


class Engine:
    def __init__(self, cfg, tools: schema.Toolset, cache_dir: Path | None = None, metrics=None,
                 available: list[str] | None = None, points: PointTable = SHIPPED,
                 keys: list[str] | None = None) -> None:
        self.cfg = cfg
        self.keys = keys or [cfg.public_key]  # the keys a model's manifest may be signed by
        self.tools = tools
        self.points = points
        self.cache_dir = cache_dir
        self.metrics = metrics
        self._available = available
        self.model: VerifiedModel | None = None
        self.session: Session | None = None
        self._q: queue.Queue = queue.Queue(maxsize=cfg.queue)
        self._thread: threading.Thread | None = None
        self._closed = False

    # ---- loading (blocking: call from a thread) ----
    def load(self, folder: Path | None = None) -> None:
        """Load a verified model: `folder`, else model.dir, else the shipped one."""
        folder = folder or (Path(self.cfg.dir) if self.cfg.dir else shipped_model_dir())
        import onnxruntime as ort

        from edge_agent.glm.runtime import PROVIDERS
        offered = ort.get_available_providers() if self._available is None else self._available
        wanted = [PROVIDERS[k] for k in self.cfg.providers if PROVIDERS[k] in offered]
        try:
            model = load_verified(folder, self.keys, providers=wanted)
        except ModelError as e:
            if self.metrics is not None:
                self.metrics.model_load_errors.labels(e.reason).inc()
            raise
        opts = RuntimeOptions(providers=list(self.cfg.providers), threads=self.cfg.threads,
                              trt_fp16=self.cfg.trt_fp16, trt_int8=self.cfg.trt_int8,
                              trt_workspace_mb=self.cfg.trt_workspace_mb, cache_dir=self.cache_dir)
        try:
            session = open_session(model, opts, self._available)
        finally:
            model.close()  # ONNX Runtime has read the graph it serves
        for r in session.reasons:  # not offered by this build: expected on a CPU box; a failure: worth a warning
            (log.info if r.expected else log.warning)("execution provider passed over", extra={"reason": str(r)})
        log.info("model loaded", extra={"model": model.name, "provider": session.provider, "file": session.file})
        self.tok = GlmTokenizer(model.blobs[model.manifest["tokenizer"]])
        import llguidance

        # slices=[]: the slicer speeds masks up for 100k-token vocabularies; for a small one it only costs time
        self.lltok = llguidance.LLTokenizer(self.tok.json, n_vocab=model.arch["vocab_size"],
                                            eos_token=self.tok.eos_id, slices=[])
        a = model.arch
        self.gen = Generator(session.sess, [self.tok.eos_id], a["context"], a["num_hidden_layers"],
                             a["num_key_value_heads"], a["head_dim"], session.provider)
        self.model, self.session = model, session
        if self.cfg.lookahead and not self.gen.on_device:
            cost = self.gen.calibrate(self.cfg.lookahead)
            log.info("lookahead calibrated", extra={"pass_cost": " ".join(f"{c:.2f}" for c in cost)})
        # the grammars an answer opens with, until it names its tool: the whole tool set, and the nameless tools
        # (a question without a usable word), compiled once
        self._openings = {}
        acting = tuple(n for n in self.tools.names if n != schema.CLARIFY.name)  # a second look (see _run)
        nameless_acting = tuple(n for n in self.tools.nameless if n != schema.CLARIFY.name)
        for tools in (self.tools.names, self.tools.nameless, acting, nameless_acting):
            grammar = llguidance.LLMatcher.grammar_from_json_schema(self.tools.subset(tools))
            self._openings[frozenset(tools)] = llguidance.LLMatcher(self.lltok, grammar, log_level=0)
        # the tokens every answer opens with (`{"tool":"`), fed with the prompt in one forward pass
        self._prefix = tuple(self._openings[frozenset(self.tools.names)].deep_copy().compute_ff_tokens())
        # where lookahead drafts an answer's keys from (besides the question)
        self.reference = Lookup([t for call in self.tools.example_calls
                                 for t in [*self.tok.tok.encode(schema.format_call(call)).ids, self.tok.eos_id]])
        self._thread = threading.Thread(target=self._work, name="glm-worker", daemon=True)
        self._thread.start()

    def smoke(self) -> tuple[list[tuple[str, Any, Any]], float]:
        """The manifest's smoke set on this machine: (the questions whose call differs from the build's fp32
        reference, as (text, got, reference)), and the slowest answer in seconds."""
        wrong, slowest = [], 0.0
        for row in self.model.manifest.get("smoke") or []:
            t0 = time.perf_counter()
            got = self.plan(row["text"], second_look=False).call  # the build's reference is the first answer
            slowest = max(slowest, time.perf_counter() - t0)
            if got != row["call"]:
                wrong.append((row["text"], got, row["call"]))
        return wrong, slowest

    def info(self) -> dict[str, Any] | None:
        if self.model is None or self.session is None:
            return None
        return {"name": self.model.manifest["name"], "version": self.model.manifest["version"],
                "provider": self.session.provider, "file": self.session.file,
                "passed_over": [str(r) for r in self.session.reasons]}

    # ---- questions ----
    def submit(self, text: str, *, constrained: bool = True, timeout_s: float | None = None,
               known: Known | None = None, second_look: bool | None = None) -> concurrent.futures.Future:
        """Queue a question. `known`: the gateway's registry (device -> its points) the answer must name from
        (Toolset.narrowed)."""
        if self.model is None or self._closed:
            raise Unavailable("no model is loaded")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        deadline = time.perf_counter() + (timeout_s or self.cfg.timeout_s)
        try:
            look = self.cfg.second_look if second_look is None else second_look
            self._q.put_nowait((text, constrained, deadline, time.perf_counter(), fut, known, look))
        except queue.Full:
            self._count("busy")
            raise Busy(f"{self.cfg.queue} questions are waiting for the model; retry") from None
        if self.metrics is not None:
            self.metrics.glm_queue.set(self._q.qsize())
        return fut

    def plan(self, text: str, *, constrained: bool = True, timeout_s: float | None = None,
             known: Known | None = None, second_look: bool | None = None) -> Plan:
        """Blocking convenience (CLI, benchmarks). second_look=False: the model's first answer only."""
        return self.submit(text, constrained=constrained, timeout_s=timeout_s, known=known,
                           second_look=second_look).result()

    async def ask(self, text: str, *, timeout_s: float | None = None, known: Known | None = None) -> Plan:
        import asyncio

        return await asyncio.wrap_future(self.submit(text, timeout_s=timeout_s, known=known))

    def close(self) -> None:
        self._closed = True
        if self._thread is not None:
            self._q.put(None)
            self._thread.join(timeout=10)
            if not self._thread.is_alive():
                self.gen.close()

    # ---- the worker ----
    def _work(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            text, constrained, deadline, t_in, fut, known, look = item
            if self.metrics is not None:
                self.metrics.glm_queue.set(self._q.qsize())
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                plan = self._run(text, constrained, deadline, t_in, known, look)
            except PromptError as e:
                self._count("bad_input")
                fut.set_exception(e)
            except GenerationTimeout as e:
                self._count("timeout")
                fut.set_exception(e)
            except ConstraintError as e:
                self._count("no_call")
                fut.set_exception(e)
            except Exception as e:  # noqa: BLE001 - one bad question never stops the worker
                log.exception("GLM request failed")
                self._count("error")
                fut.set_exception(e)
            else:
                self._count("ok")
                if self.metrics is not None:
                    self.metrics.glm_seconds.observe(plan.queue_s + plan.total_s)
                    self.metrics.glm_tokens.labels("sampled").inc(plan.new_tokens - plan.forced_tokens
                                                                  - plan.drafted_tokens)
                    self.metrics.glm_tokens.labels("forced").inc(plan.forced_tokens)
                    self.metrics.glm_tokens.labels("drafted").inc(plan.drafted_tokens)
                fut.set_result(plan)

    def _run(self, text: str, constrained: bool, deadline: float, t_in: float, known: Known | None,
             look: bool = True) -> Plan:
        t0 = time.perf_counter()
        if t0 > deadline:
            raise GenerationTimeout("the question waited in the queue past its time limit")
        ids = self.tok.encode_prompt(text)
        room = self.model.arch["context"] - 48  # an answer needs up to ~48 tokens of the context
        if len(ids) > room:
            raise PromptError(f"the question is {len(ids)} tokens; at most {room} fit with an answer")
        t_gen = time.perf_counter()
        res = self._generate(ids, t0, deadline, (lambda: self._constraint(text, known)) if constrained else None)
        passes, second = res.forward_passes, False
        if constrained and look and _contradicted(text, res.text, known, self.points):
            # the model said "which value?" of a question that states one, or "which device?" of one that names a
            # device it may copy: it looks again with the tools that act (the guard and the registry check what it
            # proposes then, as they check any call)
            res = self._generate(ids, t0, deadline, lambda: self._constraint(text, known, acting=True))
            passes += res.forward_passes
            second = True
        call, error = None, None
        try:
            call = self.tools.validate(json.loads(res.text))
        except (ValueError, schema.InvalidCall) as e:
            error = f"the model's output is not a valid call: {e}"[:200]
        if constrained and error is not None:
            if res.stop == "max_tokens":
                raise ConstraintError(f"the model used its token budget ({self.cfg.max_new_tokens}) without "
                                      "finishing a call")
            raise ConstraintError(f"constrained output failed validation: {error}")  # the grammar is the contract
        return Plan(text, call, res.text, error, res.prompt_tokens, len(res.ids), res.forced_tokens,
                    passes, t0 - t_in, (t_gen - t0) + res.ttft_s, time.perf_counter() - t0, res.mask_s,
                    res.compile_s, res.drafted_tokens, second)

    def _generate(self, ids: list[int], t0: float, deadline: float, constraint):
        return self.gen.generate(ids, max_new_tokens=self.cfg.max_new_tokens, timeout_s=deadline - t0,
                                 constraint=constraint, decode=self.tok.decode,
                                 prefix=self._prefix if constraint is not None else (), lookahead=self.cfg.lookahead,
                                 reference=self.reference)

    def _constraint(self, text: str, known: Known | None = None, acting: bool = False) -> ToolCallConstraint:
        """The question's grammar: the tool set's until the answer names its tool, then that tool's call narrowed
        to the question (schema.Narrowing: only that tool's grammar is built)."""
        import llguidance

        narrowing = schema.Narrowing(self.tools, text, self.points, known)
        names = [n for n in narrowing.names if not acting or n != schema.CLARIFY.name]
        opening = self._openings[frozenset(names)]

        def narrow(tool: str) -> str:
            return llguidance.LLMatcher.grammar_from_json_schema({"x-guidance": schema.FORMAT,
                                                                  "anyOf": [narrowing.tool(tool)]})

        return ToolCallConstraint(self.lltok, opening, narrow, self.tok.decode, self.model.arch["vocab_size"])

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.glm_requests.labels(outcome).inc()

