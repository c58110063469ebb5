"""The kernel's interface in plain Python (no numba): token classes, output counters and the
input / output bundles. The package imports only this at import time; numba and the kernels
load on the first LESS call (llvmlite's ffi object, once loaded, breaks vLLM 0.32's CPU kernel
scan when an engine starts afterwards)."""

from __future__ import annotations

from collections import namedtuple

# Token classes (the public codes are re-exported by the package).
PAD, HIGH, DEFAULT, CORRECT_ONLY, INCORRECT_ONLY, SHARED = range(6)
N_CLASSES = 6

# counts[...] of one call (kernel output), besides the per-class tallies.
N_GROUPS, N_GROUPS_SHAPED, N_SEGMENT_TOKENS, N_CLUSTERS = 0, 1, 2, 3  # N_CLUSTERS + kind - 1
N_COUNTS = 6

# The batch, flat (token f of row r at f = r * t + c), and what the kernel writes.
Inputs = namedtuple(
    "Inputs",
    [
        "tok",  # [B * T] int64
        "ebits",  # [B * T * wpt] uint32: entropies as little-endian words
        "wpt",  # words per entropy: 1 (float32) or 2 (float64)
        "mask",  # [B * T] uint8, 0/1, left-aligned
        "corr",  # [B] bool
        "gid",  # [B] int64: group ids (any values)
        "t",
        "lengths",  # [B] int64, filled by the kernel: valid tokens per row
    ],
)
Outputs = namedtuple(
    "Outputs",
    [
        "weights",  # [B * T] float32
        "classes",  # [B * T] int8
        "class_tokens",  # [N_CLASSES] int64: tokens of shaped groups per class
        "class_weight",  # [N_CLASSES] float64: their summed weights
        "counts",  # [N_COUNTS] int64
    ],
)
