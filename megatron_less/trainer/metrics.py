"""A step's logged numbers: reward and length from the whole rollout batch (every rank has it),
per-token figures summed on each data-parallel rank and reduced once, the update's sums."""

from __future__ import annotations

import torch

from megatron_less.algos.rollout_correction import mismatch_stats, summarize_mismatch
from megatron_less.trainer.batch import response_mask
from megatron_less.trainer.phases import gather_parts, sum_parts

# corrections whose ``threshold`` bounds a token or sequence ratio (the mismatch metrics' line)
TOKEN_OR_SEQ_THRESHOLD = ("token_tis", "seq_tis", "token_rs", "seq_rs", "seq_mask_tis")
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


def mismatch_thresholds(algo) -> tuple[float, float]:
    """The token/sequence and geometric-mean thresholds the mismatch metrics count against: the
    configured correction's own, else its defaults (2 and 1.001, verl's)."""
    kw = algo.correction_kwargs
    threshold = kw.get("threshold", 2.0) if algo.correction in TOKEN_OR_SEQ_THRESHOLD else 2.0
    geo = kw.get("threshold", 1.001) if algo.correction == "geo_rs" else kw.get("geo_threshold", 1.001)
    return float(threshold), float(geo)


def local_token_sums(seqs, per_token: dict, stats: dict, report: bool, threshold: float = 2.0) -> dict:
    """This DP rank's sums (only one rank per DP replica reports, so nothing counts twice), and
    its per-sequence mismatch figures under "mismatch" (concatenated across ranks: exact)."""
    if not report:
        return {}
    mask = response_mask(seqs)
    keep = per_token["loss_keep"]
    n = float(mask.sum())
    out = {"tok": n, "kept_tok": float(keep.sum()), "seqs": float(len(seqs)), "kept_seqs": float(keep.any(-1).sum())}
    if "entropy" in per_token:
        out["entropy"] = float(per_token["entropy"][mask].double().sum())
    if "is_weights" in per_token:
        out["is_weight_sum"] = float(per_token["is_weights"][keep].double().sum())
    out["overlong_excluded"] = float(sum(s.finish_reason == "length" and not keep[i].any() for i, s in enumerate(seqs)))
    out["mismatch"] = {k: v.tolist() for k, v in
                       mismatch_stats(per_token["old_logprobs"], per_token["rollout_logprobs"], mask,
                                      token_threshold=threshold).items()}
    shaped = float(stats.get("tokens_shaped", 0.0))
    out["less_tok"] = shaped
    for k in LESS_KEYS:
        if k in stats:
            out["less_" + k] = float(stats[k]) * shaped  # token-weighted, so ranks combine exactly
    return out


def step_metrics(run, sampled: dict, local: dict, upd: dict, times: dict[str, float]) -> dict[str, float]:
    """Collective (one gather). ``sampled`` from phases.collect (every response generated this
    step, and the dynamic-sampling counts), ``local`` from `local_token_sums`, ``upd`` from
    phases.update."""
    every = gather_parts(local)
    mismatch = [p.pop("mismatch") for p in every if "mismatch" in p]
    parts = sum_parts(every)
    seqs = sampled["generated"]
    m = rollout_metrics(seqs)
    tok = max(parts.get("tok", 0.0), 1.0)
    if "entropy" in parts:
        m["rollout/entropy"] = parts["entropy"] / tok
    joined = {k: torch.tensor([v for part in mismatch for v in part[k]], dtype=torch.float64) for k in mismatch[0]}
    threshold, geo = mismatch_thresholds(run.cfg.algo)
    for k, v in summarize_mismatch(joined, threshold=threshold, geo_threshold=geo).items():
        m["mismatch/" + k] = v
    # left out of the loss by the correction's rejection or overlong filtering
    m["loss/excluded_token_frac"] = 1.0 - parts.get("kept_tok", 0.0) / tok
    m["loss/excluded_seq_frac"] = 1.0 - parts.get("kept_seqs", 0.0) / max(parts.get("seqs", 0.0), 1.0)
    if "is_weight_sum" in parts:
        m["correction/weight_mean"] = parts["is_weight_sum"] / max(parts.get("kept_tok", 0.0), 1.0)
    m["overlong/excluded_frac"] = parts.get("overlong_excluded", 0.0) / max(parts.get("seqs", 0.0), 1.0)
    m["overlong/penalty_mean"] = sum(s.penalty for s in seqs) / max(len(seqs), 1)
    for k in ("rounds", "groups_generated", "groups_kept", "groups_trained", "groups_filler"):
        if k in sampled:
            m["dynamic/" + k] = float(sampled[k])
    # placement separate: the batch's weight version and the two sides' timeline (trainer/separate.py)
    for k, v in sampled.get("timeline", {}).items():
        m[("rollout/" if k in ("weight_version", "staleness") else "timeline/") + k] = v
    for k in ("trainer_wait_s", "transfer_s", "rollout_wait_s", "weights_load_s"):
        if k in sampled.get("sync", {}):
            m["timeline/" + k] = sampled["sync"][k]
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
