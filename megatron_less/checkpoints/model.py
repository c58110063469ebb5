"""Megatron-core distributed checkpoints (torch_dist) of a Qwen2 model, at any TP/PP layout.

A checkpoint folder holds megatron's files plus ``megatron_less.json`` (the HF config, format
version, dtype, source): the architecture travels with the weights and the exporter needs
nothing else. It is written last and the folder is renamed into place, so a folder at the target
path is always complete; loads refuse a folder without it.

Vocabulary padding across layouts: the embedding and output layer have
``padded_vocab_size(tp)`` rows (a multiple of 128*tp), so a TP1 checkpoint of a 300-token
vocabulary stores 384 rows and a TP2 model wants 512. megatron-core marks both tensors
``allow_shape_mismatch``: on load each rank's shard is zero-filled, then only the rows that
overlap the stored tensor are read, so the real rows [0, vocab_size) always land in place whatever
the two layouts are. The remaining (padding) rows would hold a mix of stored values and zeros
depending on the layouts, so ``load_checkpoint`` zeroes every row >= vocab_size: after a load
the padding is identical at every layout (and the same as a fresh HF import).
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable

import torch
import torch.distributed as dist

from megatron_less.checkpoints.files import (
    CheckpointError,
    dtype_name,
    parse_dtype,
    partial_dir,
    prepare_output_dir,
    publish_output_dir,
    read_json,
    write_json,
)
from megatron_less.checkpoints.hf import check_same_arch
from megatron_less.models.qwen2 import Qwen2Arch
from megatron_less.parallel import mcore_compat

META_FILE = "megatron_less.json"
FORMAT_VERSION = 1


# --- metadata -----------------------------------------------------------------------------------

def is_megatron_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a complete megatron-less checkpoint (not, say, an HF folder)."""
    return os.path.isfile(os.path.join(path, META_FILE))


def read_metadata(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    path = os.path.join(ckpt_dir, META_FILE)
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"checkpoint folder {ckpt_dir} does not exist")
    if not os.path.isfile(path):
        raise CheckpointError(f"{ckpt_dir} is not a complete megatron-less checkpoint (no {META_FILE}; "
                              "an interrupted save leaves only a '.partial' folder)")
    meta = read_json(path)
    version = meta.get("megatron_less", {}).get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version!r} is not supported "
                              f"(this code reads {FORMAT_VERSION})")
    return meta


def check_files(ckpt_dir: str | os.PathLike) -> None:
    """Every file the checkpoint's torch_dist metadata points into exists and is long enough, and
    megatron's common state is there: a missing or truncated file is named here, by a check of
    sizes that needs no process group and reads no weight."""
    from torch.distributed.checkpoint import FileSystemReader

    ckpt_dir = os.fspath(ckpt_dir)
    read_metadata(ckpt_dir)
    try:
        index = FileSystemReader(ckpt_dir).read_metadata()
        storage = index.storage_data
    except Exception as e:  # noqa: BLE001 - any failure to read it means the same thing
        raise CheckpointError(f"{ckpt_dir}: the torch_dist index (.metadata) is unreadable: "
                              f"{type(e).__name__}: {e}") from None
    need: dict[str, int] = {}
    if not any(key.split("/", 1)[0] == "common_state" for key in index.state_dict_metadata):
        need["common.pt"] = 1  # megatron-core < 0.19 keeps its common state in its own file
    for info in storage.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for rel, size in sorted(need.items()):
        path = os.path.join(ckpt_dir, rel)
        if not os.path.isfile(path):
            raise CheckpointError(f"{ckpt_dir}: {rel} is missing (the checkpoint's index refers to it)")
        if os.path.getsize(path) < size:
            raise CheckpointError(f"{path} is truncated: {os.path.getsize(path)} bytes, the checkpoint's index "
                                  f"needs at least {size}")


def checkpoint_arch(ckpt_dir: str | os.PathLike) -> Qwen2Arch:
    return Qwen2Arch.from_hf(read_metadata(ckpt_dir)["hf_config"])


def checkpoint_dtype(ckpt_dir: str | os.PathLike) -> torch.dtype:
    return parse_dtype(read_metadata(ckpt_dir)["megatron_less"]["dtype"])


# --- save / load (every rank of the job calls these) --------------------------------------------

def rank0_then_all(fn, *args):
    """Run ``fn`` on rank 0 and re-raise its error on every rank (instead of a barrier hang)."""
    msg = [None]
    if dist.get_rank() == 0:
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - re-raised below on all ranks
            msg = [f"{type(e).__name__}: {e}"]
    dist.broadcast_object_list(msg, src=0)
    if msg[0] is not None:
        raise CheckpointError(msg[0])


def save_checkpoint(model, out: str | os.PathLike, arch: Qwen2Arch, *, hf_config: dict,
                    generation_config: dict | None = None, source: str | None = None,
                    extra_sharded: dict | None = None, on_disk: Callable[[str], None] | None = None) -> str:
    """Save this job's model (every rank its stage/shard) as a torch_dist checkpoint at ``out``.

    ``hf_config`` is the source's config.json dict (kept verbatim for the exported config.json).
    ``out`` must not exist or be empty. Returns the absolute path. A training checkpoint adds
    ``extra_sharded`` (e.g. the optimizer's sharded state, saved in the same torch_dist files;
    the model's keys stay top-level, so a model-only load reads it) and ``on_disk(folder)``,
    called on every rank before the folder is published, for its own files."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    check_same_arch(arch, Qwen2Arch.from_hf(hf_config), "hf_config")
    out = os.path.abspath(out)
    tmp = partial_dir(out)
    rank0_then_all(prepare_output_dir, out)
    dtype = next(model.parameters()).dtype
    failure, issues = None, None
    try:
        with mcore_compat.sync_save() as issues:  # no Manager process; rank 0's own writes' errors
            dist_checkpointing.save({**model.sharded_state_dict(), **(extra_sharded or {})}, tmp)
        if issues.deferred:
            raise issues.deferred[0]
        if on_disk is not None:
            on_disk(tmp)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - agreed on below, raised on every rank
        lines = str(e).strip().splitlines() or [""]  # torch's CheckpointException: tracebacks, cause last
        failure = f"rank {dist.get_rank()}: {type(e).__name__}: {lines[-1]}"
        logged = issues.writer_errors[0] if issues is not None and issues.writer_errors else ""
        if logged.split("error: ", 1)[-1] not in failure:  # the shard writer's own words (e.g. the disk)
            failure += f" [{logged}]"
    # every rank's files are on disk (or some rank failed) before the folder is published; all
    # ranks learn of any rank's failure, so none waits for a publish that will not come
    failures = [None] * dist.get_world_size()
    dist.all_gather_object(failures, failure)
    failed = [f for f in failures if f]
    if failed:
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"checkpoint {out} was not saved ({'; '.join(failed)[:2000]}); nothing was "
                              "published there, and no other folder was touched")
    meta = {
        "hf_config": hf_config,
        "generation_config": generation_config,
        "megatron_less": {
            "format_version": FORMAT_VERSION,
            "dtype": dtype_name(dtype),
            "source": source,
            "saved_layout": {"tp": ps.get_tensor_model_parallel_world_size(),
                             "pp": ps.get_pipeline_model_parallel_world_size()},
            "vocab_size": arch.vocab_size,
        },
    }

    def finish():
        try:
            write_json(os.path.join(tmp, META_FILE), meta)
            publish_output_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # never published: nothing half-written stays
            raise

    rank0_then_all(finish)
    return out


@torch.no_grad()
def load_checkpoint(model, ckpt_dir: str | os.PathLike, arch: Qwen2Arch) -> dict[str, Any]:
    """Load a checkpoint saved at any TP/PP into this rank's stage/shard; returns its metadata."""
    return load_with(model, ckpt_dir, arch, {})[0]


@torch.no_grad()
def load_with(model, ckpt_dir: str | os.PathLike, arch: Qwen2Arch, extra_sharded: dict) -> tuple[dict, dict]:
    """`load_checkpoint` that also reads ``extra_sharded`` (sharded state saved beside the model,
    e.g. the optimizer's); returns (metadata, the loaded extra state)."""
    meta = read_metadata(ckpt_dir)
    check_same_arch(arch, Qwen2Arch.from_hf(meta["hf_config"]), str(ckpt_dir))
    from megatron.core import dist_checkpointing

    model_sd = model.sharded_state_dict()
    state = dist_checkpointing.load({**model_sd, **extra_sharded}, os.fspath(ckpt_dir))
    model.load_state_dict({k: state[k] for k in model_sd}, strict=True)
    zero_vocab_padding(model, arch)
    return meta, {k: state[k] for k in extra_sharded}


@torch.no_grad()
def zero_vocab_padding(model, arch: Qwen2Arch) -> None:
    """Zero the rows >= vocab_size of this rank's embedding / output-layer shard."""
    from megatron.core import parallel_state as ps

    tp_rank = ps.get_tensor_model_parallel_rank()
    for name, p in model.named_parameters():
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            start = tp_rank * p.shape[0]
            first_pad = max(0, arch.vocab_size - start)
            p[first_pad:].zero_()
