"""The trainer's GPU path, one process, one GPU (run by tests/gpu/check.sh):

1. bf16 training with megatron's distributed optimizer (apex/TE's Adam where importable, else
   torch's with mcore_compat's checkpoint patches) and its checkpoint round trip: 3 steps
   straight vs 2 steps, a checkpoint, and step 3 resumed from it; the resumed step must match.
2. TransformerEngine's layer spec, when importable: HF -> TE model -> torch_dist checkpoint ->
   local-spec model -> HF is exact (both name sets go through megatron's sharded state dict).
3. The rollout engine's sleep/wake around training, when vLLM is importable: a level-2 sleep
   frees its memory, generation is refused until a sync, the sync wakes weights before the KV
   cache and gives the same greedy tokens and log-probs as before sleeping.
Prints the step time, tokens/s and weight-sync time ([TIME]). Result lines as
tests/gpu/checklib.py says; exits non-zero unless a check passed and none failed; without a GPU
it checks nothing and exits 1. The GPU counterpart of the bf16 branch of
tests/test_train.py::test_layout_checks_need_no_process_group (bf16 is refused without CUDA).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402
from checklib import Checks  # noqa: E402  (tests/gpu/ is this script's sys.path[0])

C = Checks("train_gpu")
REPO = Path(__file__).resolve().parent.parent.parent
check = C.check


def have(*modules: str) -> bool:
    return any(importlib.util.find_spec(m) is not None for m in modules)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(run) -> dict[str, torch.Tensor]:
    from megatron_less.parallel.gather import iter_all_hf_tensors

    return {n: t.detach().float().cpu().clone() for n, t in iter_all_hf_tensors(run.policy.module, run.arch)}


def round_trip(root: Path, hf_dir: Path, train_file: Path) -> None:
    from megatron_less.trainer.config import load_config
    from megatron_less.trainer.loop import train

    common = [f"model.hf_dir={hf_dir}", f"data.train_file={train_file}", "model.dtype=bf16",
              "optim.use_distributed_optimizer=true", "rollout.engine=builtin", "rollout.n=8",
              "batch.prompts_per_step=8", "batch.mini_batch_prompts=4", "batch.micro_batch_tokens=512",
              "train.steps=3", "log.tensorboard=false", "log.progress=false"]  # fmt: skip
    config = REPO / "examples" / "configs" / "tiny_cpu.yaml"
    straight = train(load_config(config, [*common, f"output_dir={root / 'straight'}", "checkpoint.every=2"]))
    peak = torch.cuda.max_memory_allocated() / 2**30
    ckpt = root / "straight" / "checkpoints" / "step_000002"
    resumed = train(load_config(config, [*common, f"output_dir={root / 'resumed'}", f"checkpoint.resume={ckpt}"]))
    a, b = _rows(root / "straight")[-1], _rows(root / "resumed")[-1]
    check("bf16 + distributed optimizer: resumed step 3 == straight step 3 (rollout, loss, grad norm)",
          a["step"] == b["step"] == 3 and a["reward/mean"] == b["reward/mean"]
          and abs(a["loss/total"] - b["loss/total"]) <= 1e-3 * max(1.0, abs(a["loss/total"]))
          and abs(a["actor/grad_norm"] - b["actor/grad_norm"]) <= 1e-3 * max(1.0, a["actor/grad_norm"]),
          f"loss {a['loss/total']:.6f} / {b['loss/total']:.6f}, grad norm {a['actor/grad_norm']:.6f} / "
          f"{b['actor/grad_norm']:.6f}")  # fmt: skip
    # lost Adam moments would change nearly every weight of step 3's update; GPU kernels that are
    # not bitwise deterministic change a few
    wa, wb = _weights(straight), _weights(resumed)
    differ = sum(int((wa[n] != wb[n]).sum()) for n in wa) / sum(t.numel() for t in wa.values())
    check("optimizer state survives the round trip (weights after step 3)", differ <= 0.01,
          f"{differ:.2%} of weights differ")
    for row in _rows(root / "straight")[1:]:
        C.time(f"step {row['step']}: {row['time/step_s'] * 1e3:.0f} ms, {row['perf/tokens_per_s']:,.0f} "
               f"tokens/s, weight sync {row.get('time/weight_sync_s', float('nan')) * 1e3:.1f} ms "
               f"(tiny model, built-in sampler); peak memory {peak:.2f} GiB")


def te_spec(root: Path, hf_dir: Path) -> None:
    if not have("transformer_engine"):
        C.skip("TransformerEngine layer spec (HF -> TE model -> checkpoint -> local model -> HF)",
               "transformer_engine is not importable")
        return
    from megatron_less.checkpoints.hf import HFCheckpoint
    from megatron_less.checkpoints.model import load_checkpoint, save_checkpoint
    from megatron_less.models import qwen2
    from megatron_less.models.policy import build_frozen
    from megatron_less.parallel.gather import iter_hf_tensors

    hf = HFCheckpoint(str(hf_dir))
    arch = qwen2.Qwen2Arch.from_hf(hf.config)
    te_model = build_frozen(arch, hf_weights=hf)[0]
    names = {type(m).__name__ for m in te_model.modules()}
    check("TE layer spec in use", any(n.startswith("TE") for n in names), f"({sorted(n for n in names if 'TE' in n)})")
    out = save_checkpoint(te_model, root / "te_ckpt", arch, hf_config=hf.config)
    local_model = build_frozen(arch, attention="local")[0]  # megatron-core's local modules
    load_checkpoint(local_model, out, arch)
    worst = max(float((t.float().cpu() - hf[n].float()).abs().max()) for n, t in iter_hf_tensors(local_model, arch))
    check("HF -> TE model -> checkpoint -> local model -> HF is exact", worst == 0.0, f"max diff {worst:.2e}")


def sleep_wake(root: Path, hf_dir: Path) -> None:
    if not have("vllm"):
        C.skip("vLLM sleep frees memory; wake + sync gives the same greedy tokens", "vllm is not importable")
        return
    from megatron_less.checkpoints.hf import HFCheckpoint
    from megatron_less.models import qwen2
    from megatron_less.models.policy import build_policy
    from megatron_less.rollout.base import SamplingParams
    from megatron_less.rollout.vllm_engine import VLLMEngine

    hf = HFCheckpoint(str(hf_dir))
    arch = qwen2.Qwen2Arch.from_hf(hf.config)
    policy = build_policy(arch, hf_weights=hf)
    engine = VLLMEngine(arch, gpu_memory_utilization=0.3, enable_sleep_mode=True)
    sync = engine.sync_weights(policy.module)
    sp = SamplingParams(temperature=0, max_tokens=16)
    prompts = [[1, 2, 3, 4], [5, 6, 7]]
    before = engine.generate(prompts, 1, sp)
    executor = engine.llm.llm_engine.model_executor
    free0 = torch.cuda.mem_get_info()[0]
    engine.sleep()  # level 2: weights discarded, not copied to host
    free1 = torch.cuda.mem_get_info()[0]
    try:
        engine.generate(prompts, 1, sp)
        refused = False
    except RuntimeError:
        refused = True
    engine.wake_up(("weights",))  # sync_weights' first stage, done here to measure it
    free2 = torch.cuda.mem_get_info()[0]
    staged = sorted(executor.sleeping_tags) == ["kv_cache"]
    engine.bucket_bytes = 1  # one bucket per layer, still one reload; raises if a module is missed
    sync2 = engine.sync_weights(policy.module)
    free3 = torch.cuda.mem_get_info()[0]
    after = engine.generate(prompts, 1, sp)
    lp_diff = max(abs(a - b) for x, y in zip(before, after) for a, b in zip(x[0].logprobs, y[0].logprobs))
    check("vLLM level-2 sleep frees memory", free1 - free0 > 2**30, f"{(free1 - free0) / 2**30:.2f} GiB freed")
    check("vLLM refuses to generate between sleep and sync", refused)
    check("vLLM wakes the weights before the KV cache", staged and free2 - free3 > 2**30,
          f"(KV cache woken after the sync: {(free2 - free3) / 2**30:.2f} GiB)")
    check("vLLM level-2 sleep + staged sync gives the same greedy tokens and log-probs",
          [r[0].token_ids for r in before] == [r[0].token_ids for r in after] and lp_diff < 1e-3,
          f"(max log-prob diff {lp_diff:.1e}, first sync {sync['seconds'] * 1e3:.1f} ms, "
          f"{sync2['buckets']} buckets {sync2['seconds'] * 1e3:.1f} ms)")
    check("vLLM fully awake after the sync", not executor.is_sleeping)
    engine.shutdown()


def main() -> int:
    if not torch.cuda.is_available():
        C.skip("every check of train_gpu", "no GPU (its CPU counterparts: tests/test_users_stack.py, "
               "tests/test_rollout_vllm.py)")
        return C.finish()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29512"),
                      RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from megatron_less.parallel import runtime
    from tests import train_fixtures

    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, apex/TE importable: "
          f"{have('apex')}/{have('transformer_engine')}, vLLM: {have('vllm')}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="mless-gpu-"))
    hf_dir, train_file = train_fixtures.make_model(root)
    with C.guard("bf16 training round trip (ran without an error)"):
        round_trip(root, hf_dir, train_file)
    runtime.initialize(1, 1, seed=1)
    with C.guard("TransformerEngine layer spec (ran without an error)"):
        te_spec(root, hf_dir)
    with C.guard("vLLM sleep/wake (ran without an error)"):
        sleep_wake(root, hf_dir)
    runtime.destroy()
    return C.finish()


if __name__ == "__main__":
    sys.exit(main())
