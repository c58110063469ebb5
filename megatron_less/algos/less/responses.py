"""Steps 1-4 of the rule for one response: its threshold tau, the default weights and classes of
its tokens, and its segments.

Entropies are compared through order-preserving unsigned integer keys (the key order is the float
order, -0.0 folded onto +0.0), so ties at tau are decided exactly, and tau is found by radix
selection on those keys rather than by sorting.
"""

from __future__ import annotations

import numpy as np

from .codes import DEFAULT, HIGH
from .common import SEG_LEN, SEG_POS, SEG_RESP, SEG_START, jit

_SIGN32 = np.uint64(0x80000000)
_LOW32 = np.uint64(0xFFFFFFFF)
_SIGN64 = np.uint64(0x8000000000000000)
_ZERO = np.uint64(0)
_MAX = np.uint64(0xFFFFFFFFFFFFFFFF)
_S32 = np.uint64(32)
_DIGIT = 8  # bits per radix-selection pass: 256 bins, in L1 with room to spare
_SMALL = 32  # this few candidates are sorted instead


@jit
def order_keys(ebits, wpt, n, out):
    """out[:n] = keys ordered as the response's n entropies, given as little-endian 32-bit words
    (wpt = 1 word per float32, 2 per float64). Returns (smallest key, largest key)."""
    lo = _MAX
    hi = _ZERO
    for i in range(n):
        if wpt == 1:
            u = np.uint64(ebits[i])
            u = _ZERO if u == _SIGN32 else u  # -0.0 == +0.0
            k = (~u & _LOW32) if u & _SIGN32 else u | _SIGN32  # negatives reversed, below positives
        else:
            u = (np.uint64(ebits[2 * i + 1]) << _S32) | np.uint64(ebits[2 * i])
            u = _ZERO if u == _SIGN64 else u
            k = ~u if u & _SIGN64 else u | _SIGN64
        out[i] = k
        lo = min(lo, k)
        hi = max(hi, k)
    return lo, hi


@jit
def _top_bit(x):
    """Index of the highest set bit of x > 0."""
    b = 0
    s = 32
    while s:
        if x >> np.uint64(s):
            x >>= np.uint64(s)
            b += s
        s >>= 1
    return b


@jit
def _sorted_kth(src, m, k, out):
    """k-th smallest of src[:m] by insertion sort into out (src may be out itself)."""
    for i in range(m):
        v = src[i]
        j = i
        while j > 0 and out[j - 1] > v:
            out[j] = out[j - 1]
            j -= 1
        out[j] = v
    return out[k]


@jit
def kth_smallest(keys, n, k, lo, hi, cand, hist):
    """The k-th smallest (0-based) of keys[:n], all within [lo, hi].

    Most-significant-digit radix selection: each pass histograms the next 8 bits below those that
    lo and hi share (hist holds 4 interleaved histograms of 256 bins, so that equal digits in a
    row do not wait on each other's counts), keeps the candidates of the digit that holds rank k
    (without a branch per candidate) and narrows [lo, hi] to that digit's range, until the range
    is one value or the candidates are few enough to sort."""
    src = keys
    m = n
    while lo != hi:
        if m <= _SMALL:
            return _sorted_kth(src, m, k, cand)
        shift = np.uint64(max(_top_bit(lo ^ hi) + 1 - _DIGIT, 0))
        base = lo >> shift
        nb = np.int64((hi >> shift) - base) + 1
        hist[: 4 * nb] = 0
        for i in range(m):
            hist[4 * np.int64((src[i] >> shift) - base) + (i & 3)] += 1
        d = 0
        while True:
            count = hist[4 * d] + hist[4 * d + 1] + hist[4 * d + 2] + hist[4 * d + 3]
            if count > k:
                break
            k -= count
            d += 1
        want = base + np.uint64(d)
        j = 0
        for i in range(m):
            v = src[i]
            cand[j] = v
            j += (v >> shift) == want
        src = cand
        m = j
        lo = max(lo, want << shift)
        hi = min(hi, ((want + np.uint64(1)) << shift) - np.uint64(1))
    return lo


@jit
def threshold(ebits, wpt, n, quantile, keys, cand, hist):
    """Step 1: tau (as a key) of a response of n >= 1 tokens; leaves the token keys in keys."""
    lo, hi = order_keys(ebits, wpt, n, keys)
    k = min(np.int64(np.rint(quantile * np.float64(n))), n - 1)  # rint: half to even, as round()
    return kth_smallest(keys, n, k, lo, hi, cand, hist)


@jit
def weigh_tokens(keys, n, tau, d, w, cls):
    """Steps 2-3 for a response's n tokens: weight 1 (class HIGH) above tau, the response's default
    d (class DEFAULT) at or below it. Returns the number of high-entropy tokens."""
    one = np.float32(1.0)
    n_high = 0
    for c in range(n):
        high = keys[c] > tau
        w[c] = one if high else d
        cls[c] = HIGH if high else DEFAULT
        n_high += high
    return n_high


@jit
def low_runs(keys, n, tau, edges):
    """The runs of keys < tau (the candidates for step 4's segments), as edges[2i] <= c <
    edges[2i + 1]; returns the number of boundaries (twice the runs)."""
    ne = 0
    prev = False
    for c in range(n):
        low = keys[c] < tau
        edges[ne] = c  # no branch per token: the slot is kept only where a run starts or ends
        ne += low != prev
        prev = low
    edges[ne] = n
    return ne + prev


@jit
def add_segments(edges, ne, mu, start, resp, table, nseg, ntok):
    """Step 4: append the runs of edges[:ne] at least mu long (the segments) to the group's segment
    table, for response `resp` of the group, whose first token is at flat index `start`. nseg
    segments of ntok tokens are there already; returns the new (nseg, ntok)."""
    for e in range(0, ne, 2):
        a, z = edges[e], edges[e + 1]
        if z - a >= mu:
            table[SEG_RESP, nseg] = resp
            table[SEG_START, nseg] = start + a
            table[SEG_POS, nseg] = a
            table[SEG_LEN, nseg] = z - a
            ntok += z - a
            nseg += 1
    return nseg, ntok
