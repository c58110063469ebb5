"""Reward worker process: ``python -m megatron_less.rewards.worker READ_FD WRITE_FD``.

Started by ``rewards.pool`` as a plain subprocess rather than through multiprocessing, so it
never re-imports the trainer's ``__main__`` (torch, CUDA) and starts in about half a second.

Protocol (pickled over pipes): the worker sends ``"ready"``; then for each task
``((timeout, shortcuts), [(idx, extracted, reference), ...])`` it sends one
``(idx, score, reason)`` per item as soon as that item is done, which is how the parent knows
which item a hung worker was on.
``None`` asks it to exit; so does the parent closing the pipe.
"""

from __future__ import annotations

import os
import resource
import sys
from multiprocessing.connection import Connection


def _limit_memory(extra_mb: int) -> None:
    # A tower like 3^{3^{20}} can ask sympy for gigabytes; a MemoryError is a clean "error"
    # verdict while an OOM-killed host is not. Counted on top of what the imports already use.
    if extra_mb <= 0:
        return
    with open("/proc/self/statm") as f:
        used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = used + extra_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def main(argv: list[str]) -> None:
    from megatron_less.rewards.verdict import judge_timed

    inbox = Connection(int(argv[0]), writable=False)
    outbox = Connection(int(argv[1]), readable=False)
    try:
        _limit_memory(int(os.environ.get("MLESS_REWARD_WORKER_MEM_MB", "4096")))
    except (OSError, ValueError):
        pass  # no /proc or no rlimit: run unlimited rather than not at all
    # The first verdict in a process builds the LaTeX parser and sympy caches (~0.5 s); pay
    # that before "ready" so it is not charged to the first item's timeout.
    judge_timed("\\frac{x}{2}", "0.5x", 60.0)
    outbox.send("ready")
    while True:
        try:
            task = inbox.recv()
        except EOFError:
            return
        if task is None:
            return
        (timeout, shortcuts), items = task
        for idx, extracted, reference in items:
            r = judge_timed(extracted, reference, timeout, shortcuts)
            outbox.send((idx, r.score, r.reason))


if __name__ == "__main__":
    main(sys.argv[1:])
