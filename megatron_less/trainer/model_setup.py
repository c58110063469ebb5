"""Build this rank's policy: GPTModel stage -> megatron DDP -> megatron optimizer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from megatron_less.models import qwen2


@dataclass
class OptimConfig:
    lr: float = 1e-6
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
    config = qwen2.transformer_config(arch, tp=tp, pp=pp, params_dtype=params_dtype, **config_overrides)
    module = qwen2.build_model(arch, config)
    if hf_weights is not None:
        qwen2.load_hf_weights(module, hf_weights, arch)
    if torch.cuda.is_available():
        module.cuda()
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
    microbatches: Iterable[Any],
    forward_step: Callable,
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
) -> list[dict]:
    """One pass over the micro-batches with megatron's schedule (1F1B under PP).

    Returns the loss functions' metric dicts (non-empty on the last pipeline stage only)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not forward_only:
        for chunk in policy.model:
            chunk.zero_grad_buffer()
        policy.optimizer.zero_grad()
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(microbatches),
        model=policy.model,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )
