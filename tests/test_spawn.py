"""The multi-process launcher: results by rank, tracebacks propagated, hard timeout."""

import os
import time

import pytest

from megatron_less.parallel.spawn import DistributedError, run_distributed


def _allreduce_rank():
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return dict(rank=int(os.environ["RANK"]), world=int(os.environ["WORLD_SIZE"]), total=t.item(),
                tensor=torch.arange(3) * dist.get_rank())


def _fail_on_rank1():
    if os.environ["RANK"] == "1":
        raise ValueError("planted failure on rank 1")
    return "ok"


def _hang():
    time.sleep(60)


def test_results_by_rank_with_collectives():
    out = run_distributed(_allreduce_rank, 2, timeout=120)
    assert [o["rank"] for o in out] == [0, 1]
    assert all(o["world"] == 2 and o["total"] == 3.0 for o in out)
    assert out[1]["tensor"].tolist() == [0, 1, 2]  # tensors survive the worker's exit


def test_failure_traceback_names_rank():
    with pytest.raises(DistributedError, match=r"rank 1 failed:(.|\n)*planted failure on rank 1"):
        run_distributed(_fail_on_rank1, 2, timeout=120)


def test_hard_timeout_kills_workers():
    t0 = time.monotonic()
    with pytest.raises(DistributedError, match="timed out"):
        run_distributed(_hang, 1, timeout=5)
    assert time.monotonic() - t0 < 30
