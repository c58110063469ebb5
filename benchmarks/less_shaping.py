"""LESS weights for a full rollout batch on one CPU core, and the speed-up over the brute-force oracle.

    python benchmarks/less_shaping.py [--prompts 512] [--responses 8] [--tokens 1024 3072]
                                      [--oracle-groups 4] [--repeats 5] [--loops F]

Each size in --tokens is measured in turn (default: 8 x 1024 and 8 x 3072 tokens per group). The
timed call is the one `less_shaper` makes: weights, token classes and stats. The kernels compile
on the first call of a process, or load from numba's on-disk cache (set NUMBA_CACHE_DIR to an
empty folder to time a compilation): that first call is timed apart, on a tiny batch.

Synthetic batch shaped like the authors' runs: every response is a sequence of short high-entropy
bursts (forking tokens) followed by long low-entropy runs (~80% of tokens low); half of the runs are
phrases from a per-prompt pool, some from a pool shared by all prompts (so identical text occurs in
other groups and must not match there), some are two phrases back to back (so keys contain other
keys), the rest fresh tokens. Correctness is a fair coin per response, so nearly every group is
shaped (the worst case: unanimous groups are skipped).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_less.algos.less import less_token_weights
from megatron_less.algos.less.kernel import less_kernel
from tests.less_oracle import group_weights

VOCAB = 151_936


def make_batch(prompts: int, responses: int, tokens: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    b = prompts * responses
    tok = np.empty((b, tokens), dtype=np.int64)
    ent = np.empty((b, tokens), dtype=np.float32)
    common = [rng.integers(0, VOCAB, size=int(rng.integers(5, 40))) for _ in range(32)]
    for g in range(prompts):
        pool = [rng.integers(0, VOCAB, size=max(5, int(rng.geometric(1 / 20)))) for _ in range(48)]
        for r in range(responses):
            row_t, row_e, n = [], [], 0
            while n < tokens:
                burst = int(rng.geometric(1 / 6))
                row_t.append(rng.integers(0, VOCAB, size=burst))
                row_e.append(rng.uniform(1.0, 4.0, size=burst))
                u = rng.random()
                if u < 0.45:
                    run = pool[int(rng.integers(len(pool)))]
                elif u < 0.55:
                    run = np.concatenate(
                        [pool[int(rng.integers(len(pool)))], pool[int(rng.integers(len(pool)))]]
                    )
                elif u < 0.65:
                    run = common[int(rng.integers(len(common)))]
                else:
                    run = rng.integers(0, VOCAB, size=int(rng.geometric(1 / 24)))
                row_t.append(run)
                row_e.append(rng.exponential(0.05, size=run.size))
                n += burst + run.size
            tok[g * responses + r] = np.concatenate(row_t)[:tokens]
            ent[g * responses + r] = np.concatenate(row_e)[:tokens]
    correct = rng.random(b) < 0.5
    group = np.repeat(np.arange(prompts), responses)
    mask = np.ones((b, tokens), dtype=bool)
    return (
        torch.from_numpy(tok),
        torch.from_numpy(ent),
        torch.from_numpy(mask),
        torch.from_numpy(correct),
        torch.from_numpy(group),
    )


def add_loops(batch, frac: int, seed: int = 1):
    """Worst case: in `frac` of the responses the tail becomes a repetition loop (period 3-19,
    one pattern per prompt) with uniformly tiny entropies, which the per-response quantile then
    cuts into many overlapping fragments that occur everywhere in the other loops."""
    rng = np.random.default_rng(seed)
    tok, ent = batch[0].numpy().copy(), batch[1].numpy().copy()
    b, t = tok.shape
    n = int(batch[4].max()) + 1
    patterns = [rng.integers(0, VOCAB, size=int(rng.integers(3, 20))) for _ in range(n)]
    for i in range(b):
        if rng.random() < frac:
            pat, start = patterns[int(batch[4][i])], int(rng.integers(t // 6, 2 * t // 3))
            tok[i, start:] = np.resize(np.roll(pat, int(rng.integers(len(pat)))), t - start)
            ent[i, start:] = rng.uniform(0.001, 0.02, size=t - start)
    return (torch.from_numpy(tok), torch.from_numpy(ent), *batch[2:])


def describe() -> str:
    import numba

    return f"numba {numba.__version__}, numpy {np.__version__}, torch {torch.__version__}"


def jit_note() -> str:
    """Whether the first call compiled the kernels or loaded them from numba's on-disk cache."""
    if sum(less_kernel.stats.cache_hits.values()):
        return "  (kernels loaded from numba's on-disk cache)"
    return "  (kernels compiled: JIT; later processes load them from the cache)"


def timed(fn, *args, **kwargs):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0, time.process_time() - c0


def system_time() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def shaping(batch):
    """What less_shaper computes: weights, classes and stats (defaults mu 5, q 0.8)."""
    return less_token_weights(*batch, return_classes=True, return_stats=True)


def measure(args, tokens: int) -> None:
    t0 = time.perf_counter()
    batch = make_batch(args.prompts, args.responses, tokens)
    if args.loops:
        batch = add_loops(batch, args.loops)
    print(
        f"\nbatch: {args.prompts} prompts x {args.responses} responses x {tokens} tokens "
        f"({batch[0].numel() / 1e6:.1f}M tokens, loops in {args.loops:.0%}), "
        f"generated in {time.perf_counter() - t0:.1f} s; load average {os.getloadavg()[0]:.1f}"
    )
    runs = []
    for i in range(args.repeats):
        s0 = system_time()
        (w, _, stats), wall, cpu = timed(shaping, batch)
        runs.append((wall, cpu))
        print(
            f"  run {i}: wall {wall:.3f} s, CPU {cpu:.3f} s (of which system {system_time() - s0:.3f} s)"
            + ("  (first call on this batch)" if i == 0 else "")
        )
    print("  stats: " + ", ".join(f"{k}={v:.4g}" for k, v in stats.items()))
    steady = runs[1:] or runs
    best_wall, best_cpu = min(r[0] for r in steady), min(r[1] for r in steady)
    median_cpu = float(np.median([r[1] for r in steady]))

    n = args.responses
    oracle_cpu, alone_cpu = [], []
    for g in range(args.oracle_groups):
        rows = slice(g * n, (g + 1) * n)
        sub = tuple(x[rows] for x in batch)
        (ref, _), _, cpu = timed(group_weights, sub[0].tolist(), sub[1].tolist(), sub[3].tolist(), 5, 0.8)
        oracle_cpu.append(cpu)
        got, _, cpu = min((timed(shaping, sub) for _ in range(5)), key=lambda r: r[2])
        alone_cpu.append(cpu)
        assert np.array_equal(got[0].numpy(), np.asarray(ref, dtype=np.float32)), (
            f"group {g} differs from the oracle"
        )
        assert torch.equal(got[0], w[rows]), f"group {g}: alone and in the batch differ"
    oracle = float(np.mean(oracle_cpu))
    per_group = best_cpu / args.prompts
    print(
        f"  full batch, one core: CPU {best_cpu:.3f} s best, {median_cpu:.3f} s median, wall {best_wall:.3f} s "
        f"best (of {len(steady)} runs after the first); first call CPU {runs[0][1]:.3f} s, wall {runs[0][0]:.3f} s"
    )
    print(
        f"  oracle: {oracle * 1e3:.1f} ms CPU per group (mean of {len(oracle_cpu)}); fast: {per_group * 1e6:.1f} us "
        f"per group inside the batch, {np.mean(alone_cpu) * 1e6:.1f} us for one group alone (best of 5)"
    )
    print(
        f"  speed-up per group at {n} x {tokens}: {oracle / per_group:,.0f}x inside the batch "
        f"({oracle * args.prompts / median_cpu:,.0f}x on the median run), {oracle / np.mean(alone_cpu):,.0f}x alone "
        f"(goal >= 1000x); oracle weights identical on the {len(oracle_cpu)} groups"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=512)
    ap.add_argument("--responses", type=int, default=8)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 3072])
    ap.add_argument("--oracle-groups", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument(
        "--loops", type=float, default=0.0, help="fraction of responses ending in a repetition loop"
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(describe())
    _, wall, cpu = timed(shaping, make_batch(2, 2, 16))
    print(f"first call (tiny batch): wall {wall:.2f} s, CPU {cpu:.2f} s{jit_note()}")
    for tokens in args.tokens:
        measure(args, tokens)


if __name__ == "__main__":
    main()
