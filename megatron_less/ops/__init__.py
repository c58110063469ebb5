"""Fused numerical ops for the RL loss (no megatron import: usable from torch-only scripts)."""

from megatron_less.ops.lm_head import default_tile_tokens, lm_head_logprob_entropy
from megatron_less.ops.vocab_parallel import (
    default_chunk_size,
    fused_available,
    vocab_parallel_logprob_entropy,
)

__all__ = [
    "default_chunk_size",
    "default_tile_tokens",
    "fused_available",
    "lm_head_logprob_entropy",
    "vocab_parallel_logprob_entropy",
]
