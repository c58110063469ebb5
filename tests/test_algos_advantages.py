"""Group advantage estimators, the registry, and estimator + shaper composition."""

from __future__ import annotations

import statistics

import pytest
import torch

from megatron_less import algos
from megatron_less.algos import registry
from megatron_less.algos.advantages import drgrpo_advantages, grpo_advantages, rloo_advantages


def per_group_reference(rewards, groups, kind, eps=1e-6):
    out = []
    for r, g in zip(rewards, groups):
        mates = [x for x, h in zip(rewards, groups) if h == g]
        if len(set(mates)) == 1:
            out.append(0.0)
        elif kind == "grpo":
            out.append((r - statistics.mean(mates)) / (statistics.stdev(mates) + eps))
        elif kind == "drgrpo":
            out.append(r - statistics.mean(mates))
        else:
            others = list(mates)
            others.remove(r)
            out.append(r - statistics.mean(others))
    return out


def test_grpo_worked_example():
    adv = grpo_advantages(torch.tensor([1.0, 1.0, 0.0, 0.0]), torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(adv, torch.tensor([1, 1, -1, -1.0]) * 0.8660254, rtol=0, atol=2e-6)


@pytest.mark.parametrize(
    "kind,fn", [("grpo", grpo_advantages), ("drgrpo", drgrpo_advantages), ("rloo", rloo_advantages)]
)
def test_interleaved_unequal_groups(kind, fn):
    g = torch.Generator().manual_seed(0)
    groups = torch.tensor([7, -3, 7, 10**12, -3, 7, 5, 10**12, 7, -3])  # 5 is a singleton
    rewards = torch.randint(0, 3, (10,), generator=g).double() + torch.rand(
        10, generator=g, dtype=torch.float64
    )
    rewards[groups == 10**12] = 0.5  # an all-equal group
    got = fn(rewards, groups)
    expect = per_group_reference(rewards.tolist(), groups.tolist(), kind)
    torch.testing.assert_close(got, torch.tensor(expect, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert got.dtype == torch.float64


@pytest.mark.parametrize("fn", [grpo_advantages, drgrpo_advantages, rloo_advantages])
def test_identical_rewards_give_exact_zeros(fn):
    adv = fn(torch.full((6,), 0.1), torch.tensor([0, 0, 0, 1, 1, 2]))
    assert adv.eq(0).all() and adv.dtype == torch.float32


def test_integer_and_bool_rewards():
    adv = rloo_advantages(torch.tensor([True, False, False, False]), torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(adv, torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))
    assert drgrpo_advantages(torch.tensor([2, 0]), torch.tensor([1, 1])).tolist() == [1.0, -1.0]


def test_registry_lookup_and_errors():
    assert algos.get_advantage("grpo") is grpo_advantages
    assert algos.get_advantage("dr_grpo")(torch.tensor([1.0, 0.0]), torch.tensor([0, 0])).tolist() == [
        0.5,
        -0.5,
    ]
    with pytest.raises(KeyError, match=r"unknown advantage 'gpro'; valid: .*grpo.*rloo"):
        algos.get_advantage("gpro")
    with pytest.raises(KeyError, match="unknown shaper 'lesss'; valid: less, none"):
        algos.get_shaper("lesss")
    with pytest.raises(
        KeyError, match="unknown policy_loss 'ppo'; valid: clip_cov, forking_tokens, kl_cov, ppo_clip"
    ):
        algos.get_policy_loss("ppo")
    with pytest.raises(ValueError, match="already registered"):
        algos.register_advantage("grpo")(lambda r, g: r)
    # the refused registration left the original's group-size rule alone
    from megatron_less.algos.registry import min_group_size

    assert min_group_size("grpo") == 2


def test_register_new_algorithm_in_one_place():
    @algos.register_shaper("test_double")
    def double(adv, batch):
        return 2 * adv[:, None] * batch["response_mask"], {"doubled": 1.0}

    batch = {"response_mask": torch.tensor([[1.0, 1.0], [1.0, 0.0]])}
    try:
        tok_adv, stats = algos.compute_token_advantages(
            torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), batch, estimator="drgrpo", shaper="test_double"
        )
    finally:
        registry._REGISTRIES["shaper"].pop("test_double")
    assert tok_adv.tolist() == [[1.0, 1.0], [-1.0, 0.0]] and stats == {"doubled": 1.0}


def test_grpo_plus_less_composes_from_names():
    batch = {
        "token_ids": torch.tensor([[5, 6, 7, 8, 1, 9, 9, 9, 2, 4], [5, 6, 7, 8, 3, 9, 9, 9, 4, 4],
                                   [7, 7, 7, 7, 1, 9, 9, 9, 2, 2], [7, 7, 7, 7, 3, 6, 6, 6, 2, 2]]),
        "entropy": torch.tensor([[0.1] * 4 + [3] + [0.1] * 3 + [2, 0.1], [0.1] * 4 + [3] + [0.2] * 3 + [2, 0.1],
                                 [0.1] * 4 + [3] + [0.1] * 3 + [2, 0.1], [0.1] * 4 + [3] + [0.1] * 3 + [2, 0.1]]),
        "response_mask": torch.ones(4, 10, dtype=torch.bool),
        "correct": torch.tensor([True, True, False, False]),
        "group_index": torch.zeros(4, dtype=torch.long),
    }  # fmt: skip
    rewards = batch["correct"].float()
    plain, _ = algos.compute_token_advantages(rewards, batch["group_index"], batch)
    shaped, stats = algos.compute_token_advantages(
        rewards, batch["group_index"], batch, shaper="less", shaper_kwargs={"mu": 3}
    )
    assert torch.equal(plain, grpo_advantages(rewards, batch["group_index"])[:, None].expand(4, 10))
    assert shaped[0, 5] == 0 and shaped[3, 5] == pytest.approx(-0.4330127, abs=1e-6)
    assert stats["clusters_shared"] == 1.0


def test_algos_import_no_distributed_or_megatron():
    """algos is pure tensor math: the trainer passes global counts in instead."""
    import ast
    import pathlib

    for path in pathlib.Path(algos.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert not name.startswith(("torch.distributed", "megatron.")), (path.name, name)
