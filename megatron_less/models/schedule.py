"""One way to run micro-batches through a (possibly pipelined) Megatron model: megatron's own
schedule (1F1B under PP, a plain loop otherwise). Training, old/reference log-probs and the
built-in sampler all go through `run_schedule`, so pipeline stages pass activations the same way
everywhere."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch


def run_schedule(
    model_chunks: list,
    microbatches: Sequence[Any],
    forward_step: Callable,
    *,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
) -> list:
    """``forward_step(data_iter, model) -> (output, loss_fn)`` as megatron expects. Every rank of
    the model-parallel group must call it with the same micro-batches. ``seq_length`` and
    ``micro_batch_size`` give the p2p buffer shape under PP unless the model's config has
    ``variable_seq_lengths`` (then shapes travel with each micro-batch). Returns the loss
    functions' outputs (non-empty on the last pipeline stage only)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(microbatches),
        model=model_chunks,
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


@torch.no_grad()
def forward_logits(model_chunks: list, tokens: torch.Tensor) -> torch.Tensor | None:
    """Vocab-sharded logits [B, L, V_pad/TP] on the last pipeline stage, None on other stages."""
    b, seq = tokens.shape
    pad = -seq % sequence_multiple(model_chunks[0])
    if pad:  # right padding: a causal model's logits at the real positions are unchanged
        tokens = torch.nn.functional.pad(tokens, (0, pad))
    positions = torch.arange(seq + pad, device=tokens.device).expand(b, seq + pad)
    out: list[torch.Tensor] = []

    def step(data_iter, model):
        logits = model(next(data_iter), positions, None)

        def keep(o):
            out.append(o)
            return o.new_zeros(()), {}

        return logits, keep

    run_schedule(model_chunks, [tokens], step, seq_length=seq + pad, micro_batch_size=b, forward_only=True)
    return out[0][:, :seq] if out else None


def sequence_multiple(model) -> int:
    """What a sequence length must be a multiple of: the TP size under sequence parallelism
    (the sequence is split over the TP group), else 1."""
    from megatron.core.utils import get_model_config

    config = get_model_config(model)
    return config.tensor_model_parallel_size if config.sequence_parallel else 1
