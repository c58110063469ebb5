"""Scoring responses while the rest of their batch is still being generated.

The rollout engine hands each response over as it finishes (``submit``, from its generation
loop); a background thread decodes and scores whatever has arrived, a chunk at a time, in the
worker pool of ``math.score_batch`` (verdicts never run in this thread: alarms only reach the main
one). When generation ends only the last chunk is left to score (``results``). The verdicts are
the same as scoring the batch at the end: the same function on the same texts.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Hashable

from megatron_less.rewards.math import ScoreResult, score_batch

_END = object()


class StreamingScorer:
    def __init__(self, decode: Callable[[list[int]], str], *, num_workers: int | None, timeout: float):
        if num_workers == 0:
            raise ValueError("StreamingScorer scores in the worker pool: num_workers must not be 0")
        self._decode, self._kw = decode, dict(num_workers=num_workers, timeout=timeout)
        self._queue: queue.Queue = queue.Queue()
        self._results: dict[Hashable, ScoreResult] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="streaming-scorer", daemon=True)
        self._thread.start()

    def submit(self, key: Hashable, token_ids: list[int], answer: str) -> None:
        """A finished response (its token ids) and its reference answer, scored under ``key``."""
        self._queue.put((key, token_ids, answer))

    def results(self) -> dict[Hashable, ScoreResult]:
        """Every submitted response's verdict, once the last is scored (ends the thread)."""
        self._queue.put(_END)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._results

    def _run(self) -> None:
        done = False
        while not done:
            chunk = [self._queue.get()]
            while not self._queue.empty():  # everything that finished meanwhile: one pool call
                chunk.append(self._queue.get_nowait())
            done = chunk[-1] is _END
            items = [c for c in chunk if c is not _END]
            if not items or self._error is not None:
                continue
            try:
                texts = [self._decode(ids) for _, ids, _ in items]
                verdicts = score_batch(texts, [a for _, _, a in items], **self._kw)
                self._results.update((k, v) for (k, _, _), v in zip(items, verdicts))
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread by results()
                self._error = e
