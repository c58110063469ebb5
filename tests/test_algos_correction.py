"""Rollout corrections: hand-computed weights/masks, identity, gradients through every policy loss,
mismatch metrics combined across "ranks", registry checks."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_less.algos import apply_correction, get_policy_loss, mismatch_stats, summarize_mismatch
from megatron_less.algos.entropy_baselines import step_generator
from megatron_less.algos.registry import (
    KwargError,
    check_kwargs,
    get_correction,
    list_registered,
    register_correction,
    trainer_keywords,
)

# pi_old / pi_rollout per token (old_log_prob = 0, rollout_log_prob = -log ratio); padding holds
# NaN / inf rollout values that must not leak into anything.
#   row 0: 1.5, 3.0, 0.25, 1.0   product 1.125   geometric mean 1.125^(1/4) = 1.0299
#   row 1: 0.8, 1.25, 0.9        product 0.9     geometric mean 0.9^(1/3)   = 0.9655
#   row 2: 1.1, 1.2              product 1.32    geometric mean sqrt(1.32)  = 1.1489
RATIOS = [[1.5, 3.0, 0.25, 1.0], [0.8, 1.25, 0.9, 1.0], [1.1, 1.2, 1.0, 1.0]]
MASK = [[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]]
ALL = MASK
ROWS01 = [[1, 1, 1, 1], [1, 1, 1, 0], [0, 0, 0, 0]]
TIS2 = [[1.5, 2.0, 0.25, 1.0], [0.8, 1.25, 0.9, 0.0], [1.1, 1.2, 0.0, 0.0]]  # 3.0 capped at 2

CASES = [  # (mode, params, expected weights or None, expected keep)
    ("none", {}, None, ALL),
    ("token_tis", {}, TIS2, ALL),
    ("token_tis", {"threshold": 1.2}, [[1.2, 1.2, 0.25, 1.0], [0.8, 1.2, 0.9, 0], [1.1, 1.2, 0, 0]], ALL),
    ("seq_tis", {}, [[1.125] * 4, [0.9] * 3 + [0], [1.32] * 2 + [0, 0]], ALL),
    ("seq_tis", {"threshold": 1.2}, [[1.125] * 4, [0.9] * 3 + [0], [1.2] * 2 + [0, 0]], ALL),  # 1.32 capped
    # [0.5, 2]: 3.0 and 0.25 out
    ("token_rs", {}, None, [[1, 0, 0, 1], [1, 1, 1, 0], [1, 1, 0, 0]]),
    # [0.85, 1.3]: 1.5, 3.0, 0.25 and 0.8 out
    ("token_rs", {"threshold": 1.3, "lower": 0.85}, None, [[0, 0, 0, 1], [0, 1, 1, 0], [1, 1, 0, 0]]),
    ("seq_rs", {"threshold": 1.2}, None, ROWS01),  # [0.833, 1.2]: 1.32 out
    ("seq_rs", {"threshold": 1.2, "lower": 0.95}, None, [[1, 1, 1, 1], [0] * 4, [0] * 4]),  # 0.9 out too
    ("seq_rs", {}, None, ALL),  # [0.5, 2]: all in
    ("geo_rs", {"threshold": 1.05}, None, ROWS01),  # [0.952, 1.05]: 1.1489 out
    ("geo_rs", {"threshold": 1.05, "lower": 0.97}, None, [[1, 1, 1, 1], [0] * 4, [0] * 4]),  # 0.9655 out
    ("geo_rs", {}, None, [[0] * 4] * 3),  # [0.999, 1.001]: every row out
    ("seq_mask_tis", {"geo_threshold": 1.05}, [[1.5, 2.0, 0.25, 1.0], [0.8, 1.25, 0.9, 0], [0] * 4], ROWS01),
    ("seq_mask_tis", {"threshold": 1.2, "geo_threshold": 1.05},
     [[1.2, 1.2, 0.25, 1.0], [0.8, 1.2, 0.9, 0], [0] * 4], ROWS01),
]
# the cases that keep something, for the gradient tests
GRAD_CASES = [(m, p) for m, p, _, keep in CASES if any(map(any, keep))]


def data(dtype=torch.float64):
    old = torch.zeros(3, 4, dtype=dtype)
    rollout = -torch.tensor(RATIOS, dtype=dtype).log()
    rollout[1, 3], rollout[2, 2], rollout[2, 3] = math.nan, math.inf, -math.inf
    return old, rollout, torch.tensor(MASK, dtype=torch.bool)


@pytest.mark.parametrize("mode,params,weights,keep", CASES)
def test_hand_values(mode, params, weights, keep):
    c = apply_correction(mode, *data(), **params)
    assert c.keep.dtype == torch.bool and c.keep.tolist() == [[bool(x) for x in r] for r in keep]
    if weights is None:
        assert c.weights is None
    else:
        torch.testing.assert_close(c.weights, torch.tensor(weights, dtype=torch.float64), rtol=1e-12, atol=0)
    assert all(v.dim() == 0 and not v.requires_grad for v in c.metrics.values())


def test_metrics_hand_values():
    m = apply_correction("token_tis", *data()).metrics
    assert m["weight_mean"].item() == pytest.approx(10.0 / 9)  # (4.75 + 2.95 + 2.3) / 9
    assert m["truncated_frac"].item() == pytest.approx(1 / 9)
    assert m["rejected_token_frac"].item() == 0.0
    m = apply_correction("token_rs", *data()).metrics
    assert m["rejected_token_frac"].item() == pytest.approx(2 / 9)
    assert m["rejected_seq_frac"].item() == pytest.approx(1 / 3)
    assert m["weight_mean"].item() == 1.0
    m = apply_correction("seq_mask_tis", *data(), geo_threshold=1.05).metrics
    assert m["weight_mean"].item() == pytest.approx(7.7 / 7)  # (4.75 + 2.95) / 7 kept tokens
    assert m["truncated_frac"].item() == pytest.approx(1 / 7)
    assert m["rejected_token_frac"].item() == pytest.approx(2 / 9)
    assert m["rejected_seq_frac"].item() == pytest.approx(1 / 3)


def test_weights_detached_and_float32_for_bf16():
    old, rollout, mask = data(torch.bfloat16)
    c = apply_correction("token_tis", old.requires_grad_(), rollout, mask)
    assert c.weights.dtype == torch.float32 and not c.weights.requires_grad


def _losses(name, log_prob, old, adv, mask, **kw):
    extra = {}
    if name == "forking_tokens":
        extra["entropy"] = torch.linspace(0.1, 1.2, log_prob.numel(), dtype=log_prob.dtype).view_as(log_prob)
    if name == "clip_cov":
        extra.update(generator=step_generator(0, 0, 0), clip_cov_ratio=0.2, clip_cov_lb=-1.0, clip_cov_ub=5.0)
    return get_policy_loss(name)(log_prob, old, adv, mask, **extra, **kw)


def _grad(name, log_prob, *args, **kw):
    lp = log_prob.detach().clone().requires_grad_()
    loss, metrics = _losses(name, lp, *args, **kw)
    loss.backward()
    return loss.detach(), lp.grad, metrics


def _policy_data(old):
    log_prob = old + 0.2 * torch.randn(old.shape, generator=torch.Generator().manual_seed(1), dtype=old.dtype)
    return log_prob, torch.tensor([1.0, -2.0, 0.5], dtype=old.dtype)


@pytest.mark.parametrize("mode,params", GRAD_CASES)
def test_ppo_clip_gradient_is_weighted_and_renormalised(mode, params):
    old, rollout, mask = data()
    log_prob, adv = _policy_data(old)
    c = apply_correction(mode, old, rollout, mask, **params)
    w = c.weights if c.weights is not None else torch.ones_like(old)
    _, g, _ = _grad("ppo_clip", log_prob, old, adv, c.keep & mask, rollout_is_weights=c.weights)
    _, g0, _ = _grad("ppo_clip", log_prob, old, adv, mask)
    n_all, n_kept = mask.sum(), (c.keep & mask).sum()  # token-mean: rejected tokens leave the normaliser
    torch.testing.assert_close(g, w * c.keep * g0 * n_all / n_kept, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("loss", ["ppo_clip", "forking_tokens", "clip_cov", "kl_cov"])
@pytest.mark.parametrize("mode,params", GRAD_CASES)
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_every_policy_loss_passes_the_weights(loss, mode, params, agg):
    old, rollout, mask = data()
    log_prob, adv = _policy_data(old)
    c = apply_correction(mode, old, rollout, mask, **params)
    w = c.weights if c.weights is not None else torch.ones_like(old)
    kept = c.keep & mask
    _, g, _ = _grad(loss, log_prob, old, adv, kept, rollout_is_weights=c.weights, loss_agg_mode=agg)
    _, g0, _ = _grad(loss, log_prob, old, adv, kept, loss_agg_mode=agg)
    torch.testing.assert_close(g, w * g0, rtol=1e-12, atol=1e-15)
    assert g.abs().sum() > 0


@pytest.mark.parametrize("loss", ["ppo_clip", "kl_cov"])
def test_kl_and_entropy_terms_are_not_weighted(loss):
    old, rollout, mask = data()
    log_prob, adv = _policy_data(old)
    ref = old - 0.3
    w = apply_correction("token_tis", old, rollout, mask).weights
    kl = {"ref_log_prob": ref, "kl_coef": 0.1, "kl_type": "k3"}
    l_w, g_w, m_w = _grad(loss, log_prob, old, adv, mask, rollout_is_weights=w, **kl)
    l_wpg, g_wpg, _ = _grad(loss, log_prob, old, adv, mask, rollout_is_weights=w)
    l_kl, g_kl, m_kl = _grad(loss, log_prob, old, adv, mask, **kl)
    l_pg, g_pg, _ = _grad(loss, log_prob, old, adv, mask)
    # KL part = (with KL) - (without), the same with and without weights
    assert (l_w - l_wpg).item() == pytest.approx((l_kl - l_pg).item(), rel=1e-12)
    torch.testing.assert_close(g_w - g_wpg, g_kl - g_pg, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(g_wpg, w * g_pg, rtol=1e-12, atol=1e-15)
    assert m_w["kl_ref"].item() == pytest.approx(m_kl["kl_ref"].item(), rel=1e-12)
    ent = torch.rand(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grads = []
    for weights in (w, None):
        e = ent.clone().requires_grad_()
        loss_value, _ = _losses(loss, log_prob, old, adv, mask, entropy=e, entropy_coef=0.01,
                                rollout_is_weights=weights)
        loss_value.backward()
        grads.append(e.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    assert grads[0].abs().sum() > 0


MODES = ["none", "token_tis", "seq_tis", "token_rs", "seq_rs", "geo_rs", "seq_mask_tis"]


@pytest.mark.parametrize("noise", [0.0, 1e-7])
@pytest.mark.parametrize("mode", MODES)
def test_fp32_identity(mode, noise):
    g = torch.Generator().manual_seed(3)
    old = -5 * torch.rand(3, 5, generator=g)
    rollout = old + noise * torch.randn(3, 5, generator=g).sign()
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    c = apply_correction(mode, old, rollout, mask)
    assert torch.equal(c.keep, mask)
    if c.weights is not None:
        expect = mask.float()
        if noise == 0.0:
            assert torch.equal(c.weights, expect)
        torch.testing.assert_close(c.weights, expect, rtol=0, atol=1e-6)
    log_prob = old + 0.1 * torch.randn(3, 5, generator=g)
    adv = torch.tensor([1.0, -1.0, 2.0])
    l_c, g_c, _ = _grad("ppo_clip", log_prob, old, adv, c.keep & mask, rollout_is_weights=c.weights)
    l_0, g_0, _ = _grad("ppo_clip", log_prob, old, adv, mask)
    assert abs(l_c.item() - l_0.item()) <= 1e-6
    torch.testing.assert_close(g_c, g_0, rtol=0, atol=1e-6)


# --- mismatch metrics --------------------------------------------------------------------------


def _brute(old, rollout, lengths, threshold=2.0, geo_threshold=1.001):
    """Per-token Python loops over the valid tokens."""
    toks, seq_sums, seq_means = [], [], []
    for b, n in enumerate(lengths):
        lrs = [float(old[b, t] - rollout[b, t]) for t in range(n)]
        toks += lrs
        if n:
            seq_sums.append(sum(lrs))
            seq_means.append(sum(lrs) / n)
    ab = sorted(abs(s) for s in seq_sums)
    pos = 0.99 * (len(ab) - 1)
    lo = math.floor(pos)
    p99 = ab[lo] + (pos - lo) * (ab[min(lo + 1, len(ab) - 1)] - ab[lo])
    out_of = lambda x, c: x > math.log(c) or x < -math.log(c)  # noqa: E731
    return {
        "kl_k1": sum(-x for x in toks) / len(toks),
        "kl_k3": sum(math.exp(x) - 1 - x for x in toks) / len(toks),
        "abs_log_ratio_mean": sum(abs(x) for x in toks) / len(toks),
        "abs_log_ratio_max": max(abs(x) for x in toks),
        "seq_log_ratio_mean": sum(ab) / len(ab),
        "seq_log_ratio_p99": p99,
        "ppl_ratio": sum(math.exp(-m) for m in seq_means) / len(seq_means),
        "token_frac_past": sum(out_of(x, threshold) for x in toks) / len(toks),
        "seq_frac_past": sum(out_of(s, threshold) for s in seq_sums) / len(seq_sums),
        "geo_frac_past": sum(out_of(m, geo_threshold) for m in seq_means) / len(seq_means),
        "tokens": float(len(toks)),
        "seqs": float(len(seq_sums)),
    }


@pytest.mark.parametrize("threshold,geo", [(2.0, 1.001), (1.5, 1.2)])
def test_summarize_split_across_ranks_equals_brute_force(threshold, geo):
    g = torch.Generator().manual_seed(4)
    lengths = [6, 0, 3, 1, 5, 6, 2]
    old = -2 + 0.5 * torch.randn(7, 6, generator=g, dtype=torch.float64)
    rollout = old + 0.5 * torch.randn(7, 6, generator=g, dtype=torch.float64)
    mask = torch.arange(6)[None, :] < torch.tensor(lengths)[:, None]
    rollout[~mask] = 1e4  # garbage in padding
    ranks = [mismatch_stats(old[s], rollout[s], mask[s], token_threshold=threshold)
             for s in (slice(0, 3), slice(3, 7))]
    stats = {k: torch.cat([r[k] for r in ranks]) for k in ranks[0]}
    assert all(v.dtype == torch.float64 and v.shape == (7,) for v in stats.values())
    got = summarize_mismatch(stats, threshold=threshold, geo_threshold=geo)
    whole_stats = mismatch_stats(old, rollout, mask, token_threshold=threshold)
    whole = summarize_mismatch(whole_stats, threshold=threshold, geo_threshold=geo)
    want = _brute(old, rollout, lengths, threshold, geo)
    assert got == whole
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert 0 < got["token_frac_past"] < 1  # the data does cross the threshold


def test_summarize_known_values():
    # per-sequence log-ratio sums 0, -1, 2, -3, 4; |.| sorted 0..4: p99 at 0.99 * 4 = 3.96 -> 3 + 0.96 = 3.96
    lr = torch.tensor([[0.5, -0.5], [-1.0, 0.0], [1.0, 1.0], [-3.0, 0.0], [5.0, -1.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 0], [1, 1]], dtype=torch.bool)
    s = summarize_mismatch(mismatch_stats(torch.zeros_like(lr), -lr, mask))
    assert s["seq_log_ratio_p99"] == pytest.approx(3.96, rel=1e-12)
    assert s["abs_log_ratio_max"] == 5.0
    assert s["seq_log_ratio_mean"] == pytest.approx(2.0)  # (0 + 1 + 2 + 3 + 4) / 5
    assert s["kl_k1"] == pytest.approx(-0.25)  # -(0 - 1 + 2 - 3 + 4) / 8 tokens
    assert s["abs_log_ratio_mean"] == pytest.approx(13 / 8)
    assert s["token_frac_past"] == pytest.approx(6 / 8)  # |lr| > log 2: -1, 1, 1, -3, 5, -1
    assert s["seq_frac_past"] == pytest.approx(4 / 5)  # all sums but 0
    assert s["geo_frac_past"] == pytest.approx(4 / 5)  # means 0, -1, 1, -3, 2
    assert s["ppl_ratio"] == pytest.approx((1 + math.e + math.exp(-1) + math.exp(3) + math.exp(-2)) / 5)
    assert (s["tokens"], s["seqs"]) == (8.0, 5.0)


def test_summarize_empty_and_threshold_mismatch():
    for old in (torch.zeros(0, 4), torch.zeros(2, 3)):
        s = summarize_mismatch(mismatch_stats(old, old + 1, torch.zeros(old.shape, dtype=torch.bool)))
        assert all(v == 0.0 and not math.isnan(v) for v in s.values()) and len(s) == 12
    one = torch.ones(1, 2, dtype=torch.bool)
    stats = mismatch_stats(torch.zeros(1, 2), torch.ones(1, 2), one, token_threshold=3.0)
    with pytest.raises(ValueError, match="token_threshold"):
        summarize_mismatch(stats, threshold=2.0)


# --- registry ----------------------------------------------------------------------------------


def test_registry_kind_and_checks():
    assert list_registered("correction") == sorted(MODES)
    with pytest.raises(KwargError) as e:
        check_kwargs("correction", "token_tis", {"threshold": 0.5})
    assert e.value.key == "threshold"
    with pytest.raises(KwargError) as e:
        check_kwargs("correction", "token_tis", {"treshold": 2.0})
    assert e.value.key == "treshold" and "threshold" in e.value.reason
    with pytest.raises(KwargError, match="lower"):
        check_kwargs("correction", "geo_rs", {"lower": 1.5})
    with pytest.raises(KwargError, match="geo_threshold"):
        check_kwargs("correction", "seq_mask_tis", {"geo_threshold": 1.0})
    with pytest.raises(KwargError, match="lower"):
        check_kwargs("correction", "none", {"lower": 0.5})
    check_kwargs("correction", "seq_rs", {"threshold": 3.0, "lower": 0.1})
    with pytest.raises(KwargError, match="threshold"):
        apply_correction("seq_tis", *data(), threshold=1.0)
    with pytest.raises(KeyError, match="token_tis"):
        get_correction("tis")


def test_refused_reregistration_keeps_the_original():
    original = get_correction("token_tis")
    with pytest.raises(ValueError, match="already registered"):
        register_correction("token_tis")(lambda old, rollout, mask: None)
    assert get_correction("token_tis") is original


def test_rollout_is_weights_is_a_trainer_keyword():
    assert "rollout_is_weights" in trainer_keywords("policy_loss")
    with pytest.raises(KwargError, match="set by the trainer"):
        check_kwargs("policy_loss", "ppo_clip", {"rollout_is_weights": None})
