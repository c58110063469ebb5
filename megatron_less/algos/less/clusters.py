"""Step 5, last part: carriers, cluster kinds and weights, and what step 6 needs of them.

Response sets are bit sets of `words` 64-bit words over the group's responses. A key's carriers
are the responses holding a copy of a host where the key occurs, as a longest match there or as
a prefix of one (reached through the prefix links).
"""

from __future__ import annotations

import numpy as np

from .codes import N_CLUSTERS
from .common import (
    KEY_COPIES,
    KEY_COPIES_END,
    KEY_KIND,
    KEY_LEN,
    KEY_NEXT_WEIGHTED,
    KEY_PARENT,
    KEY_SHARED_LEN,
    KEY_STAMP,
    KEY_TOP_WEIGHTED,
    KIND_CORRECT_ONLY,
    KIND_INCORRECT_ONLY,
    KIND_SHARED,
    NO_CLUSTER,
    OCC_HOST,
    OCC_KEY,
    ONE,
    SEG_KEY,
    SEG_RESP,
    jit,
    popcount,
)


@jit
def group_copies(segs, nseg, keys, nk, words):
    """Each key's copies (keys.copies[KEY_COPIES:KEY_COPIES_END], host first: a counting sort of
    the segments by key) and holders (the responses holding a copy)."""
    seg, key, copies, holders = segs.table, keys.table, keys.copies, keys.holders
    for k in range(nk):
        key[KEY_COPIES, k] = 0
    for s in range(nseg):
        key[KEY_COPIES, seg[SEG_KEY, s]] += 1
    at = 0
    for k in range(nk):
        n = key[KEY_COPIES, k]
        key[KEY_COPIES, k] = at
        key[KEY_COPIES_END, k] = at
        at += n
    holders[:nk, :words] = 0
    for s in range(nseg):
        k = seg[SEG_KEY, s]
        copies[key[KEY_COPIES_END, k]] = s
        key[KEY_COPIES_END, k] += 1
        resp = seg[SEG_RESP, s]
        holders[k, resp >> 6] |= ONE << np.uint64(resp & 63)


@jit
def collect_carriers(segs, keys, nk, occ, n_occ, words):
    """keys.carriers: for every longest match, the holders of its host OR-ed into the matched key
    and each of its prefixes (once per host: KEY_STAMP remembers the last host added)."""
    seg, key, holders, carriers = segs.table, keys.table, keys.holders, keys.carriers
    carriers[:nk, :words] = 0
    for k in range(nk):
        key[KEY_STAMP, k] = -1
    for i in range(n_occ):
        host = occ[OCC_HOST, i]
        hk = seg[SEG_KEY, host]
        k = occ[OCC_KEY, i]
        while k >= 0 and key[KEY_STAMP, k] != host:
            key[KEY_STAMP, k] = host
            for w in range(words):
                carriers[k, w] |= holders[hk, w]
            k = key[KEY_PARENT, k]


@jit
def classify(keys, nk, group, counts):
    """Kind and weight of every key's cluster (spec step 5): none below two carriers, k / N_c if
    every carrier is correct, m / N_w if every one is incorrect, 0 (shared) if mixed. Counts the
    clusters of each kind into counts; returns how many there are."""
    key, weight, carriers = keys.table, keys.weight, keys.carriers
    correct_bits, words, n_correct, n_wrong = group.correct_bits, group.words, group.n_correct, group.n_wrong
    n_clusters = 0
    for k in range(nk):
        c = 0
        cc = 0
        for w in range(words):
            c += popcount(carriers[k, w])
            cc += popcount(carriers[k, w] & correct_bits[w])
        if c < 2:
            kind = NO_CLUSTER
        elif cc == c:
            kind = KIND_CORRECT_ONLY
        elif cc == 0:
            kind = KIND_INCORRECT_ONLY
        else:
            kind = KIND_SHARED
        key[KEY_KIND, k] = kind
        if kind == KIND_CORRECT_ONLY:
            weight[k] = np.float32(c / n_correct)
        elif kind == KIND_INCORRECT_ONLY:
            weight[k] = np.float32(c / n_wrong)
        else:
            weight[k] = np.float32(0.0)
        if kind != NO_CLUSTER:
            n_clusters += 1
            counts[N_CLUSTERS + kind - 1] += 1
    return n_clusters


@jit
def summarise_prefixes(keys, nk):
    """What a longest match stands for in step 6, along the prefix links (shortest keys first, as
    a parent is shorter than its child): KEY_SHARED_LEN, the length of the longest shared cluster
    among the key and its prefixes, and the KEY_TOP_WEIGHTED / KEY_NEXT_WEIGHTED list of the
    weighted clusters among them that can decide a token (longest first, each heavier than every
    longer one: a shorter, lighter one is covered wherever it reaches)."""
    key, weight, by_len = keys.table, keys.weight, keys.by_len
    for i in range(nk):
        k = by_len[i]
        parent = key[KEY_PARENT, k]
        kind = key[KEY_KIND, k]
        if kind == KIND_SHARED:
            key[KEY_SHARED_LEN, k] = key[KEY_LEN, k]
        else:
            key[KEY_SHARED_LEN, k] = key[KEY_SHARED_LEN, parent] if parent >= 0 else 0
        up = key[KEY_TOP_WEIGHTED, parent] if parent >= 0 else -1
        if kind == KIND_CORRECT_ONLY or kind == KIND_INCORRECT_ONLY:
            while up >= 0 and weight[up] <= weight[k]:
                up = key[KEY_NEXT_WEIGHTED, up]
            key[KEY_NEXT_WEIGHTED, k] = up
            key[KEY_TOP_WEIGHTED, k] = k
        else:
            key[KEY_TOP_WEIGHTED, k] = up
