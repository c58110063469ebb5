"""End-to-end evaluation on saved samples: scoring, metrics, table, JSON and PNG."""

from __future__ import annotations

import json
import re

import pytest

from megatron_less.data.benchmarks import load_benchmark
from megatron_less.eval.report import format_table
from megatron_less.eval.run import evaluate, main, score_document

# Per problem, four responses: right, right but zero-padded / reformatted, wrong, no box.
PATTERN = [True, True, False, False]


def _responses(answer: str) -> list[str]:
    return [
        f"Let me think. The answer is $\\boxed{{{answer}}}$.",
        f"Working... \\boxed{{0}} is wrong; finally \\boxed{{ {answer} }}",
        "So the answer is \\boxed{-123456}.",
        f"I believe it is {answer}, but I did not box it.",
    ]


@pytest.fixture()
def samples_doc(data_dir):
    doc = {"meta": {"model": "fake"}, "benchmarks": {}}
    for name, limit in (("aime24", 30), ("math500", 20)):
        problems = load_benchmark(name, data_dir)[:limit]
        doc["benchmarks"][name] = [
            {
                "id": p.id,
                "problem": p.problem,
                "answer": p.answer,
                "responses": _responses(p.answer),
            }
            for p in problems
        ]
    return doc


def test_score_document_metrics(samples_doc):
    report = score_document(samples_doc, num_workers=2)
    for name, m in report["metrics"].items():
        assert m["n"] == 4
        assert m["avg@4"] == pytest.approx(0.5)  # 2 of 4 right for every problem
        assert m["std@4"] == pytest.approx(0.5)  # population std of [1,1,0,0]
        assert m["pass@4"] == 1.0 and m["pass@1"] == pytest.approx(0.5)
        assert m["pass@2"] == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2)
        assert m["worst@2"] == pytest.approx(1 / 6)  # C(2,2)/C(4,2)
        assert m["worst@4"] == 0.0
        assert m["maj@4"] == 1.0  # the right answer is the only one given twice
        assert m["no_box"] == pytest.approx(0.25)
        assert m["reasons"] == {
            "correct": 2 * m["problems"],
            "mismatch": m["problems"],
            "no_box": m["problems"],
        }
    assert report["average"]["avg@4"] == pytest.approx(0.5)
    assert report["average"]["problems"] == 50
    sample = report["benchmarks"]["aime24"][0]["samples"]
    assert [s["score"] for s in sample] == [1.0, 1.0, 0.0, 0.0]
    assert [s["reason"] for s in sample] == ["correct", "correct", "mismatch", "no_box"]
    assert sample[0]["response"].startswith("Let me think")


def test_cli_end_to_end(samples_doc, tmp_path, capsys):
    src = tmp_path / "samples.json"
    src.write_text(json.dumps(samples_doc), encoding="utf-8")
    out = tmp_path / "out"
    assert main(["--samples", str(src), "--out-dir", str(out), "--num-workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "aime24" in printed and "math500" in printed and "average" in printed
    assert "avg@4" in printed and "50.0" in printed
    results = json.loads((out / "eval_results.json").read_text(encoding="utf-8"))
    assert (
        sum(len(item["samples"]) for items in results["benchmarks"].values() for item in items)
        == 200
    )
    assert results["meta"]["model"] == "fake" and results["meta"]["scored_responses"] == 200
    png = (out / "eval_summary.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    # A results file is itself a samples file: re-scoring gives the same numbers.
    again = tmp_path / "again"
    assert (
        main(["--samples", str(out / "eval_results.json"), "--out-dir", str(again), "--no-plot"])
        == 0
    )
    re_results = json.loads((again / "eval_results.json").read_text(encoding="utf-8"))
    assert re_results["metrics"] == results["metrics"]
    assert not (again / "eval_summary.png").exists()


def test_cli_benchmark_filter_and_ks(samples_doc, tmp_path, capsys):
    src = tmp_path / "samples.json"
    src.write_text(json.dumps(samples_doc), encoding="utf-8")
    rc = main(
        [
            "--samples",
            str(src),
            "--benchmarks",
            "aime24",
            "--ks",
            "1,3",
            "--out-dir",
            str(tmp_path),
            "--no-bootstrap",
        ]
    )
    assert rc == 0
    results = json.loads((tmp_path / "eval_results.json").read_text(encoding="utf-8"))
    assert list(results["metrics"]) == ["aime24"]
    m = results["metrics"]["aime24"]
    assert "pass@3" in m and "pass@2" not in m and not any("bootstrap" in k for k in m)
    assert (
        main(["--samples", str(src), "--benchmarks", "aime24,aime25", "--out-dir", str(tmp_path)])
        == 2
    )
    assert "no samples for ['aime25']" in capsys.readouterr().err


@pytest.mark.parametrize(
    "doc, message",
    [
        ({"benchmarks": {}}, "non-empty 'benchmarks'"),
        (
            {
                "benchmarks": {
                    "a": [
                        {"answer": "1", "responses": ["x", "y"]},
                        {"answer": "2", "responses": ["x"]},
                    ]
                }
            },
            r"benchmarks\.a\[1\]: has 1 responses but earlier problems have 2",
        ),
        (
            {"benchmarks": {"a": [{"responses": ["x"]}]}},
            r"benchmarks\.a\[0\]: missing or empty string 'answer'",
        ),
        ({"benchmarks": {"a": [{"answer": "1", "responses": [3]}]}}, "non-empty list of strings"),
    ],
)
def test_bad_samples_are_named(tmp_path, capsys, doc, message):
    src = tmp_path / "s.json"
    src.write_text(json.dumps(doc))
    assert main(["--samples", str(src), "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err


def test_bad_json_and_no_engine(tmp_path, capsys):
    src = tmp_path / "s.json"
    src.write_text('{"benchmarks":\n {"a": [}')
    assert main(["--samples", str(src)]) == 2
    assert "s.json:2: bad JSON" in capsys.readouterr().err
    assert main([]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


def test_evaluate_with_a_generate_callable(data_dir, tmp_path, capsys):
    answers = {
        p.problem: p.answer for b in ("aime24", "amc23") for p in load_benchmark(b, data_dir)
    }
    calls = []

    def fake_generate(prompts, n, temperature, top_p, max_tokens):
        calls.append((len(prompts), n, temperature, top_p, max_tokens))
        out = []
        for prompt in prompts:
            problem = prompt.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
            out.append([f"\\boxed{{{answers[problem]}}}"] + ["\\boxed{-1}"] * (n - 1))
        return out

    report = evaluate(
        fake_generate, ["aime24", "amc23"], n=2, data_dir=data_dir, limit=5, num_workers=2
    )
    assert calls == [(10, 2, 0.6, 0.95, 4096)]
    assert report["metrics"]["aime24"]["avg@2"] == pytest.approx(0.5)
    assert report["metrics"]["amc23"]["pass@2"] == 1.0
    assert report["meta"]["template"] == "qwen_math"
    table = format_table(report["metrics"], report["average"])
    assert table.splitlines()[-1].startswith("average")

    with pytest.raises(ValueError, match="expected 5 rows of 2"):
        evaluate(lambda p, n, *a: [["x"]] * len(p), ["aime24"], n=2, data_dir=data_dir, limit=5)

    rc = main(
        [
            "--benchmarks",
            "aime24",
            "--n",
            "2",
            "--limit",
            "3",
            "--data-dir",
            str(data_dir),
            "--out-dir",
            str(tmp_path),
        ],
        generate_fn=fake_generate,
    )
    assert rc == 0 and (tmp_path / "eval_summary.png").exists()
