"""``megatron-less <command>``: one entry point for the tools users run."""

from __future__ import annotations

import sys

COMMANDS = {
    "eval": ("megatron_less.eval.run", "generate and score math benchmarks (avg@k, pass@k, ...)"),
    "convert-hf": ("tools.convert_hf_to_megatron", "HF Qwen2.5 folder -> megatron checkpoint"),
    "export-hf": ("tools.convert_megatron_to_hf", "megatron checkpoint -> HF folder"),
    "prepare-data": ("tools.prepare_data", "write the training file from MATH or a hub dataset"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<14}{help_}" for name, (_, help_) in COMMANDS.items()]
        msg = "usage: megatron-less <command> [options]\n\ncommands:\n" + "\n".join(lines)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"error: unknown command {argv[0]!r}\n\n{msg}", file=sys.stderr)
            return 2
        print(msg)
        return 0
    import importlib
    import os

    # tools/ lives beside the package in a checkout and is not installed as a package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
