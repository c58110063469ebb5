"""Is a model's boxed answer mathematically the same as the reference answer?

math-verify does the heavy lifting (LaTeX -> sympy, numeric tolerance, sets, intervals,
units, percent, degrees). This module adds what the benchmark files need on top of it:

* a cheap ``quick_verdict`` first (same canonical spelling; two plain numbers): most
  answers in a rollout batch are decided there, keeping 4096 verdicts per step cheap;
* small rewrites of forms math-verify misreads (``4.5e33``, ``np.arcsin(..)``,
  ``\\frac{12}{5,\\!525}``);
* rescue parses for references that math-verify can only keep as a raw string
  (``m_{\\max }=n^{2}-n-1``, ``-1./3``, ``t(0,4]``).

Nothing here sets timers: math-verify's own timeouts use ``signal.alarm`` and would cancel the
caller's timer, so they are switched off and the caller (``rewards.verdict``) bounds the time.
"""

from __future__ import annotations

import functools
import logging
import re
from decimal import Decimal

from latex2sympy2_extended.math_normalization import NormalizationConfig
from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from sympy import And, Eq, Symbol

# Longer "answers" are rambling, not answers (the longest reference in MATH/OlympiadBench is
# ~200 characters); refusing them up front keeps the LaTeX parser away from huge inputs.
MAX_ANSWER_CHARS = 1000

# math-verify warns once that its timeout is off and on every failed parse; in a reward worker
# that would flood the log for every malformed model answer.
logging.getLogger("math_verify").setLevel(logging.ERROR)
logging.getLogger("latex2sympy2_extended").setLevel(logging.ERROR)

# math-verify's own unit stripping (units=True) deletes trailing letters such as t, h, s, c, l
# after a digit or space, so "4t" == "4" and "a + b + c" == "a + b + d" (both become "a +").
# It is off; ``_strip_units`` below removes only units that cannot be variables.
_NORMALIZE = NormalizationConfig(
    basic_latex=True, units=False, malformed_operators=True, nits=True, boxed="all", equations=False
)
_LATEX_FIRST = [
    LatexExtractionConfig(boxed_match_priority=0, normalization_config=_NORMALIZE),
    ExprExtractionConfig(),
]
_EXPR_ONLY = [ExprExtractionConfig()]

_SCI = re.compile(r"^\s*([+-]?\d+(?:\.\d*)?)\s*[eE]\s*([+-]?\d+)\s*$")
_PY_PREFIX = re.compile(
    r"\b(?:np|numpy|math|sympy|sp)\.(?:(arcsin|arccos|arctan|sin|cos|tan|log|exp|pi)\b)?"
)
_GROUPED_IN_BRACES = re.compile(r"(?<=\{)\d{1,3}(?:,(?:\\!)?\d{3})+(?=\})")
_TEXT_UNIT = re.compile(
    r"(?<=\S)\s*(?:\\[,;: !]\s*)*\\(?:text|mbox|mathrm)\s*\{\s*[A-Za-z][A-Za-z.\s]*\}"
    r"(?:\^\{?[23]\}?)?\s*$"
)
_WORD_UNITS = (
    "cm|mm|km|meters?|metres?|feet|foot|ft|inch(?:es)?|miles?|yards?|units?|square units|"
    "degrees?|dollars?|cents?|seconds?|minutes?|hours?|days?|weeks?|years?|ways|mph|kg|grams?"
)
_PLAIN_UNIT = re.compile(rf"(?<=\d)\s+(?:{_WORD_UNITS})(?:\^\{{?[23]\}}?)?\s*$")
_VAR_BEFORE_INTERVAL = re.compile(r"^[A-Za-z]\s*(?:\\in\s*)?([\(\[].*[\)\]])$")

_CANON_DROP = re.compile(r"\\left|\\right|\\[,;:! ]|\\displaystyle|\s+|\$")
_CANON_FRAC = re.compile(r"\\[dt]frac")
_CANON_SINGLE = re.compile(r"([_^])\{(\w)\}")
_CANON_TEXT = re.compile(r"\\(?:text|mathrm|textbf|mbox)\{([^{}]*)\}")


def canonical(s: str) -> str:
    """Formatting-free spelling: equal canonical strings are equal answers.

    Only layout is removed (spacing, ``\\left``, ``\\dfrac`` vs ``\\frac``, ``_{1}`` vs ``_1``,
    ``\\text{}`` wrappers), never anything with mathematical meaning.
    """
    s = _CANON_TEXT.sub(r"\1", s)
    s = _CANON_DROP.sub("", s)
    s = _CANON_FRAC.sub(r"\\frac", s)
    s = _CANON_SINGLE.sub(r"\1\2", s)
    return s.rstrip(".")


def rewrite(s: str) -> str:
    """Rewrite spellings that math-verify would misread into ones it reads correctly."""
    m = _SCI.match(s)
    if m:
        return f"{m.group(1)}\\times 10^{{{m.group(2)}}}"
    s = _PY_PREFIX.sub(lambda m: "\\" + m.group(1) if m.group(1) else "", s)  # np.arcsin -> \arcsin
    s = _strip_units(s)
    return _GROUPED_IN_BRACES.sub(lambda g: g.group(0).replace(",", "").replace("\\!", ""), s)


def _strip_units(s: str) -> str:
    """Drop a trailing unit written as text (``5\\text{ cm}``, ``144 \\mbox{ m}^3``) or as a
    multi-letter unit word after a number (``10 feet``). A lone letter is never taken for a
    unit: it may be a variable."""
    for _ in range(2):  # "12 \text{ square} \text{ units}"
        t = _TEXT_UNIT.sub("", s)
        t = _PLAIN_UNIT.sub("", t)
        if t == s or not t.strip():
            break
        s = t
    return s


def _parse_boxed(s: str, config=_LATEX_FIRST) -> list:
    return parse("\\boxed{" + s + "}", extraction_config=config, parsing_timeout=None)


def _has_math(parsed: list) -> bool:
    return any(not isinstance(p, str) for p in parsed)


@functools.lru_cache(maxsize=8192)
def parse_reference(answer: str) -> tuple:
    """Parse a reference answer once per worker: the n samples of a prompt share it."""
    text = rewrite(answer.strip())
    parsed = _parse_boxed(text)
    if _has_math(parsed):
        return tuple(parsed)
    # math-verify kept only the raw string: try readings that a model's answer could match.
    rescues = []
    if "=" in text:  # "m_{\max}=n^2-n-1": the model is expected to give the right side
        rescues.append(text.rsplit("=", 1)[1])
    m = _VAR_BEFORE_INTERVAL.match(text)
    if m:  # "t(0,4]" in OlympiadBench lost its "\in"
        rescues.append(m.group(1))
    extra = [p for r in rescues for p in _parse_boxed(r)]
    extra += parse(text, extraction_config=_EXPR_ONLY, parsing_timeout=None)  # "-1./3"
    return tuple(parsed) + tuple(extra)


def parse_answer(answer: str) -> list:
    return _parse_boxed(rewrite(answer.strip()))


_PLAIN_NUMBER = re.compile(r"^\s*[+-]?(?:\d+\.?\d*|\.\d+)\s*$")


def quick_verdict(extracted: str, reference: str) -> bool | None:
    """Decide without the parser when that is safe, else None.

    Same canonical spelling -> equal. Two plain decimal numbers ("025" vs "25", "7" vs "12")
    -> compared exactly; numbers that differ only past the 4th significant digit are left to
    math-verify, whose rounding rules decide those. Wrong numeric answers are the bulk of a
    rollout batch, so this keeps most verdicts out of sympy.
    """
    if not extracted.strip():
        return None
    if canonical(extracted) == canonical(reference):
        return True
    if _PLAIN_NUMBER.match(extracted) and _PLAIN_NUMBER.match(reference):
        a, b = Decimal(extracted.strip()), Decimal(reference.strip())
        if a == b:
            return True
        if abs(a - b) > Decimal("1e-4") * max(Decimal(1), abs(b)):
            return False
    return None


def equivalent(extracted: str, reference: str, shortcuts: bool = True) -> bool:
    """True when the model's boxed content means the same as the reference answer.

    ``shortcuts=False`` skips ``quick_verdict`` so that math-verify alone decides (used to
    audit the parser on the benchmark answers). Unbounded in time for adversarial input;
    call it under a timer (see ``rewards.verdict.judge_timed``).
    """
    if len(extracted) > MAX_ANSWER_CHARS:
        return False
    quick = quick_verdict(extracted, reference) if shortcuts else None
    if quick is not None:
        return quick
    gold = parse_reference(reference)
    pred = parse_answer(extracted)
    if not any(isinstance(g, (Eq, And)) for g in gold):
        pred = [p for p in pred if not _is_loose_equation(p)]
    if not gold or not pred:
        return False
    return verify(list(gold), pred, timeout_seconds=None)


def _is_loose_equation(expr) -> bool:
    """An equation whose left side is neither a plain variable nor a number.

    Against a non-equation reference, math-verify compares only an equation's right side, so
    "20x + 23y + 26z - 69 = 0" would earn the reward for the answer "0". Kept are assignments
    ("y = 2x + 3" for "2x + 3") and worked arithmetic ("2 + 3 = 5" for "5").
    """
    rels = expr.args if isinstance(expr, And) else (expr,)
    if not rels or not all(isinstance(r, Eq) for r in rels):
        return False
    lhs = rels[0].lhs
    return not (isinstance(lhs, Symbol) or not lhs.free_symbols)
