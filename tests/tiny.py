"""Tiny random Qwen2 models for tests: real transformers checkpoints, real code paths."""

from __future__ import annotations

import torch

BASE = dict(
    model_type="qwen2",
    vocab_size=250,  # not a multiple of 128: exercises vocab padding
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    max_position_embeddings=256,
    tie_word_embeddings=True,
    hidden_act="silu",
)


def hf_config(**overrides):
    from transformers import Qwen2Config

    d = dict(BASE, **overrides)
    d.pop("model_type")
    return Qwen2Config(**d)


def hf_model(seed: int = 0, **overrides):
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(hf_config(**overrides)).float().eval()


def save_hf_model(path, seed: int = 0, **overrides):
    model = hf_model(seed, **overrides)
    model.save_pretrained(path)
    return model


# vLLM's CPU attention needs head_dim in {32, 64, ...}; a wide init makes greedy outputs vary
# instead of repeating one token, so generation tests can tell engines apart.
ROLLOUT = dict(hidden_size=128, intermediate_size=256, initializer_range=0.3)
