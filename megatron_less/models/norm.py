"""RMSNorm for megatron-core's local layer spec that also runs under sequence parallelism.

megatron's torch norm (``WrappedTorchNorm``, what the local spec and the final norm get without
TransformerEngine or apex) refuses ``sequence_parallel``, yet RMSNorm acts on each token alone:
on a sequence shard it computes exactly its rows of the full result. The one thing sequence
parallelism needs from a norm is its weight's gradient summed over the TP group (each rank saw
only its own tokens); megatron's ``finalize_model_grads`` does that for every parameter marked
``sequence_parallel``, as TransformerEngine's norms are marked. Same parameter name and math as
torch.nn.RMSNorm, so checkpoints and the HF mapping see no difference.
"""

from __future__ import annotations

import torch


class RMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm(hidden_size, eps)`` built from megatron's norm arguments."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_megatron_kwargs):
        if config.normalization != "RMSNorm":
            raise ValueError(f"models.norm.RMSNorm builds RMSNorm only, the config asks for {config.normalization}")
        super().__init__(normalized_shape=hidden_size, eps=eps)
        self.weight.sequence_parallel = bool(config.sequence_parallel)  # finalize_model_grads sums it over TP
