#!/usr/bin/env python
"""megatron-less checkpoint -> HF folder that transformers' from_pretrained loads.

    python tools/convert_megatron_to_hf.py --ckpt ckpt/step_1000 --out hf_out --tokenizer Qwen2.5-Math-1.5B

The architecture comes from the checkpoint's megatron_less.json; the vocabulary padding is
removed, a tied LM head is written as tied (config.json tie_word_embeddings, no lm_head tensor).
Run as one command it loads the model in one process; under torchrun each rank loads one
pipeline stage (when the world size divides the layer count) and writes its own shard files.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from megatron_less.checkpoint import DEFAULT_MAX_SHARD, convert_megatron_to_hf  # noqa: E402
from megatron_less.convert import CheckpointError  # noqa: E402
from megatron_less.models.qwen2 import ConfigError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="megatron-less checkpoint folder")
    ap.add_argument("--out", required=True, help="HF folder to create (must not exist or be empty)")
    ap.add_argument("--tokenizer", help="folder whose tokenizer files are copied alongside")
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"],
                    help="dtype of the written tensors (default: the checkpoint's)")
    ap.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD,
                    help="largest safetensors file, e.g. 5GB or 500MiB (default %(default)s)")
    args = ap.parse_args(argv)
    try:
        out = convert_megatron_to_hf(args.ckpt, args.out, tokenizer=args.tokenizer, dtype=args.dtype,
                                     max_shard_size=args.max_shard_size)
    except (ConfigError, CheckpointError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":  # under torchrun every rank gets here
        print(f"wrote HF checkpoint {out}")
    return 0


if __name__ == "__main__":  # the guard is required: the checkpoint loader may spawn processes
    sys.exit(main())
