"""The running-sum chain-of-thought demo task: single-digit operands added left to right, one
line per addition, each line starting from the previous line's result.

    prompt:   "What is 3 + 5 + 9 + 2 + 7?\\nAnswer:"
    response: " 3 + 5 = 8
               8 + 9 = 17
               17 + 2 = 19
               19 + 7 = 26
               \\boxed{26}"

(every line starts with a space; the step lines end with a newline). The operands are read in
the prompt's order, so the next operand is always the one after the last one used; every line
has the same phrasing (" + ", " = "), low-entropy segments that all responses share, and the
sums are where a right trace and a wrong one differ. The boxed answer is the last line's result.
The number of operands (``operands`` = the difficulty knob: one step line per operand after the
first) is drawn per problem from ``OPERANDS``.

Problems are drawn at random (seeded, no download); ``split`` gives disjoint training and
held-out rows (no held-out prompt appears in training)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from megatron_less.demo.task import distinct_by_prompt, train_heldout

PROMPT_PREFIX, PROMPT_SUFFIX = "What is ", "?\nAnswer:"
LOW, HIGH = 1, 9  # single-digit operands
MIN_OPERANDS, MAX_OPERANDS = 2, HIGH - LOW + 1

# the defaults of ``split``: 5 or 6 operands (39-57-token answers), 4000 training and 256 held-out problems
OPERANDS = (5, 6)
TRAIN_PROBLEMS = 4000
HELDOUT_PROBLEMS = 256


def _check_operands(operands: tuple[int, ...]) -> tuple[int, ...]:
    operands = tuple(operands)
    if not operands or any(not MIN_OPERANDS <= n <= MAX_OPERANDS for n in operands):
        raise ValueError(f"operands={operands}: each count must be between {MIN_OPERANDS} and {MAX_OPERANDS}")
    return operands


def make_row(terms: list[int] | tuple[int, ...]) -> dict:
    """One problem: ``prompt`` (rendered), ``answer``, ``terms``, ``operands`` (their count).
    The operands are distinct (see ``problems``)."""
    terms = [int(t) for t in terms]
    if (not MIN_OPERANDS <= len(terms) <= MAX_OPERANDS or any(not LOW <= t <= HIGH for t in terms)
            or len(set(terms)) != len(terms)):  # fmt: skip
        raise ValueError(f"terms={terms}: need {MIN_OPERANDS}-{MAX_OPERANDS} distinct operands, each in {LOW}..{HIGH}")
    prompt = PROMPT_PREFIX + " + ".join(map(str, terms)) + PROMPT_SUFFIX
    return {"prompt": prompt, "answer": str(sum(terms)), "terms": terms, "operands": len(terms)}


def problems(n: int, seed: int, operands: tuple[int, ...] = OPERANDS) -> list[dict]:
    """``n`` distinct problems (by prompt), operand counts drawn uniformly from ``operands``; the
    operands of a problem are distinct digits (drawn without replacement), so the operand after
    the last one used is found by looking that one up in the prompt (a tiny model learns this
    quickly; with repeated digits the lookup is ambiguous and it did not). The same for the same
    arguments."""
    operands = _check_operands(operands)
    space = sum(math.perm(HIGH - LOW + 1, k) for k in set(operands))
    if n > space // 2:
        raise ValueError(f"n={n}: too many problems for operands={operands} ({space} exist; ask for at most half)")
    return distinct_by_prompt(n, seed, lambda rng: make_row(rng.sample(range(LOW, HIGH + 1), rng.choice(operands))))


def split(seed: int, train: int = TRAIN_PROBLEMS, heldout: int = HELDOUT_PROBLEMS,
          operands: tuple[int, ...] = OPERANDS) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """(training rows, held-out rows): ``train`` and ``heldout`` problems, disjoint by prompt,
    the same for the same arguments."""
    return train_heldout(lambda n: problems(n, seed, operands), train, heldout)


@dataclass(frozen=True)
class Step:
    """One line: ``total`` (the running sum so far) + ``operand`` = ``result``."""

    total: int
    operand: int
    result: int

    @property
    def consistent(self) -> bool:
        """The line's own arithmetic is right (says nothing about whether it used the right
        operand or carried the right total)."""
        return self.total + self.operand == self.result


def steps(terms: list[int]) -> list[Step]:
    """The right steps for ``sum(terms)``, in the prompt's order."""
    if len(terms) < MIN_OPERANDS:
        raise ValueError(f"terms={terms}: need at least {MIN_OPERANDS} operands")
    out, total = [], terms[0]
    for t in terms[1:]:
        out.append(Step(total, t, total + t))
        total += t
    return out


def render(step_list: list[Step], answer: str) -> str:
    """A response from its steps and its boxed answer (``target`` renders the right ones)."""
    return "".join(f" {s.total} + {s.operand} = {s.result}\n" for s in step_list) + f" \\boxed{{{answer}}}"


def target(row: dict) -> str:
    """The supervised worked answer the warm-up teaches."""
    return render(steps(row["terms"]), row["answer"])


_STEP = re.compile(r"^ ?(\d+) \+ (\d+) = (\d+)$")
_ANSWER = re.compile(r"^ ?\\boxed\{([^{}]*)\}$")


def parse_trace(text: str, strict: bool = True) -> list[Step]:
    """The step lines of a response, in order. ``strict``: a line that is neither a step nor the
    answer line (or a missing answer line) raises ValueError; otherwise such lines are skipped."""
    out: list[Step] = []
    lines = text.split("\n")
    for i, line in enumerate(lines):
        m = _STEP.match(line)
        if m:
            out.append(Step(*(int(g) for g in m.groups())))
        elif strict and not (i == len(lines) - 1 and _ANSWER.match(line)):
            raise ValueError(f"line {i + 1} is not a step{' or the answer' if i == len(lines) - 1 else ''}: {line!r}")
    return out


def chained(step_list: list[Step]) -> bool:
    """Every line is consistent and starts from the previous line's result."""
    return all(s.consistent for s in step_list) and all(
        s.total == prev.result for prev, s in zip(step_list, step_list[1:])
    )
