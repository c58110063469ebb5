"""HF <-> Megatron conversions, the launcher that runs them on every rank, and the
``megatron-less convert-hf`` / ``export-hf`` commands.

Run as one command a conversion starts its own local processes (or runs in this one for a
single rank); under torchrun it uses the launched ranks. Everything is validated before a
process starts.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

from megatron_less.checkpoints.files import (
    CheckpointError,
    parse_dtype,
    parse_size,
    partial_dir,
    prepare_output_dir,
    publish_output_dir,
    refuse_existing,
)
from megatron_less.checkpoints.hf import (
    HFCheckpoint,
    finalize_hf_folder,
    hf_config_for_export,
    load_hf_checkpoint,
    write_shards,
)
from megatron_less.checkpoints.model import (
    checkpoint_arch,
    load_checkpoint,
    rank0_then_all,
    read_metadata,
    save_checkpoint,
)
from megatron_less.models import qwen2
from megatron_less.models.qwen2 import ConfigError, Qwen2Arch

DEFAULT_MAX_SHARD = "5GB"


def _build(arch: Qwen2Arch, tp: int, pp: int, dtype: torch.dtype):
    """This rank's stage for loading weights into (no random init: every weight is overwritten)."""
    config = qwen2.transformer_config(arch, tp=tp, pp=pp, params_dtype=dtype,
                                      perform_initialization=False)
    return qwen2.build_model(arch, config)


# --- per-rank work (every rank of a job calls these) --------------------------------------------

def hf_to_megatron_rank(hf_dir: str, out: str, tp: int, pp: int, dtype: str | None = None) -> str:
    """Every rank of a job: read the HF folder, save a megatron checkpoint at layout tp x pp."""
    from megatron_less.parallel import runtime

    hf = HFCheckpoint(hf_dir)
    runtime.initialize(tp, pp)
    model = _build(hf.arch, tp, pp, parse_dtype(dtype) if dtype else hf.dtype())
    load_hf_checkpoint(model, hf)
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
    tmp = partial_dir(out)
    rank0_then_all(prepare_output_dir, out)
    if not (ps.model_parallel_is_initialized() and ps.get_tensor_model_parallel_world_size() == 1
            and ps.get_pipeline_model_parallel_world_size() == pp):
        runtime.initialize(1, pp)
    model = _build(arch, 1, pp, parse_dtype(meta["megatron_less"]["dtype"]))
    load_checkpoint(model, ckpt_dir, arch)
    out_dtype = parse_dtype(dtype or meta["megatron_less"]["dtype"])
    shards = []
    if ps.get_data_parallel_rank() == 0:
        shards = write_shards(gather.iter_hf_tensors(model, arch), tmp,
                              f"stage{ps.get_pipeline_model_parallel_rank()}-",
                              parse_size(max_shard_size), out_dtype)
    per_rank = [None] * world
    dist.all_gather_object(per_rank, (ps.get_pipeline_model_parallel_rank(), shards))
    ordered = [s for _, rank_shards in sorted(per_rank, key=lambda x: x[0]) for s in rank_shards]
    config = hf_config_for_export(meta["hf_config"], arch, out_dtype)

    def finish():
        finalize_hf_folder(tmp, ordered, config, meta.get("generation_config"), tokenizer)
        publish_output_dir(tmp, out)

    rank0_then_all(finish)
    return out


def _export_rank(ckpt_dir, out, tokenizer, dtype, max_shard_size):
    from megatron_less.parallel import runtime

    runtime.initialize(1, 1)  # starts torch.distributed; export_hf picks its own layout
    return export_hf(ckpt_dir, out, tokenizer=tokenizer, dtype=dtype, max_shard_size=max_shard_size)


# --- launching ----------------------------------------------------------------------------------

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
    hf = HFCheckpoint(hf_dir)
    hf.arch.check(tp, pp)
    if dtype:
        parse_dtype(dtype)
    refuse_existing(out)
    if under_torchrun() and int(os.environ["WORLD_SIZE"]) % (tp * pp):
        raise ConfigError(f"torchrun world size {os.environ['WORLD_SIZE']} is not a multiple of "
                          f"tp x pp = {tp * pp}")
    return launch(hf_to_megatron_rank, tp * pp, hf_dir, out, tp, pp, dtype)


def convert_megatron_to_hf(ckpt_dir: str, out: str, *, tokenizer: str | None = None,
                           dtype: str | None = None, max_shard_size: str | int = DEFAULT_MAX_SHARD) -> str:
    """Single-command Megatron -> HF; validates everything before starting any process."""
    checkpoint_arch(ckpt_dir)
    if dtype:
        parse_dtype(dtype)
    parse_size(max_shard_size)
    if tokenizer and not os.path.isdir(tokenizer):
        raise CheckpointError(f"tokenizer folder {tokenizer} does not exist")
    refuse_existing(out)
    return launch(_export_rank, 1, ckpt_dir, out, tokenizer, dtype, max_shard_size)


# --- commands -----------------------------------------------------------------------------------

CONVERT_HF_HELP = """HF Qwen2/Qwen2.5 folder -> megatron-core distributed checkpoint (torch_dist).

    megatron-less convert-hf --hf-dir Qwen2.5-Math-1.5B --out ckpt/base --tp 2 --pp 2

Run as one command it starts tp x pp local processes itself; under torchrun it uses the launched
ranks (world size a multiple of tp x pp). The checkpoint loads at any TP/PP layout, so --tp/--pp
only choose how the saving job is split. Everything is validated before a process starts.
"""

EXPORT_HF_HELP = """megatron-less checkpoint -> HF folder that transformers' from_pretrained loads.

    megatron-less export-hf --ckpt ckpt/step_1000 --out hf_out --tokenizer Qwen2.5-Math-1.5B

The architecture comes from the checkpoint's megatron_less.json; the vocabulary padding is
removed, a tied LM head is written as tied (config.json tie_word_embeddings, no lm_head tensor).
Run as one command it loads the model in one process; under torchrun each rank loads one
pipeline stage (when the world size divides the layer count) and writes its own shard files.
"""


def _run(what: str, call) -> int:
    """Run a conversion; bad input is a one-line error and exit code 2, not a traceback."""
    try:
        out = call()
    except (ConfigError, CheckpointError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank gets here
        print(f"wrote {what} {out}")
    return 0


def convert_hf_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="megatron-less convert-hf", description=CONVERT_HF_HELP,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dir", required=True, help="folder with config.json and *.safetensors")
    ap.add_argument("--out", required=True, help="checkpoint folder to create (must not exist or be empty)")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the saving job")
    ap.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the saving job")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"],
                    help="parameter dtype (default: that of the HF tensors)")
    args = ap.parse_args(argv)
    return _run("megatron checkpoint", lambda: convert_hf_to_megatron(
        args.hf_dir, args.out, tp=args.tp, pp=args.pp, dtype=args.dtype))


def export_hf_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="megatron-less export-hf", description=EXPORT_HF_HELP,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="megatron-less checkpoint folder")
    ap.add_argument("--out", required=True, help="HF folder to create (must not exist or be empty)")
    ap.add_argument("--tokenizer", help="folder whose tokenizer files are copied alongside")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"],
                    help="dtype of the written tensors (default: the checkpoint's)")
    ap.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD,
                    help="largest safetensors file, e.g. 5GB or 500MiB (default %(default)s)")
    args = ap.parse_args(argv)
    return _run("HF checkpoint", lambda: convert_megatron_to_hf(
        args.ckpt, args.out, tokenizer=args.tokenizer, dtype=args.dtype,
        max_shard_size=args.max_shard_size))
