"""`megatron-less eval --model`: a real (tiny) model generates through the rollout engine, from an
HF folder and from a megatron-less checkpoint of the same weights, with identical greedy output."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import tiny

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, data_dir):
    from megatron_less.checkpoints.convert import convert_hf_to_megatron
    from megatron_less.data.tiny_tokenizer import build_tiny_tokenizer

    root = tmp_path_factory.mktemp("evalmodel")
    texts = [json.loads(line)["problem"] for line in open(data_dir / "math" / "train.jsonl")][:500]
    hf_dir = root / "hf"
    build_tiny_tokenizer(hf_dir, texts, vocab_size=512)
    tiny.save_hf_model(hf_dir, seed=0, vocab_size=512, **tiny.ROLLOUT)
    ckpt = convert_hf_to_megatron(str(hf_dir), str(root / "ckpt"), tp=1, pp=1)
    return hf_dir, Path(ckpt)


def _eval(args, out_dir, data_dir):
    env = dict(os.environ, MLESS_DATA_DIR=str(data_dir), PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "megatron_less.cli", "eval", "--engine", "builtin", "--benchmarks",
           "aime24,amc23", "--limit", "2", "--n", "2", "--max-tokens", "6", "--temperature", "0",
           "--no-bootstrap", "--out-dir", str(out_dir), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads((out_dir / "eval_results.json").read_text())


def test_eval_from_hf_folder_and_checkpoint(model_dirs, tmp_path, data_dir):
    hf_dir, ckpt = model_dirs
    out_hf, rep_hf = _eval(["--model", str(hf_dir)], tmp_path / "a", data_dir)
    out_ck, rep_ck = _eval(["--model", str(ckpt), "--tokenizer", str(hf_dir)], tmp_path / "b", data_dir)
    assert "aime24" in out_hf and "amc23" in out_hf
    assert (tmp_path / "a" / "eval_summary.png").stat().st_size > 1000
    for rep in (rep_hf, rep_ck):
        for bench in ("aime24", "amc23"):
            items = rep["benchmarks"][bench]
            assert len(items) == 2
            assert all(len(it["samples"]) == 2 for it in items)
    texts = lambda rep: [s["response"]  # noqa: E731
                         for b in ("aime24", "amc23") for it in rep["benchmarks"][b] for s in it["samples"]]
    assert texts(rep_hf) == texts(rep_ck)
    assert any(t.strip() for t in texts(rep_hf)), "the model produced no text at all"


def test_eval_refuses_samples_and_model_together(tmp_path):
    from megatron_less.eval.run import main

    assert main(["--samples", "x.json", "--model", "y"]) == 2


def test_eval_missing_model_is_named(tmp_path, capsys):
    from megatron_less.eval.run import main

    assert main(["--model", str(tmp_path / "nope"), "--out-dir", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err


def test_eval_under_torchrun_tp2_matches_single_process(model_dirs, tmp_path, data_dir):
    """examples/eval_math.sh with 2 ranks at TP2: one report (rank 0), same greedy responses."""
    hf_dir, _ = model_dirs
    _, single = _eval(["--model", str(hf_dir)], tmp_path / "one", data_dir)
    env = dict(os.environ, MLESS_DATA_DIR=str(data_dir), PYTHONWARNINGS="ignore", MODEL=str(hf_dir),
               GPUS="2", TP="2", N="2", MAX_TOKENS="6", TEMPERATURE="0", OUT_DIR=str(tmp_path / "tr"))
    proc = subprocess.run(["bash", "examples/eval_math.sh", "--engine", "builtin", "--benchmarks", "aime24,amc23",
                           "--limit", "2", "--no-bootstrap"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1  # only rank 0 scores and writes
    multi = json.loads((tmp_path / "tr" / "eval_results.json").read_text())
    resp = lambda rep: [s["response"] for b in ("aime24", "amc23")  # noqa: E731
                        for it in rep["benchmarks"][b] for s in it["samples"]]
    assert resp(multi) == resp(single)
