"""A benchmark model of real shape: random weights at a GLM-Edge layout, exported, quantized and signed exactly as a
user's checkpoint is (export_glm_edge.py), in minutes and without downloading anything. For `edge-agent bench model
--scale`; never shipped (its answers are noise: it measures speed and memory, not accuracy).

    python3 models/recipe/scale_model.py --layout 0.5b --out ~/.cache/edge-agent/bench-models/0.5b

Layouts (GLM-Edge: RMSNorm, half rotary, SwiGLU, grouped-query attention, tied embeddings, vocabulary 59,264):
  0.5b   hidden 1536, 16 layers, 12 heads, 4 KV heads, head_dim 128, intermediate 4608 (0.53B parameters)
  1.5b   hidden 2048, 28 layers, 16 heads, 4 KV heads, head_dim 128, intermediate 6144 (1.6B parameters)
  tiny   hidden 256, 4 layers, 4 heads, 2 KV heads, head_dim 64, intermediate 768 (a quick check of this script)

The tokenizer is the shipped model's (its ids are a subset of the vocabulary; the unused rows still weigh what they
would). Resources for 0.5b: about 10 GB of RAM and 5-10 minutes on a 2-core CPU; 1.5b about three times that.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

LAYOUTS = {
    "0.5b": dict(hidden_size=1536, num_hidden_layers=16, num_attention_heads=12, num_key_value_heads=4, head_dim=128,
                 intermediate_size=4608),
    "1.5b": dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=4, head_dim=128,
                 intermediate_size=6144),
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                 intermediate_size=768),
}
VOCAB = 59264


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layout", choices=sorted(LAYOUTS), default="0.5b")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--key", type=Path, help="Ed25519 signing key (default: a new one beside --out)")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch
    from transformers import GlmConfig, GlmForCausalLM

    import export_glm_edge
    from edge_agent.glm.schema import EOS, PAD

    from edge_agent.glm.engine import shipped_model_dir

    tokenizer = shipped_model_dir() / "tokenizer.json"
    torch.manual_seed(args.seed)
    tok = json.loads(tokenizer.read_text())
    vocab = {t["content"]: t["id"] for t in tok["added_tokens"]}
    cfg = GlmConfig(vocab_size=VOCAB, max_position_embeddings=args.context, rms_norm_eps=1e-5,
                    tie_word_embeddings=True, attention_bias=True, partial_rotary_factor=0.5,
                    pad_token_id=vocab[PAD], eos_token_id=[vocab[EOS]], bos_token_id=None, **LAYOUTS[args.layout])
    with torch.no_grad():
        model = GlmForCausalLM(cfg).eval()
        for p in model.parameters():  # small weights: random, but activations stay in a sane range for INT8
            if p.dim() > 1:
                p.normal_(0.0, 0.02)
    key = args.key or args.out.parent / f"{args.out.name}.signing.pem"
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "checkpoint"
        model.save_pretrained(ckpt, safe_serialization=True)
        del model
        (ckpt / "tokenizer.json").write_text(tokenizer.read_text())
        return export_glm_edge.main(["--checkpoint", str(ckpt), "--out", str(args.out), "--key", str(key),
                                     "--name", f"glm-edge-bench-{args.layout}", "--version", "0.0.0",
                                     "--context", str(args.context)])


if __name__ == "__main__":
    raise SystemExit(main())
