"""trainer.passes.train_minibatch: per-micro-batch numbers stay on the device (one host read per
mini-batch), and a loss's random choices (Clip-Cov) draw from the generator the caller seeds from
(seed, step, rank), never from the process RNG - through the real passes on a tiny policy in one
gloo rank."""

from __future__ import annotations

import pytest
import torch

from megatron_less.parallel.spawn import run_distributed
from megatron_less.trainer import passes
from tests import tiny

# --- host reads of the accumulated metrics -----------------------------------------------------

HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "numpy", "cpu")


class ReadCounting(torch.Tensor):
    """A tensor that counts reads of its values by the host (each a device sync on a GPU);
    every tensor computed from it is one too."""

    reads: list[str] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            cls.reads.append(name)
        return super().__torch_function__(func, types, args, kwargs or {})


def _micro_batch_numbers(k):
    """One micro-batch's loss outputs as the losses return them: 0-dim float32 metrics (the
    aggregated terms as sums), the loss, and an integer count."""
    g = torch.Generator().manual_seed(k)
    v = torch.randn(6, generator=g, dtype=torch.float32)
    metrics = {"pg_loss": v[0], "entropy": v[1].abs(), "kl_ref": v[2].abs(), "pg_clipfrac": v[3].sigmoid(),
               "ppo_kl": v[4], "cov_clipfrac": v[5].sigmoid()}  # fmt: skip
    return metrics, v.sum() * 3, torch.tensor(17 + k, dtype=torch.int), 17 + 2 * k


def test_accumulation_reads_the_device_once_per_minibatch():
    ReadCounting.reads = []
    sums = {}
    expect = {}  # the numbers as host floats, micro-batch by micro-batch (the old accumulation)
    for k in range(5):
        metrics, total, count, n_tok = _micro_batch_numbers(k)
        for key, v in metrics.items():
            name = "agg_" + key if key in passes.AGGREGATED else key
            expect[name] = expect.get(name, 0.0) + (float(v) if key in passes.AGGREGATED else float(v) * n_tok)
        expect["_tokens"] = expect.get("_tokens", 0.0) + n_tok
        expect["_loss_sum"] = expect.get("_loss_sum", 0.0) + float(total)
        expect["_loss_count"] = expect.get("_loss_count", 0.0) + float(count)
        counted = {key: v.as_subclass(ReadCounting) for key, v in metrics.items()}
        passes._accumulate(sums, counted, n_tok, total.as_subclass(ReadCounting), count.as_subclass(ReadCounting))
    assert ReadCounting.reads == [], f"host reads while accumulating: {ReadCounting.reads}"
    out = passes.read_sums(sums)
    assert len(ReadCounting.reads) == 1, f"host reads for one mini-batch: {ReadCounting.reads}"
    assert all(type(v) is float for v in out.values())
    assert out == expect  # bit for bit: float64 sums on the device, as the host's were
    assert passes.read_sums({}) == {}


# --- Clip-Cov through the training pass --------------------------------------------------------


def _job():
    from megatron_less.algos.entropy_baselines import step_generator
    from megatron_less.models import qwen2
    from megatron_less.models.policy import OptimConfig, build_policy
    from megatron_less.parallel import runtime
    from megatron_less.trainer.batch import Sequence, build_microbatch
    from megatron_less.trainer.passes import LossSpec, train_minibatch

    arch = qwen2.Qwen2Arch.from_hf(dict(tiny.BASE))
    g = torch.Generator().manual_seed(5)
    seqs = []
    for k, (p, r) in enumerate([(3, 9), (5, 4), (2, 12), (4, 7)]):
        prompt, resp = torch.randint(3, arch.vocab_size, (p + r,), generator=g).split([p, r])
        seqs.append(Sequence(k // 2, prompt.tolist(), resp.tolist(), [], "stop"))
    width = max(len(s.response) for s in seqs)
    per_token = {"old_logprobs": -torch.rand(len(seqs), width, generator=g) * 6,
                 "advantages": torch.randn(len(seqs), width, generator=g)}  # fmt: skip
    mbs = [build_microbatch(seqs, rows, per_token) for rows in ([0, 1], [2, 3])]
    runtime.initialize(1, 1, seed=7)
    policy = build_policy(arch, hf_weights=tiny.hf_model(seed=0).state_dict(), optim=OptimConfig(),
                          calculate_per_token_loss=True)  # fmt: skip
    # every valid token eligible, a third of them zeroed: the choice shows in the gradients
    spec = LossSpec("clip_cov", dict(clip_cov_ratio=0.3, clip_cov_lb=-1e9, clip_cov_ub=1e9), "token-mean", 0.7,
                    arch.vocab_size, width)  # fmt: skip

    def grads(seed, step, process_seed):
        torch.manual_seed(process_seed)
        before = torch.get_rng_state()
        sums = train_minibatch(policy, mbs, spec, generator=step_generator(seed, step, 0))
        untouched = torch.equal(torch.get_rng_state(), before)
        flat = torch.cat([p.main_grad.flatten().clone() for p in policy.module.parameters()])
        return flat, sums, untouched

    a, sums, untouched = grads(3, 10, process_seed=1)
    b, _, untouched_b = grads(3, 10, process_seed=2)
    c, _, _ = grads(3, 11, process_seed=1)
    runtime.destroy()
    return dict(same=torch.equal(a, b), differ=not torch.equal(a, c), untouched=untouched and untouched_b,
                sums=sums, nonzero=bool(a.abs().sum() > 0))  # fmt: skip


def test_clip_cov_in_the_training_pass_draws_from_the_step_generator():
    res = run_distributed(_job, 1, timeout=300)[0]
    assert res["untouched"], "the training pass drew from the process RNG"
    assert res["nonzero"] and res["same"], "same (seed, step, rank), other process RNG: other gradients"
    assert res["differ"], "another step chose the same tokens"
    sums = res["sums"]
    assert all(type(v) is float for v in sums.values()) and sums["_tokens"] == 32
    # floor(0.3 * N) of each micro-batch's N valid tokens (13 and 19), token-weighted
    assert sums["cov_clipfrac"] == pytest.approx(3 + 5)
