"""LESS: Low-Entropy Segment Shaping of GRPO advantages (the exact rule: less-spec.md).

`less_token_weights` returns the per-token weight w of the spec; shaped advantages are
``w * A[:, None]``. The whole batch is processed at once with numpy: no Python loop over groups
or responses. This is the spec's rule (every carrier counts; a token takes 0 if any covering
cluster is shared, else the largest weight), not the authors' reference code, which links a
segment only to the first other response containing it and lets later clusters overwrite
earlier ones (see the spec's notes for how often the two differ).

How carriers are found without comparing every key with every window:
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

Speed notes (2-core VM): passes over the whole batch run in L2-sized chunks, and large scratch
arrays are kept between calls, because first-touching fresh memory there costs more than the
arithmetic. `release_workspace()` frees them.
"""

from __future__ import annotations

import threading

import numpy as np
import torch

from .registry import register_shaper

_BASE = 0x9E3779B97F4A7C15  # odd, so invertible mod 2**64
_BASE_INV = pow(_BASE, -1, 1 << 64)
_SALT = np.uint64(0xD6E8FEB86659FD93)
_CHUNK = 1 << 16  # elements per step of a pass over the batch (fits L2 with its temporaries)
_MAX_MASS = 1 << 22  # pairs / words expanded at once: bounds scratch memory on degenerate batches
_lock = threading.Lock()


class _Workspace:
    """Scratch arrays reused across calls, by name."""

    def __init__(self) -> None:
        self.bufs: dict[str, np.ndarray] = {}

    def get(self, name: str, n: int, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        buf = self.bufs.get(name)
        if buf is None or buf.dtype != dtype or buf.size < n:
            grow = buf.size + buf.size // 4 if buf is not None and buf.dtype == dtype else 0
            buf = self.bufs[name] = np.empty(max(n, grow), dtype=dtype)
        return buf[:n]


_ws = _Workspace()


def release_workspace() -> None:
    """Free the scratch memory kept between calls (~36 bytes per token of the largest batch seen:
    ~450 MB for 512 x 8 x 3072 tokens)."""
    with _lock:
        _ws.bufs.clear()


def _powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """BASE**i and BASE**-i mod 2**64 for i < n."""
    pw = np.full(max(n, 1), _BASE, dtype=np.uint64)
    inv = np.full(max(n, 1), _BASE_INV, dtype=np.uint64)
    pw[0] = inv[0] = 1
    np.multiply.accumulate(pw, out=pw)
    np.multiply.accumulate(inv, out=inv)
    return pw, inv


def _expand(starts: np.ndarray, counts: np.ndarray, name: str, step: int = 1) -> np.ndarray:
    """Concatenation of arange(s, s + c * step, step) over (s, c) pairs, all c >= 1, in workspace `name`."""
    total = int(counts.sum())
    out = _ws.get(name, total, np.int64)
    if total:
        out.fill(step)
        out[0] = starts[0]
        out[np.cumsum(counts[:-1])] = starts[1:] - starts[:-1] - (counts[:-1] - 1) * step
        np.cumsum(out, out=out)
    return out


def _mass_chunks(idx: np.ndarray, weight: np.ndarray):
    """Split idx into consecutive pieces of total weight <= _MAX_MASS (a heavier item stands alone)."""
    if idx.size == 0:
        return []
    csum = np.cumsum(weight)
    cuts = np.searchsorted(csum, np.arange(_MAX_MASS, int(csum[-1]), _MAX_MASS), side="right")
    return [p for p in np.split(idx, cuts) if p.size]


class _Packed:
    """Token ids packed k to a uint64 word (word p = tokens p .. p+k-1), so that comparing two
    spans exactly takes ~L/k word comparisons instead of L token comparisons. Built on first use."""

    def __init__(self, tok: np.ndarray, min_len: int) -> None:
        lo, hi = (int(tok.min()), int(tok.max())) if tok.size else (0, 0)
        self.k = min(64 // max(1, hi.bit_length()), min_len) if lo >= 0 else 1
        self.tok, self.words = tok.view(np.uint64), None  # one dtype for all comparison buffers

    def get(self) -> np.ndarray:
        if self.k == 1:
            return self.tok
        if self.words is None:
            tok, k = self.tok, self.k
            bits = np.uint64(64 // k)
            n = tok.size - k + 1  # words that stay inside the batch; spans never need the others
            words = self.words = _ws.get("words", max(n, 0), np.uint64)
            tmp = _ws.get("words_tmp", _CHUNK, np.uint64)
            for a in range(0, n, _CHUNK):
                z = min(n, a + _CHUNK)
                w, x = words[a:z], tmp[: z - a]
                w[:] = tok[a:z]
                for i in range(1, k):
                    np.left_shift(tok[a + i : z + i], bits * np.uint64(i), out=x)
                    w |= x
        return self.words


def _equal_spans(packed: _Packed, a: np.ndarray, b: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """tok[a:a+l] == tok[b:b+l] for each triple, compared exactly (l >= 0)."""
    out = np.ones(a.size, dtype=bool)
    todo = np.flatnonzero((a != b) & (lengths > 0))
    k = packed.k
    short = todo[lengths[todo] < k]
    if short.size:  # too short for a packed word: token by token
        out[short] = _compare_words(packed.tok, 1, a[short], b[short], lengths[short])
    todo = todo[lengths[todo] >= k]
    if todo.size:
        out[todo] = _compare_words(packed.get(), k, a[todo], b[todo], lengths[todo])
    return out


def _compare_words(
    words: np.ndarray, k: int, a: np.ndarray, b: np.ndarray, lengths: np.ndarray
) -> np.ndarray:
    """Span equality through words of k tokens (all lengths >= k)."""
    out = np.empty(a.size, dtype=bool)
    full = lengths // k  # whole words per span; a last, overlapping word covers the remainder
    for part in _mass_chunks(np.arange(a.size), full):
        c, ln, pa, pb = full[part], lengths[part], a[part], b[part]
        wa = _ws.get("wa", int(c.sum()), words.dtype)
        wb = _ws.get("wb", wa.size, words.dtype)
        np.take(words, _expand(pa, c, "ia", k), out=wa, mode="clip")
        np.take(words, _expand(pb, c, "ia", k), out=wb, mode="clip")
        differs = _ws.get("ne", wa.size, bool)
        np.not_equal(wa, wb, out=differs)
        same = ~np.logical_or.reduceat(differs, np.r_[0, np.cumsum(c[:-1])])
        tail = np.flatnonzero(ln % k)
        same[tail] &= words[pa[tail] + ln[tail] - k] == words[pb[tail] + ln[tail] - k]
        out[part] = same
    return out


def _verify_occurrences(packed, key, key_start, pos, length, host, known) -> np.ndarray:
    """Exact check that `key` (starting at key_start) occurs at pos, for each candidate.

    Consecutive candidates of one key inside one host segment at distance d < length (periodic
    text, e.g. repetition loops) are chained instead of compared in full: if K occurs at p, then
    K occurs at p + d iff K has period d and the d tokens after the first occurrence continue it.
    A chain starts from a full comparison (or a `known` match), so a run of occurrences costs
    O(L + run length) instead of O(L * occurrences). Whatever a chain cannot confirm is compared
    in full.
    """
    n = int(pos.max()) + 1 if pos.size else 1
    order = np.argsort(key * n + pos) if int(key.max(initial=0)) < (1 << 62) // n else np.lexsort((pos, key))
    h, p, ln, ks = host[order], pos[order], length[order], key_start[order]
    d = np.r_[0, p[1:] - p[:-1]]
    link = np.r_[False, (key[order][1:] == key[order][:-1]) & (h[1:] == h[:-1])] & (d < ln)
    ok = np.empty(p.size, dtype=bool)
    anchor = np.flatnonzero(~link)
    ok[anchor] = known[order][anchor] | _equal_spans(packed, ks[anchor], p[anchor], ln[anchor])
    li = np.flatnonzero(link)
    if li.size:
        dl, kl, ll = d[li], ks[li], ln[li]
        # Period d of the key, once per distinct (key, d).
        uniq, inv = _unique_inverse(kl * (int(dl.max()) + 1) + dl)
        first = np.empty(uniq.size, dtype=np.int64)
        first[inv] = np.arange(inv.size)  # any member: all share key and d
        periodic = _equal_spans(packed, kl[first] + dl[first], kl[first], ll[first] - dl[first])[inv]
        # The tail: the last max(d, k) tokens (given the period and the previous occurrence, the
        # extra k - d tokens of a whole word are equal anyway, so one word does for d <= k).
        w = np.maximum(dl, packed.k)
        tail = _equal_spans(packed, p[li] + ll - w, kl + ll - w, w)
        ok[li] = periodic & tail
    # A chain holds while every link from its anchor holds.
    fails = np.cumsum(~ok)
    chain_start = np.maximum.accumulate(np.where(link, 0, np.arange(p.size)))
    held = fails - fails[chain_start] + ~ok[chain_start] == 0
    redo = np.flatnonzero(~held & link)
    held[redo] = _equal_spans(packed, ks[redo], p[redo], ln[redo])
    out = np.empty(p.size, dtype=bool)
    out[order] = held
    return out


def _unique_inverse(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(x, return_inverse=True) through a sort (numpy's hashing path is slow here)."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    new = np.r_[True, xs[1:] != xs[:-1]]
    inv = np.empty(x.size, dtype=np.int64)
    inv[order] = np.cumsum(new) - 1
    return xs[new], inv


def _sorted_unique(x: np.ndarray) -> np.ndarray:
    x = np.sort(x)
    return x[np.r_[True, x[1:] != x[:-1]]] if x.size else x


class _WindowHash:
    """Hash of any window inside one row, O(1) from per-row prefix sums.

    q[r, c] = sum_{k < c} x[r, k] * BASE**-k with x = token + salt(group), so that
    (q[r, c + L] - q[r, c]) * BASE**c does not depend on where the window sits. Positions are
    flat indices f = r * T + c into [B, T].
    """

    def __init__(self, tok2d: np.ndarray, gid: np.ndarray) -> None:
        b, t = tok2d.shape
        self.t = t
        self.pw, inv = _powers(t + 1)
        q = self.q2 = _ws.get("q", b * (t + 1), np.uint64).reshape(b, t + 1)
        q[:, 0] = 0
        salt = (gid.astype(np.uint64) + np.uint64(1)) * _SALT
        step = max(1, _CHUNK // max(t, 1))
        for r0 in range(0, b, step):
            r1 = min(b, r0 + step)
            part = q[r0:r1, 1:]
            np.add(tok2d[r0:r1].view(np.uint64), salt[r0:r1, None], out=part)
            np.multiply(part, inv[:t], out=part)
            np.cumsum(part, axis=1, out=part)
        self.q = q.reshape(-1)

    def __call__(self, f: np.ndarray, length) -> np.ndarray:
        r = f // self.t
        qi = f + r
        return (self.q[qi + length] - self.q[qi]) * self.pw[f - r * self.t]

    def window_hits(self, mu: int, bitmap: np.ndarray, shift: np.uint64) -> np.ndarray:
        """Flat positions of all length-mu windows whose hash's top bits are set in bitmap."""
        b, t1 = self.q2.shape
        width = t1 - mu  # window starts per row
        if width <= 0:
            return np.zeros(0, dtype=np.int64)
        hit = _ws.get("hit", b * width, bool).reshape(b, width)
        step = max(1, _CHUNK // width)
        h_buf = _ws.get("h", step * width, np.uint64)
        for r0 in range(0, b, step):
            r1 = min(b, r0 + step)
            h = h_buf[: (r1 - r0) * width].reshape(r1 - r0, width)
            np.subtract(self.q2[r0:r1, mu:], self.q2[r0:r1, :width], out=h)
            np.multiply(h, self.pw[:width], out=h)
            np.right_shift(h, shift, out=h)
            np.take(bitmap, h.view(np.int64), out=hit[r0:r1], mode="clip")
        idx = np.flatnonzero(hit)
        r = idx // width
        return idx + r * (self.t - width)


def _dedup(packed, starts, lengths, groups, full_hash) -> np.ndarray:
    """Index of a canonical equal key for every key (equal = same group, length and tokens)."""
    rep = np.arange(starts.size)
    mixed = full_hash + lengths.astype(np.uint64) * _SALT
    order = np.argsort(mixed)
    h = mixed[order]
    new_run = np.r_[True, h[1:] != h[:-1]]
    leader = order[np.flatnonzero(new_run)][np.cumsum(new_run) - 1]
    member = leader != order
    lead, memb = leader[member], order[member]
    same = (groups[lead] == groups[memb]) & (lengths[lead] == lengths[memb])
    same[same] = _equal_spans(packed, starts[lead[same]], starts[memb[same]], lengths[memb[same]])
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
        sub = _ws.get("part", idx.size * width, ent.dtype).reshape(idx.size, width)
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
    with _lock:
        weights, stats = _less(*arrays, mu, quantile, return_stats)
    w = torch.from_numpy(weights)
    return (w, stats) if return_stats else w


def _less(tok, ent, mask, corr, gid, mu, quantile, want_stats):
    b, t = tok.shape
    lengths = np.count_nonzero(mask, axis=1)
    if t > 1:
        rising = _ws.get("rising", b * (t - 1), bool).reshape(b, t - 1)
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
    high = _ws.get("high", b * t, bool).reshape(b, t)
    np.greater(ent, tau[:, None], out=high)
    weights = np.where(high, np.float32(1.0), default[:, None])
    np.multiply(weights, mask, out=weights)

    # Segments (step 4): runs of valid tokens with H < tau, found on a zero-framed copy so that
    # runs never cross rows and transitions come in (start, end) pairs.
    framed = _ws.get("framed", b * (t + 2), bool).reshape(b, t + 2)
    framed[:, 0] = framed[:, -1] = False
    np.less(ent, tau[:, None], out=framed[:, 1:-1])
    np.logical_and(framed[:, 1:-1], mask, out=framed[:, 1:-1])
    flat = framed.reshape(-1)
    change = _ws.get("change", max(flat.size - 1, 0), bool)
    np.not_equal(flat[1:], flat[:-1], out=change)
    edges = np.flatnonzero(change) + 1
    starts, run_len = edges[0::2], edges[1::2] - edges[0::2]
    keep = run_len >= mu
    seg_row = starts[keep] // (t + 2)
    seg_f = seg_row * t + (starts[keep] - seg_row * (t + 2) - 1)  # flat index into [B, T]
    seg_len = run_len[keep]

    cls = None
    if want_stats:
        cls = _ws.get("cls", b * t, np.int8)
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
    whash = _WindowHash(tok2d, gid)

    seg_g = gid[seg_f // t]
    packed = _Packed(tok, mu)
    rep = _dedup(packed, seg_f, seg_len, seg_g, whash(seg_f, seg_len))
    keys = np.flatnonzero(rep == np.arange(rep.size))
    seg_key = np.searchsorted(keys, rep)  # key index of each segment's class
    k_f, k_len, k_g = seg_f[keys], seg_len[keys], seg_g[keys]
    k_full = whash(k_f, k_len)
    k_head = whash(k_f, mu)

    # Candidate positions: windows whose mu-gram hash hits the bitmap of key heads.
    bits = int(np.clip(np.ceil(np.log2(keys.size * 32.0)), 12, 24))
    shift = np.uint64(64 - bits)
    bitmap = _ws.get("bitmap", 1 << bits, bool)
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
    for part in _mass_chunks(some, cnt[some]):
        c = cnt[part]
        hidx = _expand(lo[part], c, "pairs")
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
        ok = _verify_occurrences(packed, key, k_f[key], pos, ln, hs, known)
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
    kh = _sorted_unique(m_key * keys.size + m_host)
    kh_key, kh_host = kh // keys.size, kh % keys.size
    c = n_copies[kh_host]
    rows = seg_f[copies[_expand(first_copy[kh_host], c, "copies")]] // t
    code = _sorted_unique(np.repeat(kh_key, c) * b + rows)
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
    levels = _sorted_unique(vals)
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
    at = seg_f[copies[_expand(first_copy[host], c, "copies")]] + np.repeat(start, c)
    size, level = np.repeat(me - ms, c), np.repeat(level, c)
    by_level = np.argsort(level, kind="stable")
    at, size, level = at[by_level], size[by_level], level[by_level]
    for lv in range(levels.size):
        a, z = np.searchsorted(level, [lv, lv + 1])
        v = levels[lv]
        for part in _mass_chunks(np.arange(a, z), size[a:z]):
            idx = _expand(at[part], size[part], "cover")
            w_flat[idx] = 0.0 if np.isinf(v) else v
            if cls is not None:
                cls[idx] = 3 if np.isinf(v) else 1
    return kinds


def _stats(weights, high, lengths, shaped, corr, default, seg_len, gid, kinds, cls):
    """Diagnostics (floats). Token fractions and mean weights are over the groups LESS shapes
    (N_c > 0 and N_w > 0); clusters are counted once per distinct (group, token sequence)."""
    b, t = weights.shape
    rows = shaped & (lengths > 0)
    n_tok = float(lengths[rows].sum())
    n_high = np.where(rows, np.count_nonzero(high, axis=1), 0)
    n_low = np.where(rows, lengths - n_high, 0)
    cls = cls.reshape(b, t)
    covered = np.count_nonzero(cls, axis=1)
    shared = (cls.sum(axis=1, dtype=np.int64) - covered) // 2  # classes are 1 (weighted) and 3 (shared)
    weighted = covered - shared
    # Shared tokens weigh 0, so the covered tokens' weight is the weighted ones'.
    w_covered = np.add.reduce(weights, axis=1, dtype=np.float64, where=cls != 0)
    uncovered_low = n_low - covered
    ratio = lambda num, den: float(num) / float(den) if den else 0.0
    return {
        "groups": float(gid.max() + 1) if b else 0.0,
        "groups_shaped": float(np.unique(gid[shaped]).size),
        "tokens_shaped": n_tok,
        "frac_high_entropy": ratio(n_high.sum(), n_tok),
        "frac_low_entropy": ratio(n_low.sum(), n_tok),
        "frac_in_segment": ratio(seg_len.sum(), n_tok),
        "clusters_correct_only": float((kinds == 1).sum()),
        "clusters_incorrect_only": float((kinds == 2).sum()),
        "clusters_shared": float((kinds == 3).sum()),
        "frac_tokens_correct_only": ratio(weighted[corr].sum(), n_tok),
        "frac_tokens_incorrect_only": ratio(weighted[~corr].sum(), n_tok),
        "frac_tokens_shared": ratio(shared.sum(), n_tok),
        "mean_weight": ratio(weights.sum(axis=1, dtype=np.float64)[rows].sum(), n_tok),
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
