"""benchmarks/step_speed.py in bf16 on one GPU (run by tests/gpu/check.sh), issue 13:

1. LM head + log-prob/entropy, forward + backward, 16384 tokens x 152064 vocabulary (Qwen2.5's
   151936, padded), hidden 1536: the fused op (ops.lm_head_logprob_entropy, compiled tiles) vs
   materialised logits -> ops.vocab_parallel_logprob_entropy. Time (min of 5, CUDA-synchronised)
   and peak memory above the inputs (torch.cuda.max_memory_allocated). Goal: fused peak < 1/10 of
   the materialised path's, time no worse; the two agree to bf16 accuracy.
2. A training step (trainer passes: fused LM head, PPO-clip loss, Adam) for Qwen2.5-0.5B- and
   1.5B-shaped random models at 4096 tokens (one sequence), SDPA attention and, for 0.5B,
   megatron's unfused local attention: tokens/s, MFU and peak memory. MFU = (6 x params x
   tokens + attention) / time / the chip's dense bf16 peak, attention = 6 x layers x tokens x
   seq x heads x head_dim (QK^T and PV, forward + backward, causal half). Goal: >= 35% MFU for
   the 1.5B shape.
Each goal is a check with that threshold: fused peak < materialised / 10, fused time <= 1.02 x
materialised, relative diffs < 2e-2, MFU >= 35% at 1.5B (a [SKIP] on a chip whose peak is not
in PEAK_BF16); an out-of-memory is a failure. Result lines as tests/gpu/checklib.py says; exits
non-zero unless a check passed and none failed; without a GPU it checks nothing and exits 1.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402
from checklib import Checks  # noqa: E402  (tests/gpu/ is this script's sys.path[0])

# dense bf16 peak FLOP/s by device name (vendor datasheets, no sparsity)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "H20": 148e12, "A100": 312e12, "L40S": 362e12}
SHAPES = {
    "0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2),
    "1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2),
}
C = Checks("step_speed_gpu")


def _cuda_timed(fn, repeats):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return min(times), torch.cuda.max_memory_allocated() - base


def lm_head(n=16384, hidden=1536, vocab=151936, padded=152064):
    from megatron_less.ops import fused_available, lm_head_logprob_entropy, vocab_parallel_logprob_entropy

    g = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(padded, hidden, device="cuda", generator=g) * 0.02).bfloat16()
    h = torch.randn(n, hidden, device="cuda", generator=g).bfloat16()
    t = torch.randint(0, vocab, (n,), device="cuda", generator=g)
    gl, gh = torch.randn(2, n, device="cuda", generator=g)
    results = {}

    def run(fused):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        if fused:
            lp, ent = lm_head_logprob_entropy(hh, ww, t, temperature=0.7, vocab_size=vocab)
        else:
            lp, ent = vocab_parallel_logprob_entropy(hh @ ww.t(), t, temperature=0.7, vocab_size=vocab)
        (lp * gl + ent * gh).sum().backward()
        results[fused] = (lp.detach(), hh.grad, ww.grad)

    print(f"compiled tiles available: {fused_available(h.device)}", flush=True)
    tf, mf = _cuda_timed(lambda: run(True), 5)
    tu, mu = _cuda_timed(lambda: run(False), 5)
    C.time(f"LM head + logprob/entropy fwd+bwd bf16, {n} x {padded} x {hidden}: fused {tf * 1e3:.1f} ms, "
           f"peak {mf / 2**30:.2f} GiB | materialised {tu * 1e3:.1f} ms, peak {mu / 2**30:.2f} GiB | "
           f"time x{tu / tf:.2f}, memory /{mu / max(mf, 1):.1f}")
    C.check("fused LM-head peak memory < 1/10 of the materialised path's", mf * 10 < mu,
            f"{mf / 2**30:.2f} GiB vs {mu / 2**30:.2f} GiB (threshold {mu / 10 / 2**30:.2f} GiB)")
    C.check("fused LM-head time no worse than materialised", tf <= tu * 1.02,
            f"{tf * 1e3:.1f} ms vs {tu * 1e3:.1f} ms (threshold {tu * 1.02e3:.1f} ms)")
    (a_lp, a_h, a_w), (b_lp, b_h, b_w) = results[True], results[False]
    rel = [float((x.float() - y.float()).norm() / y.float().norm()) for x, y in ((a_lp, b_lp), (a_h, b_h), (a_w, b_w))]
    C.check("fused == materialised (bf16)", max(rel) < 2e-2,
            f"relative diffs logprob/d_hidden/d_weight {[f'{r:.1e}' for r in rel]} (threshold 2e-2)")
    results.clear()


def train_step(shape, attention, seq=4096, repeats=3):
    from megatron_less.models import qwen2
    from megatron_less.models.policy import OptimConfig, build_policy
    from megatron_less.trainer.batch import Sequence, build_microbatch
    from megatron_less.trainer.passes import LossSpec, optimizer_step, train_minibatch
    from tests import tiny

    arch = qwen2.Qwen2Arch.from_hf(dict(tiny.BASE, vocab_size=151936, max_position_embeddings=seq,
                                        tie_word_embeddings=True, **SHAPES[shape]))
    policy = build_policy(arch, params_dtype=torch.bfloat16, optim=OptimConfig(lr=1e-6), attention=attention,
                          calculate_per_token_loss=True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, arch.vocab_size, (seq,), generator=g).tolist()
    seqs = [Sequence(0, ids[:16], ids[16:], [], "stop")]
    per_token = {"old_logprobs": -torch.rand(1, seq - 16, generator=g) * 5, "advantages": torch.randn(1, seq - 16, generator=g)}
    mbs = [build_microbatch(seqs, [0], per_token)]
    spec = LossSpec("ppo_clip", {}, "token-mean", 1.0, arch.vocab_size, seq)

    class _Constant:
        def step(self, increment=1):
            pass

    def step():
        train_minibatch(policy, mbs, spec)
        optimizer_step(policy, _Constant(), True)

    dt, peak = _cuda_timed(step, repeats)
    n_params = sum(p.numel() for p in policy.module.parameters())
    attn = 6 * arch.num_hidden_layers * seq * seq * arch.num_attention_heads * arch.head_dim
    flops = 6 * n_params * seq + attn
    name = torch.cuda.get_device_name()
    peak_flops = next((v for k, v in PEAK_BF16.items() if k in name), None)
    mfu = f"{flops / dt / peak_flops:.1%}" if peak_flops else "n/a (unknown chip)"
    C.time(f"Qwen2.5-{shape}-shaped bf16 train step, {attention} attention, {seq} tokens: {dt * 1e3:.1f} ms, "
           f"{seq / dt:,.0f} tokens/s, {flops / dt / 1e12:.0f} TFLOP/s, MFU {mfu}, "
           f"peak {peak / 2**30:.1f} GiB above the model and optimizer")
    return flops / dt / peak_flops if peak_flops else None


def main() -> int:
    if not torch.cuda.is_available():
        C.skip("every check of step_speed_gpu", "no GPU")
        return C.finish()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29513"),
                      RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    from megatron_less.parallel import runtime

    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    with C.guard("LM head: fused vs materialised (ran without an error)"):
        lm_head()
    torch.cuda.empty_cache()
    runtime.initialize(1, 1, seed=1)
    mfu = {}
    for shape, attention in (("0.5B", "local"), ("0.5B", "sdpa"), ("1.5B", "sdpa")):
        with C.guard(f"Qwen2.5-{shape}-shaped train step, {attention} attention (ran without an error)"):
            mfu[shape, attention] = train_step(shape, attention)  # its model is freed on return
        torch.cuda.empty_cache()
    name = "MFU >= 35% for the Qwen2.5-1.5B shape (SDPA, 4096 tokens)"
    if ("1.5B", "sdpa") not in mfu:
        C.skip(name, "its train step failed (above)")
    elif mfu["1.5B", "sdpa"] is None:
        C.skip(name, f"no dense bf16 peak known for {torch.cuda.get_device_name()} (PEAK_BF16)")
    else:
        C.check(name, mfu["1.5B", "sdpa"] >= 0.35, f"{mfu['1.5B', 'sdpa']:.1%} (threshold 35%)")
    runtime.destroy()
    return C.finish()


if __name__ == "__main__":
    sys.exit(main())
