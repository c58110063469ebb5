"""DAPO overlong penalty and the dynamic-sampling group filter: hand-computed values."""

from __future__ import annotations

import pytest
import torch

from megatron_less.algos import check_overlong, group_has_signal, overlong_penalty
from megatron_less.algos.registry import KwargError


def test_overlong_penalty_hand_values():
    # max 20, buffer 8: free up to 12, then -1/8 per token, -1 at 20 and beyond
    lengths = torch.tensor([5, 12, 13, 16, 19, 20, 25])
    got = overlong_penalty(lengths, max_tokens=20, buffer=8, factor=1.0)
    assert got.dtype == torch.float32
    assert got.tolist() == [0.0, 0.0, -0.125, -0.5, -0.875, -1.0, -1.0]
    assert not torch.signbit(got[:2]).any()  # +0.0 below the buffer
    half = overlong_penalty(lengths, max_tokens=20, buffer=8, factor=0.5)
    assert half.tolist() == [0.0, 0.0, -0.0625, -0.25, -0.4375, -0.5, -0.5]


def test_overlong_penalty_whole_budget_buffer():
    # buffer = max_tokens: every token costs factor / max_tokens; length 0 costs nothing
    got = overlong_penalty(torch.tensor([0, 1, 2, 4]), max_tokens=4, buffer=4, factor=2.0)
    assert got.tolist() == [0.0, -0.5, -1.0, -2.0]
    assert overlong_penalty(torch.tensor([3]), 4, 4, 0.0).tolist() == [0.0]


@pytest.mark.parametrize(
    "buffer,factor,max_tokens,key",
    [(0, 1.0, 10, "buffer"), (11, 1.0, 10, "buffer"), (2.5, 1.0, 10, "buffer"), (2, -0.1, 10, "factor"),
     (2, float("nan"), 10, "factor"), (1, 1.0, 0, "max_tokens"), (True, 1.0, 10, "buffer")],
)
def test_check_overlong_refusals(buffer, factor, max_tokens, key):
    with pytest.raises(KwargError) as e:
        check_overlong(buffer, factor, max_tokens)
    assert e.value.key == key
    with pytest.raises(KwargError):
        overlong_penalty(torch.tensor([1]), max_tokens, buffer, factor)


def test_check_overlong_accepts_edges():
    check_overlong(1, 0.0, 1)
    check_overlong(10, 1.0, 10)


def test_group_has_signal_cases():
    #           g0 all 1.0  g1 all 0   g2 mixed     g3 singleton  g4 absent  g5 mixed ints-as-float
    values = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.7, 0.5, 0.5, 0.5000001])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 5, 5, 5])
    assert group_has_signal(values, groups).tolist() == [False, False, True, False, False, True]


def test_group_has_signal_interleaved_and_dtypes():
    groups = torch.tensor([1, 0, 1, 0, 2])
    assert group_has_signal(torch.tensor([1, 3, 1, 3, 7]), groups).tolist() == [False, False, False]
    assert group_has_signal(torch.tensor([1, 3, 2, 3, 7]), groups).tolist() == [False, True, False]
    flags = torch.tensor([True, False, True, True, False])
    assert group_has_signal(flags, groups).tolist() == [True, False, False]
    assert group_has_signal(torch.zeros(0), torch.zeros(0, dtype=torch.long)).tolist() == []


def test_group_has_signal_refuses_bad_shapes():
    with pytest.raises(ValueError, match=r"\[B\]"):
        group_has_signal(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=">= 0"):
        group_has_signal(torch.zeros(2), torch.tensor([0, -1]))
