"""Data loading: benchmarks, dispatch, malformed rows, training file, tokenizers, prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_less.data import benchmarks as B
from megatron_less.data.prompts import SYSTEM_PROMPT, apply_template, chatml
from megatron_less.data.records import DataError, load_problems
from megatron_less.data.train_file import read_train_file, write_train_file

EXPECTED_COUNTS = {
    "math500": 500,
    "aime24": 30,
    "aime25": 30,
    "amc23": 40,
    "minerva_math": 272,
    "olympiadbench": 675,
    "math_train": 7500,
    "math_test": 5000,
}


@pytest.mark.parametrize("name", list(EXPECTED_COUNTS))
def test_offline_copies_load(data_dir, name):
    problems, stats = B.load_dataset_problems(name, data_dir)
    assert len(problems) == EXPECTED_COUNTS[name] == stats.rows and stats.skipped == 0
    assert all(p.problem.strip() and p.answer.strip() for p in problems)
    assert len({p.id for p in problems}) == len(problems)  # ids are unique


def test_registry_has_the_six_benchmarks():
    assert set(B.BENCHMARKS) == {
        "math500",
        "aime24",
        "aime25",
        "amc23",
        "minerva_math",
        "olympiadbench",
    }
    for spec in B.DATASETS.values():
        assert spec.local_file.endswith(".jsonl") and "/" in spec.hub_name


def test_aime_keeps_zero_padding_and_math500_ids(data_dir):
    aime = B.load_benchmark("aime24", data_dir)
    assert any(p.answer.startswith("0") for p in aime)  # "025": compared numerically later
    math500 = B.load_benchmark("math500", data_dir)
    assert math500[0].id.startswith("test/")


def test_dispatch(data_dir, tmp_path, monkeypatch):
    assert B.resolve("aime24", data_dir) == ("local", data_dir / "eval/aime24.jsonl")
    assert B.resolve("minerva", data_dir)[1].name == "minerva_math.jsonl"  # alias
    kind, spec = B.resolve("aime24", tmp_path)  # no offline copy there -> hub
    assert (
        kind == "hub" and spec.hub_name == "HuggingFaceH4/aime_2024" and spec.hub_split == "train"
    )
    kind, spec = B.resolve("someone/some_math:validation")
    assert kind == "hub" and (spec.hub_name, spec.hub_split) == ("someone/some_math", "validation")
    assert B.resolve(str(tmp_path / "x.parquet")) == ("local", tmp_path / "x.parquet")
    with pytest.raises(DataError, match="unknown dataset 'nonsense'"):
        B.resolve("nonsense")
    monkeypatch.setenv("MLESS_DATA_DIR", str(tmp_path))
    assert B.default_data_dir() == tmp_path


def test_hub_rows_are_mapped(monkeypatch, tmp_path):
    """The hub path, with ``datasets.load_dataset`` replaced by the field layouts found there."""
    calls = []
    hub_rows = {
        "math-ai/olympiadbench": [{"question": "Q1", "final_answer": ["$69$,$84$"], "id": 7}],
        "DigitalLearningGmbH/MATH-lighteval": [
            {"problem": "P", "solution": "so \\boxed{\\frac{1}{2}}.", "level": "Level 1"}
        ],
        "math-ai/amc23": [{"question": "Q", "answer": 27.0}],
    }

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return hub_rows[name]

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    p = B.load_benchmark("olympiadbench", tmp_path)
    assert (p[0].problem, p[0].answer, p[0].id) == ("Q1", "69,84", "7")
    assert B.load_benchmark("math_train", tmp_path)[0].answer == "\\frac{1}{2}"
    assert B.load_benchmark("amc23", tmp_path)[0].answer == "27"
    assert calls[0] == ("math-ai/olympiadbench", None, "test")

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        DataError,
        match=r"aime25: no offline copy at .*aime25\.jsonl, and loading "
        r"'yentinglin/aime_2025' .* failed: ConnectionError: no network",
    ):
        B.load_benchmark("aime25", tmp_path)


# ---------------------------------------------------------------- malformed rows


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_bad_json_names_file_and_line(tmp_path):
    f = _write(
        tmp_path / "d.jsonl", ['{"problem": "p", "answer": "1"}', "", '{"problem": "p", "answer":']
    )
    with pytest.raises(DataError, match=r"d\.jsonl:3: bad JSON"):
        load_problems(f)


@pytest.mark.parametrize(
    "row, message",
    [
        ('{"problem": "p"}', "missing or empty answer"),
        ('{"answer": "1"}', "missing or empty problem"),
        ('{"problem": "  ", "answer": "1"}', "missing or empty problem"),
        ('{"problem": "p", "answer": ""}', "missing or empty answer"),
        ('{"problem": "p", "answer": true}', "missing or empty answer"),
        ('["p", "1"]', "expected a JSON object, got list"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, row, message):
    f = _write(tmp_path / "d.jsonl", ['{"problem": "ok", "answer": "2"}', row])
    with pytest.raises(DataError, match=rf"d\.jsonl:2: {message}"):
        load_problems(f)


def test_skip_bad_counts_and_keeps_good_rows(tmp_path):
    f = _write(
        tmp_path / "d.jsonl",
        [
            '{"problem": "a", "answer": "1"}',
            "{not json",
            '{"problem": "b"}',
            '{"problem": "c", "answer": 3}',
        ],
    )
    problems, stats = load_problems(f, skip_bad=True)
    assert [p.answer for p in problems] == ["1", "3"]
    assert (stats.rows, stats.skipped) == (2, 2)
    assert "d.jsonl:2: bad JSON" in stats.errors[0] and "d.jsonl:3: missing" in stats.errors[1]


def test_all_rows_bad_is_an_error_even_when_skipping(tmp_path):
    f = _write(tmp_path / "d.jsonl", ["{", "{"])
    with pytest.raises(DataError, match="no usable records"):
        load_problems(f, skip_bad=True)


def test_json_array_and_parquet(tmp_path):
    arr = tmp_path / "d.json"
    arr.write_text(json.dumps([{"question": "q", "answer": "1"}, {"question": "q2"}]))
    with pytest.raises(DataError, match=r"d\.json:2: missing"):
        load_problems(arr)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.Table.from_pylist([{"problem": "p", "answer": "4"}, {"problem": "p2", "answer": None}]),
        tmp_path / "d.parquet",
    )
    with pytest.raises(DataError, match=r"d\.parquet:2: missing or empty answer"):
        load_problems(tmp_path / "d.parquet")
    assert load_problems(tmp_path / "d.parquet", skip_bad=True)[1].skipped == 1
    with pytest.raises(DataError, match="no such file"):
        load_problems(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------- training file


def test_train_file_roundtrip_and_errors(tmp_path, data_dir):
    problems = B.load_benchmark("aime24", data_dir)
    out = tmp_path / "train.jsonl"
    assert write_train_file(problems, out, template="qwen_math") == 30
    rows, stats = read_train_file(out)
    assert len(rows) == 30 and rows[0]["template"] == "qwen_math"
    assert (
        rows[0]["prompt"].endswith("<|im_start|>assistant\n")
        and rows[0]["answer"] == problems[0].answer
    )
    bad = _write(
        tmp_path / "bad.jsonl", ['{"prompt": "p", "answer": "1"}', '{"prompt": "p", "answer": 1}']
    )
    with pytest.raises(DataError, match=r"bad\.jsonl:2: missing or empty string field 'answer'"):
        read_train_file(bad)
    assert read_train_file(bad, skip_bad=True)[1].skipped == 1


def test_prepare_data_tool(tmp_path, data_dir, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "prepare_data", Path(__file__).parents[1] / "tools/prepare_data.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "t.jsonl"
    rc = tool.main(
        [
            "--source",
            "math_train",
            "--data-dir",
            str(data_dir),
            "--out",
            str(out),
            "--template",
            "plain",
            "--limit",
            "5",
        ]
    )
    assert rc == 0 and "wrote 5 rows" in capsys.readouterr().out
    rows, _ = read_train_file(out)
    assert (
        len(rows) == 5
        and rows[0]["prompt"].startswith("Question: ")
        and "\\boxed{}" in rows[0]["prompt"]
    )
    bad = _write(tmp_path / "bad.jsonl", ['{"problem": "a", "answer": "1"}', "{"])
    assert tool.main(["--source", str(bad), "--out", str(out)]) == 2
    assert "bad.jsonl:2: bad JSON" in capsys.readouterr().err
    assert tool.main(["--source", str(bad), "--out", str(out), "--skip-bad"]) == 0


# ---------------------------------------------------------------- tokenizers and prompts


@pytest.fixture(scope="module")
def math_texts(data_dir):
    with open(data_dir / "math/train.jsonl", encoding="utf-8") as f:
        rows = [json.loads(next(f)) for _ in range(300)]
    return [r["problem"] + "\n" + r["solution"] for r in rows]


@pytest.fixture(scope="module")
def tiny_tok_dir(tmp_path_factory, math_texts):
    from megatron_less.data.tiny_tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"), math_texts, vocab_size=400)


def test_tiny_bpe_tokenizer_loads_once_and_roundtrips(tiny_tok_dir, math_texts):
    from megatron_less.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tok_dir)
    assert load_tokenizer(str(tiny_tok_dir)) is tok  # cached and shared
    text = math_texts[0][:500] + " 答案 \\boxed{42}"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None


def test_qwen_math_template_uses_chat_template(tiny_tok_dir):
    from megatron_less.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tok_dir)
    rendered = apply_template("qwen_math", "What is 1+1?", tok)
    expected = (
        "<|im_start|>system\nPlease reason step by step, and put your final answer within "
        "\\boxed{}.<|im_end|>\n<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert rendered == expected == apply_template("qwen_math", "What is 1+1?")  # by hand
    ids = tok(rendered)["input_ids"]
    assert tok.convert_tokens_to_ids("<|im_start|>") in ids  # special tokens stay whole


def test_plain_and_unknown_templates():
    p = apply_template("plain", "Compute 2+2.")
    assert (
        p.startswith("Question: Compute 2+2.\n")
        and SYSTEM_PROMPT in p
        and p.endswith("step by step.")
    )
    assert apply_template("none", "x") == "x"
    assert (
        chatml([{"role": "user", "content": "hi"}])
        == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )
    with pytest.raises(ValueError, match="unknown prompt template 'chat'"):
        apply_template("chat", "x")


def test_sentencepiece_tokenizer(tmp_path, math_texts):
    import sentencepiece as spm

    from megatron_less.data.tokenizer import load_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(math_texts), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=300,
        model_type="bpe",
        minloglevel=2,
    )
    folder = tmp_path / "sp_tok"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes((tmp_path / "sp.model").read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    for source in (folder, tmp_path / "sp.model"):
        tok = load_tokenizer(source)
        ids = tok("What is $\\frac{1}{2}$?", add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == "What is $\\frac{1}{2}$?"
        # No chat template: the Qwen prompt falls back to hand-written ChatML.
        assert apply_template("qwen_math", "Q", tok).startswith("<|im_start|>system\n")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")


def test_folder_without_tokenizer_files_is_refused_by_name(tmp_path):
    """A converted checkpoint or a bare model folder: transformers would build an empty
    tokenizer from config.json alone, and every prompt would encode to nothing."""
    from megatron_less.data.tokenizer import load_tokenizer
    from tests import tiny

    folder = tmp_path / "model"
    folder.mkdir()
    tiny.hf_config().to_json_file(folder / "config.json")
    with pytest.raises(FileNotFoundError) as err:
        load_tokenizer(folder)
    msg = str(err.value)
    assert str(folder) in msg and "--tokenizer" in msg
    assert "tokenizer.json" in msg and "tokenizer.model" in msg and "vocab.json + merges.txt" in msg


def test_model_folder_with_tokenizer_files_loads(tmp_path, tiny_tok_dir):
    from megatron_less.data.tokenizer import load_tokenizer
    from tests import tiny

    folder = tmp_path / "model"
    folder.mkdir()
    tiny.hf_config().to_json_file(folder / "config.json")
    for f in tiny_tok_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    assert len(load_tokenizer(folder)("What is 1+1?", add_special_tokens=False)["input_ids"]) > 1


@pytest.mark.parametrize("required", ["", "1"])
def test_missing_data_skips_unless_required(tmp_path, required):
    """MLESS_REQUIRE_DATA=1 (CI) turns the data_dir fixture's skip into a failure."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, MLESS_DATA_DIR=str(tmp_path / "none"), MLESS_REQUIRE_DATA=required)
    test = "tests/test_data.py::test_aime_keeps_zero_padding_and_math500_ids"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", test],
                          cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True,
                          text=True, timeout=120)
    if required:
        assert proc.returncode == 1 and "MLESS_REQUIRE_DATA=1 but benchmark data not found" in proc.stdout
    else:
        assert proc.returncode == 0 and "1 skipped" in proc.stdout
