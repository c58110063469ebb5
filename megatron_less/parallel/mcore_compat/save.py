"""The synchronous torch_dist save every checkpoint goes through (all platforms)."""

from __future__ import annotations

import contextlib
import functools
import logging
import queue
from dataclasses import dataclass, field
from typing import Iterator


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
