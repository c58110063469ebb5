"""Log-prob + entropy of vocab-parallel logits, forward + backward, three ways, on CPU at TP2 (gloo).

    python benchmarks/vocab_parallel.py [--tokens 8192] [--vocab 32768] [--dtype bf16] [--repeats 3]

(a) megatron_less.ops.vocab_parallel_logprob_entropy: one chunked pass, one all-gather of
    [T, 4] stats, recomputing backward.
(b) gather + full softmax (Megatron RL): all-gather the logits (autograd-aware, as megatron's
    gather_from_tensor_model_parallel_region), log_softmax in fp32, entropy from it.
(c) the verl way: megatron-core tensor_parallel.vocab_parallel_cross_entropy (overwrites its
    input, hence the clone) plus a separate vocab-parallel entropy (3 all-reduces, saves the
    fp32 logits and softmax), written here after verl's math, upcast to fp32.

Loss = sum(lp * g1 + H * g2) with random g1, g2, so both gradients flow. Time: minimum over
repeats of the slower rank's forward+backward (min rejects noise from other processes on a
shared machine). Memory, measured in separate untimed runs, per rank, above what exists before
the call (the input shard and upstream gradients): "tensor peak" replays torch's allocator
events (every tensor, op temporaries included; the CPU analogue of max_memory_allocated);
"RSS peak" is the kernel's resident high-water mark (VmHWM, reset via /proc/self/clear_refs,
malloc's mmap threshold fixed so freed buffers leave). Both include the gradient itself
([T, V/TP] in the input dtype), which every method must produce; "minus grad" takes it out.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_less.parallel.spawn import run_distributed  # noqa: E402


class _SeparateEntropy(torch.autograd.Function):
    """verl-style vocab-parallel entropy: max, sum-exp and sum p*z each all-reduced."""

    @staticmethod
    def forward(ctx, logits, group):
        z = logits.float()
        m = z.amax(-1, keepdim=True)
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        p = (z - m).exp_()
        s = p.sum(-1, keepdim=True)
        dist.all_reduce(s, group=group)
        p.div_(s)
        pz = (p * z).sum(-1, keepdim=True)
        dist.all_reduce(pz, group=group)
        ctx.save_for_backward(z, p, pz)
        ctx.dtype = logits.dtype
        return (m + s.log() - pz).squeeze(-1)

    @staticmethod
    def backward(ctx, g):
        z, p, pz = ctx.saved_tensors
        return (g.unsqueeze(-1) * p * (pz - z)).to(ctx.dtype), None


def method_a(x, t, group):
    from megatron_less.ops import vocab_parallel_logprob_entropy

    return vocab_parallel_logprob_entropy(x, t, tp_group=group)


class _GatherLastDim(torch.autograd.Function):
    """megatron's gather_from_tensor_model_parallel_region (whose CPU path calls CUDA):
    all-gather forward, keep own slice backward (every rank computes the same loss)."""

    @staticmethod
    def forward(ctx, x, group):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.rank, ctx.width = dist.get_rank(group), x.shape[-1]
        return torch.cat(parts, -1)

    @staticmethod
    def backward(ctx, g):
        return g[..., ctx.rank * ctx.width : (ctx.rank + 1) * ctx.width].contiguous(), None


def method_b(x, t, group):
    full = _GatherLastDim.apply(x, group)
    logp = torch.log_softmax(full.float(), -1)
    return logp.gather(-1, t.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def method_c(x, t, group):
    from megatron.core import tensor_parallel

    lp = -tensor_parallel.vocab_parallel_cross_entropy(x.clone(), t)
    return lp, _SeparateEntropy.apply(x, group)


METHODS = {"a": method_a, "b": method_b, "c": method_c}


def _bench(tokens, vocab, dtype_name, repeats):
    from megatron.core import parallel_state as ps

    from megatron_less.ops.memory import fixed_mmap_threshold, peak_rss_bytes, peak_tensor_bytes
    from megatron_less.parallel import runtime

    fixed_mmap_threshold()
    runtime.initialize(tp=2, seed=0)
    group, rank = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank()
    g = torch.Generator().manual_seed(0)
    full = torch.randn(tokens, vocab, generator=g) * 2
    x = full.chunk(2, -1)[rank].to(getattr(torch, dtype_name)).contiguous().requires_grad_()
    t = torch.randint(0, vocab, (tokens,), generator=g)
    g1, g2 = torch.randn(2, tokens, generator=g)
    del full

    def step(name):
        lp, h = METHODS[name](x, t, group)
        (lp * g1 + h * g2).sum().backward()
        out = lp.detach(), h.detach(), x.grad
        x.grad = None
        return out

    res = {}
    for name in METHODS:
        gc.collect()
        lp, h, grad = step(name)  # warm-up, and the values for the cross-check
        times = []
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            step(name)
            elapsed = torch.tensor(time.perf_counter() - t0)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            times.append(elapsed.item())
        gc.collect()
        tensor_peak, _ = peak_tensor_bytes(lambda name=name: step(name))
        gc.collect()
        rss_peak, _ = peak_rss_bytes(lambda name=name: step(name))
        res[name] = dict(time=min(times), times=times, tensor_peak=tensor_peak, rss_peak=rss_peak,
                         lp=lp, h=h, grad_sample=grad[:64].float().clone())
    runtime.destroy()
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=32768, help="total vocabulary (split over TP2)")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    per_rank = run_distributed(_bench, 2, (args.tokens, args.vocab, args.dtype, args.repeats),
                               timeout=3600, env={"MLESS_THREADS_PER_RANK": "1"})
    r0 = per_rank[0]
    mib = 1 << 20
    shard = args.tokens * args.vocab // 2
    print(f"TP2 gloo, 2 ranks x 1 thread, {args.tokens} tokens x {args.vocab} vocab "
          f"({args.vocab // 2} per rank), {args.dtype}; per rank: logits shard "
          f"{shard * (2 if args.dtype == 'bfloat16' else 4) / mib:.0f} MiB, "
          f"one fp32 [T, V/TP] = {shard * 4 / mib:.0f} MiB")
    labels = {"a": "(a) this op (eager kernels)", "b": "(b) gather + full log_softmax",
              "c": "(c) megatron CE + separate entropy"}
    grad = shard * (2 if args.dtype == "bfloat16" else 4)
    print(f"{'method':36s} {'fwd+bwd s':>10s} {'x(a)':>6s} {'tensor peak MiB':>16s} {'x(a)':>6s} "
          f"{'minus grad':>11s} {'RSS peak MiB':>13s} {'x(a)':>6s}")
    a = r0["a"]
    peak = {n: max(r[n]["tensor_peak"] for r in per_rank) for n in METHODS}
    rss = {n: max(r[n]["rss_peak"] for r in per_rank) for n in METHODS}
    for name in METHODS:
        print(f"{labels[name]:36s} {r0[name]['time']:10.3f} {r0[name]['time'] / a['time']:6.2f} "
              f"{peak[name] / mib:16.1f} {peak[name] / peak['a']:6.2f} {(peak[name] - grad) / mib:11.1f} "
              f"{rss[name] / mib:13.0f} {rss[name] / rss['a']:6.2f}")
    for name in ("b", "c"):
        dlp = (r0[name]["lp"] - a["lp"]).abs().max().item()
        dh = (r0[name]["h"] - a["h"]).abs().max().item()
        dg = (r0[name]["grad_sample"] - a["grad_sample"]).abs().max().item()
        print(f"agreement (a) vs ({name}): max |d logprob| {dlp:.2e}, |d entropy| {dh:.2e}, |d grad| {dg:.2e}")
    print("times per repeat (s): " + "; ".join(
        f"{n}: " + ", ".join(f"{v:.3f}" for v in r0[n]["times"]) for n in METHODS))


if __name__ == "__main__":
    main()
