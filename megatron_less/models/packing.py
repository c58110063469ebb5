"""Where packed sequences start, told to the model: sequences laid back to back in one row must
not attend across their boundaries, and their positions restart at 0.

TransformerEngine's attention, and ours (``models.attention.SDPAttention``: one causal flash call
per sequence), take the boundaries as megatron's ``PackedSeqParams`` in the THD layout
(cumulative lengths, no mask); megatron's RoPE then restarts per sequence from them. megatron's
local ``DotProductAttention`` refuses ``packed_seq_params`` but takes an explicit mask: causal
within each sequence, block-diagonal across them ([tokens, tokens] booleans, and its own
[heads, tokens, tokens] scores). The row's padded tail, if any, is a sequence of its own.
"""

from __future__ import annotations

import torch


def attention_kind(model) -> str:
    """"te", "sdpa" or "local": the model's core attention (what it can take packed rows as)."""
    from megatron.core.utils import get_attr_wrapped_model

    from megatron_less.models.attention import SDPAttention

    decoder = get_attr_wrapped_model(model, "decoder")
    if not len(decoder.layers):
        return "local"
    core = decoder.layers[0].self_attention.core_attention
    if isinstance(core, SDPAttention):
        return "sdpa"
    return "te" if type(core).__name__.startswith("TE") else "local"


def packed_inputs(lengths: list[int], width: int, device, *, kind: str) -> dict:
    """GPTModel.forward's ``position_ids``, ``attention_mask`` and ``packed_seq_params`` for one row
    holding sequences of ``lengths`` back to back, padded to ``width``, for attention ``kind``
    (``attention_kind``): THD boundaries ("te": on the device, as TE's kernels read them; "sdpa":
    in host memory), or a block-diagonal causal mask ("local")."""
    segments = list(lengths) + ([width - sum(lengths)] if width > sum(lengths) else [])
    if sum(segments) != width or min(segments) < 1:
        raise ValueError(f"sequences of lengths {lengths} do not fill a packed row of {width} tokens")
    sizes = torch.tensor(segments)
    starts = torch.cumsum(sizes, 0) - sizes
    positions = (torch.arange(width) - torch.repeat_interleave(starts, sizes))[None].to(device)
    if kind in ("te", "sdpa"):
        from megatron.core.packed_seq_params import PackedSeqParams

        cu = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(sizes, 0)]).to(torch.int32)
        cu = cu.to(device) if kind == "te" else cu
        longest = int(sizes.max())
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                                 max_seqlen_kv=longest)  # fmt: skip
        return {"position_ids": positions, "attention_mask": None, "packed_seq_params": params}
    if kind != "local":
        raise ValueError(f"attention kind must be te, sdpa or local, got {kind!r}")
    segment = torch.repeat_interleave(torch.arange(len(segments)), sizes)
    allowed = torch.ones(width, width, dtype=torch.bool).tril() & (segment[:, None] == segment[None, :])
    return {"position_ids": positions, "attention_mask": (~allowed)[None, None].to(device)}  # True = masked
