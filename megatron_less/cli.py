"""``megatron-less <command>``: one entry point for the tools users run.

Each command names the package module that implements it, as ``"module"`` (its ``main``) or
``"module:function"``; ``main(argv) -> exit code`` parses the rest of the command line. The
module is imported only when its command runs, so ``megatron-less --help`` stays instant.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("megatron_less.trainer.cli", "GRPO (+ LESS) training from a YAML config, under torchrun or alone"),
    "eval": ("megatron_less.eval.run", "generate and score math benchmarks (avg@k, pass@k, ...)"),
    "convert-hf": ("megatron_less.checkpoints.convert:convert_hf_main",
                   "HF Qwen2.5 folder -> megatron checkpoint"),
    "export-hf": ("megatron_less.checkpoints.convert:export_hf_main", "megatron checkpoint -> HF folder"),
    "prepare-data": ("megatron_less.data.prepare", "write the training file from MATH or a hub dataset"),
    "demo": ("megatron_less.demo.run", "GRPO + LESS on an embedded task, on a CPU, in minutes"),
    "compare": ("megatron_less.demo.compare", "GRPO vs LESS vs forking tokens vs KL-Cov on the demo task"),
    "plot": ("megatron_less.report.plot", "a run's curves as a PNG"),
    "view": ("megatron_less.report.viewer", "a step's rollouts as an HTML page (entropy, LESS classes)"),
}


def command_main(name: str):
    """The ``main(argv)`` function behind command ``name``."""
    module, _, func = COMMANDS[name][0].partition(":")
    return getattr(importlib.import_module(module), func or "main")


def _usage() -> str:
    lines = [f"  {name:<14}{help_}" for name, (_, help_) in COMMANDS.items()]
    return ("usage: megatron-less <command> [options]\n\ncommands:\n" + "\n".join(lines)
            + "\n\n'megatron-less <command> --help' describes a command's options.")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return command_main(argv[0])(argv[1:])


if __name__ == "__main__":  # the guard is required: conversions may start spawn processes
    sys.exit(main())
