"""Fault injection for the reliability tests and benchmarks/kill_resume.py; inert unless the
environment variable ``MLESS_FAULT`` is set. It is read here and nowhere else.

``MLESS_FAULT=<point>:<step>[:<rank>][,...]`` (rank defaults to 0): when that global rank reaches
the named point of that training step, the fault fires. Points and faults:

  kill at ``rollout``   (phases.rollout, the engine has returned, the batch is not built yet),
          ``oversample`` (phases.rollout in a dynamic-sampling round after the first: the
                         sampler has moved on by the extra batches),
          ``update``    (phases.update, gradients of the first mini-batch computed, no optimizer
                         step taken),
          ``save``      (train_state.save, every shard and RNG file written, the folder not yet
                         published): SIGKILL the whole job - under torchrun the agent and all its
                         workers (and their reward workers); as a plain process, this process.
  ``rank_dies`` at the rollout point, only this rank is SIGKILLed (a worker lost mid-step): the
                others must fail, not hang, and torchrun must end the job.
  ``nan_loss``  one advantage of the rank's first mini-batch is NaN, so that rank's loss and
                every gradient are NaN (through the real loss, backward and DP all-reduce).
  ``nan_grad``  one element of one parameter's gradient is NaN on that rank, before the DP
                all-reduce (a hook on the parameter's gradient for that step's backward passes).
  ``disk_full`` every file the rank opens for writing while saving that step's checkpoint fails
                with ENOSPC, as on a full disk.
"""

from __future__ import annotations

import errno
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

KILL_POINTS = ("rollout", "oversample", "update", "save")
POINTS = (*KILL_POINTS, "rank_dies", "nan_loss", "nan_grad", "disk_full")


def planned() -> list[tuple[str, int, int]]:
    """[(point, step, rank)] from MLESS_FAULT; a malformed value is an error, never ignored."""
    out = []
    for item in filter(None, (x.strip() for x in os.environ.get("MLESS_FAULT", "").split(","))):
        parts = item.split(":")
        if len(parts) not in (2, 3) or parts[0] not in POINTS or not all(p.isdigit() for p in parts[1:]):
            raise ValueError(f"MLESS_FAULT: {item!r} is not <point>:<step>[:<rank>] with point one of {POINTS}")
        out.append((parts[0], int(parts[1]), int(parts[2]) if len(parts) == 3 else 0))
    return out


def _fires(point: str, step: int) -> bool:
    # the rank in the torchrun world: rollout.placement separate rewrites RANK to the side's own
    rank = os.environ.get("MLESS_GLOBAL_RANK", os.environ.get("RANK", "0"))
    return (point, step, int(rank)) in planned()


def kill_point(point: str, step: int) -> None:
    """SIGKILL the whole job when MLESS_FAULT names this point and step (and this rank)."""
    if _fires(point, step):
        kill_job()
    if point == "rollout" and _fires("rank_dies", step):
        os.kill(os.getpid(), signal.SIGKILL)


def kill_job() -> None:
    """kill -9 of everything this job is: torchrun's agent (it starts each worker in its own
    session, so a process group does not reach them) and every process under it."""
    import psutil

    me = psutil.Process()
    root = me.parent() if os.environ.get("TORCHELASTIC_RUN_ID") else me
    victims = [p for p in root.children(recursive=True) if p.pid != me.pid] + ([root] if root.pid != me.pid else [])
    for p in victims:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    os.kill(me.pid, signal.SIGKILL)


def corrupt_update(model_chunks, step: int, per_token: dict) -> list:
    """``nan_loss``: a NaN advantage in ``per_token``; ``nan_grad``: a NaN in the first
    parameter's gradient. Returns hook handles to remove after the step."""
    if _fires("nan_loss", step):
        per_token["advantages"] = per_token["advantages"].clone()
        per_token["advantages"][0, 0] = float("nan")
    if _fires("nan_grad", step):
        p = next(model_chunks[0].parameters())

        def poison(grad):
            grad = grad.clone()
            grad.view(-1)[0] = float("nan")
            return grad

        return [p.register_hook(poison)]
    return []


@contextmanager
def full_disk(step: int) -> Iterator[None]:
    """``disk_full``: for the block, every file this rank opens for writing (megatron's shard
    writer and its forked workers, torch.save, JSON) fails as on a full disk. Reads work."""
    if not _fires("disk_full", step):
        yield
        return
    import builtins

    import torch

    real = builtins.open

    def refuse(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            raise OSError(errno.ENOSPC, "No space left on device (injected by MLESS_FAULT)", str(file))
        return real(file, mode, *args, **kwargs)

    def refuse_save(obj, f, *args, **kwargs):  # torch.save to a path writes from C++, not through open
        if isinstance(f, (str, os.PathLike)):
            raise OSError(errno.ENOSPC, "No space left on device (injected by MLESS_FAULT)", str(f))
        return real_save(obj, f, *args, **kwargs)  # into memory (megatron serialises objects so)

    real_save, builtins.open, torch.save = torch.save, refuse, refuse_save
    try:
        yield
    finally:
        builtins.open, torch.save = real, real_save


__all__ = ["KILL_POINTS", "POINTS", "corrupt_update", "full_disk", "kill_job", "kill_point", "planned"]
