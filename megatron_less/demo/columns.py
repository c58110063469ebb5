"""The chain-of-thought demo task: multi-digit addition worked column by column with carries.

    prompt:   "What is 4735 + 2896?\\nAnswer:"
    response: " ones: 5 + 6 + 0 = 11, write 1 carry 1
               tens: 3 + 9 + 1 = 13, write 3 carry 1
               hundreds: 7 + 8 + 1 = 16, write 6 carry 1
               thousands: 4 + 2 + 1 = 7, write 7 carry 0
               answer: \\boxed{7631}"

(every step line starts with a space and ends with a newline). Every line has the same phrasing
(": ", " + ", " = ", ", write ", " carry "): low-entropy segments that all responses share. The
column digits, the sums, the written digit and the carries are where a right trace and a wrong
one differ; the boxed answer is the carry out of the last column (when 1) followed by the written
digits from the last column to the first. Both operands have the same number of digits
(``digits`` = the difficulty knob: one step line per digit).

Problems are drawn at random (seeded, no download); ``split`` gives disjoint training and
held-out rows (no held-out prompt appears in training)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from megatron_less.demo.task import distinct_by_prompt, train_heldout

TEMPLATE = "What is {a} + {b}?\nAnswer:"
PLACES = ("ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands")
MIN_DIGITS, MAX_DIGITS = 2, len(PLACES)

# the defaults of ``split``: 3- and 4-digit operands, 4000 training and 256 held-out problems
DIGITS = (3, 4)
TRAIN_PROBLEMS = 4000
HELDOUT_PROBLEMS = 256


def _check_digits(digits: tuple[int, ...]) -> tuple[int, ...]:
    digits = tuple(digits)
    if not digits or any(not MIN_DIGITS <= d <= MAX_DIGITS for d in digits):
        raise ValueError(f"digits={digits}: each must be between {MIN_DIGITS} and {MAX_DIGITS}")
    return digits


def make_row(a: int, b: int) -> dict:
    """One problem: ``prompt`` (rendered), ``answer``, ``a``, ``b``, ``digits``."""
    if a < 0 or b < 0 or len(str(a)) != len(str(b)):
        raise ValueError(f"a={a}, b={b}: need non-negative operands with the same number of digits")
    return {"prompt": TEMPLATE.format(a=a, b=b), "answer": str(a + b), "a": a, "b": b, "digits": len(str(a))}


def problems(n: int, seed: int, digits: tuple[int, ...] = DIGITS) -> list[dict]:
    """``n`` distinct problems (by prompt), digit counts drawn uniformly from ``digits``; operands
    have no leading zero. The same for the same arguments."""
    digits = _check_digits(digits)
    space = sum((9 * 10 ** (d - 1)) ** 2 for d in set(digits))
    if n > space // 2:
        raise ValueError(f"n={n}: too many problems for digits={digits} ({space} exist; ask for at most half)")

    def draw(rng):
        d = rng.choice(digits)
        lo, hi = 10 ** (d - 1), 10**d - 1
        return make_row(rng.randint(lo, hi), rng.randint(lo, hi))

    return distinct_by_prompt(n, seed, draw)


def split(seed: int, train: int = TRAIN_PROBLEMS, heldout: int = HELDOUT_PROBLEMS,
          digits: tuple[int, ...] = DIGITS) -> tuple[list[dict], list[dict]]:  # fmt: skip
    """(training rows, held-out rows): ``train`` and ``heldout`` problems, disjoint by prompt,
    the same for the same arguments."""
    return train_heldout(lambda n: problems(n, seed, digits), train, heldout)


@dataclass(frozen=True)
class Step:
    """One column: ``a`` + ``b`` + ``carry_in`` = ``total``, write ``digit``, carry ``carry_out``."""

    place: str
    a: int
    b: int
    carry_in: int
    total: int
    digit: int
    carry_out: int

    @property
    def consistent(self) -> bool:
        """The line's own arithmetic is right (says nothing about whether the digits were read
        from the right column)."""
        return (self.a + self.b + self.carry_in == self.total and self.digit == self.total % 10
                and self.carry_out == self.total // 10)  # fmt: skip


def steps(a: int, b: int) -> list[Step]:
    """The right column steps for ``a + b``, ones first."""
    da, db = str(a)[::-1], str(b)[::-1]
    if len(da) != len(db) or len(da) > len(PLACES):
        raise ValueError(f"a={a}, b={b}: need the same number of digits, at most {len(PLACES)}")
    out, carry = [], 0
    for place, x, y in zip(PLACES, da, db):
        total = int(x) + int(y) + carry
        out.append(Step(place, int(x), int(y), carry, total, total % 10, total // 10))
        carry = total // 10
    return out


def render(step_list: list[Step], answer: str) -> str:
    """A response from its steps and its boxed answer (``target`` renders the right ones)."""
    lines = [f" {s.place}: {s.a} + {s.b} + {s.carry_in} = {s.total}, write {s.digit} carry {s.carry_out}\n"
             for s in step_list]  # fmt: skip
    return "".join(lines) + f" answer: \\boxed{{{answer}}}"


def target(row: dict) -> str:
    """The supervised worked answer the warm-up teaches."""
    return render(steps(row["a"], row["b"]), row["answer"])


_STEP = re.compile(r"^ ?([a-z-]+): (\d+) \+ (\d+) \+ (\d+) = (\d+), write (\d+) carry (\d+)$")
_ANSWER = re.compile(r"^ ?answer: \\boxed\{([^{}]*)\}$")


def parse_trace(text: str, strict: bool = True) -> list[Step]:
    """The step lines of a response, in order. ``strict``: a line that is neither a step nor the
    answer line (or a missing answer line) raises ValueError; otherwise such lines are skipped."""
    out: list[Step] = []
    lines = text.split("\n")
    for i, line in enumerate(lines):
        m = _STEP.match(line)
        if m:
            out.append(Step(m.group(1), *(int(g) for g in m.groups()[1:])))
        elif strict and not (i == len(lines) - 1 and _ANSWER.match(line)):
            raise ValueError(f"line {i + 1} is not a step{' or the answer' if i == len(lines) - 1 else ''}: {line!r}")
    return out
