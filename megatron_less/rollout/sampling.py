"""Next-token sampling with temperature, top-k and top-p, reporting the sampled token's log-prob
under the tempered distribution over the full vocabulary, before truncation (the contract in
rollout/base.py)."""

from __future__ import annotations

import torch

from megatron_less.rollout.base import SamplingParams


def sample_next(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> tuple[int, float]:
    """``logits`` [V] float32. Greedy (argmax, log-prob at temperature 1) when temperature == 0."""
    if params.temperature == 0:
        tok = int(torch.argmax(logits))
        return tok, float(torch.log_softmax(logits, -1)[tok])
    scaled = logits / params.temperature
    logp = torch.log_softmax(scaled, -1)
    filtered = scaled.clone()
    if 0 < params.top_k < filtered.numel():
        kth = torch.topk(filtered, params.top_k).values[-1]
        filtered[filtered < kth] = float("-inf")
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(filtered, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = torch.cumsum(probs, -1) - probs >= params.top_p
        filtered[order[drop]] = float("-inf")
    probs = torch.softmax(filtered, -1)
    tok = int(torch.multinomial(probs, 1, generator=gen))
    return tok, float(logp[tok])
