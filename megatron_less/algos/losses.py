"""Policy losses: PPO-clip (separate low/high clip, dual-clip), loss aggregation, KL and entropy terms.

Every registered policy loss has the signature

    loss_fn(log_prob, old_log_prob, advantages, response_mask, *, loss_agg_mode="token-mean",
            global_num_tokens=None, global_num_seqs=None, max_response_len=None,
            ref_log_prob=None, kl_coef=0.0, kl_type="k3", entropy=None, entropy_coef=0.0,
            rollout_is_weights=None, **loss_specific) -> (loss, metrics)

Each computes its per-token loss and hands it, with those common keywords, to `finish_policy_loss`
(aggregation, KL and entropy terms, metrics): the one place they are assembled.

log_prob / old_log_prob / ref_log_prob / entropy are [B, T]; advantages are [B, T] (shaped) or [B];
response_mask is [B, T]. rollout_is_weights ([B, T] or None) come from a rollout correction
(`rollout_correction`); a correction that rejects tokens does so through the response_mask the caller
passes (its ``keep & mask``). metrics is a dict of detached 0-d float tensors (so the trainer can reduce
them across ranks in one call).

Micro-batching: a loss is a mean over the *global* batch, not over each micro-batch. Pass the
global count (`global_num_tokens` for token-mean, `global_num_seqs` for the seq-mean modes) and the
micro-batch losses then sum to the global-batch loss. Left as None, the micro-batch's own count is
used.
"""

from __future__ import annotations

import torch

from .registry import check_number, register_policy_loss

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def _count(x) -> torch.Tensor | float:
    return x if isinstance(x, torch.Tensor) else float(x)


def aggregate(
    loss_mat: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "token-mean",
    *,
    global_num_tokens=None,
    global_num_seqs=None,
    max_response_len: int | None = None,
) -> torch.Tensor:
    """Reduce a [B, T] per-token loss to a scalar.

    token-mean: sum over valid tokens / number of valid tokens (of the global batch if given).
    seq-mean-token-mean: mean over sequences of each sequence's token mean.
    seq-mean-token-sum: mean over sequences of each sequence's token sum.
    seq-mean-token-sum-norm (Dr. GRPO): mean over sequences of token sum / max_response_len, a
      constant (defaults to T; pass the configured maximum so it does not vary with padding).
    Sequence means count sequences with at least one valid token (or `global_num_seqs`).
    """
    m = mask.to(loss_mat.dtype)
    masked = loss_mat * m
    if mode == "token-mean":
        n = _count(global_num_tokens) if global_num_tokens is not None else m.sum().clamp(min=1)
        return masked.sum() / n
    seq_len = m.sum(-1)
    seq_sum = masked.sum(-1)
    n_seq = _count(global_num_seqs) if global_num_seqs is not None else (seq_len > 0).sum().clamp(min=1)
    if mode == "seq-mean-token-mean":
        return (seq_sum / seq_len.clamp(min=1)).sum() / n_seq
    if mode == "seq-mean-token-sum":
        return seq_sum.sum() / n_seq
    if mode == "seq-mean-token-sum-norm":
        horizon = max_response_len if max_response_len is not None else loss_mat.shape[-1]
        return seq_sum.sum() / horizon / n_seq
    raise ValueError(f"unknown loss_agg_mode {mode!r}; valid: {', '.join(LOSS_AGG_MODES)}")


def normaliser_count(mask: torch.Tensor, mode: str) -> torch.Tensor:
    """What this micro-batch adds to `aggregate`'s global count: its tokens for token-mean, its
    sequences with at least one token for the seq-mean modes. A trainer that passes counts of 1
    (so each term comes back as a sum) divides by the total of these over the optimizer step."""
    m = mask.bool()
    return m.sum() if mode == "token-mean" else (m.sum(-1) > 0).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


def kl_penalty(log_prob: torch.Tensor, ref_log_prob: torch.Tensor, kl_type: str = "k3") -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate from sampled-token log-probs.

    k1: log pi - log pi_ref (unbiased, high variance, can be negative).
    k2: (log pi - log pi_ref)^2 / 2.
    k3 / low_var_kl: r - log r - 1 with r = pi_ref / pi (non-negative, low variance), clamped to
      [-10, 10] as in verl to keep rare huge ratios from dominating.
    """
    diff = log_prob - ref_log_prob
    if kl_type == "k1":
        return diff
    if kl_type == "k2":
        return 0.5 * diff.square()
    if kl_type in ("k3", "low_var_kl"):
        neg = (-diff).clamp(-20.0, 20.0)
        return (neg.exp() - neg - 1.0).clamp(-10.0, 10.0)
    raise ValueError(f"unknown kl_type {kl_type!r}; valid: k1, k2, k3, low_var_kl")


def check_ppo_clip(clip_low: float, clip_high: float, dual_clip_c: float | None) -> None:
    """PPO-clip's parameters: ratio clipped to [1 - clip_low, 1 + clip_high], dual clip c > 1 (or None)."""
    check_number("clip_low", clip_low, low=0.0, high=1.0, high_open=True)
    check_number("clip_high", clip_high, low=0.0)
    check_number("dual_clip_c", dual_clip_c, low=1.0, low_open=True, allow_none=True)


def ppo_clip_token_losses(
    log_prob, old_log_prob, advantages, *, clip_low=0.2, clip_high=0.28, dual_clip_c=10.0
):
    """Per-token PPO-clip loss with decoupled clip range and dual-clip.

    Returns (loss [B, T], log_ratio, ratio, clipped, dual_clipped), the last two bool [B, T]:
    clipped = the ratio clip set the value; dual_clipped = the dual-clip bound -c * A did (A < 0).
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    advantages = advantages.to(log_prob.dtype)
    log_ratio = (log_prob - old_log_prob).clamp(-20.0, 20.0)  # exp overflow guard, as verl
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped_loss = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped_loss)
    clipped = clipped_loss > unclipped
    dual = torch.zeros_like(clipped)
    if dual_clip_c is not None:
        check_number("dual_clip_c", dual_clip_c, low=1.0, low_open=True, allow_none=True)
        bound = -advantages * dual_clip_c
        dual = (advantages < 0) & (loss > bound)
        loss = torch.where(dual, bound.expand_as(loss), loss)
    return loss, log_ratio, ratio, clipped, dual


def finish_policy_loss(
    token_loss: torch.Tensor,
    log_prob: torch.Tensor,
    mask: torch.Tensor,
    ratio_terms,
    extra_metrics: dict[str, torch.Tensor] | None = None,
    *,
    loss_agg_mode: str = "token-mean",
    global_num_tokens=None,
    global_num_seqs=None,
    max_response_len: int | None = None,
    ref_log_prob: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_type: str = "k3",
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    rollout_is_weights: torch.Tensor | None = None,
):
    """What every registered policy loss ends with, given its per-token loss [B, T]:
    loss = agg(w * token_loss) + kl_coef * agg(KL(pi || pi_ref)) - entropy_coef * agg(entropy), each term
    aggregated over `mask` with `loss_agg_mode` (see `aggregate`); returns (loss, metrics).
    w = `rollout_is_weights` (detached; 1 when None) corrects for the rollout engine's sampling
    distribution differing from pi_old; it multiplies only the policy-gradient term (as verl does): the
    KL and entropy terms are regularisers of the current policy, not estimates under pi_old.

    ratio_terms = (log_ratio, ratio, clipped, dual_clipped) feed the PPO metrics (over `mask`);
    metrics also hold pg_loss, loss_count (`normaliser_count` of `mask`), then `extra_metrics`, then kl_ref and entropy when those are given.
    The keywords are the ones every policy loss takes (module docstring)."""

    def agg(x):
        return aggregate(
            x,
            mask,
            loss_agg_mode,
            global_num_tokens=global_num_tokens,
            global_num_seqs=global_num_seqs,
            max_response_len=max_response_len,
        )

    if rollout_is_weights is not None:
        token_loss = token_loss * rollout_is_weights.detach().to(token_loss.dtype)
    pg_loss = agg(token_loss)
    metrics = ppo_metrics(mask, *ratio_terms)
    metrics["pg_loss"] = pg_loss.detach()
    metrics["loss_count"] = normaliser_count(mask, loss_agg_mode)
    metrics.update(extra_metrics or {})
    loss = pg_loss
    if ref_log_prob is not None and kl_coef:
        kl = agg(kl_penalty(log_prob, ref_log_prob, kl_type))
        loss = loss + kl_coef * kl
        metrics["kl_ref"] = kl.detach()
    if entropy is not None:
        ent = agg(entropy)
        metrics["entropy"] = ent.detach()
        if entropy_coef:
            loss = loss - entropy_coef * ent
    return loss, metrics


@register_policy_loss("ppo_clip", check=check_ppo_clip)
def ppo_clip_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip_c: float | None = 10.0,
    **common,
):
    """PPO-clip / GRPO policy loss (clip 0.2 low, 0.28 high, dual-clip c = 10 by default);
    `common`: the keywords of `finish_policy_loss`."""
    token_loss, *ratio_terms = ppo_clip_token_losses(
        log_prob, old_log_prob, advantages, clip_low=clip_low, clip_high=clip_high, dual_clip_c=dual_clip_c
    )
    return finish_policy_loss(token_loss, log_prob, response_mask, ratio_terms, **common)


def ppo_metrics(response_mask, log_ratio, ratio, clipped, dual) -> dict[str, torch.Tensor]:
    """Micro-batch token means: clip fractions and KL(old || new) estimates (k1 and k3)."""
    with torch.no_grad():
        return {
            "clipfrac": masked_mean(clipped.to(ratio.dtype), response_mask),
            "clipfrac_dual": masked_mean(dual.to(ratio.dtype), response_mask),
            "approx_kl": masked_mean(-log_ratio, response_mask),
            "approx_kl_k3": masked_mean(ratio - 1.0 - log_ratio, response_mask),
            "ratio_mean": masked_mean(ratio, response_mask),
            "ratio_max": torch.where(response_mask.bool(), ratio, torch.zeros_like(ratio)).max()
            if ratio.numel()
            else ratio.new_zeros(()),
        }
