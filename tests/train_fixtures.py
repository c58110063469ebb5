"""A tiny model that has learned a little, so GRPO sees groups with mixed rewards.

Problems "What is a + b?" (single digits); the model is a random 4-layer Qwen2 with a small BPE
tokenizer, warmed up for a few seconds on correct answers ("\\boxed{c}") with transformers. After
that, sampling at temperature 1 gives right and wrong answers in the same group, which is what
the training tests need: real rewards from the real math reward, nothing scripted."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from tests import tiny

TEMPLATE = "Question: What is {a} + {b}?\nAnswer:"


def problems(seed: int = 0, count: int = 64) -> list[dict]:
    rng = random.Random(seed)
    pairs = [(rng.randrange(10), rng.randrange(10)) for _ in range(count)]
    return [{"prompt": TEMPLATE.format(a=a, b=b), "answer": str(a + b), "template": "raw"} for a, b in pairs]


def write_train_file(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_model(root: Path, *, steps: int = 150, seed: int = 0, **overrides) -> tuple[Path, Path]:
    """(hf_dir with tokenizer, train file). ~10 s on 2 cores."""
    from transformers import Qwen2ForCausalLM

    from megatron_less.data.tiny_tokenizer import build_tiny_tokenizer
    from megatron_less.demo.model import warm_up

    hf_dir = root / "hf"
    rows = problems(seed)
    texts = [r["prompt"] + f" \\boxed{{{r['answer']}}}" for r in rows] + [str(i) for i in range(19)]
    build_tiny_tokenizer(hf_dir, texts * 4, vocab_size=300)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    # head_dim 32: vLLM's CPU attention has no kernel for smaller heads
    cfg = dict(vocab_size=300, max_position_embeddings=128, hidden_size=128, intermediate_size=256, **overrides)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(tiny.hf_config(**cfg)).float()
    warm_up(model, tok, rows, lambda r: f" \\boxed{{{r['answer']}}}", steps=steps, lr=3e-3, batch=16)
    model.eval().save_pretrained(hf_dir)
    return hf_dir, write_train_file(root / "train.jsonl", rows)


def run_inputs(tmp_path_factory, name: str, **kwargs) -> dict:
    """The test modules' `tiny` fixture: a warmed-up model and its training file in a fresh folder."""
    root = tmp_path_factory.mktemp(name)
    hf_dir, train_file = make_model(root, **kwargs)
    return {"root": root, "hf": str(hf_dir), "data": str(train_file)}
