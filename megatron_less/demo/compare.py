"""``megatron-less compare``: a demo task under GRPO, GRPO + LESS, forking tokens, KL-Cov and DAPO
(and, on request, LESS with bf16 rollouts without and with truncated IS) over several seeds: a
table of the final held-out avg@k, worst@k and std@k (mean ± 95% t-interval over seeds, change
from the starting model, paired per-seed differences against GRPO) and a PNG of held-out
accuracy over steps.

The toy-scale test of the LESS paper's claim (LESS raises average and worst-case accuracy and
lowers their variance). As in the paper (one base model, several RL runs), every seed starts from
one warmed-up model on one task split, and the seed drives the RL run: prompt order and sampling.
Within a seed every method sees the same prompts. ``--model-per-seed`` gives each seed its own
split and warm-up instead (a wider notion of noise, at one warm-up per seed).

    megatron-less compare [--task chain] [--seeds 0,1,2,3,4] [--methods grpo,less] [--quick]"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from megatron_less.demo import run as demo
from megatron_less.demo import tasks
from megatron_less.eval.seeds import mean_interval, paired
from megatron_less.report.plot import save_figure

# Per task, what every method shares. Two optimizer steps per rollout batch (the LESS recipe
# takes 16): with one, every update is on-policy (ratio 1), clipping never acts and KL-Cov's
# |log ratio| penalty has zero gradient, so KL-Cov would be GRPO exactly.
REGIME = {
    # the demo's 60 steps of 32 prompts x 8, half its learning rate for the two steps per batch
    "addition": ["batch.mini_batch_prompts=16", "optim.lr=1e-4"],
    # the chain-of-thought tasks: ~3x the addition task's tokens per response, so half the prompts
    # per step; 64 held-out problems x 8 per evaluation
    "chain": ["train.steps=30", "batch.prompts_per_step=16", "batch.mini_batch_prompts=8", "optim.lr=1e-4",
              "eval.every=10", "eval.limit=64", "batch.micro_batch_tokens=8192", "log.rollouts_per_step=16"],
    "columns": ["train.steps=30", "batch.prompts_per_step=16", "batch.mini_batch_prompts=8", "optim.lr=1e-4",
                "eval.every=10", "eval.limit=64", "batch.micro_batch_tokens=8192", "log.rollouts_per_step=16"],
}  # fmt: skip
# --quick: a smoke test (a few steps, a few problems), not a comparison
QUICK = ["train.steps=2", "eval.every=2", "eval.limit=4", "eval.n=2", "batch.prompts_per_step=4",
         "batch.mini_batch_prompts=4"]  # fmt: skip


def methods_for(task: str) -> dict[str, list[str]]:
    """Each method's config keys on ``task``; DAPO's overlong buffer is the last sixth of its
    max_tokens (4 of the addition task's 24)."""
    buffer = max(1, tasks.get_task(task).max_tokens // 6)
    return {
        "grpo": ["algo.shaper=none"],
        "less": ["algo.shaper=less"],
        "forking": ["algo.shaper=none", "algo.policy_loss=forking_tokens"],
        "kl_cov": ["algo.shaper=none", "algo.policy_loss=kl_cov", "algo.loss_kwargs={}"],
        # DAPO: GRPO + clip-higher (0.28, the default) + token-mean + dynamic sampling + soft overlong penalty
        "dapo": ["algo.shaper=none", "algo.dynamic_sampling.enable=true", f"reward.overlong_buffer={buffer}"],
        # bf16 vLLM rollouts beside the fp32 trainer (a real mismatch), without and with truncated IS
        "less+bf16": ["algo.shaper=less", "rollout.dtype=bf16"],
        "less+tis": ["algo.shaper=less", "rollout.dtype=bf16", "algo.correction=token_tis"],
    }


METHODS = tuple(methods_for("addition"))
DEFAULT_METHODS = ("grpo", "less", "forking", "kl_cov", "dapo")


def final_metrics(run_dir: Path) -> dict[str, float]:
    """The paper's metrics at the first and last evaluation (k = eval.n): avg@k, worst@k/2 and
    worst@k (worst@k of a tiny model is near 0; k/2 has more resolution), std@k."""
    _, rows = demo.before_after(run_dir)
    k = max(int(m.split("@")[1]) for m in rows if m.startswith("avg@"))
    out = {}
    for name in dict.fromkeys((f"avg@{k}", f"worst@{max(2, k // 2)}", f"worst@{k}", f"std@{k}")):
        if name in rows:
            out[name + " start"], out[name] = rows[name]
    return out


def _curve(run_dir: Path) -> tuple[list[int], list[float]]:
    from megatron_less.report import run_files

    evals = run_files.evals(run_dir)
    name = run_files.eval_metric_names(evals, "avg@")[-1]
    (steps, values), = run_files.eval_series(evals, name).values()
    return steps, values


def _lower_is_better(metric: str) -> bool:
    return metric.startswith("std@")  # spread over a problem's samples: the paper wants it low


def table(results: dict[str, dict[int, dict[str, float]]], baseline: str = "grpo") -> str:
    """Per method and metric: the final value's mean ± 95% t-interval over seeds and its change
    from the starting model; then each method's paired per-seed differences against ``baseline``
    (mean ± 95% interval, seeds won), saying plainly where the interval includes zero."""
    keys = sorted({k for per_seed in results.values() for m in per_seed.values() for k in m if " " not in k},
                  key=lambda k: (["avg", "worst", "std"].index(k.split("@")[0]), int(k.split("@")[1])))
    seeds = max(len(per_seed) for per_seed in results.values())
    lines = [f"final held-out metrics, mean ± 95% t-interval over seeds (change from the start in brackets)",
             f"{'method':<11}" + "".join(f"{k:>26}" for k in keys) + "  seeds"]
    for method, per_seed in results.items():
        cells = ""
        for k in keys:
            iv = mean_interval([m[k] for m in per_seed.values()])
            change = statistics.mean(m[k] - m[k + " start"] for m in per_seed.values())
            cells += f"{str(iv) + f' ({change:+.3f})':>26}"
        lines.append(f"{method:<11}{cells}  {len(per_seed)}")
    if baseline in results and len(results) > 1 and seeds > 1:
        lines += ["", f"paired differences against {baseline} (method - {baseline} on each seed, mean ± 95% "
                      f"t-interval; seeds where the method is better; std@k: lower is better)",
                  f"{'method':<11}" + "".join(f"{k:>34}" for k in keys)]
        for method, per_seed in results.items():
            if method == baseline:
                continue
            cells = ""
            for k in keys:
                pr = paired({s: m[k] for s, m in per_seed.items()}, {s: m[k] for s, m in results[baseline].items()},
                            lower_is_better=_lower_is_better(k))  # fmt: skip
                d = pr.diff
                mark = " =" if d.half == 0 and d.mean != 0 else " ~0" if d.includes_zero() else " *"
                text = f"{d.mean:+.3f} ± {d.half:.3f} {pr.wins}/{pr.n}{mark}"
                cells += f"{text:>34}"
            lines.append(f"{method:<11}{cells}")
        lines.append("~0: the interval includes zero - no difference shown at these seeds; *: it excludes zero; "
                     "=: the same difference on every seed (no spread to judge it by)")
    return "\n".join(lines)


def plot(curves: dict[str, dict[int, tuple[list[int], list[float]]]], out: Path, task: str = "addition") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, per_seed in curves.items():
        runs = list(per_seed.values())
        steps = runs[0][0]
        mean = [statistics.mean(r[1][i] for r in runs) for i in range(len(steps))]
        (line,) = ax.plot(steps, mean, marker="o", label=f"{method} (mean of {len(runs)} seeds)")
        for s, v in runs:
            ax.plot(s, v, color=line.get_color(), alpha=0.25, linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out avg@k")
    ax.set_title(f"{task} task: held-out accuracy (thin: single seeds)")
    ax.legend(fontsize=8)
    return save_figure(fig, out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="megatron-less compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--task", default="addition", choices=sorted(tasks.TASKS))
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default 0-4; --quick: 0,1)")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help=f"comma-separated, of {', '.join(METHODS)} (the bf16 ones need vLLM)")
    ap.add_argument("--warmup-steps", type=int, default=None, help="supervised warm-up steps (default: the task's)")
    ap.add_argument("--nproc", type=int, default=1, help="processes per run (1: tp 1, the cheapest on 2 cores)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="trainings at a time (each single-threaded; default: up to 2, one per core)")
    ap.add_argument("--model-per-seed", action="store_true",
                    help="each seed its own task split and warm-up (default: one model, built with seed 0)")
    ap.add_argument("--quick", action="store_true", help="a smoke test: 2 seeds, 2 steps, 4 problems, short warm-up")
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE overrides for every run (see megatron-less train)")
    args = ap.parse_args(argv)
    table_methods = methods_for(args.task)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in table_methods]
    if unknown:
        print(f"error: unknown method(s) {unknown}; choose from {list(table_methods)}", file=sys.stderr)
        return 2
    seeds = [int(s) for s in (args.seeds or ("0,1" if args.quick else "0,1,2,3,4")).split(",") if s]
    warmup = args.warmup_steps if args.warmup_steps is not None else (40 if args.quick else None)
    out = Path(args.out)
    layout = ["log.progress=false"] + ([] if args.nproc > 1 else ["parallel.tp=1", "rollout.rollout_tp=1"])
    shared = layout + demo.task_overrides(args.task) + REGIME[args.task] + (QUICK if args.quick else [])
    results: dict = {m: {} for m in methods}
    curves: dict = {m: {} for m in methods}
    t0 = time.perf_counter()
    if args.model_per_seed:
        files = {seed: demo.prepare(out / f"seed{seed}", seed, warmup, args.task) for seed in seeds}
    else:
        files = dict.fromkeys(seeds, demo.prepare(out / "base", 0, warmup, args.task))

    def train(seed: int, method: str) -> tuple[int, str, Path]:
        try:
            return seed, method, demo.run_training(out / f"seed{seed}" / method, files[seed], seed, args.nproc,
                                                   shared + table_methods[method] + args.overrides, quiet=True)
        except subprocess.CalledProcessError as e:
            raise RuntimeError(f"{method} seed {seed}: training exited with {e.returncode}") from None

    # runs are independent (each seeded, one thread each): `jobs` of them at a time use the cores
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for future in as_completed([pool.submit(train, seed, m) for seed in seeds for m in methods]):
            try:
                seed, method, run_dir = future.result()
            except RuntimeError as e:
                print(f"error: {e}", file=sys.stderr)
                pool.shutdown(cancel_futures=True)  # the runs already going finish; none start
                return 1
            results[method][seed] = final_metrics(run_dir)
            curves[method][seed] = _curve(run_dir)
            print(f"[compare] seed {seed} {method}: {results[method][seed]} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)  # fmt: skip
    results = {m: dict(sorted(r.items())) for m, r in results.items()}
    curves = {m: dict(sorted(c.items())) for m, c in curves.items()}
    text = table(results) + f"\n\ntask {args.task}, seeds {seeds}, {time.perf_counter() - t0:.0f} s"
    (out / "compare.json").write_text(json.dumps({"task": args.task, "results": results, "curves": curves}, indent=1)
                                      + "\n")  # fmt: skip
    (out / "compare.txt").write_text(text + "\n")
    png = plot(curves, out / "compare.png", args.task)
    print(f"\n{text}\n\nwrote {out / 'compare.txt'}, {out / 'compare.json'}, {png}")
    return 0
