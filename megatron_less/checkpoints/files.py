"""What every checkpoint writer and reader shares: the error type, atomic output folders, JSON
files, and parsing of dtype and size arguments. No torch.distributed, no megatron."""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any

import torch

from megatron_less.models.qwen2 import ConfigError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
          "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read as asked; the message names the file/tensor."""


# --- atomic output folders ----------------------------------------------------------------------

def partial_dir(out: str | os.PathLike) -> str:
    """Where a folder destined for ``out`` is written until it is complete."""
    return os.path.abspath(out).rstrip(os.sep) + ".partial"


def prepare_output_dir(out: str | os.PathLike) -> str:
    """The temporary sibling folder to write into; renamed onto ``out`` only when complete, so a
    crash never leaves a folder at ``out`` that looks like a finished checkpoint."""
    refuse_existing(out)
    tmp = partial_dir(out)
    if os.path.exists(tmp):  # left by a crashed run
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    return tmp


def refuse_existing(out: str | os.PathLike) -> None:
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"output folder {out} exists and is not empty; refusing to overwrite")


def publish_output_dir(tmp: str, out: str | os.PathLike) -> None:
    out = os.path.abspath(out)
    if os.path.isdir(out) and not os.listdir(out):
        os.rmdir(out)
    os.rename(tmp, out)


# --- JSON ---------------------------------------------------------------------------------------

def read_json(path: str | os.PathLike) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


# --- arguments ----------------------------------------------------------------------------------

def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r} is not supported (expected one of bf16, fp16, fp32)")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_size(size: str | int) -> int:
    """'5GB' -> 5e9, '500MiB' -> 500 * 2**20 (transformers' max_shard_size convention)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", size.upper())
    if not m:
        raise ConfigError(f"max shard size {size!r} is not a size like 5GB, 500MB or 2GiB")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2) or " "))
