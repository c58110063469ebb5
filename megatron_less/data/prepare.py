"""Write the training file (JSON Lines, ``prompt``/``answer`` per line) that the trainer reads.

    megatron-less prepare-data --source math_train --out data/math_train.jsonl
    megatron-less prepare-data --source my.parquet --template qwen_math \\
        --tokenizer ckpt/ --out t.jsonl

``--source`` is a registered name (math_train, math500, aime24, ...), a local
.jsonl/.json/.parquet file, or a hub id ``org/name[:split]``.
"""

from __future__ import annotations

import argparse
import sys

from megatron_less.data.benchmarks import load_dataset_problems
from megatron_less.data.prompts import TEMPLATES
from megatron_less.data.records import DataError
from megatron_less.data.train_file import write_train_file


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="megatron-less prepare-data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--source", default="math_train")
    ap.add_argument("--out", required=True)
    ap.add_argument("--template", default="none", choices=sorted(TEMPLATES))
    ap.add_argument("--tokenizer", help="tokenizer folder, for its chat template")
    ap.add_argument("--data-dir", help="offline data directory (default $MLESS_DATA_DIR)")
    ap.add_argument("--skip-bad", action="store_true", help="skip and count malformed rows")
    ap.add_argument("--limit", type=int, help="keep only the first N problems")
    args = ap.parse_args(argv)

    tokenizer = None
    if args.tokenizer:
        from megatron_less.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    try:
        problems, stats = load_dataset_problems(args.source, args.data_dir, skip_bad=args.skip_bad)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.limit is not None:
        problems = problems[: args.limit]
    n = write_train_file(problems, args.out, args.template, tokenizer)
    print(f"wrote {n} rows to {args.out} (read {stats.rows}, skipped {stats.skipped} bad rows)")
    for msg in stats.errors:
        print(f"  skipped: {msg}", file=sys.stderr)
    return 0

