"""Export, quantize and sign your own GLM-Edge checkpoint (e.g. glm-edge-1.5b-chat) so that it drops in.

    python3 models/recipe/export_glm_edge.py --checkpoint /path/to/glm-edge-1.5b-chat \\
        --out /var/lib/edge-agent/models/glm-edge-1.5b/1.0.0 --key ~/.config/edge-agent/model-signing.pem \\
        --calibration models/eval/heldout.jsonl

Then in the gateway's config: [model] dir = "<out>", public_key = "<printed key>".

What it does, the same steps as the shipped model's recipe (package.py):
  1. loads the checkpoint from a local folder with transformers (GlmForCausalLM; nothing is downloaded);
  2. exports it with export.py (KV cache in the Optimum / onnxruntime-genai layout, standard ONNX ops) and checks
     the ONNX logits against torch for a prefill and a cached decode step;
  3. quantizes: dynamic INT8 (CPU EP) and static QDQ INT8 calibrated on --calibration (TensorRT / CUDA EP);
     models over 2 GB keep their weights in external data files beside the .onnx, listed and hashed in the
     manifest (the runtime refuses external data that is not a listed file of the same folder);
  4. writes tokenizer.json, genai_config.json, manifest.json and its Ed25519 signature.

The runtime prompts with the GLM-Edge chat layout (<|user|>\\n...<|assistant|>\\n) and constrains the answer to the
tool schema (edge_agent/glm/schema.py). A stock chat checkpoint will answer in prose, which the grammar then
forces into some call: fine-tune it on the recipe's corpus first (train.py's `train` works on any
GlmForCausalLM; corpus.split gives the data) for calls worth executing.

Resources for 1.5B: about 16 GB of RAM for the fp32 export and calibration, 30-60 minutes on a desktop CPU.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    import export as X
    import package as P
    from tokenizers import Tokenizer
    from transformers import GlmForCausalLM

    from edge_agent.glm.schema import EOS, prompt

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True, help="local folder: config.json, weights, tokenizer.json")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--key", type=Path, required=True, help="Ed25519 private key (PEM); created if absent")
    ap.add_argument("--name", default="glm-edge-custom")
    ap.add_argument("--version", default="1.0.0")
    ap.add_argument("--context", type=int, default=512, help="the runtime's context limit (TensorRT profiles too)")
    ap.add_argument("--calibration", type=Path, help="JSONL of {text, call} for the QDQ calibration")
    ap.add_argument("--embedding", choices=("shared", "int8", "fp32"), default="shared",
                    help="the CPU file's embedding table: shared with the tied INT8 LM head (no fp32 table), its own "
                         "int8 table, or fp32 (package.quantize_embedding)")
    args = ap.parse_args(argv)

    model = GlmForCausalLM.from_pretrained(args.checkpoint, torch_dtype=torch.float32, local_files_only=True).eval()
    model.config.max_position_embeddings = max(model.config.max_position_embeddings, args.context)
    tok = Tokenizer.from_file(str(args.checkpoint / "tokenizer.json"))
    if tok.token_to_id(EOS) is None:
        raise SystemExit(f"{args.checkpoint}/tokenizer.json has no {EOS} token")
    cfg = model.config
    hd = cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "model.fp32.onnx"
        X.export(model, fp32)
        sample = tok.encode(prompt("what is the average temperature of pump-3 over the last hour")).ids
        check = X.check_against_torch(model, fp32, sample, atol=1e-2)
        print("ONNX vs torch:", check)
        rows = [json.loads(line) for line in args.calibration.read_text().splitlines()] if args.calibration else \
            [{"text": "status", "call": {"tool": "status", "args": {}}}]
        calib = P._Calib(tok, rows, cfg.num_key_value_heads, hd, cfg.num_hidden_layers, n=32)
        saved = P.quantize(fp32, args.out / "model.int8.onnx", args.out / "model.qdq.int8.onnx", calib,
                           embedding=args.embedding if cfg.tie_word_embeddings or args.embedding != "shared" else
                           "int8")
        print(f"embedding ({args.embedding}): {saved / 1e6:.0f} MB less in the CPU file")
    shutil.copyfile(args.checkpoint / "tokenizer.json", args.out / "tokenizer.json")
    (args.out / "tokenizer_config.json").write_text(json.dumps(P.tokenizer_config(args.context), indent=2) + "\n")
    eos = tok.token_to_id(EOS)
    (args.out / "genai_config.json").write_text(json.dumps(
        P.genai_config(cfg, eos, eos, args.context, "model.int8.onnx"), indent=2) + "\n")
    key = P.load_or_create_key(args.key, print)
    manifest = {
        "name": args.name, "version": args.version, "format": 1,
        "architecture": {"type": "GlmForCausalLM", "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
                         "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_hidden_layers,
                         "num_attention_heads": cfg.num_attention_heads,
                         "num_key_value_heads": cfg.num_key_value_heads, "head_dim": hd,
                         "partial_rotary_factor": cfg.rope_parameters.get("partial_rotary_factor", 0.5)
                         if getattr(cfg, "rope_parameters", None) else 0.5,
                         "tie_word_embeddings": cfg.tie_word_embeddings, "context": args.context,
                         "params": sum(p.numel() for p in model.parameters())},
        "tokenizer": "tokenizer.json", "prompt": "glm-edge-chat",
        "quantization": {"model.int8.onnx": f"dynamic int8, embedding {args.embedding}",
                         "model.qdq.int8.onnx": "static QDQ int8"},
        "providers": {"TensorrtExecutionProvider": "model.qdq.int8.onnx",
                      "CUDAExecutionProvider": "model.qdq.int8.onnx", "CPUExecutionProvider": "model.int8.onnx"},
        "public_key": P.public_key_b64(key), "torch_check": check,
    }
    P.write_signed_manifest(args.out, manifest, key)
    print(f"wrote {args.out}; in the gateway's config: [model] dir = \"{args.out}\", "
          f"public_key = \"{manifest['public_key']}\"")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
