"""One verdict, in this process: the result type, the parser-free prejudgement and the
CPU-time-bounded call into math-verify.

``rewards.math`` (the public scoring API) and ``rewards.pool`` (the worker pool it uses) both
build on this module; keeping it separate lets the pool import it without importing ``math``,
which itself imports the pool.

Time bounds. ``timeout`` is CPU seconds: a verdict runs under a ``setitimer(ITIMER_PROF)``
alarm, which interrupts pure-Python work (LaTeX parsing, sympy simplification). CPU time, not
wall time, so that a loaded host (rollout engines, other workers) does not turn slow-but-fine
verdicts into false "timeout"s; and SIGPROF, not SIGALRM, so a caller's own alarm is left
alone. Alarms reach only a process's main thread and cannot interrupt long C calls, so
``score_batch`` runs verdicts in worker processes that the parent kills and replaces past a
wall-clock limit (see ``rewards.pool``).
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass

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
