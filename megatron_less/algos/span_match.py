"""Exact matching of token spans in numpy, the machinery under LESS (less.py).

Everything works on flat int64 token arrays of a [B, T] batch (flat index f = r * T + c):
  * `WindowHash`: polynomial hashes mod 2**64 of any window inside a row, O(1) each;
  * `Packed` + `equal_spans`: exact equality of many spans at once, several ids per compared word;
  * `verify_occurrences`: exact confirmation of candidate occurrences, chaining overlapping ones;
  * `workspace`: scratch arrays kept between calls (first-touching fresh memory costs more than
    the arithmetic on the 2-core VM), freed by `release_workspace()`.
Hashes only propose; every answer that matters is confirmed by comparing token ids.
"""

from __future__ import annotations

import threading

import numpy as np

_BASE = 0x9E3779B97F4A7C15  # odd, so invertible mod 2**64
_BASE_INV = pow(_BASE, -1, 1 << 64)
SALT = np.uint64(0xD6E8FEB86659FD93)
CHUNK = 1 << 16  # elements per step of a pass over the batch (fits L2 with its temporaries)
MAX_MASS = 1 << 22  # pairs / words expanded at once: bounds scratch memory on degenerate batches
lock = threading.Lock()


class Workspace:
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


workspace = Workspace()


def release_workspace() -> None:
    """Free the scratch memory kept between calls (~36 bytes per token of the largest batch seen:
    ~450 MB for 512 x 8 x 3072 tokens)."""
    with lock:
        workspace.bufs.clear()


def powers(n: int) -> tuple[np.ndarray, np.ndarray]:
    """BASE**i and BASE**-i mod 2**64 for i < n."""
    pw = np.full(max(n, 1), _BASE, dtype=np.uint64)
    inv = np.full(max(n, 1), _BASE_INV, dtype=np.uint64)
    pw[0] = inv[0] = 1
    np.multiply.accumulate(pw, out=pw)
    np.multiply.accumulate(inv, out=inv)
    return pw, inv


def expand(starts: np.ndarray, counts: np.ndarray, name: str, step: int = 1) -> np.ndarray:
    """Concatenation of arange(s, s + c * step, step) over (s, c) pairs, all c >= 1, in workspace `name`."""
    total = int(counts.sum())
    out = workspace.get(name, total, np.int64)
    if total:
        out.fill(step)
        out[0] = starts[0]
        out[np.cumsum(counts[:-1])] = starts[1:] - starts[:-1] - (counts[:-1] - 1) * step
        np.cumsum(out, out=out)
    return out


def mass_chunks(idx: np.ndarray, weight: np.ndarray):
    """Split idx into consecutive pieces of total weight <= MAX_MASS (a heavier item stands alone)."""
    if idx.size == 0:
        return []
    csum = np.cumsum(weight)
    cuts = np.searchsorted(csum, np.arange(MAX_MASS, int(csum[-1]), MAX_MASS), side="right")
    return [p for p in np.split(idx, cuts) if p.size]


class Packed:
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
            words = self.words = workspace.get("words", max(n, 0), np.uint64)
            tmp = workspace.get("words_tmp", CHUNK, np.uint64)
            for a in range(0, n, CHUNK):
                z = min(n, a + CHUNK)
                w, x = words[a:z], tmp[: z - a]
                w[:] = tok[a:z]
                for i in range(1, k):
                    np.left_shift(tok[a + i : z + i], bits * np.uint64(i), out=x)
                    w |= x
        return self.words


def equal_spans(packed: Packed, a: np.ndarray, b: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """tok[a:a+l] == tok[b:b+l] for each triple, compared exactly (l >= 0)."""
    out = np.ones(a.size, dtype=bool)
    todo = np.flatnonzero((a != b) & (lengths > 0))
    k = packed.k
    short = todo[lengths[todo] < k]
    if short.size:  # too short for a packed word: token by token
        out[short] = compare_words(packed.tok, 1, a[short], b[short], lengths[short])
    todo = todo[lengths[todo] >= k]
    if todo.size:
        out[todo] = compare_words(packed.get(), k, a[todo], b[todo], lengths[todo])
    return out


def compare_words(words: np.ndarray, k: int, a: np.ndarray, b: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Span equality through words of k tokens (all lengths >= k)."""
    out = np.empty(a.size, dtype=bool)
    full = lengths // k  # whole words per span; a last, overlapping word covers the remainder
    for part in mass_chunks(np.arange(a.size), full):
        c, ln, pa, pb = full[part], lengths[part], a[part], b[part]
        wa = workspace.get("wa", int(c.sum()), words.dtype)
        wb = workspace.get("wb", wa.size, words.dtype)
        np.take(words, expand(pa, c, "ia", k), out=wa, mode="clip")
        np.take(words, expand(pb, c, "ia", k), out=wb, mode="clip")
        differs = workspace.get("ne", wa.size, bool)
        np.not_equal(wa, wb, out=differs)
        same = ~np.logical_or.reduceat(differs, np.r_[0, np.cumsum(c[:-1])])
        tail = np.flatnonzero(ln % k)
        same[tail] &= words[pa[tail] + ln[tail] - k] == words[pb[tail] + ln[tail] - k]
        out[part] = same
    return out


def verify_occurrences(packed, key, key_start, pos, length, host, known) -> np.ndarray:
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
    ok[anchor] = known[order][anchor] | equal_spans(packed, ks[anchor], p[anchor], ln[anchor])
    li = np.flatnonzero(link)
    if li.size:
        dl, kl, ll = d[li], ks[li], ln[li]
        # Period d of the key, once per distinct (key, d).
        uniq, inv = unique_inverse(kl * (int(dl.max()) + 1) + dl)
        first = np.empty(uniq.size, dtype=np.int64)
        first[inv] = np.arange(inv.size)  # any member: all share key and d
        periodic = equal_spans(packed, kl[first] + dl[first], kl[first], ll[first] - dl[first])[inv]
        # The tail: the last max(d, k) tokens (given the period and the previous occurrence, the
        # extra k - d tokens of a whole word are equal anyway, so one word does for d <= k).
        w = np.maximum(dl, packed.k)
        tail = equal_spans(packed, p[li] + ll - w, kl + ll - w, w)
        ok[li] = periodic & tail
    # A chain holds while every link from its anchor holds.
    fails = np.cumsum(~ok)
    chain_start = np.maximum.accumulate(np.where(link, 0, np.arange(p.size)))
    held = fails - fails[chain_start] + ~ok[chain_start] == 0
    redo = np.flatnonzero(~held & link)
    held[redo] = equal_spans(packed, ks[redo], p[redo], ln[redo])
    out = np.empty(p.size, dtype=bool)
    out[order] = held
    return out


def unique_inverse(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """np.unique(x, return_inverse=True) through a sort (numpy's hashing path is slow here)."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    new = np.r_[True, xs[1:] != xs[:-1]]
    inv = np.empty(x.size, dtype=np.int64)
    inv[order] = np.cumsum(new) - 1
    return xs[new], inv


def sorted_unique(x: np.ndarray) -> np.ndarray:
    x = np.sort(x)
    return x[np.r_[True, x[1:] != x[:-1]]] if x.size else x


class WindowHash:
    """Hash of any window inside one row, O(1) from per-row prefix sums.

    q[r, c] = sum_{k < c} x[r, k] * BASE**-k with x = token + salt(group), so that
    (q[r, c + L] - q[r, c]) * BASE**c does not depend on where the window sits. Positions are
    flat indices f = r * T + c into [B, T].
    """

    def __init__(self, tok2d: np.ndarray, gid: np.ndarray) -> None:
        b, t = tok2d.shape
        self.t = t
        self.pw, inv = powers(t + 1)
        q = self.q2 = workspace.get("q", b * (t + 1), np.uint64).reshape(b, t + 1)
        q[:, 0] = 0
        salt = (gid.astype(np.uint64) + np.uint64(1)) * SALT
        step = max(1, CHUNK // max(t, 1))
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
        hit = workspace.get("hit", b * width, bool).reshape(b, width)
        step = max(1, CHUNK // width)
        h_buf = workspace.get("h", step * width, np.uint64)
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
