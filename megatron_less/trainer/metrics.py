"""A step's logged numbers: reward and length from the whole rollout batch (every rank has it),
per-token figures summed on each data-parallel rank and reduced once, the update's sums."""

from __future__ import annotations

import torch

from megatron_less.trainer.batch import response_mask
from megatron_less.trainer.phases import gather_parts, sum_parts

LESS_KEYS = ("frac_tokens_correct_only", "frac_tokens_incorrect_only", "frac_tokens_shared", "frac_high_entropy",
             "frac_low_entropy", "mean_weight", "mean_weight_correct_only", "mean_weight_incorrect_only",
             "mean_weight_default")  # fmt: skip


def rollout_metrics(seqs) -> dict[str, float]:
    n = len(seqs)
    lengths = torch.tensor([len(s.response) for s in seqs], dtype=torch.float64)
    reasons = [s.scored for s in seqs]
    return {
        "reward/mean": sum(s.reward for s in seqs) / n,
        "reward/accuracy": sum(s.correct for s in seqs) / n,
        "reward/no_answer_frac": reasons.count("no_box") / n,
        "reward/timeouts": float(reasons.count("timeout")),
        "reward/errors": float(reasons.count("error")),
        "response/length_mean": float(lengths.mean()),
        "response/length_max": float(lengths.max()),
        "response/clip_frac": sum(s.finish_reason == "length" for s in seqs) / n,
    }


def local_token_sums(seqs, per_token: dict, stats: dict, report: bool) -> dict[str, float]:
    """This DP rank's sums (only one rank per DP replica reports, so nothing counts twice)."""
    if not report:
        return {}
    mask = response_mask(seqs)
    rollout_lp = torch.zeros(mask.shape, dtype=torch.float64)
    for i, s in enumerate(seqs):
        rollout_lp[i, : len(s.response)] = torch.tensor(s.rollout_logprobs, dtype=torch.float64)
    gap = (rollout_lp - per_token["old_logprobs"].double()).abs()
    n = float(mask.sum())
    out = {
        "tok": n,
        "entropy": float(per_token["entropy"][mask].double().sum()),
        "gap_sum": float(gap[mask].sum()),
        "gap_big": float((gap[mask] > 0.1).sum()),
        "gap_max": float(gap[mask].max()) if n else 0.0,
    }
    shaped = float(stats.get("tokens_shaped", 0.0))
    out["less_tok"] = shaped
    for k in LESS_KEYS:
        if k in stats:
            out["less_" + k] = float(stats[k]) * shaped  # token-weighted, so ranks combine exactly
    return out


def step_metrics(run, seqs, local: dict, upd: dict, times: dict[str, float]) -> dict[str, float]:
    """Collective (one gather). ``local`` from `local_token_sums`, ``upd`` from phases.update."""
    every = gather_parts(local)
    parts = sum_parts(every)
    m = rollout_metrics(seqs)
    tok = max(parts.get("tok", 0.0), 1.0)
    m.update({
        "rollout/entropy": parts.get("entropy", 0.0) / tok,
        "rollout/logprob_gap_mean": parts.get("gap_sum", 0.0) / tok,
        "rollout/logprob_gap_frac_over_0.1": parts.get("gap_big", 0.0) / tok,
    })  # fmt: skip
    m["rollout/logprob_gap_max"] = max((p["gap_max"] for p in every if p), default=0.0)
    less_tok = parts.get("less_tok", 0.0)
    for k in LESS_KEYS:
        if "less_" + k in parts:
            m["less/" + k] = parts["less_" + k] / less_tok if less_tok else 0.0
    steps = max(upd.get("_opt_steps", 1.0), 1.0)
    utok = max(upd.get("_tokens", 0.0), 1.0)
    m["loss/total"] = upd.get("_loss", 0.0) / steps
    m["actor/grad_norm"] = upd.get("_grad_norm", 0.0) / steps
    count = max(upd.get("_loss_count", 0.0), 1.0)
    for k, v in upd.items():
        if k.startswith("agg_"):
            m["actor/" + k[4:]] = v / count
        elif not k.startswith("_"):
            m["actor/" + k] = v / utok
    m["batch/padding_frac"] = 1.0 - upd.get("_real", 0.0) / max(upd.get("_padded", 1.0), 1.0)
    m["optim/lr"] = run.policy.optimizer.param_groups[0]["lr"]
    m["train/skipped_steps"] = float(run.counters["skipped_steps"])
    m["train/step_skipped_updates"] = steps - upd.get("_stepped", steps)
    m["train/epoch"] = float(run.sampler.epoch)
    for name, sec in times.items():
        m[f"time/{name}_s"] = sec
    m["time/step_s"] = sum(times.values())
    m["perf/tokens_per_s"] = sum(s.length for s in seqs) / max(m["time/step_s"], 1e-9)
    return m
