"""PPO-clip loss, aggregation modes, KL / entropy terms: hand-computed values and gradient checks."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_less.algos.losses import aggregate, kl_penalty, ppo_clip_loss

# Three responses (float64). Ratios are set through log_prob with old_log_prob = 0.
#   row 0, A = +1:  r = 1.1 (unclipped), 1.5 (clipped to 1.28), 0.5 (unclipped: min side)
#   row 1, A = -2:  r = 0.5 (clipped to 0.8), 1.2 (unclipped), 30 (dual-clipped at -A*c = 20)
#   row 2, A = 0.5: r = 1 on its one valid token; padding has a huge ratio that must not count
RATIOS = [[1.1, 1.5, 0.5], [0.5, 1.2, 30.0], [1.0, 1e6, 1e6]]
ADV = [1.0, -2.0, 0.5]
MASK = [[1, 1, 1], [1, 1, 1], [1, 0, 0]]
TOKEN_LOSS = [[-1.1, -1.28, -0.5], [1.6, 2.4, 20.0], [-0.5, 0.0, 0.0]]  # by hand (masked)


def example(dtype=torch.float64):
    log_prob = torch.tensor(RATIOS, dtype=dtype).log().requires_grad_()
    return (
        log_prob,
        torch.zeros(3, 3, dtype=dtype),
        torch.tensor(ADV, dtype=dtype),
        torch.tensor(MASK, dtype=torch.bool),
    )


@pytest.mark.parametrize(
    "mode,expected",
    [
        ("token-mean", 20.62 / 7),
        ("seq-mean-token-mean", (-2.88 / 3 + 24.0 / 3 - 0.5) / 3),
        ("seq-mean-token-sum", 20.62 / 3),
        ("seq-mean-token-sum-norm", 20.62 / 4 / 3),
    ],
)
def test_ppo_clip_hand_values(mode, expected):
    loss, metrics = ppo_clip_loss(*example(), loss_agg_mode=mode, max_response_len=4)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert metrics["clipfrac"].item() == pytest.approx(2 / 7)
    assert metrics["clipfrac_dual"].item() == pytest.approx(1 / 7)
    assert metrics["approx_kl"].item() == pytest.approx(
        -sum(math.log(r) for r in [1.1, 1.5, 0.5, 0.5, 1.2, 30.0, 1.0]) / 7
    )
    assert metrics["ratio_max"].item() == pytest.approx(30.0)
    assert metrics["pg_loss"].item() == pytest.approx(expected, rel=1e-12)


def test_dual_clip_off_and_token_values():
    log_prob, old, adv, mask = example()
    loss, _ = ppo_clip_loss(log_prob, old, adv, mask, dual_clip_c=None)
    assert loss.item() == pytest.approx((20.62 - 20.0 + 60.0) / 7)
    # Per-token gradient of token-mean: d/dlogp (-A r) = -A r / 7 where unclipped, 0 where clipped.
    loss, _ = ppo_clip_loss(log_prob, old, adv, mask)
    loss.backward()
    expect = [[-1.1, 0, -0.5], [0, 2.4, 0], [-0.5, 0, 0]]
    torch.testing.assert_close(log_prob.grad, torch.tensor(expect, dtype=torch.float64) / 7)


def test_token_level_advantages_match_broadcast():
    log_prob, old, adv, mask = example()
    a, _ = ppo_clip_loss(log_prob, old, adv, mask)
    b, _ = ppo_clip_loss(log_prob, old, adv[:, None].expand(3, 3), mask)
    assert a.item() == b.item()


@pytest.mark.parametrize(
    "mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
)
def test_micro_batches_sum_to_the_global_loss(mode):
    g = torch.Generator().manual_seed(0)
    lp = torch.randn(6, 5, generator=g, dtype=torch.float64) * 0.3
    old = torch.randn(6, 5, generator=g, dtype=torch.float64) * 0.3
    adv = torch.randn(6, 5, generator=g, dtype=torch.float64)
    mask = torch.arange(5) < torch.tensor([5, 3, 1, 4, 2, 5])[:, None]
    full, _ = ppo_clip_loss(lp, old, adv, mask, loss_agg_mode=mode, max_response_len=8)
    parts = sum(
        ppo_clip_loss(
            lp[s], old[s], adv[s], mask[s], loss_agg_mode=mode, max_response_len=8,
            global_num_tokens=int(mask.sum()), global_num_seqs=6,
        )[0]
        for s in (slice(0, 1), slice(1, 4), slice(4, 6))
    )  # fmt: skip
    assert parts.item() == pytest.approx(full.item(), rel=1e-12)


def test_aggregate_rejects_unknown_mode_and_handles_empty():
    with pytest.raises(ValueError, match="unknown loss_agg_mode 'mean'; valid: token-mean"):
        aggregate(torch.zeros(1, 1), torch.ones(1, 1), "mean")
    assert aggregate(torch.ones(2, 3), torch.zeros(2, 3)).item() == 0.0
    assert aggregate(torch.ones(2, 3), torch.zeros(2, 3), "seq-mean-token-mean").item() == 0.0


def test_kl_estimators_by_hand():
    lp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert kl_penalty(lp, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_penalty(lp, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl_penalty(lp, ref, "k3").item() == pytest.approx(0.5 - math.log(0.5) - 1)
    assert kl_penalty(lp, ref, "low_var_kl").item() == kl_penalty(lp, ref, "k3").item()
    assert kl_penalty(torch.tensor([0.0]), torch.tensor([50.0]), "k3").item() == 10.0  # clamped
    with pytest.raises(ValueError, match="unknown kl_type"):
        kl_penalty(lp, ref, "k4")


def test_kl_and_entropy_terms_add_to_the_loss():
    log_prob, old, adv, mask = example()
    ref = torch.zeros(3, 3, dtype=torch.float64)
    ent = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 100.0, 100.0]], dtype=torch.float64)
    base, _ = ppo_clip_loss(log_prob, old, adv, mask)
    loss, m = ppo_clip_loss(
        log_prob, old, adv, mask, ref_log_prob=ref, kl_coef=0.1, kl_type="k1", entropy=ent, entropy_coef=0.01
    )
    kl = sum(math.log(r) for r in [1.1, 1.5, 0.5, 0.5, 1.2, 30.0, 1.0]) / 7
    assert m["kl_ref"].item() == pytest.approx(kl)
    assert m["entropy"].item() == pytest.approx(28 / 7)
    assert loss.item() == pytest.approx(base.item() + 0.1 * kl - 0.01 * 4.0)


@pytest.mark.parametrize(
    "mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
)
def test_gradcheck_ppo_clip_with_kl_and_entropy(mode):
    g = torch.Generator().manual_seed(1)
    old = torch.randn(3, 4, generator=g, dtype=torch.float64) * 0.2
    lp = (old + torch.randn(3, 4, generator=g, dtype=torch.float64) * 0.4).requires_grad_()
    adv = torch.randn(3, 4, generator=g, dtype=torch.float64)
    ref = torch.randn(3, 4, generator=g, dtype=torch.float64) * 0.2
    ent = torch.rand(3, 4, generator=g, dtype=torch.float64).requires_grad_()
    mask = torch.arange(4) < torch.tensor([4, 2, 3])[:, None]

    def f(lp, ent):
        return ppo_clip_loss(
            lp,
            old,
            adv,
            mask,
            loss_agg_mode=mode,
            ref_log_prob=ref,
            kl_coef=0.05,
            entropy=ent,
            entropy_coef=0.01,
        )[0]

    assert torch.autograd.gradcheck(f, (lp, ent))


def test_float32_inputs_and_bad_dual_clip():
    loss, _ = ppo_clip_loss(*example(torch.float32))
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(20.62 / 7, rel=1e-5)
    with pytest.raises(ValueError, match="dual_clip_c"):
        ppo_clip_loss(*example(), dual_clip_c=1.0)
