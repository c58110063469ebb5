"""bf16 vLLM rollouts against the fp32 trainer, on CPU: speed, log-prob mismatch, kernels.

For each tiny random Qwen2 (the vLLM tests' model, tests/tiny.ROLLOUT, and a wider one) the
weights go through the real path (Megatron policy -> ``VLLMEngine.sync_weights``) into one engine
in fp32 and one in bf16, each in its own process (vLLM's external launcher owns the process's
torch.distributed world). Both sample the same prompts with the same seeds at temperature 1.
Reported: tokens/s of each; for every sampled token |engine log-prob - fp32 reference|, the
reference being log_softmax(logits / T) of the SAME tokens under the HF transformers model in
fp32 over the real vocabulary (the fp32 engine is the control); and which oneDNN kernels the
bf16 engine's linear layers run (a third process with ONEDNN_VERBOSE=1: vLLM's CPU linear is
``onednn_mm`` from vLLM's own _C library, which links oneDNN statically; see
vllm/model_executor/layers/utils.py: dispatch_cpu_unquantized_gemm).

    python benchmarks/vllm_bf16.py [--threads 1] [--max-tokens 48]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# tests/tiny.BASE + tests/tiny.ROLLOUT (head_dim 32: vLLM's CPU attention has no smaller kernel)
TINY = dict(vocab_size=250, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=256,
            tie_word_embeddings=True, hidden_act="silu", initializer_range=0.3)  # fmt: skip
MODELS = {"tiny-h128": TINY, "wide-h256": dict(TINY, hidden_size=256, intermediate_size=768, num_attention_heads=8),
          # transformers' default init: near-uniform next-token distributions, small activations
          "tiny-i0.02": dict(TINY, initializer_range=0.02)}


def prompts(n: int, vocab: int) -> list[list[int]]:
    import random

    rng = random.Random(0)
    return [[rng.randrange(vocab) for _ in range(rng.randrange(8, 33))] for _ in range(n)]


# -- worker: one engine, one dtype ---------------------------------------------------------------
def worker(a) -> None:
    import torch
    from transformers import Qwen2Config

    from megatron_less.models import hf_mapping, qwen2
    from megatron_less.models.policy import build_policy
    from megatron_less.parallel import runtime
    from megatron_less.rollout.base import SamplingParams
    from megatron_less.rollout.vllm_engine import VLLMEngine
    from safetensors.torch import load_file

    arch = qwen2.Qwen2Arch.from_hf(Qwen2Config.from_pretrained(a.model))
    runtime.initialize(1, 1)
    policy = build_policy(arch)
    hf_mapping.load_hf_weights(policy.module, load_file(os.path.join(a.model, "model.safetensors")), arch)
    t0 = time.perf_counter()
    engine = VLLMEngine(arch, dtype=a.dtype, kv_cache_bytes=128 << 20, seed=0)
    startup = time.perf_counter() - t0
    engine.sync_weights(policy.module)
    ps = prompts(a.prompts, arch.vocab_size)
    sp = SamplingParams(temperature=1.0, max_tokens=a.max_tokens, seed=7)
    engine.generate(ps[:2], 1, SamplingParams(temperature=1.0, max_tokens=4, seed=1))  # warm-up
    if a.verbose:
        print("=== MLESS VERBOSE START ===", flush=True)
    t0 = time.perf_counter()
    out = engine.generate(ps, a.n, sp)
    seconds = time.perf_counter() - t0
    if a.verbose:
        print("=== MLESS VERBOSE END ===", flush=True)
    rows = [[(r.token_ids, r.logprobs) for r in rs] for rs in out]
    res = dict(dtype=a.dtype, seconds=seconds, startup_seconds=startup, tokens=sum(len(t) for rs in rows for t, _ in rs),
               threads=torch.get_num_threads(), prompts=ps, rows=rows)  # fmt: skip
    Path(a.out).write_text(json.dumps(res))
    engine.shutdown()
    runtime.destroy()


def run_worker(model_dir, dtype, out, a, verbose=False) -> tuple[dict, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), VLLM_CPU_OMP_THREADS_BIND="nobind",
               VLLM_LOGGING_LEVEL="WARNING", PYTHONPATH=str(ROOT))  # fmt: skip
    if verbose:
        env.update(ONEDNN_VERBOSE="1", DNNL_VERBOSE="1")
    cmd = [sys.executable, __file__, "--worker", "--model", str(model_dir), "--dtype", dtype, "--out", str(out),
           "--prompts", str(a.prompts), "--n", str(a.n), "--max-tokens", str(a.max_tokens)]  # fmt: skip
    cmd += ["--verbose"] if verbose else []
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if p.returncode:
        sys.exit(f"worker {dtype} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return json.loads(Path(out).read_text()), p.stdout


# -- reference and statistics ----------------------------------------------------------------------
def reference(model, ps, rows, vocab):
    """fp32 log-probs (temperature 1, real vocabulary) of each sampled token; also the mean
    entropy of those next-token distributions (how peaked the random model is)."""
    import torch

    lps, ents = [], []
    with torch.no_grad():
        for p, rs in zip(ps, rows):
            for toks, _ in rs:
                logits = model(torch.tensor([p + toks])).logits[0, len(p) - 1 : len(p) - 1 + len(toks), :vocab].float()
                lp = torch.log_softmax(logits.double(), -1)
                lps.append(lp.gather(1, torch.tensor(toks).view(-1, 1)).view(-1))
                ents.append(-(lp.exp() * lp).sum(-1))
    return lps, float(torch.cat(ents).mean())


def gap_stats(rows, ref):
    """|log-probs - ref| over every token; ``rows``: the engine's samples, or a list of tensors."""
    import torch

    eng = torch.cat([torch.tensor(lp, dtype=torch.float64) for rs in rows for _, lp in rs]) if rows and isinstance(
        rows[0], list) else torch.cat(rows)
    d = (eng - torch.cat(ref)).abs()
    return dict(mean=float(d.mean()), max=float(d.max()), over_0_01=float((d > 0.01).double().mean()),
                over_0_1=float((d > 0.1).double().mean()), n=d.numel())  # fmt: skip


def common_prefix(a_rows, b_rows) -> float:
    """Mean number of leading tokens the fp32 and bf16 engines sampled alike (same seeds)."""
    seqs = [(x[0], y[0]) for ra, rb in zip(a_rows, b_rows) for x, y in zip(ra, rb)]
    return sum(next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), len(x)) for x, y in seqs) / len(seqs)


def onednn_counts(stdout: str):
    """oneDNN verbose exec lines of the timed generation, by (primitive, implementation, dtypes);
    the timed section is marked by the worker."""
    body = stdout.split("=== MLESS VERBOSE START ===")[-1].split("=== MLESS VERBOSE END ===")[0]
    info = [ln for ln in stdout.splitlines() if re.match(r"onednn_verbose,.*info,(cpu|oneDNN)", ln)]
    c = collections.Counter()
    for ln in body.splitlines():
        f = ln.split(",")
        if ln.startswith("onednn_verbose") and "exec" in f:
            i = f.index("exec")  # onednn_verbose,[time,]primitive,exec,cpu,<prim>,<impl>,<prop>,<mds>...
            prim, impl, mds = f[i + 2], f[i + 3], f[i + 5]
            dts = "/".join(sorted({m.split(":")[1] for m in mds.split() if m.count(":") >= 2}))
            c[(prim, impl, dts)] += 1
    return c, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--verbose", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help="OMP threads of each engine (default 1)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--n", type=int, default=4, help="samples per prompt")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--models", default=",".join(MODELS), help=f"subset of {list(MODELS)}")
    a = ap.parse_args()
    if a.worker:
        return worker(a)

    import torch
    import vllm
    from transformers import Qwen2Config, Qwen2ForCausalLM

    t_start = time.perf_counter()
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), "?")
    flags = open("/proc/cpuinfo").read().split("flags", 2)[1].split("\n")[0].split()
    print(f"$ {shlex.join(['python', 'benchmarks/vllm_bf16.py', *sys.argv[1:]])}")
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}   host cpu: {model_name}, "
          f"{os.cpu_count()} cpus; {' '.join(f for f in flags if f.startswith(('avx512_bf16', 'amx')))} "
          f"(no AMX: {not any(f.startswith('amx') for f in flags)})")
    print(f"torch {torch.__version__}, vllm {vllm.__version__}, python {platform.python_version()}; "
          f"{a.prompts} prompts x n={a.n} x {a.max_tokens} tokens (ignore_eos), T=1, {a.threads} thread(s) per engine")
    mk = torch.backends.mkldnn
    bf16_sup = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    print(f"torch: mkldnn.is_available()={mk.is_available()}  mkldnn._is_mkldnn_bf16_supported()="
          f"{bf16_sup() if bf16_sup else 'absent'}  cpu._is_avx512_bf16_supported()={torch.cpu._is_avx512_bf16_supported()}"
          f"  cpu._is_amx_tile_supported()={torch.cpu._is_amx_tile_supported()}  "
          f"capability={torch.backends.cpu.get_cpu_capability()}")
    from vllm import _custom_ops as ops  # noqa: F401  (loads vLLM's CPU kernels: _C on AVX512-BF16)

    print(f"vllm: _C library: {'vllm._C (AVX512 + BF16 build)' if 'vllm._C' in sys.modules else '?'}; "
          f"_supports_onednn={ops._supports_onednn}; is_zen_cpu={vllm.platforms.current_platform.is_zen_cpu()}")

    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    print(f"vllm: attention is vLLM's own kernel (not oneDNN), isa for bf16 / fp32, head_dim 32, block 128: "
          f"{_get_attn_isa(torch.bfloat16, 128, 32)} / {_get_attn_isa(torch.float32, 128, 32)}")
    results = {}
    tmp = Path(tempfile.mkdtemp(prefix="mless-bf16-"))
    for name in a.models.split(","):
        cfg = MODELS[name]
        mdir = tmp / name
        torch.manual_seed(0)
        d = {k: v for k, v in cfg.items()}
        hf = Qwen2ForCausalLM(Qwen2Config(**d)).float().eval()
        hf.save_pretrained(mdir)
        params = sum(p.numel() for p in hf.parameters())
        runs = {dt: run_worker(mdir, dt, tmp / f"{name}-{dt}.json", a)[0] for dt in ("float32", "bfloat16")}
        ref, entropy = reference(hf, runs["float32"]["prompts"], runs["bfloat16"]["rows"], cfg["vocab_size"])
        ref32, _ = reference(hf, runs["float32"]["prompts"], runs["float32"]["rows"], cfg["vocab_size"])
        # plain torch bf16 (the HF model cast) on the bf16 engine's tokens: what bf16 itself costs
        hf_bf16, _ = reference(hf.to(torch.bfloat16), runs["float32"]["prompts"], runs["bfloat16"]["rows"],
                               cfg["vocab_size"])
        results[name] = dict(params=params, runs=runs, entropy=entropy, bf16=gap_stats(runs["bfloat16"]["rows"], ref),
                             fp32=gap_stats(runs["float32"]["rows"], ref32), hf_bf16=gap_stats(hf_bf16, ref),
                             prefix=common_prefix(runs["float32"]["rows"], runs["bfloat16"]["rows"]))  # fmt: skip
    # kernels: one more engine per dtype (the wide model if run) with oneDNN's verbose log on
    names = a.models.split(",")
    vname = "wide-h256" if "wide-h256" in names else names[0]
    _, out = run_worker(tmp / vname, "bfloat16", tmp / "verbose.json", a, verbose=True)
    counts, info = onednn_counts(out)
    _, out32 = run_worker(tmp / vname, "float32", tmp / "verbose32.json", a, verbose=True)
    counts32, _ = onednn_counts(out32)

    print("\n==================== vLLM bf16 vs fp32 on CPU: summary ====================")
    print(f"{'model':<11} {'params':>8} {'fp32 tok/s':>11} {'bf16 tok/s':>11} {'bf16/fp32':>9}  tokens  same first tokens")
    for name, r in results.items():
        f, b = (r["runs"][dt] for dt in ("float32", "bfloat16"))
        tf, tb = f["tokens"] / f["seconds"], b["tokens"] / b["seconds"]
        print(f"{name:<11} {r['params']:>8} {tf:>11.0f} {tb:>11.0f} {tb / tf:>9.2f}  {b['tokens']:>6}  "
              f"{r['prefix']:.1f} of {a.max_tokens} (mean, fp32 vs bf16 engine, same seeds)")
    print("\n|log-prob(engine) - log-prob(HF fp32, same tokens)|, T=1, per sampled token:")
    print("(fp32, bf16: the vLLM engines' own log-probs; hf_bf16: the HF model cast to bf16, on bf16's tokens)")
    print(f"{'model':<11} {'engine':<7} {'mean':>9} {'max':>9} {'>0.01':>7} {'>0.1':>7}  (fp32 entropy of those steps)")
    for name, r in results.items():
        for dt in ("fp32", "bf16", "hf_bf16"):
            s = r[dt]
            ent = f"  {r['entropy']:.2f} nats" if dt == "bf16" else ""
            print(f"{name:<11} {dt:<7} {s['mean']:>9.2e} {s['max']:>9.2e} {s['over_0_01']:>7.1%} {s['over_0_1']:>7.1%}{ent}")
    print(f"\noneDNN (vLLM's _C) during the timed generation of {vname}, ONEDNN_VERBOSE=1 exec lines:")
    for ln in info[:3]:
        print("  " + ln)
    for label, c in (("bf16 engine", counts), ("fp32 engine", counts32)):
        total = sum(c.values())
        print(f"  {label}: {total} primitive executions")
        for (prim, impl, dts), k in c.most_common():
            print(f"    {k:>6}  {prim:<10} {impl:<28} {dts}")
    bf16_isa = sum(k for (p, impl, dts), k in counts.items() if "bf16" in impl)
    print(f"  => bf16 matmuls on an AVX512-BF16 implementation: {bf16_isa}/{sum(counts.values())} executions")
    print(f"total wall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
