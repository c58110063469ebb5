"""The verifiable math reward: 1.0 when the last boxed answer equals the reference, else 0.0.

GRPO learns only from this number and LESS splits segments by it, so a wrong verdict poisons
both; every verdict therefore carries the reason it was given (``verdict.REASONS``).

``timeout`` is CPU seconds per verdict (see ``rewards.verdict``). ``compute_score`` judges in
this process from the main thread; from any other thread (alarms reach only the main thread)
and in ``score_batch`` verdicts run in the worker pool of ``rewards.pool``.
"""

from __future__ import annotations

import threading
from typing import Sequence

from megatron_less.rewards.pool import shared_pool
from megatron_less.rewards.verdict import (
    DEFAULT_TIMEOUT,
    REASONS,
    ScoreResult,
    check_timeout,
    judge_timed,
    prejudge,
)

__all__ = ["DEFAULT_TIMEOUT", "REASONS", "ScoreResult", "compute_score", "score_batch"]


def compute_score(
    response: str, ground_truth: str, timeout: float = DEFAULT_TIMEOUT
) -> ScoreResult:
    """Score one response against its reference answer, within ``timeout`` seconds."""
    check_timeout(timeout)
    early = prejudge(response, ground_truth)
    if isinstance(early, ScoreResult):
        return early
    if threading.current_thread() is threading.main_thread():
        return judge_timed(early, ground_truth, timeout)
    return score_batch([response], [ground_truth], num_workers=1, timeout=timeout)[0]


def score_batch(
    responses: Sequence[str],
    ground_truths: Sequence[str],
    num_workers: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    shortcuts: bool = True,
) -> list[ScoreResult]:
    """Score many responses in parallel worker processes; never raises for a bad item.

    ``num_workers=0`` scores in this process (main thread only; for debugging). Otherwise a
    shared pool of that many workers (default: min(8, CPUs)) is reused across calls.
    ``shortcuts=False`` makes math-verify judge every answer (see ``quick_verdict``).
    """
    check_timeout(timeout)
    if len(responses) != len(ground_truths):
        raise ValueError(
            f"score_batch: {len(responses)} responses but {len(ground_truths)} ground truths"
        )
    if num_workers == 0:
        out = []
        for r, g in zip(responses, ground_truths):
            early = prejudge(r, g, shortcuts)
            out.append(
                early
                if isinstance(early, ScoreResult)
                else judge_timed(early, g, timeout, shortcuts)
            )
        return out
    return shared_pool(num_workers).score(responses, ground_truths, timeout, shortcuts)
