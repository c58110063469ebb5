"""The recipes in examples/: every config validates (schema, the LESS authors' hyperparameters,
the layout on one 8-GPU node for the real model shapes), and the launch scripts refuse to start
with a clear message when a variable is missing, and pass shellcheck.

No real model is needed: the shapes below are those of the published config.json files."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from megatron_less.models.qwen2 import Qwen2Arch
from megatron_less.trainer.config import check_layout, load_config

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
_7B = dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
           num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False, hidden_act="silu",
           rms_norm_eps=1e-6)  # fmt: skip
SHAPES = {
    "qwen2.5-math-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                              num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                              tie_word_embeddings=True, hidden_act="silu", rms_norm_eps=1e-6,
                              max_position_embeddings=4096, rope_theta=10000.0),
    "qwen2.5-math-7b": dict(_7B, max_position_embeddings=4096, rope_theta=10000.0),
    "qwen2.5-7b": dict(_7B, max_position_embeddings=131072, rope_theta=1000000.0),
}  # fmt: skip
# the 80 GB variants the configs' comments give
ON_80GB = {
    "qwen2.5-math-1.5b": ["batch.micro_batch_tokens=16384", "rollout.kv_cache_gib=40"],
    "qwen2.5-math-7b": ["parallel.tp=2", "rollout.rollout_tp=2", "batch.micro_batch_tokens=16384",
                        "rollout.kv_cache_gib=20"],
    "qwen2.5-7b": ["parallel.tp=2", "rollout.rollout_tp=2", "batch.micro_batch_tokens=16384", "rollout.kv_cache_gib=20"],
}  # fmt: skip


def test_every_recipe_has_a_config():
    assert sorted(p.stem for p in (EXAMPLES / "configs").glob("qwen*.yaml")) == sorted(SHAPES)


@pytest.mark.parametrize("recipe", sorted(SHAPES))
def test_recipe_has_the_less_hyperparameters(recipe):
    cfg = load_config(EXAMPLES / "configs" / f"{recipe}.yaml", check_paths=False)
    assert (cfg.batch.prompts_per_step, cfg.rollout.n, cfg.batch.mini_batch_prompts) == (512, 8, 32)
    assert (cfg.optim.lr, cfg.optim.lr_schedule, cfg.optim.warmup_steps) == (1e-6, "constant", 0)
    assert cfg.algo.loss_kwargs == {"clip_low": 0.2, "clip_high": 0.28, "dual_clip_c": 10.0}
    assert (cfg.algo.advantage, cfg.algo.shaper, cfg.algo.policy_loss) == ("grpo", "less", "ppo_clip")
    assert cfg.algo.shaper_kwargs == {"mu": 5, "quantile": 0.8}
    assert (cfg.algo.loss_agg_mode, cfg.algo.kl_coef, cfg.algo.entropy_coef) == ("token-mean", 0.0, 0.0)
    assert (cfg.data.max_prompt_tokens, cfg.rollout.max_tokens, cfg.rollout.temperature) == (1024, 3072, 1.0)
    assert (cfg.eval.n, cfg.eval.temperature) == (32, 0.1)
    assert (cfg.model.dtype, cfg.optim.use_distributed_optimizer) == ("bf16", True)
    assert cfg.model.tokenizer and cfg.model.checkpoint, "the pipeline trains from the converted checkpoint"


@pytest.mark.parametrize("variant", ["40gb", "80gb"])
@pytest.mark.parametrize("recipe", sorted(SHAPES))
def test_recipe_layout_fits_one_8_gpu_node(recipe, variant):
    extra = ON_80GB[recipe] if variant == "80gb" else []
    cfg = load_config(EXAMPLES / "configs" / f"{recipe}.yaml", extra, check_paths=False)
    dp = check_layout(cfg, Qwen2Arch.from_hf(SHAPES[recipe]), world_size=8)
    assert dp * cfg.parallel.tp * cfg.parallel.pp == 8
    # the memory worked out in the headers assumes sequence parallelism wherever TP > 1
    assert cfg.parallel.uses_sequence_parallel == (cfg.parallel.tp > 1)
    assert 8 % cfg.rollout.rollout_tp == 0 and cfg.rollout.kv_cache_gib


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and k != "correction_kwargs" else {prefix + k: v})
    return out


def test_dapo_variant_differs_from_its_recipe_only_in_the_dapo_switches():
    base = _flat(load_config(EXAMPLES / "configs" / "qwen2.5-math-7b.yaml", check_paths=False).model_dump())
    dapo_cfg = load_config(EXAMPLES / "configs" / "variants" / "qwen2.5-math-7b-dapo.yaml", check_paths=False)
    dapo = _flat(dapo_cfg.model_dump())
    changed = {k for k in base if base[k] != dapo[k]}
    assert changed == {"output_dir", "algo.shaper", "algo.correction", "algo.correction_kwargs",
                       "algo.dynamic_sampling.enable", "reward.overlong_buffer"}, changed
    assert (base["algo.dynamic_sampling.enable"], base["reward.overlong_buffer"], base["algo.correction"]) == (
        False, 0, "none"), "the LESS authors' recipe keeps the DAPO switches off"
    assert check_layout(dapo_cfg, Qwen2Arch.from_hf(SHAPES["qwen2.5-math-7b"]), world_size=8) == 2


def _bash(script: str, *args: str, timeout: str = "60", **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NNODES", "NODE_RANK", "MASTER_",
                                                                       "RDZV_", "HF_DIR", "TRAIN_FILE"))}
    return subprocess.run(["bash", str(EXAMPLES / script), *args], cwd=REPO, env={**clean, **env},
                          capture_output=True, text=True, timeout=float(timeout))  # fmt: skip


CONFIG = "examples/configs/qwen2.5-math-7b.yaml"
MISSING = [  # (script, args, env, what the message must name)
    ("launch/torchrun.sh", [], {}, "usage: torchrun.sh CONFIG.yaml"),
    ("launch/torchrun.sh", ["nope.yaml"], {}, "config file nope.yaml does not exist"),
    ("launch/torchrun.sh", [CONFIG], {"NNODES": "2"}, "NODE_RANK is not set"),
    ("launch/torchrun.sh", [CONFIG], {"NNODES": "2", "NODE_RANK": "1"}, "MASTER_ADDR is not set"),
    ("launch/torchrun.sh", [CONFIG], {"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"}, "must be below NNODES"),
    ("launch/torchrun.sh", [CONFIG], {"NNODES": "two"}, "NNODES must be"),
    ("launch/torchrun.sh", [CONFIG], {"GPUS_PER_NODE": "0"}, "GPUS_PER_NODE must be a positive integer"),
    ("launch/torchrun.sh", [CONFIG], {"NNODES": "2", "RDZV_ENDPOINT": "h:29400"}, "RDZV_ID is not set"),
    ("launch/slurm.sbatch", [CONFIG], {}, "SLURM_JOB_ID is not set"),
    ("pipeline.sh", [], {}, "usage: pipeline.sh RECIPE"),
    ("pipeline.sh", ["qwen3"], {}, "no recipe qwen3"),
    ("pipeline.sh", ["qwen2.5-math-7b"], {}, "HF_DIR is not set"),
    ("pipeline.sh", ["qwen2.5-math-7b"], {"HF_DIR": "/nonexistent"}, "HF_DIR=/nonexistent has no config.json"),
]  # fmt: skip


@pytest.mark.parametrize("script,args,env,message", MISSING, ids=[m[3] for m in MISSING])
def test_scripts_fail_early_naming_what_is_missing(script, args, env, message):
    proc = _bash(script, *args, **env)
    assert proc.returncode == 2 and message in proc.stderr, (proc.returncode, proc.stdout, proc.stderr)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: it comes with the test extra (pip install -e '.[test]')")
    return path


def test_shell_scripts_pass_shellcheck():
    scripts = [*EXAMPLES.rglob("*.sh"), *EXAMPLES.rglob("*.sbatch"), REPO / "tests" / "gpu" / "check.sh"]
    proc = subprocess.run([_tool("shellcheck"), "--shell=bash", *map(str, scripts)], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.slow
def test_pipeline_end_to_end_on_the_tiny_model(tmp_path, data_dir):
    """examples/pipeline.sh with the tiny recipe on CPU: convert -> 1 training step -> eval of
    the checkpoint (2 problems) -> HF export that transformers loads. ~2 min on 2 cores."""
    from transformers import AutoModelForCausalLM

    from tests import train_fixtures

    hf_dir, train_file = train_fixtures.make_model(tmp_path, steps=30)
    run = tmp_path / "run"
    eval_args = ("--engine builtin --benchmarks math500 --limit 2 --num-samples 2 --max-tokens 12 --template plain "
                 f"--no-plot --no-bootstrap --num-workers 1 --data-dir {data_dir}")  # fmt: skip
    proc = _bash("pipeline.sh", "tiny_cpu", "model.hf_dir=", "train.steps=1", "rollout.n=4", "batch.prompts_per_step=2",
                 "batch.mini_batch_prompts=2", "log.tensorboard=false", HF_DIR=str(hf_dir), TRAIN_FILE=str(train_file),
                 RUN_DIR=str(run), GPUS_PER_NODE="1", EVAL_ARGS=eval_args, PYTHONWARNINGS="ignore",
                 timeout="600")  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (run / "base").is_dir() and (run / "eval" / "step_000001" / "eval_results.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(run / "hf" / "step_000001")
    assert model.config.num_hidden_layers == 4
