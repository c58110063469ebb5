#!/usr/bin/env python
"""HF Qwen2/Qwen2.5 folder -> megatron-core distributed checkpoint (torch_dist).

    python tools/convert_hf_to_megatron.py --hf-dir Qwen2.5-Math-1.5B --out ckpt/base --tp 2 --pp 2

Run as one command it starts tp x pp local processes itself; under torchrun it uses the launched
ranks (world size a multiple of tp x pp). The checkpoint loads at any TP/PP layout, so --tp/--pp
only choose how the saving job is split. Everything is validated before a process starts.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from megatron_less.checkpoint import convert_hf_to_megatron  # noqa: E402
from megatron_less.convert import CheckpointError  # noqa: E402
from megatron_less.models.qwen2 import ConfigError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dir", required=True, help="folder with config.json and *.safetensors")
    ap.add_argument("--out", required=True, help="checkpoint folder to create (must not exist or be empty)")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the saving job")
    ap.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the saving job")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"],
                    help="parameter dtype (default: that of the HF tensors)")
    args = ap.parse_args(argv)
    try:
        out = convert_hf_to_megatron(args.hf_dir, args.out, tp=args.tp, pp=args.pp, dtype=args.dtype)
    except (ConfigError, CheckpointError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank gets here
        print(f"wrote megatron checkpoint {out}")
    return 0


if __name__ == "__main__":  # the guard is required: the checkpoint writer starts spawn processes
    sys.exit(main())
