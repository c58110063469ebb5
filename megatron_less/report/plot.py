"""``megatron-less plot RUN_DIR``: the run's curves as one PNG (reward and training accuracy,
held-out accuracy from the evaluations, response length, entropy, LESS token classes, update
health, rollout / trainer mismatch and its correction, dynamic sampling and overlong responses,
the step timeline, the rollout ranks' lead, throughput), from metrics.jsonl and eval.jsonl."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_less.report import run_files

LESS_CLASSES = (("less/frac_tokens_correct_only", "correct-only"), ("less/frac_tokens_incorrect_only", "incorrect-only"),
                ("less/frac_tokens_shared", "shared"), ("less/frac_high_entropy", "high-entropy (untouched)"))  # fmt: skip
MISMATCH = (("mismatch/kl_k3", "KL (k3)"), ("mismatch/abs_log_ratio_mean", "mean |log ratio|"),
            ("mismatch/token_frac_past", "tokens past threshold"))  # fmt: skip
KEPT = "dynamic/groups_kept_frac"  # derived: dynamic/groups_kept / dynamic/groups_generated


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` steps (RL curves are noisy step to step)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], float(r[key])) for r in rows if isinstance(r.get(key), (int, float))]
    return [s for s, _ in pts], [v for _, v in pts]


def _with_kept_frac(rows: list[dict]) -> list[dict]:
    def frac(r):
        kept, made = r.get("dynamic/groups_kept"), r.get("dynamic/groups_generated")
        ok = isinstance(kept, (int, float)) and isinstance(made, (int, float)) and made > 0
        return {KEPT: kept / made} if ok else {}

    return [dict(r, **frac(r)) for r in rows]


def _with_timeline(rows: list[dict]) -> list[dict]:
    """Derived per-step seconds of the timeline panel, for either placement: generation (the
    rollout ranks' under rollout.placement separate), training, and the trainers' waits."""

    def get(r, *keys):
        vals = [r[k] for k in keys if isinstance(r.get(k), (int, float))]
        return sum(vals) if vals else None

    out = []
    for r in rows:
        gen = get(r, "timeline/generate_s", "timeline/reward_s") if "timeline/generate_s" in r else get(
            r, "time/rollout_s", "time/reward_s")  # fmt: skip
        derived = {"_timeline/generation_s": gen, "_timeline/training_s": get(r, "time/old_logprobs_s",
                   "time/advantages_s", "time/update_s"), "_timeline/trainer_waits_s": get(
                   r, "time/rollout_wait_s", "timeline/trainer_wait_s")}  # fmt: skip
        out.append(dict(r, **{k: v for k, v in derived.items() if v is not None}))
    return out


TIMELINE = (("time/step_s", "step (trainers)"), ("_timeline/generation_s", "generation + reward"),
            ("_timeline/training_s", "training"), ("_timeline/trainer_waits_s", "trainers wait"),
            ("timeline/rollout_wait_s", "rollout ranks wait"), ("timeline/transfer_s", "weight transfer"))  # fmt: skip


def _panel(ax, rows, keys, title, window, log=False):
    """``log``: a log y-axis when every value is > 0 and they span a decade or more."""
    seen = []
    for key, label in keys:
        steps, values = _series(rows, key)
        if steps:
            (line,) = ax.plot(steps, values, alpha=0.25, linewidth=0.8)
            ax.plot(steps, smooth(values, window), color=line.get_color(), label=label)
            seen += values
    if log and seen and min(seen) > 0 and max(seen) >= 10 * min(seen):
        ax.set_yscale("log")
    ax.set_title(title)
    ax.set_xlabel("step")
    if ax.lines:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")


def _eval_panel(ax, evals):
    names = run_files.eval_metric_names(evals, "avg@")[-1:] + run_files.eval_metric_names(evals, "worst@")[-1:]
    for name in names:
        for bench, (steps, values) in run_files.eval_series(evals, name).items():
            ax.plot(steps, values, marker="o", label=f"{Path(bench).stem} {name}")
    ax.set_title("held-out accuracy (eval)")
    ax.set_xlabel("step")
    ax.set_ylim(0, 1)
    if ax.lines:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no evaluations (eval.every: 0)", ha="center", va="center", transform=ax.transAxes,
                color="grey")  # fmt: skip


def plot_run(run_dir: str | Path, out: str | Path | None = None, window: int = 5) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, evals = _with_timeline(_with_kept_frac(run_files.metrics(run_dir))), run_files.evals(run_dir)
    if not rows:
        raise run_files.RunError(f"{Path(run_dir) / 'metrics.jsonl'}: no steps logged yet")
    out = Path(out) if out else Path(run_dir) / "plots" / "curves.png"
    fig, axes = plt.subplots(4, 3, figsize=(15, 16))
    _panel(axes[0, 0], rows, [("reward/mean", "reward"), ("reward/accuracy", "accuracy")], "rollout reward", window)
    _eval_panel(axes[0, 1], evals)
    _panel(axes[0, 2], rows, [("response/length_mean", "mean"), ("response/length_max", "max")],
           "response length (tokens)", window)  # fmt: skip
    _panel(axes[1, 0], rows, [("rollout/entropy", "rollout"), ("actor/entropy", "update")], "token entropy", window)
    _panel(axes[1, 1], rows, LESS_CLASSES, "LESS token classes (fraction)", window)
    _panel(axes[1, 2], rows, [("actor/grad_norm", "grad norm"), ("actor/clipfrac", "clip fraction"),
                              ("actor/approx_kl", "approx KL")], "update", window)  # fmt: skip
    _panel(axes[2, 0], rows, MISMATCH, "rollout / trainer mismatch", window, log=True)
    _panel(axes[2, 1], rows, [(KEPT, "groups kept / generated"), ("overlong/excluded_frac", "truncated, out of the loss")],
           "dynamic sampling / overlong", window)  # fmt: skip
    _panel(axes[2, 2], rows, [("correction/weight_mean", "mean IS weight"),
                              ("loss/excluded_token_frac", "tokens out of the loss")], "off-policy correction", window)
    _panel(axes[3, 0], rows, TIMELINE, "step timeline (s)", window, log=True)
    _panel(axes[3, 1], rows, [("timeline/overlap", "generation hidden behind training"),
                              ("rollout/staleness", "staleness (steps)")], "rollout ahead (placement separate)", window)
    _panel(axes[3, 2], rows, [("perf/tokens_per_s", "tokens / s")], "throughput", window)
    fig.suptitle(f"{run_dir} (steps {rows[0]['step']}..{rows[-1]['step']}, thin: per step, thick: mean of {window})")
    return save_figure(fig, out)


def save_figure(fig, out: Path) -> Path:
    """Lay out, write (creating the folder) and release a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="megatron-less plot", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", help="a training run's output_dir")
    ap.add_argument("--out", help="PNG path (default RUN_DIR/plots/curves.png)")
    ap.add_argument("--window", type=int, default=5, help="steps in the smoothing window")
    args = ap.parse_args(argv)
    try:
        print(f"wrote {plot_run(args.run_dir, args.out, max(1, args.window))}")
    except run_files.RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
