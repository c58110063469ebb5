"""Collectives stay valid under NCCL: on CUDA the world group also has a CPU backend (gloo), so the
CPU-tensor collectives (reward codes, the checkpoint code's broadcast_object_list /
all_gather_object) keep working next to NCCL; the reward's own tensor lives on the device."""

import torch.distributed.distributed_c10d as c10d

from megatron_less.parallel import runtime


def test_world_group_on_cuda_has_a_cpu_backend():
    backend = runtime.world_backend(cuda=True)
    assert backend == "cpu:gloo,cuda:nccl"
    # the string torch.distributed parses: CPU tensors -> gloo, CUDA tensors -> NCCL
    assert c10d.BackendConfig(backend).get_device_backend_map() == {"cpu": "gloo", "cuda": "nccl"}


def test_world_group_on_cpu_is_gloo():
    assert runtime.world_backend(cuda=False) == "gloo"
    assert c10d.BackendConfig("gloo").get_device_backend_map()["cpu"] == "gloo"


def test_initialize_uses_that_backend():
    import torch
    import torch.distributed as dist

    runtime.initialize()
    try:
        assert dist.get_backend() == runtime.world_backend(torch.cuda.is_available())
    finally:
        runtime.destroy()
