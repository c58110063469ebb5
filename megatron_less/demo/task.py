"""The demo task: "What is a + b?" for a, b in 0..max_operand, answered " a + b = c. \\boxed{c}"
so that the real math reward scores it. The restated question is low-entropy text that every
response shares and the sum's digits are where responses differ: what LESS tells apart.

Every pair is one problem; a seeded shuffle splits them into training and held-out problems, so
evaluation measures additions the model was never trained on."""

from __future__ import annotations

import json
import random
from pathlib import Path

TEMPLATE = "What is {a} + {b}?\nAnswer:"


def problems(max_operand: int = 19) -> list[dict]:
    """All problems in a fixed order: rows with ``prompt`` (rendered), ``answer``, ``a``, ``b``."""
    n = max_operand + 1
    return [{"prompt": TEMPLATE.format(a=a, b=b), "answer": str(a + b), "a": a, "b": b}
            for a in range(n) for b in range(n)]  # fmt: skip


def split(seed: int, heldout: int = 100, max_operand: int = 19) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows), disjoint, the same for the same seed."""
    rows = problems(max_operand)
    if not 0 < heldout < len(rows):
        raise ValueError(f"heldout={heldout}: must be between 1 and {len(rows) - 1} (there are {len(rows)} problems)")
    random.Random(seed).shuffle(rows)
    return rows[heldout:], rows[:heldout]


def distinct_by_prompt(n: int, seed: int, draw) -> list[dict]:
    """``n`` rows from ``draw(rng)`` (rng: random.Random(seed)), each prompt once: the generated
    tasks' problems, drawn until enough distinct ones exist (the caller bounds ``n``)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    rows = []
    while len(rows) < n:
        row = draw(rng)
        if row["prompt"] not in seen:
            seen.add(row["prompt"])
            rows.append(row)
    return rows


def train_heldout(draw_rows, train: int, heldout: int) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows) from ``draw_rows(n)``'s n distinct problems: the held-out
    ones first, so they stay the same whatever ``train`` is."""
    if train < 1 or heldout < 1:
        raise ValueError(f"train={train}, heldout={heldout}: both must be at least 1")
    rows = draw_rows(train + heldout)
    return rows[heldout:], rows[:heldout]


def target(row: dict) -> str:
    """The supervised answer the warm-up teaches."""
    return f" {row['a']} + {row['b']} = {row['answer']}. \\boxed{{{row['answer']}}}"


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    """Rows in the training-file format (``template: none``: the prompts are already rendered);
    the eval command reads the same file as a benchmark."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps({**r, "template": "none"}) + "\n" for r in rows))
    tmp.replace(path)
    return path
