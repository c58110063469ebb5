"""avg@k / std@k / pass@k / worst@k / maj@k against hand computations and brute force."""

from __future__ import annotations

import itertools
from collections import defaultdict
from math import comb

import numpy as np
import pytest

from megatron_less.eval import metrics as M


def test_hand_computed_values():
    assert M.pass_at_k(5, 2, 2) == pytest.approx(1 - comb(3, 2) / comb(5, 2))  # 0.7
    assert M.pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert M.worst_at_k(5, 3, 2) == pytest.approx(0.3)  # C(3,2)/C(5,2)
    assert M.pass_at_k(4, 0, 1) == 0.0 and M.pass_at_k(4, 4, 3) == 1.0
    assert M.worst_at_k(4, 1, 2) == 0.0 and M.worst_at_k(4, 4, 4) == 1.0
    assert M.pass_at_k(10, 3, 1) == pytest.approx(0.3) == M.worst_at_k(10, 3, 1)


def test_avg_and_std_by_hand():
    correct = [[1, 0, 0, 1], [1, 1, 1, 1], [0, 0, 0, 1]]
    assert M.avg_at_k(correct) == pytest.approx(7 / 12)
    # Population std per row: sqrt(p(1-p)) = 0.5, 0, sqrt(3/16).
    assert M.std_at_k(correct) == pytest.approx((0.5 + 0 + np.sqrt(3 / 16)) / 3)
    assert M.std_at_k(correct) == pytest.approx(np.mean(np.std(np.array(correct, float), axis=1)))


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_and_worst_match_subset_enumeration(n):
    for c in range(n + 1):
        samples = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(samples, k))
            assert M.pass_at_k(n, c, k) == pytest.approx(np.mean([any(s) for s in subsets]))
            assert M.worst_at_k(n, c, k) == pytest.approx(np.mean([all(s) for s in subsets]))


def test_large_n_is_stable():
    # The product form avoids C(1000, 500); compare with exact integer binomials.
    assert M.pass_at_k(1000, 3, 500) == pytest.approx(1 - comb(997, 500) / comb(1000, 500))
    assert M.worst_at_k(1000, 990, 50) == pytest.approx(comb(990, 50) / comb(1000, 50))


def test_means_over_problems():
    correct = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]], bool)
    assert M.mean_pass_at_k(correct, 2) == pytest.approx(
        np.mean([M.pass_at_k(4, 2, 2), 0.0, M.pass_at_k(4, 3, 2)])
    )
    assert M.mean_worst_at_k(correct, 2) == pytest.approx(np.mean([1 / 6, 0.0, 3 / 6]))
    assert M.mean_pass_at_k(correct, 1) == pytest.approx(M.avg_at_k(correct))


def test_majority_vote():
    assert M.majority_correct(["1", "2", "2"], [True, False, False]) is False
    assert M.majority_correct(["1", "2", "1"], [True, False, True]) is True
    assert M.majority_correct(["2", "1"], [False, True]) is False  # tie: first seen wins
    assert M.majority_correct([None, None, "3"], [False, False, True]) is True  # no vote
    assert M.majority_correct([None, None], [False, False]) is False
    votes = [["a", "a", "b"], ["x", "y", "y"]]
    assert M.maj_at_k(votes, [[1, 1, 0], [1, 0, 0]]) == pytest.approx(0.5)


# verl's bootstrap_metric and calc_maj_val (verl/trainer/ppo/metric_utils.py), restated here
# as the reference: global np.random.seed, one choice() per bootstrap round.
def _verl_bootstrap_metric(data, subset_size, reduce_fns, n_bootstrap=1000, seed=42):
    np.random.seed(seed)
    lists = [[] for _ in reduce_fns]
    for _ in range(n_bootstrap):
        idxs = np.random.choice(len(data), size=subset_size, replace=True)
        sub = [data[i] for i in idxs]
        for i, fn in enumerate(reduce_fns):
            lists[i].append(fn(sub))
    return [(np.mean(v), np.std(v)) for v in lists]


def _verl_calc_maj_val(data, vote_key, val_key):
    vote2vals = defaultdict(list)
    for d in data:
        vote2vals[d[vote_key]].append(d[val_key])
    vote2cnt = {k: len(v) for k, v in vote2vals.items()}
    maj_vote = max(vote2cnt, key=vote2cnt.get)
    return vote2vals[maj_vote][0]


def _random_case(seed, problems=6, n=8, answers=3):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, answers, (problems, n))
    correct = ids == 0  # answer "0" is the right one
    votes = [[str(v) for v in row] for row in ids]
    return votes, correct


@pytest.mark.parametrize("k", [2, 4, 8])
def test_bootstrap_worst_matches_verl(k):
    _, correct = _random_case(1)
    state = np.random.get_state()
    ours = M.bootstrap_worst_at_k(correct, k)
    assert np.array_equal(state[1], np.random.get_state()[1])  # global RNG untouched
    verl = np.mean(
        [_verl_bootstrap_metric(list(row.astype(float)), k, [np.min])[0][0] for row in correct]
    )
    assert ours == pytest.approx(verl, abs=1e-12)
    # The generic helper is the same as verl's too.
    row = list(correct[0].astype(float))
    got = M.bootstrap_metric(row, k, [np.min, np.max])
    want = _verl_bootstrap_metric(row, k, [np.min, np.max])
    assert np.allclose(np.asarray(got, dtype=float), np.asarray(want, dtype=float), rtol=1e-12, atol=0)


@pytest.mark.parametrize("k", [2, 3, 8])
def test_bootstrap_maj_matches_verl(k):
    votes, correct = _random_case(2)
    ours = M.bootstrap_maj_at_k(votes, correct, k)
    per_problem = []
    for v, c in zip(votes, correct):
        data = [{"pred": p, "val": float(x)} for p, x in zip(v, c)]
        fn = lambda d: _verl_calc_maj_val(d, "pred", "val")  # noqa: E731
        per_problem.append(_verl_bootstrap_metric(data, k, [fn])[0][0])
    assert ours == pytest.approx(np.mean(per_problem), abs=1e-12)


def test_bootstrap_worst_converges_to_with_replacement_value():
    # Drawing with replacement: E[min] = (c/n)^k, not the unbiased C(c,k)/C(n,k).
    row = np.array([[1, 1, 1, 0]], bool)
    est = M.bootstrap_worst_at_k(row, 3, n_bootstrap=200_000, seed=0)
    assert est == pytest.approx(0.75**3, abs=5e-3)
    assert M.mean_worst_at_k(row, 3) == pytest.approx(0.25)


def test_default_ks_and_summary():
    assert M.default_ks(1) == [1]
    assert M.default_ks(8) == [1, 2, 4, 8]
    assert M.default_ks(6) == [1, 2, 4, 6]
    votes, correct = _random_case(3, problems=5, n=4)
    s = M.summarize(correct, votes)
    assert s["problems"] == 5 and s["n"] == 4
    for key in ["avg@4", "std@4", "pass@1", "pass@4", "worst@2", "maj@4", "worst@4/bootstrap"]:
        assert key in s
    assert s["pass@1"] == pytest.approx(s["avg@4"]) == pytest.approx(s["worst@1"])
    assert s["pass@4"] >= s["pass@2"] >= s["avg@4"] >= s["worst@2"] >= s["worst@4"]


def test_average_is_over_benchmarks_not_problems():
    a = M.summarize(np.ones((30, 2), bool), bootstrap=False)
    b = M.summarize(np.zeros((500, 2), bool), bootstrap=False)
    avg = M.average_benchmarks({"aime": a, "math500": b})
    assert avg["avg@2"] == pytest.approx(0.5) and avg["problems"] == 530


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="same n"):
        M.avg_at_k([[1, 0], [1]])
    with pytest.raises(ValueError, match="matrix"):
        M.avg_at_k([1, 0, 1])
    with pytest.raises(ValueError, match="k=5"):
        M.pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="c=5"):
        M.worst_at_k(4, 5, 1)
