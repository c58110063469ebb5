"""Colocated vs separate rollout ranks at equal total processes, side by side in one run.

    python benchmarks/async.py [--steps 12] [--nproc 2] [--workdir DIR]

Three runs of the demo's addition task (`megatron-less demo`'s model and data, its config at TP1)
with vLLM, each on ``--nproc`` processes:
  colocated        every rank generates (a vLLM replica each), then every rank trains (DP = nproc)
  separate, s=0    nproc-1 trainer ranks + 1 vLLM rank, synchronous (the colocated algorithm)
  separate, s=1    the same ranks, batch k+1 generated while the trainers train on batch k
                   (algo.correction token_tis for the one-step-stale responses)
Printed per run: seconds per step (median over the steps after the second, the last left out: it
holds the final evaluation), the timeline - generation + reward on the rollout side, the trainers'
phases, how long each side waited for the other, the weight transfer - the overlap fraction (the
share of a batch's generation the trainers did not wait for), the step-time ratio to colocated,
and the reward of the first and last three steps with the held-out avg@8 before and after.

What a 2-core machine can show: the schedule (who waits for whom, how much generation hides behind
training) and that every placement learns. What it cannot: the throughput gain of separate ranks
at scale. Here the cores are the only resource, every process competes for them, and colocated DP
already keeps both cores busy in both phases, so hiding generation behind training buys little;
on GPUs the gain comes from the long tail of a generation batch and from training and generation
each sized to its own devices. The GPU machine lent to this project has no vLLM, so this benchmark
cannot run there; tests/gpu/bridge_gpu.py measures the bridge's weight transfer over NCCL.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RUNS = {
    "colocated": [],
    "separate, s=0": ["rollout.placement=separate", "rollout.ranks=1", "rollout.max_staleness=0"],
    "separate, s=1": ["rollout.placement=separate", "rollout.ranks=1", "rollout.max_staleness=1",
                      "algo.correction=token_tis"],
}  # fmt: skip


def run(name: str, files, out: Path, steps: int, nproc: int, seed: int) -> list[dict]:
    from megatron_less.demo import run as demo

    overrides = [*demo.task_overrides("addition"), "parallel.tp=1", "rollout.engine=vllm", "rollout.rollout_tp=1",
                 f"train.steps={steps}", f"eval.every={steps}", "log.tensorboard=false", "log.progress=false",
                 *RUNS[name]]  # fmt: skip
    demo.run_training(out, files, seed, nproc, overrides, quiet=True)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def evals(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    return [next(v for k, v in r.items() if k.endswith("/avg@8")) for r in rows]


def summary(rows: list[dict]) -> dict:
    body = rows[2:-1] or rows  # warm-up steps and the last step (it waits for the final eval) left out
    med = lambda key: statistics.median(r.get(key, 0.0) for r in body)  # noqa: E731
    separate = "timeline/generate_s" in rows[0]
    train = med("time/old_logprobs_s") + med("time/advantages_s") + med("time/update_s")
    return {
        "step_s": med("time/step_s"),
        "generate_s": med("timeline/generate_s") + med("timeline/reward_s") if separate
        else med("time/rollout_s") + med("time/reward_s"),
        "train_s": train,
        "trainer_wait_s": med("time/rollout_wait_s") + med("timeline/trainer_wait_s") if separate else 0.0,
        "rollout_idle_s": med("timeline/rollout_wait_s") if separate else train,
        "transfer_s": med("timeline/transfer_s") if separate else med("time/weight_sync_s"),
        "overlap": med("timeline/overlap") if separate else 0.0,
        "staleness": max(r.get("rollout/staleness", 0.0) for r in rows),
        "reward_first": statistics.mean(r["reward/accuracy"] for r in rows[:3]),
        "reward_last": statistics.mean(r["reward/accuracy"] for r in rows[-3:]),
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--nproc", type=int, default=2, help="processes of every run (separate: one generates)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="keep the model and the runs here (default: a temporary folder)")
    a = ap.parse_args()
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # vLLM's CPU threads, as the tests run it
    from megatron_less.demo import run as demo

    with tempfile.TemporaryDirectory(prefix="async_") as tmp:
        work = Path(a.workdir or tmp)
        files = demo.prepare(work, a.seed)
        out = {}
        for name in RUNS:
            rows = run(name, files, work / name.replace(", ", "_").replace("=", ""), a.steps, a.nproc, a.seed)
            out[name] = summary(rows) | {"eval": evals(work / name.replace(", ", "_").replace("=", ""))}
    base = out["colocated"]["step_s"]
    print(f"{a.nproc} processes, {a.steps} steps of 32 prompts x 8 responses (addition task, vLLM, TP1); medians "
          "over steps 3..N-1, seconds")
    print("| run | s/step | vs colocated | generate+reward | train | trainer waits | rollout idle | transfer | "
          "overlap | max staleness | accuracy first 3 -> last 3 | held-out avg@8 before -> after |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, s in out.items():
        print(f"| {name} | {s['step_s']:.2f} | {s['step_s'] / base:.2f}x | {s['generate_s']:.2f} | {s['train_s']:.2f} | "
              f"{s['trainer_wait_s']:.2f} | {s['rollout_idle_s']:.2f} | {s['transfer_s']:.3f} | {s['overlap']:.2f} | "
              f"{s['staleness']:.0f} | {s['reward_first']:.3f} -> {s['reward_last']:.3f} | "
              f"{s['eval'][0]:.3f} -> {s['eval'][-1]:.3f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
