"""LESS: Low-Entropy Segment Shaping of GRPO advantages (the exact rule: docs/less-spec.md).

`less_token_weights` returns the per-token weight w of the spec (shaped advantages are
``w * A[:, None]``) and, on request, each token's class (CLASS_* below) and diagnostics;
`less_shaper` is the registered shaper "less". This is the spec's rule (every carrier counts; a
token takes 0 if any covering cluster is shared, else the largest weight), not the authors'
reference code, which links a segment only to the first other response containing it and lets
later clusters overwrite earlier ones (the spec's notes say how often the two differ).

The work is one compiled (numba) pass over the batch, group by group (kernel.py):
  1. per response (responses.py): tau by radix selection on integer keys of the entropies, the
     default weights and classes, and the segments (maximal runs with H < tau, length >= mu);
  2. keys (keys.py): identical segments of a group merge into one key, whose first copy (its
     host) is the only one searched, since what occurs in a host occurs in every copy; polynomial
     prefix hashes give any window's hash in O(1); the keys are indexed by their head, the hash
     of their first mu tokens, and linked to their longest proper prefix that is also a key;
  3. scan (scan.py): at every position of every host, the longest key occurring there (a bitmap
     test of the window's head, then from the longest key of that head that fits down: a hash
     check, then a token-by-token confirmation). Every other key occurring there is a prefix of
     it, reached through the links;
  4. clusters (clusters.py): carriers as bit sets over the group's responses, kinds and weights;
  5. painting (paint.py): one sweep per host gives each covered token its verdict, written into
     every copy of the host.
Hashes only propose: every match that sets a weight is confirmed by comparing token ids, so a
collision can cost time but never change a weight. Cost: about linear in the batch (repetition
loops cut into many overlapping fragments stay near linear through "chaining", see scan.py); see
benchmarks/RESULTS.md for measured times. The kernels compile on a process's first call and are
cached on disk by numba.
"""

from __future__ import annotations

import numpy as np
import torch

from ..registry import check_number, register_shaper
from .codes import (
    CORRECT_ONLY,
    DEFAULT,
    HIGH,
    INCORRECT_ONLY,
    N_CLASSES,
    N_CLUSTERS,
    N_COUNTS,
    N_GROUPS,
    N_GROUPS_SHAPED,
    N_SEGMENT_TOKENS,
    PAD,
    SHARED,
    Inputs,
    Outputs,
)

# Per-token classes (int8), as returned with return_classes=True and in less_shaper's stats.
CLASS_PAD = PAD  # padding: weight 0
CLASS_HIGH = HIGH  # untouched, weight 1: high-entropy (H > tau), or any token of a group LESS
#                    leaves unchanged (N_c = 0 or N_w = 0)
CLASS_DEFAULT = DEFAULT  # low-entropy (H <= tau) and in no cluster: 1 / N_c or 1 / N_w
CLASS_CORRECT_ONLY = CORRECT_ONLY  # covered by correct-only clusters only: the largest k / N_c
CLASS_INCORRECT_ONLY = INCORRECT_ONLY  # covered by incorrect-only clusters only: the largest m / N_w
CLASS_SHARED = SHARED  # covered by a shared cluster: weight 0 (neutralised)
CLASS_NAMES = ("pad", "high", "default", "correct_only", "incorrect_only", "shared")

# Base of the polynomial hashes (odd, so invertible mod 2**64). Read at every call: a test sets it
# to 1, where every window's hash is the sum of its tokens, to show that collisions change nothing.
HASH_BASE = 0x9E3779B97F4A7C15


def _inputs(token_ids, entropy, response_mask, correct, group_index) -> Inputs:
    """The kernel's flat numpy view of the batch (copies only where dtype or layout require)."""
    if token_ids.dim() != 2 or entropy.shape != token_ids.shape or response_mask.shape != token_ids.shape:
        raise ValueError(
            f"token_ids, entropy and response_mask must share one [B, T] shape; got "
            f"{tuple(token_ids.shape)}, {tuple(entropy.shape)}, {tuple(response_mask.shape)}"
        )
    b, t = token_ids.shape
    if correct.shape != (b,) or group_index.shape != (b,):
        raise ValueError(
            f"correct and group_index must be [B] = [{b}]; got {tuple(correct.shape)}, {tuple(group_index.shape)}"
        )
    tok = token_ids.detach().cpu().contiguous().numpy().astype(np.int64, copy=False)
    ent = entropy.detach().cpu()
    if ent.dtype not in (torch.float32, torch.float64):
        ent = ent.float()  # exact for fp16 / bf16
    ent = ent.contiguous().numpy()
    # The kernel reads the float bits as little-endian 32-bit words (no copy on little-endian hosts).
    words = ent.astype(ent.dtype.newbyteorder("<"), copy=False).view("<u4").astype(np.uint32, copy=False)
    mask = response_mask.detach().cpu().contiguous().numpy().astype(bool, copy=False)
    return Inputs(
        tok.reshape(-1),
        words.reshape(-1),
        ent.itemsize // 4,
        mask.reshape(-1).view(np.uint8),
        correct.detach().cpu().numpy().astype(bool, copy=False),
        group_index.detach().cpu().numpy().astype(np.int64, copy=False),
        t,
        np.empty(b, np.int64),
    )


def check_less(mu: int, quantile: float) -> None:
    """LESS's parameters: mu an integer >= 1 (shortest segment), quantile in [0, 1]."""
    check_number("mu", mu, low=1, integer=True)
    check_number("quantile", quantile, low=0.0, high=1.0)


def less_token_weights(
    token_ids: torch.Tensor,
    entropy: torch.Tensor,
    response_mask: torch.Tensor,
    correct: torch.Tensor,
    group_index: torch.Tensor,
    *,
    mu: int = 5,
    quantile: float = 0.8,
    return_classes: bool = False,
    return_stats: bool = False,
):
    """Per-token LESS weights, float32 [B, T] on CPU (0 on padding), exactly as in the spec.

    token_ids [B, T] int, entropy [B, T] float (finite; of the sampling policy), response_mask
    [B, T] bool, left-aligned; correct [B] bool; group_index [B] int (one id per prompt; groups may
    be interleaved and of any size). The result does not depend on the order of rows.

    Returns ``weights``, or a tuple ``(weights, classes)``, ``(weights, stats)`` or
    ``(weights, classes, stats)`` as asked: classes is an int8 [B, T] tensor of the CLASS_* codes
    of this module, stats a dict of floats for training logs (see `_stats`).
    """
    check_less(mu, quantile)
    inp = _inputs(token_ids, entropy, response_mask, correct, group_index)
    b, t = token_ids.shape
    out = Outputs(
        np.empty(b * t, np.float32),
        np.empty(b * t, np.int8),
        np.zeros(N_CLASSES, np.int64),
        np.zeros(N_CLASSES, np.float64),
        np.zeros(N_COUNTS, np.int64),
    )
    base = HASH_BASE % (1 << 64)
    from .kernel import less_kernel  # numba loads on the first call (see codes.py)

    if not less_kernel(
        inp, out, int(mu), float(quantile), np.uint64(base), np.uint64(pow(base, -1, 1 << 64))
    ):
        raise ValueError("response_mask must be left-aligned (valid tokens first, then padding)")
    result = [torch.from_numpy(out.weights.reshape(b, t))]
    if return_classes:
        result.append(torch.from_numpy(out.classes.reshape(b, t)))
    if return_stats:
        result.append(_stats(out))
    return result[0] if len(result) == 1 else tuple(result)


def _stats(out: Outputs) -> dict[str, float]:
    """Diagnostics (floats). Token fractions and mean weights are over the groups LESS shapes
    (N_c > 0 and N_w > 0); clusters are counted once per distinct (group, token sequence)."""
    n, w, counts = out.class_tokens.tolist(), out.class_weight.tolist(), out.counts.tolist()
    n_tok = float(sum(n[HIGH:]))
    ratio = lambda num, den: num / den if den else 0.0
    return {
        "groups": float(counts[N_GROUPS]),
        "groups_shaped": float(counts[N_GROUPS_SHAPED]),
        "tokens_shaped": n_tok,
        "frac_high_entropy": ratio(n[HIGH], n_tok),
        "frac_low_entropy": ratio(n_tok - n[HIGH], n_tok),
        "frac_in_segment": ratio(counts[N_SEGMENT_TOKENS], n_tok),
        "clusters_correct_only": float(counts[N_CLUSTERS]),
        "clusters_incorrect_only": float(counts[N_CLUSTERS + 1]),
        "clusters_shared": float(counts[N_CLUSTERS + 2]),
        "frac_tokens_correct_only": ratio(n[CORRECT_ONLY], n_tok),
        "frac_tokens_incorrect_only": ratio(n[INCORRECT_ONLY], n_tok),
        "frac_tokens_shared": ratio(n[SHARED], n_tok),
        "mean_weight": ratio(sum(w[HIGH:]), n_tok),
        "mean_weight_default": ratio(w[DEFAULT], n[DEFAULT]),
        "mean_weight_correct_only": ratio(w[CORRECT_ONLY], n[CORRECT_ONLY]),
        "mean_weight_incorrect_only": ratio(w[INCORRECT_ONLY], n[INCORRECT_ONLY]),
    }


@register_shaper("less", check=check_less)
def less_shaper(advantages: torch.Tensor, batch, *, mu: int = 5, quantile: float = 0.8):
    """GRPO + LESS: advantages [B] -> token advantages [B, T] = w * A[:, None], plus LESS stats.

    `batch` needs token_ids, entropy (of the sampling policy), response_mask, correct, group_index.
    The stats are floats, except "token_class": the int8 [B, T] CPU tensor of CLASS_* codes (for
    rollout viewers; pop it before logging the rest).
    """
    w, classes, stats = less_token_weights(
        batch["token_ids"],
        batch["entropy"],
        batch["response_mask"],
        batch["correct"],
        batch["group_index"],
        mu=mu,
        quantile=quantile,
        return_classes=True,
        return_stats=True,
    )
    stats["token_class"] = classes
    return w.to(advantages.device, advantages.dtype) * advantages[:, None], stats
