#!/usr/bin/env python
"""Same as ``megatron-less export-hf`` (code in megatron_less/checkpoints/convert.py)."""

import sys

from megatron_less.checkpoints.convert import export_hf_main as main

if __name__ == "__main__":  # the guard is required: the conversion may start spawn processes
    sys.exit(main())
