"""Tokenizer, model sizes, training and distillation, torch-side evaluation (build-only: torch + transformers)."""
from __future__ import annotations

import json
import math
import random
import time

import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GlmConfig, GlmForCausalLM  # noqa: F401 (build.py and package.py use T.GlmForCausalLM)

from edge_agent.glm.schema import EOS, PAD, SPECIAL_TOKENS, format_call, prompt

# Whitespace runs, single digits, letter runs and punctuation runs are separate pre-tokens, so a device name
# tokenizes the same in the question and in the JSON answer (the model copies it token by token), and numbers
# are copied digit by digit.
PRETOKEN = r"\s+|\d|[A-Za-z]+|[^\sA-Za-z\d]+"

SIZES = {
    # GLM-Edge shape, scaled down: RMSNorm, partial (half) interleaved rotary, SwiGLU, GQA, tied embeddings
    "teacher": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8,
                    num_key_value_heads=4, head_dim=32),
    "student": dict(hidden_size=160, intermediate_size=480, num_hidden_layers=4, num_attention_heads=5,
                    num_key_value_heads=1, head_dim=32),
    "smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16),
}
CONTEXT = 192  # prompt + answer tokens; the runtime's context limit comes from the manifest


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKEN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def glm_config(size: str, vocab_size: int, tok: Tokenizer) -> GlmConfig:
    return GlmConfig(vocab_size=vocab_size, max_position_embeddings=CONTEXT, rms_norm_eps=1e-5,
                     tie_word_embeddings=True, attention_bias=True, partial_rotary_factor=0.5,
                     pad_token_id=tok.token_to_id(PAD), eos_token_id=[tok.token_to_id(EOS)],
                     bos_token_id=None, attention_dropout=0.0, **SIZES[size])


def encode(tok: Tokenizer, rows: list[dict]) -> list[tuple[list[int], int]]:
    """(ids, prompt length) per row; the loss covers the answer and the end token only."""
    out = []
    for row in rows:
        p = tok.encode(prompt(row["text"])).ids
        a = tok.encode(format_call(row["call"]) + EOS).ids
        ids = (p + a)[:CONTEXT]
        out.append((ids, len(p)))
    return out


def batches(data, batch_size: int, rng: random.Random, pad_id: int):
    while True:
        idx = list(range(len(data)))
        rng.shuffle(idx)
        for i in range(0, len(idx) - batch_size + 1, batch_size):
            rows = [data[j] for j in idx[i:i + batch_size]]
            width = max(len(r[0]) for r in rows)
            ids = torch.full((batch_size, width), pad_id, dtype=torch.long)
            mask = torch.zeros((batch_size, width), dtype=torch.long)
            labels = torch.full((batch_size, width), -100, dtype=torch.long)
            for b, (seq, plen) in enumerate(rows):
                ids[b, :len(seq)] = torch.tensor(seq)
                mask[b, :len(seq)] = 1
                labels[b, plen:len(seq)] = torch.tensor(seq[plen:])
            yield ids, mask, labels


def train(model, data, *, steps: int, batch_size: int, lr: float, seed: int, pad_id: int, teacher=None,
          temperature: float = 1.0, alpha: float = 0.5, log=print, label: str = "", device: str = "cpu") -> dict:
    """AdamW, warmup + cosine. With a teacher: alpha * KL(teacher_T || student_T) * T^2 + (1 - alpha) * CE."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    model.train()
    if teacher is not None:
        teacher.eval()
    gen = batches(data, batch_size, random.Random(seed), pad_id)
    t0 = time.monotonic()
    ema = None
    for step in range(steps):
        ids, mask, labels = (t.to(device) for t in next(gen))
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        target = labels[:, 1:]
        keep = target != -100
        ce = F.cross_entropy(logits[keep], target[keep])
        loss = ce
        if teacher is not None:
            with torch.no_grad():
                t_logits = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1][keep]
            kl = F.kl_div(F.log_softmax(logits[keep] / temperature, -1), F.log_softmax(t_logits / temperature, -1),
                          log_target=True, reduction="batchmean") * temperature ** 2
            loss = alpha * kl + (1 - alpha) * ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema = ce.item() if ema is None else 0.95 * ema + 0.05 * ce.item()
        if step % 100 == 0 or step == steps - 1:
            log(f"{label} step {step}/{steps} ce {ema:.4f} ({time.monotonic() - t0:.0f}s)")
    model.eval()
    return {"steps": steps, "final_ce": round(ema, 5), "seconds": round(time.monotonic() - t0, 1)}


@torch.no_grad()
def greedy_eval(model, tok: Tokenizer, rows: list[dict], max_new: int = 64, batch_size: int = 64,
                failures: list | None = None) -> dict:
    """Exact match of the unconstrained greedy answer (torch, KV cache) against the reference call."""
    eos = tok.token_to_id(EOS)
    pad = tok.token_to_id(PAD)
    hits = valid = 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        prompts = [tok.encode(prompt(r["text"])).ids for r in chunk]
        width = max(map(len, prompts))
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, p in enumerate(prompts):  # left padding
            ids[b, width - len(p):] = torch.tensor(p)
            mask[b, width - len(p):] = 1
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                             eos_token_id=eos, pad_token_id=pad)
        for b, r in enumerate(chunk):
            gen = out[b, width:].tolist()
            if eos in gen:
                gen = gen[:gen.index(eos)]
            text = tok.decode(gen, skip_special_tokens=False)
            try:
                call = json.loads(text)
                valid += 1
            except ValueError:
                call = None
            ok = call == r["call"] and format_call(call) == format_call(r["call"])
            hits += ok
            if not ok and failures is not None:
                failures.append({"text": r["text"], "want": format_call(r["call"]), "got": text})
    return {"n": len(rows), "exact_match": round(hits / len(rows), 4), "valid_json": round(valid / len(rows), 4)}


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
