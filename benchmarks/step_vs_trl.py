"""One GRPO step of ours vs one of TRL's GRPOTrainer on CPU, same tiny Qwen2, prompts, group size
and lengths, measured in one run.

    pip install trl            # not a project dependency (a venv with --system-site-packages works)
    python benchmarks/step_vs_trl.py [--steps 8]

The model is tests/train_fixtures.py's warmed-up 4-layer Qwen2 (hidden 128, vocab 300), so both
trainers see mixed rewards; 2 prompts x 4 responses per step, at most 12 new tokens, temperature
1, the same math reward. Ours: `megatron-less train` as one process (TP1), with the built-in
sampler and, when installed, vLLM. Step times are medians over the steps after the first (which
pays for compilation and caches)."""

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
sys.path.insert(0, str(REPO))

N, PROMPTS, MAX_TOKENS = 4, 2, 12


def ours(hf_dir: Path, data: Path, out: Path, steps: int, engine: str) -> dict:
    cmd = [sys.executable, "-m", "megatron_less.cli", "train", str(REPO / "examples/configs/tiny_cpu.yaml"),
           f"model.hf_dir={hf_dir}", f"data.train_file={data}", f"output_dir={out}", f"train.steps={steps}",
           f"rollout.engine={engine}", f"rollout.n={N}", f"batch.prompts_per_step={PROMPTS}",
           f"batch.mini_batch_prompts={PROMPTS}", f"rollout.max_tokens={MAX_TOKENS}", "log.tensorboard=false",
           "checkpoint.every=0"]  # fmt: skip
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, text=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    phases = sorted(k for k in rows[0] if k.startswith("time/") and k != "time/step_s")
    return {"step_s": statistics.median(r["time/step_s"] for r in rows),
            "phases": {k[5:-2]: statistics.median(r[k] for r in rows) for k in phases}}  # fmt: skip


def trl_step(hf_dir: Path, data: Path, out: Path, steps: int) -> float:
    from datasets import Dataset
    from transformers import AutoTokenizer, Qwen2ForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from megatron_less.rewards.math import score_batch

    rows = [json.loads(line) for line in data.read_text().splitlines()]
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])

    def math_reward(completions, answer, **_):
        return [r.score for r in score_batch(completions, answer, num_workers=1)]

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    tok = AutoTokenizer.from_pretrained(hf_dir)
    args = GRPOConfig(output_dir=str(out), use_cpu=True, per_device_train_batch_size=PROMPTS * N, num_generations=N,
                      max_completion_length=MAX_TOKENS, temperature=1.0, learning_rate=1e-3, max_steps=steps,
                      logging_steps=1000, save_strategy="no", report_to="none", seed=1, beta=0.0)  # fmt: skip
    trainer = GRPOTrainer(model=Qwen2ForCausalLM.from_pretrained(hf_dir), reward_funcs=math_reward, args=args,
                          train_dataset=dataset, processing_class=tok, callbacks=[Clock()])  # fmt: skip
    start = time.perf_counter()
    trainer.train()
    times = [b - a for a, b in zip([start, *stamps], stamps)][1:]
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    try:
        import trl  # noqa: F401
    except ImportError:
        print("trl is not installed: pip install trl (see this script's docstring)", file=sys.stderr)
        return 2
    import importlib.util

    import torch

    from tests.train_fixtures import make_model

    torch.set_num_threads(os.cpu_count() or 1)
    root = Path(tempfile.mkdtemp(prefix="step-vs-trl-"))
    hf_dir, data = make_model(root)
    results = {"ours (builtin)": ours(hf_dir, data, root / "ours", args.steps, "builtin")}
    if importlib.util.find_spec("vllm"):
        results["ours (vllm)"] = ours(hf_dir, data, root / "ours_vllm", args.steps, "vllm")
    trl_s = trl_step(hf_dir, data, root / "trl", args.steps)
    print(f"{PROMPTS} prompts x {N} responses, <= {MAX_TOKENS} new tokens, median of steps 2..{args.steps}")
    print(f"  TRL GRPOTrainer       {trl_s:8.3f} s/step")
    for name, r in results.items():
        phases = ", ".join(f"{k} {v:.3f}" for k, v in r["phases"].items())
        print(f"  {name:<20}  {r['step_s']:8.3f} s/step  ({r['step_s'] / trl_s:.2f}x TRL)  [{phases}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
