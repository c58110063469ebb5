"""The verifiable math reward: 1.0 when the last boxed answer equals the reference, else 0.0.

GRPO learns only from this number and LESS splits segments by it, so a wrong verdict poisons
both; every verdict therefore carries the reason it was given.

Time bounds. ``timeout`` is CPU seconds: a verdict runs under a ``setitimer(ITIMER_PROF)``
alarm, which interrupts pure-Python work (LaTeX parsing, sympy simplification). CPU time, not
wall time, so that a loaded host (rollout engines, other workers) does not turn slow-but-fine
verdicts into false "timeout"s; and SIGPROF, not SIGALRM, so a caller's own alarm is left
alone. Alarms reach only a process's main thread and cannot interrupt long C calls, so
``score_batch`` runs verdicts in worker processes that the parent kills and replaces past a
wall-clock limit (see ``rewards.pool``). ``compute_score`` from a non-main thread uses the pool.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from typing import Sequence

from megatron_less.rewards.boxed import extract_last_boxed
from megatron_less.rewards.equivalence import MAX_ANSWER_CHARS, equivalent, quick_verdict

DEFAULT_TIMEOUT = 3.0
REASONS = ("correct", "no_box", "timeout", "mismatch", "error")


@dataclass(frozen=True)
class ScoreResult:
    score: float  # 1.0 or 0.0
    extracted: str | None  # content of the last box; None when there was none
    reason: str  # one of REASONS

    def to_dict(self) -> dict:
        return {"score": self.score, "extracted": self.extracted, "reason": self.reason}


class VerifyTimeout(BaseException):
    """Raised by the alarm. A BaseException so that math-verify's ``except Exception`` blocks
    cannot swallow it and turn a timeout into a silent "mismatch"."""


def _on_alarm(signum, frame):
    raise VerifyTimeout()


def check_timeout(timeout) -> float:
    # setitimer(0) would mean "no limit", the opposite of what a caller passing 0 wants.
    if not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    return float(timeout)


def prejudge(response: str, reference: str, shortcuts: bool = True) -> ScoreResult | str:
    """Verdicts that need no parser (no box, absurdly long, ``quick_verdict``), or the
    extracted answer when the parser must decide. Cheap, so the pool's parent runs it inline."""
    extracted = extract_last_boxed(response)
    if extracted is None:
        return ScoreResult(0.0, None, "no_box")
    if len(extracted) > MAX_ANSWER_CHARS:
        return ScoreResult(0.0, extracted, "mismatch")
    quick = quick_verdict(extracted, reference) if shortcuts else None
    if quick is not None:
        return ScoreResult(1.0 if quick else 0.0, extracted, "correct" if quick else "mismatch")
    return extracted


def judge_timed(
    extracted: str, reference: str, timeout: float, shortcuts: bool = True
) -> ScoreResult:
    """Run ``equivalent`` with a budget of ``timeout`` CPU seconds. Main thread only."""
    old_handler = signal.signal(signal.SIGPROF, _on_alarm)
    started = time.process_time()
    old_delay, old_interval = signal.setitimer(signal.ITIMER_PROF, timeout)
    try:
        ok = equivalent(extracted, reference, shortcuts)
        result = ScoreResult(1.0 if ok else 0.0, extracted, "correct" if ok else "mismatch")
    except VerifyTimeout:
        result = ScoreResult(0.0, extracted, "timeout")
    except Exception:  # noqa: BLE001 - one bad answer must cost one reward, not the batch
        result = ScoreResult(0.0, extracted, "error")
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, old_handler)
        if old_delay:  # a profiler's timer was running: give back what is left of it
            spent = time.process_time() - started
            signal.setitimer(signal.ITIMER_PROF, max(old_delay - spent, 1e-3), old_interval)
    return result


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
    from megatron_less.rewards.pool import shared_pool

    return shared_pool(num_workers).score(responses, ground_truths, timeout, shortcuts)
