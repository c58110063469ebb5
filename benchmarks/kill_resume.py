"""Kill -9 the whole torchrun job again and again during a tiny training run, resume each time with
``checkpoint.resume=auto``, and check that the run ends exactly where an uninterrupted one ends.

One uninterrupted reference run, then one chained run in another folder: each trial launches the
job (it resumes from the newest complete checkpoint), kills it - half the trials at a named
phase through the MLESS_FAULT hook (megatron_less/parallel/faults.py: during rollout, during
the update, during a checkpoint save; with --dynamic-sampling also in the middle of an extra
generation round, at a step where the reference run drew one), half at a random moment from outside (SIGKILL to
torchrun's agent and every process under it) - and records where it died. A last launch
finishes the run. Then every checkpoint the chained run wrote is compared with the reference's
of the same step, bit for bit: model and optimizer tensors, megatron's common state, the LR
schedule, data position and counters, each rank's RNG states; and every logged metric but
timings must be equal at every step.

    python benchmarks/kill_resume.py                    # 10 trials of a 20-step run, 2 ranks
    python benchmarks/kill_resume.py --trials 2 --steps 4 --every 1   # the CI version
    python benchmarks/kill_resume.py --dynamic-sampling  # DAPO's oversampling rounds on
    python benchmarks/kill_resume.py --separate --nproc 3  # 2 trainers + 1 vLLM rank one step ahead

Exit status 0 only when everything matched. tests/test_reliability.py runs the short version.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "examples" / "configs" / "tiny_cpu.yaml"
PHASES = ("save", "update", "rollout")
# dynamic sampling on: a step draws up to 3 prompt batches; the sampler's position counts them
DYNAMIC = ["algo.dynamic_sampling.enable=true", "algo.dynamic_sampling.max_rounds=3"]
# rollout ranks apart, one batch generated ahead (needs vLLM); named kills of the rollout phase
# hit the rollout rank (the last), of update and save a trainer rank
SEPARATE = ["rollout.engine=vllm", "rollout.placement=separate", "rollout.ranks=1", "rollout.max_staleness=1",
            "algo.correction=token_tis"]
VOLATILE = ("time/", "perf/", "timeline/")  # wall-clock figures: the only metrics allowed to differ


# --- launching and killing ---------------------------------------------------------------------


def overrides(hf: str, data: str, out: Path, steps: int, every: int) -> list[str]:
    return [f"model.hf_dir={hf}", f"data.train_file={data}", f"output_dir={out}", f"train.steps={steps}",
            f"checkpoint.every={every}", f"checkpoint.keep={steps}", "log.tensorboard=false", "rollout.n=4",
            "batch.prompts_per_step=4", "batch.mini_batch_prompts=2", "optim.lr_schedule=cosine",
            "optim.warmup_steps=1", "checkpoint.resume=auto"]  # fmt: skip


def launch(args: list[str], nproc: int, log: Path, fault: str | None = None) -> subprocess.Popen:
    from megatron_less.parallel.spawn import free_port

    env = dict(os.environ, OMP_NUM_THREADS="1", VLLM_CPU_OMP_THREADS_BIND="nobind", PYTHONWARNINGS="ignore",
               KILL_RESUME_JOB=f"{log}:{time.time()}")
    env.pop("MLESS_FAULT", None)
    if fault:
        env["MLESS_FAULT"] = fault
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "-m", "megatron_less.cli", "train", str(CONFIG), *args]  # fmt: skip
    with open(log, "ab") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    proc.tag = env["KILL_RESUME_JOB"]  # every process of the job inherits it
    return proc


def kill_tree(proc: subprocess.Popen) -> None:
    """kill -9 torchrun's agent and everything under it (workers run in their own sessions)."""
    import psutil

    try:
        root = psutil.Process(proc.pid)
        victims = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        victims = []
    for p in victims:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait()


def wait(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        raise RuntimeError(f"a training job did not finish in {timeout:.0f} s") from None


def no_stray_workers(proc: subprocess.Popen) -> None:
    """After a kill nothing of the job may be left running (it would write into the folder)."""
    import psutil

    def alive_of_job():
        out = []
        for p in psutil.process_iter():
            try:
                if p.status() != psutil.STATUS_ZOMBIE and p.environ().get("KILL_RESUME_JOB") == proc.tag:
                    out.append(p.pid)
            except (psutil.Error, OSError):
                pass
        return out

    for _ in range(50):  # SIGKILL is asynchronous: give the kernel a moment
        left = alive_of_job()
        if not left:
            return
        time.sleep(0.1)
    raise RuntimeError(f"processes of the killed job still run: {left}")


# --- what a run left ---------------------------------------------------------------------------


def ckpt_steps(out: Path) -> list[int]:
    from megatron_less.checkpoints import train_state

    return [int(p.name[5:]) for p in train_state.complete(out)]


def partials(out: Path) -> list[str]:
    root = out / "checkpoints"
    return sorted(p.name for p in root.glob("step_*.partial")) if root.is_dir() else []


def logged_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    last = 0
    for line in path.read_text().splitlines():
        try:
            last = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # a line torn by the kill
    return last


def metric_rows(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: {k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows}


def load_checkpoint_files(path: Path) -> dict:
    """Everything a training checkpoint holds, as plain objects, in one process (no torch.distributed):
    the torch_dist tensors (model and optimizer, whole), megatron's common state, the trainer
    state (less the output folder) and each rank's RNG states."""
    import torch
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    tensors: dict = {}
    _load_state_dict(tensors, storage_reader=FileSystemReader(str(path)), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)  # fmt: skip
    state = json.loads((path / "trainer_state.json").read_text())
    state["config"].pop("output_dir")
    ahead = path / "rollout_state.json"  # placement separate: the batches generated ahead
    rollout = json.loads(ahead.read_text()) if ahead.exists() else {}
    for batch in rollout.get("ahead", []):
        batch.pop("timeline")  # their wall-clock figures, the only part allowed to differ
    common = path / "common.pt"  # megatron-core < 0.19; later ones keep it among the DCP items above
    return {"tensors": tensors, "common": torch.load(common, weights_only=False) if common.exists() else None,
            "trainer_state": state, "rollout_state": rollout,
            "rng": {p.name: torch.load(p, weights_only=False) for p in sorted((path / "rng").iterdir())}}  # fmt: skip


def differences(a, b, where: str = "") -> list[str]:
    """Where two nested objects differ; tensors and arrays must be equal bit for bit."""
    import numpy as np
    import torch

    if torch.is_tensor(a) or torch.is_tensor(b):
        same = torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and bool(
            (a.reshape(-1).view(torch.uint8) == b.reshape(-1).view(torch.uint8)).all())  # fmt: skip
        return [] if same else [where]
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return [] if np.array_equal(a, b) else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where} keys {sorted(map(str, a.keys() ^ b.keys()))[:4]}"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}[{k!r}]")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where} length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [where]


# --- the trials --------------------------------------------------------------------------------


def trials(n: int, steps: int, every: int, nproc: int, work: Path, seed: int = 0, log=print, hf=None,
           data=None, extra: list[str] = (), phases: tuple[str, ...] = PHASES) -> dict:
    """Run the reference and ``n`` kill trials in ``work`` (on tests/train_fixtures.py's tiny
    model, or the given HF folder and training file); returns the table and the verdict.
    ``extra``: config overrides of every run; ``phases``: the named kill points taken in turn
    ("oversample" only at steps where the reference drew more than one batch)."""
    rng = random.Random(seed)
    separate = "rollout.placement=separate" in extra
    if hf is None:
        from tests.train_fixtures import make_model

        hf, data = make_model(work)
    ref, chain = work / "reference", work / "chain"
    t0 = time.monotonic()
    proc = launch(overrides(str(hf), str(data), ref, steps, every) + list(extra), nproc, work / "reference.log")
    first_row = None
    while proc.poll() is None:
        if first_row is None and logged_steps(ref) >= 1:
            first_row = time.monotonic() - t0
        time.sleep(0.05)
    if proc.returncode != 0:
        raise RuntimeError(f"the reference run failed (exit {proc.returncode}); see {work / 'reference.log'}")
    total = time.monotonic() - t0
    first_row = first_row or total
    per_step = (total - first_row) / max(steps - 1, 1)
    log(f"reference: {steps} steps in {total:.1f} s (first step logged at {first_row:.1f} s, then {per_step:.2f} s/step)")

    save_steps = [s for s in range(1, steps + 1) if s % every == 0 or s == steps]
    oversampled = [s for s, r in metric_rows(ref).items() if r.get("dynamic/rounds", 1) > 1]
    log(f"reference steps with more than one generation round: {oversampled}")
    args = overrides(str(hf), str(data), chain, steps, every) + list(extra)
    rows, wrote = [], {}
    for i in range(n):
        resume = max(ckpt_steps(chain), default=0)
        if resume >= steps:
            log(f"trial {i + 1}: the run is already complete; no more trials")
            break
        before = set(ckpt_steps(chain))
        t = time.monotonic()
        phase = phases[(i // 2) % len(phases)]
        later = {"save": [s for s in save_steps if s > resume],
                 "oversample": [s for s in oversampled if s > resume]}.get(phase, range(resume + 1, steps + 1))
        if i % 2 == 0 and later:  # a named phase, in turn, at a step shortly after the newest checkpoint
            at = rng.choice(list(later)[:3])
            rank = rng.randrange(nproc)
            if separate:  # rollout phases run on the rollout rank only, the others on trainers only
                rank = nproc - 1 if phase in ("rollout", "oversample") else rng.randrange(nproc - 1)
            fault, what = f"{phase}:{at}:{rank}", f"{phase} of step {at}"
            proc = launch(args, nproc, work / f"trial{i + 1}.log", fault)
            rc = wait(proc, 900)
            if rc == 0:
                raise RuntimeError(f"trial {i + 1}: MLESS_FAULT={fault} did not kill the job")
        else:  # a random moment: anywhere from half-way through start-up to the expected end
            delay = rng.uniform(0.5 * first_row, first_row + (steps - resume) * per_step)
            what = f"random, {delay:.1f} s after launch"
            proc = launch(args, nproc, work / f"trial{i + 1}.log")
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                pass
            if proc.poll() is None:
                kill_tree(proc)
            else:
                what += " (the job ended first)"
        no_stray_workers(proc)
        wrote[i] = sorted(set(ckpt_steps(chain)) - before)
        rows.append({"trial": i + 1, "kill": what, "died_s": round(time.monotonic() - t, 1),
                     "resumed_from": resume, "logged_to": logged_steps(chain), "partial_left": partials(chain),
                     "newest_complete": max(ckpt_steps(chain), default=0)})  # fmt: skip
        log(_row(rows[-1]))
    before = set(ckpt_steps(chain))
    rc = wait(launch(args, nproc, work / "final.log"), 900)
    if rc != 0:
        raise RuntimeError(f"the final resumed job failed (exit {rc}); see {work / 'final.log'}")
    wrote["final"] = sorted(set(ckpt_steps(chain)) - before)

    mismatches = {}
    ref_ckpts = set(ckpt_steps(ref))
    for s in ckpt_steps(chain):
        if s not in ref_ckpts:
            mismatches[f"step_{s}"] = ["missing in the reference"]
            continue
        diff = differences(load_checkpoint_files(ref / "checkpoints" / f"step_{s:06d}"),
                           load_checkpoint_files(chain / "checkpoints" / f"step_{s:06d}"))  # fmt: skip
        if diff:
            mismatches[f"step_{s}"] = diff[:5]
    a, b = metric_rows(ref), metric_rows(chain)
    metric_diff = [f"step {s}: {sorted(k for k in a[s] if a[s].get(k) != b.get(s, {}).get(k))[:4]}"
                   for s in a if a[s] != b.get(s)]  # fmt: skip
    if sorted(a) != sorted(b):
        metric_diff.append(f"steps logged: {sorted(a)} vs {sorted(b)}")
    for i, r in enumerate(rows):
        later = wrote.get(i + 1, wrote["final"])  # what the job that resumed after this kill wrote
        r["next_job_wrote"] = later
        r["equal"] = not any(f"step_{s}" in mismatches for s in later)
    ok = not mismatches and not metric_diff and ckpt_steps(chain) == sorted(ref_ckpts)
    return {"rows": rows, "mismatches": mismatches, "metric_diff": metric_diff, "ok": ok,
            "checkpoints": ckpt_steps(chain), "final_equal": f"step_{steps}" not in mismatches}  # fmt: skip


def _row(r: dict) -> str:
    return (f"| {r['trial']} | {r['kill']} | {r['died_s']} | {r['logged_to']} | {r['newest_complete']} | "
            f"{', '.join(r['partial_left']) or '-'} | {r['resumed_from']} |")


def table(res: dict) -> str:
    head = ("| trial | killed at | died after (s) | last step logged | newest complete ckpt | partial left | "
            "job resumed from | next job's checkpoints | bit-equal |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in res["rows"]:
        lines.append(f"{_row(r)} {', '.join(map(str, r['next_job_wrote'])) or '-'} | {'yes' if r['equal'] else 'NO'} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--every", type=int, default=2, help="checkpoint.every")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    ap.add_argument("--workdir", help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--dynamic-sampling", action="store_true",
                    help="DAPO dynamic sampling on; named kills also in the middle of an extra round")
    ap.add_argument("--phases", default=",".join(PHASES),
                    help=f"the named kill points, taken in turn by the even trials (of {', '.join(PHASES)}, "
                         "oversample)")
    ap.add_argument("--separate", action="store_true",
                    help="rollout.placement separate (the last rank generates one step ahead with vLLM; "
                         "--nproc counts it)")
    a = ap.parse_args()
    sys.path.insert(0, str(REPO))
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kill_resume_") as tmp:
        work = Path(a.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        kw = dict(extra=DYNAMIC, phases=("oversample", *PHASES)) if a.dynamic_sampling else {}
        if a.phases != ",".join(PHASES):
            kw["phases"] = tuple(a.phases.split(","))
        if a.separate:
            kw["extra"] = [*kw.get("extra", []), *SEPARATE]
        res = trials(a.trials, a.steps, a.every, a.nproc, work, a.seed, **kw)
    print(table(res))
    print(f"checkpoints compared: {res['checkpoints']}; final weights and optimizer bit-equal: {res['final_equal']}; "
          f"metrics equal at every step: {not res['metric_diff']}; {time.monotonic() - t0:.0f} s in all")
    for k, v in res["mismatches"].items():
        print(f"MISMATCH {k}: {v}")
    for m in res["metric_diff"]:
        print(f"METRICS DIFFER {m}")
    print("PASS" if res["ok"] else "FAIL")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
