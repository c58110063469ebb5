"""GPU checks for the Megatron side, one process, one GPU (run by tests/gpu/check.sh).

1. No CPU patch is applied when CUDA is present.
2. Megatron Qwen2 logits == transformers logits on the GPU (fp32; bf16 reported).
3. A few GRPO-free training steps (plain next-token loss) lower the loss on a fixed batch.
4. The built-in sampler's greedy output == transformers' greedy output.
5. vLLM parity, when vllm is importable (it is not on the lent machine: reported as skipped).
6. Timing: forward+backward tokens/s of a Qwen2.5-0.5B-shaped random model in bf16.
Prints one line per figure; exits non-zero on a failed check.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402

FAILED: list[str] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    print(f"[{'PASS' if ok else 'FAIL'}] {name} {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def main() -> int:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29511"),
                      RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import megatron.core

    from megatron_less.models import qwen2
    from megatron_less.models.schedule import forward_logits
    from megatron_less.parallel import mcore_compat, runtime
    from megatron_less.rollout.base import SamplingParams
    from megatron_less.rollout.builtin import BuiltinSampler
    from megatron_less.models.policy import OptimConfig, build_policy, forward_backward
    from tests import tiny

    on_gpu = torch.cuda.is_available()
    dev = "cuda" if on_gpu else "cpu"  # the CPU run is a dry run of this script's logic
    print(f"torch {torch.__version__}, megatron-core {megatron.core.__version__}, "
          f"device {torch.cuda.get_device_name() if on_gpu else 'cpu (dry run)'}", flush=True)
    runtime.initialize(1, 1, seed=1)
    if on_gpu:
        check("no CPU patches with CUDA", not mcore_compat.apply() and not any(p.saved for p in mcore_compat.PATCHES.values()))

    hf = tiny.hf_model(0, **tiny.ROLLOUT).to(dev)
    arch = qwen2.Qwen2Arch.from_hf(hf.config)
    policy = build_policy(arch, hf_weights={k: v.cpu() for k, v in hf.state_dict().items()},
                          optim=OptimConfig(lr=1e-3, clip_grad=1.0))
    tokens = torch.randint(0, arch.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0)).to(dev)
    with torch.no_grad():
        ref = hf(tokens).logits.float()
    got = forward_logits(policy.model, tokens)[..., : arch.vocab_size].float()
    diff = (got - ref).abs().max().item()
    check("logits vs transformers (fp32)", diff < 1e-3, f"max abs diff {diff:.2e}")

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
    check("training steps lower the loss", losses[-1] < losses[0], f"{losses[0]:.4f} -> {losses[-1]:.4f}")

    qwen2.load_hf_weights(policy.module, {k: v.cpu() for k, v in hf.state_dict().items()}, arch)
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
    greedy = BuiltinSampler(policy.model, arch).generate(prompts, 1, SamplingParams(temperature=0, max_tokens=8))
    hf_greedy = [hf.generate(torch.tensor([p]).to(dev), max_new_tokens=8, min_new_tokens=8, do_sample=False)[0, len(p):].tolist()
                 for p in prompts]
    check("built-in sampler greedy == transformers greedy", [g[0].token_ids for g in greedy] == hf_greedy)

    if importlib.util.find_spec("vllm") is None:
        print("[SKIP] vLLM parity: vllm is not installed on this machine", flush=True)
    else:
        from megatron_less.rollout.vllm_engine import VLLMEngine

        engine = VLLMEngine(arch, gpu_memory_utilization=0.2)
        sync = engine.sync_weights(policy.module)
        v = engine.generate(prompts, 1, SamplingParams(temperature=0, max_tokens=8))
        check("vLLM greedy == built-in greedy", [r[0].token_ids for r in v] == [g[0].token_ids for g in greedy],
              f"(sync {sync['seconds'] * 1e3:.1f} ms)")
        engine.shutdown()

    if not on_gpu:
        print("megatron_gpu (CPU dry run): " + (f"{len(FAILED)} failed: {FAILED}" if FAILED else "all checks passed"))
        return 1 if FAILED else 0
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
    print(f"[TIME] Qwen2.5-0.5B-shaped bf16 train step (2 x {b} x {s} tokens): {dt * 1e3:.1f} ms, "
          f"{2 * b * s / dt:,.0f} tokens/s, ~{tflops:.0f} TFLOP/s (6*N*tokens, attention excluded), "
          f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
    runtime.destroy()
    print(f"megatron_gpu: {len(FAILED)} failed: {FAILED}" if FAILED else "megatron_gpu: all checks passed")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
