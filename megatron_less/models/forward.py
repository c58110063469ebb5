"""Forward-only passes of a (possibly pipelined) Megatron model, returning logits."""

from __future__ import annotations

import torch


@torch.no_grad()
def forward_logits(model_chunks: list, tokens: torch.Tensor) -> torch.Tensor | None:
    """Vocab-sharded logits [B, L, V_pad/TP] on the last pipeline stage, None on other stages.

    Runs megatron's schedule (forward_only) so pipeline stages pass activations as in training;
    every rank of the model-parallel group must call it with the same ``tokens``."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    b, seq = tokens.shape
    positions = torch.arange(seq, device=tokens.device).expand(b, seq)
    out: list[torch.Tensor] = []

    def step(data_iter, model):
        t = next(data_iter)
        logits = model(t, positions, None)

        def keep(o):
            out.append(o)
            return o.new_zeros(()), {}

        return logits, keep

    get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=iter([tokens]),
        model=model_chunks,
        num_microbatches=1,
        seq_length=seq,
        micro_batch_size=b,
        forward_only=True,
    )
    return out[0] if out else None
