"""A pool of reward workers in which a hung or crashed worker costs one item, not the batch.

Why not ``concurrent.futures.ProcessPoolExecutor``: it cannot kill one stuck worker (only
shut the whole pool down, and a stuck process blocks that), a future's timeout counts queueing
time, and a dead worker breaks the whole executor. Here each worker streams back one verdict
per item, so the parent knows which item a worker is on and since when; past a wall-clock
limit of ``2 * timeout + grace`` (the worker's own alarm counts CPU seconds, and a starved
worker needs more wall time than CPU time) it kills that worker, scores the item "timeout",
starts a replacement and requeues the rest of the worker's chunk. A worker that dies scores
its item "error".
"""

from __future__ import annotations

import atexit
import math
import os
import subprocess
import sys
import threading
import time
from collections import deque
from multiprocessing.connection import Connection, wait
from typing import Sequence

from megatron_less.rewards.verdict import DEFAULT_TIMEOUT, ScoreResult, check_timeout, prejudge

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_START_TIMEOUT = 60.0


class _Worker:
    def __init__(self):
        task_r, task_w = os.pipe()
        res_r, res_w = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "megatron_less.rewards.worker", str(task_r), str(res_w)],
            pass_fds=(task_r, res_w),
            stdin=subprocess.DEVNULL,
            env=env,
        )
        os.close(task_r)
        os.close(res_w)
        self.tasks = Connection(task_w, readable=False)
        self.results = Connection(res_r, writable=False)
        self.ready = False
        self.pending: deque = deque()  # items sent, oldest first: pending[0] is running
        self.deadline = time.monotonic() + _START_TIMEOUT

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.tasks.close()
        self.results.close()

    def stop(self) -> None:
        try:
            self.tasks.send(None)
            self.proc.wait(timeout=2)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()


class VerifierPool:
    """Persistent reward workers. ``score`` is thread-safe (calls are serialised)."""

    def __init__(self, num_workers: int | None = None, grace: float = 2.0):
        self.num_workers = num_workers or min(8, os.cpu_count() or 1)
        self.grace = grace
        self.restarts = 0  # workers replaced after a hang or crash, for logs and tests
        self._lock = threading.Lock()
        self._workers = [_Worker() for _ in range(self.num_workers)]

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def score(
        self,
        responses: Sequence[str],
        references: Sequence[str],
        timeout: float = DEFAULT_TIMEOUT,
        shortcuts: bool = True,
    ) -> list[ScoreResult]:
        timeout = check_timeout(timeout)
        if not self._workers:
            raise RuntimeError("VerifierPool.score called after close()")
        results: list[ScoreResult | None] = [None] * len(responses)
        extracted: dict[int, str] = {}
        for i, (resp, ref) in enumerate(zip(responses, references, strict=True)):
            early = prejudge(resp, ref, shortcuts)
            if isinstance(early, ScoreResult):
                results[i] = early
            else:
                extracted[i] = early
        if extracted:
            with self._lock:
                try:
                    self._run(extracted, references, results, (timeout, shortcuts))
                except BaseException:
                    # Interrupted (Ctrl-C) mid-batch: busy workers would send stale verdicts
                    # into the next call, so start them afresh.
                    for w in list(self._workers):
                        if w.pending:
                            w.pending.clear()
                            self._replace(w)
                    raise
        return results  # type: ignore[return-value]

    def _run(self, extracted, references, results, options) -> None:
        todo = list(extracted)
        size = max(1, min(64, math.ceil(len(todo) / (4 * self.num_workers))))
        chunks = deque(todo[i : i + size] for i in range(0, len(todo), size))
        limit = 2 * options[0] + self.grace

        def give(w: _Worker) -> None:
            chunk = chunks.popleft()
            try:
                w.tasks.send((options, [(i, extracted[i], references[i]) for i in chunk]))
            except OSError:  # died while idle: nothing of this chunk ran
                chunks.appendleft(chunk)
                self._replace(w)
                return
            w.pending.extend(chunk)
            w.deadline = time.monotonic() + limit

        while chunks or any(w.pending for w in self._workers):
            for w in list(self._workers):
                if w.ready and not w.pending and chunks:
                    give(w)
            now = time.monotonic()
            wake = min((w.deadline for w in self._workers if w.pending or not w.ready), default=now)
            by_conn = {w.results: w for w in self._workers}
            for conn in wait(list(by_conn), timeout=max(0.0, wake - now)):
                self._receive(by_conn[conn], extracted, results, chunks, limit)
            now = time.monotonic()
            for w in list(self._workers):
                if (w.pending or not w.ready) and now > w.deadline:
                    # A verdict may have landed since wait() returned: read it before blaming
                    # the item at the head of the queue.
                    while w in self._workers and w.results.poll() and (w.pending or not w.ready):
                        self._receive(w, extracted, results, chunks, limit)
                    if (
                        w in self._workers
                        and (w.pending or not w.ready)
                        and time.monotonic() > w.deadline
                    ):
                        self._lost(w, extracted, results, chunks, "timeout")

    def _receive(self, w: _Worker, extracted, results, chunks, limit: float) -> None:
        try:
            msg = w.results.recv()
        except (EOFError, OSError):
            if not w.ready:
                raise RuntimeError(
                    f"reward worker (pid {w.proc.pid}) exited during start-up with "
                    f"code {w.proc.wait()}; its traceback is on stderr above"
                ) from None
            self._lost(w, extracted, results, chunks, "error")
            return
        if msg == "ready":
            w.ready = True
            return
        idx, score, reason = msg
        results[idx] = ScoreResult(score, extracted[idx], reason)
        w.pending.popleft()
        w.deadline = time.monotonic() + limit

    def _lost(self, w: _Worker, extracted, results, chunks, reason: str) -> None:
        """``w`` hung or died: its current item gets ``reason``, the rest go back in line."""
        if w.pending:
            idx = w.pending.popleft()
            results[idx] = ScoreResult(0.0, extracted[idx], reason)
            if w.pending:
                chunks.appendleft(list(w.pending))
        self._replace(w)

    def _replace(self, w: _Worker) -> None:
        w.kill()
        self.restarts += 1
        self._workers[self._workers.index(w)] = _Worker()

    def close(self) -> None:
        for w in self._workers:
            w.stop()
        self._workers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_SHARED: dict[tuple[int, int], VerifierPool] = {}
_SHARED_LOCK = threading.Lock()


def shared_pool(num_workers: int | None = None) -> VerifierPool:
    """One pool per worker count for the life of the process (workers cost ~0.5 s to start).
    Keyed by pid too: a forked child (e.g. a data-loader process) must not share the parent's
    pipes, so it gets its own workers."""
    key = (os.getpid(), num_workers or min(8, os.cpu_count() or 1))
    with _SHARED_LOCK:
        pool = _SHARED.get(key)
        if pool is None:
            pool = _SHARED[key] = VerifierPool(key[1])
        return pool


@atexit.register
def _close_shared() -> None:
    for (pid, _), pool in _SHARED.items():
        if pid == os.getpid():
            pool.close()
    _SHARED.clear()
