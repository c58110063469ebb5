"""LESS: Low-Entropy Segment Shaping of GRPO advantages (the exact rule: less-spec.md).

`less_token_weights` returns the per-token weight w of the spec; shaped advantages are
``w * A[:, None]``. Two implementations compute the same weights and stats:
  * numba kernels (_less_numba.py), used whenever numba is importable: one compiled pass over the
    batch, group by group; compiled on the first call of a process and cached on disk by numba;
  * numpy (this module and span_match.py), the fallback: the whole batch at once, no Python loop
    over groups or responses.
`BACKEND` (env MLESS_LESS_BACKEND: auto, numba or numpy) picks one; the tests run both against the
brute-force oracle. This is the spec's rule (every carrier counts; a token takes 0 if any covering
cluster is shared, else the largest weight), not the authors' reference code, which links a
segment only to the first other response containing it and lets later clusters overwrite
earlier ones (see the spec's notes for how often the two differ).

How the numpy implementation finds carriers without comparing every key with every window:
  * every segment is a key; identical segments of a group are merged first (sorted by a
    full-length hash, then compared token by token), so each distinct sequence is searched for
    once, and only inside one copy of each distinct segment (its "host"): what is found there
    holds in every copy;
  * K can only occur where the window's first `mu` tokens equal K's, so one hash of every
    mu-token window of the batch, looked up in a bitmap of key prefixes, gives a short list of
    candidate positions; a full-length hash then drops most wrong (key, position) pairs in O(1);
  * every remaining pair is confirmed exactly (token ids packed several to a word; runs of
    overlapping occurrences in periodic text are chained), so a hash collision can cost time but
    never change a weight.
Hashes are polynomial mod 2**64 over per-row prefix sums (uint64 wrap-around), so the hash of any
window is O(1) from two prefix values; the group id is folded into the token values so that
windows of different prompts rarely meet, and group equality is re-checked exactly anyway.

Cost: about linear in the batch plus the number of (key, occurrence) pairs. Text that repeats
itself (repetition loops cut into many fragments) makes that number grow quadratically; see
benchmarks/RESULTS.md for measured times.

The matching machinery (hashes, exact span comparison, scratch memory) is in span_match.py;
scratch arrays are kept between calls and `release_workspace()` frees them.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

from . import span_match as sm
from .registry import register_shaper
from .span_match import (
    Packed,
    WindowHash,
    equal_spans,
    expand,
    mass_chunks,
    release_workspace,  # noqa: F401  (re-exported)
    sorted_unique,
    verify_occurrences,
    workspace,
)

# Room the kernel first makes for occurrences, per segment token: one is always enough (at most one
# longest match per position); a group that needs more is scanned again with enough room.
_OCC_ROOM = 1
# Which implementation runs: "auto" (numba when importable, else numpy), "numba" or "numpy".
BACKEND = os.environ.get("MLESS_LESS_BACKEND", "auto")
_numba_module = None  # None: not tried yet; False: numba not importable


def _compiled():
    """The numba kernels module to use for this call, or None for the numpy implementation."""
    global _numba_module
    if BACKEND not in ("auto", "numba", "numpy"):
        raise ValueError(f"MLESS_LESS_BACKEND / less.BACKEND must be auto, numba or numpy; got {BACKEND!r}")
    if BACKEND == "numpy" or sys.byteorder != "little":  # the kernel reads float bits as little-endian words
        return None
    if _numba_module is None:
        try:
            from . import _less_numba

            _numba_module = _less_numba
        except ImportError:
            _numba_module = False
    if not _numba_module:
        if BACKEND == "numba":
            raise ImportError(
                "LESS backend 'numba' requested but numba is not importable (pip install numba)"
            )
        return None
    return _numba_module


def backend() -> str:
    """'numba' or 'numpy': the implementation less_token_weights uses now."""
    return "numpy" if _compiled() is None else "numba"


def _dedup(packed, starts, lengths, groups, full_hash) -> np.ndarray:
    """Index of a canonical equal key for every key (equal = same group, length and tokens)."""
    rep = np.arange(starts.size)
    mixed = full_hash + lengths.astype(np.uint64) * sm.SALT
    order = np.argsort(mixed)
    h = mixed[order]
    new_run = np.r_[True, h[1:] != h[:-1]]
    leader = order[np.flatnonzero(new_run)][np.cumsum(new_run) - 1]
    member = leader != order
    lead, memb = leader[member], order[member]
    same = (groups[lead] == groups[memb]) & (lengths[lead] == lengths[memb])
    same[same] = equal_spans(packed, starts[lead[same]], starts[memb[same]], lengths[memb[same]])
    rep[memb[same]] = lead[same]
    failed = memb[~same]  # hash collisions: sort those out among themselves
    if failed.size:
        rep[failed] = failed[
            _dedup(packed, starts[failed], lengths[failed], groups[failed], full_hash[failed])
        ]
    return rep


def _dense_ids(x: np.ndarray) -> np.ndarray:
    """0..K-1 labels of the distinct values of x."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    ids = np.zeros(x.size, dtype=np.int64)
    if x.size:
        ids[order] = np.cumsum(np.r_[False, xs[1:] != xs[:-1]])
    return ids


def _thresholds(ent: np.ndarray, lengths: np.ndarray, rows: np.ndarray, quantile: float) -> np.ndarray:
    """tau of spec step 1 for the given rows (each with length >= 1)."""
    ln = lengths[rows]
    k = np.minimum(np.rint(quantile * ln.astype(np.float64)), ln - 1).astype(np.int64)
    tau = np.empty(rows.size, dtype=ent.dtype)
    order = np.argsort(k, kind="stable")
    for idx in np.split(order, np.flatnonzero(np.diff(k[order])) + 1):
        kk, width = int(k[idx[0]]), int(ln[idx].max())
        sub = workspace.get("part", idx.size * width, ent.dtype).reshape(idx.size, width)
        np.take(ent[:, :width], rows[idx], axis=0, out=sub)
        if (ln[idx] < width).any():  # padding must sort last so that index kk falls on a valid token
            np.copyto(sub, np.inf, where=np.arange(width) >= ln[idx][:, None])
        sub.partition(kk, axis=1)
        tau[idx] = sub[:, kk]
    return tau


def _to_numpy(token_ids, entropy, response_mask, correct, group_index):
    if token_ids.dim() != 2 or entropy.shape != token_ids.shape or response_mask.shape != token_ids.shape:
        raise ValueError(
            f"token_ids, entropy and response_mask must share one [B, T] shape; got "
            f"{tuple(token_ids.shape)}, {tuple(entropy.shape)}, {tuple(response_mask.shape)}"
        )
    b = token_ids.shape[0]
    if correct.shape != (b,) or group_index.shape != (b,):
        raise ValueError(
            f"correct and group_index must be [B] = [{b}]; got {tuple(correct.shape)}, {tuple(group_index.shape)}"
        )
    tok = token_ids.detach().cpu().contiguous().numpy().astype(np.int64, copy=False)
    ent = entropy.detach().cpu()
    if ent.dtype not in (torch.float32, torch.float64):
        ent = ent.float()  # exact for fp16 / bf16, which numpy cannot compare natively
    ent = ent.contiguous().numpy()
    mask = response_mask.detach().cpu().contiguous().numpy().astype(bool, copy=False)
    corr = correct.detach().cpu().numpy().astype(bool)
    gid = _dense_ids(group_index.detach().cpu().numpy())
    return tok, ent, mask, corr, gid


def less_token_weights(
    token_ids: torch.Tensor,
    entropy: torch.Tensor,
    response_mask: torch.Tensor,
    correct: torch.Tensor,
    group_index: torch.Tensor,
    *,
    mu: int = 5,
    quantile: float = 0.8,
    return_stats: bool = False,
):
    """Per-token LESS weights, float32 [B, T] on CPU (0 on padding), exactly as in the spec.

    token_ids [B, T] int, entropy [B, T] float (finite; of the sampling policy), response_mask
    [B, T] bool, left-aligned; correct [B] bool; group_index [B] int (one id per prompt; groups may
    be interleaved and of any size). The result does not depend on the order of rows.
    With ``return_stats=True`` returns ``(weights, stats)``, a dict of floats for training logs:
    see `_stats`.
    """
    if mu < 1:
        raise ValueError(f"mu must be >= 1, got {mu}")
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    arrays = _to_numpy(token_ids, entropy, response_mask, correct, group_index)
    nb = _compiled()
    with sm.lock:
        if nb is not None:
            weights, stats = _less_compiled(nb, *arrays, mu, quantile, return_stats)
        else:
            weights, stats = _less(*arrays, mu, quantile, return_stats)
    w = torch.from_numpy(weights)
    return (w, stats) if return_stats else w


def _less_compiled(nb, tok, ent, mask, corr, gid, mu, quantile, want_stats):
    """The rule through the numba kernel (_less_numba.py)."""
    b, t = tok.shape
    n_groups = int(gid.max()) + 1 if b else 0
    weights = np.empty((b, t), dtype=np.float32)
    row_i = np.empty((b, 4), dtype=np.int64)  # length, high tokens, covered, shared
    row_w = np.empty(b, dtype=np.float64)  # weight of the covered tokens
    glob = np.empty(4, dtype=np.int64)  # segment tokens, clusters per kind
    status = nb.less_kernel(
        tok.reshape(-1),
        ent.reshape(-1).view(np.uint32),
        ent.dtype.itemsize // 4,
        mask.reshape(-1).view(np.uint8),
        corr,
        gid,
        n_groups,
        int(mu),
        float(quantile),
        np.uint64(sm._BASE % (1 << 64)),
        np.uint64(pow(sm._BASE, -1, 1 << 64)),  # the base is odd: invertible mod 2**64
        _OCC_ROOM,
        weights.reshape(-1),
        row_i,
        row_w,
        glob,
    )
    if status:
        raise ValueError("response_mask must be left-aligned (valid tokens first, then padding)")
    if not want_stats:
        return weights, None
    lengths = row_i[:, 0]
    n_c = np.bincount(gid, weights=corr, minlength=n_groups)
    n_w = np.bincount(gid, minlength=n_groups) - n_c
    shaped = (n_c[gid] > 0) & (n_w[gid] > 0)
    with np.errstate(divide="ignore"):
        default = np.where(shaped, np.where(corr, 1.0 / n_c[gid], 1.0 / n_w[gid]), 1.0).astype(np.float32)
    n_high, covered, w_covered = row_i[:, 1], row_i[:, 2], row_w
    # Valid tokens weigh 1 (high), their response's default (low, uncovered) or the covering
    # cluster's weight, and covered tokens are segment tokens, which are low.
    w_sum = n_high + (lengths - n_high - covered) * default.astype(np.float64) + w_covered
    return weights, _stats_dict(
        lengths,
        shaped,
        corr,
        default,
        gid,
        n_high,
        covered,
        row_i[:, 3],
        w_sum,
        w_covered,
        int(glob[0]),
        glob[1:].tolist(),
    )


def _less(tok, ent, mask, corr, gid, mu, quantile, want_stats):
    b, t = tok.shape
    lengths = np.count_nonzero(mask, axis=1)
    if t > 1:
        rising = workspace.get("rising", b * (t - 1), bool).reshape(b, t - 1)
        if np.less(mask[:, :-1], mask[:, 1:], out=rising).any():
            raise ValueError("response_mask must be left-aligned (valid tokens first, then padding)")

    n_groups = int(gid.max()) + 1 if b else 0
    n_c = np.bincount(gid, weights=corr, minlength=n_groups)
    n_w = np.bincount(gid, minlength=n_groups) - n_c
    shaped = (n_c[gid] > 0) & (n_w[gid] > 0)  # step 8: other groups keep w = 1
    with np.errstate(divide="ignore"):
        default = np.where(shaped, np.where(corr, 1.0 / n_c[gid], 1.0 / n_w[gid]), 1.0).astype(np.float32)

    # Unshaped rows: tau = -inf makes every token "high" (w = 1) and none segment-low.
    tau = np.full(b, -np.inf, dtype=ent.dtype)
    rows = np.flatnonzero(shaped & (lengths > 0))
    if rows.size:
        tau[rows] = _thresholds(ent, lengths, rows, quantile)
    high = workspace.get("high", b * t, bool).reshape(b, t)
    np.greater(ent, tau[:, None], out=high)
    weights = np.where(high, np.float32(1.0), default[:, None])
    np.multiply(weights, mask, out=weights)

    # Segments (step 4): runs of valid tokens with H < tau, found on a zero-framed copy so that
    # runs never cross rows and transitions come in (start, end) pairs.
    framed = workspace.get("framed", b * (t + 2), bool).reshape(b, t + 2)
    framed[:, 0] = framed[:, -1] = False
    np.less(ent, tau[:, None], out=framed[:, 1:-1])
    np.logical_and(framed[:, 1:-1], mask, out=framed[:, 1:-1])
    flat = framed.reshape(-1)
    change = workspace.get("change", max(flat.size - 1, 0), bool)
    np.not_equal(flat[1:], flat[:-1], out=change)
    edges = np.flatnonzero(change) + 1
    starts, run_len = edges[0::2], edges[1::2] - edges[0::2]
    keep = run_len >= mu
    seg_row = starts[keep] // (t + 2)
    seg_f = seg_row * t + (starts[keep] - seg_row * (t + 2) - 1)  # flat index into [B, T]
    seg_len = run_len[keep]

    cls = None
    if want_stats:
        cls = workspace.get("cls", b * t, np.int8)
        cls.fill(0)
    kinds = _cover(tok, gid, corr, n_c, n_w, seg_f, seg_len, mu, weights.reshape(-1), cls)
    if not want_stats:
        return weights, None
    np.logical_and(high, mask, out=high)
    return weights, _stats(weights, high, lengths, shaped, corr, default, seg_len, gid, kinds, cls)


def _cover(tok2d, gid, corr, n_c, n_w, seg_f, seg_len, mu, w_flat, cls):
    """Steps 5-6: find the clusters and write their weights into w_flat (and classes into cls).

    Returns the kind of every distinct key: 0 no cluster, 1 correct-only, 2 incorrect-only, 3 shared.
    """
    if seg_f.size == 0:
        return np.zeros(0, dtype=np.int8)
    b, t = tok2d.shape
    tok = tok2d.reshape(-1)
    whash = WindowHash(tok2d, gid)

    seg_g = gid[seg_f // t]
    packed = Packed(tok, mu)
    rep = _dedup(packed, seg_f, seg_len, seg_g, whash(seg_f, seg_len))
    keys = np.flatnonzero(rep == np.arange(rep.size))
    seg_key = np.searchsorted(keys, rep)  # key index of each segment's class
    k_f, k_len, k_g = seg_f[keys], seg_len[keys], seg_g[keys]
    k_full = whash(k_f, k_len)
    k_head = whash(k_f, mu)

    # Candidate positions: windows whose mu-gram hash hits the bitmap of key heads.
    bits = int(np.clip(np.ceil(np.log2(keys.size * 32.0)), 12, 24))
    shift = np.uint64(64 - bits)
    bitmap = workspace.get("bitmap", 1 << bits, bool)
    bitmap.fill(False)
    bitmap[(k_head >> shift).view(np.int64)] = True
    cand = whash.window_hits(mu, bitmap, shift)
    # Windows are searched only inside one copy of each distinct segment (its "host"); matches are
    # then replicated to the other copies, which _dedup proved identical.
    host = np.searchsorted(k_f, cand, side="right") - 1
    room = np.where(host >= 0, k_f[host] + k_len[host] - cand, 0)
    inside = room >= mu
    cand, host, room = cand[inside], host[inside], room[inside]
    c_head = whash(cand, mu)

    # Join candidates with keys on the exact head hash, through buckets of sorted heads.
    by_head = np.argsort(k_head)
    heads = k_head[by_head]
    jb = int(np.clip(np.ceil(np.log2(keys.size + 1)), 4, 22))
    bshift = np.uint64(64 - jb)
    bucket_start = np.searchsorted((heads >> bshift).view(np.int64), np.arange((1 << jb) + 1))
    cb = (c_head >> bshift).view(np.int64)
    lo = bucket_start[cb]
    cnt = bucket_start[cb + 1] - lo
    some = np.flatnonzero(cnt)
    m_key, m_host, m_off = [], [], []
    for part in mass_chunks(some, cnt[some]):
        c = cnt[part]
        hidx = expand(lo[part], c, "pairs")
        owner = np.repeat(part, c)
        same = heads[hidx] == c_head[owner]
        key, owner = by_head[hidx[same]], owner[same]
        ln = k_len[key]
        fits = ln <= room[owner]
        key, owner, ln = key[fits], owner[fits], ln[fits]
        pos, hs = cand[owner], host[owner]
        off = pos - k_f[hs]
        known = (off == 0) & (hs == key)
        # A distinct key of the same length at a host's start cannot match it.
        maybe = known | (~((off == 0) & (k_len[hs] == ln)) & (k_g[hs] == k_g[key]))
        maybe[maybe] &= known[maybe] | (whash(pos[maybe], ln[maybe]) == k_full[key[maybe]])
        key, hs, off, pos, ln, known = key[maybe], hs[maybe], off[maybe], pos[maybe], ln[maybe], known[maybe]
        ok = verify_occurrences(packed, key, k_f[key], pos, ln, hs, known)
        m_key.append(key[ok])
        m_host.append(hs[ok])
        m_off.append(off[ok])
    m_key, m_host, m_off = np.concatenate(m_key), np.concatenate(m_host), np.concatenate(m_off)
    # Every copy of a host holds the host's matches: carriers and coverage are worked out per
    # host, then spread over its copies.
    copies = np.argsort(seg_key, kind="stable")
    n_copies = np.bincount(seg_key, minlength=keys.size)
    first_copy = np.cumsum(n_copies) - n_copies

    # Carriers: distinct responses holding a copy of a host that contains the key.
    kh = sorted_unique(m_key * keys.size + m_host)
    kh_key, kh_host = kh // keys.size, kh % keys.size
    c = n_copies[kh_host]
    rows = seg_f[copies[expand(first_copy[kh_host], c, "copies")]] // t
    code = sorted_unique(np.repeat(kh_key, c) * b + rows)
    p_key, p_row = code // b, code % b
    carriers = np.bincount(p_key, minlength=keys.size)
    right = np.bincount(p_key, weights=corr[p_row], minlength=keys.size)
    kinds = np.where(carriers < 2, 0, np.where(right == carriers, 1, np.where(right == 0, 2, 3))).astype(
        np.int8
    )
    with np.errstate(divide="ignore", invalid="ignore"):
        value = np.where(kinds == 1, carriers / n_c[k_g], np.where(kinds == 2, carriers / n_w[k_g], np.inf))
    value = value.astype(np.float32)  # "largest" is decided on the float32 weights written

    # Step 6 without a scatter-max: merge each (weight level, host)'s occurrences into disjoint
    # intervals, spread them over the host's copies, then write levels in increasing order,
    # shared (inf, written as 0) last.
    sel = kinds[m_key] > 0
    m_key, m_host, m_off = m_key[sel], m_host[sel], m_off[sel]
    if m_key.size == 0:
        return kinds
    vals = value[m_key]
    levels = sorted_unique(vals)
    span = t + 1
    s = (np.searchsorted(levels, vals) * keys.size + m_host) * span + m_off
    order = np.argsort(s)
    s = s[order]
    e = np.maximum.accumulate(s + k_len[m_key[order]])
    first = np.flatnonzero(np.r_[True, s[1:] > e[:-1]])
    ms = s[first]
    me = e[np.r_[first[1:] - 1, s.size - 1]]
    lh, start = ms // span, ms % span
    level, host = lh // keys.size, lh % keys.size
    c = n_copies[host]
    at = seg_f[copies[expand(first_copy[host], c, "copies")]] + np.repeat(start, c)
    size, level = np.repeat(me - ms, c), np.repeat(level, c)
    by_level = np.argsort(level, kind="stable")
    at, size, level = at[by_level], size[by_level], level[by_level]
    for lv in range(levels.size):
        a, z = np.searchsorted(level, [lv, lv + 1])
        v = levels[lv]
        for part in mass_chunks(np.arange(a, z), size[a:z]):
            idx = expand(at[part], size[part], "cover")
            w_flat[idx] = 0.0 if np.isinf(v) else v
            if cls is not None:
                cls[idx] = 3 if np.isinf(v) else 1
    return kinds


def _stats(weights, high, lengths, shaped, corr, default, seg_len, gid, kinds, cls):
    """Per-row counts of the numpy path, turned into the stats dict by `_stats_dict`."""
    b, t = weights.shape
    rows = shaped & (lengths > 0)
    n_high = np.where(rows, np.count_nonzero(high, axis=1), 0)
    cls = cls.reshape(b, t)
    covered = np.count_nonzero(cls, axis=1)
    shared = (cls.sum(axis=1, dtype=np.int64) - covered) // 2  # classes are 1 (weighted) and 3 (shared)
    w_covered = np.add.reduce(weights, axis=1, dtype=np.float64, where=cls != 0)
    kind_counts = [int((kinds == k).sum()) for k in (1, 2, 3)]
    w_sum = weights.sum(axis=1, dtype=np.float64)
    return _stats_dict(
        lengths,
        shaped,
        corr,
        default,
        gid,
        n_high,
        covered,
        shared,
        w_sum,
        w_covered,
        int(seg_len.sum()),
        kind_counts,
    )


def _stats_dict(
    lengths, shaped, corr, default, gid, n_high, covered, shared, w_sum, w_covered, seg_tokens, kind_counts
):
    """Diagnostics (floats). Token fractions and mean weights are over the groups LESS shapes
    (N_c > 0 and N_w > 0); clusters are counted once per distinct (group, token sequence).

    Per row: n_high high-entropy tokens, covered tokens (by any cluster), shared (neutralised) ones
    among them, w_sum the sum of the row's weights, w_covered that of its covered tokens."""
    b = lengths.size
    rows = shaped & (lengths > 0)
    n_tok = float(lengths[rows].sum())
    n_high = np.where(rows, n_high, 0)
    n_low = np.where(rows, lengths - n_high, 0)
    weighted = covered - shared
    # Shared tokens weigh 0, so the covered tokens' weight is the weighted ones'.
    uncovered_low = n_low - covered
    ratio = lambda num, den: float(num) / float(den) if den else 0.0
    return {
        "groups": float(gid.max() + 1) if b else 0.0,
        "groups_shaped": float(np.unique(gid[shaped]).size),
        "tokens_shaped": n_tok,
        "frac_high_entropy": ratio(n_high.sum(), n_tok),
        "frac_low_entropy": ratio(n_low.sum(), n_tok),
        "frac_in_segment": ratio(seg_tokens, n_tok),
        "clusters_correct_only": float(kind_counts[0]),
        "clusters_incorrect_only": float(kind_counts[1]),
        "clusters_shared": float(kind_counts[2]),
        "frac_tokens_correct_only": ratio(weighted[corr].sum(), n_tok),
        "frac_tokens_incorrect_only": ratio(weighted[~corr].sum(), n_tok),
        "frac_tokens_shared": ratio(shared.sum(), n_tok),
        "mean_weight": ratio(w_sum[rows].sum(), n_tok),
        "mean_weight_default": ratio((uncovered_low * default.astype(np.float64)).sum(), uncovered_low.sum()),
        "mean_weight_correct_only": ratio(w_covered[corr].sum(), weighted[corr].sum()),
        "mean_weight_incorrect_only": ratio(w_covered[~corr].sum(), weighted[~corr].sum()),
    }


@register_shaper("less")
def less_shaper(advantages: torch.Tensor, batch, *, mu: int = 5, quantile: float = 0.8):
    """GRPO + LESS: advantages [B] -> token advantages [B, T] = w * A[:, None], plus LESS stats.

    `batch` needs token_ids, entropy (of the sampling policy), response_mask, correct, group_index.
    """
    w, stats = less_token_weights(
        batch["token_ids"],
        batch["entropy"],
        batch["response_mask"],
        batch["correct"],
        batch["group_index"],
        mu=mu,
        quantile=quantile,
        return_stats=True,
    )
    return w.to(advantages.device, advantages.dtype) * advantages[:, None], stats
