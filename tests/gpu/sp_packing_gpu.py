"""Sequence parallelism and packed sequences on GPUs (run by tests/gpu/check.sh), through the
trainer's passes, with TransformerEngine's layer spec where TE is importable (its norms and
linears split the sequence themselves; packed rows go to its THD attention as cu_seqlens) and
the local spec (models.norm.RMSNorm; SDPA, one causal call per packed sequence) else.

Packing, one GPU (TP1):
P1. bf16, the model.attention default (TE's THD kernels where TE is importable): per-token
    log-probs of packed vs padded micro-batches within 2e-2 relative (bf16, different attention
    kernels), gradient norm within 2%.
P2. fp32, model.attention sdpa (SDPAttention: one causal flash call per packed sequence):
    relative 1e-4.

Sequence parallelism, TP2 on SP on vs off:
1. fp32: per-token log-probs and entropies of the no-grad pass, the loss and the gradient norm of
   a PPO-clip step (fused LM head) agree, SP on vs off (relative 1e-4: only reduction order
   differs).
2. bf16 (the users' numerics): the same step with SP is finite and its gradient norm within 2%
   of SP off.
3. [TIME] peak memory (torch.cuda.max_memory_allocated) of one 8192-token training pass, SP on
   vs off.

TP2 needs 2 GPUs: with one it is a [SKIP] saying so (NCCL refuses two ranks on one device).
``--cpu`` runs P2 and checks 1-2 on gloo CPU ranks as a dry run of the logic.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402
from checklib import Checks  # noqa: E402  (tests/gpu/ is this script's sys.path[0])

C = Checks("sp_packing_gpu")
MODEL = dict(model_type="qwen2", vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=8192, tie_word_embeddings=False)


def _batch(lengths, g):
    """Sequences of (prompt, response) ``lengths`` in groups of two, random tokens, with random old
    log-probs and advantages: (sequences, per-token values, widest response)."""
    from megatron_less.trainer.batch import Sequence

    seqs = [Sequence(k // 2, torch.randint(0, 4096, (p,), generator=g).tolist(),
                     torch.randint(0, 4096, (r,), generator=g).tolist(), [], "stop")
            for k, (p, r) in enumerate(lengths)]  # fmt: skip
    width = max(r for _, r in lengths)
    n = len(seqs)
    per_token = {"old_logprobs": -torch.rand(n, width, generator=g) * 4, "advantages": torch.randn(n, width, generator=g)}
    return seqs, per_token, width


def _job(memory_tokens):
    import torch.distributed as dist

    from megatron_less.models import qwen2
    from megatron_less.models.policy import OptimConfig, build_policy
    from megatron_less.models.schedule import sequence_multiple
    from megatron_less.parallel import runtime
    from megatron_less.parallel.gather import iter_hf_tensors
    from megatron_less.trainer.batch import Sequence, build_microbatch
    from megatron_less.trainer.passes import LossSpec, logprobs_and_entropy, train_minibatch

    runtime.initialize(2, 1, seed=1)
    arch = qwen2.Qwen2Arch.from_hf(MODEL)
    g = torch.Generator().manual_seed(0)
    seqs, per_token, width = _batch([(7, 30), (12, 9), (5, 51), (9, 22)], g)
    out, weights = {}, None
    for dtype in (torch.float32, torch.bfloat16):
        for sp in (False, True):
            policy = build_policy(arch, tp=2, params_dtype=dtype, hf_weights=weights, calculate_per_token_loss=True,
                                  optim=OptimConfig(lr=1e-6, clip_grad=0.0), sequence_parallel=sp)
            if weights is None:
                weights = {n: t.float().cpu().clone() for n, t in iter_hf_tensors(policy.module, arch)}
            m = sequence_multiple(policy.model[0])
            mbs = [build_microbatch(seqs, rows, per_token, multiple=m) for rows in ([0, 1], [2, 3])]
            lp, ent = logprobs_and_entropy(policy.model, seqs, mbs, temperature=0.9, vocab_size=arch.vocab_size)
            spec = LossSpec("ppo_clip", {}, "token-mean", 0.9, arch.vocab_size, width)
            sums = train_minibatch(policy, mbs, spec)
            policy.optimizer.prepare_grads()  # the gradients, unscaled, as the step would see them
            norm = float(policy.optimizer.get_grad_norm())
            res = dict(lp=lp, ent=ent, loss=sums["_loss_sum"], norm=norm, sp=policy.config.sequence_parallel)
            if torch.cuda.is_available() and dtype == torch.bfloat16 and memory_tokens:
                r = memory_tokens - 8
                big = [Sequence(0, list(range(8)), torch.randint(0, 4096, (r,), generator=g).tolist(), [], "stop")]
                pt = {"old_logprobs": -torch.rand(1, r, generator=g), "advantages": torch.randn(1, r, generator=g)}
                mb = [build_microbatch(big, [0], pt, multiple=m)]
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                train_minibatch(policy, mb, LossSpec("ppo_clip", {}, "token-mean", 1.0, arch.vocab_size, r))
                torch.cuda.synchronize()
                res["peak_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
            out[(dtype, sp)] = res
            del policy
    rank = dist.get_rank()
    runtime.destroy()
    return out if rank == 0 else None


def _packing_job(cases):
    """Per (dtype, attention): log-probs and gradient norm of the same 4 sequences, padded and packed."""
    from megatron_less.models import qwen2
    from megatron_less.models.policy import OptimConfig, build_policy
    from megatron_less.parallel import runtime
    from megatron_less.trainer.batch import build_microbatch
    from megatron_less.trainer.passes import LossSpec, logprobs_and_entropy, train_minibatch

    runtime.initialize(1, 1, seed=1)
    arch = qwen2.Qwen2Arch.from_hf(MODEL)
    seqs, per_token, width = _batch([(7, 300), (12, 90), (5, 510), (9, 220)], torch.Generator().manual_seed(0))
    out, weights = {}, None
    for dtype, attention in cases:
        for packed in (False, True):
            policy = build_policy(arch, params_dtype=dtype, hf_weights=weights, calculate_per_token_loss=True,
                                  optim=OptimConfig(lr=1e-6, clip_grad=0.0), attention=attention)
            if weights is None:
                from megatron_less.parallel.gather import iter_hf_tensors

                weights = {n: t.float().cpu().clone() for n, t in iter_hf_tensors(policy.module, arch)}
            mbs = [build_microbatch(seqs, rows, per_token, packed=packed) for rows in ([0, 1, 3], [2])]
            lp, _ = logprobs_and_entropy(policy.model, seqs, mbs, temperature=0.9, vocab_size=arch.vocab_size)
            train_minibatch(policy, mbs, LossSpec("ppo_clip", {}, "token-mean", 0.9, arch.vocab_size, width))
            policy.optimizer.prepare_grads()
            out[(dtype, attention, packed)] = dict(lp=lp, norm=float(policy.optimizer.get_grad_norm()))
            del policy
    runtime.destroy()
    return out


def _packing_checks(on_gpu: bool) -> None:
    from megatron_less.parallel.spawn import run_distributed

    cases = [(torch.bfloat16, "auto"), (torch.float32, "sdpa")] if on_gpu else [(torch.float32, "sdpa")]
    res = run_distributed(_packing_job, 1, (cases,), timeout=300)[0]
    for (dtype, attention), tol, name in zip(cases, (2e-2, 1e-4) if on_gpu else (1e-4,),
                                             ("P1" if on_gpu else "P2", "P2")):  # fmt: skip
        a, b = res[(dtype, attention, False)], res[(dtype, attention, True)]
        d_lp, d_norm = _rel(b["lp"], a["lp"]), abs(b["norm"] - a["norm"]) / a["norm"]
        norm_tol = 0.02 if dtype == torch.bfloat16 else tol
        C.check(f"{name} packed vs padded ({str(dtype)[6:]}, attention {attention})", d_lp < tol and d_norm < norm_tol,
                f"log-probs relative {d_lp:.2e} (threshold {tol:g}), grad norm {a['norm']:.6f} / {b['norm']:.6f} "
                f"(threshold relative {norm_tol:g})")  # fmt: skip


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def main() -> int:
    on_gpu = torch.cuda.is_available()
    if not on_gpu and "--cpu" not in sys.argv:
        C.skip("every check of sequence_parallel_gpu", "no GPU (use --cpu for a CPU dry run of the logic)")
        return C.finish()
    with C.guard("packed vs padded"):
        _packing_checks(on_gpu)
    if on_gpu and torch.cuda.device_count() < 2:
        C.skip("TP2 with sequence parallelism on vs off", f"TP2 needs 2 GPUs, this machine has "
               f"{torch.cuda.device_count()} (the CPU suite checks it on gloo: tests/test_sp_packing.py)")
        return C.finish()
    from megatron_less.parallel.spawn import run_distributed

    res = run_distributed(_job, 2, (8192 if on_gpu else 0,), timeout=600)[0]
    f32, f32sp = res[(torch.float32, False)], res[(torch.float32, True)]
    C.check("sequence parallelism is on where asked", f32sp["sp"] and not f32["sp"], f"{f32['sp']} / {f32sp['sp']}")
    worst = max(_rel(f32sp["lp"], f32["lp"]), _rel(f32sp["ent"], f32["ent"]))
    C.check("fp32 log-probs and entropies, SP on vs off", worst < 1e-4, f"relative {worst:.2e} (threshold 1e-4)")
    d_loss = abs(f32sp["loss"] - f32["loss"]) / abs(f32["loss"])
    d_norm = abs(f32sp["norm"] - f32["norm"]) / f32["norm"]
    C.check("fp32 loss and gradient norm, SP on vs off", max(d_loss, d_norm) < 1e-4,
            f"loss {f32['loss']:.6f} / {f32sp['loss']:.6f}, grad norm {f32['norm']:.6f} / {f32sp['norm']:.6f} "
            f"(threshold relative 1e-4)")
    b, bsp = res[(torch.bfloat16, False)], res[(torch.bfloat16, True)]
    d = abs(bsp["norm"] - b["norm"]) / b["norm"]
    C.check("bf16 gradient norm, SP on vs off", torch.isfinite(torch.tensor(bsp["norm"])).item() and d < 0.02,
            f"{b['norm']:.5f} / {bsp['norm']:.5f} (threshold relative 0.02)")
    if "peak_gib" in b:
        C.time(f"TP2 bf16 training pass of 8192 tokens, peak memory above the start: SP off {b['peak_gib']:.3f} GiB, "
               f"SP on {bsp['peak_gib']:.3f} GiB ({bsp['peak_gib'] / b['peak_gib']:.3f}x)")
    return C.finish()


if __name__ == "__main__":
    sys.exit(main())
