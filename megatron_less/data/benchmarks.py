"""The math datasets by name: where their offline copy lives and where they are on the HF hub.

``load_dataset_problems(source)`` accepts a registry name (``"aime24"``), a local file
(``.jsonl``/``.json``/``.parquet``), or a hub dataset id (``"org/name"``, optionally
``"org/name:split"``). Registry names use the local copy under the data directory when it is
there (``$MLESS_DATA_DIR``, default ``<repo>/../shared/data``) and the hub otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from megatron_less.data.records import DataError, LoadStats, Problem, load_problems


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    local_file: str  # relative to the data directory
    hub_name: str
    hub_split: str
    hub_config: str | None = None


# Hub ids are the copies most RL math papers evaluate on; their field names differ
# (problem/question, answer/final_answer), which ``records.to_problem`` absorbs.
BENCHMARKS: dict[str, DatasetSpec] = {
    s.name: s
    for s in [
        DatasetSpec("math500", "eval/math500.jsonl", "HuggingFaceH4/MATH-500", "test"),
        DatasetSpec("aime24", "eval/aime24.jsonl", "HuggingFaceH4/aime_2024", "train"),
        DatasetSpec("aime25", "eval/aime25.jsonl", "yentinglin/aime_2025", "train"),
        DatasetSpec("amc23", "eval/amc23.jsonl", "math-ai/amc23", "test"),
        DatasetSpec("minerva_math", "eval/minerva_math.jsonl", "math-ai/minervamath", "test"),
        DatasetSpec("olympiadbench", "eval/olympiadbench.jsonl", "math-ai/olympiadbench", "test"),
    ]
}
TRAIN_SETS: dict[str, DatasetSpec] = {
    s.name: s
    for s in [
        DatasetSpec(
            "math_train", "math/train.jsonl", "DigitalLearningGmbH/MATH-lighteval", "train"
        ),
        DatasetSpec("math_test", "math/test.jsonl", "DigitalLearningGmbH/MATH-lighteval", "test"),
    ]
}
DATASETS = {**BENCHMARKS, **TRAIN_SETS}
_ALIASES = {"math": "math_train", "minerva": "minerva_math", "olympiad": "olympiadbench"}


def default_data_dir() -> Path:
    env = os.environ.get("MLESS_DATA_DIR")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    return repo.parent / "shared" / "data"


def resolve(source: str, data_dir: str | Path | None = None) -> tuple[str, object]:
    """How ``source`` will be loaded: ("local", path) or ("hub", DatasetSpec)."""
    name = _ALIASES.get(source, source)
    if name in DATASETS:
        spec = DATASETS[name]
        path = Path(data_dir or default_data_dir()) / spec.local_file
        return ("local", path) if path.is_file() else ("hub", spec)
    path = Path(source)
    if path.suffix in (".jsonl", ".json", ".parquet", ".gz") or path.exists():
        return "local", path
    if "/" in source:
        hub_name, _, split = source.partition(":")
        return "hub", DatasetSpec(hub_name.replace("/", "_"), "", hub_name, split or "test")
    raise DataError(
        f"unknown dataset {source!r}: not a registered name ({', '.join(DATASETS)}), "
        "not a local .jsonl/.json/.parquet file, and not a hub id like 'org/name[:split]'"
    )


def load_from_hub(spec: DatasetSpec, skip_bad: bool = False) -> tuple[list[Problem], LoadStats]:
    """Download through ``datasets`` (needs network or a populated HF cache)."""
    from datasets import load_dataset

    from megatron_less.data.records import to_problem

    where = f"hf:{spec.hub_name}[{spec.hub_split}]"
    ds = load_dataset(spec.hub_name, spec.hub_config, split=spec.hub_split)
    stats, problems = LoadStats(where), []
    for i, row in enumerate(ds, start=1):
        try:
            problems.append(to_problem(row, f"{where}:{i}"))
            stats.rows += 1
        except DataError as e:
            if not skip_bad:
                raise
            stats.note(str(e))
    return problems, stats


def load_dataset_problems(
    source: str, data_dir: str | Path | None = None, skip_bad: bool = False
) -> tuple[list[Problem], LoadStats]:
    kind, target = resolve(source, data_dir)
    if kind == "local":
        return load_problems(target, skip_bad=skip_bad)
    try:
        return load_from_hub(target, skip_bad=skip_bad)
    except DataError:
        raise
    except Exception as e:  # offline, unknown id, gated dataset...
        local = ""
        if target.local_file:
            path = Path(data_dir or default_data_dir()) / target.local_file
            local = f"no offline copy at {path}, and "
        raise DataError(
            f"{source}: {local}loading {target.hub_name!r} (split {target.hub_split!r}) from the "
            f"Hugging Face hub failed: {type(e).__name__}: {e}"
        ) from e


def display_names(sources) -> dict[str, str]:
    """{source: the name reports use}: registry names and hub ids as given, a local file by its
    stem ("heldout" for runs/demo/data/heldout.jsonl) unless two files share a stem."""
    names = {s: Path(s).stem if s not in DATASETS and s not in _ALIASES and Path(s).suffix else s for s in sources}
    clash = {n for n in names.values() if list(names.values()).count(n) > 1}
    return {s: (s if n in clash else n) for s, n in names.items()}


def load_benchmark(
    name: str, data_dir: str | Path | None = None, skip_bad: bool = False
) -> list[Problem]:
    return load_dataset_problems(name, data_dir, skip_bad)[0]
