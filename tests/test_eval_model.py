"""`megatron-less eval --model`: a real (tiny) model generates through the rollout engine, from an
HF folder and from a megatron-less checkpoint of the same weights, with identical greedy output."""

import importlib.util
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
    # a context vLLM accepts the templated benchmark prompts in (~370 tokens with this tokenizer)
    tiny.save_hf_model(hf_dir, seed=0, vocab_size=512, max_position_embeddings=1024, **tiny.ROLLOUT)
    ckpt = convert_hf_to_megatron(str(hf_dir), str(root / "ckpt"), tp=1, pp=1)
    return hf_dir, Path(ckpt)


# a plain process, as a user starts it: nothing of a launcher's environment may leak in
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "TORCHELASTIC_RUN_ID")


def _eval(args, out_dir, data_dir, **extra_env):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.update(MLESS_DATA_DIR=str(data_dir), PYTHONWARNINGS="ignore", **extra_env)
    cmd = [sys.executable, "-m", "megatron_less.cli", "eval", "--engine", "builtin", "--benchmarks",
           "aime24,amc23", "--limit", "2", "--n", "2", "--max-tokens", "6", "--temperature", "0",
           "--no-bootstrap", "--out-dir", str(out_dir), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads((out_dir / "eval_results.json").read_text())


@pytest.fixture(scope="module")
def builtin_hf(model_dirs, tmp_path_factory, data_dir):
    """The single-process built-in run on the HF folder: the reference several tests compare to."""
    out_dir = tmp_path_factory.mktemp("builtin_hf")
    return (*_eval(["--model", str(model_dirs[0])], out_dir, data_dir), out_dir)


def test_eval_from_hf_folder_and_checkpoint(model_dirs, builtin_hf, tmp_path, data_dir):
    hf_dir, ckpt = model_dirs
    out_hf, rep_hf, out_dir = builtin_hf
    out_ck, rep_ck = _eval(["--model", str(ckpt), "--tokenizer", str(hf_dir)], tmp_path / "b", data_dir)
    assert "aime24" in out_hf and "amc23" in out_hf
    assert (out_dir / "eval_summary.png").stat().st_size > 1000
    for rep in (rep_hf, rep_ck):
        for bench in ("aime24", "amc23"):
            items = rep["benchmarks"][bench]
            assert len(items) == 2
            assert all(len(it["samples"]) == 2 for it in items)
    texts = lambda rep: [s["response"]  # noqa: E731
                         for b in ("aime24", "amc23") for it in rep["benchmarks"][b] for s in it["samples"]]
    assert texts(rep_hf) == texts(rep_ck)
    assert any(t.strip() for t in texts(rep_hf)), "the model produced no text at all"


def test_eval_refuses_samples_and_model_together(tmp_path, capsys):
    from megatron_less.eval.run import main

    # either path alone would also fail with 2 (no x.json, no model y): the message names the rule
    assert main(["--samples", "x.json", "--model", "y"]) == 2
    assert "pass either --samples or --model, not both" in capsys.readouterr().err


def test_eval_missing_model_is_named(tmp_path, capsys):
    from megatron_less.eval.run import main

    assert main(["--model", str(tmp_path / "nope"), "--out-dir", str(tmp_path)]) == 2
    assert "nope" in capsys.readouterr().err


def test_eval_under_torchrun_tp2_matches_single_process(model_dirs, builtin_hf, tmp_path, data_dir):
    """examples/eval_math.sh with 2 ranks at TP2: one report (rank 0), same greedy responses."""
    hf_dir, _ = model_dirs
    single = builtin_hf[1]
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


def _responses(rep):
    return [s["response"] for b in ("aime24", "amc23") for it in rep["benchmarks"][b] for s in it["samples"]]


@pytest.mark.vllm
def test_eval_with_vllm_as_a_plain_process(model_dirs, builtin_hf, tmp_path, data_dir):
    """Not under torchrun: vLLM's external launcher reads torchrun's variables (LOCAL_RANK:
    KeyError before), which runtime.initialize sets for one rank. Greedy text = the built-in's."""
    if importlib.util.find_spec("vllm") is None:
        if os.environ.get("MLESS_REQUIRE_VLLM") == "1":
            pytest.fail("MLESS_REQUIRE_VLLM=1 but vllm is not installed")
        pytest.skip("vllm is not installed")
    hf_dir, _ = model_dirs
    builtin = builtin_hf[1]
    _, vllm = _eval(["--model", str(hf_dir), "--engine", "vllm"], tmp_path / "v", data_dir,
                    OMP_NUM_THREADS="1", VLLM_CPU_OMP_THREADS_BIND="nobind", VLLM_LOGGING_LEVEL="WARNING")
    assert _responses(vllm) == _responses(builtin)
    assert any(t.strip() for t in _responses(vllm))


def _bare_model(folder):
    """An HF model folder without tokenizer files (num_attention_heads 4, num_hidden_layers 4)."""
    tiny.save_hf_model(folder, seed=0)
    return folder


@pytest.mark.parametrize("flags,named", [(["--tp", "3"], "(3) must divide num_attention_heads (4)"),
                                         (["--pp", "3"], "(3) must divide num_hidden_layers (4)")])
def test_wrong_layout_fails_before_any_process_group(tmp_path, capsys, monkeypatch, flags, named):
    import time

    import torch.distributed as dist

    from megatron_less.eval.run import main
    from megatron_less.parallel import runtime

    model = _bare_model(tmp_path / "m")
    monkeypatch.setattr(runtime, "initialize", lambda *a, **k: pytest.fail("process groups were started"))
    t0 = time.perf_counter()
    assert main(["--model", str(model), "--out-dir", str(tmp_path), *flags]) == 2
    assert time.perf_counter() - t0 < 5
    err = capsys.readouterr().err
    assert " ".join(flags) in err and named in err and str(model) in err
    assert not dist.is_initialized()


def test_model_without_tokenizer_names_the_folder_and_the_fix(tmp_path, capsys, monkeypatch):
    from megatron_less.eval.run import main
    from megatron_less.parallel import runtime

    model = _bare_model(tmp_path / "m")
    monkeypatch.setattr(runtime, "initialize", lambda *a, **k: pytest.fail("process groups were started"))
    assert main(["--model", str(model), "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(model) in err and "tokenizer.json" in err and "--tokenizer" in err


def test_single_process_env_is_torchruns_until_destroy(monkeypatch):
    from megatron_less.parallel import runtime

    for key in LAUNCHER_VARS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "10.1.2.3")  # a user's choice stays, and stays after destroy
    runtime.single_process_env()
    want = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="10.1.2.3")
    assert {k: os.environ.get(k) for k in want} == want
    assert 0 < int(os.environ["MASTER_PORT"]) < 65536
    runtime.destroy()
    assert {k: os.environ.get(k) for k in LAUNCHER_VARS} == {
        k: ("10.1.2.3" if k == "MASTER_ADDR" else None) for k in LAUNCHER_VARS}
