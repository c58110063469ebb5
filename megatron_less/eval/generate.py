"""A text-in, text-out ``generate_fn`` for evaluation, backed by a model on disk and a rollout
engine (vLLM when installed, else the built-in Megatron sampler)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch


def model_generate_fn(
    model: str | os.PathLike,
    tokenizer=None,
    *,
    engine: str = "auto",
    tp: int = 1,
    pp: int = 1,
    rollout_tp: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """Build the policy from an HF folder or a megatron-less checkpoint and return
    ``generate(prompts, n, temperature, top_p, max_tokens) -> list[list[str]]``.

    Collective under torchrun: every rank calls it and gets all responses."""
    from megatron_less.checkpoints.hf import load_hf_checkpoint
    from megatron_less.checkpoints.model import checkpoint_arch, is_megatron_checkpoint, load_checkpoint
    from megatron_less.data.tokenizer import load_tokenizer, stop_token_ids
    from megatron_less.models.qwen2 import ConfigError, Qwen2Arch
    from megatron_less.parallel import runtime
    from megatron_less.models.policy import build_frozen

    path = Path(model)
    if not path.is_dir():
        raise FileNotFoundError(f"model {path} is not a folder (HF checkpoint or megatron-less checkpoint)")
    is_ckpt = is_megatron_checkpoint(path)
    arch = checkpoint_arch(path) if is_ckpt else Qwen2Arch.from_hf(path)
    try:  # before any process group exists: a wrong layout fails in seconds, not after startup
        arch.check(tp, pp)
    except ConfigError as e:
        raise ConfigError(f"--tp {tp} --pp {pp} cannot run {path}: {e}") from None
    if tokenizer is None:
        tokenizer = load_tokenizer(path)
    elif isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    stop = stop_token_ids(tokenizer, path)

    runtime.initialize(tp, pp, seed=seed)
    model_chunks = build_frozen(arch, tp=tp, pp=pp, params_dtype=dtype)
    if is_ckpt:
        load_checkpoint(model_chunks[0], path, arch)
    else:
        load_hf_checkpoint(model_chunks[0], path, arch)

    if engine == "auto":
        engine = "vllm" if importlib.util.find_spec("vllm") else "builtin"
    if engine == "vllm":
        from megatron_less.rollout.vllm_engine import VLLMEngine

        rollout = VLLMEngine(arch, rollout_tp=rollout_tp, seed=seed,
                             dtype={torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(dtype, "float16"))
        rollout.sync_weights(model_chunks[0])
    elif engine == "builtin":
        from megatron_less.rollout.builtin import BuiltinSampler

        rollout = BuiltinSampler(model_chunks, arch)
    else:
        raise ValueError(f"engine must be 'auto', 'vllm' or 'builtin', got {engine!r}")

    return engine_generate_fn(rollout, tokenizer, stop, seed)


def engine_generate_fn(rollout, tokenizer, stop_ids: tuple[int, ...], seed: int):
    """Text in, text out over a rollout engine (collective, as the engine's ``generate``); the
    trainer's in-run evaluation and the eval command share it."""
    from megatron_less.rollout.base import SamplingParams

    def generate(prompts, n, temperature, top_p, max_tokens):
        ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        params = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens,
                                seed=seed, stop_token_ids=stop_ids)
        out = rollout.generate(ids, n, params)
        return [[tokenizer.decode(r.token_ids, skip_special_tokens=True) for r in rs] for rs in out]

    generate.engine = rollout
    return generate
