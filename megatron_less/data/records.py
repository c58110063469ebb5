"""Read problem/answer records from local JSON Lines, JSON or Parquet files.

A bad row is reported with its file and line (row number for Parquet) and either stops the
load or, with ``skip_bad=True``, is skipped and counted: a silently dropped or half-read row
would change what the trainer learns from without anyone noticing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from megatron_less.rewards.boxed import extract_last_boxed

PROBLEM_KEYS = ("problem", "question", "Problem", "prompt")
ANSWER_KEYS = ("answer", "final_answer", "Answer", "expected_answer", "ground_truth")
ID_KEYS = ("unique_id", "id", "idx", "ID")
_MATH_DOLLAR = re.compile(r"(?<!\\)\$")


class DataError(ValueError):
    """A data file that cannot be used as given; the message names the file and line."""


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    answer: str
    extra: dict = field(default_factory=dict, compare=False, repr=False)


@dataclass
class LoadStats:
    path: str
    rows: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)  # the first few, for the log

    def note(self, message: str) -> None:
        self.skipped += 1
        if len(self.errors) < 20:
            self.errors.append(message)


def iter_rows(path: str | Path) -> Iterator[tuple[int, dict | Exception]]:
    """(line number, row) for each record; a row that does not parse comes as its exception."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield i, row
        return
    opener = _open_gz if suffix.endswith(".gz") else _open_text
    with opener(path) as f:
        if suffix.startswith(".json") and not suffix.startswith(".jsonl"):
            head = f.read(1)
            while head.isspace():
                head = f.read(1)
            if head == "[":  # a JSON array of records
                try:
                    rows = json.loads(head + f.read())
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{e.lineno}: bad JSON: {e.msg}") from None
                for i, row in enumerate(rows, start=1):
                    yield i, row
                return
            f.seek(0)
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, e


def _open_text(path: Path):
    return open(path, encoding="utf-8")


def _open_gz(path: Path):
    import gzip

    return gzip.open(path, "rt", encoding="utf-8")


def _first(row: dict, keys: Sequence[str]):
    for k in keys:
        if row.get(k) is not None:
            return k, row[k]
    return None, None


def answer_text(value) -> str | None:
    """A reference answer as a string: numbers as written (27.0 -> "27"), an OlympiadBench
    ``final_answer`` list joined with ", " and stripped of ``$``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, (list, tuple)):
        parts = [answer_text(v) for v in value]
        if not parts or any(p is None for p in parts):
            return None
        return ", ".join(parts)
    if isinstance(value, str):
        return _MATH_DOLLAR.sub("", value).strip()  # "$69$" -> "69"; "\\$15" stays
    return None


def to_problem(
    row,
    where: str,
    problem_keys: Sequence[str] = PROBLEM_KEYS,
    answer_keys: Sequence[str] = ANSWER_KEYS,
) -> Problem:
    """One record -> Problem, or DataError naming ``where`` (``file:line``) and what is wrong."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    pkey, problem = _first(row, problem_keys)
    if not isinstance(problem, str) or not problem.strip():
        raise DataError(
            f"{where}: missing or empty problem field (looked for {list(problem_keys)})"
        )
    akey, raw = _first(row, answer_keys)
    answer = answer_text(raw) if akey else None
    if answer is None and isinstance(row.get("solution"), str):
        answer = extract_last_boxed(row["solution"])  # MATH on the hub has no answer field
    if not answer:
        raise DataError(
            f"{where}: missing or empty answer field (looked for {list(answer_keys)} "
            f"and a \\boxed{{}} in 'solution')"
        )
    _, ident = _first(row, ID_KEYS)
    extra = {k: v for k, v in row.items() if k not in (pkey, akey)}
    return Problem(str(ident) if ident is not None else where, problem, answer, extra)


def read_rows(path: str | Path, parse, skip_bad: bool = False, what: str = "records") -> tuple[list, LoadStats]:
    """``parse(row, where)`` for every row of a local file. A bad row (bad JSON, or ``parse``
    raising DataError) raises, or with ``skip_bad`` is skipped and counted."""
    stats, out = LoadStats(str(path)), []
    for lineno, row in iter_rows(path):
        where = f"{path}:{lineno}"
        try:
            if isinstance(row, Exception):
                raise DataError(f"{where}: bad JSON: {row.msg} (column {row.colno})")
            out.append(parse(row, where))
            stats.rows += 1
        except DataError as e:
            if not skip_bad:
                raise
            stats.note(str(e))
    if not out:
        raise DataError(f"{path}: no usable {what} ({stats.skipped} bad rows skipped)")
    return out, stats


def load_problems(
    path: str | Path,
    skip_bad: bool = False,
    problem_keys: Sequence[str] = PROBLEM_KEYS,
    answer_keys: Sequence[str] = ANSWER_KEYS,
) -> tuple[list[Problem], LoadStats]:
    """All problems of a local file. Bad rows raise DataError, or are skipped and counted."""
    return read_rows(path, lambda row, where: to_problem(row, where, problem_keys, answer_keys), skip_bad)
