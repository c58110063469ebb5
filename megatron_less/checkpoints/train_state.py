"""Training checkpoints: all a run needs to go on as if it had never stopped.

One folder per saved step, ``OUTPUT_DIR/checkpoints/step_NNNNNN``, written as ``.partial`` and made
current by a rename (checkpoints.model.save_checkpoint), so a crash mid-save leaves no folder
that looks complete. It holds
  * one megatron-core torch_dist checkpoint of the model and the optimizer state (Adam moments,
    fp32 master weights under bf16) - the model part is an ordinary megatron-less checkpoint, so
    `export-hf` and `eval --model` read a training checkpoint as they are;
  * trainer_state.json: step, data position, LR schedule, counters, the resolved config, layout;
  * rng/rank_R.pt: each rank's python / numpy / torch / CUDA / megatron model-parallel RNG states.
RNG states are restored only at the layout they were saved at (elsewhere rank R is another
shard); sampling and the losses draw from per-step seeds, so a resume at another layout still
continues the run.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from megatron_less.checkpoints.files import CheckpointError, read_json, write_json
from megatron_less.checkpoints.model import META_FILE, load_with, save_checkpoint

STATE_FILE = "trainer_state.json"
STATE_VERSION = 1


def checkpoints_dir(out_dir) -> Path:
    return Path(out_dir) / "checkpoints"


def is_complete(path: Path) -> bool:
    return (path / META_FILE).is_file() and (path / STATE_FILE).is_file()


def latest(out_dir) -> Path | None:
    """The newest complete checkpoint (``.partial`` folders of an interrupted save never count)."""
    root = checkpoints_dir(out_dir)
    found = sorted(p for p in root.glob("step_*") if not p.name.endswith(".partial") and is_complete(p))
    return found[-1] if found else None


def _layout() -> dict:
    from megatron.core import parallel_state as ps

    return {"world": dist.get_world_size(), "tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size()}  # fmt: skip


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "megatron": tensor_parallel.get_cuda_rng_tracker().get_states()}  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["megatron"])


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


def save(run) -> Path:
    """Collective: every rank writes its shards and RNG state; rank 0 the trainer state."""
    out = checkpoints_dir(run.out_dir) / f"step_{run.step:06d}"
    module, optimizer = run.policy.module, run.policy.optimizer
    extra = {"optimizer": optimizer.sharded_state_dict(module.sharded_state_dict())}
    rank = dist.get_rank()

    def on_disk(tmp: str) -> None:
        os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
        torch.save(_rng_state(), os.path.join(tmp, "rng", f"rank_{rank}.pt"))
        if rank == 0:
            write_json(os.path.join(tmp, STATE_FILE), trainer_state(run))

    save_checkpoint(module, out, run.arch, hf_config=run.hf_config, generation_config=run.generation_config,
                    source=run.source, extra_sharded=extra, on_disk=on_disk)
    if rank == 0:
        _prune(checkpoints_dir(run.out_dir), run.cfg.checkpoint.keep)
    dist.barrier()
    return out


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step_*") if not p.name.endswith(".partial") and is_complete(p))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("step_*.partial"):  # left by a crash; never the one being written (rank 0 renamed it)
        shutil.rmtree(stale, ignore_errors=True)


def resume_path(run) -> Path | None:
    resume = run.cfg.checkpoint.resume
    if resume == "none":
        return None
    if resume == "auto":
        return latest(run.out_dir)
    path = Path(resume)
    if not is_complete(path):
        raise CheckpointError(f"checkpoint.resume: {path} is not a complete training checkpoint "
                              f"(needs {META_FILE} and {STATE_FILE})")
    return path


def maybe_resume(run) -> Path | None:
    """Load model, optimizer, LR schedule, data position, counters and (same layout) RNG."""
    path = resume_path(run)
    if path is None:
        return None
    state = read_json(path / STATE_FILE)
    if state.get("version") != STATE_VERSION:
        raise CheckpointError(f"{path / STATE_FILE}: version {state.get('version')!r}, this code reads {STATE_VERSION}")
    module, optimizer = run.policy.module, run.policy.optimizer
    extra = {"optimizer": optimizer.sharded_state_dict(module.sharded_state_dict(), is_loading=True)}
    _, loaded = load_with(module, path, run.arch, extra)
    optimizer.load_state_dict(loaded["optimizer"])  # restores fp32 master weights too (bf16)
    run.scheduler.load_state_dict(state["scheduler"])
    run.sampler.load_state_dict(state["sampler"])
    run.step, run.counters = state["step"], dict(state["counters"])
    if state["layout"] == _layout():
        rng = torch.load(path / "rng" / f"rank_{dist.get_rank()}.pt", weights_only=False)
        _set_rng_state(rng)
    return path


def export_hf(run) -> str:
    """The newest checkpoint as an HF folder (OUTPUT_DIR/hf), with the run's tokenizer files."""
    from megatron_less.checkpoints.convert import export_hf as export

    ckpt = latest(run.out_dir)
    if ckpt is None:
        raise CheckpointError(f"no complete checkpoint under {checkpoints_dir(run.out_dir)} to export")
    return export(str(ckpt), str(run.out_dir / "hf"), tokenizer=run.cfg.model.tokenizer or run.cfg.model.hf_dir)
