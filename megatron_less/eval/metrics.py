"""Accuracy metrics over n sampled responses per problem.

Inputs are a ``[problems, n]`` boolean matrix of verdicts (every problem has the same n).
Benchmark-level numbers are the mean over problems of a per-problem quantity:

* ``avg@n``  mean accuracy (= pass@1 = worst@1).
* ``std@n``  per-problem standard deviation of the 0/1 verdicts over the n samples, averaged
  over problems. POPULATION std (ddof=0, i.e. sqrt(p(1-p)) for a problem solved at rate p),
  as verl's ``process_validation_metrics`` computes it with ``np.std``; the LESS paper reports
  verl's numbers.
* ``pass@k`` unbiased estimate of P(at least one of k samples is correct), drawn without
  replacement from the n: 1 - C(n-c, k) / C(n, k)  (Chen et al. 2021).
* ``worst@k`` unbiased estimate of P(all k samples are correct): C(c, k) / C(n, k).
* ``maj@n``  is the majority answer (over all n samples) correct.
* ``worst@k/bootstrap`` and ``maj@k/bootstrap``: verl's ``bootstrap_metric`` — 1000 subsets of
  size k drawn WITH replacement, seed 42, mean of the reduced value. Drawing with replacement
  makes bootstrap worst@k converge to (c/n)^k, not C(c,k)/C(n,k); reported for comparison with
  papers built on verl.
"""

from __future__ import annotations

from typing import Callable, Hashable, Sequence

import numpy as np


def as_matrix(correct) -> np.ndarray:
    """``correct`` as a 2-D bool array, with a clear error for ragged or empty input."""
    try:
        arr = np.asarray(correct, dtype=bool)
    except ValueError as e:
        raise ValueError("verdicts must be [problems, n] with the same n for every problem") from e
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(f"verdicts must be a [problems, n] matrix with n >= 1, got {arr.shape}")
    return arr


def avg_at_k(correct) -> float:
    arr = as_matrix(correct)
    return float(arr.mean()) if arr.size else float("nan")


def std_at_k(correct) -> float:
    """Mean over problems of the population std (ddof=0) of each problem's n verdicts."""
    arr = as_matrix(correct).astype(float)
    return float(arr.std(axis=1, ddof=0).mean()) if arr.size else float("nan")


def _check(n: int, c: int, k: int) -> None:
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k)/C(n, k), as a running product (exact for large n, no huge binomials)."""
    _check(n, c, k)
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def worst_at_k(n: int, c: int, k: int) -> float:
    """C(c, k)/C(n, k) = prod_{i<k} (c-i)/(n-i): every one of k distinct samples is correct."""
    _check(n, c, k)
    if c < k:
        return 0.0
    i = np.arange(k)
    return float(np.prod((c - i) / (n - i)))


def _mean_over_problems(fn: Callable[[int, int, int], float], correct, k: int) -> float:
    arr = as_matrix(correct)
    n = arr.shape[1]
    return float(np.mean([fn(n, int(c), k) for c in arr.sum(axis=1)])) if len(arr) else float("nan")


def mean_pass_at_k(correct, k: int) -> float:
    return _mean_over_problems(pass_at_k, correct, k)


def mean_worst_at_k(correct, k: int) -> float:
    return _mean_over_problems(worst_at_k, correct, k)


def majority_correct(votes: Sequence[Hashable | None], correct: Sequence[bool]) -> bool:
    """Is the most frequent answer correct? Ties go to the answer seen first (as in verl's
    ``calc_maj_val``); responses without an answer (None) do not vote."""
    counts: dict = {}
    first_val: dict = {}
    for vote, ok in zip(votes, correct, strict=True):
        if vote is None:
            continue
        counts[vote] = counts.get(vote, 0) + 1
        first_val.setdefault(vote, bool(ok))
    if not counts:
        return False
    return first_val[max(counts, key=counts.get)]


def maj_at_k(votes: Sequence[Sequence[Hashable | None]], correct) -> float:
    """Mean over problems of ``majority_correct`` over all n samples."""
    arr = as_matrix(correct)
    if len(votes) != len(arr):
        raise ValueError(f"{len(votes)} rows of votes for {len(arr)} problems")
    return float(np.mean([majority_correct(v, c) for v, c in zip(votes, arr)]))


def bootstrap_metric(
    data: Sequence,
    subset_size: int,
    reduce_fns: Sequence[Callable[[list], float]],
    n_bootstrap: int = 1000,
    seed: int = 42,
) -> list[tuple[float, float]]:
    """verl's ``bootstrap_metric``: (mean, std) of each reduce_fn over ``n_bootstrap`` subsets of
    ``subset_size`` items drawn with replacement. A private RandomState seeded like verl's
    ``np.random.seed(seed)`` draws the same indices without touching global numpy state."""
    rng = np.random.RandomState(seed)
    values: list[list[float]] = [[] for _ in reduce_fns]
    for _ in range(n_bootstrap):
        idx = rng.choice(len(data), size=subset_size, replace=True)
        subset = [data[i] for i in idx]
        for out, fn in zip(values, reduce_fns):
            out.append(fn(subset))
    return [(float(np.mean(v)), float(np.std(v))) for v in values]


def _bootstrap_indices(n: int, k: int, n_bootstrap: int, seed: int) -> np.ndarray:
    # One (n_bootstrap, k) draw equals verl's n_bootstrap successive choice(n, k) calls on a
    # RandomState with the same seed (same stream, checked in tests) and is ~1000x faster.
    return np.random.RandomState(seed).choice(n, size=(n_bootstrap, k), replace=True)


def bootstrap_worst_at_k(correct, k: int, n_bootstrap: int = 1000, seed: int = 42) -> float:
    """verl-style worst@k: per problem the bootstrap mean of min over k samples, then averaged.
    Every problem reuses the generator seeded at ``seed``, as verl calls ``bootstrap_metric``
    with a fixed seed for every prompt, so all problems share the same index draws."""
    arr = as_matrix(correct)
    idx = _bootstrap_indices(arr.shape[1], k, n_bootstrap, seed)
    return float(arr[:, idx].all(axis=2).mean())


def _vote_ids(votes: Sequence[Hashable | None]) -> np.ndarray:
    ids: dict = {}
    return np.array([-1 if v is None else ids.setdefault(v, len(ids)) for v in votes], dtype=int)


def bootstrap_maj_at_k(votes, correct, k: int, n_bootstrap: int = 1000, seed: int = 42) -> float:
    """verl-style maj@k: bootstrap mean of ``majority_correct`` over subsets of k samples."""
    arr = as_matrix(correct)
    idx = _bootstrap_indices(arr.shape[1], k, n_bootstrap, seed)
    per_problem = []
    for row_votes, row in zip(votes, arr, strict=True):
        ids = _vote_ids(row_votes)
        n_ids = int(ids.max()) + 1
        if n_ids == 0:
            per_problem.append(0.0)
            continue
        # Correctness of each distinct answer, from its first occurrence.
        val = np.zeros(n_ids, dtype=bool)
        for i in range(len(ids) - 1, -1, -1):
            if ids[i] >= 0:
                val[ids[i]] = row[i]
        sub = ids[idx]  # (n_bootstrap, k) answer ids
        hot = sub[:, :, None] == np.arange(n_ids)  # (n_bootstrap, k, n_ids)
        counts = hot.sum(axis=1)
        first = np.where(hot, np.arange(k)[None, :, None], k).min(axis=1)
        # Most votes wins; among ties, the answer that appears first in the subset.
        winner = np.argmax(counts * (k + 1) - first, axis=1)
        ok = val[winner] & (counts.max(axis=1) > 0)
        per_problem.append(float(ok.mean()))
    return float(np.mean(per_problem))


def default_ks(n: int) -> list[int]:
    """1, 2, 4, ... below n, then n (verl reports the powers of two and n)."""
    ks, k = [], 1
    while k < n:
        ks.append(k)
        k *= 2
    return ks + [n]


def summarize(correct, votes=None, ks: Sequence[int] | None = None, bootstrap: bool = True) -> dict:
    """All metrics for one benchmark, keyed by name (``avg@8``, ``pass@4``, ...)."""
    arr = as_matrix(correct)
    n = arr.shape[1]
    ks = [k for k in (ks or default_ks(n)) if 1 <= k <= n]
    out = {"problems": int(len(arr)), "n": n, f"avg@{n}": avg_at_k(arr), f"std@{n}": std_at_k(arr)}
    for k in ks:
        out[f"pass@{k}"] = mean_pass_at_k(arr, k)
    for k in ks:
        out[f"worst@{k}"] = mean_worst_at_k(arr, k)
    if votes is not None:
        out[f"maj@{n}"] = maj_at_k(votes, arr)
    if bootstrap:
        for k in ks:
            if k > 1:
                out[f"worst@{k}/bootstrap"] = bootstrap_worst_at_k(arr, k)
        if votes is not None:
            for k in ks:
                if k > 1:
                    out[f"maj@{k}/bootstrap"] = bootstrap_maj_at_k(votes, arr, k)
    return out


def average_benchmarks(per_benchmark: dict[str, dict]) -> dict:
    """Unweighted mean over benchmarks of every metric they all report (papers average
    benchmarks, not problems, so AIME's 30 problems weigh as much as MATH500's 500)."""
    if not per_benchmark:
        return {}
    tables = list(per_benchmark.values())
    keys = [k for k in tables[0] if k not in ("problems", "n") and all(k in t for t in tables)]
    avg = {k: float(np.mean([t[k] for t in tables])) for k in keys}
    avg["problems"] = int(sum(t["problems"] for t in tables))
    return avg
