"""The GLM runtime on the shipped model (CPU EP): reference outputs, verification, bounds, provider choice."""
from __future__ import annotations

import base64
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.config import ModelConfig
from edge_agent.ops import TOOLSET
from edge_agent.glm import schema
from edge_agent.glm.engine import Busy, Engine, shipped_model_dir
from edge_agent.glm.generate import GenerationTimeout
from edge_agent.glm.models import ModelError, load_verified
from edge_agent.glm.runtime import RuntimeOptions, open_session, provider_options, trt_profiles
from edge_agent.glm.tokenizer import PromptError
from edge_agent.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = {
    "what is the average temperature of pump-3 over the last hour":
        {"tool": "query_stats", "args": {"device": "pump-3", "point": "temperature", "agg": "avg", "window_s": 3600}},
    "current temp of boiler_2?":
        {"tool": "query_stats", "args": {"device": "boiler_2", "point": "temperature", "agg": "last", "window_s": 60}},
    "max pressure on line2_press4 today":
        {"tool": "query_stats", "args": {"device": "line2_press4", "point": "pressure", "agg": "max",
                                         "window_s": 86400}},
    "turn off fan_7": {"tool": "write_point", "args": {"device": "fan_7", "point": "enabled", "value": False}},
    "set boiler-2 setpoint to 72.5 now":
        {"tool": "write_point", "args": {"device": "boiler-2", "point": "setpoint", "value": 72.5}},
    "please set fan_7 speed to two hundred and forty":
        {"tool": "write_point", "args": {"device": "fan_7", "point": "speed", "value": 240}},
    "max vibration on kiln-4 over the last forty nine minutes":
        {"tool": "query_stats", "args": {"device": "kiln-4", "point": "vibration", "agg": "max", "window_s": 2940}},
    "count pressure readings of line2_press4 in the last half hour":
        {"tool": "query_stats", "args": {"device": "line2_press4", "point": "pressure", "agg": "count",
                                         "window_s": 1800}},
    "list all pumps": {"tool": "list_devices", "args": {"filter": "pump"}},
    "show all devices": {"tool": "list_devices", "args": {"filter": None}},
    "how are you": {"tool": "status", "args": {}},
}


@pytest.fixture(scope="module")
def engine():
    e = Engine(ModelConfig(providers=["cpu"]), TOOLSET, metrics=Metrics())
    e.load()
    yield e
    e.close()


def test_shipped_model_gives_the_reference_calls(engine):
    assert engine.info()["provider"] == "cpu" and engine.info()["name"] == "glm-edge-iot"
    for text, call in REFERENCE.items():
        plan = engine.plan(text)
        assert plan.call == call, text
        assert plan.raw == schema.format_call(call)  # canonical spelling, byte for byte
        assert plan.forced_tokens > 0 and plan.forward_passes < plan.new_tokens  # fast-forward took effect


def test_constrained_output_is_always_a_valid_call(engine):
    rng = np.random.default_rng(7)
    alphabet = list("abcdefghijklmnopqrstuvwxyz0123456789 -_?!.,:'\"{}[]\\/²µé中٣")
    alphabet += ["pump", " set ", " to ", "°C"]
    for _ in range(40):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(1, 60)))).strip() or "x"
        plan = engine.plan(text)
        TOOLSET.validate(plan.call)  # raises if not
        for key in ("device", "filter"):  # names are spelt as in the question, never invented
            v = plan.call["args"].get(key)
            assert v is None or v in text, (text, plan.raw)
        v = plan.call["args"].get("value")
        if isinstance(v, (int, float)) and not isinstance(v, bool):  # nor are numbers
            assert v in schema.numbers(text), (text, plan.raw)
        if "window_s" in plan.call["args"]:
            assert plan.call["args"]["window_s"] in schema.windows(text), (text, plan.raw)


def test_numbers_and_windows_are_read_from_the_question():
    n, w = schema.numbers, schema.windows
    assert n("set pump-7 to -23") == [-23]  # the name's digits and dash are the name's
    assert n("line1_boiler2 setpoint 67.44, then 1,500") == [67.44, 1500]
    assert n("bring it to nine hundred forty-six") == [946]
    assert n("two hundred and forty units") == [240]
    assert n("fivve hundred and twenty one") == [521]  # one slipped letter in a long number word
    assert n("one two, twenty thirty") == [1, 2, 20, 30]
    assert n("sixty two point five") == [62.5] and n("minus twelve") == [-12] and n("minus 5 degrees") == [-5]
    assert n("list all pumps") == []
    # English words one letter from a number word are words: "sixty right now" is 60, never 68 (a wrong write)
    assert n("set fan-2 speed to sixty right now") == [60] and n("set it to 3 right now") == [3]
    assert n("is there any alarm") == [] and n("the fifth pump last night") == [] and n("set the light to 5") == [5]
    assert n("fifty two point five right now") == [52.5]
    assert w("avg temp of kiln-4 over the past 19 days") == [19 * 86400]
    assert w("the last forty-nine m") == [2940] and w("in the last 23m") == [1380]
    assert w("last 5 huors") == [18000] and w("over the last 90 seconds") == [90]
    assert w("in the last hour") == [3600] and w("this week") == [604800] and w("today") == [86400]
    assert w("over the last day") == [86400] and w("in the past min") == [60] and not schema._windows("what day is it")[1]
    assert w("over the past quarter hour") == [900] and w("last half an hour") == [1800]
    assert w("what does pump-3 say for the hour meter") == [3600]
    # no window stated: the conventions, and any number the question has times any unit, for the model to pick
    assert w("temp of pump-3") == list(schema.CONVENTIONAL_WINDOWS)
    assert {5, 300, 18000, 60, 3600} <= set(w("pump-3 temp, 5"))
    # the grammar holds them: a setpoint the operator did not say cannot be written
    def args(text: str, tool: str) -> dict:
        return next(b for b in TOOLSET.narrowed(text)["anyOf"]
                    if b["properties"]["tool"]["const"] == tool)["properties"]["args"]["properties"]

    value = args("please set fan_7 speed to two hundred and forty", "write_point")["value"]
    assert value["anyOf"][0] == {"enum": [240]}
    assert all("enum" not in alt or all(isinstance(x, str) for x in alt["enum"])
               for alt in args("turn on fan_7", "write_point")["value"]["anyOf"])
    filters = args("list all pumps and the press", "list_devices")
    assert "pump" in filters["filter"]["anyOf"][0]["enum"] and "pumps" not in filters["filter"]["anyOf"][0]["enum"]
    assert "press" in filters["filter"]["anyOf"][0]["enum"]
    filters = args("list all buses and switches", "list_devices")
    assert {"bus", "switch"} <= set(filters["filter"]["anyOf"][0]["enum"])
    assert not {"buses", "buse", "switches", "switche"} & set(filters["filter"]["anyOf"][0]["enum"])


def test_bad_questions_are_refused_clearly(engine):
    for text, why in (("", "empty"), ("x" * 300, "at most 256"), ("<|assistant|> status", "reserved marker"),
                      ("7" * 250, "tokens; at most 144 fit")):
        with pytest.raises(PromptError, match=why):
            engine.plan(text)
    assert engine.metrics.value("edge_agent_glm_requests_total", {"outcome": "bad_input"}) == 4
    assert engine.plan("status").call == {"tool": "status", "args": {}}  # and the worker goes on


def _blocked(engine):
    gate = threading.Event()
    real = engine._run

    def slow(*a, **kw):
        gate.wait(10)
        return real(*a, **kw)

    engine._run = slow
    return gate, real


def test_queue_bound_answers_busy_and_time_limit_counts_queue_wait():
    e = Engine(ModelConfig(providers=["cpu"], queue=1, timeout_s=0.3), TOOLSET, metrics=Metrics())
    e.load()
    try:
        gate, real = _blocked(e)
        first = e.submit("status")  # taken by the worker, which now waits on the gate
        time.sleep(0.1)
        second = e.submit("list all pumps")  # waits in the queue (bound 1)
        with pytest.raises(Busy, match="1 questions are waiting"):
            e.submit("status")
        assert e.metrics.value("edge_agent_glm_requests_total", {"outcome": "busy"}) == 1
        time.sleep(0.4)  # both pass their 0.3 s limit while blocked
        gate.set()
        with pytest.raises(GenerationTimeout):
            first.result(5)
        with pytest.raises(GenerationTimeout, match="waited in the queue"):
            second.result(5)
        e._run = real
        assert e.plan("status", timeout_s=5).call["tool"] == "status"
        assert e.metrics.value("edge_agent_glm_requests_total", {"outcome": "timeout"}) == 2
    finally:
        e.close()


def test_provider_fallback_picks_cpu_and_says_why():
    model = load_verified(shipped_model_dir(), ModelConfig().public_key)
    opts = RuntimeOptions(providers=["tensorrt", "cuda", "cpu"])
    s = open_session(model, opts, available=["CPUExecutionProvider"])
    assert s.provider == "cpu" and s.file == "model.int8.onnx"
    assert [str(r) for r in s.reasons] == ["tensorrt: not offered by this onnxruntime build",
                                           "cuda: not offered by this onnxruntime build"]
    assert all(r.expected for r in s.reasons)
    # offered by name but unusable here (no GPU): onnxruntime falls back, and we say so
    import onnxruntime as ort
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        s = open_session(model, RuntimeOptions(providers=["cuda", "cpu"]),
                         available=["CUDAExecutionProvider", "CPUExecutionProvider"])
        assert s.provider == "cpu" and s.reasons and str(s.reasons[0]).startswith("cuda: ")
        assert not s.reasons[0].expected
    with pytest.raises(RuntimeError, match="no execution provider"):
        open_session(model, RuntimeOptions(providers=["tensorrt"]), available=["CPUExecutionProvider"])


def test_provider_options(tmp_path):
    arch = {"context": 192, "num_key_value_heads": 1, "head_dim": 32, "num_hidden_layers": 2}
    prof = trt_profiles(arch)
    assert prof["trt_profile_min_shapes"].startswith("input_ids:1x1,attention_mask:1x1,position_ids:1x1,")
    assert "past_key_values.1.value:1x1x0x32" in prof["trt_profile_min_shapes"]
    assert "input_ids:1x192,attention_mask:1x383" in prof["trt_profile_max_shapes"]
    assert "past_key_values.0.key:1x1x191x32" in prof["trt_profile_max_shapes"]
    assert prof["trt_profile_max_shapes"].count("past_key_values") == 4
    o = provider_options("tensorrt", RuntimeOptions(["tensorrt"], cache_dir=tmp_path, trt_workspace_mb=256), arch,
                         "ab" * 32)
    # engines are keyed by the graph's content, never by its file name: a retrained model cannot run an old engine
    assert o["trt_engine_cache_enable"] and o["trt_engine_cache_path"] == str(tmp_path / "trt-engines" / ("ab" * 16))
    other = provider_options("tensorrt", RuntimeOptions(["tensorrt"], cache_dir=tmp_path), arch, "cd" * 32)
    assert other["trt_engine_cache_path"] != o["trt_engine_cache_path"]
    assert o["trt_timing_cache_enable"] and o["trt_timing_cache_path"] == str(tmp_path / "trt-timing")
    assert o["trt_fp16_enable"] and o["trt_int8_enable"] and o["trt_max_workspace_size"] == 256 << 20
    o = provider_options("tensorrt", RuntimeOptions(["tensorrt"], trt_fp16=False), arch)
    assert not o["trt_fp16_enable"] and not o["trt_engine_cache_enable"] and "trt_engine_cache_path" not in o
    assert provider_options("cuda", RuntimeOptions(["cuda"], device_id=1), arch)["device_id"] == 1
    assert provider_options("cpu", RuntimeOptions(["cpu"]), arch) == {}


# ---- verification: nothing reaches ONNX Runtime unless the manifest verifies and every file matches


def _copy(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    shutil.copytree(shipped_model_dir(), d)
    return d


def _resign(folder: Path, key: Ed25519PrivateKey, edit) -> str:
    m = json.loads((folder / "manifest.json").read_text())
    edit(m)
    body = json.dumps(m).encode()
    (folder / "manifest.json").write_bytes(body)
    (folder / "manifest.sig").write_text(base64.b64encode(key.sign(body)).decode())
    return base64.b64encode(key.public_key().public_bytes(serialization.Encoding.Raw,
                                                          serialization.PublicFormat.Raw)).decode()


def test_the_runtime_serves_the_file_it_verified_and_holds_no_copy_of_the_graph(tmp_path):
    """ONNX Runtime opens the verified inode (/proc/self/fd), not the path again: a file swapped in after the check
    is never served; a graph file anyone may write is refused; the graph's bytes are not kept."""
    from edge_agent.glm.runtime import RuntimeOptions, open_session

    pub = ModelConfig().public_key
    d = _copy(tmp_path)
    model = load_verified(d, pub, providers=["CPUExecutionProvider"])
    assert set(model.blobs) == {"tokenizer.json"} and set(model.fds) == {"model.int8.onnx"}  # no GPU graph read
    good = (d / "model.int8.onnx").read_bytes()
    swapped = d / "swapped"
    blob = bytearray(good)
    blob[: len(blob) // 2] = bytes(len(blob) // 2)  # a broken graph at the same path, after the check
    swapped.write_bytes(bytes(blob))
    os.replace(swapped, d / "model.int8.onnx")
    session = open_session(model, RuntimeOptions(["cpu"], 1))  # opens, because it reads what was verified
    assert session.file == "model.int8.onnx"
    model.close()
    assert model.fds == {}
    with pytest.raises(ModelError, match="sha256 does not match"):
        load_verified(d, pub)  # the swapped file itself never passes
    d = _copy(tmp_path / "w")
    os.chmod(d / "model.int8.onnx", 0o666)
    with pytest.raises(ModelError, match="writable by anyone") as e:
        load_verified(d, pub)
    assert e.value.reason == "path"


def test_tampered_models_are_refused(tmp_path):
    pub = ModelConfig().public_key
    d = _copy(tmp_path)
    load_verified(d, pub)  # the copy itself is fine
    blob = bytearray((d / "model.int8.onnx").read_bytes())
    blob[len(blob) // 2] ^= 1
    (d / "model.int8.onnx").write_bytes(bytes(blob))
    with pytest.raises(ModelError, match="model.int8.onnx: sha256 does not match"):
        load_verified(d, pub)
    d = _copy(tmp_path / "b")
    (d / "manifest.json").write_text((d / "manifest.json").read_text().replace(f'"{shipped_model_dir().name}"', '"9.9.9"'))
    with pytest.raises(ModelError, match="signature does not verify"):
        load_verified(d, pub)
    d = _copy(tmp_path / "c")
    other = Ed25519PrivateKey.generate()
    other_pub = _resign(d, other, lambda m: None)  # a well-formed manifest signed by someone else
    with pytest.raises(ModelError, match="signature does not verify"):
        load_verified(d, pub)
    load_verified(d, other_pub)  # which verifies with that one's key only
    with pytest.raises(ModelError, match="not a base64 Ed25519 public key"):
        load_verified(d, "not-a-key")
    d = _copy(tmp_path / "d")
    (d / "tokenizer.json").unlink()
    with pytest.raises(ModelError, match="tokenizer.json: missing"):
        load_verified(d, pub)
    d = _copy(tmp_path / "e")
    os.symlink("/etc/hostname", d / "escape")
    pub2 = _resign(d, other, lambda m: m["files"].__setitem__("../escape", {"sha256": "0" * 64, "size": 1}))
    with pytest.raises(ModelError, match="not a plain name"):
        load_verified(d, pub2)
    # a FIFO in place of manifest.sig or of a listed file (or a symlink) is refused at once, never waited on
    for victim in ("manifest.sig", "model.int8.onnx", "tokenizer.json"):
        for name, make in (("f", lambda p: os.mkfifo(p)), ("g", lambda p: os.symlink("/dev/zero", p))):
            d = _copy(tmp_path / f"{name}-{victim}")
            (d / victim).unlink()
            make(d / victim)
            t = time.monotonic()
            with pytest.raises(ModelError) as e:
                load_verified(d, pub)
            assert e.value.reason == "missing" and time.monotonic() - t < 2


def test_external_data_outside_the_folder_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    d = _copy(tmp_path)
    w = helper.make_tensor("w", TensorProto.FLOAT, [1], [0.0])
    w.data_location = TensorProto.EXTERNAL
    del w.float_data[:]
    for k, v in (("location", "../../secret.bin"), ("offset", "0"), ("length", "4")):
        w.external_data.add(key=k, value=v)
    g = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], [w])
    onnx.save(helper.make_model(g), str(d / "evil.onnx"))
    import hashlib
    data = (d / "evil.onnx").read_bytes()
    key = Ed25519PrivateKey.generate()

    def edit(m):
        m["files"]["evil.onnx"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        m["providers"]["CPUExecutionProvider"] = "evil.onnx"

    pub = _resign(d, key, edit)
    with pytest.raises(ModelError, match="external data '../../secret.bin'"):
        load_verified(d, pub)


def test_engine_counts_a_refused_model(tmp_path):
    d = _copy(tmp_path)
    (d / "model.int8.onnx").write_bytes(b"garbage")
    m = Metrics()
    with pytest.raises(ModelError):
        Engine(ModelConfig(dir=str(d), providers=["cpu"]), TOOLSET, metrics=m).load()
    assert m.value("edge_agent_model_load_errors_total", {"reason": "digest"}) == 1


def test_cli_ask(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "edge_agent", "ask", "--dry-run", "--config", "/nonexistent",
                          "turn off fan_7"], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip()) == REFERENCE["turn off fan_7"]
    # without --dry-run the question goes to the running daemon; with none running: one line, non-zero, no store made
    cfg = tmp_path / "c.toml"
    state = tmp_path / "state"
    cfg.write_text(f'[gateway]\nstate_dir = "{state}"\n[uplink]\nenabled = false\n')
    for argv in (["ask", "list all pumps"], ["op", "alerts.list"]):
        out = subprocess.run([sys.executable, "-m", "edge_agent", *argv, "--config", str(cfg)],
                             capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode == 3 and out.stdout == "", out
        assert out.stderr.count("\n") == 1 and "no edge agent is running" in out.stderr
    assert not state.exists()


def test_top_p_sampling_streams_and_stays_in_the_grammar(engine):
    ids = engine.tok.encode_prompt("max pressure on line2_press4 today")
    runs = []
    for seed in (1, 1, 2):
        streamed: list[int] = []
        r = engine.gen.generate(ids, max_new_tokens=96, timeout_s=10, top_p=0.9, temperature=1.5, seed=seed,
                                constraint=engine._constraint("max pressure on line2_press4 today"),
                                on_token=streamed.extend, decode=engine.tok.decode)
        assert [t for t in streamed if t != engine.tok.eos_id] == r.ids  # the stream is the answer
        TOOLSET.validate(json.loads(r.text))
        runs.append(r.text)
    assert runs[0] == runs[1]  # a seed reproduces its sample
    r = engine.gen.generate(ids, max_new_tokens=5, timeout_s=10, decode=engine.tok.decode)
    assert r.stop == "max_tokens" and len(r.ids) == 5  # unconstrained, bounded
    with pytest.raises(GenerationTimeout):
        engine.gen.generate(ids, max_new_tokens=50, timeout_s=0.0)


def test_lookahead_writes_the_greedy_answer_in_fewer_passes(engine):
    from edge_agent.glm.generate import Lookup

    lk = Lookup([5, 6, 7, 8, 9, 6, 7])
    assert lk.draft(3) == [8, 9, 6]  # "6 7" was followed by "8 9 6" before
    lk.extend([1])
    assert lk.draft(3) == []  # nothing ever followed 1
    # drafts as configured: whether they pay on this machine is measured at load (and has its own test below); on a
    # loaded machine the measured costs can say they do not, and this test is about what drafting does
    saved = engine.gen.pass_cost, engine.gen._kept
    engine.gen.pass_cost, engine.gen._kept = [1.0] * 6, [0.8] * 5
    try:
        _lookahead_checks(engine)
    finally:
        engine.gen.pass_cost, engine.gen._kept = saved


def _lookahead_checks(engine) -> None:
    passes = {0: 0, 4: 0}
    for text, call in REFERENCE.items():
        ids = engine.tok.encode_prompt(text)
        answers = {}
        for k in passes:
            streamed: list[int] = []
            r = engine.gen.generate(ids, max_new_tokens=96, timeout_s=10, lookahead=k, reference=engine.reference,
                                    on_token=streamed.extend, decode=engine.tok.decode)
            assert r.stop == "eos" and [t for t in streamed if t != engine.tok.eos_id] == r.ids
            answers[k] = r.text
            passes[k] += r.forward_passes
        assert answers[0] == answers[4], text  # the same answer, token for token
    assert passes[4] < 0.6 * passes[0], passes
    before = engine.metrics.value("edge_agent_glm_tokens_total", {"how": "drafted"}) or 0
    plan = engine.plan("set boiler-2 setpoint to 72.5 now", constrained=False)  # the engine looks ahead by default
    assert plan.call == REFERENCE["set boiler-2 setpoint to 72.5 now"] and plan.drafted_tokens > 0
    assert plan.timings()["drafted_tokens"] == plan.drafted_tokens
    assert engine.metrics.value("edge_agent_glm_tokens_total", {"how": "drafted"}) == before + plan.drafted_tokens
    for k in (1, 4, 32):  # drafts never carry an answer past its token budget
        r = engine.gen.generate(engine.tok.encode_prompt("list all pumps"), max_new_tokens=7, timeout_s=10,
                                lookahead=k, reference=engine.reference)
        assert r.stop == "max_tokens" and len(r.ids) == 7


def test_the_answer_grammar_narrows_once_the_tool_is_named(engine):
    text = "set fan_7 speed to 240"

    def fits(call: dict) -> bool:
        c = engine._constraint(text)
        ids = engine.lltok.tokenize_str(schema.format_call(call)) + [engine.tok.eos_id]
        k = next(k for k in range(len(ids)) if engine.tok.decode(ids[:k]).startswith('{"tool":"write_point"'))
        c.consume(ids[:k])  # the tool set's grammar takes any tool's name ...
        assert c.tool == "write_point"
        return c.valid_prefix(ids[k:]) == len(ids) - k  # ... then only this question's write_point calls

    call = {"tool": "write_point", "args": {"device": "fan_7", "point": "speed", "value": 240}}
    assert fits(call)
    assert not fits({**call, "args": {**call["args"], "value": 250}})  # a number the operator did not say
    assert not fits({**call, "args": {**call["args"], "device": "fan_8"}})  # a device the operator did not name
    nameless = engine._constraint("??")
    opening = engine.lltok.tokenize_str('{"tool":"')
    assert nameless.accepts(*engine.lltok.tokenize_str('{"tool":"status"'))
    assert not nameless.accepts(*opening, *engine.lltok.tokenize_str('query')[:1])


_WORDS = ["set", "to", "minus", "point", "and", "-", "hundred", "thousand", "forty", "fourty", "nine", "m", "hours",
          "hlaf", "quarter", "hour", "today", "pump-7", "line1_boiler2", "1,500", "-23", "67.44", "23m", "1e400", "∞",
          "9" * 40, "0.0000001", "?", "…", "\u0000", "\"", "\\"]


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=schema.MAX_TEXT_CHARS),
                 st.lists(st.sampled_from(_WORDS), max_size=40).map(" ".join)))
def test_any_question_gets_a_bounded_grammar_that_compiles(text):
    import llguidance

    said, wins = schema.numbers(text), schema.windows(text)
    assert len(said) <= schema.MAX_NUMBERS and all(abs(v) <= 1e9 for v in said)
    assert wins and all(1 <= w <= schema.MAX_WINDOW_S for w in wins)
    error = llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_json_schema(
        TOOLSET.narrowed(text)))
    assert error == "", error


def test_generator_runs_on_the_public_session_api_too(engine):
    from edge_agent.glm.generate import Generator

    class Public:  # an onnxruntime whose session has no private `_sess`: the public `run` serves
        def __init__(self, sess):
            self.run = sess.run

    a = engine.model.arch
    gen = Generator(Public(engine.session.sess), [engine.tok.eos_id], a["context"], a["num_hidden_layers"],
                    a["num_key_value_heads"], a["head_dim"])
    ids = engine.tok.encode_prompt("turn off fan_7")
    ours = gen.generate(ids, max_new_tokens=96, timeout_s=10, decode=engine.tok.decode)
    assert json.loads(ours.text) == REFERENCE["turn off fan_7"]
    assert ours.text == engine.gen.generate(ids, max_new_tokens=96, timeout_s=10, decode=engine.tok.decode).text


def test_a_refused_draft_is_masked_out_of_the_cache_not_copied_and_answers_stay_the_same(engine):
    """Refused draft tokens stay in the KV cache with attention mask 0: the next pass sees exactly what a cut cache
    would give; where holes would outgrow the context, the cache is compacted; the answers are the greedy ones."""
    gen = engine.gen
    ids = engine.tok.encode_prompt("set boiler-2 setpoint to 72.5 now")
    rows_a, past = gen._forward_cpu(ids, None, None, 0)
    nxt = int(rows_a[-1].argmax())
    # a pass with two wrong draft tokens after the real one, then the next token: over the holed cache ...
    _, holed = gen._forward_cpu([nxt, 7, 8], past, None, len(ids))
    mask = [1] * (len(ids) + 1) + [0, 0] + [1]
    rows_h, _ = gen._forward_cpu([5], holed, mask, len(ids) + 1)
    # ... and over the same cache cut after the real token (a copy: what refused drafts cost before)
    clean = [np.ascontiguousarray(p[:, :, :len(ids) + 1]) for p in holed]
    rows_c, _ = gen._forward_cpu([5], clean, None, len(ids) + 1)
    np.testing.assert_allclose(rows_h[-1], rows_c[-1], rtol=1e-4, atol=1e-4)
    # drafts that are always wrong: holes everywhere; a small context forces compactions; the answer is unchanged
    from edge_agent.glm.generate import Lookup
    wrong = Lookup([t for t in range(3, 200)] * 2)
    saved = gen.context, gen.pass_cost, list(gen._kept)
    try:
        gen.pass_cost, gen._kept = [1.0] * 5, [1.0] * 4  # drafting always looks worth it
        for ctx in (saved[0], len(ids) + 30):
            gen.context = ctx
            a = gen.generate(ids, max_new_tokens=96, timeout_s=10, lookahead=4, reference=wrong)
            b = gen.generate(ids, max_new_tokens=96, timeout_s=10, lookahead=0)
            assert a.ids == b.ids and a.stop == b.stop
    finally:
        gen.context, gen.pass_cost, gen._kept = saved


def test_lookahead_drafts_only_where_this_machine_makes_it_pay(engine):
    """The draft length comes from the measured cost of a wider pass and how often drafts were kept: where a pass
    of 1+k tokens costs more than the tokens it can be expected to keep, no drafts (one pass in 32 still measures)."""
    gen = engine.gen
    assert len(gen.pass_cost) == engine.cfg.lookahead + 1 and gen.pass_cost[0] == 1.0  # calibrated at load
    saved = gen.pass_cost, list(gen._kept), gen._explore
    try:
        gen._kept = [0.9, 0.9, 0.9, 0.9]
        gen.pass_cost = [1.0, 1.05, 1.1, 1.15, 1.2]  # drafting is nearly free: all four
        assert gen.draft_length(4) == 4
        gen.pass_cost = [1.0, 1.5, 2.5, 3.5, 4.5]  # each draft costs more than it keeps, but one
        assert gen.draft_length(4) == 1
        gen._kept = [0.2, 0.2, 0.2, 0.2]
        picks = [gen.draft_length(4) for _ in range(64)]
        assert picks.count(0) == 62 and picks.count(4) == 2  # off, but for the measuring passes
        ids = engine.tok.encode_prompt("set boiler-2 setpoint to 72.5 now")
        gen._kept = [0.0] * 4
        gen.pass_cost = [1.0, 9.0, 9.0, 9.0, 9.0]
        gen._explore = 1  # no measuring pass in this short answer
        off = gen.generate(ids, max_new_tokens=96, timeout_s=10, lookahead=4, reference=engine.reference)
        plain = gen.generate(ids, max_new_tokens=96, timeout_s=10, lookahead=0)
        assert off.ids == plain.ids and off.drafted_tokens == 0 and off.forward_passes == plain.forward_passes
    finally:
        gen.pass_cost, gen._kept, gen._explore = saved


def _margin(engine, text: str) -> float:
    """The smallest lead, in logits, of each token the constrained greedy answer chose over the best other token
    its grammar allowed there (forced tokens skipped), by one forward pass over the whole answer."""
    ids = engine.tok.encode_prompt(text)
    r = engine.gen.generate(ids, max_new_tokens=96, timeout_s=10, constraint=lambda: engine._constraint(text),
                            decode=engine.tok.decode, prefix=engine._prefix, lookahead=0)
    rows, _ = engine.gen._forward_cpu(ids + r.ids, None, None, 0)
    c = engine._constraint(text)
    worst = float("inf")
    for j, tok in enumerate(r.ids):
        mask = c.allowed()
        if mask.sum() > 1:
            logits = rows[len(ids) + j - 1].astype(np.float64)
            others = np.where(mask, logits, -np.inf)
            others[tok] = -np.inf
            worst = min(worst, float(logits[tok] - others.max()))
        c.consume([tok])
    return worst


def test_the_pinned_answers_are_not_near_ties(engine):
    """The calls pinned above hold on every CPU only if no step of them is a near-tie that another CPU's rounding
    could flip: each chosen token leads the next allowed one by a clear margin (here, of several logits; INT8
    rounding differences between CPUs move logits by hundredths). A future model that makes one a near-tie fails
    here, with the input named, instead of flaking on some other machine."""
    for text in REFERENCE:
        assert _margin(engine, text) > 2.0, text


def test_int8_answers_agree_with_the_fp32_reference_on_this_cpu():
    """CPU independence: the model folder's reference.jsonl holds the fp32 model's constrained call for every
    evaluation question (hand-written and generated held-out), made at build time. On this CPU, whatever its
    instruction set, the INT8 model must agree on >= 99.5 % (7-bit weights: no kernel saturates on AVX2, VNNI or
    ARM; see models/recipe/package.py). One token a pass (lookahead 0): lookahead's draft length adapts to measured
    pass costs, so near-ties would make the count depend on the machine's load and on the tests run before
    (tests/bench/lookahead_agreement.py measures that apart)."""
    ref = [json.loads(line) for line in (shipped_model_dir() / "reference.jsonl").read_text().splitlines()]
    assert len(ref) >= 1300
    engine = Engine(ModelConfig(providers=["cpu"], lookahead=0), TOOLSET, metrics=Metrics())
    engine.load()
    try:
        differ = [(r["text"], c) for r in ref if (c := engine.plan(r["text"], second_look=False).call) != r["call"]]
    finally:
        engine.close()
    assert len(differ) <= 0.005 * len(ref), differ[:5]


def test_the_external_data_scan_streams_and_sees_a_reference_across_a_block_boundary(tmp_path):
    from edge_agent.glm.models import _mentions

    for at in (0, (1 << 22) - 4, (1 << 22) - 8, 1 << 22, (3 << 22) - 3):
        p = tmp_path / f"f{at}"
        data = bytearray(3 << 22)
        data[at:at + 8] = b"location"
        p.write_bytes(bytes(data))
        fd = os.open(p, os.O_RDONLY)
        try:
            assert _mentions(fd, b"location"), at
        finally:
            os.close(fd)
    p = tmp_path / "none"
    p.write_bytes(b"locatio" + bytes(1 << 22) + b"n")
    fd = os.open(p, os.O_RDONLY)
    try:
        assert not _mentions(fd, b"location")
    finally:
        os.close(fd)


_LOAD_PEAK = r"""
import sys
from pathlib import Path
from edge_agent.glm import runtime
from edge_agent.glm.models import VerifiedModel, _stamp
import onnxruntime  # noqa: F401 - its own memory is not the session's
import os
status = lambda: {l.split(":")[0]: int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("Vm")}
before = status()["VmRSS"]
f = Path(sys.argv[1])
m = VerifiedModel(f.parent, {"providers": {"CPUExecutionProvider": f.name}, "files": {f.name: {"sha256": ""}},
                            "architecture": {}}, {}, stamps={f.name: _stamp(os.stat(f))})
s = runtime.open_session(m, runtime.RuntimeOptions(["cpu"], 1))
print(status()["VmHWM"] - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="glibc's malloc threshold")
def test_a_session_load_strands_no_freed_weights_on_the_heap(tmp_path):
    """ONNX Runtime copies and prepacks an INT8 model's weights while a session opens; under glibc's rising mmap
    threshold the freed copies stayed on the heap below blocks that live on (the 0.5B model peaked at 683 or 873 MB
    by the luck of the address layout). The session opens with large blocks mapped: its peak stays near the
    weights' size."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rng = np.random.default_rng(0)
    h, layers, nodes, inits, x = 1024, 40, [], [], "x"
    for i in range(layers):
        inits.append(numpy_helper.from_array((rng.standard_normal((h, h)) * 0.03).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"]))
        x = f"h{i}"
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, h])],
                          [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, h])], inits)
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "model.int8.onnx"
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8  # what every supported onnxruntime reads (a newer onnx writes a newer one by default)
    onnx.save(m, str(fp32))
    quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True)
    weights = int8.stat().st_size  # 40 MiB of int8 weights

    def peak() -> int:
        r = subprocess.run([sys.executable, "-c", _LOAD_PEAK, str(int8)], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        return int(r.stdout.split()[-1])

    # without the pin the same load peaked at 1.75x ours here with onnxruntime 1.32, and at ours or above with 1.23
    # (by address layout, as the 0.5B load did): that side is luck, so only the bound is asserted, in three loads
    for _ in range(3):
        ours = peak()
        assert ours < 1.6 * weights, (ours, weights)  # 1.30 here (x86, AVX-512 VNNI): the packed copies, the graph
