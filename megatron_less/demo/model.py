"""The demo's model: a tiny random Qwen2 (real transformers checkpoint files) with a small
digit-splitting BPE tokenizer, warmed up by a short supervised phase on the answers so that
sampling gives right and wrong answers in the same group (GRPO learns nothing from groups whose
rewards are all equal). Built with transformers: this is the HF folder a user would start from."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

# head_dim 32 (128 / 4): vLLM's CPU attention has no kernel for smaller heads
ARCH = dict(vocab_size=300, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, rms_norm_eps=1e-6,
            rope_theta=10000.0)  # fmt: skip


def build_tokenizer(out_dir: Path, rows: list[dict], target, *, vocab_size: int, split_digits: bool):
    from transformers import AutoTokenizer

    from megatron_less.data.tiny_tokenizer import build_tiny_tokenizer

    texts = [r["prompt"] + target(r) for r in rows] + [str(i) for i in range(200)]
    build_tiny_tokenizer(out_dir, texts * 4, vocab_size=vocab_size, split_digits=split_digits)
    return AutoTokenizer.from_pretrained(out_dir)


def warm_up(model, tok, rows: list[dict], target, *, steps: int, lr: float, batch: int, seed: int = 0) -> float:
    """Supervised steps on the answer tokens only (Adam, random batches); returns the last loss."""
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    seqs = [(tok.encode(r["prompt"], add_special_tokens=False),
             tok.encode(target(r), add_special_tokens=False) + [eos]) for r in rows]  # fmt: skip
    width = max(len(p) + len(a) for p, a in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    for i, (p, a) in enumerate(seqs):
        ids[i, : len(p) + len(a)] = torch.tensor(p + a)
        labels[i, len(p) : len(p) + len(a)] = torch.tensor(a)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    loss = torch.tensor(float("nan"))  # steps=0: no loss
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(seqs), (batch,), generator=gen)
        loss = model(input_ids=ids[idx], labels=labels[idx]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def build_model(out_dir: str | Path, rows: list[dict], target, *, steps: int, lr: float = 1e-3, batch: int = 64,
                seed: int = 0, split_digits: bool = True, **arch) -> Path:
    """Writes an HF folder (config, safetensors, tokenizer) at ``out_dir``; returns it."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    cfg = dict(ARCH, **arch)
    tok = build_tokenizer(out_dir, rows, target, vocab_size=cfg["vocab_size"], split_digits=split_digits)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**cfg)).float()
    loss = warm_up(model, tok, rows, target, steps=steps, lr=lr, batch=batch, seed=seed)
    model.eval().save_pretrained(out_dir)
    info = {"warmup_steps": steps, "lr": lr, "batch": batch, "seed": seed, "final_loss": loss,
            "seconds": round(time.perf_counter() - t0, 1), "problems": len(rows)}  # fmt: skip
    (out_dir / "warmup.json").write_text(json.dumps(info, indent=1) + "\n")
    return out_dir
