"""The CPU answers to megatron-core's CUDA-only spots (see the package docstring)."""

from __future__ import annotations

from typing import Callable

import torch

from megatron_less.parallel.mcore_compat.patch import Patch


def _cpu_device(device):
    """Map CUDA device designators to the CPU (megatron passes 'cuda', ints, torch.device)."""
    if device is None:
        return None
    if isinstance(device, int):
        return "cpu"
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


class _CudaOnCpu:
    """``torch.cuda`` as megatron-core uses it, answered by the CPU."""

    def current_device(self):
        return "cpu"

    def synchronize(self, device=None):
        pass

    def is_available(self):
        return False

    # The "CUDA" RNG of megatron's tracker is the CPU default generator on this machine.
    def get_rng_state(self, device=None):
        return torch.get_rng_state()

    def set_rng_state(self, state, device=None):
        torch.set_rng_state(state)

    def manual_seed(self, seed):
        torch.manual_seed(seed)

    @property
    def random(self):
        return self

    def current_stream(self, device=None):
        return _NO_STREAM  # CPU work is ordered already: waits on it are no-ops

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _NoStream:
    def wait_event(self, event):
        pass

    def wait_stream(self, stream):
        pass


_NO_STREAM = _NoStream()


def _with_cpu_device(fn):
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    wrapper.__name__ = fn.__name__
    return wrapper


class _TorchOnCpu:
    """The ``torch`` module seen by one patched megatron module."""

    cuda = _CudaOnCpu()
    zeros = staticmethod(_with_cpu_device(torch.zeros))
    ones = staticmethod(_with_cpu_device(torch.ones))
    empty = staticmethod(_with_cpu_device(torch.empty))
    tensor = staticmethod(_with_cpu_device(torch.tensor))
    full = staticmethod(_with_cpu_device(torch.full))
    arange = staticmethod(_with_cpu_device(torch.arange))

    def __getattr__(self, name):
        return getattr(torch, name)


_TORCH_ON_CPU = _TorchOnCpu()


def _sync_tied_embedding_on_cpu(method):
    """``LanguageModule.setup_embeddings_and_output_layer`` ends, for the stages that share the
    embedding, with ``weight.data = weight.data.cuda()`` and an all-reduce over the embedding
    group, both behind ``if self._is_in_embd_group():``. For the duration of the call that guard
    answers "no" on this one model object (an instance attribute shadowing the method), so
    megatron runs everything else unchanged and never reaches the CUDA move; the all-reduce it
    skipped then runs here on the CPU weight. Nothing process-wide (no ``Tensor.cuda`` swap)."""

    def wrapper(self, *args, **kwargs):
        reached = []

        def not_in_group():
            reached.append(True)  # megatron got to the sync: it must still happen
            return False

        self.__dict__["_is_in_embd_group"] = not_in_group
        try:
            out = method(self, *args, **kwargs)
        finally:
            del self.__dict__["_is_in_embd_group"]
        if reached and self._is_in_embd_group():
            weight = self.shared_embedding_or_output_weight()
            torch.distributed.all_reduce(weight.data, group=self.embd_group)
        return out

    wrapper.__name__ = method.__name__
    return wrapper


def _cuda_type_names_while_building(build):
    """megatron's mixed-precision and distributed optimizers sort the parameters they wrap by
    ``param.type()`` against ``'torch.cuda.BFloat16Tensor'``-style names and refuse any other
    (CPU names included); the checks run only while the optimizer is built. For that call each
    parameter of the model answers ``type()`` with its CUDA name (an instance attribute shadowing
    the method on that parameter object only, removed after); nothing process-wide."""

    def wrapper(config, model_chunks, *args, **kwargs):
        params = [p for chunk in model_chunks for p in chunk.parameters()]
        for p in params:
            p.type = _cuda_named(p)
        try:
            return build(config, model_chunks, *args, **kwargs)
        finally:
            for p in params:
                del p.type

    wrapper.__name__ = build.__name__
    return wrapper


def _cuda_named(tensor):
    real = type(tensor).type  # the method, unbound

    def named(*args, **kwargs):
        name = real(tensor, *args, **kwargs)
        if args or kwargs or tensor.is_cuda:
            return name
        return name.replace("torch.", "torch.cuda.", 1)

    return named


def _torch_proxy(*modules: str) -> dict[str, dict[str, Callable[[], object]]]:
    return {m: {"torch": lambda: _TORCH_ON_CPU} for m in modules}


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    # megatron's version asserts param.grad.type() == 'torch.cuda.FloatTensor' before scaling.
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


PATCHES: dict[str, Patch] = {
    p.name: p
    for p in [
        Patch(
            "rotary_device",
            "RoPE places inv_freq on torch.cuda.current_device()",
            _torch_proxy("megatron.core.models.common.embeddings.rotary_pos_embedding"),
        ),
        Patch(
            "rng_tracker",
            "the model-parallel RNG tracker saves/restores CUDA generator state",
            _torch_proxy("megatron.core.tensor_parallel.random")
            | {
                "megatron.core.tensor_parallel.random": {
                    "torch": lambda: _TORCH_ON_CPU,
                    "_get_cuda_rng_state": lambda: (lambda *a, **k: torch.get_rng_state()),
                    "_set_cuda_rng_state": lambda: (lambda state, *a, **k: torch.set_rng_state(state)),
                }
            },
        ),
        Patch(
            "schedule_device",
            'pipeline schedules allocate their token counter with device="cuda"',
            _torch_proxy("megatron.core.pipeline_parallel.schedules"),
        ),
        Patch(
            "p2p_device",
            "pipeline p2p allocates receive buffers on current_device() and calls cuda.synchronize()",
            _torch_proxy("megatron.core.pipeline_parallel.p2p_communication"),
        ),
        Patch(
            "causal_mask",
            'the default causal mask (attention_mask=None) is built with device="cuda"',
            _torch_proxy("megatron.core.transformer.utils"),
        ),
        Patch(
            "ddp_buffers",
            "DDP's contiguous grad buffers are allocated on current_device(); from 0.19 the grad "
            "sync also waits on torch.cuda.current_stream()",
            _torch_proxy("megatron.core.distributed.param_and_grad_buffer"),
        ),
        Patch(
            "optimizer_device",
            'the optimizer builds its loss-scale/overflow tensors with device="cuda"',
            _torch_proxy("megatron.core.optimizer.optimizer"),
        ),
        Patch(
            "clip_grads_device",
            "grad-norm computation allocates its buffers with device='cuda'",
            _torch_proxy("megatron.core.optimizer.clip_grads"),
        ),
        Patch(
            "clip_grads_type_check",
            "grad clipping asserts every grad is a 'torch.cuda.FloatTensor'",
            # optimizer.py imported the function by name, so it is replaced there.
            {
                "megatron.core.optimizer.optimizer": {
                    "clip_grad_by_total_norm_fp32": lambda: _clip_grad_by_total_norm_fp32,
                },
            },
        ),
        Patch(
            "optimizer_type_names",
            "the mixed-precision (bf16) and distributed optimizers accept only parameters whose "
            "type() is a 'torch.cuda.*Tensor' name",
            # policy.py looks the function up on the package at call time
            {"megatron.core.optimizer": {"get_megatron_optimizer": _cuda_type_names_while_building}},
        ),
        Patch(
            "tied_embedding_sync",
            "PP stages sharing the embedding move it with weight.data.cuda() before all-reduce",
            {
                "megatron.core.models.common.language_module.language_module": {
                    "LanguageModule.setup_embeddings_and_output_layer": _sync_tied_embedding_on_cpu,
                }
            },
        ),
        Patch(
            "dist_ckpt_save",
            "the torch_dist checkpoint writer calls torch.cuda.synchronize() and builds a failure "
            "flag on torch.cuda.current_device()",
            _torch_proxy(
                "megatron.core.dist_checkpointing.strategies.filesystem_async",
                "megatron.core.dist_checkpointing.strategies.state_dict_saver",
            ),
        ),
        Patch(
            "sequence_parallel_mappings",
            "sequence parallelism's all-gather and reduce-scatter allocate their outputs on "
            "current_device()",
            _torch_proxy("megatron.core.tensor_parallel.mappings"),
        ),
        Patch(
            "sequence_parallel_linear",
            "under sequence parallelism the column-parallel linear's backward re-gathers its input "
            "into a buffer on current_device()",
            _torch_proxy("megatron.core.tensor_parallel.layers"),
        ),
        Patch(
            "memory_buffer",
            "core attention's global scratch buffer is allocated on current_device()",
            _torch_proxy("megatron.core.utils"),
        ),
    ]
}
