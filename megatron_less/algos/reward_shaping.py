"""Reward shaping applied before the advantage estimator.

overlong_penalty: DAPO's soft overlong punishment (Yu et al. 2025, "DAPO: an open-source LLM
reinforcement learning system at scale", eq. 13; verl's `reward_model.overlong_buffer`). A response
inside the last `buffer` tokens of the budget loses reward linearly, up to `factor` at the budget;
truncating at the limit is then penalised smoothly instead of being indistinguishable from a short
wrong answer.
"""

from __future__ import annotations

import torch

from .registry import check_number


def check_overlong(buffer, factor, max_tokens) -> None:
    check_number("max_tokens", max_tokens, low=1, integer=True)
    check_number("buffer", buffer, low=1, high=max_tokens, integer=True)
    check_number("factor", factor, low=0.0)


def overlong_penalty(lengths: torch.Tensor, max_tokens: int, buffer: int, factor: float) -> torch.Tensor:
    """Per response [B] float32: with L_exp = max_tokens - buffer and L = min(length, max_tokens),
    0 if L <= L_exp, else -factor * (L - L_exp) / buffer (so -factor at L = max_tokens)."""
    check_overlong(buffer, factor, max_tokens)
    length = lengths.detach().to(torch.float64).clamp(max=max_tokens)
    over = (length - (max_tokens - buffer)).clamp(min=0.0)
    return (0.0 - float(factor) * over / buffer).to(torch.float32)  # 0 - x: +0.0, not -0.0, below the buffer
