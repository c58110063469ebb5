"""This rank's models: the trained policy (GPTModel stage -> megatron DDP -> megatron optimizer)
and frozen forward-only models (evaluation, a KL reference): no DDP, no optimizer, no gradient
buffers, so they cost only their weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from megatron_less.models import hf_mapping, qwen2
from megatron_less.models.schedule import run_schedule


@dataclass
class OptimConfig:
    lr: float = 1e-6
    min_lr: float = 0.0  # megatron's LR schedules read it from each param group
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    # The distributed optimizer shards optimizer state over DP; on megatron-core 0.16.1 without
    # apex its checkpoint reload is broken (see docs), so it is opt-in.
    use_distributed_optimizer: bool = False


@dataclass
class Policy:
    arch: qwen2.Qwen2Arch
    config: Any  # TransformerConfig
    model: list  # model chunks, each wrapped in megatron DDP
    optimizer: Any  # MegatronOptimizer

    @property
    def module(self):
        """The unwrapped GPTModel of this stage."""
        return self.model[0].module


def build_model_stage(arch: qwen2.Qwen2Arch, *, tp: int, pp: int, params_dtype: torch.dtype,
                      hf_weights: Any = None, attention: str = "auto", **config_overrides: Any):
    """(TransformerConfig, this rank's GPTModel stage on the compute device). ``attention``: see
    ``qwen2.layer_spec``; ``config_overrides``: TransformerConfig fields (e.g. recompute_*)."""
    config = qwen2.transformer_config(arch, tp=tp, pp=pp, params_dtype=params_dtype, **config_overrides)
    module = qwen2.build_model(arch, config, attention=attention)
    # The local spec's norms are torch modules, built in the default dtype (fp32) whatever
    # params_dtype says; a model of mixed dtypes breaks megatron's distributed optimizer (its
    # shard order disagrees with its parameter map inside a param group that mixes fp32 and bf16),
    # so the whole stage takes params_dtype, as Megatron-LM's Float16Module does.
    module.to(dtype=params_dtype)
    if hf_weights is not None:
        hf_mapping.load_hf_weights(module, hf_weights, arch)
    if torch.cuda.is_available():
        module.cuda()
    return config, module


def build_frozen(
    arch: qwen2.Qwen2Arch,
    *,
    tp: int = 1,
    pp: int = 1,
    params_dtype: torch.dtype = torch.float32,
    hf_weights: Any = None,
    **config_overrides: Any,
) -> list:
    """A forward-only model (list of chunks, as the schedules take): eval mode, no grads."""
    _, module = build_model_stage(arch, tp=tp, pp=pp, params_dtype=params_dtype, hf_weights=hf_weights,
                                  perform_initialization=hf_weights is None, **config_overrides)
    module.eval()
    module.requires_grad_(False)
    return [module]


def build_policy(
    arch: qwen2.Qwen2Arch,
    *,
    tp: int = 1,
    pp: int = 1,
    params_dtype: torch.dtype = torch.float32,
    optim: OptimConfig | None = None,
    hf_weights: Any = None,
    **config_overrides: Any,
) -> Policy:
    """Needs ``parallel.runtime.initialize(tp, pp)`` first. ``hf_weights`` (HF-named tensors)
    initialise the model identically at every layout; otherwise megatron's seeded init."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    optim = optim or OptimConfig()
    config, module = build_model_stage(arch, tp=tp, pp=pp, params_dtype=params_dtype, hf_weights=hf_weights,
                                       **config_overrides)
    ddp = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=optim.use_distributed_optimizer,
        ),
        module,
    )
    # Without this, the schedule neither all-reduces DP grads nor syncs tied-embedding grads
    # between the first and last pipeline stage.
    config.finalize_model_grads_func = finalize_model_grads
    bf16 = params_dtype == torch.bfloat16
    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=optim.lr,
            min_lr=optim.min_lr,
            weight_decay=optim.weight_decay,
            adam_beta1=optim.adam_beta1,
            adam_beta2=optim.adam_beta2,
            adam_eps=optim.adam_eps,
            clip_grad=optim.clip_grad,
            bf16=bf16,
            params_dtype=params_dtype,
            use_distributed_optimizer=optim.use_distributed_optimizer,
        ),
        [ddp],
    )
    return Policy(arch=arch, config=config, model=[ddp], optimizer=optimizer)


def forward_backward(
    policy: Policy,
    microbatches: Sequence[Any],
    forward_step: Callable,
    *,
    seq_length: int,
    micro_batch_size: int,
    num_microbatches: int | None = None,
    forward_only: bool = False,
) -> list:
    """Zero the gradients (unless forward-only), then one pass over the micro-batches with
    megatron's schedule. Returns the loss functions' outputs (last pipeline stage only)."""
    microbatches = list(microbatches)
    if num_microbatches is not None and num_microbatches != len(microbatches):
        raise ValueError(f"num_microbatches={num_microbatches} but {len(microbatches)} micro-batches given")
    if not forward_only:
        for chunk in policy.model:
            chunk.zero_grad_buffer()
        policy.optimizer.zero_grad()
    return run_schedule(policy.model, microbatches, forward_step, seq_length=seq_length,
                        micro_batch_size=micro_batch_size, forward_only=forward_only)
