"""Megatron-core distributed checkpoints (torch_dist) of a Qwen2 model, and HF <-> Megatron.

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

import contextlib
import os
import queue
import re
from typing import Any

import torch
import torch.distributed as dist

from megatron_less import convert
from megatron_less.convert import CheckpointError
from megatron_less.models import qwen2
from megatron_less.models.qwen2 import ConfigError, Qwen2Arch

META_FILE = "megatron_less.json"
FORMAT_VERSION = 1
DEFAULT_MAX_SHARD = "5GB"


# --- metadata -----------------------------------------------------------------------------------

def read_metadata(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    path = os.path.join(ckpt_dir, META_FILE)
    if not os.path.isdir(ckpt_dir):
        raise CheckpointError(f"checkpoint folder {ckpt_dir} does not exist")
    if not os.path.isfile(path):
        raise CheckpointError(f"{ckpt_dir} is not a complete megatron-less checkpoint (no {META_FILE}; "
                              "an interrupted save leaves only a '.partial' folder)")
    meta = convert._read_json(path)
    version = meta.get("megatron_less", {}).get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version!r} is not supported "
                              f"(this code reads {FORMAT_VERSION})")
    return meta


def checkpoint_arch(ckpt_dir: str | os.PathLike) -> Qwen2Arch:
    return Qwen2Arch.from_hf(read_metadata(ckpt_dir)["hf_config"])


def checkpoint_dtype(ckpt_dir: str | os.PathLike) -> torch.dtype:
    return convert.parse_dtype(read_metadata(ckpt_dir)["megatron_less"]["dtype"])


# --- save / load (every rank of the job calls these) --------------------------------------------

def _rank0_then_all(fn, *args):
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


@contextlib.contextmanager
def _sync_save():
    """A synchronous save writes and collects its results in this process, so the writer's
    result queue need not be a multiprocessing Manager queue (which spawns a server process,
    seconds per rank, and needs a ``__main__`` guard in every entry point)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa

    make_queue = fsa.__dict__.get("_get_write_results_queue")
    if make_queue is not None:
        fsa._get_write_results_queue = queue.Queue
    try:
        yield
    finally:
        if make_queue is not None:
            fsa._get_write_results_queue = make_queue


def save_checkpoint(model, out: str | os.PathLike, arch: Qwen2Arch, *, hf_config: dict,
                    generation_config: dict | None = None, source: str | None = None) -> str:
    """Save this job's model (every rank its stage/shard) as a torch_dist checkpoint at ``out``.

    ``hf_config`` is the source's config.json dict (kept verbatim for the exported config.json).
    ``out`` must not exist or be empty. Returns the absolute path."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    convert.check_same_arch(arch, Qwen2Arch.from_hf(hf_config), "hf_config")
    out = os.path.abspath(out)
    tmp = out.rstrip(os.sep) + ".partial"
    _rank0_then_all(convert.prepare_output_dir, out)
    dtype = next(model.parameters()).dtype
    with _sync_save():
        dist_checkpointing.save(model.sharded_state_dict(), tmp)
    meta = {
        "hf_config": hf_config,
        "generation_config": generation_config,
        "megatron_less": {
            "format_version": FORMAT_VERSION,
            "dtype": convert.dtype_name(dtype),
            "source": source,
            "saved_layout": {"tp": ps.get_tensor_model_parallel_world_size(),
                             "pp": ps.get_pipeline_model_parallel_world_size()},
            "vocab_size": arch.vocab_size,
        },
    }

    def finish():
        convert._write_json(os.path.join(tmp, META_FILE), meta)
        convert.publish_output_dir(tmp, out)

    dist.barrier()  # every rank's shards are on disk before the folder is published
    _rank0_then_all(finish)
    return out


@torch.no_grad()
def load_checkpoint(model, ckpt_dir: str | os.PathLike, arch: Qwen2Arch) -> dict[str, Any]:
    """Load a checkpoint saved at any TP/PP into this rank's stage/shard; returns its metadata."""
    meta = read_metadata(ckpt_dir)
    convert.check_same_arch(arch, Qwen2Arch.from_hf(meta["hf_config"]), str(ckpt_dir))
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(model.sharded_state_dict(), os.fspath(ckpt_dir))
    model.load_state_dict(state, strict=True)
    zero_vocab_padding(model, arch)
    return meta


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


# --- conversions --------------------------------------------------------------------------------

def build(arch: Qwen2Arch, tp: int, pp: int, dtype: torch.dtype):
    """This rank's stage for loading weights into (no random init: every weight is overwritten)."""
    config = qwen2.transformer_config(arch, tp=tp, pp=pp, params_dtype=dtype,
                                      perform_initialization=False)
    return qwen2.build_model(arch, config)


def hf_to_megatron_rank(hf_dir: str, out: str, tp: int, pp: int, dtype: str | None = None) -> str:
    """Every rank of a job: read the HF folder, save a megatron checkpoint at layout tp x pp."""
    from megatron_less.parallel import runtime

    hf = convert.HFCheckpoint(hf_dir)
    runtime.initialize(tp, pp)
    model = build(hf.arch, tp, pp, convert.parse_dtype(dtype) if dtype else hf.dtype())
    convert.load_hf_checkpoint(model, hf)
    return save_checkpoint(model, out, hf.arch, hf_config=hf.config,
                           generation_config=hf.generation_config, source=os.path.abspath(hf_dir))


def export_hf(ckpt_dir: str, out: str, *, tokenizer: str | None = None, dtype: str | None = None,
              max_shard_size: str | int = DEFAULT_MAX_SHARD) -> str:
    """Every rank of a job: load the checkpoint with one pipeline stage per rank (TP1; or whole
    copies when the world size does not divide the layers), each stage writes its own
    safetensors files, rank 0 names them and publishes the HF folder at ``out``."""
    from megatron.core import parallel_state as ps

    from megatron_less.parallel import gather, runtime

    meta = read_metadata(ckpt_dir)
    arch = Qwen2Arch.from_hf(meta["hf_config"])
    world = dist.get_world_size()
    pp = world if arch.num_hidden_layers % world == 0 else 1
    out = os.path.abspath(out)
    tmp = out.rstrip(os.sep) + ".partial"
    _rank0_then_all(convert.prepare_output_dir, out)
    if not (ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() == 1
            and ps.get_pipeline_model_parallel_world_size() == pp):
        runtime.initialize(1, pp)
    model = build(arch, 1, pp, convert.parse_dtype(meta["megatron_less"]["dtype"]))
    load_checkpoint(model, ckpt_dir, arch)
    out_dtype = convert.parse_dtype(dtype or meta["megatron_less"]["dtype"])
    shards = []
    if ps.get_data_parallel_rank() == 0:
        shards = convert.write_shards(gather.iter_hf_tensors(model, arch), tmp,
                                      f"stage{ps.get_pipeline_model_parallel_rank()}-",
                                      parse_size(max_shard_size), out_dtype)
    per_rank = [None] * world
    dist.all_gather_object(per_rank, (ps.get_pipeline_model_parallel_rank(), shards))
    ordered = [s for _, rank_shards in sorted(per_rank, key=lambda x: x[0]) for s in rank_shards]
    config = convert.hf_config_for_export(meta["hf_config"], arch, out_dtype)

    def finish():
        convert.finalize_hf_folder(tmp, ordered, config, meta.get("generation_config"), tokenizer)
        convert.publish_output_dir(tmp, out)

    _rank0_then_all(finish)
    return out


def parse_size(size: str | int) -> int:
    """'5GB' -> 5e9, '500MiB' -> 500 * 2**20 (transformers' max_shard_size convention)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", size.upper())
    if not m:
        raise ConfigError(f"max shard size {size!r} is not a size like 5GB, 500MB or 2GiB")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2) or " "))


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or (
        "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ)


def launch(fn, world_size: int, *args, timeout: float = 3600.0):
    """Run ``fn`` on every rank: in this process under torchrun, else in ``world_size`` spawned
    processes. Returns rank 0's result."""
    from megatron_less.parallel import runtime
    from megatron_less.parallel.spawn import free_port, run_distributed

    if under_torchrun() or (world_size == 1 and not dist.is_initialized()):
        # One rank: run here (a process start costs seconds), with a private port.
        env = {} if under_torchrun() else {
            "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port())}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            return fn(*args)
        finally:
            runtime.destroy()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return run_distributed(fn, world_size, args, timeout=timeout)[0]


def convert_hf_to_megatron(hf_dir: str, out: str, *, tp: int = 1, pp: int = 1,
                           dtype: str | None = None) -> str:
    """Single-command HF -> Megatron; validates everything before starting any process."""
    hf = convert.HFCheckpoint(hf_dir)
    hf.arch.check(tp, pp)
    if dtype:
        convert.parse_dtype(dtype)
    convert.refuse_existing(out)
    if under_torchrun() and int(os.environ["WORLD_SIZE"]) % (tp * pp):
        raise ConfigError(f"torchrun world size {os.environ['WORLD_SIZE']} is not a multiple of "
                          f"tp x pp = {tp * pp}")
    return launch(hf_to_megatron_rank, tp * pp, hf_dir, out, tp, pp, dtype)


def convert_megatron_to_hf(ckpt_dir: str, out: str, *, tokenizer: str | None = None,
                           dtype: str | None = None, max_shard_size: str | int = DEFAULT_MAX_SHARD) -> str:
    checkpoint_arch(ckpt_dir)
    if dtype:
        convert.parse_dtype(dtype)
    parse_size(max_shard_size)
    if tokenizer and not os.path.isdir(tokenizer):
        raise CheckpointError(f"tokenizer folder {tokenizer} does not exist")
    convert.refuse_existing(out)
    return launch(_export_rank, 1, ckpt_dir, out, tokenizer, dtype, max_shard_size)


def _export_rank(ckpt_dir, out, tokenizer, dtype, max_shard_size):
    from megatron_less.parallel import runtime

    runtime.initialize(1, 1)  # starts torch.distributed; export_hf picks its own layout
    return export_hf(ckpt_dir, out, tokenizer=tokenizer, dtype=dtype, max_shard_size=max_shard_size)

