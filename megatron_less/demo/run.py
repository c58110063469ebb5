"""``megatron-less demo``: the real system on a laptop CPU in minutes. It writes the embedded
addition task (no download), builds and warms up a tiny Qwen2 (cached), then runs
`megatron-less train` with GRPO + LESS at TP2 under torchrun; the training job evaluates the
held-out problems before its first step and after its last. Then it prints the before/after
table and writes the curves (`megatron-less plot`) and a rollout page (`megatron-less view`).

    megatron-less demo [--out runs/demo] [--seed 0] [KEY=VALUE ...]   # overrides as for train
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from megatron_less.demo import model, tasks
from megatron_less.demo.task import write_jsonl

CONFIG = Path(__file__).with_name("demo.yaml")


def prepare(out: Path, seed: int, warmup_steps: int | None = None, task: str = "addition") -> tuple[Path, Path, Path]:
    """(model folder, training file, held-out file) for this seed and task; the model is reused
    when a previous run built it with the same settings. ``warmup_steps``: the task's default."""
    t = tasks.get_task(task)
    steps = t.warmup_steps if warmup_steps is None else warmup_steps
    train_rows, heldout_rows = t.split(seed)
    train_file = write_jsonl(train_rows, out / "data" / "train.jsonl")
    heldout_file = write_jsonl(heldout_rows, out / "data" / "heldout.jsonl")
    model_dir = out / "model"
    info = model_dir / "warmup.json"
    want = {"warmup_steps": steps, "seed": seed, "problems": len(train_rows), "task": t.name}
    if not (info.is_file() and all(json.loads(info.read_text()).get(k) == v for k, v in want.items())):
        print(f"[demo] building the tiny model: {steps} supervised warm-up steps on {len(train_rows)} "
              f"training problems of task {t.name}", flush=True)  # fmt: skip
        model.build_model(model_dir, train_rows, t.target, steps=steps, lr=t.warmup_lr, seed=seed, **t.arch)
        info.write_text(json.dumps({**json.loads(info.read_text()), "task": t.name}, indent=1) + "\n")
    w = json.loads(info.read_text())
    print(f"[demo] model {model_dir}: {w['warmup_steps']} warm-up steps, final loss {w['final_loss']:.3f}, "
          f"built in {w['seconds']:.0f} s", flush=True)  # fmt: skip
    return model_dir, train_file, heldout_file


def task_overrides(task: str) -> list[str]:
    """The config keys a task sets (its lengths), before any given on the command line."""
    t = tasks.get_task(task)
    return [f"rollout.max_tokens={t.max_tokens}", f"eval.max_tokens={t.max_tokens}",
            f"data.max_prompt_tokens={t.max_prompt_tokens}"]  # fmt: skip


def train_command(config: Path, nproc: int, overrides: list[str]) -> list[str]:
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    if nproc == 1:
        launch = [sys.executable]
    return [*launch, "-m", "megatron_less.cli", "train", str(config), *overrides]


def run_training(run_dir: Path, files: tuple[Path, Path, Path], seed: int, nproc: int, overrides: list[str], *,
                 config: Path = CONFIG, quiet: bool = False) -> Path:
    """Train on ``prepare``'s files into ``run_dir``. Raises CalledProcessError when training fails."""
    model_dir, train_file, heldout_file = files
    paths = [f"model.hf_dir={model_dir}", f"data.train_file={train_file}", f"eval.benchmarks=[{heldout_file}]",
             f"output_dir={run_dir}", f"seed={seed + 1}"]  # fmt: skip
    cmd = train_command(config, nproc, paths + list(overrides))
    print("[demo] " + " ".join(cmd), flush=True)
    # one thread per process on a small machine; vLLM's start-up chatter kept to its warnings
    # and the import-time notes (apex, TransformerEngine, Triton absent on a CPU) left out
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               VLLM_LOGGING_LEVEL=os.environ.get("VLLM_LOGGING_LEVEL", "ERROR"),
               PYTHONWARNINGS=os.environ.get("PYTHONWARNINGS", "ignore"))
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL if quiet else None)
    return run_dir


def before_after(run_dir: Path) -> tuple[str, dict[str, tuple[float, float]]]:
    """The held-out metrics at the first and last evaluation, as a table and as numbers."""
    from megatron_less.report import run_files

    evals = run_files.evals(run_dir)
    if len(evals) < 2:
        raise run_files.RunError(f"{run_dir}/eval.jsonl: needs evaluations before and after training")
    first, last = evals[0], evals[-1]
    rows = {}
    for key, v in last.items():
        parts = key.split("/")
        kind, _, k = parts[-1].partition("@")
        shown = kind in ("avg", "maj", "std") or (kind in ("pass", "worst") and k != "1")  # @1 repeats avg
        if parts[0] == "eval" and key in first and shown:
            rows[parts[-1]] = (float(first[key]), float(v))
    order = sorted(rows, key=lambda m: (["avg", "worst", "pass", "maj", "std"].index(m.split("@")[0]),
                                        int(m.split("@")[1])))  # fmt: skip
    lines = [f"held-out problems  {'step ' + str(first['step']):>9} {'step ' + str(last['step']):>9}   change"]
    lines += [f"  {m:<16} {rows[m][0]:>9.3f} {rows[m][1]:>9.3f} {rows[m][1] - rows[m][0]:>+8.3f}" for m in order]
    return "\n".join(lines), rows


def _mixed_step(run_dir: Path) -> int | None:
    """The last step whose logged group has both right and wrong answers (LESS shapes those)."""
    from megatron_less.report import run_files

    outcomes: dict[tuple, set] = {}
    for r in run_files.read_jsonl(run_dir / "rollouts.jsonl"):
        outcomes.setdefault((r["step"], r["group"]), set()).add(bool(r["correct"]))
    mixed = [step for (step, _), seen in outcomes.items() if len(seen) == 2]
    return max(mixed) if mixed else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="megatron-less demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/demo", help="folder for the data, the model and the run")
    ap.add_argument("--seed", type=int, default=0, help="the task split, model init and warm-up seed")
    ap.add_argument("--nproc", type=int, default=2, help="processes (parallel.tp x pp x data-parallel)")
    ap.add_argument("--task", default="addition", choices=sorted(tasks.TASKS),
                    help="the embedded task (columns: multi-digit addition worked column by column)")
    ap.add_argument("--warmup-steps", type=int, default=None, help="supervised warm-up steps (default: the task's)")
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides (see megatron-less train)")
    args = ap.parse_args(argv)
    from megatron_less.report import plot, run_files, viewer

    t0 = time.perf_counter()
    out = Path(args.out)
    try:
        files = prepare(out, args.seed, args.warmup_steps, args.task)
        run_dir = run_training(out / "train", files, args.seed, args.nproc, task_overrides(args.task) + args.overrides)
    except subprocess.CalledProcessError as e:
        print(f"[demo] error: training exited with {e.returncode}", file=sys.stderr)
        return 1
    train_s = sum(r.get("time/step_s", 0.0) for r in run_files.metrics(run_dir))
    table, _ = before_after(run_dir)
    curves = plot.plot_run(run_dir)
    page = viewer.write_page(run_dir, _mixed_step(run_dir))
    print(f"\n{table}\n\n[demo] training steps took {train_s:.0f} s; the whole demo {time.perf_counter() - t0:.0f} s")
    print(f"[demo] curves: {curves}\n[demo] rollouts: {page}\n[demo] logs: {run_dir}/metrics.jsonl, "
          f"{run_dir}/tensorboard (tensorboard --logdir {run_dir})")  # fmt: skip
    return 0
