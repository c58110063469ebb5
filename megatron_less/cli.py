"""``megatron-less <command>``: one entry point for the tools users run.

Each command names the package module that implements it, as ``"module"`` (its ``main``) or
``"module:function"``; ``main(argv) -> exit code`` parses the rest of the command line. The
module is imported only when its command runs, so ``megatron-less --help`` stays instant.

Output: by default the warnings and INFO/WARNING log lines of other packages (torch's and
megatron-core's FutureWarnings, "Apex is not installed", vLLM's start-up log) are hidden: a user
cannot act on them. Errors always show, and so do megatron-less's own warnings. ``--verbose``
anywhere on the command line (or MLESS_VERBOSE=1) shows everything.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings

VERBOSE_ENV = "MLESS_VERBOSE"
# loggers of packages whose INFO / WARNING lines are not the user's to act on
THIRD_PARTY_LOGGERS = ("torch", "megatron", "vllm", "transformers", "huggingface_hub", "datasets", "numba",
                       "filelock", "urllib3", "httpx", "tensorboard")
# the same, for processes started from here (torchrun ranks, vLLM's engine, reward workers), read by
# each package at import; a value the user set wins
QUIET_ENV = {"PYTHONWARNINGS": "ignore", "VLLM_LOGGING_LEVEL": "ERROR", "TRANSFORMERS_VERBOSITY": "error",
             "TORCH_CPP_LOG_LEVEL": "ERROR"}

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


def quiet_third_party() -> None:
    """Hide other packages' warnings and INFO/WARNING log lines, in this process and (through the
    environment) in the processes it starts; errors and megatron-less's own warnings still show."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"megatron_less(\.|$)")  # ours: the user can act on them
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def _usage() -> str:
    lines = [f"  {name:<14}{help_}" for name, (_, help_) in COMMANDS.items()]
    return ("usage: megatron-less [--verbose] <command> [options]\n\ncommands:\n" + "\n".join(lines)
            + "\n\n'megatron-less <command> --help' describes a command's options.\n"
            + "--verbose (anywhere; or MLESS_VERBOSE=1): also show other packages' warnings and INFO logs "
            + "(torch, megatron-core, vLLM), hidden by default")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv or os.environ.get(VERBOSE_ENV) == "1"
    argv = [a for a in argv if a != "--verbose"]
    if verbose:
        os.environ[VERBOSE_ENV] = "1"  # and for the processes a command starts (demo -> torchrun -> train)
    else:
        quiet_third_party()
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return command_main(argv[0])(argv[1:])


if __name__ == "__main__":  # the guard is required: conversions may start spawn processes
    sys.exit(main())
