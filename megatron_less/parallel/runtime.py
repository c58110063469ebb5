"""torch.distributed + megatron-core parallel_state: start from torchrun's environment, tear down."""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron_less.parallel import mcore_compat


@dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1
    pp: int = 1

    def validate(self, world_size: int) -> int:
        """Return the data-parallel size, or raise naming the offending field."""
        for name, v in (("tensor_parallel", self.tp), ("pipeline_parallel", self.pp)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"parallel.{name} must be a positive integer, got {v!r}")
        if world_size % (self.tp * self.pp):
            raise ValueError(
                f"world size {world_size} is not divisible by tensor_parallel ({self.tp}) x "
                f"pipeline_parallel ({self.pp}) = {self.tp * self.pp}"
            )
        return world_size // (self.tp * self.pp)


def world_backend(cuda: bool) -> str:
    """torch.distributed backend of the world group. On CUDA: NCCL for device tensors and gloo for
    CPU ones, so the CPU collectives (reward codes, ``broadcast_object_list`` /
    ``all_gather_object`` in the checkpoint code, ...) stay valid next to NCCL."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def initialize(
    tp: int = 1, pp: int = 1, *, seed: int = 1234, timeout_s: float = 600.0
) -> ParallelLayout:
    """Initialise torch.distributed from torchrun's env (RANK, WORLD_SIZE, MASTER_ADDR/PORT),
    then megatron's parallel groups (TP, PP, DP = the rest) and the model-parallel RNG. A plain
    process (no WORLD_SIZE, or 1) gets torchrun's variables for one rank (see
    ``single_process_env``) until ``destroy``."""
    from megatron.core import parallel_state, tensor_parallel

    layout = ParallelLayout(tp, pp)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    layout.validate(world_size)
    mcore_compat.apply()

    if not dist.is_initialized():
        if world_size == 1:
            single_process_env()
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=world_backend(cuda), timeout=datetime.timedelta(seconds=timeout_s))

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        create_gloo_process_groups=True,  # the optimizer setup asks for them even on CPU
    )
    set_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return layout


# variables single_process_env() added, removed again by destroy()
_ADDED_ENV: list[str] = []


def single_process_env() -> None:
    """Set, where missing, every variable torchrun sets for a one-rank job: torch.distributed
    needs RANK/WORLD_SIZE/MASTER_*, and code that expects a launcher reads the rest (vLLM's
    external launcher: LOCAL_RANK). MASTER_PORT: a free port, so concurrent runs cannot collide."""
    from megatron_less.parallel.spawn import free_port

    wanted = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
              "MASTER_ADDR": "127.0.0.1"}
    for key, value in wanted.items():
        if key not in os.environ:
            os.environ[key] = value
            _ADDED_ENV.append(key)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())
        _ADDED_ENV.append("MASTER_PORT")


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    # a later launcher check (e.g. "under torchrun?") must not mistake this process for a rank
    while _ADDED_ENV:
        os.environ.pop(_ADDED_ENV.pop(), None)
