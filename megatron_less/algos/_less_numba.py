"""Compiled LESS (numba): the whole rule of less-spec.md in one pass over the batch, group by group.

`less_kernel` is what less.py calls when numba is importable; the numpy implementation (less.py,
span_match.py) stays as the fallback, and the tests run both against the brute-force oracle.

Per group (its rows gathered by a counting sort of the group ids, so its data stays in cache):
  1. per response: tau by radix selection on order-preserving integer keys of the entropies (the
     key order is the float order, -0.0 folded onto +0.0, so every comparison is exact), default
     and high weights, and the segments (maximal runs with H < tau, length >= mu);
  2. polynomial prefix hashes (mod 2**64) of every segment, so any window's hash is O(1);
  3. identical segments merged into distinct keys (hash table on (full hash, length), equality
     confirmed token by token); the first copy of each is its host, and what holds in a host
     holds in every copy, so copies are never scanned;
  4. every mu-token window of every host tested against a bitmap of key heads, then the head
     table, which lists the keys of each head by increasing length. All keys occurring at one
     position are prefixes of the longest one there, so only that one is looked for: from the
     longest key that fits (binary search) down, a full-length hash drops wrong keys in O(1) and
     the first that matches is confirmed token by token (runs of overlapping occurrences in
     periodic text are chained: K at p and at p + d < p + |K| share all but d tokens, so K's
     period d is checked once and d tokens per step) and recorded; the others follow from
     prefix links between keys, each confirmed token by token once. Hashes only propose: no
     weight depends on a hash value;
  5. carriers as bit sets over the group's responses (a host's copies' rows, OR-ed into every key
     found in it), cluster kinds and weights;
  6. one sweep per host over its longest matches (already in position order) gives each token its
     covering clusters' verdict (0 if any shared, else the largest weight), written into every
     copy of the host.

Cost: about linear in the batch (a position costs a bitmap test; a head hit a binary search and
usually one hash check; repetition loops cut into fragments stay near linear through the
chaining). Scratch memory is sized by the largest group and allocated per call.
"""

from __future__ import annotations

import numpy as np
from numba import njit


def _jit(fn):
    """njit with an on-disk cache when numba finds a writable cache directory (NUMBA_CACHE_DIR,
    the package's __pycache__ or a user-wide one); without one it compiles in every process.
    The kernels release the GIL (other Python threads run meanwhile)."""
    try:
        return njit(cache=True, nogil=True, error_model="numpy")(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return njit(nogil=True, error_model="numpy")(fn)


_SIGN32 = np.uint64(0x80000000)
_LOW32 = np.uint64(0xFFFFFFFF)
_SIGN64 = np.uint64(0x8000000000000000)
_M2 = np.uint64(0x94D049BB133111EB)
_SALT = np.uint64(0xD6E8FEB86659FD93)
_ZERO = np.uint64(0)
_ONE = np.uint64(1)
_S32 = np.uint64(32)
_B1 = np.uint64(0x5555555555555555)
_B2 = np.uint64(0x3333333333333333)
_B4 = np.uint64(0x0F0F0F0F0F0F0F0F)
_H01 = np.uint64(0x0101010101010101)
_DIGIT = 11  # bits per radix-selection pass
_BITMAP_EXTRA = 4  # the head bitmap has 16 bits per head-table slot
_S6 = np.uint64(6)
_LOW6 = np.uint64(63)


@_jit
def _key(ebits, i, wpt):
    """Order-preserving unsigned key of entropy i (float32: one uint32 word, float64: two)."""
    if wpt == 1:
        u = np.uint64(ebits[i])
        if u == _SIGN32:
            u = _ZERO
        if u & _SIGN32:
            return (~u) & _LOW32
        return u | _SIGN32
    u = (np.uint64(ebits[2 * i + 1]) << _S32) | np.uint64(ebits[2 * i])
    if u == _SIGN64:
        u = _ZERO
    if u & _SIGN64:
        return ~u
    return u | _SIGN64


@_jit
def _select(kb, n, k, cb, hist, nbits):
    """k-th smallest (0-based) of kb[:n] by most-significant-digit radix selection, up to 11 bits a pass,
    keeping the candidates of the digit that holds rank k; a few candidates are sorted instead."""
    src = kb
    m = n
    shift = nbits
    while shift > 0:
        if m <= 64:
            for i in range(m):  # insertion sort of the last candidates
                v = src[i]
                j = i
                while j > 0 and cb[j - 1] > v:
                    cb[j] = cb[j - 1]
                    j -= 1
                cb[j] = v
            return cb[k]
        w = min(_DIGIT if m > 2048 else 6, shift)  # fewer bins once few candidates are left
        shift -= w
        sh = np.uint64(shift)
        mask = np.uint64((1 << w) - 1)
        nb = 1 << w
        hist[:nb] = 0
        for i in range(m):
            hist[(src[i] >> sh) & mask] += 1
        if 2 * k < m:  # find the digit from the nearer end
            b = 0
            while hist[b] <= k:
                k -= hist[b]
                b += 1
        else:
            kr = m - 1 - k
            b = nb - 1
            while hist[b] <= kr:
                kr -= hist[b]
                b -= 1
            k = hist[b] - 1 - kr
        if hist[b] == m:
            continue
        ub = np.uint64(b)
        j = 0
        for i in range(m):
            v = src[i]
            if ((v >> sh) & mask) == ub:
                cb[j] = v
                j += 1
        src = cb
        m = j
    return src[0]


@_jit
def _equal(tok, a, b, n):
    if a == b:
        return True
    for i in range(n):
        if tok[a + i] != tok[b + i]:
            return False
    return True


@_jit
def _popcount(x):
    x = x - ((x >> _ONE) & _B1)
    x = (x & _B2) + ((x >> np.uint64(2)) & _B2)
    x = (x + (x >> np.uint64(4))) & _B4
    return np.int64((x * _H01) >> np.uint64(56))


@_jit
def _table_bits(n):
    bits = 4
    while (1 << bits) < 2 * n:
        bits += 1
    return bits


# Fields of the per-group tables seg[s, field] (segments) and key[k, field] (distinct segments).
S_ROW, S_FLAT, S_LEN, S_TOFF, S_KEY = range(5)
K_SEG, K_LEN, K_HPOS, K_PAR, K_LSEG, K_LPOS, K_PERD, K_PEROK = range(8)
K_CP0, K_CP1, K_STAMP, K_KIND, K_SHLEN, K_WTOP, K_WNEXT, K_SLOT = range(8, 16)
N_KEY_FIELDS = 16
# K_SEG: the host (first copy); K_HPOS: index in hkeys (keys by head, then length); K_PAR: the
# longest key that is a proper prefix of this one (-1 if none); K_LSEG, K_LPOS: last confirmed
# occurrence as a longest match; K_PERD, K_PEROK: last period tested and its outcome; copies of the
# key are copies[K_CP0:K_CP1]; K_STAMP: last host whose carriers were added; K_KIND: 0 no cluster,
# 1 correct-only, 2 incorrect-only, 3 shared; K_SHLEN: length of the longest shared cluster among
# the key and its prefixes (0 if none); K_WTOP, K_WNEXT: the weighted clusters among the key and
# its prefixes that can decide a token (longest first, each of a larger weight than the longer
# ones): K_WTOP the first, K_WNEXT the one after this one (-1 ends); K_SLOT: head-table slot.


@_jit
def _response(ebits, wpt, o, ln, r, mu, quantile, d, kb, cb, hist, edges, weights, seg, nseg, ntok):
    """Steps 1-4 for one response (flat offset o, length ln >= 1): weights of its valid tokens and
    its segments appended to seg. Returns (nseg, ntok, high-entropy tokens)."""
    er = ebits[o * wpt : (o + ln) * wpt]
    for c in range(ln):
        kb[c] = _key(er, c, wpt)
    k = min(np.int64(np.rint(quantile * np.float64(ln))), ln - 1)
    tau = _select(kb, ln, k, cb, hist, 32 * wpt)
    one = np.float32(1.0)
    nh = 0
    # Weights, and the boundaries of the runs of H < tau, without branches.
    wr = weights[o : o + ln]
    for c in range(ln):
        high = kb[c] > tau
        wr[c] = one if high else d
        nh += high
    prev = False
    nt = 0
    for c in range(ln):
        low = kb[c] < tau
        edges[nt] = c
        nt += low != prev
        prev = low
    edges[nt] = ln
    nt += prev
    for e in range(0, nt, 2):
        a, z = edges[e], edges[e + 1]
        if z - a >= mu:
            seg[nseg, S_ROW] = r
            seg[nseg, S_FLAT] = o + a
            seg[nseg, S_LEN] = z - a
            seg[nseg, S_TOFF] = ntok
            ntok += z - a
            nseg += 1
    return nseg, ntok, nh


@_jit
def _keys(
    tok,
    inv,
    mu,
    seg,
    nseg,
    hp,
    tbits,
    dtab,
    h_hash,
    h_first,
    h_cnt,
    hkeys,
    bitmap,
    key,
    key_full,
    len_cnt,
    by_len,
):
    """Prefix hashes of the segments (segment s's at hp[toff + s:], hp[i] = sum of x_j * BASE**-j
    over its first i tokens, so the window at j of length L hashes to (hp[j + L] - hp[j]) * BASE**j
    wherever it sits), distinct keys (equal segments merged after a token-by-token check; the first
    copy is the host), the head table and bitmap (keys by the hash of their first mu tokens) and
    the prefix links. Returns the number of keys."""
    for s in range(nseg):
        p = seg[s, S_TOFF] + s
        f = seg[s, S_FLAT]
        ln = seg[s, S_LEN]
        ts = tok[f : f + ln]
        hs = hp[p + 1 : p + 1 + ln]
        hp[p] = _ZERO
        h = _ZERO
        for j in range(ln):
            h += np.uint64(ts[j]) * inv[j]
            hs[j] = h
    tmask = (1 << tbits) - 1
    tshift = np.uint64(64 - tbits)
    dtab[: 1 << tbits] = -1
    h_cnt[: 1 << tbits] = 0
    nk = 0
    for s in range(nseg):
        ln = seg[s, S_LEN]
        full = hp[seg[s, S_TOFF] + s + ln]
        slot = np.int64(((full ^ (np.uint64(ln) * _SALT)) * _M2) >> tshift)
        while True:
            kk = dtab[slot]
            if kk < 0:
                dtab[slot] = nk
                key[nk, K_SEG] = s
                key[nk, K_LEN] = ln
                key_full[nk] = full
                seg[s, S_KEY] = nk
                nk += 1
                break
            if (
                key[kk, K_LEN] == ln
                and key_full[kk] == full
                and _equal(tok, seg[key[kk, K_SEG], S_FLAT], seg[s, S_FLAT], ln)
            ):
                seg[s, S_KEY] = kk
                break
            slot = (slot + 1) & tmask
    # Keys by length (counting sort), then the head table: the keys of each head hash lie in
    # hkeys[h_first[slot]:h_first[slot] + h_cnt[slot]] by increasing length.
    max_len = 0
    for kk in range(nk):
        max_len = max(max_len, key[kk, K_LEN])
    len_cnt[: max_len + 2] = 0
    for kk in range(nk):
        len_cnt[key[kk, K_LEN] + 1] += 1
    for i in range(max_len + 1):
        len_cnt[i + 1] += len_cnt[i]  # keys shorter than i + 1
    for kk in range(nk):
        by_len[len_cnt[key[kk, K_LEN]]] = kk
        len_cnt[key[kk, K_LEN]] += 1
    bshift = np.uint64(64 - tbits - _BITMAP_EXTRA)
    bitmap[: 1 << max(tbits + _BITMAP_EXTRA - 6, 0)] = 0
    for kk in range(nk):
        p = seg[key[kk, K_SEG], S_TOFF] + key[kk, K_SEG]
        head = hp[p + mu] - hp[p]
        bit = (head * _M2) >> bshift
        bitmap[bit >> _S6] |= _ONE << (bit & _LOW6)
        slot = np.int64((head * _M2) >> tshift)
        while h_cnt[slot] > 0 and h_hash[slot] != head:
            slot = (slot + 1) & tmask
        h_hash[slot] = head
        h_cnt[slot] += 1
        key[kk, K_SLOT] = slot
    at = 0
    for i in range(1 << tbits):
        h_first[i] = at
        at += h_cnt[i]
        h_cnt[i] = 0
    for ii in range(nk):
        kk = by_len[ii]
        slot = key[kk, K_SLOT]
        hkeys[h_first[slot] + h_cnt[slot]] = kk
        key[kk, K_HPOS] = h_first[slot] + h_cnt[slot]
        h_cnt[slot] += 1
    # Prefix links: every key that occurs at a position is a prefix of the longest one that does,
    # so the scan keeps only the longest and the links give the rest. A proper prefix of a key
    # shares its head, so it is one of the shorter keys of its head; the longest of those whose
    # hash matches and whose tokens are equal.
    for kk in range(nk):
        key[kk, K_PAR] = -1
        kl = key[kk, K_LEN]
        hk = key[kk, K_SEG]
        p = seg[hk, S_TOFF] + hk
        for i in range(key[kk, K_HPOS] - 1, h_first[key[kk, K_SLOT]] - 1, -1):
            c = hkeys[i]
            cl = key[c, K_LEN]
            if (
                cl < kl
                and hp[p + cl] - hp[p] == key_full[c]
                and _equal(tok, seg[key[c, K_SEG], S_FLAT], seg[hk, S_FLAT], cl)
            ):
                key[kk, K_PAR] = c
                break
    return nk


@_jit
def _scan(
    tok, mu, seg, nseg, nk, hp, pw, tbits, h_hash, h_first, h_cnt, hkeys, bitmap, hits, key, key_full, occ
):
    """Step 5's search for one group: at every position of every host (the first copy of each
    distinct segment: what holds there holds in every copy), the longest key occurring there,
    confirmed token by token, as occ[:, i] = (key, host, offset) in (host, offset) order; the keys
    that are its prefixes occur there too (prefix links). Returns the number of occurrences; only
    the first occ.shape[1] are stored (the caller retries with more room)."""
    cap = occ.shape[1]
    for kk in range(nk):
        key[kk, K_LSEG] = -1
        key[kk, K_LPOS] = 0
        key[kk, K_PERD] = -1
        key[kk, K_PEROK] = 0
    tmask = (1 << tbits) - 1
    tshift = np.uint64(64 - tbits)
    bshift = np.uint64(64 - tbits - _BITMAP_EXTRA)
    n_occ = 0
    for s in range(nseg):
        own = seg[s, S_KEY]
        if key[own, K_SEG] != s:
            continue  # a copy: its host is scanned
        ln = seg[s, S_LEN]
        p = seg[s, S_TOFF] + s
        f = seg[s, S_FLAT]
        hs = hp[p : p + ln + 1]
        hm = hp[p + mu : p + ln + 1]
        # Positions whose head hash is in the bitmap (no branch per position), then those only.
        nh = 0
        for j in range(ln - mu + 1):
            bit = (((hm[j] - hs[j]) * pw[j]) * _M2) >> bshift
            hits[nh] = j
            nh += (bitmap[bit >> _S6] >> (bit & _LOW6)) & _ONE
        for q in range(nh):
            j = hits[q]
            pj = pw[j]
            hj = hs[j]
            gh = (hm[j] - hj) * pj
            slot = np.int64((gh * _M2) >> tshift)
            while h_cnt[slot] > 0 and h_hash[slot] != gh:
                slot = (slot + 1) & tmask
            if h_cnt[slot] == 0:
                continue  # a false positive of the bitmap
            # The longest key of this head that fits (binary search on length), then shorter ones
            # until one whose hash matches really occurs: the longest match.
            room = ln - j
            lo = h_first[slot]
            hi = lo + h_cnt[slot]  # keys lo..hi-1; find the last one not longer than room
            while lo < hi:
                mid = (lo + hi) >> 1
                if key[hkeys[mid], K_LEN] <= room:
                    lo = mid + 1
                else:
                    hi = mid
            for idx in range(lo - 1, h_first[slot] - 1, -1):
                kk = hkeys[idx]
                kl = key[kk, K_LEN]
                if (hs[j + kl] - hj) * pj != key_full[kk]:
                    continue
                kf = seg[key[kk, K_SEG], S_FLAT]
                if j == 0 and own == kk:
                    ok = True
                elif key[kk, K_LSEG] == s and j - key[kk, K_LPOS] < kl:
                    # Chained: K occurs at j - dd (confirmed) with dd < |K|, so K occurs at j iff K
                    # has period dd and the dd tokens after that occurrence continue K.
                    dd = j - key[kk, K_LPOS]
                    if key[kk, K_PERD] != dd:
                        key[kk, K_PERD] = dd
                        key[kk, K_PEROK] = _equal(tok, kf + dd, kf, kl - dd)
                    ok = key[kk, K_PEROK] != 0 and _equal(tok, f + j + kl - dd, kf + kl - dd, dd)
                else:
                    ok = _equal(tok, f + j, kf, kl)
                if ok:
                    key[kk, K_LSEG] = s
                    key[kk, K_LPOS] = j
                    if n_occ < cap:
                        occ[0, n_occ] = kk
                        occ[1, n_occ] = s
                        occ[2, n_occ] = j
                    n_occ += 1
                    break
    return n_occ


@_jit
def _clusters(
    nc, nw, words, local, cmask, seg, nseg, nk, key, by_len, occ, n_occ, copies, hmask, kmask, kw, glob
):
    """Step 5 for one group: each key's copies, carriers (the responses holding a copy of a host
    where the key occurs, itself or as a prefix of a longest match: bit sets of `words` words over
    the group's responses, local[r] = bit of row r, cmask = the correct ones), cluster kind and
    weight, and what step 6 needs along the prefix links. Returns the number of clusters."""
    # Copies of each key, host first: copies[K_CP0:K_CP1] (counting sort of the segments by key).
    for kk in range(nk):
        key[kk, K_CP0] = 0
        key[kk, K_STAMP] = -1
    for s in range(nseg):
        key[seg[s, S_KEY], K_CP0] += 1
    at = 0
    for kk in range(nk):
        c = key[kk, K_CP0]
        key[kk, K_CP0] = at
        key[kk, K_CP1] = at
        at += c
    hmask[:nk, :words] = 0
    for s in range(nseg):
        kk = seg[s, S_KEY]
        copies[key[kk, K_CP1]] = s
        key[kk, K_CP1] += 1
        bit = local[seg[s, S_ROW]]
        hmask[kk, bit >> 6] |= _ONE << np.uint64(bit & 63)
    kmask[:nk, :words] = 0
    for i in range(n_occ):
        h = occ[1, i]
        hk = seg[h, S_KEY]
        kk = occ[0, i]
        while kk >= 0 and key[kk, K_STAMP] != h:  # the match and its prefixes, once per host
            key[kk, K_STAMP] = h
            for w in range(words):
                kmask[kk, w] |= hmask[hk, w]
            kk = key[kk, K_PAR]
    n_cl = 0
    for kk in range(nk):
        c = 0
        cc = 0
        for w in range(words):
            c += _popcount(kmask[kk, w])
            cc += _popcount(kmask[kk, w] & cmask[w])
        kind = 0 if c < 2 else 1 if cc == c else 2 if cc == 0 else 3
        key[kk, K_KIND] = kind
        kw[kk] = np.float32(c / nc) if kind == 1 else np.float32(c / nw) if kind == 2 else np.float32(0.0)
        if kind:
            n_cl += 1
            glob[kind] += 1
    # Along the prefix links, shortest keys first (a parent is shorter than its child).
    for ii in range(nk):
        kk = by_len[ii]
        par = key[kk, K_PAR]
        kind = key[kk, K_KIND]
        if kind == 3:
            key[kk, K_SHLEN] = key[kk, K_LEN]
        else:
            key[kk, K_SHLEN] = key[par, K_SHLEN] if par >= 0 else 0
        up = key[par, K_WTOP] if par >= 0 else -1
        if kind == 1 or kind == 2:
            while up >= 0 and kw[up] <= kw[kk]:
                up = key[up, K_WNEXT]
            key[kk, K_WNEXT] = up
            key[kk, K_WTOP] = kk
        else:
            key[kk, K_WTOP] = up
    return n_cl


@_jit
def _paint(seg, key, occ, n_occ, copies, kw, aw, ae, cflat, weights, row_i, row_w):
    """Step 6 for one group, host by host (longest matches come sorted by (host, offset) from the
    scan), each result written into every copy of the host. A longest match L at j stands for
    every key that is a prefix of it: its shared reach is j + K_SHLEN(L), its weighted reaches the
    K_WTOP/K_WNEXT list. A host reached by shared clusters only gets the union of their spans
    zeroed; otherwise one sweep over its tokens gives each token its verdict: 0 if a shared span
    reaches it, else the largest weight among the weighted spans reaching it (a short list of
    (weight, end) pairs, none dominated by another)."""
    zero = np.float32(0.0)
    i = 0
    while i < n_occ:
        h = occ[1, i]
        i2 = i
        weighted = False
        while i2 < n_occ and occ[1, i2] == h:
            weighted |= key[occ[0, i2], K_WTOP] >= 0
            i2 += 1
        hk = seg[h, S_KEY]
        ncp = key[hk, K_CP1] - key[hk, K_CP0]
        for ci in range(ncp):
            cflat[ci] = seg[copies[key[hk, K_CP0] + ci], S_FLAT]
        n_cov = 0
        n_sh = 0
        w_cov = 0.0
        if not weighted:
            cs = 0
            ce = 0
            for ii in range(i, i2 + 1):
                if ii < i2:
                    sl = key[occ[0, ii], K_SHLEN]
                    if sl == 0:
                        continue
                    a = occ[2, ii]
                    if a <= ce:
                        ce = max(ce, a + sl)
                        continue
                else:
                    a = -1
                if ce > cs:
                    for ci in range(ncp):
                        weights[cflat[ci] + cs : cflat[ci] + ce] = zero
                    n_sh += ce - cs
                if a >= 0:
                    cs = a
                    ce = a + sl
            n_cov = n_sh
        else:
            end_sh = 0
            na = 0
            ii = i
            pos = occ[2, i]
            while True:
                while ii < i2 and occ[2, ii] == pos:
                    kk = occ[0, ii]
                    end_sh = max(end_sh, pos + key[kk, K_SHLEN])
                    a_k = key[kk, K_WTOP]
                    while a_k >= 0:
                        w = kw[a_k]
                        e = pos + key[a_k, K_LEN]
                        dominated = False
                        for q in range(na):
                            if aw[q] >= w and ae[q] >= e:
                                dominated = True
                                break
                        if not dominated:
                            m = 0
                            for q in range(na):
                                if aw[q] > w or ae[q] > e:
                                    aw[m] = aw[q]
                                    ae[m] = ae[q]
                                    m += 1
                            aw[m] = w
                            ae[m] = e
                            na = m + 1
                        a_k = key[a_k, K_WNEXT]
                    ii += 1
                # Token pos of the host.
                m = 0
                best = np.float32(-1.0)
                for q in range(na):
                    if ae[q] > pos:
                        aw[m] = aw[q]
                        ae[m] = ae[q]
                        m += 1
                        best = max(best, aw[q])
                na = m
                if end_sh > pos:
                    n_cov += 1
                    n_sh += 1
                    for ci in range(ncp):
                        weights[cflat[ci] + pos] = zero
                elif na:
                    n_cov += 1
                    w_cov += best
                    for ci in range(ncp):
                        weights[cflat[ci] + pos] = best
                pos += 1
                if end_sh <= pos and na == 0:  # nothing reaches further: on to the next start
                    if ii == i2:
                        break
                    pos = occ[2, ii]
        for ci in range(key[hk, K_CP0], key[hk, K_CP1]):
            r = seg[copies[ci], S_ROW]
            row_i[r, 2] += n_cov
            row_i[r, 3] += n_sh
            row_w[r] += w_cov
        i = i2


@_jit
def less_kernel(
    tok,
    ebits,
    wpt,
    mask,
    corr,
    gid,
    n_groups,
    mu,
    quantile,
    base,
    base_inv,
    occ_room,
    weights,
    row_i,
    row_w,
    glob,
):
    """LESS weights of a [B, T] batch (flat arrays), written into weights (float32, B*T).

    tok int64, ebits uint32 (wpt words per entropy: 1 float32, 2 float64), mask uint8 (0/1), corr
    bool, gid int64 dense group ids < n_groups; base, base_inv: the hash base (odd) and its inverse
    mod 2**64; occ_room: room first made for occurrences, per segment token. Per-row diagnostics:
    row_i[r] = (length, high-entropy tokens, covered tokens, shared ones), row_w[r] = sum of the
    covered tokens' weights; glob = (segment tokens, clusters correct-only, incorrect-only, shared).
    Returns 0, or 1 if the mask is not left-aligned.
    """
    b = corr.size
    t_len = mask.size // b if b else 0
    # Lengths, and the left-alignment check: the row's count of valid tokens must all come first.
    for r in range(b):
        row = mask[r * t_len : (r + 1) * t_len]
        ln = 0
        for c in range(t_len):
            ln += row[c]
        first = 0
        for c in range(ln):
            first += row[c]
        if first != ln:
            return 1
        row_i[r, 0] = ln
        row_i[r, 1] = 0
        row_i[r, 2] = 0
        row_i[r, 3] = 0
        row_w[r] = 0.0
    glob[:] = 0
    # Rows of each group (counting sort, rows ascending within a group).
    g_cnt = np.zeros(n_groups + 1, np.int64)
    n_c = np.zeros(n_groups, np.int64)
    for r in range(b):
        g_cnt[gid[r] + 1] += 1
        n_c[gid[r]] += corr[r]
    for g in range(n_groups):
        g_cnt[g + 1] += g_cnt[g]
    g_rows = np.empty(b, np.int64)
    local = np.empty(b, np.int64)  # a row's index inside its group
    fill = g_cnt[:n_groups].copy()
    for r in range(b):
        g_rows[fill[gid[r]]] = r
        local[r] = fill[gid[r]] - g_cnt[gid[r]]
        fill[gid[r]] += 1
    # Scratch: per response, and per group (grown to the largest group met, so that a small
    # batch touches little memory).
    max_rows = 1
    for g in range(n_groups):
        max_rows = max(max_rows, g_cnt[g + 1] - g_cnt[g])
    max_words = (max_rows + 63) // 64
    kb = np.empty(t_len + 1, np.uint64)
    cb = np.empty(t_len + 1, np.uint64)
    hist = np.zeros(1 << _DIGIT, np.int64)
    edges = np.empty(t_len + 2, np.int64)
    hits = np.empty(t_len + 1, np.int64)
    len_cnt = np.empty(t_len + 2, np.int64)
    pw = np.empty(t_len + 1, np.uint64)  # BASE**i and BASE**-i
    inv = np.empty(t_len + 1, np.uint64)
    pw[0] = _ONE
    inv[0] = _ONE
    for i in range(1, t_len + 1):
        pw[i] = pw[i - 1] * base
        inv[i] = inv[i - 1] * base_inv
    cmask = np.empty(max_words, np.uint64)
    aw = np.empty(max_rows + 1, np.float32)
    ae = np.empty(max_rows + 1, np.int64)
    seg = np.empty((1, 5), np.int64)
    hp = np.empty(1, np.uint64)
    occ = np.empty((3, 1), np.int64)
    cap = 0  # keys (and segments) the per-key arrays hold
    key = np.empty((cap, N_KEY_FIELDS), np.int64)
    key_full = np.empty(cap, np.uint64)
    kw = np.empty(cap, np.float32)
    by_len = np.empty(cap, np.int64)
    hkeys = np.empty(cap, np.int64)
    copies = np.empty(cap, np.int64)
    cflat = np.empty(cap, np.int64)
    hmask = np.empty((cap, max_words), np.uint64)
    kmask = np.empty((cap, max_words), np.uint64)
    tcap = 0  # head / dedup table slots
    dtab = np.empty(tcap, np.int64)
    h_hash = np.empty(tcap, np.uint64)
    h_first = np.empty(tcap, np.int64)
    h_cnt = np.empty(tcap, np.int64)
    bitmap = np.empty(1, np.uint64)
    one = np.float32(1.0)
    zero = np.float32(0.0)

    for g in range(n_groups):
        r0, r1 = g_cnt[g], g_cnt[g + 1]
        nc = n_c[g]
        nw = (r1 - r0) - nc
        shaped = nc > 0 and nw > 0  # step 8: other groups keep w = 1
        inv_c = np.float32(1.0 / nc) if nc else one
        inv_w = np.float32(1.0 / nw) if nw else one
        if shaped:
            bound = 1  # segments: each takes mu tokens and one more that ends it (or the row end)
            for i in range(r0, r1):
                bound += (row_i[g_rows[i], 0] + 1) // (mu + 1)
            if seg.shape[0] < bound:
                seg = np.empty((2 * bound, 5), np.int64)
        nseg = 0
        ntok = 0
        for i in range(r0, r1):
            r = g_rows[i]
            o = r * t_len
            ln = row_i[r, 0]
            weights[o + ln : o + t_len] = zero
            if not shaped:
                weights[o : o + ln] = one
            elif ln:
                d = inv_c if corr[r] else inv_w
                nseg, ntok, row_i[r, 1] = _response(
                    ebits, wpt, o, ln, r, mu, quantile, d, kb, cb, hist, edges, weights, seg, nseg, ntok
                )
        glob[0] += ntok
        if nseg == 0:
            continue
        if hp.size < ntok + nseg:
            hp = np.empty(2 * (ntok + nseg), np.uint64)
        if cap < nseg:
            cap = 2 * nseg
            key = np.empty((cap, N_KEY_FIELDS), np.int64)
            key_full = np.empty(cap, np.uint64)
            kw = np.empty(cap, np.float32)
            by_len = np.empty(cap, np.int64)
            hkeys = np.empty(cap, np.int64)
            copies = np.empty(cap, np.int64)
            cflat = np.empty(cap, np.int64)
            hmask = np.empty((cap, max_words), np.uint64)
            kmask = np.empty((cap, max_words), np.uint64)
        tbits = _table_bits(nseg)
        if tcap < 1 << tbits:
            tcap = 1 << tbits
            dtab = np.empty(tcap, np.int64)
            h_hash = np.empty(tcap, np.uint64)
            h_first = np.empty(tcap, np.int64)
            h_cnt = np.empty(tcap, np.int64)
            bitmap = np.empty(1 << max(tbits + _BITMAP_EXTRA - 6, 0), np.uint64)
        if occ.shape[1] < occ_room * ntok + 1:  # longest matches: at most one per host position
            occ = np.empty((3, 2 * (occ_room * ntok + 1)), np.int64)
        nk = _keys(
            tok,
            inv,
            mu,
            seg,
            nseg,
            hp,
            tbits,
            dtab,
            h_hash,
            h_first,
            h_cnt,
            hkeys,
            bitmap,
            key,
            key_full,
            len_cnt,
            by_len,
        )
        while True:
            n_occ = _scan(
                tok,
                mu,
                seg,
                nseg,
                nk,
                hp,
                pw,
                tbits,
                h_hash,
                h_first,
                h_cnt,
                hkeys,
                bitmap,
                hits,
                key,
                key_full,
                occ,
            )
            if n_occ <= occ.shape[1]:
                break
            occ = np.empty((3, 2 * n_occ), np.int64)  # more occurrences than room: scan again
        words = (r1 - r0 + 63) // 64
        cmask[:words] = 0
        for i in range(r0, r1):
            if corr[g_rows[i]]:
                cmask[(i - r0) >> 6] |= _ONE << np.uint64((i - r0) & 63)
        n_cl = _clusters(
            nc,
            nw,
            words,
            local,
            cmask,
            seg,
            nseg,
            nk,
            key,
            by_len,
            occ,
            n_occ,
            copies,
            hmask,
            kmask,
            kw,
            glob,
        )
        if n_cl:
            _paint(seg, key, occ, n_occ, copies, kw, aw, ae, cflat, weights, row_i, row_w)
    return 0
