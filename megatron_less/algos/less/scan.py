"""Step 5, second part: where keys occur. At every position of every host (the first copy of a
distinct segment), the longest key occurring there.

Every key occurring at a position is a prefix of the longest one there, so only that one is
recorded (the others follow from the prefix links of keys.py). A window whose first mu tokens hash
to no key head is passed over after one bitmap test; at a hit, the keys of that head are tried from
the longest that fits down: a full-length hash drops wrong ones in O(1), and the first that
matches is confirmed token by token. In periodic text (repetition loops) a key occurs at p and
again at p + d < p + |K|: those occurrences share all but d tokens, so once K's period d is checked
each next one costs d comparisons ("chaining").
"""

from __future__ import annotations

from .common import (
    KEY_HOST,
    KEY_LAST_HOST,
    KEY_LAST_POS,
    KEY_LEN,
    KEY_PERIOD,
    KEY_PERIOD_OK,
    OCC_HOST,
    OCC_KEY,
    OCC_POS,
    SEG_KEY,
    SEG_LEN,
    SEG_POS,
    SEG_RESP,
    SEG_START,
    bitmap_test,
    equal_tokens,
    jit,
    jit_inline,
    slot_of,
    table_bits,
)


@jit_inline
def _candidates(pre, scale, ln, mu, bitmap, bits, hits):
    """Offsets j > 0 of a host of ln tokens (its prefix hashes pre, window scales scale) whose
    window of mu tokens hashes to a bit set in the head bitmap, into hits; returns how many (no
    branch per offset)."""
    n = ln - mu
    start, end, scale = pre[1 : 1 + n], pre[1 + mu : 1 + mu + n], scale[1 : 1 + n]
    nh = 0
    for i in range(n):  # offset j = i + 1
        hits[nh] = i + 1
        nh += bitmap_test(bitmap, (end[i] - start[i]) * scale[i], bits)
    return nh


@jit_inline
def _head_keys(h_hash, h_first, h_count, head, bits):
    """(lo, hi): h_keys[lo:hi] are the keys whose head hash is `head` (lo == hi: none)."""
    mask = (1 << bits) - 1
    slot = slot_of(head, bits)
    while h_count[slot] > 0 and h_hash[slot] != head:
        slot = (slot + 1) & mask
    return h_first[slot], h_first[slot] + h_count[slot]


@jit_inline
def _fitting(key, h_keys, lo, hi, room):
    """End of the keys in h_keys[lo:hi] (sorted by length) at most `room` long."""
    while lo < hi:
        mid = (lo + hi) >> 1
        if key[KEY_LEN, h_keys[mid]] <= room:
            lo = mid + 1
        else:
            hi = mid
    return lo


@jit_inline
def _occurs(tok, key, k, kf, f, j, s):
    """Whether key k (first token at kf; its hash matched) occurs at offset j of host s (first
    token at f), confirmed token by token."""
    kl = key[KEY_LEN, k]
    d = j - key[KEY_LAST_POS, k]
    if key[KEY_LAST_HOST, k] == s and d < kl:
        # Chained: K occurs at j - d (confirmed) with d < |K|, so K occurs at j iff K has period
        # d and the d tokens after that occurrence continue it.
        if key[KEY_PERIOD, k] != d:
            key[KEY_PERIOD, k] = d
            key[KEY_PERIOD_OK, k] = equal_tokens(tok, kf + d, kf, kl - d)
        return key[KEY_PERIOD_OK, k] != 0 and equal_tokens(tok, f + j + kl - d, kf + kl - d, d)
    return equal_tokens(tok, f + j, kf, kl)


@jit_inline
def _record(key, occ, n_occ, k, s, j):
    """Key k is the longest match at offset j of host s."""
    key[KEY_LAST_HOST, k] = s
    key[KEY_LAST_POS, k] = j
    occ[OCC_KEY, n_occ] = k
    occ[OCC_HOST, n_occ] = s
    occ[OCC_POS, n_occ] = j
    return n_occ + 1


@jit
def longest_matches(tok, pw, mu, segs, nseg, keys, nk, heads, matches):
    """Every host's longest matches, as matches.occ[:, :n] in (host, offset) order; returns n.

    At offset 0 that is the host's own key (a key as long as the host and equal to it is it)."""
    seg, prefix, key, key_hash = segs.table, segs.prefix, keys.table, keys.hash
    h_hash, h_first, h_count, h_keys, bitmap = heads.hash, heads.first, heads.count, heads.keys, heads.bitmap
    hits, occ = matches.hits, matches.occ
    for k in range(nk):
        key[KEY_LAST_HOST, k] = -1
        key[KEY_PERIOD, k] = -1
    bits = table_bits(nk)  # as index_heads
    n_occ = 0
    for s in range(nseg):
        own = seg[SEG_KEY, s]
        if key[KEY_HOST, own] != s:
            continue  # a copy: its host is scanned
        ln, f, pos = seg[SEG_LEN, s], seg[SEG_START, s], seg[SEG_POS, s]
        pre, scale = prefix[seg[SEG_RESP, s], pos : pos + ln + 1], pw[pos : pos + ln + 1]
        n_occ = _record(key, occ, n_occ, own, s, 0)
        for q in range(_candidates(pre, scale, ln, mu, bitmap, bits, hits)):
            j = hits[q]
            pj = scale[j]
            hj = pre[j]
            first, end = _head_keys(h_hash, h_first, h_count, (pre[j + mu] - hj) * pj, bits)
            for i in range(_fitting(key, h_keys, first, end, ln - j) - 1, first - 1, -1):
                k = h_keys[i]
                if (pre[j + key[KEY_LEN, k]] - hj) * pj != key_hash[k]:
                    continue  # the longest match is the first key whose hash matches and that occurs
                if _occurs(tok, key, k, seg[SEG_START, key[KEY_HOST, k]], f, j, s):
                    n_occ = _record(key, occ, n_occ, k, s, j)
                    break
    return n_occ
