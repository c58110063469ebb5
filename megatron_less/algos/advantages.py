"""Group-relative advantage estimators: rewards [B] + group_index [B] -> advantages [B].

Responses of one prompt share a group index; groups may be interleaved and of unequal size.
Statistics are computed in float64 and the result is returned in the rewards' float dtype
(float32 for integer/bool rewards). A group whose rewards are all equal (a singleton included)
gets exactly zero: no signal, and no 0/0 or rounding residue from (r - mean).
"""

from __future__ import annotations

import torch

from .registry import check_number, get_advantage, get_shaper, register_advantage, register_shaper


def _group_stats(rewards: torch.Tensor, group_index: torch.Tensor):
    if rewards.dim() != 1 or group_index.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_index must both be [B]; got {tuple(rewards.shape)}, {tuple(group_index.shape)}"
        )
    r = rewards.detach().to(torch.float64)
    _, gid = torch.unique(group_index, return_inverse=True)
    n_groups = int(gid.max()) + 1 if gid.numel() else 0
    count = torch.zeros(n_groups, dtype=torch.float64, device=r.device).index_add_(0, gid, torch.ones_like(r))
    total = torch.zeros_like(count).index_add_(0, gid, r)
    mean = total / count
    centred = r - mean[gid]
    hi = torch.full_like(count, -torch.inf).scatter_reduce_(0, gid, r, "amax")
    lo = torch.full_like(count, torch.inf).scatter_reduce_(0, gid, r, "amin")
    flat = (hi == lo)[gid]
    return gid, count, centred, flat


def _out_dtype(rewards: torch.Tensor) -> torch.dtype:
    return rewards.dtype if rewards.is_floating_point() else torch.float32


def check_grpo(eps: float) -> None:
    check_number("eps", eps, low=0.0)


@register_advantage("grpo", check=check_grpo, min_group_size=2)
def grpo_advantages(rewards: torch.Tensor, group_index: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """(r - mean) / (std + eps), std unbiased (as verl's GRPO)."""
    gid, count, centred, flat = _group_stats(rewards, group_index)
    sq = torch.zeros_like(count).index_add_(0, gid, centred * centred)
    std = (sq / (count - 1).clamp(min=1)).sqrt()
    adv = centred / (std[gid] + eps)
    return torch.where(flat, torch.zeros_like(adv), adv).to(_out_dtype(rewards))


@register_advantage("drgrpo", min_group_size=2)
def drgrpo_advantages(rewards: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    """r - mean (Dr. GRPO: no std normalisation, which biases towards easy/hard prompts)."""
    _, _, centred, flat = _group_stats(rewards, group_index)
    return torch.where(flat, torch.zeros_like(centred), centred).to(_out_dtype(rewards))


@register_advantage("rloo", min_group_size=2)
def rloo_advantages(rewards: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    """r_i - mean_{j != i} r_j = n / (n - 1) * (r_i - mean)."""
    gid, count, centred, flat = _group_stats(rewards, group_index)
    n = count[gid]
    adv = centred * n / (n - 1).clamp(min=1)
    return torch.where(flat, torch.zeros_like(adv), adv).to(_out_dtype(rewards))


@register_advantage("dr_grpo", min_group_size=2)
def _drgrpo_alias(rewards: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    return drgrpo_advantages(rewards, group_index)


def group_has_signal(values: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    """[G] bool, G = group_index.max() + 1: True where a group's values are not all equal (DAPO's
    dynamic sampling keeps those groups). Exact comparison, not std > eps: rewards of a group that all
    equal 1.0 carry no signal however they are stored. Groups absent from group_index: False."""
    if values.dim() != 1 or group_index.shape != values.shape:
        raise ValueError(
            f"values and group_index must both be [B]; got {tuple(values.shape)}, {tuple(group_index.shape)}"
        )
    idx = group_index.long()
    if idx.numel() and int(idx.min()) < 0:
        raise ValueError(f"group_index must be >= 0 (got {int(idx.min())})")
    n = int(idx.max()) + 1 if idx.numel() else 0
    v = values.detach()
    v = v.to(torch.int8) if v.dtype == torch.bool else v  # scatter_reduce takes no bool
    hi = v.new_zeros(n).scatter_reduce(0, idx, v, "amax", include_self=False)
    lo = v.new_zeros(n).scatter_reduce(0, idx, v, "amin", include_self=False)
    return hi != lo  # an absent group keeps 0 == 0


@register_shaper("none")
def broadcast_advantages(advantages: torch.Tensor, batch, **_unused) -> tuple[torch.Tensor, dict]:
    """No shaping: every valid token of a response gets the response's advantage."""
    mask = batch["response_mask"].to(advantages.device)
    return advantages[:, None] * mask.to(advantages.dtype), {}


def compute_token_advantages(
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    batch,
    *,
    estimator: str = "grpo",
    shaper: str = "none",
    estimator_kwargs: dict | None = None,
    shaper_kwargs: dict | None = None,
) -> tuple[torch.Tensor, dict]:
    """Estimator then shaper, both by registry name: e.g. estimator="grpo", shaper="less".

    Returns (token advantages [B, T], the shaper's stats).
    """
    adv = get_advantage(estimator)(rewards, group_index, **(estimator_kwargs or {}))
    return get_shaper(shaper)(adv, batch, **(shaper_kwargs or {}))
