"""Stream a pipeline stage's weights as full HF-named tensors by all-gathering TP shards.

Used by the HF exporter, the vLLM weight sync and tests. Every TP rank of the stage must iterate
in step (each tensor is one all-gather over the TP group); only one full tensor is live at a time.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist

from megatron_less.models import hf_mapping, qwen2


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

    A tied LM head on the last stage is skipped (it is the embedding). Without TP most tensors
    are views of the parameters (no copy): clone what must outlive the next optimizer step."""
    offset = hf_mapping.layer_offset(model)
    for name, param in model.named_parameters():
        gname = hf_mapping.global_name(name, offset)
        if gname == "output_layer.weight" and arch.tie_word_embeddings:
            continue
        shards = _tp_shards(param.detach()) if hf_mapping.tp_split_dim(gname) is not None else [param.detach()]
        yield from hf_mapping.hf_tensors(gname, shards, arch).items()


@torch.no_grad()
def iter_all_hf_tensors(model, arch: qwen2.Qwen2Arch) -> Iterator[tuple[str, torch.Tensor]]:
    """Every full HF tensor of the whole model, on every rank: each pipeline stage in turn
    all-gathers its TP shards and broadcasts the result to the other stages."""
    from megatron.core import parallel_state as ps

    pp = ps.get_pipeline_model_parallel_world_size()
    if pp == 1:
        yield from iter_hf_tensors(model, arch)
        return
    group = ps.get_pipeline_model_parallel_group()
    ranks = dist.get_process_group_ranks(group)
    me = ps.get_pipeline_model_parallel_rank()
    # Receivers need names, shapes and dtypes to allocate; stages exchange them once per call.
    mine = [(n, tuple(t.shape), t.dtype) for n, t in _stage_meta(model, arch)]
    metas: list = [None] * pp
    dist.all_gather_object(metas, mine, group=group)
    device = next(model.parameters()).device  # nccl moves GPU tensors only
    for stage in range(pp):
        source = iter_hf_tensors(model, arch) if stage == me else None
        for name, shape, dtype in metas[stage]:
            if source is not None:
                _, t = next(source)
                t = t.contiguous()
            else:
                t = torch.empty(shape, dtype=dtype, device=device)
            dist.broadcast(t, ranks[stage], group=group)
            yield name, t


def _stage_meta(model, arch: qwen2.Qwen2Arch) -> Iterator[tuple[str, torch.Tensor]]:
    """Names and shapes of this stage's HF tensors, without communication (meta tensors)."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    offset = hf_mapping.layer_offset(model)
    for name, param in model.named_parameters():
        gname = hf_mapping.global_name(name, offset)
        if gname == "output_layer.weight" and arch.tie_word_embeddings:
            continue
        meta = param.detach().to("meta")
        shards = [meta] * tp if hf_mapping.tp_split_dim(gname) is not None else [meta]
        yield from hf_mapping.hf_tensors(gname, shards, arch).items()
