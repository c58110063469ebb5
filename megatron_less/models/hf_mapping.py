"""HF <-> Megatron tensor mapping for Qwen2 / Qwen2.5: which HF tensors each Megatron parameter
holds (QKV interleaved per query group, gate/up stacked, the vocabulary padded to a multiple of
128 x TP), how each is split over tensor-parallel ranks, and the load of HF weights into one
pipeline stage. The model itself: ``models.qwen2``.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_less.models.qwen2 import Qwen2Arch

# Megatron names are those of one pipeline stage's GPTModel with the layer index made global.
# Both the local spec and the TransformerEngine spec (norms fused into the next linear) map.

_LAYER_MAP = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",  # TE spec
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",  # TE spec
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
    "self_attention.linear_qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                         "self_attn.v_proj.weight"),
    "self_attention.linear_qkv.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias",
                                       "self_attn.v_proj.bias"),
    "mlp.linear_fc1.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
}
_GLOBAL_MAP = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}
# How each Megatron tensor is split across tensor-parallel ranks (None: replicated).
_ROW, _COL = 0, 1


def split_layer_name(meg_name: str) -> tuple[int | None, str]:
    """'decoder.layers.3.mlp.linear_fc2.weight' -> (3, 'mlp.linear_fc2.weight')."""
    if meg_name.startswith("decoder.layers."):
        idx, rest = meg_name[len("decoder.layers."):].split(".", 1)
        return int(idx), rest
    return None, meg_name


def hf_names(meg_name: str, arch: Qwen2Arch) -> tuple[str, ...]:
    """HF tensor names that make up one Megatron tensor (global layer index in meg_name)."""
    layer, rest = split_layer_name(meg_name)
    if layer is None:
        if rest == "output_layer.weight" and arch.tie_word_embeddings:
            return ("model.embed_tokens.weight",)
        if rest not in _GLOBAL_MAP:
            raise KeyError(f"no HF tensor maps to Megatron tensor {meg_name!r}")
        return (_GLOBAL_MAP[rest],)
    if rest not in _LAYER_MAP:
        raise KeyError(f"no HF tensor maps to Megatron tensor {meg_name!r}")
    names = _LAYER_MAP[rest]
    names = (names,) if isinstance(names, str) else names
    return tuple(f"model.layers.{layer}.{n}" for n in names)


def tp_split_dim(meg_name: str) -> int | None:
    _, rest = split_layer_name(meg_name)
    if rest in ("embedding.word_embeddings.weight", "output_layer.weight") or rest.startswith(
        ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias", "mlp.linear_fc1.weight")
    ):
        return _ROW
    if rest in ("self_attention.linear_proj.weight", "mlp.linear_fc2.weight"):
        return _COL
    return None


def _qkv_groups(arch: Qwen2Arch):
    qpg = arch.num_attention_heads // arch.num_key_value_heads
    return arch.num_key_value_heads, qpg * arch.head_dim, arch.head_dim


def megatron_shard(
    meg_name: str, hf: dict[str, torch.Tensor], arch: Qwen2Arch, tp: int = 1, tp_rank: int = 0
) -> torch.Tensor:
    """This TP rank's shard of one Megatron tensor, built from its HF tensors (``hf`` holds at
    least ``hf_names(meg_name)``)."""
    _, rest = split_layer_name(meg_name)
    parts = [hf[n] for n in hf_names(meg_name, arch)]
    if rest.startswith("self_attention.linear_qkv."):
        ng, qd, hd = _qkv_groups(arch)
        q, k, v = (p.reshape(ng, -1, *p.shape[1:]) for p in parts)
        # Megatron keeps [q heads of group g, k_g, v_g] together so a TP shard owns whole groups.
        full = torch.cat([q, k, v], dim=1).reshape(ng * (qd + 2 * hd), *parts[0].shape[1:])
        return full.chunk(tp, dim=0)[tp_rank].clone()
    if rest == "mlp.linear_fc1.weight":
        gate, up = parts
        return torch.cat([gate.chunk(tp, 0)[tp_rank], up.chunk(tp, 0)[tp_rank]], dim=0).clone()
    (t,) = parts
    if rest in ("embedding.word_embeddings.weight", "output_layer.weight"):
        pad = arch.padded_vocab_size(tp) - t.shape[0]
        if pad < 0:
            raise ValueError(
                f"{hf_names(meg_name, arch)[0]} has {t.shape[0]} rows, more than the padded "
                f"vocabulary {arch.padded_vocab_size(tp)}"
            )
        t = torch.cat([t, t.new_zeros(pad, *t.shape[1:])], dim=0)
    dim = tp_split_dim(meg_name)
    return (t if dim is None else t.chunk(tp, dim=dim)[tp_rank]).clone()


def hf_tensors(meg_name: str, shards: list[torch.Tensor], arch: Qwen2Arch) -> dict[str, torch.Tensor]:
    """Inverse of ``megatron_shard``: all TP shards of one Megatron tensor -> its HF tensors."""
    _, rest = split_layer_name(meg_name)
    names = hf_names(meg_name, arch)
    if rest.startswith("self_attention.linear_qkv."):
        ng, qd, hd = _qkv_groups(arch)
        full = _cat(shards, 0)
        full = full.reshape(ng, qd + 2 * hd, *full.shape[1:])
        q, k, v = full.split([qd, hd, hd], dim=1)
        return {n: t.reshape(-1, *t.shape[2:]).contiguous() for n, t in zip(names, (q, k, v))}
    if rest == "mlp.linear_fc1.weight":
        halves = [s.chunk(2, dim=0) for s in shards]
        gate = _cat([h[0] for h in halves], 0)
        up = _cat([h[1] for h in halves], 0)
        return {names[0]: gate, names[1]: up}
    dim = tp_split_dim(meg_name)
    t = shards[0] if dim is None else _cat(shards, dim)
    if rest in ("embedding.word_embeddings.weight", "output_layer.weight"):
        t = t[: arch.vocab_size]
    return {names[0]: t.contiguous()}


def _cat(shards: list[torch.Tensor], dim: int) -> torch.Tensor:
    """One shard (TP1) is returned as is: a copy of every weight would double the weight sync's
    memory traffic. The result may then alias the parameter; readers copy it before it changes."""
    return shards[0] if len(shards) == 1 else torch.cat(shards, dim=dim)


def global_name(local_name: str, layer_offset: int) -> str:
    layer, rest = split_layer_name(local_name)
    return local_name if layer is None else f"decoder.layers.{layer + layer_offset}.{rest}"


def layer_offset(model) -> int:
    """Global index of this stage's first transformer layer."""
    layers = model.decoder.layers
    return layers[0].layer_number - 1 if len(layers) else 0


@torch.no_grad()
def load_hf_weights(model, hf: dict[str, torch.Tensor] | Any, arch: Qwen2Arch) -> None:
    """Copy HF-named full tensors into this rank's stage/shard of ``model``.

    ``hf`` is a dict or anything with ``__getitem__`` (e.g. a lazy safetensors reader)."""
    from megatron.core import parallel_state as ps

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    offset = layer_offset(model)
    for name, param in model.named_parameters():
        gname = global_name(name, offset)
        src = megatron_shard(gname, {n: hf[n] for n in hf_names(gname, arch)}, arch, tp, tp_rank)
        if src.shape != param.shape:
            raise ValueError(
                f"shape mismatch for {gname} (from {', '.join(hf_names(gname, arch))}): "
                f"checkpoint gives {tuple(src.shape)}, model expects {tuple(param.shape)}"
            )
        param.copy_(src.to(param.dtype))
