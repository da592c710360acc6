"""The model recipe end to end at toy size: corpus, tokenizer, teacher, distilled student, export with KV cache
(logits checked against torch for prefill and cached decode), INT8, signed folder the runtime accepts."""
from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="the recipe needs the build-only extra: pip install -e '.[recipe]'")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]


def test_recipe_smoke_builds_a_model_the_runtime_loads(tmp_path):
    from cryptography.hazmat.primitives import serialization

    from edge_agent.config import ModelConfig
    from edge_agent.glm.engine import Engine
    from edge_agent.glm.generate import ConstraintError
    from edge_agent.ops import TOOLSET

    out = tmp_path / "model" / "0.0.1"
    key = tmp_path / "signing.pem"
    r = subprocess.run([sys.executable, str(ROOT / "models" / "recipe" / "build.py"), "--profile", "smoke",
                        "--work", str(tmp_path / "work"), "--out", str(out), "--key", str(key),
                        "--version", "0.0.1", "--threads", "2"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    check = manifest["torch_check"]  # the exporter's logits match torch, prefill and cached decode
    assert check["prefill_max_abs_err"] < 1e-3 and check["decode_max_abs_err"] < 1e-3
    assert set(manifest["eval"]) == {"teacher", "student_distilled", "student_alone"}
    assert manifest["providers"]["CPUExecutionProvider"] == "model.int8.onnx"
    assert (key.stat().st_mode & 0o077) == 0  # the new signing key is private
    priv = serialization.load_pem_private_key(key.read_bytes(), None)
    pub = base64.b64encode(priv.public_key().public_bytes(serialization.Encoding.Raw,
                                                          serialization.PublicFormat.Raw)).decode()
    assert manifest["public_key"] == pub
    e = Engine(ModelConfig(dir=str(out), public_key=pub, providers=["cpu"], max_new_tokens=64), TOOLSET)
    e.load()
    try:
        try:  # a toy model: any valid call, or the clear out-of-budget error
            plan = e.plan("what is the max temperature of pump-3 over the last hour")
            TOOLSET.validate(plan.call)
        except ConstraintError as err:
            assert "token budget" in str(err)
    finally:
        e.close()


def test_a_users_glm_checkpoint_drops_in(tmp_path):
    """export_glm_edge.py on a (tiny, random) GlmForCausalLM checkpoint folder, as a user's GLM-Edge-1.5B."""
    import shutil

    from transformers import GlmConfig, GlmForCausalLM

    from edge_agent.config import ModelConfig
    from edge_agent.glm.engine import Engine, shipped_model_dir
    from edge_agent.ops import TOOLSET

    ckpt = tmp_path / "ckpt"
    cfg = GlmConfig(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=True,
                    partial_rotary_factor=0.5, pad_token_id=0, eos_token_id=[1])
    GlmForCausalLM(cfg).save_pretrained(ckpt)
    shutil.copyfile(shipped_model_dir() / "tokenizer.json", ckpt / "tokenizer.json")
    out, key = tmp_path / "out", tmp_path / "k.pem"
    r = subprocess.run([sys.executable, str(ROOT / "models" / "recipe" / "export_glm_edge.py"), "--checkpoint",
                        str(ckpt), "--out", str(out), "--key", str(key), "--context", "256",
                        "--calibration", str(ROOT / "models" / "eval" / "heldout.jsonl")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["architecture"]["context"] == 256 and manifest["torch_check"]["decode_max_abs_err"] < 1e-2
    e = Engine(ModelConfig(dir=str(out), public_key=manifest["public_key"], providers=["cpu"], max_new_tokens=8),
               TOOLSET)
    e.load()
    assert e.info()["name"] == "glm-edge-custom"
    e.close()


def test_a_quantized_graph_that_fits_one_file_is_written_as_one(tmp_path):
    """An fp32 export over 2 GB makes the quantizer write external data; when the INT8 result fits in one protobuf
    it is saved as one file again (the runtime then verifies and loads bytes, not a folder)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    sys.path.insert(0, str(ROOT / "models" / "recipe"))
    import package

    w = numpy_helper.from_array(np.ones((64, 64), dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [w])
    path = tmp_path / "model.int8.onnx"
    onnx.save(helper.make_model(graph), str(path), save_as_external_data=True, location="model.int8.onnx.data",
              size_threshold=0)
    assert (tmp_path / "model.int8.onnx.data").exists()
    package.inline_if_small(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.int8.onnx"]
    m = onnx.load(str(path))
    assert numpy_helper.to_array(m.graph.initializer[0]).sum() == 64 * 64


@pytest.mark.parametrize("share", [True, False])
def test_the_embedding_table_is_int8_looked_up_row_by_row(tmp_path, share):
    """The fp32 embedding table leaves the INT8 file: shared with the INT8 LM head it is tied to (all of it), or a
    per-row 8-bit table of its own (three quarters); the graph answers as before within quantization noise."""
    import shutil

    import numpy as np
    import onnx
    import onnxruntime as ort

    sys.path.insert(0, str(ROOT / "models" / "recipe"))
    import package

    from edge_agent.glm.engine import shipped_model_dir
    src = shipped_model_dir() / "model.int8.onnx"
    path = tmp_path / "model.int8.onnx"
    shutil.copyfile(src, path)
    arch = json.loads((src.parent / "manifest.json").read_text())["architecture"]
    table = arch["vocab_size"] * arch["hidden_size"] * 4
    saved = package.quantize_embedding(path, share=share)
    assert saved == (table if share else table - table // 4 - arch["vocab_size"] * 4)
    assert src.stat().st_size - path.stat().st_size >= saved * 0.99
    assert not any(i.name == "embed" for i in onnx.load(str(path)).graph.initializer)

    def logits(p: Path) -> np.ndarray:
        s = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        feeds = {"input_ids": np.array([[5, 17, 300, 42, 99, 7, 8, 900]], dtype=np.int64),
                 "attention_mask": np.ones((1, 8), np.int64), "position_ids": np.arange(8)[None]}
        for i in s.get_inputs():
            if i.name.startswith("past"):
                feeds[i.name] = np.zeros((1, arch["num_key_value_heads"], 0, arch["head_dim"]), np.float32)
        return s.run(["logits"], feeds)[0]
    a, b = logits(src), logits(path)
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max()  # quantization noise, not another model
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.75
    assert package.quantize_embedding(path, share=share) == 0  # nothing left to do


def test_the_benchmark_model_of_real_shape_builds_and_loads(tmp_path):
    """scale_model.py (what `bench model --scale` builds): random weights at a GLM-Edge layout, exported, quantized
    with the embedding shared with the INT8 head, signed; the runtime verifies and loads it (tiny layout here)."""
    import onnx

    from edge_agent.config import ModelConfig
    from edge_agent.glm.engine import Engine
    from edge_agent.ops import TOOLSET

    out = tmp_path / "tiny"
    r = subprocess.run([sys.executable, str(ROOT / "models" / "recipe" / "scale_model.py"), "--layout", "tiny",
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["architecture"]["vocab_size"] == 59264 and m["architecture"]["hidden_size"] == 256
    assert "embedding shared" in m["quantization"]["model.int8.onnx"]
    graph = onnx.load(str(out / "model.int8.onnx"))
    assert not any(len(i.dims) == 2 and i.data_type == onnx.TensorProto.FLOAT and tuple(i.dims) == (59264, 256)
                   for i in graph.graph.initializer)  # no fp32 embedding table left
    e = Engine(ModelConfig(dir=str(out), public_key=m["public_key"], providers=["cpu"]), TOOLSET)
    e.load()
    try:
        res = e.gen.generate(list(range(3, 30)), max_new_tokens=8, timeout_s=60)
        assert len(res.ids) == 8 or res.stop == "eos"
    finally:
        e.close()
