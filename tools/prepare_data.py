#!/usr/bin/env python
"""Same as ``megatron-less prepare-data`` (code in megatron_less/data/prepare.py)."""

import sys

from megatron_less.data.prepare import main

if __name__ == "__main__":
    sys.exit(main())
