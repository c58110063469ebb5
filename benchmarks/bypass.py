"""What bypass mode saves: `algo.old_logprobs: rollout` (pi_old = the engine's log-probs, no
trainer forward pass before the update) against `recompute`, side by side in one run.

    python benchmarks/bypass.py [--steps 6] [--pairs 2] [--engine builtin|vllm]

Both modes train tests/train_fixtures.py's tiny model on its addition task with GRPO (no shaper:
bypass has no entropies for LESS), the same seed and data, one process. The runs alternate
(recompute, bypass, recompute, ...) so that the machine's noise falls on both; each figure is the
median over the runs' steps after the first (start-up and first-step warm-up excluded). Printed:
seconds per step in the old-log-prob phase and in all, their ratios, and the share of a step
the pass takes. What it cannot show on a CPU: at scale the pass is a forward over the whole
rollout batch (512 x 8 responses of up to 4k tokens in the recipes), about a third of the
update's forward + backward compute.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "examples" / "configs" / "tiny_cpu.yaml"
MODES = {"recompute": ["algo.old_logprobs=recompute"], "bypass": ["algo.old_logprobs=rollout"]}


def run(mode: str, hf: str, data: str, out: Path, steps: int, engine: str) -> list[dict]:
    args = [f"model.hf_dir={hf}", f"data.train_file={data}", f"output_dir={out}", f"train.steps={steps}",
            "algo.shaper=none", f"rollout.engine={engine}", "rollout.n=8", "batch.prompts_per_step=8",
            "batch.mini_batch_prompts=8", "log.tensorboard=false", "checkpoint.resume=none",
            "checkpoint.overwrite=true", *MODES[mode]]  # fmt: skip
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "megatron_less.cli", "train", str(CONFIG), *args], cwd=REPO, env=env,
                   check=True, capture_output=True)  # fmt: skip
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--pairs", type=int, default=2, help="runs of each mode, alternating")
    ap.add_argument("--engine", default="builtin", choices=["builtin", "vllm"])
    a = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from tests.train_fixtures import make_model

    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bypass_") as tmp:
        hf, data = make_model(Path(tmp))
        per_mode: dict[str, dict[str, list[float]]] = {m: {} for m in MODES}
        for i in range(a.pairs):
            for mode in MODES:
                for r in run(mode, str(hf), str(data), Path(tmp) / f"{mode}{i}", a.steps, a.engine)[1:]:
                    for k, v in r.items():
                        if k.startswith("time/"):
                            per_mode[mode].setdefault(k[5:-2], []).append(v)
    med = {m: {k: statistics.median(v) for k, v in d.items()} for m, d in per_mode.items()}
    phases = list(med["recompute"])
    print(f"engine {a.engine}, {a.pairs} runs per mode x {a.steps - 1} steps (first step excluded), "
          "median seconds per step:")
    print(f"{'mode':<10}" + "".join(f"{k:>14}" for k in phases))
    for m, d in med.items():
        print(f"{m:<10}" + "".join(f"{d.get(k, 0.0):>14.4f}" for k in phases))
    r, b = med["recompute"], med["bypass"]
    r["old"], b["old"] = r.get("old_logprobs", 0.0), b.get("old_logprobs", 0.0)
    print(f"the old-log-prob pass is {r['old'] / r['step']:.1%} of a recompute step")
    print(f"bypass / recompute: step time x{b['step'] / r['step']:.3f}, old-log-prob phase "
          f"{r['old'] - b['old']:.4f} s per step saved ({time.monotonic() - t0:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
