"""Training checkpoints: all a run needs to go on as if it had never stopped.

One folder per saved step, ``OUTPUT_DIR/checkpoints/step_NNNNNN``, written as ``.partial`` and made
current by a rename (checkpoints.model.save_checkpoint), so a crash mid-save leaves no folder
that looks complete. It holds
  * one megatron-core torch_dist checkpoint of the model and the optimizer state (Adam moments,
    fp32 master weights under bf16) - the model part is an ordinary megatron-less checkpoint, so
    `export-hf` and `eval --model` read a training checkpoint as they are;
  * trainer_state.json: step, data position, LR schedule, counters, the resolved config, layout;
  * rollout_state.json (rollout.placement separate): the batches already generated for later
    steps, from weights no checkpoint keeps;
  * rng/rank_R.pt: each rank's python / numpy / torch / CUDA / megatron model-parallel RNG states.
RNG states are restored only at the layout they were saved at (elsewhere rank R is another
shard; the process RNGs are then seeded from ``seed`` as at a fresh start). Nothing a step
computes draws from them: sampling draws from a generator seeded by (seed, step) and Qwen2 has no
dropout, so a resume at another layout continues the same run, equal up to the floating-point
differences between layouts (docs/architecture.md, Reliability).

Guarantees (tests/test_reliability.py, benchmarks/kill_resume.py): a folder named step_N is
complete (published by one rename after every rank's files); a save that fails on any rank fails
on every rank and leaves nothing; no checkpoint holds a non-finite weight or optimizer value;
pruning renames a folder away before deleting it, so a crash mid-prune leaves no step_N that is
half gone.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_less.checkpoints.files import CheckpointError, read_json, write_json
from megatron_less.checkpoints.model import META_FILE, load_with, save_checkpoint
from megatron_less.parallel import faults

STATE_FILE = "trainer_state.json"
ROLLOUT_FILE = "rollout_state.json"  # placement separate: the batches generated ahead
STATE_VERSION = 1
STEP_DIR = re.compile(r"step_\d+")  # a published checkpoint (not .partial, not .stale)
# config keys the LR schedule is built from: a resume must use the values it was saved with
SCHEDULE_KEYS = ("optim.lr", "optim.min_lr", "optim.lr_schedule", "optim.warmup_steps", "optim.weight_decay",
                 "train.steps", "batch.prompts_per_step", "batch.mini_batch_prompts", "batch.ppo_epochs")


def checkpoints_dir(out_dir) -> Path:
    return Path(out_dir) / "checkpoints"


def is_complete(path: Path) -> bool:
    return (path / META_FILE).is_file() and (path / STATE_FILE).is_file()


def complete(out_dir) -> list[Path]:
    """Published, complete checkpoints, oldest first (``.partial`` folders of an interrupted save
    and ``.stale`` ones of an interrupted prune never count)."""
    root = checkpoints_dir(out_dir)
    return sorted(p for p in root.glob("step_*") if STEP_DIR.fullmatch(p.name) and is_complete(p))


def latest(out_dir) -> Path | None:
    """The newest complete checkpoint."""
    found = complete(out_dir)
    return found[-1] if found else None


def _layout() -> dict:
    from megatron.core import parallel_state as ps

    return {"world": dist.get_world_size(), "tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size()}  # fmt: skip


def _rng_state() -> dict:
    """This rank's RNG states as tensors and plain values only (str, int, float, None, dicts), so
    that torch.load(weights_only=True), which runs nothing from the file, reads them back."""
    from megatron.core import tensor_parallel

    py_version, py_keys, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        # the Mersenne Twister keys are < 2**32: int64 tensors hold them exactly
        "python": {"version": py_version, "keys": torch.tensor(py_keys, dtype=torch.int64), "gauss_next": py_gauss},
        "numpy": {"kind": str(np_kind), "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "torch": torch.get_rng_state(),
        "megatron": dict(tensor_parallel.get_cuda_rng_tracker().get_states()),  # name -> state tensor
    }  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    """Restore what `_rng_state` saved, bit-exact."""
    from megatron.core import tensor_parallel

    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["keys"].tolist()), py["gauss_next"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))  # fmt: skip
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(dict(state["megatron"]))


def trainer_state(run) -> dict:
    return {
        "version": STATE_VERSION,
        "step": run.step,
        "sampler": run.sampler.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "counters": dict(run.counters),
        "layout": _layout(),
        "config": run.cfg.model_dump(),
    }


def due(cfg, step: int, last: int) -> bool:
    """Whether the run saves a checkpoint after ``step`` (``last``: the step this job stops after)."""
    return bool(cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == last


def rollout_state(path: Path) -> dict:
    """What the rollout engine saved with checkpoint ``path`` (placement separate: the batches
    generated ahead); empty for a colocated run's."""
    return read_json(path / ROLLOUT_FILE) if (path / ROLLOUT_FILE).is_file() else {}


def save(run) -> Path:
    """Collective: every rank writes its shards and RNG state; rank 0 the trainer state.
    Refuses (on every rank, before writing) a model or optimizer state that is not finite."""
    out = checkpoints_dir(run.out_dir) / f"step_{run.step:06d}"
    module, optimizer = run.policy.module, run.policy.optimizer
    check_finite(run)
    extra = {"optimizer": optimizer.sharded_state_dict(module.sharded_state_dict(), **_optimizer_format(run.cfg))}
    rank = dist.get_rank()

    def on_disk(tmp: str) -> None:
        os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
        torch.save(_rng_state(), os.path.join(tmp, "rng", f"rank_{rank}.pt"))
        if rank == 0:
            write_json(os.path.join(tmp, STATE_FILE), trainer_state(run))
            if engine := run.engine.checkpoint_state():  # whole rollout batches: compact, a file of their own
                with open(os.path.join(tmp, ROLLOUT_FILE), "w", encoding="utf-8") as f:
                    json.dump(engine, f, separators=(",", ":"))
        faults.kill_point("save", run.step)

    with faults.full_disk(run.step):  # MLESS_FAULT only
        save_checkpoint(module, out, run.arch, hf_config=run.hf_config, generation_config=run.generation_config,
                        source=run.source, extra_sharded=extra, on_disk=on_disk)
    if rank == 0:
        _prune(run.out_dir, run.cfg.checkpoint.keep)
    dist.barrier()
    return out


def _optimizer_format(cfg) -> dict:
    """The distributed optimizer's checkpoint format: megatron's default for it
    (fully_sharded_model_space) is deprecated and refused by its own save in 0.16 and 0.19, and
    fully_reshardable gathers through CUDA; dp_reshardable (Megatron-LM's default) is what both
    versions save and load. It reloads at the same TP/PP only (check_resume says so)."""
    if not cfg.optim.use_distributed_optimizer:
        return {}
    return {"metadata": {"distrib_optim_sharding_type": "dp_reshardable"}}


def check_finite(run) -> None:
    """Collective: every rank checks its weights and optimizer state; any non-finite value on any
    rank raises CheckpointError on every rank, naming the first tensor and its rank."""
    bad = None
    for name, p in run.policy.module.named_parameters():
        if not torch.isfinite(p.detach()).all():
            bad = f"weight {name}"
            break
    if bad is None:
        bad = next((where for where, t in _optimizer_tensors(run.policy.optimizer)
                    if t.is_floating_point() and not torch.isfinite(t).all()), None)  # fmt: skip
    found = [None] * dist.get_world_size()
    dist.all_gather_object(found, bad)
    named = [f"rank {r}: {b}" for r, b in enumerate(found) if b]
    if named:
        raise CheckpointError(f"refusing to save step {run.step}: non-finite values ({'; '.join(named[:4])}); "
                              f"the checkpoints already in {checkpoints_dir(run.out_dir)} are kept")


def _optimizer_tensors(optimizer):
    """(name, tensor) of everything this rank's optimizer keeps: the parameters its inner torch
    optimizer updates (the fp32 main parameters under bf16; this rank's shards of them under the
    distributed optimizer) and their state. Read from the inner optimizer, not from
    ``optimizer.state_dict()``: megatron's DistributedOptimizer leaves the Adam state out of that."""
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    for c, megatron_opt in enumerate(chained):
        inner = megatron_opt.optimizer
        for g, group in enumerate(inner.param_groups):
            for i, p in enumerate(group["params"]):
                where = f"{c}.{g}.{i}" if len(chained) > 1 else f"{g}.{i}"
                yield f"optimizer main param {where}", p.detach()
                for key, value in inner.state.get(p, {}).items():
                    if torch.is_tensor(value):
                        yield f"optimizer state {where} {key}", value


def _prune(out_dir, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints. Each older one is renamed away first (one atomic
    step), then deleted: a crash in between leaves a ``.stale`` folder, never a step_N that is
    half gone. Leftovers of crashed saves and prunes go too (never the folder being written:
    rank 0 has published it)."""
    root = checkpoints_dir(out_dir)
    for old in complete(out_dir)[:-keep]:
        stale = old.with_name(old.name + ".stale")
        os.rename(old, stale)
        shutil.rmtree(stale, ignore_errors=True)
    for left in [*root.glob("step_*.partial"), *root.glob("step_*.stale")]:
        shutil.rmtree(left, ignore_errors=True)


def resume_path(cfg) -> Path | None:
    resume = cfg.checkpoint.resume
    if resume == "none":
        return None
    if resume == "auto":
        return latest(cfg.output_dir)
    path = Path(resume)
    if not is_complete(path):
        raise CheckpointError(f"checkpoint.resume: {path} is not a complete training checkpoint "
                              f"(needs {META_FILE} and {STATE_FILE})")
    return path


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree.get(part, {}) if isinstance(tree, dict) else {}
    return tree


def check_resume(cfg, arch, num_prompts: int) -> Path | None:
    """The checkpoint a run will resume from, checked before any process group or weight: it is
    complete and of this format, of the same model, saved with the same LR schedule and training
    file, and nothing newer in ``output_dir`` would be overwritten by the resumed run's saves."""
    from megatron_less.checkpoints.hf import check_same_arch
    from megatron_less.checkpoints.model import check_files, checkpoint_arch

    path = resume_path(cfg)
    if path is None:
        return None
    state = read_json(path / STATE_FILE)
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        got = state.get("version") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path / STATE_FILE}: version {got!r}, this code reads {STATE_VERSION}")
    missing = [k for k in ("step", "sampler", "scheduler", "counters", "layout", "config") if k not in state]
    if missing:
        raise CheckpointError(f"{path / STATE_FILE}: missing {missing} (not a trainer state this code wrote)")
    check_same_arch(arch, checkpoint_arch(path), f"checkpoint.resume: {path}")
    check_files(path)
    world = int(os.environ.get("WORLD_SIZE", "1"))  # before any group: the whole torchrun world
    if cfg.rollout.placement == "separate":
        world -= cfg.rollout.ranks  # the trainer ranks save and restore RNG states
    here = {"world": world, "tp": cfg.parallel.tp, "pp": cfg.parallel.pp}
    if state["layout"] == here:  # RNG states are restored: every rank needs its own
        lost = [r for r in range(here["world"]) if not (path / "rng" / f"rank_{r}.pt").is_file()]
        if lost:
            raise CheckpointError(f"{path / 'rng'}: no RNG state for rank(s) {lost} (the checkpoint is incomplete)")
    saved_dist = _get(state["config"], "optim.use_distributed_optimizer") is True
    if saved_dist != cfg.optim.use_distributed_optimizer:
        raise CheckpointError(
            f"checkpoint.resume: {path} was saved with optim.use_distributed_optimizer={saved_dist}, this config "
            f"has {cfg.optim.use_distributed_optimizer}; the two keep their optimizer state in different formats "
            "(set it back, or start a new output_dir from this checkpoint's model with model.checkpoint)")
    if saved_dist and (state["layout"]["tp"], state["layout"]["pp"]) != (here["tp"], here["pp"]):
        raise CheckpointError(
            f"checkpoint.resume: {path} was saved at tp={state['layout']['tp']} pp={state['layout']['pp']} with the "
            f"distributed optimizer, whose state reloads only at the same TP and PP (megatron's dp_reshardable "
            f"format; the data-parallel size may change); this run has tp={here['tp']} pp={here['pp']}. Resume at "
            "the saved TP/PP, or start a new output_dir from this checkpoint's model with model.checkpoint")
    now = cfg.model_dump()
    for key in SCHEDULE_KEYS:
        if _get(state["config"], key) != _get(now, key):
            raise CheckpointError(
                f"checkpoint.resume: {path} was saved with {key}={_get(state['config'], key)!r}, this config has "
                f"{_get(now, key)!r}; the LR schedule cannot continue under another one (set {key} back, "
                "or start a new output_dir from this checkpoint's model with model.checkpoint)")
    if state["sampler"].get("num_prompts") != num_prompts:
        raise CheckpointError(
            f"checkpoint.resume: {path} saved a data position over {state['sampler'].get('num_prompts')} prompts, "
            f"{cfg.data.train_file} now gives {num_prompts}: resuming would not continue the same order")
    newer = [p.name for p in complete(cfg.output_dir) if int(p.name[5:]) > state["step"]]
    if newer:
        raise CheckpointError(
            f"checkpoint.resume: {path} is step {state['step']}, but {checkpoints_dir(cfg.output_dir)} holds newer "
            f"{newer}, which the resumed run would collide with; resume from the newest (checkpoint.resume=auto) "
            "or use another output_dir")
    return path


def maybe_resume(run, path: Path | None) -> Path | None:
    """Load model, optimizer, LR schedule, data position, counters and (same layout) RNG from
    ``path`` (check_resume's answer)."""
    if path is None:
        return None
    state = read_json(path / STATE_FILE)
    module, optimizer = run.policy.module, run.policy.optimizer
    extra = {"optimizer": optimizer.sharded_state_dict(module.sharded_state_dict(), is_loading=True,
                                                       **_optimizer_format(run.cfg))}
    _, loaded = load_with(module, path, run.arch, extra)
    optimizer.load_state_dict(loaded["optimizer"])  # restores fp32 master weights too (bf16)
    run.scheduler.load_state_dict(state["scheduler"])
    run.sampler.load_state_dict(state["sampler"])
    run.step, run.counters = state["step"], dict(state["counters"])
    if same_layout(path):
        rng_file = path / "rng" / f"rank_{dist.get_rank()}.pt"
        try:  # the safe loader: tensors and plain values only, nothing in the file runs
            rng = torch.load(rng_file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"{rng_file}: not an RNG state the safe loader reads (torch.load(weights_only=True): "
                f"{str(e).splitlines()[0]}): it holds pickled objects, as a file from an untrusted source (or from a "
                "megatron-less before RNG files held tensors only) may; nothing in it was run"
            ) from None
        _set_rng_state(rng)
    return path


def same_layout(path: Path) -> bool:
    """Whether the checkpoint was saved at this job's world size, TP and PP."""
    return read_json(path / STATE_FILE)["layout"] == _layout()


def export_hf(run) -> str:
    """The newest checkpoint as an HF folder (OUTPUT_DIR/hf), with the run's tokenizer files."""
    from megatron_less.checkpoints.convert import export_hf as export

    ckpt = latest(run.out_dir)
    if ckpt is None:
        raise CheckpointError(f"no complete checkpoint under {checkpoints_dir(run.out_dir)} to export")
    return export(str(ckpt), str(run.out_dir / "hf"), tokenizer=run.cfg.model.tokenizer or run.cfg.model.hf_dir)
