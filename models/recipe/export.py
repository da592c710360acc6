"""GlmForCausalLM -> ONNX with a KV cache (Optimum / onnxruntime-genai layout), standard ops only.

Inputs: input_ids, attention_mask, position_ids [batch, seq|total], past_key_values.{i}.key/value
[batch, kv_heads, past, head_dim]. Outputs: logits [batch, seq, vocab], present.{i}.key/value
[batch, kv_heads, past + seq, head_dim]. RMSNorm is written x / sqrt(mean(x^2) + eps) so ONNX Runtime fuses it;
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
    """The same arithmetic as transformers' GlmForCausalLM, with the cache as explicit tensors."""

    def __init__(self, hf):
        super().__init__()
        c = hf.config
        self.n_layers = c.num_hidden_layers
        self.n_heads = c.num_attention_heads
        self.n_kv = c.num_key_value_heads
        self.head_dim = c.head_dim or c.hidden_size // c.num_attention_heads
        m = hf.model
        self.embed = nn.Parameter(m.embed_tokens.weight.detach().clone())
        self.lm_head = nn.Parameter(hf.lm_head.weight.detach().clone())
        inv_freq = m.rotary_emb.inv_freq.detach().float()
        self.rot = 2 * inv_freq.numel()
        pos = torch.arange(c.max_position_embeddings, dtype=torch.float32)
        freqs = torch.outer(pos, inv_freq)  # [max_pos, rot/2]
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)
        self.layers = nn.ModuleList()
        for layer in m.layers:
            a, mlp = layer.self_attn, layer.mlp
            mod = nn.Module()
            mod.ln1 = _Norm(layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
            mod.ln2 = _Norm(layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
            mod.q, mod.k, mod.v, mod.o = a.q_proj, a.k_proj, a.v_proj, a.o_proj
            mod.gate_up, mod.down = mlp.gate_up_proj, mlp.down_proj
            self.layers.append(mod)
        self.norm = _Norm(m.norm.weight, m.norm.variance_epsilon)
        self.scale = self.head_dim ** -0.5

    def _rope(self, x, cos, sin):
        # x [b, h, s, d]; interleaved pairs over the first `rot` dims, the rest passes through
        b, h, s, _ = x.shape
        xr = x[..., : self.rot].reshape(b, h, s, self.rot // 2, 2)
        x1, x2 = xr[..., 0], xr[..., 1]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).reshape(b, h, s, self.rot)
        return torch.cat((out, x[..., self.rot:]), dim=-1)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        b, s = input_ids.shape
        x = self.embed[input_ids]
        cos = self.cos[position_ids].unsqueeze(1)  # [b, 1, s, rot/2]
        sin = self.sin[position_ids].unsqueeze(1)
        total = attention_mask.shape[1]
        past_len = total - s
        q_pos = torch.arange(s, device=input_ids.device).unsqueeze(1) + past_len
        k_pos = torch.arange(total, device=input_ids.device).unsqueeze(0)
        allowed = (k_pos <= q_pos).unsqueeze(0).unsqueeze(0) & attention_mask.bool().unsqueeze(1).unsqueeze(1)
        bias = torch.where(allowed, torch.zeros((), dtype=x.dtype), torch.full((), NEG, dtype=x.dtype))
        bias = bias.unsqueeze(2)  # [b, 1, 1, s, total] broadcast over kv heads and groups
        groups = self.n_heads // self.n_kv
        presents = []
        for i, L in enumerate(self.layers):
            h = L.ln1(x)
            q = L.q(h).reshape(b, s, self.n_heads, self.head_dim).transpose(1, 2)
            k = L.k(h).reshape(b, s, self.n_kv, self.head_dim).transpose(1, 2)
            v = L.v(h).reshape(b, s, self.n_kv, self.head_dim).transpose(1, 2)
            q = self._rope(q, cos, sin)
            k = self._rope(k, cos, sin)
            k = torch.cat((past[2 * i], k), dim=2)
            v = torch.cat((past[2 * i + 1], v), dim=2)
            presents += [k, v]
            qg = q.reshape(b, self.n_kv, groups, s, self.head_dim)
            att = torch.matmul(qg, k.unsqueeze(2).transpose(-1, -2)) * self.scale + bias
            att = torch.softmax(att, dim=-1)
            o = torch.matmul(att, v.unsqueeze(2)).reshape(b, self.n_heads, s, self.head_dim)
            x = x + L.o(o.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim))
            gu = L.gate_up(L.ln2(x))
            gate, up = gu.chunk(2, dim=-1)
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
    b, s, p = 2, 5, 3
    ids = torch.randint(0, c.vocab_size, (b, s))
    mask = torch.ones(b, p + s, dtype=torch.long)
    pos = torch.arange(p, p + s).unsqueeze(0).repeat(b, 1)
    past = [torch.zeros(b, m.n_kv, p, m.head_dim) for _ in range(2 * m.n_layers)]
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
            "position_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    for n in ins[3:]:
        axes[n] = {0: "batch", 2: "past"}
    for n in outs[1:]:
        axes[n] = {0: "batch", 2: "total"}
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
