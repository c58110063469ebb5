"""The demo's tasks: each one names its problems (a seeded training / held-out split), the answer
the warm-up teaches, its rollout lengths, its warm-up and the model's architecture overrides.

- ``addition``: "What is a + b?" for a, b in 0..19 (megatron_less/demo/task.py), ~17-token
  answers: quick, but leaves LESS little to shape.
- ``columns``: 3- and 4-digit addition worked column by column with carries
  (megatron_less/demo/columns.py), 70-100-token answers whose lines share their phrasing.
- ``chain``: running sums of 5 or 6 distinct single-digit operands, one " total + operand = sum"
  line per addition (megatron_less/demo/chain.py), 39-57-token answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from megatron_less.demo import chain, columns, task


@dataclass(frozen=True)
class Task:
    """``split(seed) -> (train_rows, heldout_rows)``; ``target(row)`` is the warm-up's answer;
    ``max_tokens`` caps rollout and eval responses, ``max_prompt_tokens`` prompts;
    ``warmup_steps`` / ``warmup_lr`` the supervised warm-up; ``arch`` overrides demo.model.ARCH."""

    name: str
    split: Callable[[int], tuple[list[dict], list[dict]]]
    target: Callable[[dict], str]
    max_tokens: int
    max_prompt_tokens: int
    warmup_steps: int
    warmup_lr: float
    arch: dict = field(default_factory=dict)


TASKS: dict[str, Task] = {
    "addition": Task("addition", task.split, task.target, max_tokens=24, max_prompt_tokens=32, warmup_steps=300,
                     warmup_lr=1e-3, arch={}),
    # 3-4 digit traces: 72-99 response tokens (+ end of text), prompts 15-17 tokens; vocab 384
    # keeps the place names one token each; 256 positions hold prompt + max_tokens.
    # NOT YET TUNED: measured after this warm-up (seed 0, 64 held-out x 8 samples at temperature 1):
    # 0.4% right, 3% of problems mixed, final loss 0.153; the model writes the format but reads the
    # wrong column digits. It needs a longer warm-up or an easier task before the demo can use it.
    "columns": Task("columns", columns.split, columns.target, max_tokens=128, max_prompt_tokens=32,
                    warmup_steps=400, warmup_lr=2e-3, arch={"vocab_size": 384, "max_position_embeddings": 256}),
    # 5-6 operands: 39-57 response tokens (+ end of text), prompts 20-24 tokens; the default vocab
    # (300; 277 used) and 128 positions hold prompt + max_tokens. Measured after warm-ups at lr 2e-3
    # (seed 0, 64 held-out x 8 samples at temperature 1, this 2-core machine under load):
    # 600 steps: 27% right, 91% of problems mixed, loss 0.17, 318 s;
    # 700 steps (the default): 42% right (5 operands 51%, 6: 33%), 81% mixed, loss 0.061, 382 s;
    # 800 steps: 67% right, 70% mixed, loss 0.012, 378 s. Most wrong traces first go wrong in a sum.
    "chain": Task("chain", chain.split, chain.target, max_tokens=96, max_prompt_tokens=32, warmup_steps=700,
                  warmup_lr=2e-3, arch={}),
}  # fmt: skip


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown demo task {name!r}: valid tasks are {', '.join(sorted(TASKS))}") from None
