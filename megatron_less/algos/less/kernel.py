"""The LESS kernel: one pass over the batch, group by group, so that a group's data stays in cache.

Per group (its rows gathered by a counting sort of the group ids): steps 1-4 for each response
(responses.py), then, if it has segments, the keys and their index (keys.py), the longest matches
(scan.py), carriers and clusters (clusters.py) and the painting of covered tokens (paint.py).
Scratch is allocated once per call, sized for the largest group.
"""

from __future__ import annotations

import numpy as np

from .clusters import classify, collect_carriers, group_copies, summarise_prefixes
from .codes import DEFAULT, HIGH, N_GROUPS, N_GROUPS_SHAPED, N_SEGMENT_TOKENS, PAD
from .common import (
    BITMAP_EXTRA,
    KEY_FIELDS,
    ONE,
    SEG_FIELDS,
    Group,
    Hashing,
    Heads,
    Keys,
    Matches,
    Paint,
    RowScratch,
    Scratch,
    Segments,
    jit,
    table_bits,
)
from .keys import hash_rows, index_heads, link_prefixes, merge_copies, sort_by_length
from .paint import paint
from .responses import add_segments, low_runs, threshold, weigh_tokens
from .scan import longest_matches


@jit
def row_lengths(mask, t, lengths):
    """Valid tokens of each row into lengths; False if a row's mask is not left-aligned."""
    for r in range(lengths.size):
        row = mask[r * t : (r + 1) * t]
        ln = 0
        for c in range(t):
            ln += row[c]
        first = 0
        for c in range(ln):
            first += row[c]
        if first != ln:
            return False
        lengths[r] = ln
    return True


@jit
def dense_ids(raw):
    """(ids, n): the distinct values of raw numbered 0..n-1 in increasing order."""
    ids = np.empty(raw.size, np.int64)
    if raw.size == 0:
        return ids, 0
    lo, hi = raw.min(), raw.max()
    if np.uint64(hi) - np.uint64(lo) < np.uint64(4 * raw.size + 1024):  # the usual short range
        number = np.zeros(hi - lo + 1, np.int64)
        for r in range(raw.size):
            number[raw[r] - lo] = 1
        n = 0
        for v in range(number.size):
            n += number[v]
            number[v] = n - 1
        for r in range(raw.size):
            ids[r] = number[raw[r] - lo]
        return ids, n
    order = np.argsort(raw)
    n = 0
    for i in range(order.size):
        n += i == 0 or raw[order[i]] != raw[order[i - 1]]
        ids[order[i]] = n - 1
    return ids, n


@jit
def rows_by_group(gid, n_groups, corr):
    """(start, rows, n_correct): group g's rows are rows[start[g]:start[g + 1]], ascending."""
    start = np.zeros(n_groups + 1, np.int64)
    n_correct = np.zeros(n_groups, np.int64)
    for r in range(gid.size):
        start[gid[r] + 1] += 1
        n_correct[gid[r]] += corr[r]
    for g in range(n_groups):
        start[g + 1] += start[g]
    rows = np.empty(gid.size, np.int64)
    fill = start[:n_groups].copy()
    for r in range(gid.size):
        rows[fill[gid[r]]] = r
        fill[gid[r]] += 1
    return start, rows, n_correct


@jit
def _largest_group(start, rows, lengths, mu):
    """(responses, valid tokens, segments) that no group exceeds; a segment takes mu low tokens
    and one more that ends the run (or the end of the response)."""
    max_rows, max_tok, max_seg = 1, 1, 1
    for g in range(start.size - 1):
        n_tok, n_seg = 0, 1
        for r in rows[start[g] : start[g + 1]]:
            n_tok += lengths[r]
            n_seg += (lengths[r] + 1) // (mu + 1)
        max_rows = max(max_rows, start[g + 1] - start[g])
        max_tok = max(max_tok, n_tok)
        max_seg = max(max_seg, n_seg)
    return max_rows, max_tok, max_seg


@jit
def allocate(t, max_rows, max_tok, max_seg):
    """Scratch for groups of at most max_rows responses, max_tok valid tokens and max_seg
    segments, in responses of at most t tokens (every array is touched only as far as used)."""
    words = (max_rows + 63) // 64
    size = 1 << table_bits(max_seg)
    return Scratch(
        RowScratch(
            np.empty(t, np.uint64),
            np.empty(t, np.uint64),
            np.empty(4 * 256, np.int64),
            np.empty(t + 2, np.int64),
        ),
        Segments(np.empty((SEG_FIELDS, max_seg), np.int64), np.empty((max_rows, t + 1), np.uint64)),
        Keys(
            np.empty((KEY_FIELDS, max_seg), np.int64),
            np.empty(max_seg, np.uint64),
            np.empty(max_seg, np.float32),
            np.empty(max_seg, np.int64),
            np.empty(max_seg, np.int64),
            np.empty((max_seg, words), np.uint64),
            np.empty((max_seg, words), np.uint64),
        ),
        Heads(
            np.empty(size, np.int64),
            np.empty(size, np.uint64),
            np.empty(size, np.int64),
            np.empty(size, np.int64),
            np.empty(max_seg, np.int64),
            np.empty((size << BITMAP_EXTRA) >> 6, np.uint64),
        ),
        Matches(np.empty(t + 1, np.int64), np.empty((3, max_tok + 1), np.int64)),
        # A host's runs are disjoint and non-empty; the weighted spans over one host all have its
        # responses' kind, so their distinct weights number fewer than the group's responses.
        Paint(
            np.empty((t + 1, 2), np.int64),
            np.empty(t + 1, np.float32),
            np.empty(max_rows + 1, np.float32),
            np.empty(max_rows + 1, np.int64),
        ),
        np.empty(words, np.uint64),
    )


@jit
def _hashing(t, base, base_inv):
    pw = np.empty(t + 1, np.uint64)
    inv = np.empty(t + 1, np.uint64)
    pw[0] = ONE
    inv[0] = ONE
    for i in range(1, t + 1):
        pw[i] = pw[i - 1] * base
        inv[i] = inv[i - 1] * base_inv
    return Hashing(pw, inv)


@jit
def shape_responses(inp, out, rs, seg_table, group, mu, quantile):
    """Steps 1-4 for every response of a shaped group; returns (segments, segment tokens)."""
    # Arrays are taken out of the namedtuples once, here: numba counts a reference each time.
    ebits, wpt, lengths, corr = inp.ebits, inp.wpt, inp.lengths, inp.corr
    weights, classes = out.weights, out.classes
    class_tokens, class_weight = out.class_tokens, out.class_weight
    keys, cand, hist, edges = rs.keys, rs.cand, rs.hist, rs.edges
    d_correct = np.float32(1.0 / group.n_correct)
    d_wrong = np.float32(1.0 / group.n_wrong)
    nseg = 0
    ntok = 0
    for resp in range(group.rows.size):
        r = group.rows[resp]
        o = r * inp.t
        ln = lengths[r]
        if ln == 0:
            continue
        tau = threshold(ebits[o * wpt : (o + ln) * wpt], wpt, ln, quantile, keys, cand, hist)
        d = d_correct if corr[r] else d_wrong
        n_high = weigh_tokens(keys, ln, tau, d, weights[o : o + ln], classes[o : o + ln])
        class_tokens[HIGH] += n_high
        class_weight[HIGH] += n_high
        class_tokens[DEFAULT] += ln - n_high
        class_weight[DEFAULT] += (ln - n_high) * np.float64(d)
        nseg, ntok = add_segments(edges, low_runs(keys, ln, tau, edges), mu, o, resp, seg_table, nseg, ntok)
    return nseg, ntok


@jit
def shape_clusters(inp, out, sc, hashing, nseg, group, mu):
    """Steps 5-6 for a group with nseg >= 1 segments."""
    tok, segs, keys, heads = inp.tok, sc.segs, sc.keys, sc.heads
    hash_rows(tok, hashing.inv, group.rows, inp.t, inp.lengths, segs.prefix)
    nk = merge_copies(tok, hashing.pw, segs, nseg, keys, heads)
    sort_by_length(keys, nk, sc.row.edges)
    index_heads(hashing.pw, segs, keys, nk, heads, mu)
    link_prefixes(tok, hashing.pw, segs, keys, nk, heads)
    n_occ = longest_matches(tok, hashing.pw, mu, segs, nseg, keys, nk, heads, sc.matches)
    group_copies(segs, nseg, keys, nk, group.words)
    collect_carriers(segs, keys, nk, sc.matches.occ, n_occ, group.words)
    if classify(keys, nk, group, out.counts):
        summarise_prefixes(keys, nk)
        paint(segs, keys, sc.matches.occ, n_occ, sc.paint, group.rows, inp.corr, out)


@jit
def _untouched(inp, out, rows):
    """Step 8: a group with N_c = 0 or N_w = 0 keeps weight 1 (class HIGH) on every valid token."""
    for r in rows:
        o = r * inp.t
        out.weights[o : o + inp.lengths[r]] = np.float32(1.0)
        out.classes[o : o + inp.lengths[r]] = HIGH


@jit
def _pad(inp, out):
    """Weight 0 and class PAD on padding."""
    for r in range(inp.lengths.size):
        o = r * inp.t
        out.weights[o + inp.lengths[r] : o + inp.t] = np.float32(0.0)
        out.classes[o + inp.lengths[r] : o + inp.t] = PAD


@jit
def _group(rows, n_correct, correct_bits, corr):
    words = (rows.size + 63) // 64
    correct_bits[:words] = 0
    for i in range(rows.size):
        if corr[rows[i]]:
            correct_bits[i >> 6] |= ONE << np.uint64(i & 63)
    return Group(rows, n_correct, rows.size - n_correct, correct_bits, words)


@jit
def less_kernel(inp, out, mu, quantile, base, base_inv):
    """LESS weights and classes of the batch into out (see common.Inputs / Outputs), for hash base
    `base` (odd) and its inverse mod 2**64. Returns False if the mask is not left-aligned."""
    if not row_lengths(inp.mask, inp.t, inp.lengths):
        return False
    _pad(inp, out)
    gid, n_groups = dense_ids(inp.gid)
    out.counts[N_GROUPS] = n_groups
    start, rows, n_correct = rows_by_group(gid, n_groups, inp.corr)
    sc = allocate(inp.t, *_largest_group(start, rows, inp.lengths, mu))
    hashing = _hashing(inp.t, base, base_inv)
    for g in range(n_groups):
        g_rows = rows[start[g] : start[g + 1]]
        if n_correct[g] == 0 or n_correct[g] == g_rows.size:
            _untouched(inp, out, g_rows)
            continue
        out.counts[N_GROUPS_SHAPED] += 1
        group = _group(g_rows, n_correct[g], sc.correct_bits, inp.corr)
        nseg, ntok = shape_responses(inp, out, sc.row, sc.segs.table, group, mu, quantile)
        out.counts[N_SEGMENT_TOKENS] += ntok
        if nseg:
            shape_clusters(inp, out, sc, hashing, nseg, group, mu)
    return True
