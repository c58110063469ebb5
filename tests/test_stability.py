"""Stable at scale: the rollout/trainer mismatch measured and corrected, DAPO's dynamic sampling
and overlong handling, the bypass of the old-log-prob pass - through the real trainer.

The formulas themselves are tested in test_algos_correction.py and test_algos_reward_shaping.py;
here the trainer must carry them: the logged per-token values reproduce the step's metrics by
hand, filtered groups are replaced, truncated responses leave the loss, the penalty lands in the
reward. (The kill -9 in an oversampling round: test_reliability.py.)"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_less.parallel.spawn import run_distributed
from megatron_less.trainer.config import ConfigError, load_config
from tests import train_fixtures

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "examples" / "configs" / "tiny_cpu.yaml"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return train_fixtures.run_inputs(tmp_path_factory, "stability")


def _overrides(tiny, out, *extra) -> list[str]:
    return [f"model.hf_dir={tiny['hf']}", f"data.train_file={tiny['data']}", f"output_dir={out}", "train.steps=3",
            "rollout.n=4", "batch.prompts_per_step=4", "batch.mini_batch_prompts=4", "batch.micro_batch_tokens=64",
            "log.tensorboard=false", "log.rollouts_per_step=64", *extra]  # fmt: skip


def _read(out, name) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / name).read_text().splitlines()]


def _train(tiny, out, *extra) -> tuple[list[dict], list[dict]]:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "megatron_less.cli", "train", str(CONFIG), *_overrides(tiny, out, *extra)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return _read(out, "metrics.jsonl"), _read(out, "rollouts.jsonl")


def _hand_mismatch(rows: list[dict], threshold: float) -> dict[str, float]:
    """The mismatch metrics from the logged per-token values, one token at a time."""
    import numpy as np

    toks, seq_sums = [], []
    for r in rows:
        old = np.asarray(r["old_logprobs"], dtype=np.float32).astype(np.float64)
        rollout = np.asarray(r["rollout_logprobs"], dtype=np.float32).astype(np.float64)
        lr = np.clip(old - rollout, -20, 20)
        toks += list(lr)
        seq_sums.append(abs(lr.sum()))
    lr = np.asarray(toks)
    ratio = np.exp(lr)
    return {"kl_k3": float(np.mean(ratio - 1 - lr)), "kl_k1": float(np.mean(-lr)),
            "abs_log_ratio_mean": float(np.mean(np.abs(lr))), "abs_log_ratio_max": float(np.max(np.abs(lr))),
            "token_frac_past": float(np.mean((ratio > threshold) | (ratio < 1 / threshold))),
            "seq_log_ratio_mean": float(np.mean(seq_sums)),
            "weight_mean": float(np.mean(np.minimum(ratio, threshold)))}  # fmt: skip


# --- a real mismatch: bf16 vLLM rollouts beside the fp32 trainer, TP2 ---------------------------


def _bf16_job(tiny, out):
    from megatron_less.trainer.loop import train

    cfg = load_config(CONFIG, _overrides(tiny, out, "rollout.engine=vllm", "parallel.tp=2", "rollout.rollout_tp=2",
                                         "train.steps=2", "rollout.dtype=bf16", "algo.correction=token_tis"))  # fmt: skip
    run = train(cfg)
    return run.metrics if os.environ["RANK"] == "0" else None


@pytest.mark.vllm
def test_bf16_rollouts_show_a_mismatch_the_logged_tokens_reproduce(tiny, tmp_path):
    """vLLM in bf16, the trainer in fp32 at TP2 (one data-parallel rank, so rollouts.jsonl holds
    every response): the mismatch metrics are not zero, and equal what the logged per-token
    rollout and recomputed log-probs give by hand; token TIS's mean weight too."""
    if importlib.util.find_spec("vllm") is None:
        if os.environ.get("MLESS_REQUIRE_VLLM") == "1":
            raise RuntimeError("MLESS_REQUIRE_VLLM=1 but vllm is not installed")
        pytest.skip("vllm is not installed")
    out = tmp_path / "bf16"
    run_distributed(_bf16_job, 2, (tiny, str(out)), timeout=600,
                    env={"OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"})  # fmt: skip
    metrics, rollouts = _read(out, "metrics.jsonl"), _read(out, "rollouts.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        rows = [r for r in rollouts if r["step"] == m["step"]]
        assert len(rows) == 16, "every response of the step is logged"
        hand = _hand_mismatch(rows, threshold=2.0)
        assert hand["abs_log_ratio_mean"] > 1e-4, f"bf16 rollouts should differ from fp32: {hand}"
        for k, v in hand.items():
            key = "correction/weight_mean" if k == "weight_mean" else "mismatch/" + k
            assert m[key] == pytest.approx(v, rel=1e-6, abs=1e-9), (key, m[key], v)


# --- dynamic sampling, fp32 identity of a correction ---------------------------------------------


def test_dynamic_sampling_replaces_groups_without_signal(tiny, tmp_path):
    """Groups all right or all wrong are dropped and replaced from further batches (the counts
    add up every step), and with fp32 rollouts (the built-in sampler runs the trained model)
    sequence-mask TIS is the identity: weights 1 to float error, nothing rejected."""
    metrics, rollouts = _train(tiny, tmp_path / "ds", "rollout.engine=builtin", "algo.dynamic_sampling.enable=true",
                               "algo.dynamic_sampling.max_rounds=3", "algo.correction=seq_mask_tis")  # fmt: skip
    assert [m["step"] for m in metrics] == [1, 2, 3]
    dropped = 0
    for m in metrics:
        assert m["dynamic/groups_generated"] == 4 * m["dynamic/rounds"]
        kept, trained = m["dynamic/groups_kept"], m["dynamic/groups_trained"]
        assert trained == min(kept, 4) or (kept == 0 and m["dynamic/groups_filler"] == 1)
        assert m["dynamic/rounds"] == 3 or kept >= 4, "a round stops only with enough groups or at the cap"
        dropped += m["dynamic/groups_generated"] - kept
        step_rows = [r for r in rollouts if r["step"] == m["step"]]
        groups = {}
        for r in step_rows:
            groups.setdefault(r["group"], []).append(r["correct"])
        assert len(step_rows) == 4 * (trained + m["dynamic/groups_filler"])
        if not m["dynamic/groups_filler"]:
            assert all(len(set(c)) == 2 for c in groups.values()), "a trained group without signal"
        assert m["correction/weight_mean"] == pytest.approx(1.0, abs=1e-5)
        assert m["loss/excluded_token_frac"] == 0.0 and m["mismatch/abs_log_ratio_max"] < 1e-4
    assert dropped > 0, "no group was filtered: the test model should give some all-right/all-wrong groups"


# --- overlong handling and the bypass of the old-log-prob pass -----------------------------------


def test_overlong_filter_and_penalty_with_bypass(tiny, tmp_path):
    """A tight max_tokens: truncated responses are marked, left out of the loss (overlong
    filtering), and lose reward by DAPO's soft penalty; the old log-probs are the rollout's own
    (bypass), so no entropy is computed and the mismatch is zero by construction."""
    metrics, rollouts = _train(tiny, tmp_path / "ol", "rollout.engine=builtin", "rollout.max_tokens=6",
                               "algo.overlong_filter=true", "reward.overlong_buffer=3", "reward.overlong_penalty=0.5",
                               "algo.old_logprobs=rollout", "algo.shaper=none")  # fmt: skip
    truncated = 0
    for m in metrics:
        rows = [r for r in rollouts if r["step"] == m["step"]]
        cut = [r["finish_reason"] == "length" for r in rows]
        truncated += sum(cut)
        assert m["response/clip_frac"] == pytest.approx(sum(cut) / len(rows))
        assert m["overlong/excluded_frac"] == pytest.approx(sum(cut) / len(rows))
        for r, c in zip(rows, cut):
            assert r["loss_excluded"] == c
            n = len(r["token_ids"])
            expect = -0.5 * min(max(n - 3, 0) / 3, 1.0)
            assert r["penalty"] == pytest.approx(expect), (n, r["penalty"])
            assert r["reward"] == pytest.approx(float(r["correct"]) + expect)
            assert r["old_logprobs"] == pytest.approx(r["rollout_logprobs"], abs=1e-6)
            assert r["entropy"] is None
        assert "rollout/entropy" not in m and m["mismatch/abs_log_ratio_max"] < 1e-6
        assert m["overlong/penalty_mean"] == pytest.approx(sum(r["penalty"] for r in rows) / len(rows))
    assert truncated > 0 and truncated < sum(1 for _ in rollouts), "want some truncated, some not"


def test_config_refuses_what_bypass_cannot_do(tiny):
    def error(*extra):
        with pytest.raises(ConfigError) as e:
            load_config(CONFIG, _overrides(tiny, "/tmp/x", *extra))
        return str(e.value)

    assert "shaper 'less' reads" in error("algo.old_logprobs=rollout", "algo.shaper=less")
    assert "no mismatch to correct" in error("algo.old_logprobs=rollout", "algo.shaper=none",
                                             "algo.correction=token_tis")
    assert "algo.correction_kwargs.threshold" in error("algo.correction=token_tis",
                                                       "algo.correction_kwargs={threshold: 0.5}")
    assert "algo.correction: unknown correction 'tiss'" in error("algo.correction=tiss")
    assert "reward.overlong_buffer (99) exceeds rollout.max_tokens" in error("reward.overlong_buffer=99",
                                                                             "rollout.max_tokens=16")
    assert math.isfinite(load_config(CONFIG, _overrides(tiny, "/tmp/x", "algo.correction=geo_rs")).seed)
