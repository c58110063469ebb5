"""``megatron-less compare``: the demo task under GRPO, GRPO + LESS, forking tokens, KL-Cov and
DAPO (and, on request, LESS with bf16 rollouts without and with truncated IS) over several seeds: a table (mean and std over seeds of the final held-out avg@k and worst@k,
and their change from the starting model) and a PNG of held-out accuracy over steps.

The toy-scale test of the LESS paper's claim (LESS raises average and worst-case accuracy and
lowers their variance). Each seed has its own task split, model and warm-up; within a seed every
method starts from the same model and sees the same prompts."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from megatron_less.demo import run as demo
from megatron_less.report.plot import save_figure

# Two optimizer steps per rollout batch (the LESS recipe takes 16): with one, every update is
# on-policy (ratio 1), clipping never acts and KL-Cov's |log ratio| penalty has zero gradient, so
# KL-Cov would be GRPO exactly. Half the demo's learning rate keeps the total step the same.
REGIME = ["batch.mini_batch_prompts=16", "optim.lr=1e-4"]
METHODS: dict[str, list[str]] = {
    "grpo": ["algo.shaper=none"],
    "less": ["algo.shaper=less"],
    "forking": ["algo.shaper=none", "algo.policy_loss=forking_tokens"],
    "kl_cov": ["algo.shaper=none", "algo.policy_loss=kl_cov", "algo.loss_kwargs={}"],
    # DAPO: GRPO + clip-higher (0.28, the demo's default) + token-mean + dynamic sampling + the soft
    # overlong penalty over the last 4 of the demo's 24 tokens
    "dapo": ["algo.shaper=none", "algo.dynamic_sampling.enable=true", "reward.overlong_buffer=4"],
    # bf16 vLLM rollouts beside the fp32 trainer (a real mismatch), without and with truncated IS
    "less+bf16": ["algo.shaper=less", "rollout.dtype=bf16"],
    "less+tis": ["algo.shaper=less", "rollout.dtype=bf16", "algo.correction=token_tis"],
}
DEFAULT_METHODS = ("grpo", "less", "forking", "kl_cov", "dapo")


def final_metrics(run_dir: Path) -> dict[str, float]:
    """avg@k, worst@k/2 and worst@k (k = eval.n) at the first and last evaluation (worst@k of a
    tiny model is near 0; k/2 has more resolution)."""
    _, rows = demo.before_after(run_dir)
    k = max(int(m.split("@")[1]) for m in rows if m.startswith("avg@"))
    out = {}
    for name in dict.fromkeys((f"avg@{k}", f"worst@{max(2, k // 2)}", f"worst@{k}")):
        out[name + " start"], out[name] = rows[name]
    return out


def _curve(run_dir: Path) -> tuple[list[int], list[float]]:
    from megatron_less.report import run_files

    evals = run_files.evals(run_dir)
    name = run_files.eval_metric_names(evals, "avg@")[-1]
    (steps, values), = run_files.eval_series(evals, name).values()
    return steps, values


def table(results: dict[str, dict[int, dict[str, float]]]) -> str:
    keys = sorted({k for per_seed in results.values() for m in per_seed.values() for k in m if " " not in k})
    head = f"{'method':<10}" + "".join(f"{k + ' mean':>15}{'std':>8}{'change':>9}" for k in keys) + "  seeds"
    lines = [head]
    for method, per_seed in results.items():
        cells = ""
        for k in keys:
            vals = [m[k] for m in per_seed.values()]
            deltas = [m[k] - m[k + " start"] for m in per_seed.values()]
            std = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells += f"{statistics.mean(vals):>15.3f}{std:>8.3f}{statistics.mean(deltas):>+9.3f}"
        lines.append(f"{method:<10}{cells}  {len(per_seed)}")
    return "\n".join(lines)


def plot(curves: dict[str, dict[int, tuple[list[int], list[float]]]], out: Path) -> Path:
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
    ax.set_title("demo task: held-out accuracy (thin: single seeds)")
    ax.legend(fontsize=8)
    return save_figure(fig, out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="megatron-less compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help=f"comma-separated, of {', '.join(METHODS)} (the bf16 ones need vLLM)")
    ap.add_argument("--warmup-steps", type=int, default=demo.WARMUP_STEPS)
    ap.add_argument("--nproc", type=int, default=1, help="processes per run (1: tp 1, the cheapest on 2 cores)")
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE overrides for every run (see megatron-less train)")
    args = ap.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        print(f"error: unknown method(s) {unknown}; choose from {list(METHODS)}", file=sys.stderr)
        return 2
    seeds = [int(s) for s in args.seeds.split(",") if s]
    out = Path(args.out)
    layout = ["log.progress=false"] + ([] if args.nproc > 1 else ["parallel.tp=1", "rollout.rollout_tp=1"])
    results: dict = {m: {} for m in methods}
    curves: dict = {m: {} for m in methods}
    t0 = time.perf_counter()
    for seed in seeds:
        files = demo.prepare(out / f"seed{seed}", seed, args.warmup_steps)  # shared by the seed's methods
        for method in methods:
            try:
                run_dir = demo.run_training(out / f"seed{seed}" / method, files, seed, args.nproc,
                                            layout + REGIME + METHODS[method] + args.overrides,
                                            quiet=True)  # fmt: skip
            except subprocess.CalledProcessError as e:
                print(f"error: {method} seed {seed}: training exited with {e.returncode}", file=sys.stderr)
                return 1
            results[method][seed] = final_metrics(run_dir)
            curves[method][seed] = _curve(run_dir)
            print(f"[compare] seed {seed} {method}: {results[method][seed]} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)  # fmt: skip
    text = table(results)
    (out / "compare.json").write_text(json.dumps({"results": results, "curves": curves}, indent=1) + "\n")
    (out / "compare.txt").write_text(text + "\n")
    png = plot(curves, out / "compare.png")
    print(f"\n{text}\n\nwrote {out / 'compare.txt'}, {out / 'compare.json'}, {png}")
    return 0
