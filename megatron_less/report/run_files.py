"""What `megatron-less train` wrote in its output folder, read back: metrics.jsonl (one row per
step), eval.jsonl (one row per evaluation), rollouts.jsonl (a few responses per step, token by
token). A torn last line (a job killed mid-write) is skipped, as the trainer does on resume."""

from __future__ import annotations

import json
from pathlib import Path


class RunError(ValueError):
    """A run folder that cannot be read as asked; the message names the file."""


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
    return rows


def _file(run_dir: str | Path, name: str, required: bool) -> Path | None:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run folder")
    path = run_dir / name
    if not path.is_file():
        if required:
            raise RunError(f"{path}: not found; is {run_dir} the output_dir of a `megatron-less train` run?")
        return None
    return path


def metrics(run_dir: str | Path) -> list[dict]:
    """Per-step rows, in step order."""
    return sorted(read_jsonl(_file(run_dir, "metrics.jsonl", True)), key=lambda r: r["step"])


def evals(run_dir: str | Path) -> list[dict]:
    """Evaluation rows (step 0: the starting policy), in step order; [] when the run had none."""
    path = _file(run_dir, "eval.jsonl", False)
    return sorted(read_jsonl(path), key=lambda r: r["step"]) if path else []


def rollouts(run_dir: str | Path, step: int | None = None) -> tuple[int, list[dict]]:
    """(step, its logged responses): the given step, or the last one logged."""
    rows = read_jsonl(_file(run_dir, "rollouts.jsonl", True))
    steps = sorted({r["step"] for r in rows})
    if not steps:
        raise RunError(f"{Path(run_dir) / 'rollouts.jsonl'}: no rollouts logged (log.rollouts_per_step: 0?)")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        near = min(steps, key=lambda s: abs(s - step))
        raise RunError(f"step {step}: no rollouts logged for it in {run_dir}; logged steps {steps[0]}..{steps[-1]}"
                       f" (nearest: {near})")  # fmt: skip
    return step, [r for r in rows if r["step"] == step]


def eval_series(rows: list[dict], metric: str) -> dict[str, tuple[list[int], list[float]]]:
    """{benchmark: (steps, values)} of one eval metric (e.g. "avg@8"), from eval rows whose keys
    are ``eval/<benchmark>/<metric>``."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for r in rows:
        for k, v in r.items():
            parts = k.split("/")
            if len(parts) >= 3 and parts[0] == "eval" and parts[-1] == metric:
                steps, values = out.setdefault("/".join(parts[1:-1]), ([], []))
                steps.append(r["step"])
                values.append(float(v))
    return out


def eval_metric_names(rows: list[dict], prefix: str) -> list[str]:
    """The eval metrics present that start with ``prefix`` (e.g. "avg@"), sorted by k."""
    names = {k.split("/")[-1] for r in rows for k in r if k.startswith("eval/") and k.split("/")[-1].startswith(prefix)}
    return sorted(names, key=lambda n: int(n.split("@")[1]) if n.split("@")[1].isdigit() else 0)
