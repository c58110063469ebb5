"""The bridge of rollout.placement separate on GPUs (run by tests/gpu/check.sh): two ranks split by
parallel.placement (a trainer on GPU 0, a rollout rank on GPU 1), the bridge's ProcessGroupNCCL
built by hand on torchrun's store.

1. objects (pickled batches) from the rollout rank reach the trainer intact;
2. weight buckets (bf16, 1 GiB in buckets of a quarter of it, as trainer rank 0 streams the HF tensors)
   reach the rollout rank bit for bit;
3. [TIME] the transfer's GB/s.

vLLM is not needed here (the device machine has none): the full separate placement (vLLM on the
rollout ranks) runs on CPU in tests/test_separate.py. Two GPUs needed (NCCL refuses two ranks on
one device): with one it is a [SKIP]. ``--cpu`` runs the same on gloo as a dry run.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import torch  # noqa: E402
from checklib import Checks  # noqa: E402  (tests/gpu/ is this script's sys.path[0])

C = Checks("bridge_gpu")
GIB = 1 << 30


def _tensors(device, total):
    g = torch.Generator().manual_seed(0)
    n = total // 2 // 16  # 16 bf16 tensors
    for i in range(16):
        yield f"model.layers.{i}.mlp.weight", torch.randn(n, generator=g).to(torch.bfloat16).reshape(-1, 1024).to(device)


def _job(total):
    from megatron_less.parallel import placement

    place = placement.of_env(1)
    bridge = placement.split(place, 300)
    if place.role == placement.TRAIN:
        batch = bridge.objects(None, bridge.LEADER)
        ok_obj = batch == {"step": 3, "seqs": [[1, 2, 3]] * 1000}
        tensors = list(_tensors(bridge.device, total))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        counts = bridge.send_tensors(tensors, total // 4)
        bridge.objects(None, bridge.LEADER)  # the receiver's verdict comes back
        return {"objects": ok_obj, "counts": counts, "seconds": time.perf_counter() - t0}
    bridge.objects({"step": 3, "seqs": [[1, 2, 3]] * 1000}, bridge.LEADER)
    want = dict(_tensors(bridge.device, total))
    got = {n: t.clone() for n, t in bridge.recv_tensors()}
    same = got.keys() == want.keys() and all(torch.equal(got[n], want[n]) for n in want)
    bridge.objects(same, bridge.LEADER)
    return {"tensors_equal": same}


def main() -> int:
    from megatron_less.parallel.spawn import run_distributed

    cpu = "--cpu" in sys.argv
    if not cpu and torch.cuda.device_count() < 2:
        C.skip("bridge over NCCL", f"needs 2 GPUs, {torch.cuda.device_count()} here")
        return C.finish()
    total = (64 << 20) if cpu else GIB
    with C.guard("bridge"):
        results = run_distributed(_job, 2, (total,), timeout=240)
        trainer, rollout = results[0], results[1]
        C.check("objects", trainer["objects"], "a 1000-row batch pickled over the gloo bridge arrives equal")
        C.check("weight buckets", rollout["tensors_equal"],
                f"{total >> 20} MiB of bf16 in {trainer['counts']['buckets']} buckets arrive bit-equal")
        C.time(f"bridge transfer {total / trainer['seconds'] / 1e9:.2f} GB/s ({'gloo CPU' if cpu else 'NCCL'})")
    return C.finish()


if __name__ == "__main__":
    sys.exit(main())
