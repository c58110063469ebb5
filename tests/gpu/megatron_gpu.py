"""GPU checks for the Megatron side, one process, one GPU (run by tests/gpu/check.sh); the GPU
counterpart of tests/test_cpu_compat.py, which is skipped where CUDA exists.

1. No CPU patch is applied when CUDA is present.
2. Megatron Qwen2 logits vs transformers logits on the GPU: fp32 (max abs diff < 1e-3), and bf16
   (both models in bf16 against transformers' fp32 logits: megatron's error at most 2x
   transformers' own bf16 error + 1e-3).
3. Five GRPO-free training steps (plain next-token loss) on a fixed batch lower the loss by 20%.
4. The built-in sampler's greedy output == transformers' greedy output.
5. vLLM parity, when vllm is importable (it is not on the lent machine: a [SKIP]).
6. Timing: forward+backward tokens/s of a Qwen2.5-0.5B-shaped random model in bf16 ([TIME]).
Result lines as tests/gpu/checklib.py says; exits non-zero unless a check passed and none failed.
Without a GPU it checks nothing and exits 1; --cpu runs checks 2-4 in fp32 on the CPU as a dry
run of this script's logic (its exit status is that of the dry run).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402
from checklib import Checks  # noqa: E402  (tests/gpu/ is this script's sys.path[0])

C = Checks("megatron_gpu")


def main() -> int:
    on_gpu = torch.cuda.is_available()
    if not on_gpu and "--cpu" not in sys.argv:
        C.skip("every check of megatron_gpu", "no GPU (use --cpu for a CPU dry run of the logic)")
        return C.finish()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29511"),
                      RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import megatron.core

    from megatron_less.models import hf_mapping, qwen2
    from megatron_less.models.schedule import forward_logits
    from megatron_less.parallel import mcore_compat, runtime
    from megatron_less.rollout.base import SamplingParams
    from megatron_less.rollout.builtin import BuiltinSampler
    from megatron_less.models.policy import OptimConfig, build_frozen, build_policy, forward_backward
    from tests import tiny

    dev = "cuda" if on_gpu else "cpu"  # the CPU run is a dry run of this script's logic
    print(f"torch {torch.__version__}, megatron-core {megatron.core.__version__}, "
          f"device {torch.cuda.get_device_name() if on_gpu else 'cpu (dry run)'}", flush=True)
    runtime.initialize(1, 1, seed=1)
    if on_gpu:
        active = [n for n, p in mcore_compat.PATCHES.items() if p.saved]
        C.check("no CPU patches with CUDA", not mcore_compat.apply() and not active, f"patched: {active or 'none'}")
    else:
        C.skip("no CPU patches with CUDA", "CPU dry run")

    hf = tiny.hf_model(0, **tiny.ROLLOUT).to(dev)
    arch = qwen2.Qwen2Arch.from_hf(hf.config)
    policy = build_policy(arch, hf_weights={k: v.cpu() for k, v in hf.state_dict().items()},
                          optim=OptimConfig(lr=1e-3, clip_grad=1.0))
    tokens = torch.randint(0, arch.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0)).to(dev)
    with torch.no_grad():
        ref = hf(tokens).logits.float()
    got = forward_logits(policy.model, tokens)[..., : arch.vocab_size].float()
    diff = (got - ref).abs().max().item()
    C.check("logits vs transformers (fp32)", diff < 1e-3, f"max abs diff {diff:.2e} (threshold 1e-3)")
    if on_gpu:
        with C.guard("logits vs transformers (bf16)"):
            hf16 = copy.deepcopy(hf).to(torch.bfloat16)
            with torch.no_grad():
                ref16 = hf16(tokens).logits.float()
            frozen = build_frozen(arch, params_dtype=torch.bfloat16,
                                  hf_weights={k: v.cpu() for k, v in hf.state_dict().items()})
            got16 = forward_logits(frozen, tokens)[..., : arch.vocab_size].float()
            e_meg, e_hf = (got16 - ref).abs().max().item(), (ref16 - ref).abs().max().item()
            C.check("logits vs transformers (bf16)", e_meg <= 2 * e_hf + 1e-3,
                    f"max abs diff from transformers' fp32 logits: megatron bf16 {e_meg:.2e}, transformers bf16 "
                    f"{e_hf:.2e} (threshold 2 x transformers' + 1e-3 = {2 * e_hf + 1e-3:.2e})")
            del hf16, frozen
    else:
        C.skip("logits vs transformers (bf16)", "CPU dry run")

    def fwd(it, model):
        t = next(it)
        pos = torch.arange(t.shape[1] - 1, device=t.device).expand(t.shape[0], -1)
        out = model(t[:, :-1], pos, None, labels=t[:, 1:])
        return out, lambda o: (o.float().mean(), {"loss": o.float().mean().detach().clone()})

    losses = []
    for _ in range(5):
        res = forward_backward(policy, list(tokens.chunk(2)), fwd, num_microbatches=2, seq_length=63, micro_batch_size=2)
        policy.optimizer.step()
        losses.append(sum(r["loss"].item() for r in res) / len(res))
    C.check("5 training steps lower the loss by 20%", losses[-1] < 0.8 * losses[0],
            f"{losses[0]:.4f} -> {losses[-1]:.4f} (threshold {0.8 * losses[0]:.4f})")

    hf_mapping.load_hf_weights(policy.module, {k: v.cpu() for k, v in hf.state_dict().items()}, arch)
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
    greedy = BuiltinSampler(policy.model, arch).generate(prompts, 1, SamplingParams(temperature=0, max_tokens=8))
    hf_greedy = [hf.generate(torch.tensor([p]).to(dev), max_new_tokens=8, min_new_tokens=8, do_sample=False)[0, len(p):].tolist()
                 for p in prompts]
    ours = [g[0].token_ids for g in greedy]
    C.check("built-in sampler greedy == transformers greedy", ours == hf_greedy, f"{ours} vs {hf_greedy}")

    if importlib.util.find_spec("vllm") is None:
        C.skip("vLLM greedy == built-in greedy", "vllm is not installed on this machine")
    else:
        from megatron_less.rollout.vllm_engine import VLLMEngine

        engine = VLLMEngine(arch, gpu_memory_utilization=0.2)
        sync = engine.sync_weights(policy.module)
        v = engine.generate(prompts, 1, SamplingParams(temperature=0, max_tokens=8))
        C.check("vLLM greedy == built-in greedy", [r[0].token_ids for r in v] == ours,
                f"(sync {sync['seconds'] * 1e3:.1f} ms)")
        engine.shutdown()

    if not on_gpu:
        C.skip("bf16 train-step timing", "CPU dry run")
        return C.finish()
    # Timing: Qwen2.5-0.5B shapes (hidden 896, 24 layers, 14 heads / 2 KV, vocab 151,936), bf16.
    big = qwen2.Qwen2Arch.from_hf(dict(tiny.BASE, vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                       num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                       max_position_embeddings=4096, tie_word_embeddings=True))
    pol = build_policy(big, params_dtype=torch.bfloat16, optim=OptimConfig(lr=1e-6))
    b, s = 4, 2048
    toks = torch.randint(0, big.vocab_size, (2 * b, s + 1), device="cuda")
    for i in range(4):
        if i == 1:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
        forward_backward(pol, list(toks.chunk(2)), fwd, num_microbatches=2, seq_length=s, micro_batch_size=b)
        pol.optimizer.step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / 3
    n_params = sum(p.numel() for p in pol.module.parameters())
    tflops = 6 * n_params * 2 * b * s / dt / 1e12
    C.time(f"Qwen2.5-0.5B-shaped bf16 train step (2 x {b} x {s} tokens): {dt * 1e3:.1f} ms, "
           f"{2 * b * s / dt:,.0f} tokens/s, ~{tflops:.0f} TFLOP/s (6*N*tokens, attention excluded), "
           f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    runtime.destroy()
    return C.finish()


if __name__ == "__main__":
    sys.exit(main())
