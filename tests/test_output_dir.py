"""A run never lands on another run's output_dir by accident: a new run (checkpoint.resume=none,
or another folder's checkpoint) in a folder holding an earlier run's checkpoints, hf/ or logs is
refused before any process group, naming the folder and the ways out; no run prunes or exports
another run's checkpoints. resume=auto goes on with the folder's own run.

Before this rule, `checkpoint.resume=none train.steps=1 checkpoint.keep=1 checkpoint.export_hf=true`
in the folder of a 2-step run pruned its own step_000001 as soon as it was written (the earlier
run's step_000002 sorts newer), replaced the earlier metrics.jsonl and exported hf/ from the
earlier run's checkpoint, without an error."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_less.checkpoints.train_state import complete
from megatron_less.trainer.config import ConfigError, load_config
from tests import train_fixtures

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "examples" / "configs" / "tiny_cpu.yaml"
WAYS_OUT = ("checkpoint.resume=auto", "checkpoint.overwrite=true", "another output_dir")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return train_fixtures.run_inputs(tmp_path_factory, "output_dir", steps=20)


def _args(tiny, out, *extra) -> list[str]:
    return [f"model.hf_dir={tiny['hf']}", f"data.train_file={tiny['data']}", f"output_dir={out}",
            "log.tensorboard=false", *extra]  # fmt: skip


def _train(tiny, out, *extra, timeout=300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "megatron_less.cli", "train", str(CONFIG), *_args(tiny, out, *extra)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def earlier(tiny):
    """A real 2-step run, one rank, of another model (the tiny one, perturbed): one checkpoint at
    the end (step_000002), two metrics rows."""
    from safetensors.torch import load_file, save_file

    other = tiny["root"] / "other_hf"
    if not other.exists():
        shutil.copytree(tiny["hf"], other)
        weights = load_file(other / "model.safetensors")
        gen = torch.Generator().manual_seed(0)
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in weights.items()},
                  other / "model.safetensors", metadata={"format": "pt"})
    out = tiny["root"] / "earlier"
    proc = _train(tiny, out, "train.steps=2", "checkpoint.every=0", f"model.hf_dir={other}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _snapshot(out: Path) -> dict:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_fresh_start_in_a_used_output_dir_is_refused(tiny, earlier, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(earlier, out)
    before = _snapshot(out)
    t0 = time.monotonic()
    proc = _train(tiny, out, "checkpoint.resume=none", "train.steps=1", "checkpoint.keep=1",
                  "checkpoint.export_hf=true")
    took = time.monotonic() - t0
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert f"output_dir {out}" in proc.stderr, proc.stderr[-3000:]
    assert all(way in proc.stderr for way in WAYS_OUT), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert took < 30, f"took {took:.1f} s to refuse (before any process group)"
    assert _snapshot(out) == before  # nothing pruned, replaced or exported
    assert not (out / "hf").exists()


def _cfg(tiny, out, *extra):
    return load_config(CONFIG, _args(tiny, out, *extra))


def test_what_counts_as_a_used_output_dir(tiny, earlier, tmp_path):
    """Checked in-process (the function the CLI and build_run call): a new run in a used folder is
    refused; resuming the folder's own run (auto), or an unused folder, is not."""
    from megatron_less.trainer.setup import check_output_dir

    check_output_dir(_cfg(tiny, tmp_path / "new", "checkpoint.resume=none"))  # unused: fine
    (tmp_path / "empty").mkdir()
    check_output_dir(_cfg(tiny, tmp_path / "empty", "checkpoint.resume=none"))  # exists, holds nothing
    check_output_dir(_cfg(tiny, earlier, "checkpoint.resume=auto"))  # resumes its own run
    check_output_dir(_cfg(tiny, earlier, f"checkpoint.resume={earlier / 'checkpoints' / 'step_000002'}"))

    # a run killed before its first checkpoint: logs and a partial save, nothing complete. auto
    # restarts it (a killed job's restart); none would start another run over its logs
    logs_only = tmp_path / "logs_only"
    (logs_only / "checkpoints" / "step_000001.partial").mkdir(parents=True)
    shutil.copy2(earlier / "metrics.jsonl", logs_only / "metrics.jsonl")
    check_output_dir(_cfg(tiny, logs_only, "checkpoint.resume=auto"))
    with pytest.raises(ConfigError, match=r"checkpoints/step_000001.partial, metrics.jsonl\): checkpoint.resume=none"):
        check_output_dir(_cfg(tiny, logs_only, "checkpoint.resume=none"))
    # resuming another folder's checkpoint into this used one: its saves would prune this run's
    with pytest.raises(ConfigError, match=f"output_dir {earlier} holds an earlier run"):
        check_output_dir(_cfg(tiny, earlier, f"checkpoint.resume={shutil.copytree(earlier, tmp_path / 'o')}"
                                             "/checkpoints/step_000002"))
    # an exported model alone counts too
    exported = tmp_path / "exported"
    shutil.copytree(tiny["hf"], exported / "hf")
    with pytest.raises(ConfigError, match=r"holds an earlier run \(hf/\)"):
        check_output_dir(_cfg(tiny, exported, "checkpoint.resume=none"))
    # overwrite starts over: it does not combine with a resume
    with pytest.raises(ConfigError, match="checkpoint.overwrite=true needs checkpoint.resume=none"):
        check_output_dir(_cfg(tiny, earlier, "checkpoint.overwrite=true"))


def test_overwrite_starts_over(tiny, earlier, tmp_path):
    """checkpoint.overwrite=true: the earlier run's checkpoints and logs go first, so the new run
    keeps its own checkpoint, logs only its own steps and exports its own model."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    shutil.copytree(earlier, out)
    proc = _train(tiny, out, "checkpoint.resume=none", "checkpoint.overwrite=true", "train.steps=1",
                  "checkpoint.keep=1", "checkpoint.export_hf=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [p.name for p in complete(out)] == ["step_000001"]
    assert [r["step"] for r in _rows(out)] == [1]
    # hf/ is this run's step 1: the same tensors as an export of that checkpoint, not of the earlier run's
    got = load_file(out / "hf" / "model.safetensors")
    want = load_file(_export(out / "checkpoints" / "step_000001", tmp_path / "again") / "model.safetensors")
    old = load_file(_export(earlier / "checkpoints" / "step_000002", tmp_path / "old") / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert not all(torch.equal(got[k], old[k]) for k in got)


def _export(ckpt: Path, dst: Path) -> Path:
    cmd = [sys.executable, "-m", "megatron_less.cli", "export-hf", "--ckpt", str(ckpt), "--out", str(dst)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dst


def test_the_demo_reruns_start_over(tiny, earlier, tmp_path, monkeypatch):
    """`megatron-less demo` / `compare` train into the same folder on every re-run: its config
    starts over there (overwrite), and rank 0 clears exactly the earlier run's files."""
    from megatron_less.demo import run as demo
    from megatron_less.trainer.setup import RUN_FILES, check_output_dir, clear_output_dir

    out = tmp_path / "train"
    shutil.copytree(earlier, out)
    (out / "notes.txt").write_text("not the trainer's")
    cfg = load_config(demo.CONFIG, [f"model.hf_dir={tiny['hf']}", f"data.train_file={tiny['data']}",
                                    f"eval.benchmarks=[{tiny['data']}]", f"output_dir={out}"])
    check_output_dir(cfg)
    monkeypatch.setenv("RANK", "1")
    assert clear_output_dir(cfg) == [] and complete(out)  # only rank 0 deletes
    monkeypatch.setenv("RANK", "0")
    assert clear_output_dir(cfg) == ["checkpoints", "metrics.jsonl", "rollouts.jsonl"]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert not any((out / n).exists() for n in RUN_FILES)
