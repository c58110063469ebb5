"""Stream a pipeline stage's weights as full HF-named tensors by all-gathering TP shards.

Used by the HF exporter, the vLLM weight sync and tests. Every TP rank of the stage must iterate
in step (each tensor is one all-gather over the TP group); only one full tensor is live at a time.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist

from megatron_less.models import qwen2


def _tp_shards(t: torch.Tensor) -> list[torch.Tensor]:
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return [t]
    shards = [torch.empty_like(t) for _ in range(tp)]
    dist.all_gather(shards, t.contiguous(), group=ps.get_tensor_model_parallel_group())
    return shards


@torch.no_grad()
def iter_hf_tensors(model, arch: qwen2.Qwen2Arch) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) for every weight of this rank's pipeline stage, in model order.

    A tied LM head on the last stage is skipped (it is the embedding)."""
    offset = qwen2.layer_offset(model)
    for name, param in model.named_parameters():
        gname = qwen2.global_name(name, offset)
        if gname == "output_layer.weight" and arch.tie_word_embeddings:
            continue
        shards = _tp_shards(param.detach()) if qwen2.tp_split_dim(gname) is not None else [param.detach()]
        yield from qwen2.hf_tensors(gname, shards, arch).items()
