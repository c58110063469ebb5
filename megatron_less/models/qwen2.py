"""Qwen2 / Qwen2.5 as a megatron-core GPTModel: HF config -> TransformerConfig + GPTModel
(the HF <-> Megatron tensor mapping: ``models.hf_mapping``).

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
