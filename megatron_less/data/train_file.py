"""The training file the trainer reads: JSON Lines with ``prompt`` and ``answer`` per line.

``template`` records how ``prompt`` was made ("none" = the bare problem, which the trainer then
renders itself), so a prompt is never wrapped in a chat template twice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from megatron_less.data.prompts import apply_template
from megatron_less.data.records import DataError, LoadStats, Problem, read_rows


def write_train_file(
    problems: Iterable[Problem], out: str | Path, template: str = "none", tokenizer=None
) -> int:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    tmp = out.with_name(out.name + ".tmp")  # a crash must not leave a half-written file
    with open(tmp, "w", encoding="utf-8") as f:
        for p in problems:
            row = {
                "prompt": apply_template(template, p.problem, tokenizer),
                "answer": p.answer,
                "id": p.id,
                "template": template,
            }
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(out)
    return n


def _train_row(row, where: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in ("prompt", "answer"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise DataError(f"{where}: missing or empty string field {key!r}")
    return row


def read_train_file(path: str | Path, skip_bad: bool = False) -> tuple[list[dict], LoadStats]:
    """Rows with non-empty string ``prompt`` and ``answer``; bad rows raise or are counted."""
    return read_rows(path, _train_row, skip_bad, what="rows")
