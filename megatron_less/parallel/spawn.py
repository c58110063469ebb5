"""Run a function in N local processes with torchrun's environment (tests, benchmarks, demos).

torchrun itself needs a script on disk and gives no return values back; tests want to call a
module-level function and get each rank's result (or its traceback) as Python objects.
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import time
import traceback
from typing import Any, Callable, Sequence

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, args, kwargs, env, results):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        **env,
    )
    try:
        import warnings

        import torch

        if not os.environ.get("MLESS_WARNINGS"):
            # megatron-core warns about missing apex/TE once per process and rank: noise in tests.
            warnings.filterwarnings("ignore", category=UserWarning)
        # N processes share few cores: one intra-op thread each avoids oversubscription.
        torch.set_num_threads(int(os.environ.get("MLESS_THREADS_PER_RANK", "1")))
        out = fn(*args, **kwargs)
        # Plain pickle: torch's queue reducer passes tensors through shared memory that dies
        # with this process before the parent reads it.
        results.put((rank, True, pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


class DistributedError(RuntimeError):
    pass


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    kwargs: dict | None = None,
    *,
    timeout: float = 600.0,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Call ``fn(*args, **kwargs)`` on ranks 0..world_size-1 and return their results by rank.

    ``fn`` must be importable (module level). The first failing rank's traceback is raised as
    ``DistributedError``; every process is killed after ``timeout`` seconds.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(fn, r, world_size, port, tuple(args), dict(kwargs or {}), dict(env or {}), results),
            daemon=False,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DistributedError(
                    f"timed out after {timeout:.0f}s; ranks that finished: {sorted(out)}"
                )
            try:
                rank, ok, value = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in out]
                if dead:
                    raise DistributedError(
                        f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode} "
                        "before reporting (killed by the OS? out of memory?)"
                    ) from None
                continue
            if not ok:
                raise DistributedError(f"rank {rank} failed:\n{value}")
            out[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=5 if len(out) == world_size else 0.1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return [out[r] for r in range(world_size)]
