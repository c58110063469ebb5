"""Fused numerical ops for the RL loss (no megatron import: usable from torch-only scripts)."""

from megatron_less.ops.vocab_parallel import (
    default_chunk_size,
    fused_available,
    vocab_parallel_logprob_entropy,
)

__all__ = ["default_chunk_size", "fused_available", "vocab_parallel_logprob_entropy"]
