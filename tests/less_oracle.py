"""Brute-force LESS: the spec (/work/shared/design/less-spec.md) read literally, in plain Python.

This is the oracle the fast implementation is tested and benchmarked against. It is written to be
obviously correct, not fast: every key is compared with every window of every segment of the group.
"""

from __future__ import annotations

from collections import defaultdict

# Token classes, by code (index): what less_token_weights(..., return_classes=True) returns.
# Every valid token of a group left unchanged (N_c = 0 or N_w = 0) is "high" (untouched, weight 1).
CLASSES = ("pad", "high", "default", "correct_only", "incorrect_only", "shared")


def group_weights(tokens, entropies, correct, mu=5, q=0.8):
    """One group. tokens/entropies: lists (one per response) of equal-length lists; correct: bools.

    Returns (weights, info): weights as a list of lists of floats, info (None for a group left
    unchanged) = per-token class lists ('high', 'default', 'correct_only', 'incorrect_only',
    'shared'), the set of clusters as (sequence, kind) pairs and the number of segment tokens.
    """
    n_c = sum(1 for c in correct if c)
    n_w = len(correct) - n_c
    if n_c == 0 or n_w == 0:
        return [[1.0] * len(t) for t in tokens], None

    weights, classes, segments = [], [], []  # segments[i] = list of (start, tuple of tokens)
    for i, (toks, ents) in enumerate(zip(tokens, entropies)):
        n = len(toks)
        segs = []
        if n == 0:
            weights.append([])
            classes.append([])
            segments.append(segs)
            continue
        tau = sorted(ents)[min(round(q * n), n - 1)]
        default = 1.0 / n_c if correct[i] else 1.0 / n_w
        weights.append([1.0 if h > tau else default for h in ents])
        classes.append(["high" if h > tau else "default" for h in ents])
        t = 0
        while t < n:
            if ents[t] < tau:
                s = t
                while t < n and ents[t] < tau:
                    t += 1
                if t - s >= mu:
                    segs.append((s, tuple(toks[s:t])))
            else:
                t += 1
        segments.append(segs)

    keys = {seq for segs in segments for _, seq in segs}
    covering = defaultdict(list)  # (response, position) -> weights of covering clusters
    clusters = set()
    for key in keys:
        k = len(key)
        occurrences = []  # (response, position)
        for i, segs in enumerate(segments):
            for start, seq in segs:
                for s in range(len(seq) - k + 1):
                    if seq[s : s + k] == key:
                        occurrences.append((i, start + s))
        carriers = {i for i, _ in occurrences}
        if len(carriers) < 2:
            continue
        if all(correct[i] for i in carriers):
            w, kind = len(carriers) / n_c, "correct_only"
        elif not any(correct[i] for i in carriers):
            w, kind = len(carriers) / n_w, "incorrect_only"
        else:
            w, kind = None, "shared"  # None marks "neutralised", which beats any weight
        clusters.add((key, kind))
        for i, s in occurrences:
            for t in range(s, s + k):
                covering[(i, t)].append(w)

    for (i, t), ws in covering.items():
        if None in ws:
            weights[i][t], classes[i][t] = 0.0, "shared"
        else:
            weights[i][t] = max(ws)
            classes[i][t] = "correct_only" if correct[i] else "incorrect_only"
    n_seg = sum(len(seq) for segs in segments for _, seq in segs)
    return weights, {"classes": classes, "clusters": clusters, "segment_tokens": n_seg}


def batch_weights(token_ids, entropy, response_mask, correct, group_index, mu=5, q=0.8):
    """Same contract as megatron_less.algos.less.less_token_weights, looping over groups.

    Returns (weights and class codes (see CLASSES) as lists of per-row lists, per-group infos
    keyed by group id).
    """
    token_ids, entropy = token_ids.tolist(), entropy.tolist()
    lengths = response_mask.sum(1).tolist()
    correct, group_index = correct.tolist(), group_index.tolist()
    rows_of = defaultdict(list)
    for r, g in enumerate(group_index):
        rows_of[g].append(r)
    out = [[0.0] * len(token_ids[r]) for r in range(len(token_ids))]
    codes = [[0] * len(token_ids[r]) for r in range(len(token_ids))]
    infos = {}
    for g, rows in rows_of.items():
        w, info = group_weights(
            [token_ids[r][: lengths[r]] for r in rows],
            [entropy[r][: lengths[r]] for r in rows],
            [bool(correct[r]) for r in rows],
            mu,
            q,
        )
        infos[g] = info
        for i, (r, wr) in enumerate(zip(rows, w)):
            out[r][: len(wr)] = wr
            names = info["classes"][i] if info is not None else ["high"] * len(wr)
            codes[r][: len(wr)] = [CLASSES.index(c) for c in names]
    return out, codes, infos
