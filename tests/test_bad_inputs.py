"""The catalogue of bad inputs: each case its own test. Every one ends in a clear error that names
what is wrong and where - before any process group or weight where the input allows - or in a
counted, logged skip; none hangs (timeouts); none touches a checkpoint that was there.

Covered elsewhere, not repeated here: reward strings built to hang the parser, each bounded and
scored 0 (tests/test_rewards.py::test_adversarial_inputs_are_bounded_and_incorrect and
test_compute_score_in_process_is_bounded); a reward worker killed mid-step costs one item and is
replaced (test_rewards.py::test_worker_crash_costs_one_item, test_worker_dead_while_idle_loses_nothing);
HF folders: missing config / safetensors / shard, not Qwen2, untied head without lm_head
(tests/test_convert.py); a full disk at save time and a NaN weight at save time
(tests/test_reliability.py); a job killed at any moment (benchmarks/kill_resume.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest

from megatron_less.checkpoints.files import CheckpointError
from megatron_less.data.records import DataError
from megatron_less.trainer.config import Config, ConfigError, check_layout, load_config
from tests import train_fixtures

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "examples" / "configs" / "tiny_cpu.yaml"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return train_fixtures.run_inputs(tmp_path_factory, "bad_inputs", steps=20)


def _args(tiny, out, *extra) -> list[str]:
    return [f"model.hf_dir={tiny['hf']}", f"data.train_file={tiny['data']}", f"output_dir={out}", "train.steps=2",
            "log.tensorboard=false", *extra]  # fmt: skip


def _cfg(tiny, out, *extra) -> Config:
    return load_config(CONFIG, _args(tiny, out, *extra))


def _build_fails(cfg, error, match):
    """build_run refuses ``cfg`` with ``error`` matching ``match``, before any process group."""
    import torch.distributed as dist

    from megatron_less.trainer.setup import build_run

    t0 = time.monotonic()
    with pytest.raises(error, match=match):
        build_run(cfg)
    assert not dist.is_initialized(), "the error came after a process group was started"
    assert time.monotonic() - t0 < 60


# --- dataset rows ------------------------------------------------------------------------------

ROWS = {
    "bad-json": ('{"prompt": "1+1", "answer": "2"', r"rows.jsonl:1: bad JSON"),
    "not-an-object": ('["1+1", "2"]', r"rows.jsonl:1: expected a JSON object, got list"),
    "missing-prompt": ('{"answer": "2"}', r"rows.jsonl:1: missing or empty string field 'prompt'"),
    "missing-answer": ('{"prompt": "What is 1 + 1?"}', r"rows.jsonl:1: missing or empty string field 'answer'"),
    "empty-prompt": ('{"prompt": "  ", "answer": "2"}', r"rows.jsonl:1: missing or empty string field 'prompt'"),
    "answer-not-a-string": ('{"prompt": "What is 1 + 1?", "answer": 2}', r"field 'answer'"),
    "empty-file": ("", r"rows.jsonl: no usable rows"),
}


@pytest.mark.parametrize("case", list(ROWS))
def test_bad_row_is_named(tiny, tmp_path, case):
    """One bad row among good ones: the file, line and field are named before any process group."""
    text, match = ROWS[case]
    path = tmp_path / "rows.jsonl"
    good = [json.dumps(r) for r in train_fixtures.problems(count=8)] if case != "empty-file" else []
    path.write_text("\n".join([text, *good]) + "\n" if text else "")
    _build_fails(_cfg(tiny, tmp_path / "out", f"data.train_file={path}"), DataError, match)


def test_bad_rows_skipped_are_counted(tiny, tmp_path):
    from megatron_less.data.sampler import load_prompts
    from megatron_less.data.tokenizer import load_tokenizer

    path = tmp_path / "rows.jsonl"
    good = [json.dumps(r) for r in train_fixtures.problems(count=8)]
    path.write_text("\n".join(['{"prompt": 1}', "not json", *good, '{"answer": "3"}']) + "\n")
    prompts, stats = load_prompts(path, load_tokenizer(tiny["hf"]), template="plain", max_prompt_tokens=48,
                                  skip_bad=True)  # fmt: skip
    assert len(prompts) == 8 and stats["bad_rows"] == 3 and stats["rows"] == 8


def test_all_rows_bad_is_an_error_even_when_skipping(tiny, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": 1}\n[]\n')
    _build_fails(_cfg(tiny, tmp_path / "out", f"data.train_file={path}", "data.skip_bad_rows=true"), DataError,
                 r"no usable rows \(2 bad rows skipped\)")


def test_over_long_prompts_are_skipped_and_counted(tiny, tmp_path):
    from megatron_less.data.sampler import load_prompts
    from megatron_less.data.tokenizer import load_tokenizer

    rows = train_fixtures.problems(count=8) + [{"prompt": "What is " + "1 + " * 200 + "1?", "answer": "201"}]
    path = train_fixtures.write_train_file(tmp_path / "rows.jsonl", rows)
    prompts, stats = load_prompts(path, load_tokenizer(tiny["hf"]), template="plain", max_prompt_tokens=48,
                                  skip_bad=False)  # fmt: skip
    assert len(prompts) == 8 and stats["too_long"] == 1


def test_every_prompt_over_long_is_an_error(tiny, tmp_path):
    _build_fails(_cfg(tiny, tmp_path / "out", "data.max_prompt_tokens=3"), DataError,
                 r"no usable prompt \(64 rows, 64 over data.max_prompt_tokens\)")


def test_fewer_prompts_than_a_step_needs(tiny, tmp_path):
    path = train_fixtures.write_train_file(tmp_path / "rows.jsonl", train_fixtures.problems(count=3))
    _build_fails(_cfg(tiny, tmp_path / "out", f"data.train_file={path}", "batch.prompts_per_step=4",
                      "batch.mini_batch_prompts=4"), ConfigError, r"prompts_per_step \(4\) exceeds the 3 usable")


def test_missing_train_file(tiny, tmp_path):
    with pytest.raises(ConfigError, match=r"data.train_file: /nope/rows.jsonl does not exist"):
        _cfg(tiny, tmp_path, "data.train_file=/nope/rows.jsonl")


# --- responses at the length limit -------------------------------------------------------------


def test_prompt_plus_response_at_the_position_limit_is_accepted_one_more_is_not(tiny):
    """max_prompt_tokens + max_tokens may reach max_position_embeddings (128), not pass it."""
    from megatron_less.trainer.setup import model_arch

    cfg = _cfg(tiny, "/tmp/x", "data.max_prompt_tokens=48", "rollout.max_tokens=80")
    assert check_layout(cfg, model_arch(cfg), 1) == 1
    cfg = _cfg(tiny, "/tmp/x", "data.max_prompt_tokens=48", "rollout.max_tokens=81")
    with pytest.raises(ConfigError, match="= 129 exceeds the model's max_position_embeddings 128"):
        check_layout(cfg, model_arch(cfg), 1)


@pytest.mark.parametrize("text", ["\\boxed{1", "The answer is \\boxed{\\frac{1}{", ""], ids=["open-box", "open-frac", "empty"])
def test_response_cut_at_max_tokens_scores_zero_with_a_reason(text):
    """A response stopped by the length limit mid-answer is scored 0 and says why, no error."""
    from megatron_less.rewards.math import score_batch

    (r,) = score_batch([text], ["1"], num_workers=1, timeout=5)
    assert r.score == 0.0 and r.reason in {"no_box", "mismatch"}, r


# --- every config field ------------------------------------------------------------------------


def _bad_value(field) -> object:
    """A value the field's declared type or bounds refuse."""
    meta = {type(m).__name__: m for m in field.metadata}
    ann = field.annotation
    if typing.get_origin(ann) is typing.Literal:
        return "bogus"
    if "Ge" in meta:
        return meta["Ge"].ge - 1
    if "Gt" in meta:
        return meta["Gt"].gt
    if "Le" in meta or "Lt" in meta:
        return 10.0
    if ann in (bool, bool | None):
        return "sometimes"
    if ann in (int, float, int | None, float | None):
        return "many"
    return [1, 2]  # for str, dict and list fields: a list of numbers is none of them


def _leaf_fields():
    from pydantic import BaseModel

    for name, f in Config.model_fields.items():
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
            for sub, g in f.annotation.model_fields.items():
                yield f"{name}.{sub}", g
        else:
            yield name, f


FIELDS = dict(_leaf_fields())
# these take strings of any content (paths, names); refused by other rules, tested below
FREE_TEXT = {"output_dir", "model.hf_dir", "model.checkpoint", "model.tokenizer", "data.train_file",
             "checkpoint.resume", "algo.advantage", "algo.shaper", "algo.policy_loss"}


@pytest.mark.parametrize("key", sorted(FIELDS))
def test_config_field_refuses_a_bad_value_by_name(tiny, key):
    if key == "eval.benchmarks":
        bad = "math500"  # a plain string where a list is wanted
    elif key in FREE_TEXT:
        bad = {"a": 1}
    else:
        bad = _bad_value(FIELDS[key])
    with pytest.raises(ConfigError) as e:
        load_config(CONFIG, _args(tiny, "/tmp/x", f"{key}={json.dumps(bad)}"))
    assert key in str(e.value), str(e.value)


@pytest.mark.parametrize("override, match", [
    ("model.tokenizer=null", None),  # fine: the HF folder holds one
    ("checkpoint.resume=/nope", r"checkpoint.resume: /nope is neither auto, none nor a folder"),
    ("algo.advantage=grpoo", r"algo.advantage: unknown advantage 'grpoo' \(did you mean 'grpo'\?\)"),
    ("optim.min_lr=1", r"optim.min_lr \(1.0\) exceeds optim.lr"),
    ("rollout.n", r"override 'rollout.n' is not key=value"),
    ("rollout..n=3", r"empty key part"),
], ids=["tokenizer-default", "resume-path", "unknown-estimator", "min-lr", "not-key-value", "empty-key"])
def test_config_rules_beyond_types(tiny, override, match):
    if match is None:
        load_config(CONFIG, _args(tiny, "/tmp/x", override))
        return
    with pytest.raises(ConfigError, match=match):
        load_config(CONFIG, _args(tiny, "/tmp/x", override))


def test_config_file_not_yaml_mapping(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="the top level must be a mapping"):
        load_config(bad)
    bad.write_text("rollout: {n: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_malformed_fault_plan_is_an_error_not_ignored(monkeypatch):
    from megatron_less.parallel import faults

    monkeypatch.setenv("MLESS_FAULT", "update:x")
    with pytest.raises(ValueError, match="MLESS_FAULT: 'update:x' is not <point>:<step>"):
        faults.kill_point("update", 1)


# --- HF folders --------------------------------------------------------------------------------


def _hf_copy(tiny, tmp_path, edit) -> str:
    from safetensors.torch import load_file, save_file

    dst = tmp_path / "hf"
    shutil.copytree(tiny["hf"], dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return str(dst)


def test_hf_folder_missing_a_tensor(tiny, tmp_path):
    hf = _hf_copy(tiny, tmp_path, lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
    _build_fails(_cfg(tiny, tmp_path / "out", f"model.hf_dir={hf}"), CheckpointError,
                 r"lacks tensor\(s\) model.layers.2.mlp.up_proj.weight")


def test_hf_folder_with_a_mis_shaped_tensor(tiny, tmp_path):
    def edit(t):
        t["model.layers.1.self_attn.k_proj.weight"] = t["model.layers.1.self_attn.k_proj.weight"][:-1].clone()

    hf = _hf_copy(tiny, tmp_path, edit)
    _build_fails(_cfg(tiny, tmp_path / "out", f"model.hf_dir={hf}"), CheckpointError,
                 r"shape mismatch for model.layers.1.self_attn.k_proj.weight in model.safetensors")


def test_hf_folder_with_a_truncated_weights_file(tiny, tmp_path):
    dst = tmp_path / "hf"
    shutil.copytree(tiny["hf"], dst)
    f = dst / "model.safetensors"
    os.truncate(f, f.stat().st_size // 2)
    _build_fails(_cfg(tiny, tmp_path / "out", f"model.hf_dir={dst}"), CheckpointError,
                 r"model.safetensors is not a readable safetensors file \(truncated or corrupt\?\)")


# --- training checkpoints ----------------------------------------------------------------------


def _train_job(tiny, out):
    from megatron_less.trainer.loop import train

    train(load_config(CONFIG, _args(tiny, out, "checkpoint.every=1", "checkpoint.keep=4")))


@pytest.fixture(scope="module")
def trained(tiny):
    """A real 2-step run (one rank): checkpoints step_1 and step_2."""
    from megatron_less.parallel.spawn import run_distributed

    out = tiny["root"] / "trained"
    run_distributed(_train_job, 1, (tiny, str(out)), timeout=600)
    return out


@pytest.fixture
def run_copy(trained, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(trained, out)
    return out


def _resume_fails(tiny, out, match, *extra):
    from megatron_less.checkpoints.train_state import check_resume
    from megatron_less.trainer.setup import model_arch

    cfg = _cfg(tiny, out, *extra)
    before = sorted(str(p) + str(p.stat().st_size) for p in Path(out).rglob("*") if p.is_file())
    with pytest.raises((CheckpointError, ConfigError), match=match):
        check_resume(cfg, model_arch(cfg), 64)
    after = sorted(str(p) + str(p.stat().st_size) for p in Path(out).rglob("*") if p.is_file())
    assert before == after, "a refused resume changed the checkpoints"


def test_resume_auto_picks_the_newest_complete(tiny, run_copy):
    """A .partial (interrupted save), a .stale (interrupted prune) and a step folder without its
    trainer state never count; the newest complete one does."""
    from megatron_less.checkpoints.train_state import check_resume
    from megatron_less.trainer.setup import model_arch

    ck = run_copy / "checkpoints"
    shutil.copytree(ck / "step_000002", ck / "step_000003.partial")
    shutil.copytree(ck / "step_000002", ck / "step_000004.stale")
    shutil.copytree(ck / "step_000002", ck / "step_000005")
    (ck / "step_000005" / "trainer_state.json").unlink()
    cfg = _cfg(tiny, run_copy)
    assert check_resume(cfg, model_arch(cfg), 64) == ck / "step_000002"


def test_checkpoint_of_another_model(tiny, run_copy):
    """Resuming into a model of another shape names the differing fields, before any weight."""
    from dataclasses import replace

    from megatron_less.checkpoints.train_state import check_resume
    from megatron_less.trainer.setup import model_arch

    cfg = _cfg(tiny, run_copy)
    other = replace(model_arch(cfg), num_hidden_layers=2)
    with pytest.raises(ValueError, match=r"step_000002 does not match the model: num_hidden_layers: model 2 vs checkpoint 4"):
        check_resume(cfg, other, 64)


def test_truncated_checkpoint_shard(tiny, run_copy):
    f = run_copy / "checkpoints" / "step_000002" / "__0_0.distcp"
    os.truncate(f, f.stat().st_size - 100)
    _resume_fails(tiny, run_copy, r"__0_0.distcp is truncated")


def test_missing_checkpoint_shard(tiny, run_copy):
    (run_copy / "checkpoints" / "step_000002" / "__0_0.distcp").unlink()
    _resume_fails(tiny, run_copy, r"__0_0.distcp is missing")


def test_truncated_checkpoint_index(tiny, run_copy):
    f = run_copy / "checkpoints" / "step_000002" / ".metadata"
    os.truncate(f, 10)
    _resume_fails(tiny, run_copy, r"torch_dist index \(.metadata\) is unreadable")


def test_corrupt_trainer_state(tiny, run_copy):
    (run_copy / "checkpoints" / "step_000002" / "trainer_state.json").write_text('{"step": 2,')
    _resume_fails(tiny, run_copy, r"trainer_state.json is not valid JSON")


def test_trainer_state_of_another_version(tiny, run_copy):
    path = run_copy / "checkpoints" / "step_000002" / "trainer_state.json"
    state = json.loads(path.read_text())
    path.write_text(json.dumps({**state, "version": 99}))
    _resume_fails(tiny, run_copy, r"trainer_state.json: version 99, this code reads 1")


def test_missing_rng_state_at_the_same_layout(tiny, run_copy):
    (run_copy / "checkpoints" / "step_000002" / "rng" / "rank_0.pt").unlink()
    _resume_fails(tiny, run_copy, r"no RNG state for rank\(s\) \[0\]")


def test_resume_from_an_incomplete_folder(tiny, run_copy):
    (run_copy / "checkpoints" / "step_000002" / "megatron_less.json").unlink()
    _resume_fails(tiny, run_copy, r"is not a complete training checkpoint",
                  f"checkpoint.resume={run_copy / 'checkpoints' / 'step_000002'}")


def test_resume_from_an_older_checkpoint_than_the_newest(tiny, run_copy):
    _resume_fails(tiny, run_copy, r"is step 1, but .* holds newer \['step_000002'\]",
                  f"checkpoint.resume={run_copy / 'checkpoints' / 'step_000001'}")


def test_resume_under_another_lr_schedule(tiny, run_copy):
    _resume_fails(tiny, run_copy, r"saved with optim.lr=0.001, this config has 0.002", "optim.lr=2e-3")


def test_resume_with_another_training_file(tiny, run_copy, tmp_path):
    path = train_fixtures.write_train_file(tmp_path / "rows.jsonl", train_fixtures.problems(count=8))
    from megatron_less.checkpoints.train_state import check_resume
    from megatron_less.trainer.setup import model_arch

    cfg = _cfg(tiny, run_copy, f"data.train_file={path}")
    with pytest.raises(CheckpointError, match=r"data position over 64 prompts, .*rows.jsonl now gives 8"):
        check_resume(cfg, model_arch(cfg), 8)


def test_start_from_a_truncated_model_checkpoint(tiny, run_copy, tmp_path):
    ckpt = run_copy / "checkpoints" / "step_000001"
    f = ckpt / "__0_0.distcp"
    os.truncate(f, 1000)
    cfg = _cfg(tiny, tmp_path / "out", "model.hf_dir=null", f"model.checkpoint={ckpt}", f"model.tokenizer={tiny['hf']}")
    _build_fails(cfg, CheckpointError, r"__0_0.distcp is truncated")


def test_metrics_log_torn_by_a_kill_is_repaired_on_resume(tmp_path):
    from megatron_less.trainer.logger import RunLogger

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n{"step": 3, "a"')
    RunLogger(tmp_path, total_steps=5, start_step=2, tensorboard=False, progress=False).close()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n'


# --- a worker lost mid-step --------------------------------------------------------------------


def test_a_rank_that_dies_mid_rollout_ends_the_job_without_a_hang(tiny, tmp_path):
    """torchrun, 2 ranks: rank 1 is SIGKILLed during step 2's rollout. The job exits non-zero
    soon after (the survivor's next collective fails, torchrun stops the rest; a hang would last
    the process group's 600 s timeout), the step-1 checkpoint is intact, and the same command
    without the fault resumes from it and finishes step 2."""
    from megatron_less.checkpoints.model import check_files
    from megatron_less.checkpoints.train_state import complete
    from megatron_less.parallel.spawn import free_port

    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", MLESS_FAULT="rank_dies:2:1")

    def job(env, limit):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
               f"--master-port={free_port()}", "-m", "megatron_less.cli", "train", str(CONFIG),
               *_args(tiny, out, "checkpoint.every=1")]  # fmt: skip
        try:
            return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=limit, check=False)
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"the job was still running after {limit} s: a hang\n{(e.stderr or b'')[-3000:]!r}")

    proc = job(env, 240)
    ended = time.time()
    assert proc.returncode != 0
    assert "Signals.SIGKILL" in proc.stderr or "exitcode  : -9" in proc.stderr, proc.stderr[-3000:]
    assert [p.name for p in complete(out)] == ["step_000001"]
    check_files(out / "checkpoints" / "step_000001")
    # step 2 (its rollout, where rank 1 died) began when step 1's checkpoint was published
    after_kill = ended - (out / "checkpoints" / "step_000001").stat().st_mtime
    assert after_kill < 90, f"the job took {after_kill:.0f} s to end after rank 1 died"

    env.pop("MLESS_FAULT")
    proc = job(env, 240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "step_000001 (step 1)" in proc.stdout, proc.stdout[-2000:]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert [p.name for p in complete(out)] == ["step_000001", "step_000002"]


# --- algorithm keyword arguments and group sizes (checked before any process group) -------------


@pytest.mark.parametrize("override, message", [
    ("algo.shaper_kwargs.mu=0", "algo.shaper_kwargs.mu: must be >= 1 (got 0)"),
    ("algo.shaper_kwargs.quantile=1.5", "algo.shaper_kwargs.quantile: must be in [0, 1] (got 1.5)"),
    ("algo.shaper_kwargs.mu=five", "algo.shaper_kwargs.mu: must be an integer (got 'five')"),
    ("algo.advantage_kwargs.foo=1", "algo.advantage_kwargs.foo: unknown keyword of advantage 'grpo'; valid: eps"),
    ("algo.loss_kwargs.dual_clip_c=0.5", "algo.loss_kwargs.dual_clip_c: must be > 1 or null (got 0.5)"),
    ("algo.loss_kwargs.clip_lo=0.1", "algo.loss_kwargs.clip_lo: unknown keyword of policy_loss 'ppo_clip' "
                                     "(did you mean 'clip_low'?)"),
    ("algo.loss_kwargs.kl_coef=0.1", "algo.loss_kwargs.kl_coef: set by the trainer (algo.kl_coef), not here"),
    ("rollout.n=1", "rollout.n: 1 response per prompt gives advantage 'grpo' no signal"),
], ids=["mu-0", "quantile", "mu-text", "unknown-advantage-kwarg", "dual-clip", "unknown-loss-kwarg",
        "trainer-kwarg", "group-of-one"])
def test_bad_algorithm_values_fail_fast_naming_the_key(tiny, override, message):
    """`megatron-less train` with a bad algorithm value: exit code 2 in < 15 s, one line naming the
    key, before any model is built (the same check `load_config` runs)."""
    with pytest.raises(ConfigError) as e:
        load_config(CONFIG, _args(tiny, "/tmp/x", override))
    assert message in str(e.value), str(e.value)
    cmd = [sys.executable, "-m", "megatron_less.cli", "train", str(CONFIG), *_args(tiny, "/tmp/x", override)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    took = time.monotonic() - t0
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-3000:]  # one line, no traceback
    assert took < 15, f"{override} took {took:.1f} s to fail"


@pytest.mark.parametrize("advantage", ["drgrpo", "rloo"])
def test_group_of_one_refused_for_every_group_estimator(tiny, advantage):
    with pytest.raises(ConfigError, match=rf"rollout.n: 1 response per prompt gives advantage '{advantage}' no signal"):
        load_config(CONFIG, _args(tiny, "/tmp/x", "rollout.n=1", f"algo.advantage={advantage}"))
    load_config(CONFIG, _args(tiny, "/tmp/x", "rollout.n=2", f"algo.advantage={advantage}"))  # two are enough


def test_good_algorithm_kwargs_are_accepted(tiny):
    cfg = load_config(CONFIG, _args(tiny, "/tmp/x", "algo.policy_loss=clip_cov", "algo.loss_kwargs={clip_cov_ratio: 0.001}",
                                    "algo.shaper_kwargs={mu: 1, quantile: 1}", "algo.advantage_kwargs.eps=0.0001"))
    assert cfg.algo.loss_kwargs == {"clip_cov_ratio": 0.001} and cfg.algo.shaper_kwargs == {"mu": 1, "quantile": 1}


# --- RNG files: read by the safe loader ----------------------------------------------------------


def test_rng_states_are_read_by_the_safe_loader(trained):
    """Every rank's RNG file holds tensors and plain values only, so torch.load(weights_only=True),
    which runs no code from the file, reads it (as megatron's own common-state load does)."""
    import torch

    files = sorted((trained / "checkpoints").glob("step_*/rng/rank_*.pt"))
    assert len(files) == 2, files
    for f in files:
        state = torch.load(f, weights_only=True)
        assert {"python", "numpy", "torch", "megatron"} <= set(state), f


class _RunsCode:
    """Unpickled by a full pickle loader, this makes a folder: a stand-in for any code."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def _resume_job(tiny, out):
    from megatron_less.trainer.loop import train

    train(load_config(CONFIG, _args(tiny, out, "checkpoint.every=1", "checkpoint.keep=4")))


def test_rng_file_that_would_run_code_is_refused_not_run(tiny, run_copy, tmp_path):
    """An RNG file from an untrusted source holding a pickled object: the resume stops naming the
    file, and nothing in the file runs."""
    import torch

    from megatron_less.parallel.spawn import DistributedError, run_distributed

    marker = tmp_path / "code_ran"
    rng_file = run_copy / "checkpoints" / "step_000002" / "rng" / "rank_0.pt"
    torch.save({"python": _RunsCode(str(marker))}, rng_file)
    with pytest.raises(DistributedError, match=r"rank_0.pt: not an RNG state the safe loader reads"):
        run_distributed(_resume_job, 1, (tiny, str(run_copy)), timeout=600)
    assert not marker.exists(), "resuming ran code from the checkpoint's RNG file"
