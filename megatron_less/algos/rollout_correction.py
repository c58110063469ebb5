"""Rollout/trainer mismatch: importance weights and rejection masks, and mismatch metrics.

The rollout engine (vLLM, bf16 kernels) and the trainer compute slightly different probabilities
for the same sampled tokens, so the samples come from pi_rollout, not pi_old: the PPO ratio
pi / pi_old alone is off-policy. Per token, lr_t = old_log_prob_t - rollout_log_prob_t
(log pi_old / pi_rollout), clamped to [-20, 20] before any exp (verl's safety bound); padding gives 0.

Modes (registry kind "correction"; `apply_correction` by name), each returning a `Correction`:
  none          identity.
  token_tis     w_t = min(exp(lr_t), C): truncated IS, Yao et al. 2025, "Your efficient RL framework
                secretly brings you off-policy RL training".
  seq_tis       w = min(exp(sum_t lr_t), C) on every token of the sequence.
  token_rs      keep token iff exp(lr_t) in [lower, C].
  seq_rs        keep the sequence iff exp(sum_t lr_t) in [lower, C].
  geo_rs        keep the sequence iff exp(mean_t lr_t) (geometric mean of the ratios) in [lower, C].
                Sequence IS and both rejections: Liu, Li et al. 2025, "When speed kills stability".
  seq_mask_tis  geo_rs's sequence mask, then token_tis weights on what is kept (NeMo-RL's
                `seq-mask-tis`; its `icepop` is token_rs's test that also keeps the ratios as weights).
The same menu as verl's `algorithm.rollout_correction`. lower=None means 1 / C. Sequence sums are
clamped to [-20, 20] too; rejection compares log-ratios with log bounds (no exp at all).

How a trainer uses a `Correction`: response_mask <- keep & mask (rejected tokens leave the loss and
its normaliser: count global_num_tokens from it), rollout_is_weights <- weights (losses.py).

`mismatch_stats` gives per-sequence float64 [B] arrays, concatenated across data-parallel ranks by
the trainer, and `summarize_mismatch` the global metrics from them: exact at any layout, since the
token means are sums over sequences and p99 and max need the individual values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .registry import check_number, get_correction, register_correction

SAFETY_BOUND = 20.0


@dataclass
class Correction:
    """weights [B, T] (detached, 0 outside keep & mask; None = all 1) multiply the per-token policy
    gradient loss; keep [B, T] bool: the tokens that stay in the loss and its normaliser; metrics:
    detached 0-d tensors weight_mean (over kept tokens), truncated_frac (kept tokens whose weight hit C),
    rejected_token_frac, rejected_seq_frac (sequences with >= 1 token that lost at least one)."""

    weights: torch.Tensor | None
    keep: torch.Tensor
    metrics: dict[str, torch.Tensor]


def _log_ratio(old_log_prob, rollout_log_prob, mask) -> torch.Tensor:
    old, roll = old_log_prob.detach(), rollout_log_prob.detach()
    dtype = torch.promote_types(torch.promote_types(old.dtype, roll.dtype), torch.float32)
    lr = (old.to(dtype) - roll.to(dtype)).clamp(-SAFETY_BOUND, SAFETY_BOUND)
    return torch.where(mask.bool(), lr, torch.zeros_like(lr))  # where, not *: padding may hold inf/NaN


def _seq_sum(lr) -> torch.Tensor:
    return lr.sum(-1).clamp(-SAFETY_BOUND, SAFETY_BOUND)


def _within(x, threshold, lower) -> torch.Tensor:
    lo = math.log(lower if lower is not None else 1.0 / threshold)
    return (x >= lo) & (x <= math.log(threshold))


def _finish(mask, keep, weights, threshold=None, raw=None) -> Correction:
    mask = mask.bool()
    keep = keep & mask
    with torch.no_grad():
        n_kept = keep.sum().clamp(min=1)
        if weights is None:
            w_mean = keep.any().to(torch.float32)
        else:
            weights = torch.where(keep, weights, torch.zeros_like(weights))
            w_mean = weights.sum() / n_kept
        trunc = (keep & (raw > threshold)).sum() / n_kept if raw is not None else torch.zeros(())
        rejected = mask & ~keep
        has = mask.any(-1)
        metrics = {
            "weight_mean": w_mean.float(),
            "truncated_frac": trunc.float(),
            "rejected_token_frac": (rejected.sum() / mask.sum().clamp(min=1)).float(),
            "rejected_seq_frac": ((rejected.any(-1) & has).sum() / has.sum().clamp(min=1)).float(),
        }
    return Correction(weights, keep, {k: v.to(mask.device) for k, v in metrics.items()})


def check_tis(threshold) -> None:
    check_number("threshold", threshold, low=1.0, low_open=True)


def check_rs(threshold, lower) -> None:
    check_number("threshold", threshold, low=1.0, low_open=True)
    check_number("lower", lower, low=0.0, high=1.0, low_open=True, high_open=True, allow_none=True)


def check_seq_mask_tis(threshold, geo_threshold, geo_lower) -> None:
    check_tis(threshold)
    check_number("geo_threshold", geo_threshold, low=1.0, low_open=True)
    check_number("geo_lower", geo_lower, low=0.0, high=1.0, low_open=True, high_open=True, allow_none=True)


@register_correction("none")
def no_correction(old_log_prob, rollout_log_prob, response_mask) -> Correction:
    """weights None, keep = mask."""
    return _finish(response_mask, response_mask.bool(), None)


@register_correction("token_tis", check=check_tis)
def token_tis(old_log_prob, rollout_log_prob, response_mask, *, threshold: float = 2.0) -> Correction:
    """w_t = min(exp(lr_t), threshold); keep = mask."""
    check_tis(threshold)
    raw = _log_ratio(old_log_prob, rollout_log_prob, response_mask).exp()
    return _finish(response_mask, response_mask.bool(), raw.clamp(max=threshold), threshold, raw)


@register_correction("seq_tis", check=check_tis)
def seq_tis(old_log_prob, rollout_log_prob, response_mask, *, threshold: float = 2.0) -> Correction:
    """w_t = min(exp(sum_s lr_s), threshold) for every token t of the sequence; keep = mask."""
    check_tis(threshold)
    lr = _log_ratio(old_log_prob, rollout_log_prob, response_mask)
    raw = _seq_sum(lr).exp()[:, None].expand_as(lr)
    return _finish(response_mask, response_mask.bool(), raw.clamp(max=threshold), threshold, raw)


@register_correction("token_rs", check=check_rs)
def token_rs(old_log_prob, rollout_log_prob, response_mask, *, threshold: float = 2.0,
             lower: float | None = None) -> Correction:  # fmt: skip
    """keep_t = mask_t and lower <= exp(lr_t) <= threshold (lower None: 1 / threshold); no weights."""
    check_rs(threshold, lower)
    lr = _log_ratio(old_log_prob, rollout_log_prob, response_mask)
    return _finish(response_mask, _within(lr, threshold, lower), None)


@register_correction("seq_rs", check=check_rs)
def seq_rs(old_log_prob, rollout_log_prob, response_mask, *, threshold: float = 2.0,
           lower: float | None = None) -> Correction:  # fmt: skip
    """keep the whole sequence iff lower <= exp(sum_t lr_t) <= threshold; no weights."""
    check_rs(threshold, lower)
    lr = _log_ratio(old_log_prob, rollout_log_prob, response_mask)
    return _finish(response_mask, _within(_seq_sum(lr), threshold, lower)[:, None].expand_as(lr), None)


def _geo_keep(lr, mask, threshold, lower) -> torch.Tensor:
    mean = lr.sum(-1) / mask.bool().sum(-1).clamp(min=1)
    return _within(mean, threshold, lower)[:, None].expand_as(lr)


@register_correction("geo_rs", check=check_rs)
def geo_rs(old_log_prob, rollout_log_prob, response_mask, *, threshold: float = 1.001,
           lower: float | None = None) -> Correction:  # fmt: skip
    """keep the sequence iff lower <= exp(mean_t lr_t) <= threshold (mean over its valid tokens):
    a length-independent test, where seq_rs's product of ratios drifts with length."""
    check_rs(threshold, lower)
    lr = _log_ratio(old_log_prob, rollout_log_prob, response_mask)
    return _finish(response_mask, _geo_keep(lr, response_mask, threshold, lower), None)


@register_correction("seq_mask_tis", check=check_seq_mask_tis)
def seq_mask_tis(old_log_prob, rollout_log_prob, response_mask, *, threshold: float = 2.0,
                 geo_threshold: float = 1.001, geo_lower: float | None = None) -> Correction:  # fmt: skip
    """keep = geo_rs(geo_threshold, geo_lower)'s mask; w_t = min(exp(lr_t), threshold) on kept tokens."""
    check_seq_mask_tis(threshold, geo_threshold, geo_lower)
    lr = _log_ratio(old_log_prob, rollout_log_prob, response_mask)
    raw = lr.exp()
    keep = _geo_keep(lr, response_mask, geo_threshold, geo_lower)
    return _finish(response_mask, keep, raw.clamp(max=threshold), threshold, raw)


def apply_correction(name: str, old_log_prob, rollout_log_prob, response_mask, **kwargs) -> Correction:
    """The registered correction ``name`` (``none``, ``token_tis``, ...) with its keyword parameters."""
    return get_correction(name)(old_log_prob, rollout_log_prob, response_mask, **kwargs)


def mismatch_stats(old_log_prob, rollout_log_prob, response_mask, *, token_threshold: float = 2.0):
    """Per-sequence float64 [B] arrays: tokens, log_ratio_sum, abs_log_ratio_sum, abs_log_ratio_max,
    k3_sum (sum of r - 1 - lr, r = exp(lr)), tokens_past (tokens with exp(lr) outside
    [1/token_threshold, token_threshold]) and token_threshold (repeated, so `summarize_mismatch` can
    refuse a different one)."""
    check_tis(token_threshold)
    mask = response_mask.bool()
    lr = _log_ratio(old_log_prob, rollout_log_prob, mask).to(torch.float64)
    a = lr.abs()
    return {
        "tokens": mask.sum(-1).to(torch.float64),
        "log_ratio_sum": lr.sum(-1),
        "abs_log_ratio_sum": a.sum(-1),
        "abs_log_ratio_max": a.amax(-1) if a.shape[-1] else a.sum(-1),
        "k3_sum": (lr.exp() - 1.0 - lr).sum(-1),  # 0 on padding: exp(0) - 1 - 0
        "tokens_past": (mask & (a > math.log(token_threshold))).sum(-1).to(torch.float64),
        "token_threshold": torch.full_like(a.sum(-1), float(token_threshold)),
    }


def summarize_mismatch(stats, *, threshold: float = 2.0, geo_threshold: float = 1.001) -> dict[str, float]:
    """Global mismatch metrics from `mismatch_stats` (of all ranks, concatenated):
    kl_k1: token mean of rollout - old (estimates KL(pi_rollout || pi_old)); kl_k3: token mean of
    r - 1 - log r, r = exp(old - rollout); abs_log_ratio_mean / _max: of |lr| over tokens;
    seq_log_ratio_mean / _p99: mean and 99th percentile (linear interpolation) of |sum_t lr_t| over
    sequences; ppl_ratio: sequence mean of exp(mean_t(rollout - old)) = trainer ppl / rollout ppl;
    token_frac_past / seq_frac_past / geo_frac_past: fractions of tokens / sequences whose token ratio /
    exp(sum lr) / exp(mean lr) lies outside [1/threshold, threshold] (geo: geo_threshold); tokens, seqs.
    Sequences without tokens are left out; no tokens at all gives zeros."""
    keys = ("kl_k1", "kl_k3", "abs_log_ratio_mean", "abs_log_ratio_max", "seq_log_ratio_mean",
            "seq_log_ratio_p99", "ppl_ratio", "token_frac_past", "seq_frac_past", "geo_frac_past", "tokens",
            "seqs")
    check_tis(threshold)
    check_number("geo_threshold", geo_threshold, low=1.0, low_open=True)
    s = {k: v.detach().to(torch.float64).cpu() for k, v in stats.items()}
    has = s["tokens"] > 0
    if not bool(has.any()):
        return dict.fromkeys(keys, 0.0)
    if not torch.all(s["token_threshold"][has] == float(threshold)):
        got = s["token_threshold"][has].unique().tolist()
        raise ValueError(f"stats counted tokens past token_threshold {got}, not threshold {threshold}")
    s = {k: v[has] for k, v in s.items()}
    n_tok = s["tokens"].sum()
    seq_abs = s["log_ratio_sum"].abs()
    geo = s["log_ratio_sum"] / s["tokens"]
    out = {
        "kl_k1": -s["log_ratio_sum"].sum() / n_tok,
        "kl_k3": s["k3_sum"].sum() / n_tok,
        "abs_log_ratio_mean": s["abs_log_ratio_sum"].sum() / n_tok,
        "abs_log_ratio_max": s["abs_log_ratio_max"].max(),
        "seq_log_ratio_mean": seq_abs.mean(),
        "seq_log_ratio_p99": torch.quantile(seq_abs, 0.99, interpolation="linear"),
        "ppl_ratio": (-geo).exp().mean(),
        "token_frac_past": s["tokens_past"].sum() / n_tok,
        "seq_frac_past": (seq_abs > math.log(threshold)).to(torch.float64).mean(),
        "geo_frac_past": (geo.abs() > math.log(geo_threshold)).to(torch.float64).mean(),
        "tokens": n_tok,
        "seqs": torch.tensor(float(has.sum())),
    }
    return {k: float(out[k]) for k in keys}
