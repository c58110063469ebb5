"""What the LESS kernel modules share: the jit decorator, the per-group tables and small helpers.

The kernels keep their per-group state in 2-D int64 tables with one named row per field and one
column per item, ``table[FIELD, i]`` (a pass over the items reads each field it needs
contiguously), bundled with the arrays that belong to them in namedtuples, which numba passes
around as structs. Everything is allocated once per call by `allocate` (kernel.py), sized for the
largest group of the batch, and only the part a group uses is ever touched.
"""

from __future__ import annotations

from collections import namedtuple

import numpy as np
from numba import njit


def jit(fn):
    """njit with numba's on-disk cache where numba finds a writable cache directory
    (NUMBA_CACHE_DIR, the package's __pycache__ or a user-wide one); without one the kernels
    compile in every process. The kernels release the GIL.

    Numba checks a cached function against its own file's timestamp only, not against the files
    of the functions it calls: after editing one of these modules, delete __pycache__ here.

    Writing fast numba here: take arrays out of namedtuples once per function (each time costs a
    reference count); in hot loops index slices with the loop variable (``row = a[o:o + n];
    row[i]``) rather than ``a[o + i]``, for which numba must handle negative indices."""
    try:
        return njit(cache=True, nogil=True, error_model="numpy")(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return njit(nogil=True, error_model="numpy")(fn)


def jit_inline(fn):
    """`jit` for the small helpers of hot loops, inlined into their callers by numba itself: LLVM
    leaves those calls in place (step 6 takes twice as long without this)."""
    try:
        return njit(inline="always", cache=True, nogil=True, error_model="numpy")(fn)
    except RuntimeError:
        return njit(inline="always", nogil=True, error_model="numpy")(fn)


# Cluster kinds (keys.table[KEY_KIND, k]).
NO_CLUSTER, KIND_CORRECT_ONLY, KIND_INCORRECT_ONLY, KIND_SHARED = range(4)

# Segments: one column per segment of the group, in (response, position) order.
SEG_RESP = 0  # the response (index inside the group) it belongs to
SEG_START = 1  # flat index of its first token in the [B, T] batch
SEG_LEN = 2
SEG_POS = 3  # offset of its first token in its response
SEG_KEY = 4  # the distinct key it is a copy of
SEG_FIELDS = 5
# prefix[i, c]: prefix hash of the first c tokens of the group's response i (keys.hash_rows).
Segments = namedtuple("Segments", ["table", "prefix"])

# Keys: one column per distinct segment (same tokens = same key).
KEY_HOST = 0  # its first copy, the only one the scan reads
KEY_LEN = 1
KEY_SLOT = 2  # its head's slot in the head table
KEY_HEAD_POS = 3  # its index in heads.keys
KEY_PARENT = 4  # the longest key that is a proper prefix of it (-1: none)
KEY_LAST_HOST = 5  # scan: its last confirmed occurrence as a longest match (host, offset) ...
KEY_LAST_POS = 6
KEY_PERIOD = 7  # ... and the last period tested for chaining, with the outcome
KEY_PERIOD_OK = 8
KEY_COPIES = 9  # its copies are copies[KEY_COPIES:KEY_COPIES_END], host first
KEY_COPIES_END = 10
KEY_STAMP = 11  # the last host whose responses were added to its carriers
KEY_KIND = 12  # NO_CLUSTER, KIND_CORRECT_ONLY, KIND_INCORRECT_ONLY or KIND_SHARED
KEY_SHARED_LEN = 13  # length of the longest shared cluster among it and its prefixes (0: none)
KEY_TOP_WEIGHTED = 14  # the weighted clusters among it and its prefixes that can decide a token,
KEY_NEXT_WEIGHTED = 15  # longest first, each heavier than the longer ones: first / next (-1 ends)
KEY_FIELDS = 16
Keys = namedtuple(
    "Keys",
    [
        "table",  # [KEY_FIELDS, K] int64
        "hash",  # [K] uint64: the hash of all its tokens
        "weight",  # [K] float32: its cluster weight (0 for shared or none)
        "by_len",  # key ids by increasing length
        "copies",  # segment ids grouped by key
        "holders",  # [K, words] uint64: bit set of the responses holding a copy of it
        "carriers",  # [K, words] uint64: bit set of the responses carrying it
    ],
)

# Hash tables of one group (open addressing, linear probing, 2**table_bits(n) slots for n segments
# when merging copies, n keys for the head table).
Heads = namedtuple(
    "Heads",
    [
        "slot_key",  # merge_copies: slot -> key (-1: empty), keyed by full hash and length
        "hash",  # head table: slot -> head hash (the hash of a key's first mu tokens) ...
        "first",  # ... and its keys, heads.keys[first:first + count], by increasing length
        "count",
        "keys",
        "bitmap",  # BITMAP_EXTRA more bits than the table: one set per head, tested at every window
    ],
)
BITMAP_EXTRA = 4

# Longest matches found by the scan: occ[:, i] = (key, host segment, offset in the host).
Matches = namedtuple("Matches", ["hits", "occ"])
OCC_KEY, OCC_HOST, OCC_POS = 0, 1, 2

# Step 6: runs of equal verdict over a host (start, end; weight, 0 = shared), and the sweep's list
# of the weighted clusters that reach past the current token.
Paint = namedtuple("Paint", ["run_span", "run_weight", "active_weight", "active_end"])

# Per-response scratch: order keys of the entropies, radix-selection candidates and histograms
# (4 x 256 bins), and the run boundaries of low tokens.
RowScratch = namedtuple("RowScratch", ["keys", "cand", "hist", "edges"])

# One group: its rows (response i of the group is batch row rows[i]), N_c, N_w, the bit set of
# its correct responses and the words of such bit sets.
Group = namedtuple("Group", ["rows", "n_correct", "n_wrong", "correct_bits", "words"])

# Everything one call allocates (kernel.allocate).
Scratch = namedtuple("Scratch", ["row", "segs", "keys", "heads", "matches", "paint", "correct_bits"])

# Hashing: BASE**i and BASE**-i mod 2**64 for i <= T (BASE odd, so invertible).
Hashing = namedtuple("Hashing", ["pw", "inv"])

M2 = np.uint64(0x94D049BB133111EB)  # odd multiplier that spreads a hash into its top bits
ONE = np.uint64(1)
S6 = np.uint64(6)
LOW6 = np.uint64(63)


@jit
def table_bits(n):
    """log2 of the slots of a hash table for n items (at most half full)."""
    bits = 4
    while (1 << bits) < 2 * n:
        bits += 1
    return bits


@jit_inline
def slot_of(h, bits):
    return np.int64((h * M2) >> np.uint64(64 - bits))


@jit_inline
def bitmap_set(bitmap, h, bits):
    bit = (h * M2) >> np.uint64(64 - bits - BITMAP_EXTRA)
    bitmap[bit >> S6] |= ONE << (bit & LOW6)


@jit_inline
def bitmap_test(bitmap, h, bits):
    bit = (h * M2) >> np.uint64(64 - bits - BITMAP_EXTRA)
    return (bitmap[bit >> S6] >> (bit & LOW6)) & ONE


@jit_inline
def equal_tokens(tok, a, b, n):
    """tok[a:a + n] == tok[b:b + n], token by token: what every hash match is confirmed by."""
    if a == b:
        return True
    ta, tb = tok[a : a + n], tok[b : b + n]
    for i in range(n):
        if ta[i] != tb[i]:
            return False
    return True


_B1 = np.uint64(0x5555555555555555)
_B2 = np.uint64(0x3333333333333333)
_B4 = np.uint64(0x0F0F0F0F0F0F0F0F)
_H01 = np.uint64(0x0101010101010101)


@jit_inline
def popcount(x):
    x = x - ((x >> ONE) & _B1)
    x = (x & _B2) + ((x >> np.uint64(2)) & _B2)
    x = (x + (x >> np.uint64(4))) & _B4
    return np.int64((x * _H01) >> np.uint64(56))
