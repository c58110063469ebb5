"""Step 5, first part: the distinct keys of a group and the index the scan looks them up in.

Hashes are polynomial mod 2**64: the prefix hashes P[c] = sum_{i<c} x_i * BASE**-i of a response
make the hash of any window (P[j + L] - P[j]) * BASE**j, the same wherever the window sits, in
O(1). Hashes only propose: two keys are merged, and a key is a prefix of another, only after their
tokens are compared.

(Here and in the other kernel modules, arrays are taken out of their namedtuples once, at the top
of a function: numba counts a reference each time one is taken out, which costs in a hot loop.)
"""

from __future__ import annotations

import numpy as np

from .common import (
    BITMAP_EXTRA,
    KEY_HEAD_POS,
    KEY_HOST,
    KEY_LEN,
    KEY_PARENT,
    KEY_SLOT,
    SEG_KEY,
    SEG_LEN,
    SEG_POS,
    SEG_RESP,
    SEG_START,
    bitmap_set,
    equal_tokens,
    jit,
    jit_inline,
    slot_of,
    table_bits,
)

_ZERO = np.uint64(0)


@jit
def hash_rows(tok, inv, rows, t, lengths, prefix):
    """Prefix hashes of the group's responses (prefix[i] for response i, batch row rows[i]), in
    one sequential pass over their tokens, which also brings them into cache for what follows."""
    for i in range(rows.size):
        o = rows[i] * t
        n = lengths[rows[i]]
        ts, ps = tok[o : o + n], prefix[i, 1 : n + 1]
        h = _ZERO
        prefix[i, 0] = h
        for c in range(n):
            h += np.uint64(ts[c]) * inv[c]
            ps[c] = h


@jit_inline
def window_hash(prefix, pw, resp, pos, n):
    """Hash of the n tokens at offset pos of response resp."""
    return (prefix[resp, pos + n] - prefix[resp, pos]) * pw[pos]


@jit
def merge_copies(tok, pw, segs, nseg, keys, heads):
    """Distinct keys: segments with equal tokens become one key, whose host is its first copy
    (what is found in a host holds in every copy, so copies are never scanned). Fills SEG_KEY,
    KEY_HOST, KEY_LEN and keys.hash; returns the number of keys."""
    seg, prefix, key, key_hash, slot_key = segs.table, segs.prefix, keys.table, keys.hash, heads.slot_key
    bits = table_bits(nseg)
    mask = (1 << bits) - 1
    slot_key[: 1 << bits] = -1
    nk = 0
    for s in range(nseg):
        f, ln = seg[SEG_START, s], seg[SEG_LEN, s]
        full = window_hash(prefix, pw, seg[SEG_RESP, s], seg[SEG_POS, s], ln)
        slot = slot_of(full ^ np.uint64(ln), bits)
        while True:
            k = slot_key[slot]
            if k < 0:  # a new key
                slot_key[slot] = nk
                key[KEY_HOST, nk] = s
                key[KEY_LEN, nk] = ln
                key_hash[nk] = full
                seg[SEG_KEY, s] = nk
                nk += 1
                break
            if (
                key_hash[k] == full
                and key[KEY_LEN, k] == ln
                and equal_tokens(tok, seg[SEG_START, key[KEY_HOST, k]], f, ln)
            ):
                seg[SEG_KEY, s] = k
                break
            slot = (slot + 1) & mask
    return nk


@jit
def sort_by_length(keys, nk, count):
    """keys.by_len = key ids by increasing length (counting sort; count is scratch of T + 2)."""
    key, by_len = keys.table, keys.by_len
    max_len = 0
    for k in range(nk):
        max_len = max(max_len, key[KEY_LEN, k])
    count[: max_len + 2] = 0
    for k in range(nk):
        count[key[KEY_LEN, k] + 1] += 1
    for i in range(max_len + 1):
        count[i + 1] += count[i]  # keys shorter than i + 1
    for k in range(nk):
        ln = key[KEY_LEN, k]
        by_len[count[ln]] = k
        count[ln] += 1


@jit
def index_heads(pw, segs, keys, nk, heads, mu):
    """The head table: the keys of each head (hash of a key's first mu tokens) in
    heads.keys[first:first + count] by increasing length, and the bitmap of heads the scan tests
    every window against. Needs keys.by_len."""
    seg, prefix, key, by_len = segs.table, segs.prefix, keys.table, keys.by_len
    h_hash, h_first, h_count, h_keys, bitmap = heads.hash, heads.first, heads.count, heads.keys, heads.bitmap
    bits = table_bits(nk)
    mask = (1 << bits) - 1
    size = 1 << bits
    h_count[:size] = 0
    bitmap[: (size << BITMAP_EXTRA) >> 6] = 0
    for k in range(nk):
        host = key[KEY_HOST, k]
        head = window_hash(prefix, pw, seg[SEG_RESP, host], seg[SEG_POS, host], mu)
        bitmap_set(bitmap, head, bits)
        slot = slot_of(head, bits)
        while h_count[slot] > 0 and h_hash[slot] != head:
            slot = (slot + 1) & mask
        h_hash[slot] = head
        h_count[slot] += 1
        key[KEY_SLOT, k] = slot
    at = 0
    for i in range(size):
        h_first[i] = at
        at += h_count[i]
        h_count[i] = 0
    for i in range(nk):  # by increasing length inside each head
        k = by_len[i]
        slot = key[KEY_SLOT, k]
        pos = h_first[slot] + h_count[slot]
        h_keys[pos] = k
        key[KEY_HEAD_POS, k] = pos
        h_count[slot] += 1


@jit
def link_prefixes(tok, pw, segs, keys, nk, heads):
    """KEY_PARENT: the longest key that is a proper prefix of each key (-1 if none).

    The scan records only the longest key occurring at a position; every other key occurring there
    is a prefix of it, reached through these links. A proper prefix shares the key's head (both
    are at least mu long), so it is one of the shorter keys listed before it under that head."""
    seg, prefix, key, key_hash, h_first, h_keys = (
        segs.table,
        segs.prefix,
        keys.table,
        keys.hash,
        heads.first,
        heads.keys,
    )
    for k in range(nk):
        key[KEY_PARENT, k] = -1
        kl = key[KEY_LEN, k]
        host = key[KEY_HOST, k]
        resp, pos = seg[SEG_RESP, host], seg[SEG_POS, host]
        for i in range(key[KEY_HEAD_POS, k] - 1, h_first[key[KEY_SLOT, k]] - 1, -1):
            c = h_keys[i]
            cl = key[KEY_LEN, c]
            if (
                cl < kl
                and window_hash(prefix, pw, resp, pos, cl) == key_hash[c]
                and equal_tokens(tok, seg[SEG_START, key[KEY_HOST, c]], seg[SEG_START, host], cl)
            ):
                key[KEY_PARENT, k] = c
                break
