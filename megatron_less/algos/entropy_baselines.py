"""Entropy-aware baselines that LESS is compared with (spec, last section), as policy losses.

forking_tokens ("80/20"): policy gradient only on the top-`top_ratio` highest-entropy valid tokens
  of the micro-batch; aggregation over the selected tokens only.
clip_cov: PPO-clip, plus: among valid tokens that clipping left alone and whose centred covariance
  Cov_t = (A_t - mean A)(log pi_t - mean log pi) lies in (lb, ub), a random max(1, floor(r * N))
  get zero gradient (N = valid tokens; r = 2e-4, lb = 1, ub = 5).
kl_cov: no ratio clipping; the max(1, floor(r * N)) tokens of largest Cov_t get an extra
  beta * |log pi - log pi_old| penalty (r = 2e-4, beta = 1).
All take the common policy-loss keywords (losses.finish_policy_loss) and end there; means are over
valid tokens of the batch passed in (the micro-batch), as the methods define them.
"""

from __future__ import annotations

import math

import torch

from .losses import check_ppo_clip, finish_policy_loss, masked_mean, ppo_clip_token_losses
from .registry import KwargError, check_number, register_policy_loss


def forking_token_mask(
    entropy: torch.Tensor, response_mask: torch.Tensor, top_ratio: float = 0.2
) -> torch.Tensor:
    """Valid tokens whose entropy is >= the k-th largest valid entropy, k = max(1, ceil(top_ratio * N)).

    Ties at the threshold are all selected, so slightly more than k tokens may be chosen.
    """
    check_number("top_ratio", top_ratio, low=0.0, high=1.0, low_open=True)
    valid = response_mask.bool()
    values = entropy.detach()[valid]
    if values.numel() == 0:
        return valid
    k = max(1, math.ceil(top_ratio * values.numel() - 1e-9))  # 1e-9: 0.2 * 10 must not round up to 3
    threshold = torch.topk(values, k, sorted=True).values[-1]
    return valid & (entropy.detach() >= threshold)


def centred_covariance(
    advantages: torch.Tensor, log_prob: torch.Tensor, response_mask: torch.Tensor
) -> torch.Tensor:
    """Cov_t = (A_t - mean A)(log pi_t - mean log pi), means over valid tokens; detached."""
    a = advantages.detach()
    if a.dim() == 1:
        a = a[:, None]
    a = a.to(log_prob.dtype).expand_as(log_prob)
    lp = log_prob.detach()
    return (a - masked_mean(a, response_mask)) * (lp - masked_mean(lp, response_mask))


_MASK64 = (1 << 64) - 1


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """A CPU generator for one (seed, step, rank): what a step's random choices draw from, so that
    nothing in a step draws from (or advances) the process RNGs, and a resumed run - at any layout
    - draws what it would have drawn without saving any RNG state. ``rank``: the data-parallel
    rank (the ranks of one model replica must choose alike). SplitMix64 over the three numbers."""
    state = 0
    for x in (seed, step, rank):
        state = (state ^ (int(x) & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64
        z = state
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _MASK64
        state = z ^ (z >> 31)
    return torch.Generator().manual_seed(state >> 1)  # manual_seed takes < 2**63 without wrapping


def _budget(ratio: float, n_valid: int) -> int:
    return max(1, math.floor(ratio * n_valid))


def check_forking_tokens(top_ratio, clip_low, clip_high, dual_clip_c) -> None:
    check_number("top_ratio", top_ratio, low=0.0, high=1.0, low_open=True)
    check_ppo_clip(clip_low, clip_high, dual_clip_c)


def check_clip_cov(clip_cov_ratio, clip_cov_lb, clip_cov_ub, generator, clip_low, clip_high, dual_clip_c) -> None:
    check_number("clip_cov_ratio", clip_cov_ratio, low=0.0, high=1.0, low_open=True)
    check_number("clip_cov_lb", clip_cov_lb)
    check_number("clip_cov_ub", clip_cov_ub, low=clip_cov_lb, low_open=True)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise KwargError("generator", f"must be a torch.Generator or null (got {generator!r})")
    check_ppo_clip(clip_low, clip_high, dual_clip_c)


def check_kl_cov(kl_cov_ratio, kl_cov_coef) -> None:
    check_number("kl_cov_ratio", kl_cov_ratio, low=0.0, high=1.0, low_open=True)
    check_number("kl_cov_coef", kl_cov_coef, low=0.0)


@register_policy_loss("forking_tokens", check=check_forking_tokens)
def forking_tokens_loss(
    log_prob, old_log_prob, advantages, response_mask, *, entropy, top_ratio: float = 0.2,
    clip_low=0.2, clip_high=0.28, dual_clip_c=10.0, **common,
):  # fmt: skip
    """PPO-clip restricted to forking tokens. `entropy` ([B, T], the current policy's) picks them;
    every term (KL and entropy bonus included) is aggregated over the selected tokens, so a
    `global_num_tokens` passed here must count selected tokens, not all response tokens."""
    selected = forking_token_mask(entropy, response_mask, top_ratio)
    token_loss, *ratio_terms = ppo_clip_token_losses(
        log_prob, old_log_prob, advantages, clip_low=clip_low, clip_high=clip_high, dual_clip_c=dual_clip_c
    )
    extra = {"forking_frac": masked_mean(selected.to(log_prob.dtype), response_mask).detach()}
    return finish_policy_loss(token_loss, log_prob, selected, ratio_terms, extra, entropy=entropy, **common)


@register_policy_loss("clip_cov", check=check_clip_cov)
def clip_cov_loss(
    log_prob, old_log_prob, advantages, response_mask, *, clip_cov_ratio: float = 2e-4, clip_cov_lb: float = 1.0,
    clip_cov_ub: float = 5.0, generator: torch.Generator | None = None, clip_low=0.2, clip_high=0.28,
    dual_clip_c=10.0, **common,
):  # fmt: skip
    """Clip-Cov. The random choice draws from `generator` (a CPU torch.Generator; the trainer's
    comes from `step_generator(seed, step, dp_rank)`), never from the process RNG: without one it
    raises. "Already clipped" means clipping (ratio or dual) already set that token's gradient to zero."""
    if generator is None:
        raise ValueError("clip_cov draws its random tokens from `generator` (e.g. step_generator(seed, step, rank)), "
                         "never from the process RNG; none was passed")
    token_loss, log_ratio, ratio, clipped, dual = ppo_clip_token_losses(
        log_prob, old_log_prob, advantages, clip_low=clip_low, clip_high=clip_high, dual_clip_c=dual_clip_c
    )
    valid = response_mask.bool()
    cov = centred_covariance(advantages, log_prob, response_mask)
    eligible = valid & ~clipped & ~dual & (cov > clip_cov_lb) & (cov < clip_cov_ub)
    idx = eligible.flatten().nonzero().squeeze(1).cpu()
    budget = _budget(clip_cov_ratio, int(valid.sum()))
    chosen = idx[torch.randperm(idx.numel(), generator=generator)[:budget]]
    keep = torch.ones(log_prob.numel(), dtype=log_prob.dtype)
    keep[chosen] = 0.0
    keep = keep.view_as(log_prob).to(log_prob.device)
    extra = {"cov_clipfrac": masked_mean(1.0 - keep, response_mask).detach()}
    ratio_terms = (log_ratio, ratio, clipped, dual)
    return finish_policy_loss(token_loss * keep, log_prob, response_mask, ratio_terms, extra, **common)


@register_policy_loss("kl_cov", check=check_kl_cov)
def kl_cov_loss(
    log_prob, old_log_prob, advantages, response_mask, *, kl_cov_ratio: float = 2e-4, kl_cov_coef: float = 1.0,
    **common,
):  # fmt: skip
    """KL-Cov: unclipped policy gradient, |log ratio| penalty on the highest-covariance tokens
    (ties broken by position, so the choice is deterministic)."""
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    log_ratio = (log_prob - old_log_prob).clamp(-20.0, 20.0)
    ratio = log_ratio.exp()
    token_loss = -adv.to(log_prob.dtype) * ratio
    valid = response_mask.bool()
    cov = centred_covariance(advantages, log_prob, response_mask).flatten()
    n_valid = int(valid.sum())
    penal = torch.zeros(log_prob.numel(), dtype=torch.bool, device=log_prob.device)
    if n_valid:
        ranked = torch.where(valid.flatten(), cov, torch.full_like(cov, -torch.inf))
        order = torch.sort(ranked, descending=True, stable=True).indices
        penal[order[: _budget(kl_cov_ratio, n_valid)]] = True
    penal = penal.view_as(log_prob)
    token_loss = token_loss + kl_cov_coef * penal.to(log_prob.dtype) * (log_prob - old_log_prob).abs()
    no_clip = torch.zeros_like(valid)
    extra = {"kl_cov_frac": masked_mean(penal.to(log_prob.dtype), response_mask).detach()}
    ratio_terms = (log_ratio, ratio, no_clip, no_clip)
    return finish_policy_loss(token_loss, log_prob, response_mask, ratio_terms, extra, **common)
