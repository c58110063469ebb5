"""Step speed and memory on CPU, side by side, one run (issue 13):

    python benchmarks/step_speed.py [--hidden 64] [--repeats 2] [--max-gib 8]

(a) LM head + log-prob/entropy, forward + backward (gradients for hidden and weight):
    fused = ops.lm_head_logprob_entropy (logits in token tiles, recomputed in backward) vs
    unfused = hidden @ weight.T -> ops.vocab_parallel_logprob_entropy (materialised logits and
    their gradient), at 4096 and 16384 tokens, vocabulary 152064 (Qwen2.5's 151936, padded;
    vocab_size masks the padding), TP1 (1 rank) and TP2 (2 gloo ranks), fp32, hidden size
    ``--hidden`` (small on purpose: the logits dominate memory whatever H is; H only scales the
    matmuls). A configuration whose materialised logits + gradient would pass ``--max-gib`` per
    process is skipped and printed as such (16k x 152k fp32 is 10 GB of logits alone).
(b) A training step (megatron schedule forward + backward through the trainer's passes, fused
    LM head, then the optimizer step) of a small Qwen2-shaped model (4 layers, hidden 256,
    8 heads of 32, 2 KV groups, vocabulary 8192) on one sequence of 512, 2048 and 4096 tokens,
    megatron's unfused local attention vs the SDPA module (models/attention.py), TP1.

Time: minimum over ``--repeats`` timed runs after one warm-up (min rejects noise from other
processes on this shared machine); for TP2 the slower rank's. Peak memory: the kernel's
resident-set high-water mark during one more (untimed) run, above RSS at its start, per process
(``ops.memory.peak_rss_bytes``: VmHWM reset through /proc/self/clear_refs, glibc's mmap threshold
fixed so that freed buffers leave the process). Inputs and weights exist before the run and are
not counted; the gradients the run produces are. Each rank runs with one thread.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_less.parallel.spawn import run_distributed  # noqa: E402

VOCAB, VOCAB_PADDED = 151936, 152064
GIB = 1 << 30


def _timed(fn, repeats):
    from megatron_less.ops.memory import peak_rss_bytes

    fn()  # warm-up: thread pools, allocator, first-touch
    times = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    gc.collect()
    peak, _ = peak_rss_bytes(fn)
    return min(times), peak


def _lm_head_job(tokens_list, hidden, repeats, max_gib):
    import torch.distributed as dist

    from megatron_less.ops import lm_head_logprob_entropy, vocab_parallel_logprob_entropy
    from megatron_less.ops.memory import fixed_mmap_threshold

    fixed_mmap_threshold()
    tp = int(os.environ["WORLD_SIZE"])
    group = None
    if tp > 1:
        dist.init_process_group("gloo")
        group = dist.group.WORLD
    rank = dist.get_rank() if tp > 1 else 0
    vr = VOCAB_PADDED // tp
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(VOCAB_PADDED, hidden, generator=g).chunk(tp)[rank].mul_(0.05).clone()
    out = {}
    for n in tokens_list:
        h = torch.randn(n, hidden, generator=g)
        t = torch.randint(0, VOCAB, (n,), generator=g)
        gl, gh = torch.randn(2, n, generator=g)
        kw = dict(tp_group=group, temperature=0.7, vocab_size=VOCAB)

        def run(fused, h=h, t=t, gl=gl, gh=gh, kw=kw):
            hh, ww = h.clone().requires_grad_(), weight.clone().requires_grad_()
            if fused:
                lp, ent = lm_head_logprob_entropy(hh, ww, t, **kw)
            else:
                lp, ent = vocab_parallel_logprob_entropy(hh @ ww.t(), t, **kw)
            (lp * gl + ent * gh).sum().backward()
            return lp.detach(), hh.grad, ww.grad

        # logits + their gradient, fp32: what the unfused path must hold at once
        need = 2 * n * vr * 4 / GIB
        for fused in (True, False):
            if not fused and need > max_gib:
                out[(n, fused)] = f"skipped: logits + gradient {need:.1f} GiB per process > {max_gib} GiB"
                continue
            if tp > 1:
                dist.barrier()
            t_min, peak = _timed(lambda fused=fused: run(fused), repeats)
            if tp > 1:  # the slower rank's time and the larger rank's peak
                both = torch.tensor([t_min, float(peak)], dtype=torch.float64)
                dist.all_reduce(both, op=dist.ReduceOp.MAX)
                t_min, peak = both.tolist()
            out[(n, fused)] = (t_min, peak)
        if isinstance(out[(n, False)], tuple):  # the two agree
            a, b = run(True), run(False)
            if tp > 1:  # unfused, each rank holds its shard's part of dL/dh (megatron all-reduces it)
                dist.all_reduce(b[1])
            out[(n, "diff")] = max(float(((x - y).norm() / y.norm())) for x, y in zip(a, b))
    if tp > 1:
        dist.destroy_process_group()
    return out


STEP_MODEL = dict(model_type="qwen2", vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=8192,
                  tie_word_embeddings=True)


def _step_job(lengths, repeats, max_gib):
    from megatron_less.models import qwen2
    from megatron_less.models.policy import OptimConfig, build_policy
    from megatron_less.ops.memory import fixed_mmap_threshold
    from megatron_less.parallel import runtime
    from megatron_less.trainer.batch import Sequence, build_microbatch
    from megatron_less.trainer.passes import LossSpec, optimizer_step, train_minibatch

    fixed_mmap_threshold()
    runtime.initialize(1, 1, seed=1)
    arch = qwen2.Qwen2Arch.from_hf(STEP_MODEL)
    out = {}
    for attention in ("local", "sdpa"):
        policy = build_policy(arch, optim=OptimConfig(lr=1e-6), attention=attention, calculate_per_token_loss=True)
        for n in lengths:
            # local attention keeps scores and probabilities, [heads, n, n] fp32 each, per layer
            need = 2 * arch.num_hidden_layers * arch.num_attention_heads * n * n * 4 / GIB
            if attention == "local" and need > max_gib:
                out[(attention, n)] = f"skipped: local attention would keep {need:.1f} GiB > {max_gib} GiB"
                continue
            g = torch.Generator().manual_seed(n)
            ids = torch.randint(0, arch.vocab_size, (n,), generator=g).tolist()
            seqs = [Sequence(0, ids[:16], ids[16:], [], "stop")]
            per_token = {"old_logprobs": -torch.rand(1, n - 16, generator=g) * 5,
                         "advantages": torch.randn(1, n - 16, generator=g)}
            mbs = [build_microbatch(seqs, [0], per_token)]
            spec = LossSpec("ppo_clip", {}, "token-mean", 1.0, arch.vocab_size, n)

            def step(policy=policy, mbs=mbs, spec=spec):
                train_minibatch(policy, mbs, spec)
                optimizer_step(policy, _NoSchedule(), True)  # the LR schedule is not what is timed

            out[(attention, n)] = _timed(step, repeats)
        policy = None  # free this model before the next is built
        gc.collect()
    runtime.destroy()
    return out


class _NoSchedule:
    """optimizer_step's LR scheduler argument; a constant LR here."""

    def step(self, increment=1):
        pass


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-gib", type=float, default=8.0)
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096])
    ap.add_argument("--skip", choices=["a", "b"], default=None)
    args = ap.parse_args()
    env = {"MLESS_THREADS_PER_RANK": "1"}
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, 1 thread per rank, fp32; time = min of "
          f"{args.repeats} after a warm-up; peak = RSS high-water mark above the start, per process", flush=True)
    if args.skip != "a":
        print(f"\n(a) LM head + log-prob/entropy fwd+bwd, vocab {VOCAB_PADDED} (real {VOCAB}), hidden {args.hidden}, T 0.7")
        print(f"{'TP':>3s} {'tokens':>7s} | {'fused s':>8s} {'fused MiB':>10s} | {'unfused s':>9s} {'unfused MiB':>11s} | "
              f"{'time x':>6s} {'mem /':>6s} | agree")
        for tp in (1, 2):
            res = run_distributed(_lm_head_job, tp, (args.tokens, args.hidden, args.repeats, args.max_gib),
                                  timeout=3600, env=env)[0]
            for n in args.tokens:
                f, u = res[(n, True)], res[(n, False)]
                if isinstance(u, str):
                    print(f"{tp:3d} {n:7d} | {f[0]:8.2f} {f[1] / 2**20:10.0f} | {u}", flush=True)
                else:
                    print(f"{tp:3d} {n:7d} | {f[0]:8.2f} {f[1] / 2**20:10.0f} | {u[0]:9.2f} {u[1] / 2**20:11.0f} | "
                          f"{u[0] / f[0]:6.2f} {u[1] / max(f[1], 1):6.1f} | {res[(n, 'diff')]:.1e}", flush=True)
    if args.skip != "b":
        m = STEP_MODEL
        print(f"\n(b) training step (fwd+bwd+Adam), {m['num_hidden_layers']} layers, hidden {m['hidden_size']}, "
              f"{m['num_attention_heads']} heads / {m['num_key_value_heads']} KV, vocab {m['vocab_size']}, TP1, one sequence")
        res = run_distributed(_step_job, 1, (args.lengths, args.repeats, args.max_gib), timeout=3600, env=env)[0]
        print(f"{'tokens':>7s} | {'local s':>8s} {'local MiB':>10s} | {'sdpa s':>7s} {'sdpa MiB':>9s} | {'time x':>6s} {'mem /':>6s}")
        for n in args.lengths:
            lo, sd = res[("local", n)], res[("sdpa", n)]
            if isinstance(lo, str):
                print(f"{n:7d} | {lo} | {sd[0]:7.2f} {sd[1] / 2**20:9.0f} |", flush=True)
                continue
            print(f"{n:7d} | {lo[0]:8.2f} {lo[1] / 2**20:10.0f} | {sd[0]:7.2f} {sd[1] / 2**20:9.0f} | "
                  f"{lo[0] / sd[0]:6.2f} {lo[1] / max(sd[1], 1):6.1f}", flush=True)


if __name__ == "__main__":
    main()
