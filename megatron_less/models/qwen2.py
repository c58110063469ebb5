"""Qwen2 / Qwen2.5 as a megatron-core GPTModel: HF config -> TransformerConfig + GPTModel.

Qwen2.5 = pre-norm decoder, RMSNorm, SwiGLU MLP, RoPE, bias on Q/K/V only, grouped-query
attention; 1.5B ties the LM head to the embedding, 7B does not.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

SUPPORTED_MODEL_TYPES = ("qwen2",)
_ACTIVATIONS = {"silu": F.silu, "swish": F.silu}
VOCAB_DIVISIBLE_BY = 128


class ConfigError(ValueError):
    """A model or parallel-layout setting that cannot work; the message names the field."""


@dataclass(frozen=True)
class Qwen2Arch:
    """The fields of an HF Qwen2Config this project reads, validated."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    hidden_act: str = "silu"
    initializer_range: float = 0.02

    @classmethod
    def from_hf(cls, cfg: Any) -> "Qwen2Arch":
        """From a transformers config, a config.json dict, or a folder/file path."""
        if isinstance(cfg, (str, os.PathLike)):
            path = os.path.join(cfg, "config.json") if os.path.isdir(cfg) else str(cfg)
            if not os.path.exists(path):
                raise ConfigError(f"no config.json at {path}")
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
        d = cfg if isinstance(cfg, dict) else cfg.to_dict()
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type {model_type!r} is not supported (expected one of "
                f"{SUPPORTED_MODEL_TYPES}); this provider builds Qwen2/Qwen2.5 models"
            )
        required = (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads",
        )
        missing = [k for k in required if d.get(k) is None]
        if missing:
            raise ConfigError(f"config is missing required field(s): {', '.join(missing)}")
        heads = d["num_attention_heads"]
        kv_heads = d.get("num_key_value_heads") or heads
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        # transformers 5 keeps rope_theta under rope_parameters; 4.x at top level.
        rope = d.get("rope_parameters") or {}
        rope_theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", (d.get("rope_scaling") or {}).get("type", "default"))
        if rope_type not in (None, "default"):
            raise ConfigError(f"rope scaling {rope_type!r} is not supported (field rope_scaling)")
        arch = cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            hidden_act=d.get("hidden_act", "silu"),
            initializer_range=float(d.get("initializer_range", 0.02)),
        )
        arch.check()
        return arch

    def check(self, tp: int = 1, pp: int = 1) -> None:
        """Raise ConfigError naming the field when the model or layout cannot be built."""
        if self.hidden_act not in _ACTIVATIONS:
            raise ConfigError(
                f"hidden_act {self.hidden_act!r} is not supported (expected one of "
                f"{sorted(_ACTIVATIONS)})"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        for name, v in (("tensor_parallel", tp), ("pipeline_parallel", pp)):
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        if self.num_attention_heads % tp:
            raise ConfigError(
                f"tensor_parallel ({tp}) must divide num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.num_key_value_heads % tp:
            raise ConfigError(
                f"tensor_parallel ({tp}) must divide num_key_value_heads (query groups, "
                f"{self.num_key_value_heads})"
            )
        if self.intermediate_size % tp:
            raise ConfigError(
                f"tensor_parallel ({tp}) must divide intermediate_size ({self.intermediate_size})"
            )
        if self.num_hidden_layers % pp:
            raise ConfigError(
                f"pipeline_parallel ({pp}) must divide num_hidden_layers "
                f"({self.num_hidden_layers})"
            )

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Megatron's rule: pad so every TP shard of the vocabulary has a multiple of 128 rows."""
        m = VOCAB_DIVISIBLE_BY * tp
        return -(-self.vocab_size // m) * m


def transformer_config(
    arch: Qwen2Arch,
    *,
    tp: int = 1,
    pp: int = 1,
    params_dtype: torch.dtype = torch.float32,
    sequence_parallel: bool = False,
    **overrides: Any,
):
    from megatron.core.transformer import TransformerConfig

    arch.check(tp, pp)
    on_gpu = cuda_available()
    kw: dict[str, Any] = dict(
        num_layers=arch.num_hidden_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_key_value_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=_ACTIVATIONS[arch.hidden_act],
        add_bias_linear=False,
        add_qkv_bias=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=arch.initializer_range,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel and tp > 1,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        pipeline_dtype=params_dtype,
        attention_softmax_in_fp32=True,
        # CPU: initialise the full weight and slice it (identical across layouts for one seed).
        # Where the weights are allocated is the real device (runtime.device()), not a probe;
        # the fused kernels below are CUDA/apex-only.
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=True,
        gradient_accumulation_fusion=False,
        # megatron's fused softmax (the local spec's DotProductAttention, fp16/bf16): apex's
        # CUDA extensions, imported at the first forward; TE alone does not ship them.
        masked_softmax_fusion=on_gpu and fused_softmax_available(),
        bias_activation_fusion=on_gpu,  # torch.jit fusions: any CUDA build
        bias_dropout_fusion=on_gpu,
        apply_rope_fusion=False,
        # persist_layer_norm stays off: only apex's FusedLayerNorm (LayerNorm, not RMSNorm) reads
        # it, TE's norms and ours (models.norm) ignore it, and megatron's WrappedTorchNorm asserts
        # it is off (0.16 and 0.19): set, it broke attention sdpa|local next to TE/apex.
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


# The probes of the config logic, one function each, so tests can run the GPU branches on a CPU
# by patching them (never torch): "CUDA present", "TE importable", "apex's fused softmax kernels
# importable" (apex built with its CUDA extensions, as in the NGC image).


def cuda_available() -> bool:
    return torch.cuda.is_available()


def have_te() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformer_engine") is not None


FUSED_SOFTMAX_MODULES = ("scaled_upper_triang_masked_softmax_cuda", "scaled_masked_softmax_cuda",
                         "scaled_softmax_cuda")


def fused_softmax_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in FUSED_SOFTMAX_MODULES)


ATTENTION = ("auto", "sdpa", "local")


def layer_spec(attention: str = "auto", config=None):
    """The transformer spec. ``auto``: TransformerEngine's layer when TE is importable (NGC),
    else megatron-core's local modules with SDPA core attention; ``sdpa``: local modules with
    ``models.attention.SDPAttention``; ``local``: megatron-core's local spec with its unfused
    DotProductAttention. The local specs take ``models.norm.RMSNorm`` (sequence parallelism
    allowed), and with ``config`` they come as this stage's block spec so that the final norm
    is that RMSNorm too. All share parameter names and shapes."""
    from megatron.core.models.gpt import gpt_layer_specs as specs
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    from megatron_less.models.norm import RMSNorm

    if attention not in ATTENTION:
        raise ConfigError(f"attention must be one of {ATTENTION}, got {attention!r}")
    if attention == "auto" and have_te():
        return specs.get_gpt_layer_with_transformer_engine_spec()
    spec = specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = RMSNorm
    if attention != "local":
        from megatron_less.models.attention import SDPAttention

        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    if config is None:
        return spec
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config), layer_norm=RMSNorm)


def build_model(
    arch: Qwen2Arch,
    config,
    *,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    attention: str = "auto",
):
    """One pipeline stage of the model (pre/post-process default to this rank's stage): a
    GPTModel that can also return its final hidden states (``models.gpt_model``)."""
    from megatron.core import parallel_state

    from megatron_less.models.gpt_model import HiddenStatesGPTModel

    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage()
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage()
    return HiddenStatesGPTModel(
        config=config,
        transformer_layer_spec=layer_spec(attention, config),
        vocab_size=arch.padded_vocab_size(config.tensor_model_parallel_size),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta) if float(arch.rope_theta).is_integer() else arch.rope_theta,
    )


# --- HF <-> Megatron tensor mapping -------------------------------------------------------------
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
