"""``megatron-less train CONFIG.yaml [key.sub=value ...]``: under torchrun (any number of nodes),
or as a plain single process (a free port is picked). The config is validated, model layout
included, before any process group starts. Other packages' warnings and INFO logs (torch,
megatron-core, vLLM) are hidden unless --verbose (or MLESS_VERBOSE=1) is given."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="megatron-less train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="YAML config (see examples/configs/)")
    ap.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.n=8 optim.lr=1e-6")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = ap.parse_intermixed_args(argv)  # options may come between overrides

    from megatron_less.trainer.config import ConfigError, check_layout, dump, load_config

    rank0 = os.environ.get("RANK", "0") == "0"
    try:
        cfg = load_config(args.config, args.overrides)
        from megatron_less.trainer.setup import check_output_dir, model_arch

        check_layout(cfg, model_arch(cfg), int(os.environ.get("WORLD_SIZE", "1")))
        if not args.print_config:
            check_output_dir(cfg)  # a new run over an earlier run's output_dir: refused here, exit 2
    except (ConfigError, ValueError, FileNotFoundError) as e:
        if rank0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        if rank0:
            print(dump(cfg), end="")
        return 0
    if rank0:
        print("resolved config:\n" + dump(cfg), flush=True)
    import warnings

    import torch

    if not torch.cuda.is_available():  # megatron's advice about CUDA streams, at every layer: not for CPUs
        warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS.*")
    from megatron_less.parallel import runtime
    from megatron_less.trainer.loop import train

    try:
        metrics = train(cfg).metrics
    finally:
        runtime.destroy()
    if rank0 and metrics:
        keys = ("reward/mean", "reward/accuracy", "loss/total", "rollout/entropy", "time/step_s")
        print("final step: " + ", ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
