"""Rollout costs on CPU, measured side by side in one run:
(1) vLLM weight sync (Megatron shards -> vLLM, in memory) as a ratio to a plain state_dict copy
    of the same Megatron model, and (2) generation tokens/s of vLLM vs the built-in sampler.

    python benchmarks/rollout.py [--tp 1] [--hidden 256] [--layers 4] [--vocab 4096]
    # 59M parameters (RESULTS.md), generation kept short:
    python benchmarks/rollout.py --hidden 512 --layers 8 --vocab 32768 --prompts 4 --n 2 --tokens 16
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from megatron_less.parallel.spawn import run_distributed  # noqa: E402


def _best(fn, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def _bench(args):
    import torch
    from transformers import Qwen2Config

    from megatron_less.models import qwen2
    from megatron_less.parallel import runtime
    from megatron_less.parallel.gather import iter_all_hf_tensors
    from megatron_less.rollout.base import SamplingParams
    from megatron_less.rollout.builtin import BuiltinSampler
    from megatron_less.rollout.vllm_engine import VLLMEngine
    from megatron_less.models.policy import build_policy

    cfg = Qwen2Config(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=max(1, args.hidden // 128), max_position_embeddings=1024,
                      tie_word_embeddings=False, initializer_range=0.3)
    arch = qwen2.Qwen2Arch.from_hf(dict(cfg.to_dict(), model_type="qwen2"))
    runtime.initialize(args.tp, 1)
    policy = build_policy(arch, tp=args.tp)
    engine = VLLMEngine(arch, rollout_tp=args.tp, kv_cache_bytes=256 << 20)
    module = policy.module
    copy_s, _ = _best(lambda: {k: v.detach().clone() for k, v in module.state_dict().items() if v is not None}, 5)
    sync_s, info = _best(lambda: engine.sync_weights(module), 5)
    gather_s, _ = _best(lambda: sum(t.numel() for _, t in iter_all_hf_tensors(module, arch)), 5)

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, args.vocab, (64,), generator=g).tolist() for _ in range(args.prompts)]
    sp = SamplingParams(temperature=1.0, max_tokens=args.tokens, seed=1)
    engine.generate(prompts[:2], 1, sp)  # warm-up
    v_s, v_out = _best(lambda: engine.generate(prompts, args.n, sp), 2)
    b_s, b_out = _best(lambda: BuiltinSampler(policy.model, arch, batch_size=64).generate(prompts, args.n, sp), 1)
    ntok = lambda out: sum(len(r.token_ids) for rs in out for r in rs)  # noqa: E731
    engine.shutdown()
    runtime.destroy()
    return dict(params_mb=info["bytes"] / 1e6, copy_ms=copy_s * 1e3, sync_ms=sync_s * 1e3, gather_ms=gather_s * 1e3,
                vllm_tok_s=ntok(v_out) / v_s, builtin_tok_s=ntok(b_out) / b_s)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64)
    args = p.parse_args()
    env = {"OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_LOGGING_LEVEL": "WARNING"}
    r = run_distributed(_bench, args.tp, (args,), env=env, timeout=1200)[0]
    print(f"model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, TP {args.tp}: "
          f"{r['params_mb']:.1f} MB of weights (fp32)")
    print(f"weight sync to vLLM   {r['sync_ms']:8.1f} ms")
    print(f"  of which gathering  {r['gather_ms']:8.1f} ms (Megatron shards -> HF tensors; the rest is vLLM's load + CPU repack)")
    print(f"state_dict clone      {r['copy_ms']:8.1f} ms")
    print(f"sync / clone ratio    {r['sync_ms'] / r['copy_ms']:8.2f}x")
    print(f"generation, {args.prompts} prompts x {args.n} samples x {args.tokens} tokens:")
    print(f"  vLLM                {r['vllm_tok_s']:8.0f} tokens/s")
    print(f"  built-in sampler    {r['builtin_tok_s']:8.0f} tokens/s")
    print(f"  vLLM / built-in     {r['vllm_tok_s'] / r['builtin_tok_s']:8.1f}x")


if __name__ == "__main__":
    main()
