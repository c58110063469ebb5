"""Forking tokens, Clip-Cov and KL-Cov: selections by hand, determinism, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_less import algos
from megatron_less.algos.entropy_baselines import (
    centred_covariance,
    clip_cov_loss,
    forking_token_mask,
    kl_cov_loss,
)


def test_forking_mask_top_fraction_ties_and_padding():
    ent = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.2], [0.5, 0.4, 0.7, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    # 8 valid tokens: k = ceil(1.6) = 2 -> 0.9 and 0.8; padding (9.0) never counts.
    assert forking_token_mask(ent, mask, 0.2).nonzero().tolist() == [[0, 1], [0, 3]]
    # 10 tokens at 0.2: exactly 2, no float round-up to 3.
    flat = torch.arange(10.0)[None]
    assert forking_token_mask(flat, torch.ones(1, 10, dtype=torch.bool), 0.2).sum() == 2
    # Ties at the threshold are all kept.
    tied = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0]])
    assert forking_token_mask(tied, torch.ones(1, 5, dtype=torch.bool), 0.2).sum() == 3
    assert not forking_token_mask(ent, torch.zeros_like(mask), 0.2).any()


def test_forking_loss_is_ppo_on_selected_tokens():
    """By hand. 5 valid tokens at top_ratio 0.4: k = 2, the entropies 0.9 and 0.8 are selected.
    (0, 1): ratio 1.5, A = +1 -> clipped at 1.28: loss -1.28, no gradient.
    (1, 0): ratio 1,   A = -2 -> loss +2, d/dlp = -A * ratio / 2 = 1.
    The other tokens (ratios 3 and e^-2, padding with a huge entropy) must not count.
    Token mean over the 2 selected tokens: (-1.28 + 2) / 2 = 0.36."""
    ent = torch.tensor([[0.1, 0.9, 0.3], [0.8, 0.2, 50.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    old = torch.zeros(2, 3, dtype=torch.float64)
    lp = torch.tensor([[math.log(3.0), math.log(1.5), -2.0], [0.0, math.log(3.0), 5.0]], dtype=torch.float64)
    lp.requires_grad_()
    loss, m = algos.get_policy_loss("forking_tokens")(lp, old, adv, mask, entropy=ent, top_ratio=0.4)
    assert loss.item() == pytest.approx(0.36, rel=1e-12)
    assert m["forking_frac"].item() == pytest.approx(2 / 5)
    assert int(m["loss_count"]) == 2
    loss.backward()
    expected = torch.zeros(2, 3, dtype=torch.float64)
    expected[1, 0] = 1.0
    torch.testing.assert_close(lp.grad, expected, rtol=0, atol=1e-12)

    # default top_ratio 0.2 on 5 tokens: k = 1, only (0, 1) (clipped): loss -1.28, no gradient
    lp.grad = None
    loss, _ = algos.get_policy_loss("forking_tokens")(lp, old, adv, mask, entropy=ent)
    assert loss.item() == pytest.approx(-1.28, rel=1e-12)
    loss.backward()
    assert not lp.grad.any()


def cov_example():
    # Two rows of 4 valid tokens, advantages per token, chosen so Cov_t is easy to read.
    adv = torch.tensor([[2.0, 2.0, -2.0, -2.0], [2.0, 2.0, -2.0, -2.0]], dtype=torch.float64)
    lp = torch.tensor([[1.0, -1.0, -1.0, 1.0], [2.0, 0.5, -2.0, 0.0]], dtype=torch.float64)
    mask = torch.ones(2, 4, dtype=torch.bool)
    return adv, lp, mask


def test_centred_covariance_by_hand():
    adv, lp, mask = cov_example()
    # mean A = 0, mean log pi = 0.0625
    expect = adv * (lp - 0.0625)
    torch.testing.assert_close(centred_covariance(adv, lp, mask), expect)


def test_clip_cov_zeroes_a_random_eligible_token_deterministically():
    adv, lp, mask = cov_example()
    old = lp.clone()  # ratio 1: nothing clipped
    # Cov: row0 = [1.875, -2.125, 2.125, -1.875], row1 = [3.875, 0.875, 4.125, 0.125]
    # eligible (1 < cov < 5): (0,0), (0,2), (1,0), (1,2); budget = max(1, floor(0.3 * 8)) = 2
    eligible = {(0, 0), (0, 2), (1, 0), (1, 2)}
    picks = set()
    for seed in range(12):
        x = lp.clone().requires_grad_()
        loss, m = clip_cov_loss(
            x, old, adv, mask, clip_cov_ratio=0.3, generator=torch.Generator().manual_seed(seed)
        )
        loss.backward()
        zero = {tuple(i) for i in (x.grad == 0).nonzero().tolist()}
        assert len(zero) == 2 and zero <= eligible
        assert m["cov_clipfrac"].item() == 0.25
        # The rest keeps the plain policy-gradient: -A / N.
        for i, j in set(eligible | {(0, 1), (0, 3), (1, 1), (1, 3)}) - zero:
            assert x.grad[i, j].item() == pytest.approx(-adv[i, j].item() / 8)
        again = lp.clone().requires_grad_()
        clip_cov_loss(
            again, old, adv, mask, clip_cov_ratio=0.3, generator=torch.Generator().manual_seed(seed)
        )[0].backward()
        assert torch.equal(again.grad, x.grad)  # same seed, same choice
        picks.add(frozenset(zero))
    assert len(picks) > 1  # and the choice does depend on the seed


def test_clip_cov_skips_already_clipped_tokens():
    adv, lp, mask = cov_example()
    old = lp.clone()
    old[0, 0] = lp[0, 0] - 1.0  # ratio e > 1.28 with A > 0: clipped, so not eligible
    for seed in range(8):
        x = lp.clone().requires_grad_()
        loss, _ = clip_cov_loss(
            x, old, adv, mask, clip_cov_ratio=0.3, generator=torch.Generator().manual_seed(seed)
        )
        loss.backward()
        zero = {tuple(i) for i in (x.grad == 0).nonzero().tolist()}
        assert (0, 0) in zero  # zero gradient from the clip itself
        assert len(zero - {(0, 0)}) == 2 and zero - {(0, 0)} <= {(0, 2), (1, 0), (1, 2)}


def test_clip_cov_budget_is_at_least_one_and_gradcheck():
    adv, lp, mask = cov_example()
    x = lp.clone().requires_grad_()
    _, m = clip_cov_loss(x, lp + 0.01, adv, mask, generator=torch.Generator().manual_seed(0))
    assert m["cov_clipfrac"].item() == 1 / 8  # floor(2e-4 * 8) = 0 -> 1
    assert torch.autograd.gradcheck(
        lambda y: clip_cov_loss(y, lp + 0.01, adv, mask, generator=torch.Generator().manual_seed(0))[0], (x,)
    )


def test_kl_cov_penalises_top_covariance_tokens():
    adv, lp, mask = cov_example()
    old = lp - 0.1  # log ratio 0.1 everywhere
    x = lp.clone().requires_grad_()
    loss, m = kl_cov_loss(x, old, adv, mask, kl_cov_ratio=0.25)  # budget floor(2) = 2: (1, 2) and (1, 0)
    r = torch.exp(torch.tensor(0.1, dtype=torch.float64))
    expect = (-(adv * r).sum() + 2 * 0.1) / 8
    assert loss.item() == pytest.approx(expect.item(), rel=1e-12)
    assert m["kl_cov_frac"].item() == 0.25 and m["clipfrac"].item() == 0.0
    loss.backward()
    grad = -adv * r / 8
    grad[1, 2] += 1 / 8
    grad[1, 0] += 1 / 8
    torch.testing.assert_close(x.grad, grad)
    assert torch.autograd.gradcheck(lambda y: kl_cov_loss(y, old, adv, mask, kl_cov_ratio=0.25)[0], (x,))


def test_kl_cov_ignores_padding_and_breaks_ties_by_position():
    # Means over valid tokens are 0, so Cov_t = A_t * log pi_t = 1 for all four valid tokens;
    # the padding token would rank first (50) if it were not excluded.
    adv = torch.tensor([[1.0, -1.0, 1.0], [-1.0, -1.0, -1.0]], dtype=torch.float64)
    lp = torch.tensor([[1.0, -1.0, 1.0], [-1.0, -50.0, -50.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    x = lp.clone().requires_grad_()
    loss, m = kl_cov_loss(x, lp - 0.5, adv, mask, kl_cov_ratio=0.25)  # budget 1 of 4 tied tokens
    assert m["kl_cov_frac"].item() == pytest.approx(1 / 4)
    loss.backward()
    plain = -adv * torch.exp(torch.tensor(0.5, dtype=torch.float64)) / 4 * mask
    extra = x.grad - plain
    assert extra[0, 0].item() == pytest.approx(1 / 4)  # the first of the tie
    assert extra.abs().sum().item() == pytest.approx(1 / 4)


def test_every_loss_reports_the_count_it_normalises_by():
    """Trainers that pass counts of 1 divide by loss_count: for forking tokens that is the
    selected tokens, for PPO-clip every response token, for seq-mean modes the sequences."""
    from megatron_less.algos import get_policy_loss
    from megatron_less.algos.entropy_baselines import forking_token_mask

    g = torch.Generator().manual_seed(3)
    lp, old, adv = (torch.randn(4, 10, generator=g) for _ in range(3))
    ent = torch.rand(4, 10, generator=g)
    mask = torch.ones(4, 10, dtype=torch.bool)
    mask[1, 6:] = False
    mask[3] = False
    _, m = get_policy_loss("ppo_clip")(lp, old, adv, mask)
    assert int(m["loss_count"]) == int(mask.sum())
    _, m = get_policy_loss("ppo_clip")(lp, old, adv, mask, loss_agg_mode="seq-mean-token-mean")
    assert int(m["loss_count"]) == 3
    _, m = get_policy_loss("forking_tokens")(lp, old, adv, mask, entropy=ent)
    assert int(m["loss_count"]) == int(forking_token_mask(ent, mask, 0.2).sum()) < int(mask.sum())


# --- Clip-Cov's randomness: a generator per (seed, step, rank), never the process RNG ----------


def _clip_cov_zeroed(generator):
    """Tokens Clip-Cov zeroes on a 16 x 32 batch where every valid token is eligible."""
    g = torch.Generator().manual_seed(21)
    lp = -torch.rand(16, 32, generator=g, dtype=torch.float64) * 4
    adv = torch.randn(16, 32, generator=g, dtype=torch.float64)
    mask = torch.ones(16, 32, dtype=torch.bool)
    x = lp.clone().requires_grad_()
    loss, _ = clip_cov_loss(x, lp.clone(), adv, mask, clip_cov_ratio=0.05, clip_cov_lb=-1e9, clip_cov_ub=1e9,
                            generator=generator)  # fmt: skip
    loss.backward()
    return frozenset(map(tuple, (x.grad == 0).nonzero().tolist()))


def test_clip_cov_choice_comes_from_seed_step_rank_not_the_process_rng():
    from megatron_less.algos.entropy_baselines import step_generator

    torch.manual_seed(1234)
    before = torch.get_rng_state()
    picked = {key: _clip_cov_zeroed(step_generator(*key)) for key in [(7, 3, 0), (7, 4, 0), (7, 3, 1), (8, 3, 0)]}
    assert torch.equal(torch.get_rng_state(), before), "Clip-Cov drew from the process RNG"
    assert all(len(p) == 25 for p in picked.values())  # floor(0.05 * 512)
    # the same (seed, step, rank) picks the same tokens, whatever the process RNG holds
    torch.manual_seed(99)
    assert _clip_cov_zeroed(step_generator(7, 3, 0)) == picked[(7, 3, 0)]
    # another step, rank or seed: another choice
    assert len(set(picked.values())) == 4


def test_clip_cov_refuses_to_draw_without_a_generator():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with pytest.raises(ValueError, match="generator"):
        _clip_cov_zeroed(None)
    assert torch.equal(torch.get_rng_state(), before)
