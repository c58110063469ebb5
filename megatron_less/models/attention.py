"""Core attention on torch's scaled_dot_product_attention, for megatron-core's local layer spec.

megatron-core's local ``DotProductAttention`` materialises the [b, heads, s, s] score matrix
(and its softmax) per layer; TransformerEngine, which fuses it, is missing wherever pip cannot
build it. ``SDPAttention`` takes the same place in the spec (same constructor and forward) and
calls ``torch.nn.functional.scaled_dot_product_attention``: flash / memory-efficient kernels on
CUDA, the fused flash kernel on CPU. It has no parameters, so checkpoints and the HF mapping do
not change.

Semantics follow DotProductAttention: causal when its mask type is causal and no mask is given
(a single query, as in decoding with a KV cache, attends to everything); an explicit boolean
``attention_mask`` (True = masked out, broadcastable to [b, heads, sq, sk], e.g. the
block-diagonal mask of packed sequences) replaces the causal mask. Grouped-query attention
without repeating K and V (query head i reads KV group i // (heads / groups), megatron's
layout). One difference, on rows that have no key at all (fully masked padding rows): megatron
fills their scores with -10000 and averages every value uniformly; here such a row attends to
all keys by its scores instead of returning NaN. Neither is a real token.

Packed sequences also come as TE does them: ``packed_seq_params`` in the THD layout (q, k, v
[tokens, heads, d], sequence boundaries in ``cu_seqlens_q``); each sequence then gets its own
causal call (the flash kernels, no [tokens, tokens] mask). The boundaries are read on the host:
``models.packing`` keeps them in CPU memory for this module.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.utils import divide


class SDPAttention(MegatronModule):
    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__(config=config)
        # refuse what this module does not implement instead of computing something else
        unsupported = {
            "context_parallel_size": config.context_parallel_size != 1,
            "window_size": config.window_size is not None,
            "softmax_type": config.softmax_type != "vanilla",
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ValueError(f"SDPAttention does not support {', '.join(bad)}; use attention 'local' or TE")
        tp = tensor_parallel.get_tensor_model_parallel_world_size() if pg_collection is None else pg_collection.tp.size()
        self.attn_mask_type = attn_mask_type
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups, tp)
        # apply_query_key_layer_scaling divides the scores by the layer number and the softmax
        # multiplies it back: the same scale overall
        self.scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None:
            raise ValueError("SDPAttention takes no attention bias")
        if packed_seq_params is not None:
            return self._packed(query, key, value, attention_mask, packed_seq_params)
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        sq, b = query.shape[:2]
        # [s, b, heads, d] -> [b, heads, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask, causal = None, False
        if attention_mask is not None:
            keep = ~attention_mask.bool()
            mask = keep | ~keep.any(-1, keepdim=True)  # a row with no key: all keys (not NaN)
        elif mask_type == AttnMaskType.causal and sq > 1:
            if sq != k.shape[2]:
                raise ValueError(f"causal attention needs as many queries as keys, got {sq} and {k.shape[2]}")
            causal = True
        p = self.dropout if self.training else 0.0
        # dropout draws from megatron's tracked RNG, like DotProductAttention (Qwen2 has none)
        rng = tensor_parallel.get_cuda_rng_tracker().fork() if p > 0 else contextlib.nullcontext()
        with rng:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal,
                                                 scale=self.scale, enable_gqa=self.heads != self.groups)
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)  # [s, b, heads * d]

    def _packed(self, query, key, value, attention_mask, params):
        """THD: q, k, v [t, heads, d] of sequences back to back -> [t, heads * d], each causal."""
        if params.qkv_format != "thd" or attention_mask is not None or self.dropout:
            raise ValueError("SDPAttention takes packed sequences in the THD layout, without a mask or dropout")
        if not torch.equal(params.cu_seqlens_q, params.cu_seqlens_kv) or params.cu_seqlens_q_padded is not None:
            raise ValueError("SDPAttention's packed sequences need the same, unpadded boundaries for q and kv")
        sizes = params.cu_seqlens_q.diff().tolist()  # host memory: no device sync
        if sum(sizes) != query.shape[0]:
            raise ValueError(f"packed sequences of {sum(sizes)} tokens, the input has {query.shape[0]}")
        outs = []
        for q, k, v in zip(*(t.split(sizes) for t in (query, key, value))):
            q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # [1, heads, n, d]
            o = F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, scale=self.scale,
                                               enable_gqa=self.heads != self.groups)  # fmt: skip
            outs.append(o[0].transpose(0, 1))
        return torch.cat(outs).reshape(query.shape[0], -1)
