"""LESS weights, token classes and stats against the brute-force oracle (tests/less_oracle.py) and
the spec's worked example."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

try:
    from tests import less_oracle
except ImportError:  # tests/ run as a plain directory
    import less_oracle
from megatron_less.algos import get_shaper, less
from megatron_less.algos.advantages import grpo_advantages
from megatron_less.algos.less import less_shaper, less_token_weights

ENTROPY_LEVELS = np.array([0.05, 0.1, 0.1, 0.2, 0.5, 1.0, 2.0, 3.0], dtype=np.float32)


def random_batch(rng, n_groups, *, max_size=7, max_len=40, vocab=4):
    """Groups of unequal size built from a few planted phrases, so that correct-only,
    incorrect-only and shared sub-sequences all occur; entropies come from a handful of values so
    that ties at the threshold are common; rows of different groups are interleaved."""
    rows = []
    for g in range(n_groups):
        size = int(rng.integers(1, max_size + 1))
        phrases = [rng.integers(0, vocab, size=int(rng.integers(1, 9))) for _ in range(3)]
        kind = rng.random()
        for _ in range(size):
            n = int(rng.choice([0, 1, 2, 5, int(rng.integers(0, max_len + 1)), max_len]))
            toks, ents = [], []
            while len(toks) < n:
                if rng.random() < 0.6:
                    p = phrases[int(rng.integers(len(phrases)))]
                    toks += p.tolist()
                    ents += rng.choice(ENTROPY_LEVELS[:4], size=p.size).tolist()
                toks.append(int(rng.integers(vocab)))
                ents.append(float(rng.choice(ENTROPY_LEVELS)))
            correct = True if kind < 0.1 else False if kind < 0.2 else bool(rng.random() < 0.5)
            rows.append((toks[:n], ents[:n], correct, g))
    order = rng.permutation(len(rows))
    ids = rng.choice(10**12, size=n_groups, replace=False)
    t = max([len(r[0]) for r in rows] + [0])
    tok = torch.full((len(rows), t), 7, dtype=torch.long)  # padding ids that could match if not masked
    ent = torch.full((len(rows), t), 0.01)
    mask = torch.zeros(len(rows), t, dtype=torch.bool)
    correct = torch.zeros(len(rows), dtype=torch.bool)
    group = torch.zeros(len(rows), dtype=torch.long)
    for i, j in enumerate(order):
        tk, en, c, g = rows[j]
        tok[i, : len(tk)] = torch.tensor(tk, dtype=torch.long)
        ent[i, : len(en)] = torch.tensor(en, dtype=torch.float32)
        mask[i, : len(tk)] = True
        correct[i] = c
        group[i] = int(ids[g])
    return tok, ent, mask, correct, group


def check_against_oracle(batch, mu, q):
    w, classes, stats = less_token_weights(*batch, mu=mu, quantile=q, return_classes=True, return_stats=True)
    expect, expect_classes, infos = less_oracle.batch_weights(*batch, mu=mu, q=q)
    torch.testing.assert_close(
        w, torch.tensor(expect, dtype=torch.float32).reshape(w.shape), rtol=0, atol=1e-7
    )
    assert classes.dtype == torch.int8
    assert torch.equal(classes, torch.tensor(expect_classes, dtype=torch.int8).reshape(w.shape))

    # The diagnostics too: distinct clusters per kind, token classes, mean weights by class.
    kinds = {"correct_only": 0, "incorrect_only": 0, "shared": 0}
    by_class, n_seg = {}, 0
    for g, info in infos.items():
        if info is None:
            continue
        n_seg += info["segment_tokens"]
        for _, kind in info["clusters"]:
            kinds[kind] += 1
        rows = [r for r in range(len(expect)) if int(batch[4][r]) == g]
        for r, cl in zip(rows, info["classes"]):
            for t, c in enumerate(cl):
                by_class.setdefault(c, []).append(expect[r][t])
    n_tok = sum(len(v) for v in by_class.values())
    assert stats["tokens_shaped"] == n_tok
    assert stats["groups_shaped"] == sum(info is not None for info in infos.values())
    assert stats["frac_in_segment"] * n_tok == pytest.approx(n_seg)
    assert stats["frac_high_entropy"] * n_tok == pytest.approx(len(by_class.get("high", [])))
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0
    assert stats["mean_weight"] == pytest.approx(mean([w for ws in by_class.values() for w in ws]))
    assert stats["mean_weight_default"] == pytest.approx(mean(by_class.get("default", [])))
    for kind, n in kinds.items():
        assert stats[f"clusters_{kind}"] == n, kind
        assert stats[f"frac_tokens_{kind}"] * n_tok == pytest.approx(len(by_class.get(kind, [])))
        if kind != "shared":
            assert stats[f"mean_weight_{kind}"] == pytest.approx(mean(by_class.get(kind, [])))
    return w


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("mu,q", [(5, 0.8), (3, 0.8), (2, 0.5), (1, 0.8), (4, 1.0), (3, 0.0), (6, 0.3)])
def test_random_groups_match_oracle(seed, mu, q):
    rng = np.random.default_rng(1000 * seed + mu)
    check_against_oracle(random_batch(rng, 12), mu, q)


def loop_batch(rng, n_groups, length=80):
    """Repetition loops (period 1-4) with rare substitutions, in most responses of a group; a few
    high-entropy tokens inside the loops cut them into many overlapping fragments."""
    rows = []
    for g in range(n_groups):
        pattern = rng.integers(0, 6, size=int(rng.integers(1, 5)))
        for _ in range(int(rng.integers(2, 7))):
            start = int(rng.integers(0, length // 2))
            toks = rng.integers(0, 6, size=length)
            toks[start:] = np.resize(np.roll(pattern, int(rng.integers(len(pattern)))), length - start)
            flip = rng.random(length) < 0.02
            toks[flip] = rng.integers(0, 6, size=int(flip.sum()))
            ents = np.where(rng.random(length) < 0.85, rng.choice([0.01, 0.02, 0.05], size=length), 2.0)
            rows.append((toks, ents, bool(rng.random() < 0.5), g))
    b = len(rows)
    order = rng.permutation(b)
    return (
        torch.tensor(np.stack([rows[i][0] for i in order])),
        torch.tensor(np.stack([rows[i][1] for i in order]), dtype=torch.float32),
        torch.ones(b, length, dtype=torch.bool),
        torch.tensor([rows[i][2] for i in order]),
        torch.tensor([rows[i][3] for i in order]),
    )


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("mu", [1, 3, 5])
def test_repetition_loops_match_oracle(seed, mu):
    check_against_oracle(loop_batch(np.random.default_rng(seed), 6), mu, 0.8)


def test_long_responses_with_large_vocab_match_oracle():
    rng = np.random.default_rng(7)
    for _ in range(3):
        check_against_oracle(random_batch(rng, 6, max_size=8, max_len=300, vocab=50), 5, 0.8)


def test_large_groups_match_oracle():
    """Groups of more than 64 responses (carrier sets span several 64-bit words in the kernel)."""
    rng = np.random.default_rng(17)
    check_against_oracle(random_batch(rng, 3, max_size=150, max_len=24, vocab=3), 3, 0.8)
    check_against_oracle(loop_batch(rng, 2), 2, 0.8)
    # One group of 130: every response carries the same phrase; one correct response among them.
    tok = torch.tensor([[1, 2, 3, 4, 9] for _ in range(130)])
    ent = torch.tensor([[0.1, 0.1, 0.1, 0.1, 5.0]] * 130)
    correct = torch.zeros(130, dtype=torch.bool)
    correct[77] = True
    batch = (tok, ent, torch.ones(130, 5, dtype=torch.bool), correct, torch.zeros(130, dtype=torch.long))
    w = check_against_oracle(batch, 3, 0.8)
    assert w[:, :4].eq(0).all()  # shared by both kinds: neutralised


def test_segment_length_boundary():
    """A run of mu - 1 low tokens is no segment; a run of mu is (here shared, so neutralised)."""
    mu = 4
    for run in (mu - 1, mu):
        batch = (
            torch.tensor([[1] * run + [9], [1] * run + [8]]),
            torch.tensor([[0.1] * run + [5.0]] * 2),
            torch.ones(2, run + 1, dtype=torch.bool),
            torch.tensor([True, False]),
            torch.tensor([0, 0]),
        )
        w = less_token_weights(*batch, mu=mu, quantile=0.8)
        # tau is the largest entropy (index L - 1), so the last token is low (== tau) but in no
        # segment, and keeps the default 1 / 1.
        assert w[:, :run].eq(0.0 if run >= mu else 1.0).all(), (run, w)
        assert w[:, run].eq(1.0).all()


def worked_example():
    tokens = [
        [5, 6, 7, 8, 1, 9, 9, 9, 2, 4],
        [5, 6, 7, 8, 3, 9, 9, 9, 4, 4],
        [7, 7, 7, 7, 1, 9, 9, 9, 2, 2],
        [7, 7, 7, 7, 3, 6, 6, 6, 2, 2],
    ]
    ent = [
        [0.1, 0.1, 0.1, 0.1, 3, 0.1, 0.1, 0.1, 2, 0.1],
        [0.1, 0.1, 0.1, 0.1, 3, 0.2, 0.2, 0.2, 2, 0.1],
        [0.1, 0.1, 0.1, 0.1, 3, 0.1, 0.1, 0.1, 2, 0.1],
        [0.1, 0.1, 0.1, 0.1, 3, 0.1, 0.1, 0.1, 2, 0.1],
    ]
    return (
        torch.tensor(tokens),
        torch.tensor(ent),
        torch.ones(4, 10, dtype=torch.bool),
        torch.tensor([True, True, False, False]),
        torch.zeros(4, dtype=torch.long),
    )


def test_worked_example_exact_table():
    table = [
        [1, 1, 1, 1, 1, 0, 0, 0, 0.5, 0.5],
        [1, 1, 1, 1, 1, 0, 0, 0, 0.5, 0.5],
        [1, 1, 1, 1, 1, 0, 0, 0, 0.5, 0.5],
        [1, 1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.5],
    ]
    batch = worked_example()
    check_against_oracle(batch, 3, 0.8)
    w, stats = less_token_weights(*batch, mu=3, quantile=0.8, return_stats=True)
    assert w.tolist() == table
    assert (stats["clusters_correct_only"], stats["clusters_incorrect_only"], stats["clusters_shared"]) == (
        1,
        1,
        1,
    )
    assert stats["frac_high_entropy"] == pytest.approx(0.1)
    assert stats["frac_low_entropy"] == pytest.approx(0.9)
    # Shaped advantages with GRPO's +-0.866 (unbiased std).
    adv = grpo_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.zeros(4, dtype=torch.long))
    shaped = w * adv[:, None]
    assert shaped[0, 0].item() == pytest.approx(0.866, abs=1e-3)
    assert shaped[3, 5].item() == pytest.approx(-0.433, abs=1e-3)


def test_invariant_to_permuting_responses_and_groups():
    rng = np.random.default_rng(3)
    for _ in range(10):
        batch = random_batch(rng, 10)
        w = less_token_weights(*batch, mu=3)
        perm = torch.from_numpy(rng.permutation(batch[0].shape[0]))
        relabel = {int(g): int(rng.integers(-(2**63), 2**63 - 1)) for g in batch[4].unique()}  # any int64
        group = torch.tensor([relabel[int(g)] for g in batch[4]])
        w2 = less_token_weights(
            batch[0][perm], batch[1][perm], batch[2][perm], batch[3][perm], group[perm], mu=3
        )
        assert torch.equal(w2, w[perm])


def test_unshaped_groups_and_edge_shapes():
    # All-correct and all-incorrect groups: w = 1 on valid tokens, 0 on padding.
    tok = torch.tensor([[1, 2, 3, 0], [1, 2, 3, 4], [1, 2, 3, 4]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    w = less_token_weights(
        tok, torch.full((3, 4), 0.1), mask, torch.tensor([True, True, False]), torch.tensor([0, 0, 1])
    )
    assert w.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]]
    # Empty batch, zero-length responses, one-token responses.
    assert less_token_weights(
        *(torch.zeros(0, 5, dtype=torch.long), torch.zeros(0, 5), torch.zeros(0, 5, dtype=torch.bool)),
        torch.zeros(0, dtype=torch.bool),
        torch.zeros(0, dtype=torch.long),
    ).shape == (0, 5)
    w = less_token_weights(
        torch.zeros(3, 0, dtype=torch.long),
        torch.zeros(3, 0),
        torch.zeros(3, 0, dtype=torch.bool),
        torch.tensor([True, False, True]),
        torch.zeros(3, dtype=torch.long),
    )
    assert w.shape == (3, 0)
    w = less_token_weights(
        torch.tensor([[4, 0], [4, 0], [0, 0]]),
        torch.tensor([[0.3, 0.0], [0.3, 0.0], [0.0, 0.0]]),
        torch.tensor([[1, 0], [1, 0], [0, 0]], dtype=torch.bool),
        torch.tensor([True, False, False]),
        torch.zeros(3, dtype=torch.long),
    )
    assert w.tolist() == [[1.0, 0.0], [0.5, 0.0], [0.0, 0.0]]  # a lone token is low (== tau): 1/N


def test_hash_collisions_never_change_weights(monkeypatch):
    """With base 1 every window hash is the sum of its tokens: collisions everywhere."""
    monkeypatch.setattr(less, "HASH_BASE", 1)
    rng = np.random.default_rng(11)
    for mu in (1, 3, 5):
        check_against_oracle(random_batch(rng, 10, vocab=6), mu, 0.8)
        check_against_oracle(loop_batch(rng, 4), mu, 0.8)


def test_rejects_bad_inputs():
    ok = (
        torch.zeros(2, 3, dtype=torch.long),
        torch.zeros(2, 3),
        torch.ones(2, 3, dtype=torch.bool),
        torch.tensor([True, False]),
        torch.zeros(2, dtype=torch.long),
    )
    with pytest.raises(ValueError, match="left-aligned"):
        less_token_weights(ok[0], ok[1], torch.tensor([[0, 1, 1], [1, 1, 1]], dtype=torch.bool), *ok[3:])
    with pytest.raises(ValueError, match="shape"):
        less_token_weights(ok[0], ok[1][:, :2], *ok[2:])
    with pytest.raises(ValueError, match="mu"):
        less_token_weights(*ok, mu=0)


def test_negative_and_signed_zero_entropies_match_oracle():
    """The kernel compares entropies through integer keys: negative values and -0.0 == +0.0 ties
    must order exactly as floats do."""
    rng = np.random.default_rng(31)
    for dtype in (torch.float32, torch.float64):
        tok, ent, mask, correct, group = random_batch(rng, 8)
        ent = (ent - 0.2).to(dtype)
        zeros = torch.from_numpy(rng.random(ent.shape) < 0.2)
        signs = torch.from_numpy(rng.random(ent.shape) < 0.5)
        ent[zeros & signs] = -0.0
        ent[zeros & ~signs] = 0.0
        check_against_oracle((tok, ent, mask, correct, group), 3, 0.5)


def test_half_precision_entropy_is_compared_exactly():
    rng = np.random.default_rng(5)
    tok, ent, mask, correct, group = random_batch(rng, 8)
    ent16 = ent.to(torch.bfloat16)
    w = less_token_weights(tok, ent16, mask, correct, group, mu=3)
    torch.testing.assert_close(
        w, less_token_weights(tok, ent16.float(), mask, correct, group, mu=3), rtol=0, atol=0
    )


response = st.tuples(
    st.lists(st.tuples(st.integers(0, 2), st.sampled_from([0.0, 0.1, 0.1, 0.5, 1.0, 3.0])), max_size=24),
    st.booleans(),
    st.integers(0, 3),
)


@settings(max_examples=150, deadline=None, database=None)
@given(
    rows=st.lists(response, min_size=1, max_size=12), mu=st.integers(1, 4), q=st.sampled_from([0.8, 0.5, 0.9])
)
def test_hypothesis_batches_match_oracle(rows, mu, q):
    t = max(len(r[0]) for r in rows)
    tok = torch.zeros(len(rows), t, dtype=torch.long)
    ent = torch.zeros(len(rows), t)
    mask = torch.zeros(len(rows), t, dtype=torch.bool)
    for i, (cells, _, _) in enumerate(rows):
        for j, (tk, h) in enumerate(cells):
            tok[i, j], ent[i, j], mask[i, j] = tk, h, True
    correct = torch.tensor([r[1] for r in rows])
    group = torch.tensor([r[2] for r in rows])
    check_against_oracle((tok, ent, mask, correct, group), mu, q)


@pytest.mark.parametrize("scale,offset", [(1, 0), (1 << 20, 3), (1 << 40, 0), (1, -3)])
def test_token_id_ranges_and_dtypes(scale, offset):
    """Hashes read ids as unsigned 64-bit words: negative and huge ids must work."""
    rng = np.random.default_rng(scale % 97 + offset + 3)
    tok, ent, mask, correct, group = random_batch(rng, 8, vocab=5)
    tok = tok * scale + offset
    check_against_oracle((tok, ent.double(), mask, correct, group.int()), 3, 0.8)
    # Non-contiguous inputs give the same weights.
    t2 = torch.stack([tok, tok], 2)[:, :, 0]
    assert not t2.is_contiguous() and torch.equal(t2, tok)
    assert torch.equal(
        less_token_weights(t2, ent, mask, correct, group, mu=3),
        less_token_weights(tok, ent, mask, correct, group, mu=3),
    )


def concat_batches(*batches):
    """The rows of several batches (with distinct group ids) in one, padded to the longest T."""
    t = max(b[0].shape[1] for b in batches)
    pad = lambda x: torch.nn.functional.pad(x, (0, t - x.shape[1]))
    return tuple(torch.cat([pad(b[i]) if i < 3 else b[i] for b in batches]) for i in range(5))


def test_scratch_is_sized_for_the_largest_group():
    """Scratch is allocated once per call for the largest group: batches whose groups differ
    widely in size, length and segment count (a group of one-token runs with mu = 1 has the most
    segments a group can have; repetition loops have a longest match at almost every position)."""
    rng = np.random.default_rng(23)
    check_against_oracle(loop_batch(rng, 4), 1, 0.8)
    small = random_batch(rng, 6, max_size=3, max_len=12)
    # One large group of 70 responses alternating low / high entropy: every low token is a segment.
    n, t = 70, 40
    tok = torch.from_numpy(rng.integers(0, 3, size=(n, t)))
    ent = torch.tensor([[0.1, 2.0] * (t // 2)] * n)
    big = (tok, ent, torch.ones(n, t, dtype=torch.bool), torch.arange(n) % 3 == 0, torch.full((n,), -1))
    mixed = concat_batches(small, big)
    check_against_oracle(mixed, 1, 0.5)
    check_against_oracle(mixed, 2, 0.8)


def test_calls_keep_no_state():
    """Nothing is kept between calls: a small batch after a large one (and the reverse) gives the
    same weights as alone."""
    rng = np.random.default_rng(2)
    small, large = random_batch(rng, 3), random_batch(rng, 20, max_size=30, max_len=120)
    first = less_token_weights(*small, mu=3)
    less_token_weights(*large, mu=1)
    assert torch.equal(less_token_weights(*small, mu=3), first)


def test_worked_example_classes_and_shaper():
    """The spec's worked example: classes by token, and what the registered shaper returns."""
    batch = worked_example()
    w, classes = less_token_weights(*batch, mu=3, quantile=0.8, return_classes=True)
    H, D, C, I, S = (
        less.CLASS_HIGH,
        less.CLASS_DEFAULT,
        less.CLASS_CORRECT_ONLY,
        less.CLASS_INCORRECT_ONLY,
        less.CLASS_SHARED,
    )
    assert classes.tolist() == [
        [C, C, C, C, H, S, S, S, D, D],
        [C, C, C, C, H, S, S, S, D, D],
        [I, I, I, I, H, S, S, S, D, D],
        [I, I, I, I, H, D, D, D, D, D],
    ]
    assert [less.CLASS_NAMES[c] for c in range(6)] == list(less_oracle.CLASSES)
    assert (less.CLASS_PAD, H, D, C, I, S) == (0, 1, 2, 3, 4, 5)
    adv = grpo_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.zeros(4, dtype=torch.long))
    keys = ("token_ids", "entropy", "response_mask", "correct", "group_index")
    shaped, stats = get_shaper("less")(adv, dict(zip(keys, batch)), mu=3)
    assert get_shaper("less") is less_shaper
    torch.testing.assert_close(shaped, w * adv[:, None])
    assert torch.equal(stats.pop("token_class"), classes)
    assert all(isinstance(v, float) for v in stats.values())
    # Padding is class 0; every valid token of a group LESS leaves unchanged is untouched (HIGH).
    mask = torch.ones(4, 10, dtype=torch.bool)
    mask[1, 7:] = False
    _, classes = less_token_weights(
        batch[0], batch[1], mask, torch.tensor([True, True, False, False]), torch.tensor([0, 0, 1, 1]),
        mu=3, return_classes=True,
    )  # fmt: skip
    assert classes[1, 7:].eq(less.CLASS_PAD).all() and classes[mask].eq(H).all()
