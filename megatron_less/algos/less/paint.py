"""Step 6: each covered token's verdict (0 if any covering cluster is shared, else the largest
covering weight), worked out once per host and written into every copy of it.

A longest match K at offset j of a host stands for K and every prefix of K that is a cluster: it
covers [j, j + KEY_SHARED_LEN(K)) as shared and [j, j + |C|) for each weighted cluster C on K's
KEY_TOP_WEIGHTED list. One sweep per host, from event to event (a match starting, a span ending),
turns those spans into runs of equal verdict; the weighted spans still reaching past the current
token are kept as a short list of (weight, end) pairs, none outdone by another (as heavy and
reaching as far).
"""

from __future__ import annotations

import numpy as np

from .codes import CORRECT_ONLY, DEFAULT, INCORRECT_ONLY, SHARED
from .common import (
    KEY_COPIES,
    KEY_COPIES_END,
    KEY_LEN,
    KEY_NEXT_WEIGHTED,
    KEY_SHARED_LEN,
    KEY_TOP_WEIGHTED,
    OCC_HOST,
    OCC_KEY,
    OCC_POS,
    SEG_KEY,
    SEG_RESP,
    SEG_START,
    jit,
    jit_inline,
)

_FAR = np.int64(1) << 62
_SHARED_W = np.float32(0.0)  # a run's weight 0 means shared: weighted clusters weigh k / N > 0


@jit_inline
def _add_span(aw, ae, na, w, e):
    """Add the weighted span (w, ending at e) to the list aw/ae[:na] unless one there is as heavy
    and reaches as far; drop those it outdoes. Returns the new length."""
    for q in range(na):
        if aw[q] >= w and ae[q] >= e:
            return na
    m = 0
    for q in range(na):
        if aw[q] > w or ae[q] > e:
            aw[m] = aw[q]
            ae[m] = ae[q]
            m += 1
    aw[m] = w
    ae[m] = e
    return m + 1


@jit_inline
def _drop_ended(aw, ae, na, pos):
    """Drop the spans that end at or before pos. Returns (length, heaviest weight, nearest end)."""
    m = 0
    best = np.float32(-1.0)
    nearest = _FAR
    for q in range(na):
        if ae[q] > pos:
            aw[m] = aw[q]
            ae[m] = ae[q]
            m += 1
            best = max(best, aw[q])
            nearest = min(nearest, ae[q])
    return m, best, nearest


@jit_inline
def _add_run(run_span, run_weight, n_runs, a, z, w):
    """Append the run [a, z) of weight w, merged into the previous one when it continues it."""
    if n_runs and run_span[n_runs - 1, 1] == a and run_weight[n_runs - 1] == w:
        run_span[n_runs - 1, 1] = z
        return n_runs
    run_span[n_runs, 0] = a
    run_span[n_runs, 1] = z
    run_weight[n_runs] = w
    return n_runs + 1


@jit_inline
def _host_runs(key, weight, occ, i, i2, run_span, run_weight, aw, ae):
    """The runs of equal verdict over one host, whose longest matches are occ[:, i:i2] (in offset
    order), into run_span / run_weight; returns how many. aw, ae: the list of weighted spans."""
    n_runs = 0
    na = 0
    end_shared = 0
    ii = i
    pos = occ[OCC_POS, i]
    while True:
        while ii < i2 and occ[OCC_POS, ii] == pos:  # the matches starting here
            k = occ[OCC_KEY, ii]
            end_shared = max(end_shared, pos + key[KEY_SHARED_LEN, k])
            c = key[KEY_TOP_WEIGHTED, k]
            while c >= 0:
                na = _add_span(aw, ae, na, weight[c], pos + key[KEY_LEN, c])
                c = key[KEY_NEXT_WEIGHTED, c]
            ii += 1
        na, best, nearest = _drop_ended(aw, ae, na, pos)
        next_match = occ[OCC_POS, ii] if ii < i2 else _FAR
        if end_shared > pos:
            stop = min(next_match, end_shared)
            n_runs = _add_run(run_span, run_weight, n_runs, pos, stop, _SHARED_W)
        elif na:
            stop = min(next_match, nearest)
            n_runs = _add_run(run_span, run_weight, n_runs, pos, stop, best)
        elif ii < i2:
            stop = next_match
        else:
            return n_runs
        pos = stop


@jit_inline
def _write_copy(run_span, run_weight, n_runs, f, weighted_class, weights, classes):
    """Write the runs into the copy of the host that starts at flat index f."""
    for q in range(n_runs):
        w = run_weight[q]
        c = SHARED if w == _SHARED_W else weighted_class
        a, z = f + run_span[q, 0], f + run_span[q, 1]
        wr, cr = weights[a:z], classes[a:z]
        for x in range(z - a):
            wr[x] = w
            cr[x] = c


@jit_inline
def _run_totals(run_span, run_weight, n_runs):
    """(shared tokens, weighted tokens, sum of the weighted ones' weights) of a host's runs."""
    n_shared = 0
    n_weighted = 0
    w_weighted = 0.0
    for q in range(n_runs):
        n = run_span[q, 1] - run_span[q, 0]
        if run_weight[q] == _SHARED_W:
            n_shared += n
        else:
            n_weighted += n
            w_weighted += n * np.float64(run_weight[q])
    return n_shared, n_weighted, w_weighted


@jit
def paint(segs, keys, occ, n_occ, p, rows, corr, out):
    """Step 6 for a group, host by host (the scan left the matches in (host, offset) order): the
    runs of a host written into each of its copies, whose tokens move from the DEFAULT class's
    tally to their own."""
    seg, key, weight, copies = segs.table, keys.table, keys.weight, keys.copies
    run_span, run_weight, aw, ae = p.run_span, p.run_weight, p.active_weight, p.active_end
    weights, classes = out.weights, out.classes
    class_tokens, class_weight = out.class_tokens, out.class_weight
    i = 0
    while i < n_occ:
        host = occ[OCC_HOST, i]
        i2 = i + 1
        while i2 < n_occ and occ[OCC_HOST, i2] == host:
            i2 += 1
        n_runs = _host_runs(key, weight, occ, i, i2, run_span, run_weight, aw, ae)
        if n_runs:
            n_shared, n_weighted, w_weighted = _run_totals(run_span, run_weight, n_runs)
            hk = seg[SEG_KEY, host]
            for ci in range(key[KEY_COPIES, hk], key[KEY_COPIES_END, hk]):
                s = copies[ci]
                f = seg[SEG_START, s]
                d = np.float64(weights[f])  # segment tokens are low: still the default weight
                kind = CORRECT_ONLY if corr[rows[seg[SEG_RESP, s]]] else INCORRECT_ONLY
                _write_copy(run_span, run_weight, n_runs, f, kind, weights, classes)
                class_tokens[SHARED] += n_shared
                class_tokens[kind] += n_weighted
                class_weight[kind] += w_weighted
                class_tokens[DEFAULT] -= n_shared + n_weighted
                class_weight[DEFAULT] -= (n_shared + n_weighted) * d
        i = i2
