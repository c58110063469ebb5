"""The only place that patches megatron-core. Two sections:

CPU (``PATCHES``, ``apply``, ``without``): megatron-core assumes a GPU in a handful of spots:
``torch.cuda.current_device()`` as a device, ``torch.cuda.synchronize()``, CUDA RNG state
get/set, ``device="cuda"`` literals, ``'torch.cuda.FloatTensor'`` type strings and a
``weight.data.cuda()``. Every fix is scoped to the megatron module that needs it: mostly the
module's global name ``torch`` is swapped for a thin proxy that answers those calls for the CPU
and forwards everything else to the real ``torch``. torch itself is never touched (wrapping
torch factory functions process-wide silently corrupted HF ``from_pretrained``). These patches
are applied only when CUDA is unavailable.

All platforms (``sync_save``): a synchronous torch_dist save made without a multiprocessing
Manager process, in which rank 0's own writes (metadata.json; common.pt on 0.16) defer their errors
until the collective part is over (else a full disk on rank 0 hangs the other ranks); scoped to
the ``with`` block.

Each patch has a test in ``tests/test_cpu_compat.py`` that removes it and shows what breaks (or
what it costs), so a megatron-core upgrade that makes a patch unnecessary is noticed; the
deferred errors are shown by tests/test_reliability.py's full disk on rank 0.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import queue
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch


# --- CPU only ----------------------------------------------------------------------------------

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


@dataclass
class Patch:
    """One named fix: for each module, attribute -> replacement."""

    name: str
    why: str
    targets: dict[str, dict[str, Callable[[], object]]]
    saved: dict = field(default_factory=dict)

    @staticmethod
    def _owner(mod_name: str, attr: str):
        """'Class.method' attributes are patched on the class."""
        owner = importlib.import_module(mod_name)
        *path, leaf = attr.split(".")
        for p in path:
            owner = getattr(owner, p)
        return owner, leaf

    def apply(self) -> None:
        for mod_name, attrs in self.targets.items():
            for attr, make in attrs.items():
                if (mod_name, attr) not in self.saved:
                    owner, leaf = self._owner(mod_name, attr)
                    orig = owner.__dict__[leaf] if isinstance(owner, type) else getattr(owner, leaf)
                    self.saved[(mod_name, attr)] = orig
                    setattr(owner, leaf, make(orig) if _takes_original(make) else make())

    def revert(self) -> None:
        for (mod_name, attr), orig in self.saved.items():
            owner, leaf = self._owner(mod_name, attr)
            setattr(owner, leaf, orig)
        self.saved.clear()


def _takes_original(make) -> bool:
    return make.__code__.co_argcount == 1


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
            "memory_buffer",
            "core attention's global scratch buffer is allocated on current_device()",
            _torch_proxy("megatron.core.utils"),
        ),
    ]
}

# --- without apex / TransformerEngine -----------------------------------------------------------
# megatron's distributed optimizer falls back to torch's Adam, which keeps a ``step`` tensor per
# parameter where apex/TE keep one per param group; its checkpoint code for that fallback is
# broken in 0.16 and 0.19 alike. Applied wherever megatron found neither (CUDA or not).

def _distrib_state_dict_primed(method):
    """``DistributedOptimizer.state_dict`` asserts that every parameter's state holds one common
    ``step``; a fresh optimizer (a resume builds one, then asks for its sharded state to load into)
    has no state at all. Adam's state before its first update is zeros and step 0, exactly what
    torch's Adam would create itself, so that state is made first."""

    def wrapper(self, *args, **kwargs):
        inner = self.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state.get(p):
                    inner.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}  # fmt: skip
        return method(self, *args, **kwargs)

    wrapper.__name__ = method.__name__
    return wrapper


def _distrib_load_state_dict_unshared(method):
    """``DistributedOptimizer.load_state_dict`` gives every parameter the *same* ``step`` tensor
    object (torch's Adam then increments it once per parameter at each update), and then
    overwrites it with the step of the loading template (the live optimizer's, 0 for a fresh
    one) instead of the checkpoint's, which it saved in each param group. Each parameter gets
    its own tensor holding the saved step. The load also copies into fp32 main parameters that
    are views of leaves needing grad (fp32 models), which autograd refuses outside no_grad."""

    def wrapper(self, state_dict, *args, **kwargs):
        with torch.no_grad():
            out = method(self, state_dict, *args, **kwargs)
        saved = {float(g["step"]) for g in state_dict["optimizer"]["param_groups"] if g.get("step") is not None}
        if len(saved) > 1:
            raise RuntimeError(f"optimizer checkpoint holds several Adam steps {sorted(saved)}; expected one")
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = torch.tensor(next(iter(saved)) if saved else float(state["step"]))
        return out

    wrapper.__name__ = method.__name__
    return wrapper


_DISTRIB = "megatron.core.optimizer.distrib_optimizer"
TORCH_ADAM_PATCHES: dict[str, Patch] = {
    p.name: p
    for p in [
        Patch(
            "distrib_state_dict_fresh",
            "DistributedOptimizer.state_dict asserts one common Adam step, and a fresh optimizer has none",
            {_DISTRIB: {"DistributedOptimizer.state_dict": _distrib_state_dict_primed}},
        ),
        Patch(
            "distrib_load_shared_step",
            "DistributedOptimizer.load_state_dict shares one step tensor among all parameters "
            "and copies into views of leaves needing grad",
            {_DISTRIB: {"DistributedOptimizer.load_state_dict": _distrib_load_state_dict_unshared}},
        ),
    ]
}

_applied: set[str] = set()


def needed() -> bool:
    return not torch.cuda.is_available()


def torch_adam_fallback() -> bool:
    """Whether megatron's optimizers run on torch's Adam (neither apex nor TE found)."""
    return not importlib.import_module(_DISTRIB).HAVE_APEX_OR_TE


def apply() -> bool:
    """Apply the CPU patches once if CUDA is absent, and the torch-Adam ones once if megatron
    found neither apex nor TE. Returns whether the CPU patches are active."""
    wanted = ({**PATCHES} if needed() else {}) | (TORCH_ADAM_PATCHES if torch_adam_fallback() else {})
    for name, p in wanted.items():
        if name not in _applied:
            p.apply()
            _applied.add(name)
    return needed()


@contextlib.contextmanager
def without(name: str) -> Iterator[None]:
    """Temporarily remove one patch (tests use it to prove the patch is still needed)."""
    patch = {**PATCHES, **TORCH_ADAM_PATCHES}[name]
    patch.revert()
    try:
        yield
    finally:
        if name in _applied:
            patch.apply()


# --- all platforms ------------------------------------------------------------------------------

@dataclass
class SaveIssues:
    """What ``sync_save`` collected: rank 0's deferred write errors, and the errors megatron's
    shard writer only logged (0.19 raises "Worker failure ... <class 'OSError'>" and leaves the
    message, e.g. "No space left on device", to its log)."""

    deferred: list = field(default_factory=list)
    writer_errors: list = field(default_factory=list)


class _Collect(logging.Handler):
    def __init__(self, into: list):
        super().__init__(logging.ERROR)
        self.into = into

    def emit(self, record):
        self.into.append(record.getMessage())


@contextlib.contextmanager
def sync_save() -> Iterator[SaveIssues]:
    """Around a synchronous ``dist_checkpointing.save``: the torch_dist writer hands its results
    back through a queue from ``filesystem_async.[_]get_write_results_queue``, always a
    ``multiprocessing`` Manager queue (made for async saves, whose writer is another process).
    Starting that Manager spawns a server process, which costs seconds per rank and re-imports
    the caller's ``__main__`` (every entry point would need a ``__main__`` guard). A synchronous
    save writes and collects in this process, so a plain ``queue.Queue`` serves; the function is
    swapped only for the block and restored after.

    Second, rank 0 writes files outside the collective part of the save (``metadata.json``
    before a barrier after it; on 0.16 also ``common.pt`` before it). An error there (a full
    disk) would leave rank 0 outside the collectives the other ranks wait in: a hang. Within the
    block those writes defer their error instead: it is appended to ``SaveIssues.deferred``, the
    save goes on in step on every rank, and the caller raises it on every rank afterwards
    (checkpoints.model.save_checkpoint). tests/test_reliability.py's full-disk case on rank 0
    hangs without this. Third, the shard writer's logged errors are kept in
    ``SaveIssues.writer_errors`` for the caller's message."""
    from megatron.core.dist_checkpointing import serialization
    from megatron.core.dist_checkpointing.strategies import common
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa

    issues = SaveIssues()
    deferred = issues.deferred

    def deferring(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 - handed to the caller, raised on every rank
                deferred.append(e)

        return call

    swaps = [(serialization, "save_config", deferring(serialization.save_config))]
    # the queue factory: 0.16 names it _get_write_results_queue, 0.19 get_write_results_queue
    swaps += [(fsa, name, queue.Queue) for name in _WRITE_QUEUE_NAMES if name in fsa.__dict__]
    # 0.16 writes common.pt from rank 0 through this class; 0.19 keeps the common state inside
    # the collective DCP save (a "common_state" ShardedObject), so there is nothing to defer
    legacy = getattr(common, "TorchCommonSaveStrategy", None)
    if legacy is not None:
        swaps.append((legacy, "save_common", deferring(legacy.save_common)))
    saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in swaps]
    for owner, name, new in swaps:
        setattr(owner, name, new)
    writer_log, collect = logging.getLogger(fsa.__name__), _Collect(issues.writer_errors)
    writer_log.addHandler(collect)
    try:
        yield issues
    finally:
        writer_log.removeHandler(collect)
        for owner, name, orig in saved:
            setattr(owner, name, orig)


_WRITE_QUEUE_NAMES = ("_get_write_results_queue", "get_write_results_queue")
