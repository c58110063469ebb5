"""Where a step's numbers go (rank 0 only): TensorBoard scalars, the same rows as JSON Lines
(metrics.jsonl) for scripts, a progress bar, and a few whole rollouts per step (rollouts.jsonl)."""

from __future__ import annotations

import json
import math
from pathlib import Path


class RunLogger:
    def __init__(self, out_dir: str | Path, *, total_steps: int, start_step: int, tensorboard: bool = True,
                 progress: bool = True, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # a fresh run (start 0) replaces everything, its own step-0 evaluation included
            self.writer = SummaryWriter(str(self.dir / "tensorboard"), purge_step=start_step + 1 if start_step else 0)
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        # a resumed run replaces what the crashed run logged after its last checkpoint
        self._truncate(self.dir / "metrics.jsonl", start_step)
        self._truncate(self.dir / "rollouts.jsonl", start_step)
        self._truncate(self.dir / "eval.jsonl", start_step)

    @staticmethod
    def _truncate(path: Path, start_step: int) -> None:
        """Keep the rows up to ``start_step``; a fresh start (0) keeps none, since it redoes its
        step-0 baseline evaluation. A job killed mid-write leaves a torn last line: it
        is dropped, not an error. Rewritten beside and renamed, so a crash here loses nothing."""
        if not path.exists():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            ok = isinstance(row, dict) and isinstance(row.get("step"), int)
            if ok and start_step > 0 and row["step"] <= start_step:
                keep.append(line)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        tmp.replace(path)

    def log(self, step: int, metrics: dict[str, float], rollouts: list[dict] = ()) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()
        row = {"step": step, **{k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()}}
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        if rollouts:
            with open(self.dir / "rollouts.jsonl", "a") as f:
                for r in rollouts:
                    f.write(json.dumps({"step": step, **r}) + "\n")
        if self.bar is not None:
            self.bar.update(1)
            keys = ("reward/mean", "loss/total", "rollout/entropy", "actor/grad_norm", "time/step_s")
            self.bar.set_postfix({k.split("/")[-1]: f"{metrics[k]:.4g}" for k in keys if k in metrics})

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled or not metrics:
            return
        if self.writer is not None:
            for k, v in metrics.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()
        with open(self.dir / "eval.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        self.print(f"step {step} eval: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if "avg@" in k))

    def print(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            self.writer.close()
        if self.bar is not None:
            self.bar.close()
