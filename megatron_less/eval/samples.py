"""The samples document: generated responses per problem per benchmark, as saved to JSON.

    {"meta": {...},
     "benchmarks": {"aime24": [{"id": "...", "problem": "...", "answer": "025",
                                "responses": ["...", "..."]}, ...], ...}}

A scored document (what ``megatron-less eval`` writes) has ``samples`` — a list of
``{"response", "score", "extracted", "reason"}`` — instead of or next to ``responses``; both
forms load, so a results file can be re-scored (e.g. after a verifier fix).
"""

from __future__ import annotations

import json
from pathlib import Path


class SamplesError(ValueError):
    """A samples file that cannot be scored; the message says where in it."""


def build_document(
    problems_by_benchmark: dict, responses_by_benchmark: dict, meta: dict | None = None
) -> dict:
    """Samples document from loaded problems and the generator's responses."""
    doc = {"meta": dict(meta or {}), "benchmarks": {}}
    for name, problems in problems_by_benchmark.items():
        responses = responses_by_benchmark[name]
        doc["benchmarks"][name] = [
            {"id": p.id, "problem": p.problem, "answer": p.answer, "responses": list(r)}
            for p, r in zip(problems, responses, strict=True)
        ]
    return doc


def responses_of(item: dict, where: str) -> list[str]:
    if "responses" in item:
        out = item["responses"]
    elif "samples" in item:
        out = [s.get("response") if isinstance(s, dict) else None for s in item["samples"]]
    else:
        raise SamplesError(f"{where}: needs 'responses' (list of strings) or 'samples'")
    if not isinstance(out, list) or not out or not all(isinstance(r, str) for r in out):
        raise SamplesError(f"{where}: responses must be a non-empty list of strings")
    return out


def validate(doc, source: str = "samples") -> dict[str, list[dict]]:
    """{benchmark: items}, each item with a string answer and n responses (same n per
    benchmark, which the metrics need). Raises SamplesError naming the offending entry."""
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("benchmarks"), dict)
        or not doc["benchmarks"]
    ):
        raise SamplesError(f"{source}: expected an object with a non-empty 'benchmarks' mapping")
    out = {}
    for name, items in doc["benchmarks"].items():
        if not isinstance(items, list) or not items:
            raise SamplesError(f"{source}: benchmarks.{name} must be a non-empty list")
        n = None
        for i, item in enumerate(items):
            where = f"{source}: benchmarks.{name}[{i}]"
            if not isinstance(item, dict):
                raise SamplesError(f"{where}: expected an object")
            if not isinstance(item.get("answer"), str) or not item["answer"].strip():
                raise SamplesError(f"{where}: missing or empty string 'answer'")
            count = len(responses_of(item, where))
            if n is None:
                n = count
            elif count != n:
                raise SamplesError(f"{where}: has {count} responses but earlier problems have {n}")
        out[name] = items
    return out


def load_document(path: str | Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise SamplesError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise SamplesError(f"{path}:{e.lineno}: bad JSON: {e.msg}") from None
    validate(doc, str(path))
    return doc
