"""Activation memory and time per token: sequence parallelism on vs off at TP2, and packed vs
padded micro-batches on a realistic length mix, side by side in one run (issue 23):

    python benchmarks/activation_memory.py [--lengths 2048,4096,8192] [--repeats 2]
                                           [--mix 96] [--budget 2048] [--rollouts rollouts.jsonl]

Packing: one process (TP1), the same model, one mini-batch of ``--mix`` sequences (prompts of
40-200 tokens, responses drawn lognormal like a math RL run's - median ~550, a long tail cut at
3072 - scaled by 1/8 to fit two cores; ``--rollouts`` takes the response lengths of a logged run
instead, prompts 64 tokens) under a ``--budget`` token micro-batch budget: padded (rows sorted by
length, each micro-batch padded to its longest) vs packed (first-fit decreasing); the padding
fraction, micro-batches, time per real token and peak tensor bytes of the whole mini-batch.

Two gloo ranks (TP2, one thread each) train a Qwen2-shaped model (4 layers, hidden 512, 8 heads
of 64, 2 KV groups, FFN 1408, vocabulary 8192; SDPA attention, the fused LM head) through the
trainer's own pass (``passes.train_minibatch``: megatron's schedule, PPO-clip, per-token loss)
on one micro-batch of one sequence of each length, with ``sequence_parallel`` off and on.

Peak: the high-water mark of tensor bytes allocated during forward + backward above the start,
per rank (``ops.memory.peak_tensor_bytes``: torch's allocator events replayed in order, the CPU
analogue of ``torch.cuda.max_memory_allocated``); the larger rank's. It includes the weight
gradients megatron accumulates into its grad buffer only as far as they are temporaries (the
buffer exists before). Time: the slower rank's minimum over ``--repeats`` runs after a warm-up.
The model under both settings is the same (same weights, same loss: checked, printed).

What a CPU can and cannot show: the bytes are what the GPU would hold (same tensors, same
layout), the times are gloo's on two cores - SP's all-gather/reduce-scatter replace the TP
all-reduces at equal volume, so time per token should not change much; on NVLink it does not.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_less.parallel.spawn import run_distributed  # noqa: E402

MODEL = dict(model_type="qwen2", vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=16384, tie_word_embeddings=False)
MIB = 1 << 20


def _job(lengths, repeats):
    import torch.distributed as dist

    from megatron_less.models import qwen2
    from megatron_less.models.policy import OptimConfig, build_policy
    from megatron_less.ops.memory import peak_tensor_bytes
    from megatron_less.parallel import runtime
    from megatron_less.trainer.batch import Sequence, build_microbatch
    from megatron_less.trainer.passes import LossSpec, train_minibatch
    from megatron_less.models.schedule import sequence_multiple

    torch.set_num_threads(1)
    runtime.initialize(2, 1, seed=1)
    arch = qwen2.Qwen2Arch.from_hf(MODEL)
    out = {}
    weights = None
    for sp in (False, True):
        policy = build_policy(arch, tp=2, optim=OptimConfig(lr=1e-6), attention="sdpa", hf_weights=weights,
                              calculate_per_token_loss=True, sequence_parallel=sp)
        if weights is None:  # the SP model starts from the same weights
            from megatron_less.parallel.gather import iter_hf_tensors

            weights = {n: t.clone() for n, t in iter_hf_tensors(policy.module, arch)}
        for n in lengths:
            g = torch.Generator().manual_seed(n)
            ids = torch.randint(0, arch.vocab_size, (n,), generator=g).tolist()
            seqs = [Sequence(0, ids[:64], ids[64:], [], "stop")]
            r = n - 64
            per_token = {"old_logprobs": -torch.rand(1, r, generator=g) * 3, "advantages": torch.randn(1, r, generator=g)}
            mbs = [build_microbatch(seqs, [0], per_token, multiple=sequence_multiple(policy.model[0]))]
            spec = LossSpec("ppo_clip", {}, "token-mean", 1.0, arch.vocab_size, r)

            def run():
                return train_minibatch(policy, mbs, spec)

            run()  # warm-up
            times = []
            for _ in range(repeats):
                dist.barrier()
                t0 = time.perf_counter()
                metrics = run()
                times.append(time.perf_counter() - t0)
            dist.barrier()
            peak, _ = peak_tensor_bytes(run)
            both = torch.tensor([min(times), float(peak)], dtype=torch.float64)
            dist.all_reduce(both, op=dist.ReduceOp.MAX)
            out[(sp, n)] = dict(seconds=both[0].item(), peak=both[1].item(), loss=metrics["loss"] if "loss" in metrics
                                else metrics.get("_loss_sum"))  # fmt: skip
    runtime.destroy()
    return out


def _mix(n: int, rollouts: str | None) -> list[tuple[int, int]]:
    """(prompt, response) lengths."""
    import json
    import random

    if rollouts:
        rows = [json.loads(line) for line in open(rollouts)]
        return [(64, max(1, len(r["token_ids"]))) for r in rows[:n]]
    rng = random.Random(0)
    return [(rng.randint(40, 200) // 8 + 1, min(3072, int(rng.lognormvariate(6.3, 0.8))) // 8 + 1) for _ in range(n)]


def _packing_job(mix, budget, repeats):
    from megatron_less.models import qwen2
    from megatron_less.models.policy import OptimConfig, build_policy
    from megatron_less.ops.memory import peak_tensor_bytes
    from megatron_less.parallel import runtime
    from megatron_less.trainer.batch import Sequence, build_microbatch, plan_microbatches, plan_packs
    from megatron_less.trainer.passes import LossSpec, train_minibatch

    torch.set_num_threads(1)
    runtime.initialize(1, 1, seed=1)
    arch = qwen2.Qwen2Arch.from_hf(MODEL)
    policy = build_policy(arch, optim=OptimConfig(lr=1e-6), attention="sdpa", calculate_per_token_loss=True)
    g = torch.Generator().manual_seed(0)
    seqs = [Sequence(k, torch.randint(0, arch.vocab_size, (p,), generator=g).tolist(),
                     torch.randint(0, arch.vocab_size, (r,), generator=g).tolist(), [], "stop")
            for k, (p, r) in enumerate(mix)]  # fmt: skip
    width = max(r for _, r in mix)
    per_token = {"old_logprobs": -torch.rand(len(seqs), width, generator=g) * 3,
                 "advantages": torch.randn(len(seqs), width, generator=g)}
    spec = LossSpec("ppo_clip", {}, "token-mean", 1.0, arch.vocab_size, width)
    lengths = [s.length for s in seqs]
    out = {}
    for packed in (False, True):
        plans = (plan_packs if packed else plan_microbatches)(lengths, budget)
        mbs = [build_microbatch(seqs, p, per_token, packed=packed) for p in plans]

        def run(mbs=mbs):
            return train_minibatch(policy, mbs, spec)

        run()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            sums = run()
            times.append(time.perf_counter() - t0)
        peak, _ = peak_tensor_bytes(run)
        out[packed] = dict(seconds=min(times), peak=peak, mbs=len(mbs), loss=sums["_loss_sum"],
                           padding=1 - sum(lengths) / sum(m.tokens.numel() for m in mbs))  # fmt: skip
    out["tokens"] = sum(lengths)
    runtime.destroy()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="2048,4096,8192")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--mix", type=int, default=96, help="sequences in the packing comparison")
    ap.add_argument("--budget", type=int, default=2048, help="micro-batch token budget of the packing comparison")
    ap.add_argument("--rollouts", default=None, help="a run's rollouts.jsonl: its response lengths as the mix")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    t0 = time.perf_counter()
    res = run_distributed(_job, 2, (lengths, args.repeats), timeout=3600, env={"OMP_NUM_THREADS": "1"})[0]
    h, layers = MODEL["hidden_size"], MODEL["num_hidden_layers"]
    print(f"TP2, 2 gloo ranks x 1 thread; model {MODEL}")
    print(f"{'tokens':>7} {'peak SP off':>12} {'peak SP on':>11} {'on/off':>7} {'ms/tok off':>11} {'ms/tok on':>10} "
          f"{'time on/off':>11} {'loss off':>10} {'loss on':>10}")  # fmt: skip
    for n in lengths:
        a, b = res[(False, n)], res[(True, n)]
        print(f"{n:>7} {a['peak'] / MIB:>9.1f} MiB {b['peak'] / MIB:>7.1f} MiB {b['peak'] / a['peak']:>7.3f} "
              f"{1e3 * a['seconds'] / n:>11.3f} {1e3 * b['seconds'] / n:>10.3f} {b['seconds'] / a['seconds']:>11.3f} "
              f"{a['loss']:>10.6f} {b['loss']:>10.6f}")  # fmt: skip
    # Korthikanti et al.'s per-layer activation bytes (fp16; flash attention, no s^2 term): sbh(10 + 24/t)
    # without SP, sbh(34/t) with it; fp32 here doubles both, the ratio stays
    print(f"model of the layers alone: (34/2) / (10 + 24/2) = {17 / 22:.3f} at TP2 ({layers} layers, hidden {h}; "
          f"the LM head and the step's fixed buffers come on top)")
    mix = _mix(args.mix, args.rollouts)
    pk = run_distributed(_packing_job, 1, (mix, args.budget, args.repeats), timeout=3600,
                         env={"OMP_NUM_THREADS": "1"})[0]  # fmt: skip
    resp = sorted(r for _, r in mix)
    print(f"\npacking, TP1, 1 thread: {len(mix)} sequences, {pk['tokens']} tokens (responses: median "
          f"{resp[len(resp) // 2]}, max {resp[-1]}{', from ' + args.rollouts if args.rollouts else ''}), budget "
          f"{args.budget} tokens per micro-batch")  # fmt: skip
    print(f"{'layout':>7} {'micro-batches':>13} {'padding':>8} {'ms/real tok':>11} {'peak':>10} {'loss sum':>12}")
    for packed, name in ((False, "padded"), (True, "packed")):
        r = pk[packed]
        print(f"{name:>7} {r['mbs']:>13} {r['padding']:>8.3%} {1e3 * r['seconds'] / pk['tokens']:>11.3f} "
              f"{r['peak'] / MIB:>6.1f} MiB {r['loss']:>12.6f}")  # fmt: skip
    print(f"packed / padded: time {pk[True]['seconds'] / pk[False]['seconds']:.3f}, "
          f"peak {pk[True]['peak'] / pk[False]['peak']:.3f}")
    print(f"wall {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
