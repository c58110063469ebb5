"""vocab_parallel_logprob_entropy on one GPU (TP=1): correctness vs float64, then memory and time.

    python tests/gpu/vocab_parallel_gpu.py [--tokens 16384] [--vocab 151936] [--skip-naive]
    python tests/gpu/vocab_parallel_gpu.py --cpu      # small CPU smoke run of the same code paths

Torch only (no megatron). Checks: log-prob, entropy and the combined gradient against a float64
reference for fp32 and bf16 logits, temperature 1 and 0.7, default and odd chunks, eager and
fused (torch.compile) kernels; the input must come back bit-identical. Benchmark: bf16 logits
[tokens, vocab] (Qwen2.5's vocabulary by default), forward + backward of
sum(lp * g1 + H * g2), each way: peak CUDA memory above the inputs
(torch.cuda.max_memory_allocated, gradient included), and the best of 3 timed runs. On the GPU
each of the op's runs is a check: it must not run out of memory, and its peak beyond the
gradient must stay under 1/4 of one fp32 [tokens, vocab] buffer (the naive path holds several);
the fused run must also be faster than the naive one. Result lines as tests/gpu/checklib.py
says ([PASS] / [FAIL] / [SKIP], BENCH / RATIO / INFO figures); exits non-zero unless a check
passed and none failed; without a GPU (and without --cpu) it checks nothing and exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from megatron_less.ops.vocab_parallel import (  # noqa: E402
    default_chunk_size,
    fused_available,
    vocab_parallel_logprob_entropy,
)
from tests.vocab_reference import reference  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from checklib import Checks  # noqa: E402

C = Checks("vocab_parallel_gpu")


def check(dev, fused_modes):
    g = torch.Generator(device="cpu").manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for n, v, temp, chunk in ((257, 5003, 1.0, None), (300, 4099, 0.7, 37)):
            x = torch.randn(n, v, generator=g) * 3 + 10
            x[torch.arange(40), torch.arange(40)] += torch.linspace(4, 16, 40) / temp  # confident
            t = torch.randint(0, v, (n,), generator=g)
            t[:20] = torch.arange(20)  # ... with the argmax as target
            x, t = x.to(dtype).to(dev), t.to(dev)
            g1, g2 = torch.randn(2, n, generator=g).to(dev)
            xr = x.double().requires_grad_()
            lp_r, h_r = reference(xr, t, temp)
            (lp_r * g1 + h_r * g2).sum().backward()
            for fused in fused_modes:
                name = f"{str(dtype)[6:]:8s} T={temp} chunk={chunk} {'fused' if fused else 'eager'}"
                try:
                    xx = x.clone().requires_grad_()
                    before = xx.detach().clone()
                    lp, h = vocab_parallel_logprob_entropy(xx, t, temperature=temp, chunk_size=chunk, fused=fused)
                    (lp * g1 + h * g2).sum().backward()
                    e_lp = ((lp.double() - lp_r) / lp_r).abs().max().item()
                    e_h = ((h.double() - h_r) / h_r).abs().max().item()
                    err = xx.grad.double() - xr.grad
                    if dtype == torch.bfloat16:  # one bf16 rounding of an fp32-accurate value
                        e_g = (err.abs() / xr.grad.abs().clamp_min(1e-30)).max().item()
                        ok_g = e_g <= 2.0**-8 * (1 + 1e-5)
                    else:  # per token, normwise
                        e_g = (err.norm(dim=-1) / xr.grad.norm(dim=-1)).max().item()
                        ok_g = e_g < 1e-6
                    same = torch.equal(xx.detach().view(torch.uint8), before.view(torch.uint8))
                    ok = e_lp < 1e-6 and e_h < 1e-6 and ok_g and same and xx.grad.dtype == dtype
                    C.check(name, ok, f"logprob rel {e_lp:.1e}, entropy rel {e_h:.1e} (< 1e-6), grad rel {e_g:.1e} "
                            f"(< {'2^-8' if dtype == torch.bfloat16 else '1e-6'}), input untouched {same}")
                except Exception:  # noqa: BLE001 - report and carry on to the benchmark
                    C.check(name, False, f"ERROR\n{traceback.format_exc()}")


def check_padded(dev, fused_modes):
    """vocab_size=: Megatron's padded columns (here junk far above every real logit) must not
    count, and must get exactly zero gradient."""
    g = torch.Generator(device="cpu").manual_seed(1)
    n, v, pad, temp = 300, 4096, 123, 0.8
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(n, v, generator=g) * 3
        x[:, v - pad:] += 60.0
        t = torch.randint(0, v - pad, (n,), generator=g)
        x, t = x.to(dtype).to(dev), t.to(dev)
        g1, g2 = torch.randn(2, n, generator=g).to(dev)
        xr = x[:, : v - pad].double().requires_grad_()
        lp_r, h_r = reference(xr, t, temp)
        (lp_r * g1 + h_r * g2).sum().backward()
        for fused in fused_modes:
            name = f"padded vocab {str(dtype)[6:]:8s} {'fused' if fused else 'eager'}"
            try:
                xx = x.clone().requires_grad_()
                lp, h = vocab_parallel_logprob_entropy(xx, t, temperature=temp, vocab_size=v - pad, fused=fused)
                (lp * g1 + h * g2).sum().backward()
                e_lp = ((lp.double() - lp_r) / lp_r).abs().max().item()
                e_h = ((h.double() - h_r) / h_r).abs().max().item()
                pad_zero = bool((xx.grad[:, v - pad:] == 0).all())
                tol = 1e-6 if dtype == torch.float32 else 1e-5
                ok = e_lp < tol and e_h < tol and pad_zero
                C.check(name, ok, f"logprob rel {e_lp:.1e}, entropy rel {e_h:.1e} (< {tol:.0e}), "
                        f"padded grad zero {pad_zero}")
            except Exception:  # noqa: BLE001
                C.check(name, False, f"ERROR\n{traceback.format_exc()}")


def naive(x, t, g1, g2):
    logp = torch.log_softmax(x.float(), -1)
    lp = logp.gather(-1, t.unsqueeze(-1)).squeeze(-1)
    h = -(logp.exp() * logp).sum(-1)
    (lp * g1 + h * g2).sum().backward()


def ours(**kw):
    def run(x, t, g1, g2):
        lp, h = vocab_parallel_logprob_entropy(x, t, **kw)
        loss = lp * g1 + (h * g2 if h is not None else 0)
        loss.sum().backward()

    return run


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def bench(dev, tokens, vocab, runs, repeats=3):
    g = torch.Generator(device=dev).manual_seed(1)  # on the device: 10 GB of CPU randn is slow
    x = torch.randn(tokens, vocab, generator=g, device=dev, dtype=torch.bfloat16).mul_(2).requires_grad_()
    t = torch.randint(0, vocab, (tokens,), generator=g, device=dev)
    g1, g2 = torch.randn(2, tokens, generator=g, device=dev)
    grad_mib = x.numel() * x.element_size() / 2**20
    print(f"INFO bench: {tokens} tokens x {vocab} vocab, bf16 logits {grad_mib:.0f} MiB (the gradient is "
          f"as big and counted in every peak); one fp32 [T, V] = {2 * grad_mib:.0f} MiB", flush=True)
    out = {}
    for label, fn in runs:
        try:
            x.grad = None
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            sync(dev)
            t0 = time.perf_counter()
            if dev.type == "cuda":
                fn(x, t, g1, g2)  # first call: includes any compilation
                sync(dev)
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            else:  # torch's CPU allocator events, replayed (see megatron_less/ops/memory.py)
                from megatron_less.ops.memory import peak_tensor_bytes

                peak = peak_tensor_bytes(lambda fn=fn: fn(x, t, g1, g2))[0] / 2**20
            first = time.perf_counter() - t0
            times = []
            for _ in range(repeats):
                x.grad = None
                sync(dev)
                t0 = time.perf_counter()
                fn(x, t, g1, g2)
                sync(dev)
                times.append(time.perf_counter() - t0)
            out[label] = (min(times), peak)
            print(f"BENCH {label:34s} fwd+bwd {min(times) * 1e3:9.1f} ms  (first call {first:6.1f} s)  "
                  f"peak {peak:9.0f} MiB  minus grad {peak - grad_mib:9.0f} MiB", flush=True)
        except torch.cuda.OutOfMemoryError:
            C.check(f"bench {label}", False, f"out of memory ({tokens} x {vocab})")
        except Exception:  # noqa: BLE001
            C.check(f"bench {label}", False, f"ERROR\n{traceback.format_exc()}")
        x.grad = None
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="small smoke run on the CPU")
    ap.add_argument("--fused", action="store_true", help="with --cpu: also the compiled kernels (slow)")
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--no-fused", action="store_true", help="skip the torch.compile path")
    args = ap.parse_args()
    if args.cpu:
        dev = torch.device("cpu")
        # one thread: many small ops on a shared machine stall at every intra-op barrier
        torch.set_num_threads(1)
        tokens, vocab = args.tokens or 256, min(args.vocab, 8192)
    elif not torch.cuda.is_available():
        C.skip("every check of vocab_parallel_gpu", "no GPU (use --cpu for the CPU smoke run)")
        sys.exit(C.finish())
    else:
        dev = torch.device("cuda")
        tokens, vocab = args.tokens or 16384, args.vocab
        print(f"INFO device {torch.cuda.get_device_name()}, torch {torch.__version__}, "
              f"fused kernels available: {fused_available(dev)}", flush=True)
    fused = fused_available(dev) if dev.type == "cuda" else args.fused
    fused_modes = [False] + ([True] if fused and not args.no_fused else [])
    t0 = time.perf_counter()
    check(dev, fused_modes)
    check_padded(dev, fused_modes)
    print(f"INFO checks took {time.perf_counter() - t0:.1f} s", flush=True)

    eager_rows = default_chunk_size(vocab, dev)
    runs = [(f"op eager, chunk {eager_rows} (default)", ours(fused=False))]
    if dev.type == "cuda":
        for mib in (64, 1024):
            rows = max(1, (mib << 20) // (4 * vocab))
            runs.append((f"op eager, chunk {rows} ({mib} MiB)", ours(fused=False, chunk_size=rows)))
    if True in fused_modes:
        runs += [("op fused (CUDA default)", ours(fused=True)),
                 ("op fused, chunk 2048", ours(fused=True, chunk_size=2048)),
                 ("op fused, logprob only", ours(fused=True, with_entropy=False))]
    if not args.skip_naive:
        runs.append(("naive log_softmax + entropy", naive))
    res = bench(dev, tokens, vocab, runs)
    naive_label = "naive log_softmax + entropy"
    if naive_label in res:
        tn, pn = res[naive_label]
        for label, (tm, pk) in res.items():
            print(f"RATIO {label:34s} time x{tm / tn:5.2f} of naive   peak memory x{pk / pn:6.3f} of naive")
    fp32_mib = tokens * vocab * 4 / 2**20
    grad_mib = fp32_mib / 2  # the bf16 gradient, counted in every peak
    for label, (tm, pk) in res.items():
        if label == naive_label:
            continue
        name = f"{label}: peak memory beyond the gradient < 1/4 of one fp32 [T, V]"
        if dev.type != "cuda":
            C.skip(name, "CPU smoke run (the threshold is for the GPU's allocator)")
            continue
        C.check(name, pk - grad_mib < fp32_mib / 4, f"{pk - grad_mib:.0f} MiB (threshold {fp32_mib / 4:.0f} MiB)")
    name = "op fused faster than naive (fwd+bwd)"
    fused_label = "op fused (CUDA default)"
    if fused_label in res and naive_label in res and dev.type == "cuda":
        C.check(name, res[fused_label][0] < res[naive_label][0],
                f"{res[fused_label][0] * 1e3:.1f} ms vs {res[naive_label][0] * 1e3:.1f} ms")
    else:
        C.skip(name, "needs the fused kernels and the naive run on a GPU (--skip-naive, --no-fused or no compile)")
    print(f"INFO total {time.perf_counter() - t0:.0f} s")
    sys.exit(C.finish())


if __name__ == "__main__":
    main()
