"""GlmForCausalLM -> ONNX with a KV cache (Optimum / onnxruntime-genai layout), standard ops only.

Inputs: input_ids, attention_mask, position_ids [1, seq|total], past_key_values.{i}.key/value
[1, kv_heads, past, head_dim]. Outputs: logits [1, seq, vocab], present.{i}.key/value
[1, kv_heads, past + seq, head_dim]. Batch is 1 (the runtime has one inference worker). RMSNorm is written x / sqrt(mean(x^2) + eps) so ONNX Runtime fuses it;
attention is MatMul/Softmax with grouped KV heads broadcast (no copies), so TensorRT's parser takes the whole graph.
Works for any GlmForCausalLM, the 1.5B GLM-Edge included (export_glm_edge.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

NEG = -1e4  # additive mask: finite so an fp16 TensorRT engine never makes -inf - -inf


class _Norm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())
        self.eps = eps

    def forward(self, x):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class ExportGlm(nn.Module):
    """The same arithmetic as transformers' GlmForCausalLM, with the cache as explicit tensors.

    Written for a small, fast graph: batch 1 (one inference worker) so every reshape has constant dims and the
    graph carries almost no shape arithmetic; Q, K and V in one MatMul (one dynamic quantization of the input
    instead of three); interleaved partial rotary as x*cos + (x @ R)*sin with R a constant signed permutation
    (no slices, stacks or concats); the causal mask built once, not per layer.
    """

    def __init__(self, hf):
        super().__init__()
        c = hf.config
        self.n_layers = c.num_hidden_layers
        self.n_heads = c.num_attention_heads
        self.n_kv = c.num_key_value_heads
        self.head_dim = hd = c.head_dim or c.hidden_size // c.num_attention_heads
        m = hf.model
        self.embed = nn.Parameter(m.embed_tokens.weight.detach().clone())
        self.lm_head = nn.Parameter(hf.lm_head.weight.detach().clone())
        inv_freq = m.rotary_emb.inv_freq.detach().float()
        rot = 2 * inv_freq.numel()
        pos = torch.arange(c.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(pos, inv_freq).repeat_interleave(2, dim=-1)  # [max_pos, rot]: pairs share a frequency
        cos = torch.ones(c.max_position_embeddings, hd)
        sin = torch.zeros(c.max_position_embeddings, hd)
        cos[:, :rot], sin[:, :rot] = freqs.cos(), freqs.sin()  # dims past `rot` pass through unrotated
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        R = torch.zeros(hd, hd)  # (x @ R)[2i] = -x[2i+1], (x @ R)[2i+1] = x[2i]: GLM's interleaved rotate_half
        for i in range(rot // 2):
            R[2 * i + 1, 2 * i] = -1.0
            R[2 * i, 2 * i + 1] = 1.0
        self.register_buffer("R", R, persistent=False)
        rotated_heads = torch.zeros(self.n_heads + 2 * self.n_kv, 1, 1)
        rotated_heads[: self.n_heads + self.n_kv] = 1.0
        self.register_buffer("rotated_heads", rotated_heads, persistent=False)
        self.layers = nn.ModuleList()
        for layer in m.layers:
            a, mlp = layer.self_attn, layer.mlp
            mod = nn.Module()
            mod.ln1 = _Norm(layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
            mod.ln2 = _Norm(layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
            qkv = nn.Linear(c.hidden_size, (self.n_heads + 2 * self.n_kv) * hd, bias=a.q_proj.bias is not None)
            with torch.no_grad():
                qkv.weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
                if qkv.bias is not None:
                    qkv.bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
            mod.qkv, mod.o = qkv, a.o_proj
            mod.gate_up, mod.down = mlp.gate_up_proj, mlp.down_proj
            self.layers.append(mod)
        self.norm = _Norm(m.norm.weight, m.norm.variance_epsilon)
        self.scale = hd ** -0.5

    def forward(self, input_ids, attention_mask, position_ids, *past):
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        G = H // KV
        x = self.embed[input_ids[0]].unsqueeze(0)  # [1, s, hidden]
        # rotary tables for all of q, k and v at once: v's heads get cos 1, sin 0 (unrotated)
        rotated = self.rotated_heads  # [H+2KV, 1, 1]: 1 for q and k heads
        cos = self.cos[position_ids[0]] * rotated + (1.0 - rotated)  # [H+2KV, s, D]
        sin = self.sin[position_ids[0]] * rotated
        s = input_ids.shape[1]
        total = attention_mask.shape[1]
        q_pos = torch.arange(s, device=input_ids.device).unsqueeze(1) + (total - s)
        k_pos = torch.arange(total, device=input_ids.device).unsqueeze(0)
        allowed = (k_pos <= q_pos) & attention_mask[0].bool().unsqueeze(0)  # [s, total]
        bias = torch.where(allowed, torch.zeros((), dtype=x.dtype), torch.full((), NEG, dtype=x.dtype))
        presents = []
        for i, L in enumerate(self.layers):
            qkv = L.qkv(L.ln1(x)).reshape(1, -1, H + 2 * KV, D).transpose(1, 2)  # [1, H+2KV, s, D]
            qkv = qkv * cos + torch.matmul(qkv, self.R) * sin
            q, k, v = torch.split(qkv, [H, KV, KV], dim=1)
            k = torch.cat((past[2 * i], k), dim=2)
            v = torch.cat((past[2 * i + 1], v), dim=2)
            presents += [k, v]
            qg = q.reshape(KV, G, -1, D)  # grouped heads share their KV head without copies
            att = torch.matmul(qg, k.reshape(KV, 1, -1, D).transpose(-1, -2)) * self.scale + bias
            o = torch.matmul(torch.softmax(att, dim=-1), v.reshape(KV, 1, -1, D))  # [KV, G, s, D]
            x = x + L.o(o.reshape(1, H, -1, D).transpose(1, 2).reshape(1, -1, H * D))
            gate, up = torch.split(L.gate_up(L.ln2(x)), L.down.in_features, dim=-1)
            x = x + L.down(torch.nn.functional.silu(gate) * up)
        logits = torch.matmul(self.norm(x), self.lm_head.t())
        return (logits, *presents)


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def export(hf, path: Path, opset: int = 17) -> None:
    hf = hf.eval().float()
    m = ExportGlm(hf).eval()
    c = hf.config
    ins, outs = io_names(m.n_layers)
    s, p = 5, 3
    ids = torch.randint(0, c.vocab_size, (1, s))
    mask = torch.ones(1, p + s, dtype=torch.long)
    pos = torch.arange(p, p + s).unsqueeze(0)
    past = [torch.zeros(1, m.n_kv, p, m.head_dim) for _ in range(2 * m.n_layers)]
    axes = {"input_ids": {1: "seq"}, "attention_mask": {1: "total"}, "position_ids": {1: "seq"},
            "logits": {1: "seq"}}
    for n in ins[3:]:
        axes[n] = {2: "past"}
    for n in outs[1:]:
        axes[n] = {2: "total"}
    with torch.no_grad():
        torch.onnx.export(m, (ids, mask, pos, *past), str(path), input_names=ins, output_names=outs,
                          dynamic_axes=axes, opset_version=opset, dynamo=False, do_constant_folding=True)


def check_against_torch(hf, onnx_path: Path, ids: list[int], atol: float) -> dict:
    """Logits from ONNX Runtime vs transformers, for a prefill and then a cached one-token decode step."""
    import onnxruntime as ort

    hf = hf.eval().float()
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    c = hf.config
    n_kv, hd = c.num_key_value_heads, c.head_dim or c.hidden_size // c.num_attention_heads
    feeds = {"input_ids": np.array([ids[:-1]], dtype=np.int64),
             "attention_mask": np.ones((1, len(ids) - 1), dtype=np.int64),
             "position_ids": np.arange(len(ids) - 1, dtype=np.int64)[None]}
    for i in range(c.num_hidden_layers):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros((1, n_kv, 0, hd), dtype=np.float32)
    out = sess.run(None, feeds)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids])).logits.numpy()
    prefill_err = float(np.abs(out[0] - ref[:, :-1]).max())
    feeds = {"input_ids": np.array([[ids[-1]]], dtype=np.int64),
             "attention_mask": np.ones((1, len(ids)), dtype=np.int64),
             "position_ids": np.array([[len(ids) - 1]], dtype=np.int64)}
    for i in range(c.num_hidden_layers):
        feeds[f"past_key_values.{i}.key"] = out[1 + 2 * i]
        feeds[f"past_key_values.{i}.value"] = out[2 + 2 * i]
    step = sess.run(None, feeds)
    decode_err = float(np.abs(step[0][:, -1] - ref[:, -1]).max())
    result = {"prefill_max_abs_err": prefill_err, "decode_max_abs_err": decode_err, "atol": atol}
    if prefill_err > atol or decode_err > atol:
        raise AssertionError(f"ONNX logits differ from torch: {result}")
    return result
